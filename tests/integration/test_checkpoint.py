"""Checkpoints and step health, one process (CPU, ZeRO-2, world size 1).

- exact resume: 0 -> 2N equals 0 -> N, then a fresh session resuming N -> 2N, bitwise (loss, LR, grad norm,
  weights), whatever way the data stream is resumed (row skipping or loader state);
- resume=must on an empty run dir and an incompatible config are refused, naming the key;
- trainer.on_nonfinite: an injected NaN stops before the update (raise) or drops exactly that update on
  every rank and counts it (skip), aborting once the skip budget is spent.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from mmrope.train.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return validate(compose("train", overrides=overrides))


def session(cache_dir, out_dir, *extra: str):
    from mmrope.train.run import build_session

    cfg = compose_cfg(
        tiny_overrides(cache_dir, out_dir, "deepspeed=zero2", "trainer.global_batch_size=2", *extra)
    )
    return build_session(cfg)


def params(s) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.engine.module.vlm.named_parameters()}


def record_step(s) -> tuple[float, float, float]:
    loss, stats = s.trainer.train_step()
    s.trainer.step += 1
    return loss, s.engine.get_lr()[0], stats["train/grad_norm"]


def test_exact_resume_and_refusals(tmp_path, cache_dir):
    n = 2
    common = ("trainer.run_name=exact", f"trainer.max_steps={2 * n}", "trainer.optim.warmup_steps=1")
    a = session(cache_dir, tmp_path, *common, "trainer.resume=never")
    for _ in range(n):
        record_step(a)
    saved = a.trainer.save()
    assert saved.name == f"step_{n}" and (saved / "manifest.json").is_file()
    expected = [record_step(a) for _ in range(n)]
    expected_params = params(a)
    a.metrics.close()

    b = session(cache_dir, tmp_path, *common, "trainer.resume=must")
    assert b.start_step == n and b.trainer.step == n
    got = [record_step(b) for _ in range(n)]
    b.metrics.close()
    # Bitwise: same data, same optimizer moments, same LR schedule position, same RNG.
    assert got == expected
    got_params = params(b)
    for name, p in expected_params.items():
        assert torch.equal(got_params[name], p), name
    assert len({lr for _, lr, _ in expected}) == n, "LR did not move: the test would not see a lost schedule"

    # resume=must with nothing to resume from names the key.
    with pytest.raises(ValueError, match=r"trainer\.resume"):
        session(cache_dir, tmp_path, "trainer.run_name=empty", "trainer.resume=must")

    # An incompatible config is refused, naming the key that changed.
    with pytest.raises(ValueError, match=r"`rope"):
        session(cache_dir, tmp_path, *common, "trainer.resume=auto", "rope=vanilla")
    # Offload switched on for a run trained without it: another optimizer (DeepSpeed's CPU Adam), refused.
    with pytest.raises(ValueError, match=r"`deepspeed\.offload_optimizer`"):
        session(cache_dir, tmp_path, *common, "trainer.resume=auto", "deepspeed.offload_optimizer=true")

    # resume=never starts a new run: on a folder holding one it refuses, naming trainer.run_name, and
    # touches nothing (no overwritten step, no moved `latest`, no second history in metrics.jsonl).
    before = folder_snapshot(tmp_path / "exact")
    with pytest.raises(ValueError, match=r"`trainer\.run_name`.*already holds a run"):
        session(cache_dir, tmp_path, *common, "trainer.resume=never")
    assert folder_snapshot(tmp_path / "exact") == before


def folder_snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_changed_hyperparameters_says_so_and_applies_them(tmp_path, cache_dir, capsys):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    common = ("trainer.run_name=changed", "trainer.max_steps=6", "trainer.optim.warmup_steps=1")
    a = session(cache_dir, tmp_path, *common)
    for _ in range(2):
        record_step(a)
    a.trainer.save()
    a.metrics.close()
    capsys.readouterr()

    new = ("trainer.optim.lr=0.004", "trainer.optim.min_lr=0.0001", "trainer.optim.weight_decay=0.1")
    b = session(cache_dir, tmp_path, *common, *new)
    out = capsys.readouterr().out
    assert "changed: trainer.optim.lr 0.002 -> 0.004" in out
    assert "changed: trainer.optim.min_lr 0.0002 -> 0.0001" in out
    assert "changed: trainer.optim.weight_decay 0.05 -> 0.1" in out
    assert "changed: trainer.max_steps" not in out and "changed: trainer.resume" not in out
    assert b.start_step == 2

    # The changes are in force: the LR is transformers' schedule with the NEW settings at step 2, 3, ...
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.004)
    ref = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=1, num_training_steps=6, min_lr=0.0001
    )
    for _ in range(2):
        opt.step()
        ref.step()
    assert b.engine.get_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-12)
    opt.step()
    ref.step()
    assert record_step(b)[1] == pytest.approx(ref.get_last_lr()[0], rel=1e-12)
    decay = [g["weight_decay"] for g in b.engine.lr_scheduler.optimizer.param_groups]
    assert decay == [0.1, 0.0]
    b.metrics.close()


def test_nonfinite_raise_stops_before_the_update(tmp_path, cache_dir):
    s = session(
        cache_dir,
        tmp_path,
        "trainer.run_name=nan_raise",
        "trainer.resume=never",
        "trainer.on_nonfinite=raise",
        "trainer.debug_inject_nan_at_step=2",
    )
    record_step(s)
    before = params(s)
    lr_before = s.engine.get_lr()[0]
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 2"):
        s.trainer.train_step()
    after = params(s)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "raise policy let the update through"
    assert s.engine.get_lr()[0] == lr_before
    s.metrics.close()


def test_nonfinite_skip_drops_the_update_and_counts(tmp_path, cache_dir):
    s = session(
        cache_dir,
        tmp_path,
        "trainer.run_name=nan_skip",
        "trainer.resume=never",
        "trainer.max_steps=6",
        "trainer.on_nonfinite=skip",
        "trainer.max_nonfinite_skips=1",
        "trainer.debug_inject_nan_at_step=2",
    )
    record_step(s)
    before = params(s)
    lr_before = s.engine.get_lr()[0]
    loss, lr, grad_norm = record_step(s)  # step 2: NaN injected, fault must fire and be skipped
    assert loss != loss, "the injected NaN did not reach the loss"
    assert s.trainer.nonfinite_skips == 1
    assert not s.engine.was_step_applied()
    after = params(s)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "skipped step changed the weights"
    assert lr == lr_before, "skipped step advanced the LR schedule"
    # Training continues normally afterwards: finite loss, weights move.
    loss3, _, grad_norm3 = record_step(s)
    assert torch.isfinite(torch.tensor([loss3, grad_norm3])).all()
    assert any(not torch.equal(params(s)[k], v) for k, v in before.items())
    # The skip count travels with the checkpoint.
    state = torch.load(s.trainer.save() / "rank_0.pt", weights_only=False)
    assert state["nonfinite_skips"] == 1
    # Budget: a second skip exceeds trainer.max_nonfinite_skips=1 and aborts.
    s.cfg.trainer.debug_inject_nan_at_step = s.trainer.step + 1
    with pytest.raises(FloatingPointError, match=r"max_nonfinite_skips=1"):
        s.trainer.train_step()
    assert s.trainer.nonfinite_skips == 2
    s.metrics.close()


def test_training_logs_its_first_step(tmp_path, cache_dir):
    """Loss curves start at step 1, whatever trainer.log_every says (the last step is logged too)."""
    s = session(cache_dir, tmp_path, "trainer.run_name=first", "trainer.max_steps=3", "trainer.log_every=10")
    s.trainer.train()
    s.metrics.close()
    records = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3]
    assert all("train/loss" in r for r in records)
