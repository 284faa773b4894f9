"""Assemble a training run from a validated config: processor, data, model, engine, checkpoints, loop."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.loader import PackedRowStream, ResumableLoader, video_report
from data.processing import SampleProcessor
from data.processor import VLProcessor, build_tiny_processor, load_processor
from data.synthetic import corpus, write_synthetic_shards
from mmrope.encodings import build as build_encoding
from mmrope.model.build import build_model
from mmrope.model.freeze import apply_freeze
from mmrope.model.install import install
from mmrope.model.objective import SFTObjective
from mmrope.model.recompute import apply_activation_checkpointing
from mmrope.train.checkpoint import CheckpointManager, config_fingerprint
from mmrope.train.config import TrainConfig
from mmrope.train.engine import Dist, build_engine, init_distributed
from mmrope.train.loop import Trainer, TrainResult
from mmrope.train.metrics import Metrics
from mmrope.train.throughput import Throughput


def flatten(cfg: TrainConfig) -> dict:
    def walk(node, prefix=""):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k != "hparams":
                yield from walk(v, key + ".")
            else:
                yield key, v

    return dict(walk(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)))


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
    m, data = cfg.model, cfg.data
    if m.kind == "tiny" and not m.tokenizer_path:
        return _rank0_first(
            d,
            lambda: build_tiny_processor(
                Path(data.cache_dir) / "tiny_processor",
                corpus(),
                min_pixels=data.min_pixels,
                max_pixels=data.max_pixels,
                patch_size=m.tiny.patch_size,
                merge_size=m.tiny.spatial_merge_size,
                temporal_patch_size=m.tiny.temporal_patch_size,
            ),
        )
    path = m.tokenizer_path or (m.path if m.kind == "pretrained" else m.vision_path)
    return load_processor(path, min_pixels=data.min_pixels, max_pixels=data.max_pixels)


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
    """Training rows carry uint8 pixels (expanded on the device, data/pixels.py); eval and probes use float32."""
    return SampleProcessor(
        processor,
        encoding,
        max_tokens=cfg.data.max_tokens,
        layout=cfg.rope_layout(),
        system_prompt=cfg.data.system_prompt,
        dipe=cfg.rope.dipe,
        video=cfg.data.video.sampling(),
        pixels=pixels,
        seed=cfg.data.seed,
    )


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


def build_session(cfg: TrainConfig) -> Session:
    d = init_distributed()
    seed_everything(cfg.trainer.seed, d.rank)
    run_dir = Path(cfg.trainer.output_dir) / cfg.trainer.run_name
    flat = flatten(cfg)

    processor = make_processor(cfg, d)
    encoding = build_encoding(cfg.rope.name, **cfg.rope.hparams)
    model = build_model(
        cfg.model,
        vocab_size=len(processor.tokenizer),
        special_ids=processor.special_ids,
        seed=cfg.trainer.seed,
    )
    install(model, encoding, attn_backend=cfg.model.attn_backend, dipe=cfg.rope.dipe)  # the one seam
    counts = apply_freeze(model, cfg.model.freeze)
    apply_activation_checkpointing(
        model, cfg.model.activation_checkpointing, cfg.model.activation_checkpointing_every
    )
    objective = SFTObjective(model, zero_stage=cfg.deepspeed.stage, balance_vision=d.world_size > 1)

    ckpt = CheckpointManager(
        run_dir / "checkpoints", rank=d.rank, world_size=d.world_size, keep_last=cfg.trainer.keep_last
    )
    fingerprint = config_fingerprint(flat)
    latest = ckpt.latest()
    if cfg.trainer.resume == "must" and latest is None:
        raise ValueError(f"config key `trainer.resume`: 'must' but no committed checkpoint in {ckpt.dir}")
    manifest = None
    if latest is not None and cfg.trainer.resume != "never":
        manifest = ckpt.check_compatible(latest, fingerprint)
    # Another world size: DeepSpeed's universal checkpoint carries model and optimizer (converted once by rank 0),
    # the virtual slots carry the data position. Slots that do not divide are refused below (data.num_slots).
    resized = manifest is not None and manifest["world_size"] != d.world_size
    if resized:
        PackedRowStream.check_slots(cfg.data.num_slots, d.world_size, cfg.data.num_workers)
        ckpt.universal(latest)
    engine, _, _ = build_engine(objective, cfg, d.world_size, load_universal=resized)
    rank_state = ckpt.load(engine, latest, manifest) if manifest is not None else {}
    start_step = rank_state.get("step", 0)

    sample_processor = make_sample_processor(cfg, processor, encoding)
    mixture = [(list(m["shards"]), float(m["weight"])) for m in cfg.data.mixture]
    stream = _rank0_first(  # rank 0 builds missing shard indexes, the others read them
        d,
        lambda: PackedRowStream(
            None if mixture else shard_urls(cfg, d),
            sample_processor,
            max_tokens=cfg.data.max_tokens,
            seed=cfg.data.seed,
            rank=d.rank,
            world_size=d.world_size,
            num_slots=cfg.data.num_slots,
            shuffle_buffer=cfg.data.shuffle_buffer,
            error_policy=cfg.data.error_policy,
            mixture=mixture or None,
            index_cache_dir=cfg.data.cache_dir,
            log=print if d.is_main else (lambda _: None),
        ),
    )
    # The checkpoint holds the exact stream position (per virtual slot: shard cursors, RNG states, the record
    # references held in the shuffle buffer and the packer), so the resumed run sees exactly the rows an
    # uninterrupted one would, on this world size and worker count or another.
    data_state = rank_state.get("data")
    if start_step and data_state is None:
        raise ValueError(
            f"config key `trainer.resume`: checkpoint {latest} holds no data loader state; cannot resume exactly"
        )
    rows = ResumableLoader(stream, cfg.data.num_workers, state=data_state)

    metrics = Metrics(cfg, run_dir, enabled=d.is_main, start_step=start_step, flat_config=flat)
    metrics.print(
        f"run dir: {run_dir}  world size: {d.world_size}  rope: {cfg.rope.name}"
        f"{' + DIPE' if cfg.rope.dipe else ''}  resume: {'step ' + str(start_step) if start_step else 'fresh'}"
    )
    if resized:
        metrics.print(
            f"  resumed step {start_step} of world size {manifest['world_size']} on world size {d.world_size}: model "
            f"and optimizer from {latest / 'universal'}, data position from {cfg.data.num_slots} virtual slots"
        )
    for group, c in counts.items():
        metrics.print(f"  params/{group:<9} trainable {c['trainable']:>12,}  frozen {c['frozen']:>12,}")
    for line in video_report(stream):
        metrics.print(line)
    trainer = Trainer(cfg, d, engine, rows, ckpt, metrics, fingerprint, start_step=start_step)
    trainer.tokens_seen = rank_state.get("tokens_seen", 0)
    trainer.records = rank_state.get("records", 0)
    trainer.skipped.update(rank_state.get("skipped", {}))
    for url, reasons in rank_state.get("skipped_shards", {}).items():
        trainer.skipped_shards.setdefault(url, Counter()).update(reasons)
    trainer.throughput = Throughput(
        model.config, peak_tflops=cfg.trainer.peak_tflops, world_size=d.world_size, freeze=cfg.model.freeze
    )
    trainer.nonfinite_skips = rank_state.get("nonfinite_skips", 0)
    if cfg.trainer.eval.every > 0:
        from mmrope.train.eval import Evaluator, eval_shard_urls

        urls = eval_shard_urls(cfg, rank0_first=lambda fn: _rank0_first(d, fn))
        eval_processor = make_sample_processor(cfg, processor, encoding, pixels="float32")
        trainer.evaluator = Evaluator(cfg, engine.module, eval_processor, encoding, urls, d.device)
    return Session(cfg, d, model, engine, trainer, ckpt, metrics, processor, start_step)


def run(cfg: TrainConfig) -> TrainResult:
    s = build_session(cfg)
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
