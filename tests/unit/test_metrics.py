"""Metrics sinks: wandb run ids that wandb accepts whatever a sweep names its runs."""

from __future__ import annotations

import pytest

from mmrope.train.metrics import wandb_run_id

SWEEP_RUN_NAMES = [
    "tiny-default",
    "rope=mrope,trainer.max_steps=12",  # the README's sweep with a second override
    "rope=mrope_i,trainer.optim.lr=0.001,data.max_tokens=512",
    "a:b;c#d?e'f",
    "rope=mrope,model.tiny.hidden_size=128," + ",".join(f"x{i}=y" for i in range(40)),  # very long
    "  ",
    "ünïcödé=ü",
]


@pytest.mark.parametrize("name", SWEEP_RUN_NAMES)
def test_wandb_accepts_the_id_of_any_run_name(name):
    import wandb

    run_id = wandb_run_id(f"runs/sweeps/s/{name}")
    wandb.Settings(run_id=run_id)  # wandb's own validation: raises UsageError on an id it refuses
    assert run_id == run_id.strip() and len(run_id) <= 64


def test_wandb_ids_are_stable_and_distinct_per_run_folder():
    a = wandb_run_id("runs/sweeps/s1/rope=mrope,trainer.max_steps=12")
    assert a == wandb_run_id("runs/sweeps/s1/rope=mrope,trainer.max_steps=12")  # a requeued job resumes it
    assert a.startswith("rope-mrope-trainer.max_steps-12")  # readable
    others = {
        wandb_run_id("runs/sweeps/s2/rope=mrope,trainer.max_steps=12"),  # same overrides, another sweep
        wandb_run_id("runs/sweeps/s1/rope=mrope;trainer.max_steps=12"),  # same slug, another name
        wandb_run_id("runs/sweeps/s1/rope=mrope,trainer.max_steps=13"),
    }
    assert a not in others and len(others) == 3
