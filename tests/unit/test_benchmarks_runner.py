"""`trainer.eval.benchmarks`' runner (mmrope.train.benchmarks): a benchmark that fails is counted and logged at
its checkpoint's step, never raised; a save while one runs is skipped and counted; saves between `every_saves`
are not judged. The child is the real `python -m mmrope.eval.bench` (it fails here: the checkpoint is a stub)."""

from __future__ import annotations

import json

from mmrope.train.benchmarks import Benchmarks
from mmrope.train.config import BenchmarksConfig


def test_failures_are_counted_not_raised_and_saves_are_judged_when_due(tmp_path):
    step_dir = tmp_path / "run" / "checkpoints" / "step_4"
    step_dir.mkdir(parents=True)
    (step_dir / "manifest.json").write_text(
        json.dumps({"step": 4})
    )  # committed, but no weights: export fails
    lines: list[str] = []
    cfg = BenchmarksConfig(tasks=["mmrope_shapes_mc"], every_saves=2, lmms_eval="/bin/true")
    bench = Benchmarks(cfg, tmp_path / "run", enabled=True, log=lines.append)
    assert bench.on_save(2, step_dir, final=False) == {} and bench.job is None  # 1st save: not due
    assert bench.on_save(4, step_dir, final=False) == {} and bench.job is not None  # 2nd save: judged
    assert bench.on_save(6, step_dir, final=True) == {"bench/skipped_busy": 1}  # busy: skipped, counted
    step, values = bench.wait()
    assert step == 4 and values == {"bench/failures": 1, "bench/checkpoint_step": 4}
    log = tmp_path / "run" / "bench" / "step_4.log"
    assert "export of" in log.read_text()  # the bench says why
    assert any("failed" in line and str(log) in line for line in lines)
    assert bench.poll() is None  # reported once
    # disabled on the other ranks: nothing starts
    other = Benchmarks(cfg, tmp_path / "run", enabled=False)
    assert other.on_save(4, step_dir, final=True) == {} and other.job is None
