"""Distributed setup and the DeepSpeed engine (ZeRO 2/3, optional offload) with AdamW + cosine schedule."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmrope.model.freeze import param_groups
from mmrope.train.config import TrainConfig


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sp_size: int = 1  # trainer.sequence_parallel_size: consecutive ranks [k*N, (k+1)*N) train one row
    sp: Any = None  # this rank's mmrope.distributed.sequence_parallel.SequenceParallel group, None for size 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which row this rank trains: the index of its sequence-parallel group."""
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A DeepSpeed op build (the CPU shared-memory all-reduce is built on first use) takes 1-3 minutes. A build killed
# midway leaves torch's `lock` file behind, and every later run would wait on it forever without a word.
STALE_BUILD_LOCK_S = 15 * 60


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove (and say so) torch extension build locks older than `max_age_s`: leftovers of killed builds."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                print(f"removed a stale op build lock left by a killed build: {lock}", flush=True)
        except FileNotFoundError:  # another rank removed it first
            continue
    return removed


def init_distributed() -> Dist:
    """Join the process group started by torchrun / deepspeed / srun (or a 1-process group), gloo on CPU."""
    import deepspeed

    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if "RANK" not in os.environ:  # plain `python train.py`: a group of one, on a port the OS says is free
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def init_sequence_parallel(d: Dist, size: int):
    """The SP groups of `size` consecutive ranks (torch process groups; every rank creates every group, as
    `new_group` requires); returns this rank's `SequenceParallel`, or None for size 1. Sets `d.sp_size` and
    `d.sp`."""
    if size == 1:
        return None
    from mmrope.distributed.sequence_parallel import SequenceParallel

    if d.world_size % size:
        raise ValueError(
            f"config key `trainer.sequence_parallel_size`: {size} does not divide the world size {d.world_size}"
        )
    mine = None
    for start in range(0, d.world_size, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= d.rank < start + size:
            mine = group
    d.sp_size = size
    d.sp = SequenceParallel(mine, size=size, rank=d.rank % size)
    return d.sp


def all_reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """All-reduce a few host numbers (counts, flags) over the default group; identity without one.

    NCCL only moves CUDA tensors and gloo CPU ones, so the tensor goes to the device the backend serves. Values
    travel as float64, exact for integer counts below 2**53.
    """
    if not dist.is_initialized():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision  # bf16 on CPU is allowed: slow, but it runs the GPU's dtype path (the CI proxy)


def deepspeed_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    t, ds = cfg.trainer, cfg.deepspeed
    zero: dict = {"stage": ds.stage, "overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # export consolidates from shards instead
    config = {
        # DeepSpeed counts every rank as a data-parallel replica (its ZeRO group is the whole world); an SP group
        # of N ranks trains one row, which DeepSpeed then counts N times.
        "train_batch_size": t.global_batch_size * t.sequence_parallel_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": t.optim.grad_clip,
        "zero_optimization": zero,
        # torch AdamW without offload (same math everywhere, no extension build); DeepSpeedCPUAdam with it
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": resolve_precision(t.precision) == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming on another world size: model + optimizer from a universal checkpoint
        config["checkpoint"] = {"load_universal": True}
    return _deep_merge(config, dict(ds.overrides))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def register_external_parameters(module: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's partitioned parameters when the module is CALLED; parameters read without a
    call must be registered with the module that reads them. The objective reads the LM head weight directly
    (the loss never builds full-vocabulary logits), and Qwen3.5's delta-net reads its causal conv's weight
    without calling the conv (`external_parameters()` of such a layer)."""
    import deepspeed

    deepspeed.zero.register_external_parameter(module, module.vlm.lm_head.weight)
    for sub in module.vlm.modules():
        for param in getattr(sub, "external_parameters", lambda: [])():
            deepspeed.zero.register_external_parameter(sub, param)


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (decay on matrices, none on norms/biases), with trainer.optim's LR, betas, eps.

    With `deepspeed.offload_optimizer` the ZeRO optimizer keeps the fp32 master weights and moments in CPU memory
    and runs the update there: DeepSpeed then requires its own CPU Adam (a C++ op built on first use, vectorised
    over the host's cores), used in AdamW mode (decoupled weight decay, the same update rule as torch's AdamW).
    Same groups, same hyperparameters, same schedule; only where the update runs differs.
    """
    o = cfg.trainer.optim
    groups = param_groups(module, o.weight_decay)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, adamw_mode=True
        )
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def build_engine(module: torch.nn.Module, cfg: TrainConfig, world_size: int, load_universal: bool = False):
    """DeepSpeed engine over `module` (the objective: `module.vlm` is the model) with AdamW (`make_optimizer`) and cosine-to-min-LR schedule; under ZeRO-3 its externally read parameters are registered."""
    import deepspeed
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if cfg.deepspeed.stage == 3:
        register_external_parameters(module)

    o = cfg.trainer.optim
    optimizer = make_optimizer(module, cfg)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.trainer.max_steps, min_lr=o.min_lr
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, load_universal),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler
