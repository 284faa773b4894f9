"""`parallelize(model, cfg, dist)`: what makes one single-device model a training one, applied in one place.

    model = build_model(cfg.model, ...)
    install(model, encoding, ...)                  # the encoding: architecture, single-device
    plan = parallelize(model, cfg, dist)           # freeze -> adapters -> checkpointing -> compile -> SP -> objective
    engine = build_engine(plan.objective, cfg, ...)  # DeepSpeed ZeRO (data parallelism), outside the model

Each technique lives in its own module of this package and is applied to the model from outside, as torchtitan
applies TP -> AC -> compile -> FSDP in its `parallelize`; the order below is the one that works, and why is said
at each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from mmrope.distributed.adapters import AdapterSummary, apply_adapter
from mmrope.distributed.compile import compile_decoder
from mmrope.distributed.objective import SequenceParallelObjective
from mmrope.distributed.recompute import apply_activation_checkpointing
from mmrope.distributed.sequence_parallel import apply_sequence_parallel
from mmrope.model.freeze import apply_freeze, group_counts
from mmrope.model.objective import SFTObjective

if TYPE_CHECKING:
    from mmrope.train.config import TrainConfig
    from mmrope.train.engine import Dist


@dataclass
class Parallelized:
    """The objective to hand to the engine, and what each step did (for the run's header)."""

    objective: SFTObjective
    param_counts: dict[str, dict[str, int]]  # per freeze group: trainable / frozen parameters
    checkpointed: list[int]  # LLM decoder layers that recompute their activations
    compiled: list[str]  # modules under the text model that model.compile compiled
    adapter: AdapterSummary | None  # adapter=lora|qlora: what PEFT adapted (None for adapter=none)


def parallelize(model: nn.Module, cfg: TrainConfig, dist: Dist) -> Parallelized:
    """Apply freeze -> adapters -> activation checkpointing -> compile -> sequence parallelism -> objective to `model` (an
    installed VLM, `mmrope.model.install`), in place; returns the objective the engine wraps.

    `dist.sp` is this rank's sequence-parallel group (None without SP); `dist.dp_size` the number of rows trained
    at once (data-parallel replicas).
    """
    m = cfg.model
    # 1. Freeze first: requires_grad decides what every later step does. A frozen module records no graph, so
    #    checkpointing has nothing to store or recompute there, and the engine's optimizer groups take only
    #    trainable parameters.
    adapted = cfg.adapter.name != "none"
    param_counts = apply_freeze(model, m.freeze, adapter=adapted)
    # 1b. Adapters (PEFT LoRA) right after the freeze: they take the adapted modules' base weights out of training
    #    and add their own trainable ones, so the counts are read again. Before checkpointing and compile, which
    #    must see the final modules (PEFT swaps each adapted Linear for a LoRA layer around it); seeded, so every
    #    rank starts from the same adapters.
    adapter = apply_adapter(model, cfg.adapter, seed=cfg.trainer.seed)
    if adapter is not None:
        param_counts = group_counts(model)
    # 2. Activation checkpointing before compile (torchtitan's AC -> compile): the checkpoint boundary is the
    #    whole decoder layer (transformers' GradientCheckpointingLayer call) and must exist before compile swaps
    #    the layers' inner parts (norms, the SwiGLU product) for compiled kernels; the recomputation then replays
    #    the same compiled kernels, and no compiled region ever contains a checkpoint boundary.
    checkpointed = apply_activation_checkpointing(
        model, m.activation_checkpointing, m.activation_checkpointing_every, m.activation_checkpointing_layers
    )
    # 3. Compile the memory-bound parts of each layer (never attention, never submodule calls, so ZeRO-3's
    #    gathering hooks stay eager); it needs the final module tree, hence after install and checkpointing.
    compiled = compile_decoder(model) if m.compile else []
    # 4. Sequence parallelism wraps each attention layer's single-device attention function with Ulysses'
    #    all-to-alls. It touches only the attention call, never a compiled region, so it composes with 2 and 3
    #    in either order; after them so the layers it wraps are the final ones.
    if dist.sp is not None:
        apply_sequence_parallel(model, dist.sp)
    # 5. The objective last: it owns the whole step (vision tower, merge, decoder, loss) over the row, or, under
    #    SP, over this rank's slice of the merged row, so it must see the model as every step above left it. It
    #    is the module the DeepSpeed engine wraps (ZeRO's data parallelism and its parameter registration follow
    #    in `mmrope.train.engine.build_engine`).
    loss = {"loss_backend": cfg.loss.backend, "loss_chunk_size": cfg.loss.chunk_size}
    balance_vision = dist.dp_size > 1  # data-parallel ranks must run the vision tower equally often
    if dist.sp is not None:
        objective = SequenceParallelObjective(model, dist.sp, balance_vision=balance_vision, **loss)
    else:
        objective = SFTObjective(model, balance_vision=balance_vision, **loss)
    return Parallelized(objective, param_counts, checkpointed, compiled, adapter)
