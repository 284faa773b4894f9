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

    `text_axes` says where text goes:
    - "diagonal" (default; the reference package cd413b9, spec 4.9): text at (p, p, p). Because text then also
      runs along h and w, a block must push the running position past its spatial extent too: `shift +=
      max(extent, h', w')`.
    - "temporal" (the papers: OmniGen2 sec. 2.3 "for all non-image tokens, both spatial coordinates (h, w) are set
      to zero", Mogao's IL-RoPE; the reference repository's issues 3, 4 and 5): text at (p, 0, 0). The running
      position lives on t alone, so a block advances it by its temporal extent only, `shift += (t-1)s + 1` (an
      image takes one step, as OmniGen2's one sequence id per image), and M is the t row's maximum (new tokens
      decode at (M + 1 + k, 0, 0)).

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 0 0 1 1 5 6
        w: 0 1 2 0 1 0 1 5 6
        rope_deltas: -2

    The same input with `text_axes="temporal"`::

        t (temporal): 0 1 2 3 3 3 3 4 5
        h (temporal): 0 0 0 0 0 1 1 0 0
        w (temporal): 0 0 0 0 1 0 1 0 0
        rope_deltas (temporal): -3
    """

    name = "omnirope"
    grid_dtype = torch.float32
    text_dtype = torch.float32

    def __init__(self, temporal_stride: float = 1.0, text_axes: str = "diagonal") -> None:
        if text_axes not in ("diagonal", "temporal"):
            raise ValueError(f"text_axes must be 'diagonal' or 'temporal', got {text_axes!r}")
        self.temporal_stride = temporal_stride
        self.text_axes = text_axes

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
        if self.text_axes == "temporal":
            return pos_3N, shift + extent
        return pos_3N, shift + max(extent, blk.num_h, blk.num_w)

    def row_max(self, pos_3n: Tensor, next_cur: float) -> float:
        if self.text_axes == "temporal":  # the running position is the t row; h/w hold local block indices
            return pos_3n[0].max().item()
        return super().row_max(pos_3n, next_cur)


class ILRoPEPositions(OmniRoPEPositions):
    """IL-RoPE positions (spec 4.10): the OmniRoPE position function (spatial reset always on; the `spatial_reset`
    hyperparameter exists only for API clarity and must be True). Defaults `temporal_stride=1.0`,
    `text_axes="diagonal"` (the reference package); `text_axes="temporal"` puts text at (p, 0, 0) as Mogao's
    IL-RoPE does (see `OmniRoPEPositions`).

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 0 0 1 1 5 6
        w: 0 1 2 0 1 0 1 5 6
        rope_deltas: -2
    """

    name = "ilrope"
