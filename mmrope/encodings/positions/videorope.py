"""VideoRoPE's diagonal position design (spec 4.5) and HoPE's randomly scaled variant (spec 4.6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .skeleton import Block, PositionDesign, grid_indices


class VideoRoPEPositions(PositionDesign):
    """VideoRoPE diagonal layout (= official `get_rope_index_videorope`): a block starting at `base` gets
    `T = base + ti*s`, `h = T + hi - (h'-1)//2`, `w = T + wi - (w'-1)//2` (values can be negative or exceed the
    t row). The next text starts at `max(T of block) + 1 = base + (t-1)s + 1`, so an image advances the sequence by
    only 1. M uses the t row only. float32 on the grid path, int64 on the text-only path (spec 2.6, 6.6).

    Layout "qwen2_5": a contiguous video uses `s = second_per_grid_t * tokens_per_second` (its absolute-time step)
    instead of `temporal_stride`; images keep `temporal_stride`.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults `temporal_stride=2.0`)::

        t: 0 1 2 3 3 3 3 4 5
        h: 0 1 2 3 3 4 4 4 5
        w: 0 1 2 3 4 3 4 4 5
        rope_deltas: -3
    """

    name = "videorope"

    def __init__(self, temporal_stride: float = 2.0) -> None:
        self.temporal_stride = temporal_stride

    def block_stride(self, blk: Block, generator: torch.Generator | None) -> float:
        return self.temporal_step(blk, self.temporal_stride)

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        stride = self.block_stride(blk, generator)
        ti, hi, wi = grid_indices(blk.num_t, blk.num_h, blk.num_w)
        t_N = ti * stride + text_len + cur
        h_N = (hi - (blk.num_h - 1) // 2) + t_N
        w_N = (wi - (blk.num_w - 1) // 2) + t_N
        return torch.stack([t_N, h_N, w_N]), t_N.max().item() + 1

    def row_max(self, pos_3n: Tensor, next_cur: float) -> float:
        return pos_3n[0].max().item()


class HoPEPositions(VideoRoPEPositions):
    """HoPE positions: the VideoRoPE layout with a per-block random temporal scale (spec 4.6 (a), policy 7).

    Each visual block, in order, draws its stride from `temporal_stride_lst` with
    `torch.randint(len(lst), (1,), generator=generator)` (one draw per block, even for t=1 blocks where it cannot
    change positions; with `generator=None` torch's global RNG is used). This replaces the reference's Python
    `random.choice`: same distribution, but seeded by the caller's `torch.Generator`, so draws are reproducible and
    differ from the reference's RNG stream. `fixed_temporal_scale` (evaluation) uses that scale for every block and
    draws nothing. `temporal_stride` is unused, as in the reference. Layout "qwen2_5": a contiguous video's stride is
    `scale * second_per_grid_t * tokens_per_second`. The t row is zeroed by the HoPE frequency module, not here.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults; t=1 so the scale is moot)::

        t: 0 1 2 3 3 3 3 4 5
        h: 0 1 2 3 3 4 4 4 5
        w: 0 1 2 3 4 3 4 4 5
        rope_deltas: -3
    """

    name = "hope"

    def __init__(
        self,
        temporal_stride: float = 2.0,
        temporal_stride_lst: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5),
        fixed_temporal_scale: float | None = None,
    ) -> None:
        super().__init__(temporal_stride)
        self.temporal_stride_lst = tuple(temporal_stride_lst)
        self.fixed_temporal_scale = fixed_temporal_scale

    def block_stride(self, blk: Block, generator: torch.Generator | None) -> float:
        if self.fixed_temporal_scale is not None:
            scale = self.fixed_temporal_scale
        else:
            pick = int(torch.randint(len(self.temporal_stride_lst), (1,), generator=generator).item())
            scale = self.temporal_stride_lst[pick]
        return scale if blk.time_step is None else scale * blk.time_step
