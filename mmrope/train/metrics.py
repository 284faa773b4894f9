"""Metrics sinks on rank 0: wandb (offline by default), a local JSONL log, and a progress bar.

The JSONL log (`<run_dir>/metrics.jsonl`, one object per logged step) is the source of truth for local
reports (sweep tables, plots), so nothing depends on reaching a wandb server. Background benchmark scores are
appended later as records of their checkpoint's step (`log_late`): readers merge the records of a step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from tqdm import tqdm

from mmrope.train.config import TrainConfig

WANDB_ID_SLUG = 48  # readable part of a wandb run id; a hash of the run folder follows


def wandb_run_id(run_dir: str | os.PathLike) -> str:
    """The wandb run id of a run folder: readable, valid for wandb whatever the run name holds, stable.

    A sweep names its runs from their overrides (`rope=mrope,trainer.max_steps=12`), and wandb ids may not
    contain `,` `:` `;` `#` `?` `/` `'`. The id keeps the name's letters, digits, `-`, `_` and `.` and adds a
    hash of the run folder (`output_dir/run_name`): a requeued job gets the same id (so wandb resumes the run),
    two folders never share one (two sweeps with the same overrides, two names differing in a dropped `,`).

    >>> wandb_run_id("runs/sweeps/s/rope=mrope,trainer.max_steps=12")  # doctest: +ELLIPSIS
    'rope-mrope-trainer.max_steps-12-...'
    """
    run_dir = Path(run_dir)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_dir.name).strip("-.")[:WANDB_ID_SLUG] or "run"
    digest = hashlib.sha1(run_dir.as_posix().encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def drop_records_after(path: Path, step: int) -> int:
    """Remove the records of steps after `step` from a JSONL log, atomically (a crash leaves the old file or the
    new one, never half of one); returns how many were dropped.

    A run resumed from the checkpoint of `step` logs the steps after it again: without this, metrics.jsonl would
    hold those steps twice (the run killed after its last checkpoint, then the resumed one). A torn last line
    (kill -9 mid-write) is dropped too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(record.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class Metrics:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, enabled: bool, start_step: int, flat_config: dict):
        self.enabled = enabled
        self.run = None
        self.bar = None
        self._late_axis = False  # wandb: bench/* plotted against bench/checkpoint_step (set on first use)
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # One record per step: a resumed run logs the steps after its checkpoint again (wandb, resumed under the
        # same id, keeps the first value of a step: it ignores steps that do not increase).
        if dropped := drop_records_after(run_dir / "metrics.jsonl", start_step):
            print(
                f"metrics.jsonl: dropped {dropped} record(s) after step {start_step} (logged before the restart; "
                "the resumed run logs those steps again)"
            )
        self.log_file = open(run_dir / "metrics.jsonl", "a")
        w = cfg.trainer.wandb
        if w.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=w.project,
                name=cfg.trainer.run_name,  # shown as is; the id obeys wandb's rules
                id=wandb_run_id(run_dir),
                group=w.group,
                tags=list(w.tags),
                mode=w.mode,
                dir=str(run_dir),
                config=flat_config,
                resume="allow",
            )
        # The bar starts at the first step, so start-up messages print as plain lines above it.
        self._bar_args = dict(
            total=cfg.trainer.max_steps,
            initial=start_step,
            desc=cfg.trainer.run_name,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.log_file.write(json.dumps({"step": step, **values}) + "\n")
        self.log_file.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def log_late(self, checkpoint_step: int, values: dict, *, current_step: int) -> None:
        """Values that belong to an earlier step and arrive now (background benchmarks): metrics.jsonl gets a
        record at `checkpoint_step` (appended: the file is in arrival order); wandb, whose steps only grow, gets
        them at `current_step`, plotted against `bench/checkpoint_step` (define_metric)."""
        if not self.enabled:
            return
        self.log_file.write(json.dumps({"step": checkpoint_step, **values}) + "\n")
        self.log_file.flush()
        if self.run is not None:
            if not self._late_axis:
                self.run.define_metric("bench/checkpoint_step")
                self.run.define_metric("bench/*", step_metric="bench/checkpoint_step")
                self._late_axis = True
            self.run.log({**values, "bench/checkpoint_step": checkpoint_step}, step=current_step)

    def progress(self, step: int, loss: float, lr: float, epoch: float | None = None) -> None:
        if self.enabled and self.bar is None:
            self.bar = tqdm(**self._bar_args)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            extra = {} if epoch is None else {"epoch": epoch}
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **extra, refresh=False)

    def print(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.log_file.close()
        if self.run is not None:
            self.run.finish()
