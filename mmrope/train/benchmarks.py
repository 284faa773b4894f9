"""Benchmarks during training: lmms-eval on saved checkpoints, in a separate process, never in the way.

    python train.py 'trainer.eval.benchmarks.tasks=[mmstar_qwen]' trainer.eval.benchmarks.every_saves=2 \\
        trainer.eval.benchmarks.limit=200 'trainer.eval.benchmarks.model_args="device=cpu"'

After every `every_saves`-th committed checkpoint (and the final one), rank 0 starts
`python -m mmrope.eval.bench --checkpoint <step_N> --tasks ... --out <run_dir>/bench/step_N` as a child process
(niced): it exports the checkpoint (`python -m mmrope.train.export`) and runs lmms-eval through the `mmrope`
plugin (`.venv-eval`, `make eval-setup`). Training goes on meanwhile; one benchmark runs at a time (a save that
comes while one runs is skipped and counted as `bench/skipped_busy`).

**Logging.** Scores arrive after training has moved on. The trainer polls the child once per step; when it is
done, its scores are logged as one record **at the checkpoint's step**: `{"step": N, "bench/<task>/<metric>":
value, "bench/checkpoint_step": N}` in metrics.jsonl (appended when they arrive, so that file is in arrival order;
`mmrope.train.report` merges the records of a step) and to wandb at the current step with
`bench/checkpoint_step`, the x-axis wandb plots `bench/*` against (`define_metric`). When training ends, the
trainer waits up to `wait_at_end_s` for a running benchmark.

**Failures never stop training**: a child that fails (export, lmms-eval, a task missing from its results) or
cannot start is counted in `bench/failures` (logged at the checkpoint's step) and its log is named on the
console (`<run_dir>/bench/step_N.log`). A checkpoint deleted by `trainer.keep_last` before the child exported it
is such a failure: keep `keep_last` >= 2 when saves come faster than a benchmark runs. A preempted run leaves a
running benchmark alone. Under SLURM the child shares the job's allocation: pass `model_args="device=cpu"`, or run
`python -m mmrope.eval.bench` on the checkpoints as a job of its own.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mmrope.train.config import BenchmarksConfig

# Set in a distributed training process; lmms-eval (and torch) in the child would take them as its own.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip


@dataclass
class _Job:
    step: int
    proc: subprocess.Popen
    out: Path
    log: Path


class Benchmarks:
    """Starts benchmark children after saves and collects their scores (rank 0 only; a no-op elsewhere)."""

    def __init__(self, cfg: BenchmarksConfig, run_dir: Path, *, enabled: bool, log=print) -> None:
        self.cfg, self.run_dir, self.enabled, self.log = cfg, Path(run_dir), enabled and bool(cfg.tasks), log
        self.num_saves = 0
        self.failures = 0
        self.skipped_busy = 0
        self.job: _Job | None = None

    def command(self, step_dir: Path, out: Path) -> list[str]:
        c = self.cfg
        cmd = [
            sys.executable,
            "-m",
            "mmrope.eval.bench",
            "--checkpoint",
            str(step_dir),
            "--tasks",
            ",".join(c.tasks),
        ]
        cmd += ["--out", str(out), "--batch-size", str(c.batch_size)]
        for path in c.include_path:
            cmd += ["--include-path", str(path)]
        if c.limit:
            cmd += ["--limit", str(c.limit)]
        if c.model_args:
            cmd += ["--model-args", c.model_args]
        if c.lmms_eval:
            cmd += ["--lmms-eval", c.lmms_eval]
        return cmd

    def on_save(self, step: int, step_dir: Path, *, final: bool) -> dict:
        """After a committed save: start a benchmark of it when due. Returns what to log now (a start failure)."""
        if not self.enabled:
            return {}
        self.num_saves += 1
        if not final and self.num_saves % self.cfg.every_saves:
            return {}
        if self.job is not None:
            self.skipped_busy += 1
            self.log(f"bench: step {step} not judged: the benchmark of step {self.job.step} still runs")
            return {"bench/skipped_busy": self.skipped_busy}
        out = self.run_dir / "bench" / f"step_{step}"
        log = self.run_dir / "bench" / f"step_{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [env.get("PYTHONPATH")])])
        try:
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    self.command(step_dir, out),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=lambda: os.nice(10),  # behind training on a shared CPU
                )
        except OSError as e:
            return self._failed(step, f"could not start ({e})", log)
        self.job = _Job(step, proc, out, log)
        self.log(f"bench: judging step {step} in the background (log {log})")
        return {}

    def _failed(self, step: int, why: str, log: Path) -> dict:
        self.failures += 1
        self.log(f"bench: the benchmark of step {step} failed: {why}; see {log} ({self.failures} failure(s))")
        return {"bench/failures": self.failures, "bench/checkpoint_step": step}

    def poll(self) -> tuple[int, dict] | None:
        """(checkpoint step, values) of a benchmark that finished since the last call, else None."""
        if self.job is None or self.job.proc.poll() is None:
            return None
        job, self.job = self.job, None
        if job.proc.returncode != 0:
            tail = job.log.read_text(errors="replace").strip().splitlines()[-1:] if job.log.is_file() else []
            return job.step, self._failed(
                job.step, f"exit {job.proc.returncode}: {' '.join(tail)[:300]}", job.log
            )
        scores = job.out / "scores.csv"
        try:
            with open(scores, newline="") as f:
                rows = list(csv.DictReader(f))
            values = {f"bench/{r['task']}/{r['metric']}": float(r["value"]) for r in rows}
        except (OSError, KeyError, ValueError) as e:
            return job.step, self._failed(job.step, f"unreadable {scores} ({e})", job.log)
        self.log(f"bench: step {job.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        return job.step, {**values, "bench/checkpoint_step": job.step, "bench/failures": self.failures}

    def wait(self) -> tuple[int, dict] | None:
        """At the end of training: wait up to `wait_at_end_s` for the running benchmark, then poll it."""
        if self.job is None:
            return None
        deadline = time.monotonic() + self.cfg.wait_at_end_s
        self.log(
            f"bench: waiting up to {self.cfg.wait_at_end_s:g} s for the benchmark of step {self.job.step}"
        )
        while self.job.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.job.proc.poll() is None:
            self.log(
                f"bench: left the benchmark of step {self.job.step} running (its scores: {self.job.out})"
            )
            return None
        return self.poll()
