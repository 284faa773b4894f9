"""Ulysses sequence parallelism: one packed row trained by N ranks, each holding L/N of its tokens.

    sp = SequenceParallel(group, size=N, rank=r)            # built by mmrope.train.engine.init_sequence_parallel
    install(model, encoding, sequence_parallel=sp)          # attention exchanges q/k/v over `group`
    objective = SFTObjective(model, sequence_parallel=sp)   # splits the merged row after the vision tower

The way of a row through an SP group of N ranks (every rank holds the same packed row):
- each rank runs the vision tower (ViT + connector) on a contiguous, patch-balanced share of the row's images
  and videos, and one autograd-aware all-gather gives every rank the whole row's features in row order
  (`mmrope.model.vision_split`); the connector's gradient for an image comes back, summed over the group's
  tokens, to the rank that encoded it, and the data-parallel reduction sums the ranks' gradients;
- the merged sequence (embeddings with the vision features scattered in, shifted labels, the 3 position rows,
  DIPE's static positions) is padded to a multiple of N (the pad is a sample of its own) and each rank keeps
  the contiguous slice `[r * L/N, (r + 1) * L/N)`; sample boundaries (`cu_seqlens`) and DIPE's modality mask
  stay whole, so attention never crosses samples;
- in every attention layer q/k are rotated LOCALLY with the slice's own positions over all heads (so per-head
  tables, MHRoPE's, and GRAPE's learned planes need no slicing), then DeepSpeed's Ulysses all-to-all
  (`deepspeed.sequence.layer._SeqAllToAll`, autograd included) turns `[B, L/N, H, D]` into `[B, L, H/N, D]`:
  whole sequence, H/N heads, attention runs unchanged with the global boundaries; the output goes back the
  same way. DIPE's dynamic AND static queries both travel. KV heads fewer than N are repeated to N first
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
from torch import Tensor


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

    def heads_to_sequence(self, x_BLHD: Tensor) -> Tensor:
        """`[B, L/N, H, D]` (this rank's tokens, all heads) -> `[B, L, H/N, D]` (all tokens, this rank's heads)."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x_BLHD.contiguous(), 2, 1, 0)

    def sequence_to_heads(self, x_BLHD: Tensor) -> Tensor:
        """`[B, L, H/N, D]` -> `[B, L/N, H, D]`: the inverse of `heads_to_sequence`."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x_BLHD.contiguous(), 1, 2, 0)


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
