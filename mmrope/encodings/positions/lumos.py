"""Lumos-1 MM-RoPE positions (the spec's "mmrope", spec 4.11)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .skeleton import Block, PositionDesign, grid_indices


class LumosPositions(PositionDesign):
    """MM-RoPE (Lumos-1): MRoPE with per-axis scales `position_scale = (σt, σh, σw)`: a block at `base` gets
    `t = base + ti*s*σt`, `h = base + hi*σh`, `w = base + wi*σw`; the next text starts at `max(block) + 1`.
    M = max over all rows. float32 on both paths. With σ = (4, 8, 8) and t=1 an image advances the sequence by
    `8·max(h'-1, w'-1) + 1`. Default σ = (1, 1, 1) gives MRoPE values with stride 1.
    Layout "qwen2_5": a contiguous video uses `s = second_per_grid_t * tokens_per_second`.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, `position_scale=(4, 8, 8)`)::

        t: 0 1 2 3 3 3 3 12 13
        h: 0 1 2 3 3 11 11 12 13
        w: 0 1 2 3 11 3 11 12 13
        rope_deltas: 5
    """

    name = "lumos"
    grid_dtype = torch.float32
    text_dtype = torch.float32

    def __init__(
        self, temporal_stride: float = 1.0, position_scale: Sequence[float] = (1.0, 1.0, 1.0)
    ) -> None:
        self.temporal_stride = temporal_stride
        self.position_scale = tuple(position_scale)

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        scale_t, scale_h, scale_w = self.position_scale
        stride = self.temporal_step(blk, self.temporal_stride)
        ti, hi, wi = grid_indices(blk.num_t, blk.num_h, blk.num_w)
        pos_3N = torch.stack([ti * stride * scale_t, hi * scale_h, wi * scale_w]) + text_len + cur
        return pos_3N, pos_3N.max().item() + 1
