"""Assemble a training run from a validated config: processor, data, model, engine, checkpoints, loop."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from data.loader import PackedRowStream, ResumableLoader, plan_report, source_report, video_report
from data.processing import SampleProcessor
from data.processor import VLProcessor, processor_for
from data.synthetic import write_synthetic_shards
from mmrope.distributed.parallelize import parallelize
from mmrope.encodings import build as build_encoding
from mmrope.model.build import build_model
from mmrope.model.install import install
from mmrope.train import rundir
from mmrope.train.checkpoint import CheckpointManager
from mmrope.train.config import TrainConfig, model_tokens_per_second, rope_hparams_error
from mmrope.train.engine import Dist, build_engine, init_distributed, init_sequence_parallel
from mmrope.train.loop import Trainer, TrainResult
from mmrope.train.metrics import Metrics
from mmrope.train.resume import ResumePlan, apply_optim_config
from mmrope.train.throughput import Throughput, detect_peak_tflops, device_name


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


def open_checkpoints(cfg: TrainConfig, run_dir: Path, d: Dist) -> CheckpointManager:
    return CheckpointManager(
        run_dir / "checkpoints",
        rank=d.rank,
        world_size=d.world_size,
        keep_last=cfg.trainer.keep_last,
        # with an adapter only what trains is saved (the frozen base is rebuilt from the config on resume/export)
        trainable_only=cfg.adapter.name != "none",
    )


def open_data(cfg: TrainConfig, d: Dist, sample_processor: SampleProcessor, plan: ResumePlan, status):
    """The data first, in seconds, before the model: shard indexes, record counts, the slot count (refused naming
    data.num_slots where it does not fit the data or the world), and what the run will train on."""
    status("opening the data (shard indexes)...")
    stream = make_stream(cfg, d, sample_processor)
    announce(d, data_settings(cfg) + source_report(stream))
    stream.fit_slots(plan.num_slots(cfg), cfg.data.num_workers)
    rows = max(0, cfg.trainer.max_steps - plan.first_step) * cfg.trainer.global_batch_size
    setting = "checkpoint" if plan.saved_slots else cfg.data.num_slots
    announce(d, plan_report(stream, rows=rows, slots_setting=setting))
    return stream


def install_encoding(model: torch.nn.Module, encoding, cfg: TrainConfig) -> None:
    try:
        # the one seam
        install(model, encoding, attn_backend=cfg.model.attn_backend, dipe=cfg.rope.dipe)
    except ValueError as e:  # an encoding that does not fit this checkpoint's heads: name the rope key
        if not any(h in str(e) for h in encoding.hparams):
            raise
        raise rope_hparams_error(e, cfg.rope.name, cfg.rope.hparams) from e
    if cfg.model.kind == "pretrained":
        start_from_exported_planes(model, encoding, Path(cfg.model.path))


def start_from_exported_planes(model: torch.nn.Module, encoding, path: Path) -> None:
    """A base model that is an mmrope export of this same encoding (name and hyperparameters) brings the
    encoding's learned parameters (GRAPE's planes, `mmrope.pretrained.ROTARY_FILE`): continued training starts
    from them, not from a fresh init. An export of another encoding's has nothing that applies (said once)."""
    from mmrope.pretrained import ROTARY_FILE, load_rotary, read_encoding_file

    if not (path / ROTARY_FILE).is_file():
        return
    meta = read_encoding_file(path)
    if (
        meta["name"] == encoding.name
        and build_encoding(meta["name"], **meta["hparams"]).hparams == encoding.hparams
    ):
        load_rotary(model, path)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(
            f"note: model.path {str(path)!r} holds learned parameters of {meta['name']} {meta['hparams']}; "
            f"this run's encoding ({encoding.name} {encoding.hparams}) starts from its own init"
        )


def start_engine(cfg: TrainConfig, d: Dist, objective, ckpt: CheckpointManager, plan: ResumePlan, status):
    """The DeepSpeed engine, loaded from the plan's checkpoint: (engine, this rank's saved state or {})."""
    latest, resized = plan.checkpoint, plan.resized(d.world_size)
    if resized:
        ckpt.universal(latest)
    status("creating DeepSpeed engine" + (f" and loading {latest}..." if latest is not None else "..."))
    engine, _, _ = build_engine(objective, cfg, d.world_size, load_universal=resized)
    rank_state = ckpt.load(engine, latest, plan.manifest) if plan.manifest is not None else {}
    if plan.optim_changed:
        apply_optim_config(engine, cfg.trainer.optim)
    # The checkpoint holds the exact stream position (per virtual slot: epoch cursors, the mixture's RNG state,
    # the record references held in the packer), so the resumed run sees exactly the rows an
    # uninterrupted one would, on this world size and worker count or another.
    if rank_state.get("step", 0) and rank_state.get("data") is None:
        raise ValueError(
            f"config key `trainer.resume`: checkpoint {latest} holds no data loader state; cannot resume exactly"
        )
    return engine, rank_state


def report_start(session: Session, plan: ResumePlan, parallel, stream: PackedRowStream) -> None:
    """What the run is: its folder, where it resumes, parameters, adapter, compile, changed settings, video."""
    cfg, d, start_step, log = session.cfg, session.dist, session.start_step, session.metrics.print
    log(
        f"run dir: {plan.run_dir}  world size: {d.world_size}  rope: {cfg.rope.name}"
        f"{' + DIPE' if cfg.rope.dipe else ''}  resume: {'step ' + str(start_step) if start_step else 'fresh'}"
    )
    if plan.resized(d.world_size):
        log(
            f"  resumed step {start_step} of world size {plan.manifest['world_size']} on world size "
            f"{d.world_size}: model and optimizer from {plan.checkpoint / 'universal'}, data position from "
            f"{stream.num_slots} virtual slots"
        )
    for group, c in parallel.param_counts.items():
        log(f"  params/{group:<9} trainable {c['trainable']:>12,}  frozen {c['frozen']:>12,}")
    for line in parallel.adapter.lines(cfg.adapter) if parallel.adapter is not None else []:
        log(line)
    if parallel.compiled:
        log(
            f"  model.compile: {len(parallel.compiled)} LLM modules (RMSNorms, dense MLPs) compiled on first use"
        )
    for line in plan.changes + video_report(stream):  # changed settings: they apply from now on
        log(line)


def measure_throughput(cfg: TrainConfig, d: Dist, model: torch.nn.Module, log) -> Throughput:
    """Tokens/s and MFU against the device's peak (trainer.peak_tflops, or known from the device's name)."""
    peak_tflops = cfg.trainer.peak_tflops or detect_peak_tflops(device_name(d.device))
    log(
        f"MFU against {peak_tflops:g} TFLOP/s per device"
        + (" (trainer.peak_tflops)" if cfg.trainer.peak_tflops else f" ({device_name(d.device)})")
        if peak_tflops
        else f"MFU: n/a (no known peak TFLOP/s for {device_name(d.device)}; set trainer.peak_tflops)"
    )
    return Throughput(model.config, peak_tflops=peak_tflops, world_size=d.world_size, freeze=cfg.model.freeze)


def attach_evaluation(session: Session, encoding, run_dir: Path) -> None:
    """trainer.eval.every: held-out loss in the training log; trainer.eval.benchmarks: scores per checkpoint."""
    cfg, d, trainer = session.cfg, session.dist, session.trainer
    if cfg.trainer.eval.every > 0:
        from mmrope.train.eval import Evaluator, eval_shard_urls

        urls = eval_shard_urls(cfg, rank0_first=lambda fn: _rank0_first(d, fn))
        eval_processor = make_sample_processor(cfg, session.processor, encoding, pixels="float32")
        trainer.evaluator = Evaluator(cfg, session.engine.module, eval_processor, encoding, urls, d.device)
    if cfg.trainer.eval.benchmarks.tasks:
        from mmrope.train.benchmarks import Benchmarks

        trainer.benchmarks = Benchmarks(
            cfg.trainer.eval.benchmarks, run_dir, enabled=d.is_main, log=session.metrics.print
        )


def build_session(cfg: TrainConfig, record: DictConfig | None = None) -> Session:
    """`record`: the composed config as Hydra handed it to train.py; written as the run's `.hydra/config.yaml`
    (with Hydra's other records and the job log) once the checks below passed (mmrope/train/rundir.py)."""
    run_dir = Path(cfg.trainer.output_dir) / cfg.trainer.run_name
    plan = ResumePlan.from_run(cfg, run_dir)  # refuses what trainer.resume forbids before the process group
    d = init_distributed()
    init_sequence_parallel(d, cfg.trainer.sequence_parallel_size)  # sets d.sp
    seed_everything(cfg.trainer.seed, d.rank)
    ckpt = open_checkpoints(cfg, run_dir, d)
    plan.check_world(cfg, d.world_size, d.dp_size)
    if record is not None:  # accepted: from here on the call is the run's (a refusal above wrote nothing)
        rundir.claim(record, rank=d.rank)

    # Start-up can take a minute on real checkpoints and data: say what is happening (rank 0).
    status = (lambda msg: print(msg, flush=True)) if d.is_main else (lambda _: None)
    status("building the processor...")
    processor = make_processor(cfg, d)
    encoding = build_encoding(cfg.rope.name, **cfg.rope.hparams)
    stream = open_data(cfg, d, make_sample_processor(cfg, processor, encoding), plan, status)
    status("building the model...")
    vocab_size, special_ids = len(processor.tokenizer), processor.special_ids
    model = build_model(cfg.model, vocab_size=vocab_size, special_ids=special_ids, seed=cfg.trainer.seed)
    install_encoding(model, encoding, cfg)
    # freeze -> adapters -> activation checkpointing -> compile -> sequence parallelism -> objective, in that order
    parallel = parallelize(model, cfg, d)
    engine, rank_state = start_engine(cfg, d, parallel.objective, ckpt, plan, status)
    start_step = rank_state.get("step", 0)
    num_workers = fit_workers(cfg.data.num_workers, stream.num_slots, d.dp_size, status)
    rows = ResumableLoader(stream, num_workers, state=rank_state.get("data"))

    metrics = Metrics(cfg, run_dir, enabled=d.is_main, start_step=start_step, flat_config=plan.flat)
    trainer = Trainer(cfg, d, engine, rows, ckpt, metrics, plan.fingerprint)
    trainer.load_state_dict(rank_state)
    trainer.data_stats.num_readable = sum(stream.lengths.values())  # records of the readable shards
    trainer.data_stats.source_records = list(stream.num_records)  # per source: what one epoch is
    session = Session(cfg, d, model, engine, trainer, ckpt, metrics, processor, start_step)
    report_start(session, plan, parallel, stream)
    trainer.throughput = measure_throughput(cfg, d, model, metrics.print)
    attach_evaluation(session, encoding, run_dir)
    return session


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
