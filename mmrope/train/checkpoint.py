"""Checkpoints you can trust: the commit protocol.

    stage to `step_N.tmp/` (DeepSpeed shards + one `rank_R.pt` of per-rank state per rank)
      -> every rank reports success (all-reduce; any failure aborts the commit on all ranks)
      -> rank 0 writes `manifest.json` (step, config hash, world size, files) into the staged folder
      -> atomic rename `step_N.tmp/` -> `step_N/`
      -> atomic replace of the `latest` pointer file.

A folder without a manifest is never loaded, so a crash at any point leaves the previous committed step as
the one to resume from; a crash between the rename and the pointer update leaves a complete, manifested
`step_N/` that `latest()` prefers over the stale pointer (resume takes the newest committed step). Retention
(`keep_last`) never deletes what `latest` points to.

A different world size resumes through DeepSpeed's universal checkpoint: rank 0 converts the committed step once
(`deepspeed.checkpoint.ds_to_universal`, into `step_N/universal/`, staged then renamed) and every rank loads model
and optimizer from it; the data position is merged from every old rank's `rank_R.pt` (data/loader.py: virtual
slots make it world-size independent).

Fault injection for tests: `MMROPE_CRASH_AT=staged|manifest|renamed` (+ optional `MMROPE_CRASH_STEP=N`)
SIGKILLs rank 0 after staging / after writing the manifest / after the rename, before the next stage. Assumes the checkpoint directory is
on a filesystem shared by all ranks (the usual cluster setup), since rank 0 commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmrope.train.config import resume_keys
from mmrope.train.engine import all_reduce_values

MANIFEST = "manifest.json"
CRASH_POINTS = ("staged", "manifest", "renamed")
LATEST = "latest"
# Keys that must match to resume: the schema fields marked `must_match` (mmrope/train/config.py, model/config.py).
RESUME_KEYS = resume_keys()
UNIVERSAL = "universal"  # step_N/universal: the DeepSpeed universal checkpoint of step_N


def config_fingerprint(flat: dict) -> dict:
    """The resume-relevant subset of a flattened config (`{"model.kind": ..., ...}`).

    Settings at their "off" value are left out (offload off; `adapter.*` with adapter.name=none), so manifests
    written before those keys existed still match the runs they describe; turning one on is a difference."""
    adapter = flat.get("adapter.name", "none") != "none"
    return {
        k: v
        for k, v in flat.items()
        if any(k == p or k.startswith(p + ".") for p in RESUME_KEYS)
        and not (k.startswith("deepspeed.offload_") and v is False)
        and (adapter or not k.startswith("adapter."))
    }


def config_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_ok(ok: bool) -> bool:
    (failed,) = all_reduce_values([0 if ok else 1], op="max")
    return failed == 0


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _maybe_crash(point: str, step: int) -> None:
    """Test hook: die like `kill -9` (no cleanup, no atexit, no flush) at a named point of the commit."""
    if os.environ.get("MMROPE_CRASH_AT") != point:
        return
    if os.environ.get("MMROPE_CRASH_STEP", str(step)) != str(step):
        return
    print(f"MMROPE_CRASH_AT={point}: killing pid {os.getpid()} while saving step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the directory entry (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        *,
        rank: int,
        world_size: int,
        keep_last: int = 2,
        trainable_only: bool = False,
    ):
        self.dir = Path(ckpt_dir)
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        # Save only parameters that train (DeepSpeed's exclude_frozen_parameters), e.g. LoRA adapters: the frozen
        # rest never moves from the model the config builds, so resume and export rebuild it from there.
        self.trainable_only = trainable_only

    # -- discovery -------------------------------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoints (with a manifest), oldest first."""
        if not self.dir.is_dir():
            return []
        steps = [
            p
            for p in self.dir.glob("step_*")
            if p.is_dir() and not p.name.endswith(".tmp") and (p / MANIFEST).is_file()
        ]
        return sorted(steps, key=lambda p: int(p.name.split("_")[1]))

    def pointer(self) -> Path | None:
        """What the `latest` file names, if that is a committed checkpoint."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if (path / MANIFEST).is_file():
                return path
        return None

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the newest committed step. Normally that is what `latest` names;
        after a crash between the rename and the pointer update it is the renamed (complete) step."""
        committed = self.committed()
        if not committed:
            return None
        pointer = self.pointer()
        if pointer is not None and int(pointer.name.split("_")[1]) >= int(committed[-1].name.split("_")[1]):
            return pointer
        return committed[-1]

    # -- save --------------------------------------------------------------------------------------------------
    def save(
        self, engine, step: int, *, fingerprint: dict, rank_state: dict, extra: dict | None = None
    ) -> Path:
        name = f"step_{step}"
        staged = self.dir / f"{name}.tmp"
        final = self.dir / name
        if self.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)  # leftovers of an earlier crash
            self.dir.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        ok = True
        try:
            only = {"exclude_frozen_parameters": True} if self.trainable_only else {}
            engine.save_checkpoint(str(self.dir), tag=staged.name, save_latest=False, **only)
            torch.save({"step": step, "rng": rng_state(), **rank_state}, staged / f"rank_{self.rank}.pt")
        except Exception as e:  # report, so that no rank commits a partial checkpoint
            print(f"[rank {self.rank}] checkpoint staging failed: {e!r}", flush=True)
            ok = False
        if not _all_ok(ok):
            raise RuntimeError(
                f"checkpoint {name}: staging failed on at least one rank; nothing was committed"
            )
        if self.rank == 0:
            _maybe_crash("staged", step)
            manifest = {
                "step": step,
                "world_size": self.world_size,
                "config_hash": config_hash(fingerprint),
                "config": fingerprint,
                "time": time.time(),
                **(extra or {}),
                "files": sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()),
            }
            _atomic_write(staged / MANIFEST, json.dumps(manifest, indent=1, default=str))
            _maybe_crash("manifest", step)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace the old copy
                shutil.rmtree(final)
            os.replace(staged, final)
            _fsync_dir(self.dir)
            _maybe_crash("renamed", step)
            _atomic_write(self.dir / LATEST, name)
            _fsync_dir(self.dir)
            self._retain()
        if dist.is_initialized():
            dist.barrier()
        return final

    def _retain(self) -> None:
        """Keep the newest `keep_last` committed steps, and never what `latest` names or resolves to."""
        committed = self.committed()
        keep = set(committed[-self.keep_last :]) | {self.pointer(), self.latest()}
        for path in committed:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- load --------------------------------------------------------------------------------------------------
    def check_compatible(self, path: Path, fingerprint: dict) -> dict:
        manifest = json.loads((path / MANIFEST).read_text())
        saved = manifest.get("config", {})
        # `*.name` first: a different adapter or encoding is the difference to name, not its settings
        for key in sorted(set(saved) | set(fingerprint), key=lambda k: (not k.endswith(".name"), k)):
            if saved.get(key) != fingerprint.get(key):
                raise ValueError(
                    f"config key `{key}`: cannot resume from {path}: it was trained with {saved.get(key)!r}, the "
                    f"current config has {fingerprint.get(key)!r}. Start a new run under a new trainer.run_name."
                )
        return manifest

    def universal(self, path: Path) -> Path:
        """The DeepSpeed universal checkpoint of committed step `path`, converted once by rank 0 (staged, then
        renamed, so a crash never leaves a half-converted folder that would be trusted)."""
        out = path / UNIVERSAL
        if self.rank == 0 and not out.is_dir():
            staged = path / f"{UNIVERSAL}.tmp"
            shutil.rmtree(staged, ignore_errors=True)
            cmd = [
                sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                "--output_folder", str(staged), "--num_extract_workers", "1", "--num_merge_workers", "1",
                "--inject_missing_state",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"converting {path} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                    f"{(proc.stdout + proc.stderr)[-3000:]}"
                )
            os.replace(staged, out)
            _fsync_dir(path)
        if dist.is_initialized():
            dist.barrier()
        return out

    def load(self, engine, path: Path, manifest: dict) -> dict:
        """Load engine state (model, optimizer, scheduler) and the run state; returns this rank's view of it.

        Same world size: this rank's own `rank_R.pt` (RNG included). Another world size: model and optimizer from
        the universal checkpoint; counters and data position merged from every old rank's file (counts summed
        onto rank 0 so that global sums stay right); RNG streams stay as seeded (they cannot be re-split)."""
        resized = manifest["world_size"] != self.world_size
        # the frozen base is not in the files of a trainable_only save: it stays as the config built it
        lenient = {"load_module_strict": False} if self.trainable_only else {}
        if resized:
            load_path, _ = engine.load_checkpoint(
                str(path),
                tag=UNIVERSAL,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                **lenient,
            )
        else:
            load_path, _ = engine.load_checkpoint(
                str(path.parent),
                tag=path.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                **lenient,
            )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {path}")
        if not resized:
            state = torch.load(path / f"rank_{self.rank}.pt", weights_only=False)
            set_rng_state(state["rng"])
            return state
        from data.loader import merge_states

        states = [
            torch.load(path / f"rank_{r}.pt", weights_only=False) for r in range(manifest["world_size"])
        ]
        data = merge_states([s.get("data") for s in states])
        skipped_shards, skipped_records = {}, {}
        for s in states:
            skipped_records.update(s.get("skipped_records", {}))
            for url, reasons in s.get("skipped_shards", {}).items():
                mine = skipped_shards.setdefault(url, {})
                for k, v in reasons.items():
                    mine[k] = mine.get(k, 0) + v
        first = self.rank == 0
        return {
            "step": states[0]["step"],
            "tokens_seen": states[0].get("tokens_seen", 0),
            "nonfinite_skips": states[0].get("nonfinite_skips", 0),
            "samples": _summed([s.get("samples", {}) for s in states]) if first else {},
            "records": sum(s.get("records", 0) for s in states) if first else 0,
            "skipped": _summed([s.get("skipped", {}) for s in states]) if first else {},
            "skipped_shards": skipped_shards if first else {},
            "skipped_records": skipped_records,  # a set (by record): the same on every rank
            "data": data,
        }


def _summed(counts: list[dict]) -> dict:
    """Per-key sums of per-rank counters (a resized resume hands them to one rank)."""
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out
