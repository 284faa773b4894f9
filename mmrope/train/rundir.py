"""A run's record is written only once its invocation was accepted.

Hydra normally writes `<job dir>/.hydra/{config,hydra,overrides}.yaml` and opens `<job dir>/<job name>.log`
before the task function runs, so an invocation that validation then refuses (a typo'd key, a missing shard,
`trainer.resume=never` on an existing run, a checkpoint trained with another model family) would overwrite the
run's recorded config and log. configs/train.yaml turns both off (`hydra.output_subdir: null`, and
`hydra/job_logging: console`, Hydra's default without its file handler); the session calls `claim()` once every
check that needs no model has passed, and it writes the same files, in the same places, then. A refused
invocation writes nothing into the run folder (and removes the empty job folder Hydra made for a new run, see
`release()`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format
_job_log: logging.FileHandler | None = None  # this process's job log handler (one job at a time)


def hydra_job_dir() -> Path | None:
    """The Hydra job folder of this process (`hydra.runtime.output_dir`), or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def _write(path: Path, text: str) -> None:
    """Atomically: a reader (the sweep report) never sees half a file, a crash never leaves one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def claim(task_cfg: DictConfig, *, rank: int) -> Path | None:
    """Write what Hydra would have written for this job: `.hydra/config.yaml` (the composed config, as given to
    `train.py`), `.hydra/hydra.yaml`, `.hydra/overrides.yaml` (rank 0), and log to `<job name>.log` (every rank,
    appending, as Hydra's file handler did). Returns the job folder, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    job_dir = hydra_job_dir()
    if job_dir is None:
        return None
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    if rank == 0:
        record = job_dir / ".hydra"
        record.mkdir(parents=True, exist_ok=True)
        _write(record / "config.yaml", OmegaConf.to_yaml(task_cfg))
        _write(record / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
        _write(record / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))
    global _job_log
    root = logging.getLogger()
    if _job_log is not None:  # the previous job of a multirun in this process
        root.removeHandler(_job_log)
        _job_log.close()
    _job_log = logging.FileHandler(job_dir / f"{hydra_cfg.hydra.job.name}.log")  # appends, as Hydra's did
    _job_log.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(_job_log)
    return job_dir


def release() -> None:
    """After a refusal: remove the job folder Hydra created for this invocation if nothing is in it (a new run
    name that was refused leaves no folder behind; an existing run's folder is never empty, so it stays)."""
    job_dir = hydra_job_dir()
    if job_dir is None or os.environ.get("RANK", "0") != "0":
        return
    for d in (job_dir, job_dir.parent):  # runs/<name>/hydra, then runs/<name> (a plain run's job folder)
        try:
            d.rmdir()  # only succeeds on an empty folder
        except OSError:
            return
