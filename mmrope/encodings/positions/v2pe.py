"""V2PE positions: 1D with fractional visual steps (spec 4.8)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .skeleton import Block, PositionDesign


class V2PEPositions(PositionDesign):
    """V2PE: 1D positions, identical on the 3 rows. Text advances by 1; a visual block of N tokens spans
    `visual_stride` positions with `step = visual_stride / N`:
    `torch.arange(last + step, last + step*(N+1), step, dtype=float32)[:N]` (the reference's exact call, so values
    are bit-identical including the CPU kernel's float32 rounding), then `last = ceil(last visual value)` and text
    resumes at `last + 1`. M = ceil(max). float32 on both paths. The span is per block, so blocks with fewer than
    `visual_stride` tokens get steps > 1 (reproduced, spec 6.11). A contiguous qwen2_5 video is one block.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, default `visual_stride=16.0`)::

        t: 0 1 2 6 10 14 18 19 20
        h: 0 1 2 6 10 14 18 19 20
        w: 0 1 2 6 10 14 18 19 20
        rope_deltas: 12
    """

    name = "v2pe"
    grid_dtype = torch.float32
    text_dtype = torch.float32
    is_1d = True

    def __init__(self, visual_stride: float = 16.0) -> None:
        self.visual_stride = visual_stride

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        last = cur + text_len - 1  # the reference's `last_record_pos_id` (integer valued)
        num = blk.num_tokens
        step = float(self.visual_stride) / num
        pos_N = torch.arange(last + step, last + step * (num + 1), step, dtype=torch.float32)[:num]
        return pos_N.expand(3, -1), float(math.ceil(pos_N[-1].item())) + 1

    def row_max(self, pos_3n: Tensor, next_cur: float) -> float:
        return float(math.ceil(pos_3n.max().item()))
