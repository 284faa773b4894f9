"""Assemble a training run from a validated config: processor, data, model, engine, checkpoints, loop."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data.loader import PackedRowStream, ResumableLoader, plan_report, source_report, video_report
from data.processing import SampleProcessor
from data.processor import VLProcessor, processor_for
from data.synthetic import write_synthetic_shards
from mmrope.distributed.parallelize import parallelize
from mmrope.encodings import build as build_encoding
from mmrope.model.build import build_model
from mmrope.model.install import install
from mmrope.train import rundir
from mmrope.train.checkpoint import CheckpointManager, config_fingerprint
from mmrope.train.config import OptimConfig, TrainConfig, model_tokens_per_second, rope_hparams_error
from mmrope.train.engine import Dist, build_engine, init_distributed, init_sequence_parallel
from mmrope.train.loop import Trainer, TrainResult
from mmrope.train.metrics import Metrics
from mmrope.train.throughput import Throughput, detect_peak_tflops, device_name


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


def _rank0_first(d: Dist, fn):
    """Run `fn` on rank 0 (which writes caches), then on the other ranks (which read them)."""
    if d.rank == 0:
        out = fn()
    if dist.is_initialized():
        dist.barrier()
    if d.rank != 0:
        out = fn()
    return out


def make_processor(cfg: TrainConfig, d: Dist) -> VLProcessor:
    data = cfg.data
    return _rank0_first(
        d,
        lambda: processor_for(
            cfg.model, cache_dir=data.cache_dir, min_pixels=data.min_pixels, max_pixels=data.max_pixels
        ),
    )


def shard_urls(cfg: TrainConfig, d: Dist) -> list[str]:
    if cfg.data.shards:  # data=shards without shards or mixture fails validation (naming data.shards)
        return list(cfg.data.shards)
    s = cfg.data.synthetic
    return _rank0_first(
        d,
        lambda: write_synthetic_shards(
            Path(cfg.data.cache_dir) / "synthetic",
            num_samples=s.num_samples,
            samples_per_shard=s.samples_per_shard,
            min_image_size=s.min_image_size,
            max_image_size=s.max_image_size,
            seed=s.seed,
        ),
    )


def make_sample_processor(
    cfg: TrainConfig, processor: VLProcessor, encoding, pixels: str = "uint8"
) -> SampleProcessor:
    """Training rows carry uint8 pixels (expanded on the device, data/pixels.py); eval and probes use float32.
    Video positions use the model's own `vision_config.tokens_per_second`, as transformers' get_rope_index does."""
    return SampleProcessor(
        processor,
        encoding,
        max_tokens=cfg.data.max_tokens,
        layout=cfg.rope_layout(),
        system_prompt=cfg.data.system_prompt,
        dipe=cfg.rope.dipe,
        video=cfg.data.video,
        pixels=pixels,
        seed=cfg.data.seed,
        tokens_per_second=model_tokens_per_second(cfg.model),
    )


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_workers(
    requested: int, num_slots: int | None, dp_size: int, log=print, cores: int | None = None
) -> int:
    """data.num_workers, capped to the CPU cores this process may use: more workers than cores only compete (and
    torch warns about it twice per run). The largest count <= cores that the slots split evenly over; the data
    position does not depend on it (data/loader.py), so a run resumes the same either way."""
    cores = cores or available_cores()
    if requested <= cores:
        return requested
    workers = next(
        w for w in range(cores, 0, -1) if (num_slots or dp_size * w) % (dp_size * w) == 0
    )  # w = 1 always fits: validation checked that the slots split over the data-parallel ranks
    log(
        f"data.num_workers={requested} > {cores} CPU cores available to this process: using {workers} "
        "DataLoader workers (same rows, same resume position)"
    )
    return workers


def make_stream(cfg: TrainConfig, d: Dist, sample_processor: SampleProcessor) -> PackedRowStream:
    mixture = [(list(m["shards"]), float(m["weight"])) for m in cfg.data.mixture]
    return _rank0_first(  # rank 0 builds missing shard indexes, the others read them
        d,
        lambda: PackedRowStream(
            None if mixture else shard_urls(cfg, d),
            sample_processor,
            max_tokens=cfg.data.max_tokens,
            seed=cfg.data.seed,
            rank=d.dp_rank,  # the ranks of an SP group read the same rows
            world_size=d.dp_size,
            num_slots=cfg.data.num_slots,
            num_open_rows=cfg.data.num_open_rows,
            vit_balance=cfg.data.vit_balance,
            error_policy=cfg.data.error_policy,
            mixture=mixture or None,
            index_cache_dir=cfg.data.cache_dir,
            log=print if d.is_main else (lambda _: None),
        ),
    )


def saved_num_slots(checkpoint: Path | None) -> int | None:
    """The slot count a committed checkpoint's data position was written with (data.num_slots=auto keeps it)."""
    if checkpoint is None or not (checkpoint / "rank_0.pt").is_file():
        return None
    data = torch.load(checkpoint / "rank_0.pt", weights_only=False).get("data")
    return data.get("num_slots") if data else None


def data_settings(cfg: TrainConfig) -> list[str]:
    """The effective data settings, and a warning where the default group's small-data limits meet user data."""
    c = cfg.data
    group = "data=shards" if c.source == "shards" else "data=synthetic (the default group)"
    lines = [
        f"data settings ({group}): max_tokens {c.max_tokens}, min_pixels {c.min_pixels}, max_pixels "
        f"{c.max_pixels} (~{int(c.max_pixels**0.5)}x{int(c.max_pixels**0.5)} px), num_workers {c.num_workers}, "
        f"error_policy {c.error_policy} (max_skip_fraction {c.max_skip_fraction}), seed {c.seed}"
    ]
    if c.source == "synthetic" and c.shards:
        lines.append(
            f"note: data.shards without data=shards: your shards are read with the default group's small-data "
            f"limits (max_tokens {c.max_tokens}, max_pixels {c.max_pixels}); for real data add data=shards "
            f"(max_tokens 32768, max_pixels 1003520) or set data.max_tokens / data.max_pixels"
        )
    return lines


def announce(d: Dist, lines: list[str]) -> None:
    """Print on the main rank, and write to the run's log files (Hydra's train.log) where logging has them."""
    if not d.is_main:
        return
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for line in lines:
        print(line, flush=True)
        for h in files:
            h.emit(logging.LogRecord("mmrope.data", logging.INFO, __file__, 0, line, None, None))


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


@dataclass
class Session:
    """Everything a run holds; `run()` trains it, tests and tools drive its parts directly."""

    cfg: TrainConfig
    dist: Dist
    model: torch.nn.Module
    engine: object
    trainer: Trainer
    ckpt: CheckpointManager
    metrics: Metrics
    processor: VLProcessor
    start_step: int


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


def build_session(cfg: TrainConfig, record: DictConfig | None = None) -> Session:
    """`record`: the composed config as Hydra handed it to train.py; written as the run's `.hydra/config.yaml`
    (with Hydra's other records and the job log) once the checks below passed (mmrope/train/rundir.py)."""
    run_dir = Path(cfg.trainer.output_dir) / cfg.trainer.run_name
    flat = flatten(cfg)
    fingerprint = config_fingerprint(flat)
    # Reads the checkpoint folder only (any rank's view is the same): refused before the process group starts.
    latest, manifest = check_resume(
        cfg, run_dir, CheckpointManager(run_dir / "checkpoints", rank=0, world_size=1), fingerprint
    )
    d = init_distributed()
    init_sequence_parallel(d, cfg.trainer.sequence_parallel_size)  # sets d.sp
    seed_everything(cfg.trainer.seed, d.rank)
    ckpt = CheckpointManager(
        run_dir / "checkpoints",
        rank=d.rank,
        world_size=d.world_size,
        keep_last=cfg.trainer.keep_last,
        # with an adapter only what trains is saved (the frozen base is rebuilt from the config on resume/export)
        trainable_only=cfg.adapter.name != "none",
    )
    # Another world size: DeepSpeed's universal checkpoint carries model and optimizer (converted once by rank 0),
    # the virtual slots carry the data position. Slots that do not divide are refused here (data.num_slots).
    resized = manifest is not None and manifest["world_size"] != d.world_size
    if resized:  # data.num_slots=auto keeps the checkpoint's count
        slots = saved_num_slots(latest) if cfg.data.num_slots == "auto" else cfg.data.num_slots
        PackedRowStream.check_slots(slots, d.dp_size, cfg.data.num_workers)
    if record is not None:  # accepted: from here on the call is the run's (a refusal above wrote nothing)
        rundir.claim(record, rank=d.rank)

    # Start-up can take a minute on real checkpoints and data: say what is happening (rank 0).
    status = (lambda msg: print(msg, flush=True)) if d.is_main else (lambda _: None)
    status("building the processor...")
    processor = make_processor(cfg, d)
    encoding = build_encoding(cfg.rope.name, **cfg.rope.hparams)
    # The data first, in seconds, before the model: shard indexes, record counts, the slot count (refused naming
    # data.num_slots where it does not fit the data or the world), and what the run will train on.
    sample_processor = make_sample_processor(cfg, processor, encoding)
    status("opening the data (shard indexes)...")
    stream = make_stream(cfg, d, sample_processor)
    announce(d, data_settings(cfg) + source_report(stream))
    resumed_slots = saved_num_slots(latest) if cfg.data.num_slots == "auto" else None
    stream.fit_slots(resumed_slots or cfg.data.num_slots, cfg.data.num_workers)
    first_step = int(latest.name.split("_")[-1]) if latest is not None else 0
    rows = max(0, cfg.trainer.max_steps - first_step) * cfg.trainer.global_batch_size
    announce(
        d, plan_report(stream, rows=rows, slots_setting="checkpoint" if resumed_slots else cfg.data.num_slots)
    )
    status("building the model...")
    model = build_model(
        cfg.model,
        vocab_size=len(processor.tokenizer),
        special_ids=processor.special_ids,
        seed=cfg.trainer.seed,
    )
    try:
        # the one seam
        install(model, encoding, attn_backend=cfg.model.attn_backend, dipe=cfg.rope.dipe)
    except ValueError as e:  # an encoding that does not fit this checkpoint's heads: name the rope key
        if not any(h in str(e) for h in encoding.hparams):
            raise
        raise rope_hparams_error(e, cfg.rope.name, cfg.rope.hparams) from e
    # freeze -> adapters -> activation checkpointing -> compile -> sequence parallelism -> objective, in that order
    parallel = parallelize(model, cfg, d)
    objective, counts, compiled = parallel.objective, parallel.param_counts, parallel.compiled
    adapter = parallel.adapter

    if resized:
        ckpt.universal(latest)
    status("creating DeepSpeed engine" + (f" and loading {latest}..." if latest is not None else "..."))
    engine, _, _ = build_engine(objective, cfg, d.world_size, load_universal=resized)
    rank_state = ckpt.load(engine, latest, manifest) if manifest is not None else {}
    start_step = rank_state.get("step", 0)
    changes = (
        changed_settings(flatten(manifest.get("train_config", {})), flat) if manifest is not None else []
    )
    if any(c.startswith("changed: trainer.optim.") for c in changes):
        apply_optim_config(engine, cfg.trainer.optim)

    # The checkpoint holds the exact stream position (per virtual slot: epoch cursors, the mixture's RNG state,
    # the record references held in the packer), so the resumed run sees exactly the rows an
    # uninterrupted one would, on this world size and worker count or another.
    data_state = rank_state.get("data")
    if start_step and data_state is None:
        raise ValueError(
            f"config key `trainer.resume`: checkpoint {latest} holds no data loader state; cannot resume exactly"
        )
    num_workers = fit_workers(cfg.data.num_workers, stream.num_slots, d.dp_size, status)
    rows = ResumableLoader(stream, num_workers, state=data_state)

    metrics = Metrics(cfg, run_dir, enabled=d.is_main, start_step=start_step, flat_config=flat)
    metrics.print(
        f"run dir: {run_dir}  world size: {d.world_size}  rope: {cfg.rope.name}"
        f"{' + DIPE' if cfg.rope.dipe else ''}  resume: {'step ' + str(start_step) if start_step else 'fresh'}"
    )
    if resized:
        metrics.print(
            f"  resumed step {start_step} of world size {manifest['world_size']} on world size {d.world_size}: model "
            f"and optimizer from {latest / 'universal'}, data position from {stream.num_slots} virtual slots"
        )
    for group, c in counts.items():
        metrics.print(f"  params/{group:<9} trainable {c['trainable']:>12,}  frozen {c['frozen']:>12,}")
    for line in adapter.lines(cfg.adapter) if adapter is not None else []:
        metrics.print(line)
    if compiled:
        metrics.print(
            f"  model.compile: {len(compiled)} LLM modules (RMSNorms, dense MLPs) compiled on first use"
        )
    for change in changes:  # resumed with other settings than the checkpoint's: say which, they apply now
        metrics.print(change)
    for line in video_report(stream):
        metrics.print(line)
    trainer = Trainer(cfg, d, engine, rows, ckpt, metrics, fingerprint, start_step=start_step)
    trainer.tokens_seen = rank_state.get("tokens_seen", 0)
    trainer.records = rank_state.get("records", 0)
    trainer.epochs = dict(rank_state.get("epochs", {}))
    trainer.skipped.update(rank_state.get("skipped", {}))
    for url, reasons in rank_state.get("skipped_shards", {}).items():
        trainer.skipped_shards.setdefault(url, Counter()).update(reasons)
    trainer.skipped_records.update(rank_state.get("skipped_records", {}))
    trainer._skips_reported = len(trainer.skipped_records)
    trainer.num_readable = sum(
        stream.lengths.values()
    )  # records of the readable shards: what skips are out of
    peak_tflops = cfg.trainer.peak_tflops or detect_peak_tflops(device_name(d.device))
    metrics.print(
        f"MFU against {peak_tflops:g} TFLOP/s per device"
        + (" (trainer.peak_tflops)" if cfg.trainer.peak_tflops else f" ({device_name(d.device)})")
        if peak_tflops
        else f"MFU: n/a (no known peak TFLOP/s for {device_name(d.device)}; set trainer.peak_tflops)"
    )
    trainer.throughput = Throughput(
        model.config, peak_tflops=peak_tflops, world_size=d.world_size, freeze=cfg.model.freeze
    )
    trainer.nonfinite_skips = rank_state.get("nonfinite_skips", 0)
    if cfg.trainer.eval.every > 0:
        from mmrope.train.eval import Evaluator, eval_shard_urls

        urls = eval_shard_urls(cfg, rank0_first=lambda fn: _rank0_first(d, fn))
        eval_processor = make_sample_processor(cfg, processor, encoding, pixels="float32")
        trainer.evaluator = Evaluator(cfg, engine.module, eval_processor, encoding, urls, d.device)
    if cfg.trainer.eval.benchmarks.tasks:
        from mmrope.train.benchmarks import Benchmarks

        trainer.benchmarks = Benchmarks(
            cfg.trainer.eval.benchmarks, run_dir, enabled=d.is_main, log=metrics.print
        )
    return Session(cfg, d, model, engine, trainer, ckpt, metrics, processor, start_step)


def run(cfg: TrainConfig, record: DictConfig | None = None) -> TrainResult:
    s = build_session(cfg, record)
    try:
        result = s.trainer.train()
    finally:
        s.metrics.close()
    d, ckpt, start_step = s.dist, s.ckpt, s.start_step
    if d.is_main:
        print(
            f"first loss {result.first_loss:.4f} -> last loss {result.last_loss:.4f} after {result.steps_done} steps"
            if result.first_loss is not None
            else f"nothing to do: already at step {start_step}"
        )
        print(f"checkpoint: {ckpt.latest()}")
    return result
