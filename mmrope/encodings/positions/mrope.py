"""The MRoPE position design (spec 4.2, 4.3 (a), 4.4 (a), 4.12 (a)) and its optional spatial reset.

Shared by `mrope` (chunked), `mrope_i` (interleaved), `mhrope` (head-wise) and `grape`; they differ only in their
defaults and in the frequency allocation, which lives in `mmrope.encodings.frequencies`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .skeleton import Block, PositionDesign, f32, grid_indices


class MRoPEPositions(PositionDesign):
    """MRoPE (Qwen2-VL style, global offsets): a block starting at `base` gets
    `t = base + ti*s`, `h = base + hi`, `w = base + wi`; the next text starts at `max(block) + 1`
    `= base + max((t-1)s, h'-1, w'-1) + 1`. M = max over all rows.

    Values as the reference computes them: float32 intermediates (running start included), stored as int64 by
    truncation toward zero (spec 2.6 / 6.5). rope_deltas are float32 when `temporal_stride` is a Python float (the
    defaults are), int64 when it is an int; so with a non-integer stride the deltas can be fractional.

    Layout "qwen2_5" follows transformers 4.57.1 `Qwen2_5_VLModel.get_rope_index` (spec 5): images get
    `t = base` on every frame (second_per_grid_t = 0 for images), a contiguous video gets
    `t = base + trunc(ti * second_per_grid_t * tokens_per_second)` with the REAL second_per_grid_t (fix 5.1: no int
    cast first), text after a video resumes after its full temporal extent, and deltas are int64. Layout "qwen2"
    follows transformers 4.57.1 `Qwen2VLModel.get_rope_index`: `t = base + ti` for images and contiguous videos
    (one step per temporal patch), text resuming after the block's full extent, int64 deltas.

    `spatial_reset=True` (spec 4.3 (a)): `h = hi`, `w = wi` are local, `t` stays global, and the token after the
    block gets `v = base + max((t-1)s, h'-1, w'-1) + 1` with text continuing at v+1, so text positions equal the
    non-reset ones. Fix 6.4: the reference hard-wires that token to be VE (it crashes when the block ends the row and
    silently gives any other token the VE slot). Here the next text run simply starts at v, whatever its first token
    is: identical values whenever the reference does not crash. When the block ends the row, M = v - 1 so that
    decoding continues at v, exactly where the VE / next text would have gone.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults `temporal_stride=2.0`)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 3 3 4 4 5 6
        w: 0 1 2 3 4 3 4 5 6
        rope_deltas: -2
    """

    name = "mrope"
    grid_dtype = torch.int64
    text_dtype = torch.int64

    def __init__(self, temporal_stride: float = 2.0, spatial_reset: bool = False) -> None:
        self.temporal_stride = temporal_stride
        self.spatial_reset = spatial_reset

    def deltas_dtype(self, layout: str) -> torch.dtype:
        if layout in ("qwen2_5", "qwen2"):  # integer ids throughout, like transformers
            return torch.int64
        return torch.float32 if isinstance(self.temporal_stride, float) else torch.int64

    def temporal_offsets(self, blk: Block) -> Tensor:
        ti, _, _ = grid_indices(blk.num_t, blk.num_h, blk.num_w)
        if blk.layout == "qwen2_5":
            step = blk.time_step if blk.is_video else 0.0
            return torch.trunc(ti * step)  # 4.57.1 casts `ti * step` to long before adding the start
        if blk.layout == "qwen2":
            return ti  # Qwen2-VL 4.57.1: t = base + ti for images and videos alike
        return ti * self.temporal_stride

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        t_off = self.temporal_offsets(blk)
        _, hi, wi = grid_indices(blk.num_t, blk.num_h, blk.num_w)
        if not self.spatial_reset:
            pos_3N = torch.stack([t_off, hi, wi]) + text_len + cur
            return pos_3N, pos_3N.max().item() + 1
        local_3N = torch.stack([t_off, hi, wi])
        # Reference order: v = (max(local) + 1 + text_len) + start, and t += (text_len + start), in float32.
        v = f32(f32(local_3N.max().item() + 1 + text_len) + cur)
        pos_3N = torch.stack([t_off + f32(text_len + cur), hi, wi])
        return pos_3N, v

    def row_max(self, pos_3n: Tensor, next_cur: float) -> float:
        row_max = pos_3n.max().item()
        if self.spatial_reset:  # a final block reserves [.., v - 1] (see class docstring)
            row_max = max(row_max, next_cur - 1)
        return row_max


class MRoPEInterleavePositions(MRoPEPositions):
    """MRoPE-I positions (spec 4.3 (a)): the MRoPE design with defaults `temporal_stride=1.0`,
    `spatial_reset=False` (= transformers 4.57.1 Qwen3-VL `get_rope_index`). The paper's recipe uses
    `spatial_reset=True`; see `MRoPEPositions` for the rule and the fix of the reference's VE assumption.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, `spatial_reset=True`)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 0 0 1 1 5 6
        w: 0 1 2 0 1 0 1 5 6
        rope_deltas: -2
    """

    name = "mrope_i"

    def __init__(self, temporal_stride: float = 1.0, spatial_reset: bool = False) -> None:
        super().__init__(temporal_stride, spatial_reset)


class MHRoPEPositions(MRoPEInterleavePositions):
    """MHRoPE positions (spec 4.4 (a)): the MRoPE-I design, `temporal_stride=1.0`, `spatial_reset=False` by default
    (inherited; the README uses True). A text token gets the same angle on every head, so text-only input equals
    vanilla RoPE on the non-NoPE heads.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 3 3 4 4 5 6
        w: 0 1 2 3 4 3 4 5 6
        rope_deltas: -2
    """

    name = "mhrope"


class GrapePositions(MRoPEPositions):
    """GRAPE positions (spec 4.12 (a)): the MRoPE design (int64 positions) with `temporal_stride=1.0`.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults)::

        t: 0 1 2 3 3 3 3 5 6
        h: 0 1 2 3 3 4 4 5 6
        w: 0 1 2 3 4 3 4 5 6
        rope_deltas: -2
    """

    name = "grape"

    def __init__(self, temporal_stride: float = 1.0) -> None:
        super().__init__(temporal_stride, spatial_reset=False)
