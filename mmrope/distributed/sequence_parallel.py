"""Ulysses sequence parallelism: one packed row trained by N ranks, each holding L/N of its tokens.

    sp = SequenceParallel(group, size=N, rank=r)            # built by mmrope.train.engine.init_sequence_parallel
    apply_sequence_parallel(model, sp)                      # every attention layer's `attend` -> UlyssesAttention
    objective = SequenceParallelObjective(model, sp)        # splits the merged row after the vision tower

Both are applied by `mmrope.distributed.parallelize.parallelize`; the model code itself stays single-device.

The way of a row through an SP group of N ranks (every rank holds the same packed row):
- each rank runs the vision tower (ViT + connector) on a contiguous, patch-balanced share of the row's images
  and videos, and one autograd-aware all-gather gives every rank the whole row's features in row order
  (`mmrope.distributed.vision_split`); the connector's gradient for an image comes back, summed over the group's
  tokens, to the rank that encoded it, and the data-parallel reduction sums the ranks' gradients;
- the merged sequence (embeddings with the vision features scattered in, shifted labels, the 3 position rows,
  DIPE's static positions) is padded to a multiple of N (the pad is a sample of its own) and each rank keeps
  the contiguous slice `[r * L/N, (r + 1) * L/N)`; sample boundaries (`cu_seqlens`) and DIPE's modality mask
  stay whole, so attention never crosses samples (`mmrope.distributed.objective`);
- in every attention layer q/k are rotated LOCALLY with the slice's own positions over all heads (so per-head
  tables, MHRoPE's, and GRAPE's learned planes need no slicing), then `UlyssesAttention` wraps the layer's
  single-device attention function as DeepSpeed's `DistributedAttention` does: an all-to-all turns
  `[B, L/N, H, D]` into `[B, L, H/N, D]` (whole sequence, H/N heads), the local attention runs unchanged with
  the global boundaries, and the output goes back the same way. KV heads fewer than N are repeated to N first
  (N a multiple of them), so every rank holds the KV heads of its query heads.

Gradients: each rank's loss is its slice's token-loss sum over the step's global supervised tokens, so the sum
of all ranks' gradients is the gradient of the whole row; the trainer multiplies by the world size to undo
ZeRO's mean over all ranks (the ZeRO group is every rank: SP ranks hold different activations, not different
parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmrope.model.attention_layer import PROBE_KWARG, MMRopeAttention
from mmrope.model.families import text_geometry
from mmrope.model.install import text_model


@dataclass(frozen=True)
class SequenceParallel:
    """An SP group: `size` ranks splitting one row; this process is `rank` within it (0-based)."""

    group: Any  # a torch.distributed ProcessGroup over the `size` ranks
    size: int
    rank: int

    def __post_init__(self) -> None:
        if self.size < 2 or not 0 <= self.rank < self.size:
            raise ValueError(
                f"sequence parallel: need size >= 2 and 0 <= rank < size, got {self.size}, {self.rank}"
            )

    def padded_length(self, row_len: int) -> int:
        """The row length rounded up to a multiple of the SP size (the pad is a sample of its own)."""
        return -(-row_len // self.size) * self.size

    def local_slice(self, padded_len: int) -> slice:
        shard = padded_len // self.size
        return slice(self.rank * shard, (self.rank + 1) * shard)


def check_heads(
    num_heads: int, num_kv_heads: int, size: int, key: str = "trainer.sequence_parallel_size"
) -> None:
    """Ulysses splits heads over the SP ranks: N must divide the query heads, and the KV heads must be a
    multiple of N or divide N (then they are repeated to N). Raises ValueError naming `key`."""
    if num_heads % size:
        raise ValueError(
            f"config key `{key}`: {size} must divide the model's num_attention_heads={num_heads} "
            "(Ulysses gives every rank num_attention_heads / N query heads)"
        )
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(
            f"config key `{key}`: {size} and the model's num_key_value_heads={num_kv_heads} must divide one "
            "another (KV heads are split over the ranks, or repeated to N when fewer)"
        )


def expand_kv_heads(k_BHkvLD: Tensor, size: int) -> Tensor:
    """Repeat KV heads to `size` when there are fewer (each rank then holds the KV head of its query heads)."""
    num_kv = k_BHkvLD.shape[1]
    return k_BHkvLD if num_kv % size == 0 else k_BHkvLD.repeat_interleave(size // num_kv, dim=1)


def pad_and_slice(sp: SequenceParallel, x: Tensor, dim: int, pad_value: float | int) -> Tensor:
    """Pad `x` along `dim` to the SP multiple with `pad_value`, then keep this rank's slice."""
    row_len = x.shape[dim]
    padded = sp.padded_length(row_len)
    if padded != row_len:
        shape = list(x.shape)
        shape[dim] = padded - row_len
        x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
    index = [slice(None)] * x.ndim
    index[dim] = sp.local_slice(padded)
    return x[tuple(index)]


def pad_cu_seqlens(cu_seqlens: Tensor, padded_len: int) -> Tensor:
    """Close a one-row `cu_seqlens` at `padded_len`: the pad tokens form a sample of their own."""
    if int(cu_seqlens[-1]) == padded_len:
        return cu_seqlens
    return torch.cat([cu_seqlens, cu_seqlens.new_tensor([padded_len])])


class UlyssesAttention:
    """A layer's single-device attention function `attend(q_dyn, q_sta, k, v, past_key_values, kwargs)` made
    sequence parallel, in the shape of DeepSpeed's `DistributedAttention`: all-to-all in (`[B, H, L/N, D]` per
    rank -> `[B, H/N, L, D]`), the local attention over the whole row with H/N heads (the global `cu_seqlens` and
    DIPE modality mask), all-to-all out (`[B, L, H/N, D]` -> `[B, L/N, H, D]`).

    Why not `deepspeed.sequence.layer.DistributedAttention` itself: it moves exactly three tensors (q, k, v) into
    a `local_attention(q, k, v, *args)`, and DIPE's attention takes a fourth one, the queries rotated with the
    static (anchored) positions, which must travel the same way. So this wrapper calls DeepSpeed's all-to-all
    autograd function, `_SeqAllToAll` (private, pinned with the deepspeed version), on each tensor itself; it is
    the only use of it in the project.
    """

    def __init__(self, attend: Any, sp: SequenceParallel) -> None:
        # Imported here, not at the top: DeepSpeed picks its accelerator on import, after init_distributed has
        # set DS_ACCELERATOR (mmrope.train.engine).
        from deepspeed.sequence.layer import _SeqAllToAll

        self.attend, self.sp, self._all_to_all = attend, sp, _SeqAllToAll

    def _heads_to_sequence(self, x_BHLD: Tensor) -> Tensor:
        # _SeqAllToAll(group, input, scatter_idx, gather_idx, batch_dim_idx) on [B, L/N, H, D]: scatter heads
        return self._all_to_all.apply(self.sp.group, x_BHLD.transpose(1, 2).contiguous(), 2, 1, 0).transpose(
            1, 2
        )

    def __call__(self, q_dyn, q_sta, k, v, past_key_values, kwargs: dict[str, Any]) -> Tensor:
        if past_key_values is not None or kwargs.get(PROBE_KWARG) is not None:
            raise ValueError("sequence parallelism serves training forwards: no KV cache, no probe")
        k, v = expand_kv_heads(k, self.sp.size), expand_kv_heads(v, self.sp.size)
        whole = [None if x is None else self._heads_to_sequence(x) for x in (q_dyn, q_sta, k, v)]
        out_BLHD = self.attend(*whole, None, kwargs)  # [B, L, H/N, D]: gather the heads back, scatter the row
        return self._all_to_all.apply(self.sp.group, out_BLHD.contiguous(), 1, 2, 0)


def apply_sequence_parallel(model: nn.Module, sp: SequenceParallel) -> int:
    """Wrap every installed attention layer's `attend` in `UlyssesAttention`; returns the number wrapped.

    Raises ValueError naming `trainer.sequence_parallel_size` when the heads do not split over the group or the
    model has linear-attention layers (they carry state along the row, which a slice cannot)."""
    lm = text_model(model)
    if any(not isinstance(getattr(layer, "self_attn", None), MMRopeAttention) for layer in lm.layers):
        raise ValueError(
            "config key `trainer.sequence_parallel_size`: linear-attention (gated delta-net) layers carry "
            "state along the row and cannot be split over ranks; use sequence_parallel_size=1 for this model"
        )
    check_heads(lm.config.num_attention_heads, text_geometry(lm.config).num_key_value_heads, sp.size)
    for layer in lm.layers:
        attn = layer.self_attn
        if not isinstance(attn.attend, UlyssesAttention):
            attn.attend = UlyssesAttention(attn.attend, sp)
    return len(lm.layers)
