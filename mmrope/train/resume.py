"""Whether and from where a run resumes (trainer.resume=never|must|auto), decided from the run folder and the
checkpoint manifests alone, before a process group starts or anything is built or written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.loader import PackedRowStream
from mmrope.train.checkpoint import CheckpointManager, config_fingerprint
from mmrope.train.config import OptimConfig, TrainConfig


def flatten(cfg: TrainConfig | dict) -> dict:
    """`{"trainer.optim.lr": 0.002, ...}` from a config (or its nested dict, as saved in a manifest)."""

    def walk(node, prefix=""):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k != "hparams":
                yield from walk(v, key + ".")
            else:
                yield key, v

    nested = cfg if isinstance(cfg, dict) else OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return dict(walk(nested))


# How a run is resumed, not what it trains: never reported as a change.
NOT_HYPERPARAMETERS = ("trainer.resume",)


def changed_settings(saved: dict, current: dict) -> list[str]:
    """`changed: key old -> new` for every setting of the current config that differs from the checkpoint's."""
    return [
        f"changed: {key} {saved.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"
        for key in sorted(set(saved) | set(current))
        if key not in NOT_HYPERPARAMETERS and saved.get(key) != current.get(key)
    ]


def refuse_to_reuse(run_dir: Path, ckpt: CheckpointManager) -> None:
    """trainer.resume=never starts a NEW run: refuse a folder that already holds one (its checkpoints and its
    metrics would be overwritten or mixed with the new run's)."""
    held = []
    if latest := ckpt.latest():
        held.append(f"committed checkpoints up to {latest.name}")
    log = run_dir / "metrics.jsonl"
    if log.is_file() and log.stat().st_size > 0:
        held.append("a metrics.jsonl")
    if held:
        raise ValueError(
            f"config key `trainer.run_name`: {run_dir} already holds a run ({' and '.join(held)}); "
            "trainer.resume=never starts a new run and never overwrites one: choose a new trainer.run_name "
            "(or continue this run with trainer.resume=auto)"
        )


def check_resume(cfg: TrainConfig, run_dir: Path, ckpt: CheckpointManager, fingerprint: dict):
    """(checkpoint to resume from, its manifest) or (None, None); refuses, naming the key, a run folder that
    trainer.resume forbids or a checkpoint this config cannot continue. Reads manifests only: runs before
    anything is built or written."""
    if cfg.trainer.resume == "never":
        refuse_to_reuse(run_dir, ckpt)
    latest = ckpt.latest()
    if cfg.trainer.resume == "must" and latest is None:
        raise ValueError(f"config key `trainer.resume`: 'must' but no committed checkpoint in {ckpt.dir}")
    if latest is None:
        return None, None
    # resume auto|must (never refused this folder above)
    manifest = ckpt.check_compatible(latest, fingerprint)
    saved_sp = flatten(manifest.get("train_config", {})).get("trainer.sequence_parallel_size", 1)
    if saved_sp != cfg.trainer.sequence_parallel_size:  # the ranks of an SP group saved one data position
        raise ValueError(
            f"config key `trainer.sequence_parallel_size`: checkpoint {latest} was trained with {saved_sp}, "
            f"this run sets {cfg.trainer.sequence_parallel_size}; resume with the checkpoint's value"
        )
    return latest, manifest


def saved_num_slots(checkpoint: Path | None) -> int | None:
    """The slot count a committed checkpoint's data position was written with (data.num_slots=auto keeps it)."""
    if checkpoint is None or not (checkpoint / "rank_0.pt").is_file():
        return None
    data = torch.load(checkpoint / "rank_0.pt", weights_only=False).get("data")
    return data.get("num_slots") if data else None


def apply_optim_config(engine, optim: OptimConfig) -> None:
    """Make the optimizer follow the current config after a checkpoint load.

    Loading restores the saved param-group settings (lr, betas, eps, weight decay) and the schedule's base LR;
    the moments, step counts and the schedule's position are what resuming is for and stay. Warmup, max_steps
    and min_lr already come from the current config (the schedule's function is rebuilt from it).
    """
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    for i, group in enumerate(groups):  # param_groups(): [decay, no decay] (older checkpoints: unmarked)
        no_decay = group.get("no_decay", i == 1)
        group.update(
            betas=tuple(optim.betas), eps=optim.eps, weight_decay=0.0 if no_decay else optim.weight_decay
        )
    scheduler.base_lrs = [optim.lr] * len(groups)
    lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


@dataclass
class ResumePlan:
    """What `trainer.resume` decided for this run folder: the checkpoint to continue (or None: a fresh run), its
    manifest, the settings that changed since, and the slot count data.num_slots=auto keeps."""

    run_dir: Path
    flat: dict  # the current config, flattened (metrics, the `changed:` lines)
    fingerprint: dict
    checkpoint: Path | None = None
    manifest: dict | None = None
    saved_slots: int | None = None  # the checkpoint's slot count, when data.num_slots=auto keeps it
    changes: list[str] = field(default_factory=list)  # `changed: key old -> new`: they apply from now on

    @classmethod
    def from_run(cls, cfg: TrainConfig, run_dir: Path) -> ResumePlan:
        """Refuses (naming the key) what trainer.resume forbids, a checkpoint this config cannot continue and
        another trainer.sequence_parallel_size. Reads the checkpoint folder only (any rank's view is the same)."""
        flat = flatten(cfg)
        fingerprint = config_fingerprint(flat)
        ckpt = CheckpointManager(run_dir / "checkpoints", rank=0, world_size=1)
        latest, manifest = check_resume(cfg, run_dir, ckpt, fingerprint)
        plan = cls(run_dir, flat, fingerprint, latest, manifest)
        if manifest is not None:
            plan.changes = changed_settings(flatten(manifest.get("train_config", {})), flat)
            if cfg.data.num_slots == "auto":
                plan.saved_slots = saved_num_slots(latest)
        return plan

    @property
    def first_step(self) -> int:
        return int(self.checkpoint.name.split("_")[-1]) if self.checkpoint is not None else 0

    def num_slots(self, cfg: TrainConfig) -> int | str:
        """data.num_slots, where `auto` keeps the checkpoint's count."""
        return self.saved_slots or cfg.data.num_slots

    def resized(self, world_size: int) -> bool:
        """Resumed on another world size: DeepSpeed's universal checkpoint carries model and optimizer (converted
        once by rank 0), the virtual slots carry the data position."""
        return self.manifest is not None and self.manifest["world_size"] != world_size

    def check_world(self, cfg: TrainConfig, world_size: int, dp_size: int) -> None:
        """On another world size, slots that do not divide over the ranks are refused here (data.num_slots)."""
        if self.resized(world_size):
            slots = self.saved_slots if cfg.data.num_slots == "auto" else cfg.data.num_slots
            PackedRowStream.check_slots(slots, dp_size, cfg.data.num_workers)

    @property
    def optim_changed(self) -> bool:
        return any(c.startswith("changed: trainer.optim.") for c in self.changes)
