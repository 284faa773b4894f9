"""Evaluation during training (trainer.eval): a short tiny run logs eval/loss and eval/probe/* to metrics.jsonl,
without changing the training itself; bad eval settings are refused naming the key."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from mmrope.train.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return validate(compose("train", overrides=overrides))


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


EVAL = (
    "trainer.eval.every=2",
    "trainer.eval.max_batches=2",
    "trainer.eval.synthetic_samples=12",
    "trainer.eval.probe_samples=2",
    "trainer.eval.probe_distances=[0,32]",
)


def test_eval_in_training_logs_loss_and_probe(tmp_path, cache_dir):
    import torch

    from mmrope.train.run import build_session

    name = "with_eval"
    overrides = (
        f"trainer.run_name={name}",
        "trainer.max_steps=4",
        "trainer.log_every=3",
        "trainer.save_every=100",
        "trainer.resume=never",
        "rope.dipe=true",  # the probe and the held-out loss go through the DIPE attention path
        *EVAL,
    )
    s = build_session(compose_cfg(tiny_overrides(cache_dir, tmp_path, *overrides)))
    try:
        s.trainer.train()
        # evaluating must not perturb training: module modes, weights, RNG and gradients are left as they were
        modes = {n: m.training for n, m in s.engine.module.named_modules()}
        weights = {n: p.detach().clone() for n, p in s.engine.module.named_parameters()}
        rng = torch.get_rng_state()
        grads = {n: p.grad for n, p in s.engine.module.named_parameters()}
        again = s.trainer.evaluator.run()
        assert {n: m.training for n, m in s.engine.module.named_modules()} == modes
        assert any(modes.values())
        assert all(torch.equal(p, weights[n]) for n, p in s.engine.module.named_parameters())
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(p.grad is grads[n] for n, p in s.engine.module.named_parameters())
    finally:
        s.metrics.close()

    by_step = {r["step"]: r for r in _records(tmp_path / name / "metrics.jsonl")}
    # eval steps 2 and 4 get a record (step 2 is not a log_every step) holding train AND eval metrics; step 1
    # is always logged (curves start there), step 3 is a log_every step
    assert sorted(by_step) == [1, 2, 3, 4]
    assert "eval/loss" not in by_step[1] and "eval/loss" not in by_step[3]
    for step in (2, 4):
        r = by_step[step]
        assert math.isfinite(r["train/loss"])
        assert math.isfinite(r["eval/loss"]) and r["eval/loss"] > 0
        for d in (0, 32):
            assert 0.0 < r[f"eval/probe/share@{d}"] < 1.0
    assert by_step[2]["eval/loss"] != by_step[4]["eval/loss"]  # the model moved between evaluations
    # the same model evaluated again gives the same numbers (eval rows and probe samples are fixed)
    assert again["eval/loss"] == pytest.approx(by_step[4]["eval/loss"], rel=1e-6)
    assert again["eval/probe/share@32"] == pytest.approx(by_step[4]["eval/probe/share@32"], rel=1e-6)
    # held-out shards: generated with another seed next to the training ones
    eval_manifest = json.loads((cache_dir / "synthetic_eval" / "manifest.json").read_text())
    train_manifest = json.loads((cache_dir / "synthetic" / "manifest.json").read_text())
    assert eval_manifest["settings"]["seed"] != train_manifest["settings"]["seed"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.eval.every=-1", "trainer.eval.every"),
        ("trainer.eval.probe_distances=[0,-5]", "trainer.eval.probe_distances"),
        ("trainer.eval.max_batches=-2", "trainer.eval.max_batches"),
    ],
)
def test_bad_eval_config_names_the_key(tmp_path, cache_dir, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_cfg(tiny_overrides(cache_dir, tmp_path, override))
