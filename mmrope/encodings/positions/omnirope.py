"""OmniRoPE positions (spec 4.9), also used by IL-RoPE (spec 4.10)."""

from __future__ import annotations

import torch
from torch import Tensor

from .skeleton import Block, PositionDesign, f32, grid_indices


class OmniRoPEPositions(PositionDesign):
    """OmniRoPE (OmniGen2's (shift, row, col)): a running `shift` starts at 0.0; a text run of length l gets
    `shift .. shift+l-1` and `shift` becomes last + 1; a block gets `t = shift + ti*s`, `h = hi`, `w = wi` (local),
    then `shift += max((t-1)s + 1, h', w')` (Python float arithmetic, as the reference). M = max over all rows.
    float32 on both paths. Values equal MRoPE-I with spatial_reset=True whenever every block is followed by a token;
    a block ending the row needs no special case here.
    Layout "qwen2_5": a contiguous video uses `s = second_per_grid_t * tokens_per_second`.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, default `temporal_stride=1.0`)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 0 0 1 1 5 6
        w: 0 1 2 0 1 0 1 5 6
        rope_deltas: -2
    """

    name = "omnirope"
    grid_dtype = torch.float32
    text_dtype = torch.float32

    def __init__(self, temporal_stride: float = 1.0) -> None:
        self.temporal_stride = temporal_stride

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        shift = cur
        if text_len > 0:  # reference: shift = float(last text value) + 1, the text value being float32
            shift = f32(f32(text_len - 1) + f32(cur)) + 1
        stride = self.temporal_step(blk, self.temporal_stride)
        ti, hi, wi = grid_indices(blk.num_t, blk.num_h, blk.num_w)
        pos_3N = torch.stack([ti * stride + shift, hi, wi])
        extent = (blk.num_t - 1) * stride + 1
        return pos_3N, shift + max(extent, blk.num_h, blk.num_w)


class ILRoPEPositions(OmniRoPEPositions):
    """IL-RoPE positions (spec 4.10): the OmniRoPE position function (spatial reset always on; the `spatial_reset`
    hyperparameter exists only for API clarity and must be True). Defaults `temporal_stride=1.0`.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 0 0 1 1 5 6
        w: 0 1 2 0 1 0 1 5 6
        rope_deltas: -2
    """

    name = "ilrope"
