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


def test_a_resumed_run_keeps_one_record_per_step(tmp_path, capsys):
    """Killed after logging steps 5 and 6 (and mid-way through a 7th line), resumed from the checkpoint of step 4:
    the steps after 4 are dropped when the resumed run opens the log, so it holds each step once."""
    import json

    from mmrope.train.config import TrainConfig
    from mmrope.train.metrics import Metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "train/loss": 10.0 - s}) + "\n" for s in range(1, 7)) + '{"st'
    )
    cfg = TrainConfig()
    cfg.trainer.wandb.mode = "disabled"
    metrics = Metrics(cfg, tmp_path, enabled=True, start_step=4, flat_config={})
    assert "dropped 3 record(s) after step 4" in capsys.readouterr().out
    for step in (5, 6, 7):
        metrics.log(step, {"train/loss": 0.5})
    metrics.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["train/loss"] for r in records[3:]] == [6.0, 0.5, 0.5, 0.5]  # the resumed run's steps
    assert not list(tmp_path.glob(".metrics.jsonl.tmp*"))  # replaced atomically, nothing left behind
