"""Typed configuration schemas for `train.py`.

Hydra composes `configs/train.yaml` and its groups into a `DictConfig` checked against these dataclasses
(unknown keys and wrong types fail at compose time). `validate(cfg)` then turns it into plain dataclass
objects, running every `__post_init__`, so semantic errors (a bad LR range, a global batch that does not
divide, an unknown encoding) surface before any model or data is touched, with the offending key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.video import VideoSampling
from mmrope.encodings.positions import LAYOUTS
from mmrope.model.config import MUST_MATCH, AdapterConfig, ModelConfig, _one_of, _require, must_match
from mmrope.model.families import FAMILIES

PRECISIONS = ("auto", "bf16", "fp32")
RESUME_MODES = ("auto", "must", "never")
NONFINITE_POLICIES = ("raise", "skip")
ERROR_POLICIES = ("raise", "skip")


def rope_hparams_error(error: ValueError, name: str, hparams: dict[str, Any]) -> ValueError:
    """An encoding's ValueError with its config key named: `rope.hparams.<h>` for the hyperparameter its message
    mentions first (e.g. `rope.hparams.mrope_section`), else `rope.hparams`."""
    from mmrope.encodings import build

    text = str(error)
    found = []
    for h in {*hparams, *build(name).hparams}:
        if match := re.search(rf"(?<![A-Za-z0-9_]){re.escape(h)}(?![A-Za-z0-9_])", text):
            found.append((match.start(), h))
    key = f"rope.hparams.{min(found)[1]}" if found else "rope.hparams"
    return ValueError(f"config key `{key}`: {text} (rope={name})")


@dataclass
class RopeConfig:
    """The position encoding: one file per encoding in configs/rope/ (see mmrope.encodings.build)."""

    name: str = "mrope"  # a registry name (mmrope.encodings.available()), = configs/rope/<name>.yaml
    hparams: dict[str, Any] = field(default_factory=dict)  # overrides of the registry entry's defaults
    dipe: bool = False  # DIPE inter-modal anchoring on top of any 3-axis encoding
    layout: str | None = (
        None  # video token layout: qwen2 | qwen2_5 (contiguous) | qwen3 (per frame); None = from model.family
    )

    def __post_init__(self) -> None:
        from mmrope.encodings import available

        _one_of(self.name, tuple(available()), "rope.name")
        self.encoding()  # hyperparameter names and values (the fit to the model's heads: validate())
        if self.layout is not None:
            _one_of(self.layout, LAYOUTS, "rope.layout")
        if self.dipe:
            _require(
                not self.encoding().is_1d,
                "rope.dipe",
                f"DIPE needs a 3-axis encoding; {self.name!r} is 1D",
            )

    def encoding(self):
        """`mmrope.encodings.build(name, **hparams)`, its ValueError naming the config key."""
        from mmrope.encodings import build

        try:
            return build(self.name, **self.hparams)
        except ValueError as e:
            raise rope_hparams_error(e, self.name, self.hparams) from e


@dataclass
class SyntheticConfig:
    """The generated SFT set of the embedded default (written once as webdataset shards)."""

    num_samples: int = 3000  # records generated
    samples_per_shard: int = 500  # records per .tar shard
    min_image_size: int = 56  # image side range in pixels (each image drawn in it)
    max_image_size: int = 140
    seed: int = 0  # of the generated content (not of the stream order: data.seed)


@dataclass
class DataConfig:
    """The SFT stream. Defaults are the real-data recipe (32K packed rows, Qwen2.5-VL's pixel range);
    configs/data/synthetic.yaml shrinks them for the embedded tiny run."""

    # synthetic (generated, or data.shards if given) | shards (data.shards or mixture)
    source: str = must_match("synthetic")
    # webdataset URLs (brace notation ok); empty = synthetic
    shards: list[str] = must_match(factory=list)
    synthetic: SyntheticConfig = must_match(
        factory=SyntheticConfig
    )  # data.source=synthetic: what is generated
    cache_dir: str = ".cache"  # generated shards, the locally built tokenizer, indexes of read-only shards
    max_tokens: int = must_match(32768)  # packing budget per row
    min_pixels: int = must_match(56 * 56)  # image resize range in pixels (Qwen2.5-VL's processor defaults)
    max_pixels: int = must_match(28 * 28 * 1280)
    video: VideoSampling = must_match(factory=VideoSampling)  # how video files are sampled (data/video.py)
    system_prompt: str | None = must_match(None)  # None: the chat template's default
    num_workers: int = 0  # DataLoader worker processes per rank
    # Virtual slots (data/loader.py): the stream position is theirs, so a run resumes exactly on any world size
    # and num_workers whose product divides num_slots. Fixed for a run. An int, or `auto`: derived at start from
    # the shard indexes' record counts (a resumed run keeps its checkpoint's). Any: an int or the string "auto".
    num_slots: Any = must_match("auto")
    # Open rows per slot's packer (first-fit, oldest first): more packs fuller rows, fewer keeps a record closer to
    # the order it was drawn in (a record is trained on within about num_open_rows rows of its slot).
    # 16: with data.vit_balance's caps a row takes fewer of the records on offer, and 8 open rows filled 98.9%.
    num_open_rows: int = must_match(16)
    # ViT balance across data-parallel ranks: a row keeps its visual tokens within (1 + vit_balance) x the data's
    # visual share of a row, and its text tokens likewise, so every rank's row costs the vision tower about the
    # same (data/README.md; 8 ranks on the LLaVA-like set: max/mean ViT patches per step 1.16 -> 1.04, worst step
    # 1.24 -> 1.08, fill 99.5% -> 99.5%, tests/perf/RESULTS.md). Smaller balances better and fills less; null: off.
    vit_balance: float | None = must_match(0.08)
    error_policy: str = "skip"  # raise | skip (eval data always raises)
    max_skip_fraction: float = 0.05  # abort once more than this fraction of records was skipped
    seed: int = must_match(0)  # of the stream order (shard permutation, shuffle, mixture draws)
    # Weighted sources instead of `shards`: [{shards: [urls...], weight: 0.7}, ...]; each record is drawn from
    # a source chosen by a seeded weighted draw (deterministic, resumable), each source cycles its own epochs.
    mixture: list[Any] = must_match(factory=list)

    def __post_init__(self) -> None:
        _one_of(self.source, ("synthetic", "shards"), "data.source")
        _require(
            self.source != "shards" or bool(self.shards) or bool(self.mixture),
            "data.shards",
            "data=shards needs shard URLs: data.shards=[...] (or data.mixture=[...]); "
            "make shards with `python -m data.convert`",
        )
        _require(self.max_tokens >= 64, "data.max_tokens", f"must be >= 64, got {self.max_tokens}")
        for i, m in enumerate(self.mixture):
            ok = hasattr(m, "get") and m.get("shards") and isinstance(m.get("weight"), (int, float))
            _require(bool(ok), f"data.mixture[{i}]", "must be {shards: [urls...], weight: number}")
            _require(float(m["weight"]) > 0, f"data.mixture[{i}].weight", f"must be > 0, got {m['weight']}")
        _require(
            not (self.mixture and self.shards), "data.mixture", "give data.shards or data.mixture, not both"
        )
        _require(
            0 < self.min_pixels <= self.max_pixels,
            "data.min_pixels",
            "must satisfy 0 < min_pixels <= max_pixels",
        )
        _one_of(self.error_policy, ERROR_POLICIES, "data.error_policy")
        _require(0.0 <= self.max_skip_fraction <= 1.0, "data.max_skip_fraction", "must be in [0, 1]")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(
            self.num_slots == "auto" or (type(self.num_slots) is int and self.num_slots >= 1),
            "data.num_slots",
            f"must be auto or an int >= 1, got {self.num_slots!r}",
        )
        _require(self.num_open_rows >= 1, "data.num_open_rows", f"must be >= 1, got {self.num_open_rows}")
        _require(
            self.vit_balance is None or self.vit_balance > 0,
            "data.vit_balance",
            f"must be > 0 or null (off), got {self.vit_balance!r}",
        )
        _require(
            self.num_slots == "auto" or self.num_slots % max(1, self.num_workers) == 0,
            "data.num_slots",
            f"{self.num_slots} slots cannot be split evenly over num_workers={self.num_workers}",
        )


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine; batch sizes, clipping and precision are filled in from trainer.* at run time."""

    stage: int = must_match(2)  # ZeRO stage 0 | 1 | 2 | 3
    # Offload swaps the optimizer (torch AdamW <-> DeepSpeed's CPU Adam, whose saved state DeepSpeed does not
    # convert into the other's): resuming across an on/off change is refused, naming the key.
    offload_optimizer: bool = must_match(False)  # optimizer state in CPU memory (DeepSpeed's CPU Adam)
    offload_param: bool = must_match(False)  # parameters in CPU memory (stage 3 only)
    overrides: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed JSON

    def __post_init__(self) -> None:
        _one_of(self.stage, (0, 1, 2, 3), "deepspeed.stage")
        if self.offload_param:
            _require(self.stage == 3, "deepspeed.offload_param", "parameter offload needs ZeRO stage 3")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay. Defaults are the paper recipe (7B: 1e-5 -> 3e-6, betas (0.9,
    0.98), wd 0.05); configs/trainer/default.yaml sets the tiny random-init run's (2e-3 -> 2e-4, 10 warmup)."""

    lr: float = 1e-5  # peak learning rate
    min_lr: float = 3e-6  # end of the cosine decay
    warmup_steps: int = 0  # linear warmup from 0 (clamped to trainer.max_steps by validate())
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.05  # decoupled; not on biases and norms (mmrope/model/freeze.py param groups)
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables

    def __post_init__(self) -> None:
        _require(self.lr > 0, "trainer.optim.lr", "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "trainer.optim.min_lr", f"must be in [0, lr={self.lr}]")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "trainer.optim.betas",
            "must be two numbers in [0, 1)",
        )
        _require(self.warmup_steps >= 0, "trainer.optim.warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "trainer.optim.grad_clip", "must be >= 0 (0 disables)")


@dataclass
class WandbConfig:
    project: str = "mmrope"  # wandb project
    mode: str = "offline"  # online | offline | disabled
    group: str | None = None  # e.g. the Hydra sweep's name (set by configs/train.yaml in a multirun)
    tags: list[str] = field(default_factory=list)  # wandb run tags

    def __post_init__(self) -> None:
        _one_of(self.mode, ("online", "offline", "disabled"), "trainer.wandb.mode")


@dataclass
class BenchmarksConfig:
    """lmms-eval benchmarks of saved checkpoints during training (`mmrope.train.benchmarks`): every `every_saves`-th
    committed checkpoint is exported and judged by `python -m mmrope.eval.bench` in a separate process (rank 0);
    scores arrive later and are logged as `bench/<task>/<metric>` at the checkpoint's step. Empty `tasks`: off."""

    tasks: list[str] = field(default_factory=list)  # lmms-eval task names, e.g. [mmstar_qwen]; empty disables
    every_saves: int = 1  # judge every N-th save (trainer.save_every steps apart); the final save always
    limit: int | None = None  # items per task; null = all
    include_path: list[str] = field(
        default_factory=list
    )  # folders of extra task YAMLs (lmms-eval --include_path)
    batch_size: int = 1
    model_args: str = ""  # extra `--model mmrope` model_args, e.g. "device=cpu" (quoted in an override)
    lmms_eval: str | None = (
        None  # the lmms-eval executable; null = .venv-eval/bin/lmms-eval (make eval-setup)
    )
    wait_at_end_s: float = 600.0  # when training ends, wait this long for running benchmarks to log them

    def __post_init__(self) -> None:
        key = "trainer.eval.benchmarks"
        _require(
            all(isinstance(t, str) and t.strip() and "," not in t for t in self.tasks),
            f"{key}.tasks",
            f"must be task names (one per list entry, no commas), got {list(self.tasks)}",
        )
        _require(self.every_saves >= 1, f"{key}.every_saves", f"must be >= 1, got {self.every_saves}")
        _require(
            self.limit is None or self.limit >= 1, f"{key}.limit", f"must be >= 1 or null, got {self.limit}"
        )
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.wait_at_end_s >= 0, f"{key}.wait_at_end_s", f"must be >= 0, got {self.wait_at_end_s}")
        for path in self.include_path:
            _require(Path(path).is_dir(), f"{key}.include_path", f"{path!r} is not a folder")
        _require(
            self.lmms_eval is None or Path(self.lmms_eval).is_file(),
            f"{key}.lmms_eval",
            f"{self.lmms_eval!r} is not a file (make eval-setup creates .venv-eval/bin/lmms-eval)",
        )


@dataclass
class EvalConfig:
    """Evaluation during training (`mmrope.train.eval`): held-out loss and the visual-fading probe."""

    every: int = 0  # evaluate every N optimizer steps; 0 disables
    shards: list[str] = field(default_factory=list)  # held-out shards; empty = synthetic ones, another seed
    synthetic_samples: int = 64  # size of the generated held-out set (when `shards` is empty)
    max_batches: int = 8  # packed rows scored for eval/loss; 0 = the whole held-out set
    probe_distances: list[int] = field(default_factory=lambda: [0, 64])  # distractor tokens image -> question
    probe_samples: int = 8  # image+question samples probed at each distance; 0 disables the probe
    benchmarks: BenchmarksConfig = field(default_factory=BenchmarksConfig)  # lmms-eval on saved checkpoints

    def __post_init__(self) -> None:
        _require(self.every >= 0, "trainer.eval.every", f"must be >= 0 (0 disables), got {self.every}")
        _require(self.synthetic_samples >= 1, "trainer.eval.synthetic_samples", "must be >= 1")
        _require(self.max_batches >= 0, "trainer.eval.max_batches", "must be >= 0 (0 = all held-out rows)")
        _require(self.probe_samples >= 0, "trainer.eval.probe_samples", "must be >= 0 (0 disables the probe)")
        _require(
            all(isinstance(d, int) and d >= 0 for d in self.probe_distances),
            "trainer.eval.probe_distances",
            f"must be non-negative integers, got {list(self.probe_distances)}",
        )
        _require(
            len(set(self.probe_distances)) == len(self.probe_distances),
            "trainer.eval.probe_distances",
            f"must not repeat a distance, got {list(self.probe_distances)}",
        )


@dataclass
class TrainerConfig:
    # the run directory is output_dir/run_name: a requeued job finds its checkpoints
    run_name: str = "tiny-default"
    output_dir: str = "runs"  # runs live in output_dir/run_name (a sweep: output_dir/sweeps/<hydra.job.name>)
    max_steps: int = 300  # optimizer steps of the whole run (a resumed run continues to it)
    # packed rows per optimizer step, over all ranks and accumulation steps
    global_batch_size: int = must_match(2)
    # packed rows per rank per forward (1: grow data.max_tokens instead)
    micro_batch_size: int = must_match(1)
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    seed: int = 0  # model init and dropout (the data order is data.seed)
    log_every: int = 10  # metrics.jsonl / wandb / console every N steps (and steps 1 and max_steps)
    save_every: int = 100  # committed checkpoint every N steps (and at max_steps and on preemption)
    keep_last: int = 2  # committed checkpoints kept
    resume: str = "auto"  # auto | must | never
    optim: OptimConfig = field(default_factory=OptimConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Per-device peak TFLOP/s for MFU; None = detected for known GPUs (H100, H200, A100: dense bf16), else
    # MFU is "n/a" (a CPU has no meaningful tensor-core peak).
    peak_tflops: float | None = None
    on_nonfinite: str = "raise"  # raise | skip: what a step with a non-finite loss or grad norm does
    max_nonfinite_skips: int = 10  # with on_nonfinite=skip: abort once more steps than this were skipped
    requeue_exit_code: int = 143  # exit status after a preemption save (SIGTERM/SIGUSR1): 128 + SIGTERM
    debug_inject_nan_at_step: int = 0  # testing aid: make the loss of this (1-based) step NaN; 0 = off
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out loss + probe every `eval.every` steps
    # Ulysses sequence parallelism (mmrope.distributed.sequence_parallel): N consecutive ranks train one packed row,
    # each on L/N of its tokens; data-parallel size = world size / N. 1 = off.
    sequence_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(
            bool(self.run_name) and "/" not in self.run_name,
            "trainer.run_name",
            "is required and must be a plain name (no '/')",
        )
        _require(self.max_steps > 0, "trainer.max_steps", "must be > 0")
        _require(self.global_batch_size > 0, "trainer.global_batch_size", "must be > 0")
        _require(
            self.micro_batch_size == 1,
            "trainer.micro_batch_size",
            "must be 1: a micro batch is one packed row; raise data.max_tokens to put more samples in it",
        )
        _one_of(self.precision, PRECISIONS, "trainer.precision")
        _one_of(self.resume, RESUME_MODES, "trainer.resume")
        _require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "trainer.peak_tflops",
            f"must be > 0 (TFLOP/s per device) or null (detect), got {self.peak_tflops}",
        )
        _require(self.save_every > 0, "trainer.save_every", "must be > 0")
        _require(self.keep_last >= 1, "trainer.keep_last", "must be >= 1")
        _one_of(self.on_nonfinite, NONFINITE_POLICIES, "trainer.on_nonfinite")
        _require(self.max_nonfinite_skips >= 0, "trainer.max_nonfinite_skips", "must be >= 0")
        _require(
            0 < self.requeue_exit_code < 256, "trainer.requeue_exit_code", "must be an exit status in 1..255"
        )
        _require(self.debug_inject_nan_at_step >= 0, "trainer.debug_inject_nan_at_step", "must be >= 0")
        _require(
            self.sequence_parallel_size >= 1,
            "trainer.sequence_parallel_size",
            f"must be >= 1 (1 = off), got {self.sequence_parallel_size}",
        )


@dataclass
class LossConfig:
    """The token cross-entropy of the LM head (`mmrope.model.loss`), on the supervised rows only."""

    # chunked: mmrope's own loop over `chunk_size` rows of logits at a time (any device) | liger: Liger-Kernel's
    # fused linear cross-entropy (CUDA + `pip install liger-kernel`; picks its own chunking)
    backend: str = "chunked"
    # rows of logits materialised at once by the chunked backend: ~6 x chunk_size x vocab bytes with a bf16 head
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        from mmrope.model.loss import LOSS_BACKENDS

        _one_of(self.backend, LOSS_BACKENDS, "loss.backend")
        _require(self.chunk_size >= 1, "loss.chunk_size", f"must be >= 1, got {self.chunk_size}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig, metadata=MUST_MATCH)  # the whole encoding
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    adapter: AdapterConfig = must_match(factory=AdapterConfig)

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that train different rows: world size / trainer.sequence_parallel_size."""
        sp = self.trainer.sequence_parallel_size
        if world_size % sp:
            raise ValueError(
                f"config key `trainer.sequence_parallel_size`: {sp} does not divide the world size {world_size}"
            )
        return world_size // sp

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro steps per optimizer step so that rows/step equals trainer.global_batch_size exactly (an SP group
        of trainer.sequence_parallel_size ranks trains one row: it counts once)."""
        dp = self.data_parallel_size(world_size)
        per_step = self.trainer.micro_batch_size * dp
        if self.trainer.global_batch_size % per_step:
            raise ValueError(
                f"config key `trainer.global_batch_size`: {self.trainer.global_batch_size} is not divisible by "
                f"micro_batch_size x data-parallel size = {self.trainer.micro_batch_size} x {dp} "
                f"(world size {world_size} / trainer.sequence_parallel_size {self.trainer.sequence_parallel_size})"
            )
        return self.trainer.global_batch_size // per_step

    def rope_layout(self) -> str:
        return self.rope.layout or FAMILIES[self.model.family].layout


def resume_keys(schema: Any = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of the fields marked resume-relevant (`must_match` / `MUST_MATCH` metadata): they must match the
    checkpoint's to resume; a marked dataclass field counts as a whole (e.g. `model.tiny`, `rope`)."""
    schema = TrainConfig() if schema is None else schema
    keys: list[str] = []
    for f in dataclasses.fields(schema):
        value = getattr(schema, f.name)
        if f.metadata.get("resume") == "must_match":
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(value):
            keys.extend(resume_keys(value, f"{prefix}{f.name}."))
    return tuple(keys)


def register_rope_config(name: str) -> None:
    """Make `rope=<name>` selectable without a `configs/rope/<name>.yaml`: a config node with the registry entry's
    defaults (an encoding registered from code, e.g. a test's toy one). The shipped encodings have their YAML."""
    from mmrope.encodings.registry import ENCODINGS

    node = {"name": name, "hparams": dict(ENCODINGS[name].defaults)}
    ConfigStore.instance().store(group="rope", name=name, node=node)


def register_configs() -> None:
    """Register the schema so `configs/train.yaml` (defaults: `- train_schema`) is type-checked at compose time,
    and `python train.py --help` (hydra/help: mmrope) with every key described from the schema's comments."""
    from mmrope.train.help import help_config

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(group="hydra/help", name="mmrope", node=help_config(TrainConfig))


def validate(cfg: DictConfig | TrainConfig, *, check_paths: bool = True) -> TrainConfig:
    """Compose-time DictConfig -> validated dataclasses. Raises ValueError naming the offending key.

    `check_paths=False` skips the on-disk checks (shards exist and are readable): for configs that name
    placeholder paths, e.g. the shipped examples checked in the tests."""
    if isinstance(cfg, TrainConfig):
        return cfg
    check_known_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):  # composed without the schema (e.g. a plain OmegaConf.load)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    assert isinstance(obj, TrainConfig)
    optim, max_steps = obj.trainer.optim, obj.trainer.max_steps
    if optim.warmup_steps > max_steps:
        # A short run (a smoke test, `trainer.max_steps=2`) with the default warmup: warm up over the whole
        # run instead of refusing it, and say so.
        if os.environ.get("RANK", "0") == "0":
            print(
                f"note: trainer.optim.warmup_steps={optim.warmup_steps} > trainer.max_steps={max_steps}: "
                f"warmup clamped to {max_steps} steps",
                flush=True,
            )
        optim.warmup_steps = max_steps
    if not math.isfinite(obj.trainer.optim.lr):
        raise ValueError("config key `trainer.optim.lr`: must be finite")
    check_rope_fits_model(obj)
    check_sequence_parallel(obj)
    check_loss_backend(obj)
    check_adapter(obj)
    if check_paths:
        check_shards_readable(obj)
    return obj


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not have, naming them (with the closest known key).

    Hydra type-checks `key=value` against the schema at compose time, but a key added with `+` (what Hydra's own
    error suggests for a typo: `+trainer.max_step=4`) is inserted into the typed node and would be dropped
    silently when the node becomes its dataclass. Open maps (fields typed `dict`, e.g. `rope.hparams`, validated
    by the encoding, or `deepspeed.overrides`) take any key.
    """

    def walk(node: DictConfig, schema: type, prefix: str) -> None:
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            name = f"{prefix}{key}"
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
                where = f"of `{prefix.rstrip('.')}`" if prefix else "at the top level"
                raise ValueError(
                    f"config key `{name}`: not a key {where}{hint} "
                    f"(known: {', '.join(known)}). A `+` override adds a key; it cannot add one the schema lacks"
                )
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                child_type = OmegaConf.get_type(child)
                if child_type is not None and dataclasses.is_dataclass(child_type):
                    walk(child, child_type, name + ".")

    schema = OmegaConf.get_type(cfg)
    if schema is not None and dataclasses.is_dataclass(schema):
        walk(cfg, schema, "")


def shard_problems(urls: list[str]) -> list[str]:
    """`<full path>: not found` (or not readable, not a file) for each local shard that cannot be opened."""
    from data.index import expand_urls, local_path

    problems = []
    for url in expand_urls(list(urls)):
        path = os.path.abspath(local_path(url))  # a remote URL is refused here, naming data.shards
        if not os.path.exists(path):
            problems.append(f"{path}: not found")
        elif not os.path.isfile(path):
            problems.append(f"{path}: not a file")
        else:
            try:
                open(path, "rb").close()  # what reading it needs: permissions, a working mount
            except OSError as e:
                problems.append(f"{path}: not readable ({e.strerror})")
    return problems


def check_shards_readable(cfg: TrainConfig) -> None:
    """Every shard of data.shards, data.mixture and trainer.eval.shards exists and is readable: refused now, in
    seconds, naming the key and the full paths, not after the processor, model and engine are built."""
    groups = [("data.shards", cfg.data.shards)]
    groups += [(f"data.mixture[{i}].shards", m["shards"]) for i, m in enumerate(cfg.data.mixture)]
    groups += [("trainer.eval.shards", cfg.trainer.eval.shards)]
    for key, urls in groups:
        if not urls:
            continue
        try:
            problems = shard_problems(list(urls))
        except ValueError as e:  # expand_urls / local_path name `data.shards`: name the key given here
            raise ValueError(str(e).replace("config key `data.shards`", f"config key `{key}`")) from e
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"config key `{key}`: {len(problems)} shard(s) cannot be read: {shown}")


def check_adapter(cfg: TrainConfig) -> None:
    """What the adapter needs from the rest of the config and this machine, refused before any model is built:
    adapter=qlora needs CUDA and bitsandbytes; llm.mlp on an MoE family (experts are fused 3D parameters, which
    PEFT's LoRA layers do not wrap); lm_head (the loss reads its weight directly, past any adapter)."""
    a = cfg.adapter
    if a.name == "none":
        return
    import torch

    if a.name == "qlora":
        _require(
            torch.cuda.is_available(),
            "adapter=qlora",
            "the 4-bit base (bitsandbytes NF4) runs on CUDA only; on this machine use adapter=lora",
        )
        _require(
            cfg.deepspeed.stage != 3,
            "deepspeed.stage",
            "adapter=qlora keeps its 4-bit base whole on every GPU (ZeRO-3 cannot partition bitsandbytes' packed "
            "4-bit weights); use deepspeed=zero2 (the base is 4-bit already, the adapters are small)",
        )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"config key `adapter=qlora`: bitsandbytes is not importable ({e}); `pip install bitsandbytes`"
            ) from e
    family = FAMILIES[cfg.model.family]
    for role in a.targets:
        _require(
            bool(family.adapter_roles.get(role)),
            "adapter.targets",
            f"{role} matches no module of model.family={cfg.model.family}"
            + (
                ": its MoE experts are fused 3D parameters that PEFT's LoRA layers do not wrap; adapt "
                "llm.attention (and connector) and leave the experts frozen, or train them fully (adapter=none)"
                if family.moe and role == "llm.mlp"
                else ""
            ),
        )
    _require(
        "lm_head" not in a.targets,
        "adapter.targets",
        "lm_head cannot take an adapter: the loss reads lm_head.weight directly (chunked or fused cross-entropy "
        "without full logits, mmrope/model/loss.py), so its adapter would not take part in training; unfreeze "
        "it instead (model.freeze.lm_head=false) or drop lm_head from the targets",
    )


def check_loss_backend(cfg: TrainConfig) -> None:
    """loss.backend=liger needs CUDA and an importable liger_kernel on this machine: refuse before any model or data
    is built, naming `loss.backend`. (Not in LossConfig.__post_init__: exporting a Liger-trained checkpoint reads
    its config on any machine.)"""
    if cfg.loss.backend != "liger":
        return
    from mmrope.model.loss import liger_unavailable_reason

    if (reason := liger_unavailable_reason()) is not None:
        raise ValueError(
            f"config key `loss.backend`: liger cannot run here: {reason}. Train on a CUDA machine with "
            "liger-kernel installed (`pip install liger-kernel`, or `pip install -e '.[liger]'`), or set "
            "loss.backend=chunked (the built-in loss, same result)"
        )


def check_sequence_parallel(cfg: TrainConfig) -> None:
    """trainer.sequence_parallel_size > 1: the heads must split over the SP ranks (heads, KV heads), the family
    must not have linear-attention layers (they carry state along the row) and the in-training evaluation (whole
    rows) must be off. Raises ValueError naming trainer.sequence_parallel_size."""
    sp = cfg.trainer.sequence_parallel_size
    if sp == 1:
        return
    from mmrope.distributed.sequence_parallel import check_heads
    from mmrope.model.families import text_geometry

    key = "trainer.sequence_parallel_size"
    m = cfg.model
    family = FAMILIES[m.family]
    _require(
        not family.linear_attention,
        key,
        f"model.family={m.family} has linear-attention layers that carry state along the row; "
        "sequence parallelism cannot split them",
    )
    _require(
        cfg.trainer.eval.every == 0,
        key,
        "evaluation during training (trainer.eval.every > 0) does not run under sequence parallelism yet: its "
        "probe runs the model on whole rows; set trainer.eval.every=0 and evaluate the exported checkpoint",
    )
    text_config = _text_config(m)
    if text_config is None:
        return  # the model build names model.path; install() checks the heads again
    geometry = text_geometry(text_config)
    check_heads(text_config.num_attention_heads, geometry.num_key_value_heads, sp, key)


def _tiny_model_config(m: ModelConfig):
    """The tiny model's transformers config (placeholder token ids: the sizes and rope/vision settings matter)."""
    from mmrope.model.families import tiny_config

    ids = dict.fromkeys(
        ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), 0
    ) | {"pad_token_id": 0, "eos_token_id": 0}
    return tiny_config(m.family, m.tiny, vocab_size=8, special_ids=ids)


def model_tokens_per_second(m: ModelConfig) -> float:
    """The model's `vision_config.tokens_per_second` (`mmrope.model.families.tokens_per_second`): the tiny config's,
    or the checkpoint's config.json (a local read; a composed model keeps the VLM's vision config)."""
    from mmrope.model.families import tokens_per_second
    from mmrope.model.stock import checkpoint_config

    if m.kind == "tiny":
        return tokens_per_second(_tiny_model_config(m))
    path = m.path if m.kind == "pretrained" else m.vision_path
    if not path or not Path(path).is_dir():
        key = "model.path" if m.kind == "pretrained" else "model.vision_path"
        raise ValueError(f"config key `{key}`: {path!r} is not a local directory (nothing is downloaded)")
    return tokens_per_second(checkpoint_config(path))


def _text_config(m: ModelConfig):
    """The text model's config: the tiny one, or the checkpoint's config.json (a local read, no weights); None for
    a path that is not a directory (left to the model build, which names `model.path`)."""
    if m.kind == "tiny":
        return _tiny_model_config(m).get_text_config()
    path = m.path if m.kind == "pretrained" else m.llm_path
    if not path or not Path(path).is_dir():
        return None
    if m.kind == "pretrained":  # an mmrope export (non-stock ones refuse AutoConfig) or any HF checkpoint
        from mmrope.model.stock import checkpoint_config

        return checkpoint_config(path).get_text_config()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()


def check_rope_fits_model(cfg: TrainConfig) -> None:
    """Refuse an encoding the model cannot take (`mmrope.model.families.check_encoding`), naming the key.

    The text model's geometry comes from the tiny config, or from the checkpoint's config.json (a local read,
    no weights); a path that is not a directory is left to the model build, which names `model.path`.
    """
    from mmrope.model.families import EncodingMisfit, check_encoding, text_geometry

    m = cfg.model
    text_config = _text_config(m)
    if text_config is None:
        return
    try:
        check_encoding(cfg.rope.encoding(), text_geometry(text_config))
    except EncodingMisfit as e:
        key = f"rope.hparams.{e.hparam}" if e.hparam else "rope.name"
        raise ValueError(
            f"config key `{key}`: rope={cfg.rope.name} does not fit model.family={m.family}: {e.reason}"
        ) from e
