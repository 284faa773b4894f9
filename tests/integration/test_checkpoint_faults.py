"""Faults around checkpoints, in real processes: kill -9 during a save, and preemption of one of two ranks.

This file doubles as the worker script (`python test_checkpoint_faults.py OUT_JSON override ...`): it trains
with `Trainer.train()` and writes what it saw (start step, exit code) to OUT_JSON_rank_R.json.
MMROPE_TEST_SIGNAL_RANK / MMROPE_TEST_SIGNAL_AFTER make that rank send itself SIGUSR1 after that step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import ROOT, clean_env, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.slow
ENV = clean_env()


def worker(out: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from mmrope.train.config import register_configs, validate
    from mmrope.train.preemption import Preempted
    from mmrope.train.run import build_session

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = validate(compose("train", overrides=overrides))
    s = build_session(cfg)
    report = {"start_step": s.start_step, "code": 0}
    signal_rank = int(os.environ.get("MMROPE_TEST_SIGNAL_RANK", -1))
    signal_after = int(os.environ.get("MMROPE_TEST_SIGNAL_AFTER", -1))
    if s.dist.rank == signal_rank:
        step_fn = s.trainer.train_step

        def train_step():
            out_ = step_fn()
            if s.trainer.step + 1 == signal_after:  # train_step runs before the counter moves
                os.kill(os.getpid(), signal.SIGUSR1)
            return out_

        s.trainer.train_step = train_step
    try:
        s.trainer.train()
    except Preempted as e:
        report["code"] = e.code
    report["step"] = s.trainer.step
    Path(f"{out}_rank_{s.dist.rank}.json").write_text(json.dumps(report))
    sys.exit(report["code"])


def overrides_for(cache_dir: Path, runs: Path, *extra: str) -> list[str]:
    return tiny_overrides(cache_dir, runs, "trainer.optim.lr=1e-2", *extra)


def run_single(tmp_path: Path, cache_dir: Path, name: str, crash_at: str | None, crash_step: int, *extra):
    env = dict(ENV)
    if crash_at:
        env.update(MMROPE_CRASH_AT=crash_at, MMROPE_CRASH_STEP=str(crash_step))
    cmd = [
        sys.executable,
        __file__,
        str(tmp_path / name),
        *overrides_for(cache_dir, tmp_path / "runs", *extra),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_kill9_during_save_then_resume_from_last_committed(tmp_path, cache_dir):
    from mmrope.train.checkpoint import CheckpointManager

    common = (
        "trainer.run_name=crashy",
        "trainer.max_steps=5",
        "trainer.save_every=1",
        "trainer.keep_last=2",
        "trainer.global_batch_size=1",
        "trainer.log_every=1",
    )
    ckpt = CheckpointManager(tmp_path / "runs/crashy/checkpoints", rank=0, world_size=1)
    # (crash point, step being saved when killed, step the next start must resume from, committed after)
    plan = [
        ("staged", 2, 0, {"step_1"}),  # step_2.tmp has no manifest: never loaded
        ("manifest", 3, 1, {"step_1", "step_2"}),  # manifest written but not renamed: still .tmp
        ("renamed", 4, 2, {"step_2", "step_3", "step_4"}),  # renamed, `latest` not yet moved
    ]
    for crash_at, step, resume_from, committed in plan:
        proc = run_single(tmp_path, cache_dir, crash_at, crash_at, step, *common)
        log = proc.stdout + proc.stderr
        assert proc.returncode == -signal.SIGKILL, log[-3000:]
        assert f"MMROPE_CRASH_AT={crash_at}: killing pid" in log, "the fault did not fire"
        assert ("resume: fresh" if resume_from == 0 else f"resume: step {resume_from}") in log, log[-3000:]
        assert {p.name for p in ckpt.committed()} == committed
    # The pointer still names step_3; the newest committed (complete, manifested) step_4 is resumed from.
    assert ckpt.pointer().name == "step_3" and ckpt.latest().name == "step_4"
    assert (ckpt.dir / "step_3.tmp").exists() is False and (ckpt.dir / "step_2.tmp").exists() is False

    proc = run_single(tmp_path, cache_dir, "final", None, 0, *common, "trainer.resume=must")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "resume: step 4" in log
    report = json.loads((tmp_path / "final_rank_0.json").read_text())
    assert report == {"start_step": 4, "code": 0, "step": 5}
    # Retention: exactly the last two, `latest` among them, no staging leftovers. (DeepSpeed also drops its
    # zero_to_fp32.py helper scripts next to the steps.)
    assert sorted(p.name for p in ckpt.dir.iterdir() if p.name.startswith(("step_", "latest"))) == [
        "latest",
        "step_4",
        "step_5",
    ]
    assert ckpt.pointer().name == "step_5"
    # Each start logged the steps after the checkpoint it resumed from again: the log keeps one record per step.
    log = (tmp_path / "runs/crashy/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4, 5]


def run_two_ranks(tmp_path: Path, cache_dir: Path, name: str, env_extra: dict, *extra: str):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        __file__,
        str(tmp_path / name),
        *overrides_for(cache_dir, tmp_path / "runs", *extra),
    ]
    return subprocess.run(cmd, env={**ENV, **env_extra}, capture_output=True, text=True, timeout=300)


def test_preemption_of_one_rank_saves_the_same_step_on_all_then_resumes(tmp_path, cache_dir):
    from mmrope.train.checkpoint import CheckpointManager

    common = (
        "trainer.run_name=preempt",
        "trainer.max_steps=4",
        "trainer.save_every=100",
        "trainer.global_batch_size=2",
        "trainer.requeue_exit_code=99",
    )
    proc = run_two_ranks(
        tmp_path,
        cache_dir,
        "first",
        {"MMROPE_TEST_SIGNAL_RANK": "1", "MMROPE_TEST_SIGNAL_AFTER": "2"},
        *common,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]  # torchrun reports the requeue code as a failure
    reports = [json.loads((tmp_path / f"first_rank_{r}.json").read_text()) for r in range(2)]
    # Only rank 1 was signalled; both ranks agreed, saved step 2, and exited with the requeue code.
    assert reports == [{"start_step": 0, "code": 99, "step": 2}] * 2, log[-3000:]
    assert "exiting with trainer.requeue_exit_code=99" in log
    ckpt = CheckpointManager(tmp_path / "runs/preempt/checkpoints", rank=0, world_size=2)
    latest = ckpt.latest()
    assert latest.name == "step_2" and [p.name for p in ckpt.committed()] == ["step_2"]
    assert (latest / "rank_0.pt").is_file() and (latest / "rank_1.pt").is_file()

    proc = run_two_ranks(tmp_path, cache_dir, "second", {}, *common, "trainer.resume=must")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    reports = [json.loads((tmp_path / f"second_rank_{r}.json").read_text()) for r in range(2)]
    assert reports == [{"start_step": 2, "code": 0, "step": 4}] * 2


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
