"""Shared skeleton of every position design (spec section 2).

A position design maps a token stream with visual blocks to 3-axis (t, h, w) position ids. The skeleton does
everything the designs share and each design only says how a visual block is laid out and where text resumes:

- grid path vs text-only path (spec 2.2): the grid path runs when `image_grid_thw` or `video_grid_thw` is given;
- padding of any side (and holes): each row is computed on its unpadded tokens and scattered back; pads get 1;
- block discovery from token ids: a block is a run of placeholders whose grid comes from a counter shared across
  the batch (and across the samples of a packed row), in order of appearance;
- layouts: "qwen3" splits every video grid [T, H, W] into T per-frame grids [1, H, W] (each frame is its own
  `<ts> VS frame VE` block); "qwen2_5" keeps one contiguous block per video and gives the design a temporal step
  of `second_per_grid_t * tokens_per_second` for it (spec 5.1, without HF's int cast); "qwen2" (Qwen2-VL) keeps
  one contiguous block per video with a temporal step of 1 per temporal patch (no absolute time);
- rope_deltas = M + 1 - L with L the padded length, so decoding at `cache_position + delta` continues every row
  (left or right padded) right after its own maximum M (spec 2.5, fix 6.7).

Designs compute in float32 exactly like the reference (op order included) and the skeleton casts to the design's
dtype at the end (int64 designs truncate toward zero, spec 2.6). Integer-valued positions are exact below 2**24.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..tokens import TokenIds

LAYOUTS = ("qwen3", "qwen2_5", "qwen2")


def f32(x: float) -> float:
    """Round a Python float to float32, i.e. the value a float32 tensor op would store."""
    return torch.tensor(x, dtype=torch.float32).item()


@functools.lru_cache(maxsize=1024)
def grid_indices(num_t: int, num_h: int, num_w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 (ti, hi, wi) of the N = t*h*w tokens of a block, t-major then h then w. Cached: never mutate."""
    shape = (num_t, num_h, num_w)
    ti = torch.arange(num_t, dtype=torch.float32).view(-1, 1, 1).expand(shape).reshape(-1)
    hi = torch.arange(num_h, dtype=torch.float32).view(1, -1, 1).expand(shape).reshape(-1)
    wi = torch.arange(num_w, dtype=torch.float32).view(1, 1, -1).expand(shape).reshape(-1)
    return ti, hi, wi


@dataclass(frozen=True)
class Block:
    """One visual block of an unpadded row, in LLM-grid units (after the spatial merge)."""

    is_video: bool
    num_t: int
    num_h: int
    num_w: int
    layout: str
    # Layout "qwen2_5", videos only: second_per_grid_t * tokens_per_second (float32 product). None otherwise.
    time_step: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_t * self.num_h * self.num_w


class PositionDesign:
    """Base class of the position designs. Subclasses implement `block` (and maybe `row_max`, `start`).

    Contract of `block(cur, text_len, blk, generator)`: the text run before the block got positions
    `cur + 0 .. cur + text_len - 1` (float32, all rows equal); return the block's float32 positions [3, N] and the
    start `cur` of the next text run.
    """

    name = "base"
    grid_dtype: torch.dtype = torch.float32  # positions dtype on the grid path (spec 2.6)
    text_dtype: torch.dtype = torch.int64  # positions dtype on the text-only path (spec 2.2)
    is_1d = False
    # Where text tokens sit: "diagonal" (spec 2.3: t = h = w = p) or "temporal" ((p, 0, 0): ILRoPE / OmniRoPE
    # as their papers describe them, an option of those designs).
    text_axes = "diagonal"

    def text_run(self, cur: float, length: int) -> Tensor:
        """Float32 positions [3, length] of a text run starting at `cur`: p = cur, cur + 1, ... on every row
        ("diagonal"), or on the t row with h = w = 0 ("temporal")."""
        run = torch.arange(length, dtype=torch.float32) + cur
        if self.text_axes == "temporal":
            return torch.stack([run, torch.zeros_like(run), torch.zeros_like(run)])
        return run.expand(3, length)

    def deltas_dtype(self, layout: str) -> torch.dtype:
        return self.grid_dtype

    def start(self) -> float:
        return 0.0

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        raise NotImplementedError

    def row_max(self, pos_3n: Tensor, next_cur: float) -> float:
        """M of a row (spec: per design; default the max over all three rows)."""
        return pos_3n.max().item()

    def temporal_step(self, blk: Block, default: float) -> float:
        """Temporal stride of a block: the design's own stride, or the absolute-time step of a qwen2_5 video."""
        return default if blk.time_step is None else blk.time_step


# ----------------------------------------------------------------------------------------------------------------
# grids


def _grid_rows(grid: Any, key: str) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    rows = grid.tolist() if isinstance(grid, Tensor) else [list(r) for r in grid]
    if any(len(r) != 3 for r in rows):
        raise ValueError(f"{key} must have shape [num, 3] (t, h, w), got {rows}")
    if any(int(v) < 1 for r in rows for v in r):
        raise ValueError(f"{key} entries must be positive, got {rows}")
    return [(int(t), int(h), int(w)) for t, h, w in rows]


class GridCursor:
    """Image/video grid rows consumed in order across the rows of a batch (or the samples of a packed row)."""

    def __init__(
        self,
        image_grid_thw: Any,
        video_grid_thw: Any,
        second_per_grid_ts: Any,
        *,
        layout: str,
        tokens_per_second: float,
        spatial_merge_size: int,
    ) -> None:
        m = spatial_merge_size
        self.images = [
            Block(False, t, h // m, w // m, layout)
            for t, h, w in _grid_rows(image_grid_thw, "image_grid_thw")
        ]
        videos = _grid_rows(video_grid_thw, "video_grid_thw")
        if layout == "qwen2":
            # Qwen2-VL (transformers 4.57.1): one contiguous block per video, one temporal step per temporal
            # patch whatever the frame rate (no absolute time).
            self.videos = [Block(True, t, h // m, w // m, layout, time_step=1.0) for t, h, w in videos]
        elif layout == "qwen3":
            # Spec 2.1: [T, H, W] -> T rows [1, H, W]; the caller's tensor is not touched.
            self.videos = [Block(True, 1, h // m, w // m, layout) for t, h, w in videos for _ in range(t)]
        else:
            if second_per_grid_ts is None:
                seconds = [1.0] * len(videos)  # transformers' default when the processor gives none
            else:
                seconds = [
                    float(s)
                    for s in (
                        second_per_grid_ts.tolist()
                        if isinstance(second_per_grid_ts, Tensor)
                        else second_per_grid_ts
                    )
                ]
                if len(seconds) < len(videos):
                    raise ValueError(
                        f"second_per_grid_ts has {len(seconds)} entries but video_grid_thw has {len(videos)} rows"
                    )
            self.videos = [
                Block(True, t, h // m, w // m, layout, time_step=f32(f32(sec) * f32(tokens_per_second)))
                for (t, h, w), sec in zip(videos, seconds)
            ]
        self.image_index = 0
        self.video_index = 0

    def take(self, is_video: bool) -> Block:
        grids, index, key = (
            (self.videos, self.video_index, "video_grid_thw")
            if is_video
            else (self.images, self.image_index, "image_grid_thw")
        )
        if index >= len(grids):
            raise ValueError(
                f"{key}: input_ids contain more {'video' if is_video else 'image'} blocks than grid rows"
            )
        if is_video:
            self.video_index += 1
        else:
            self.image_index += 1
        return grids[index]

    def check_consumed(self) -> None:
        if self.image_index != len(self.images):
            raise ValueError(
                f"image_grid_thw has {len(self.images)} rows but {self.image_index} image blocks were found"
            )
        if self.video_index != len(self.videos):
            raise ValueError(
                f"video_grid_thw describes {len(self.videos)} blocks but {self.video_index} video blocks were found"
            )


def find_blocks(ids_n: Tensor, tokens: TokenIds, cursor: GridCursor) -> list[tuple[int, Block]]:
    """Blocks of an unpadded row as (index of first placeholder, block), left to right (spec 2.2).

    The number of blocks is the number of VS tokens immediately followed by an image/video placeholder; block k
    starts at the first placeholder at or after the end of block k-1 (image or video, whichever comes first) and
    spans its grid's N tokens. Unlike the reference, a grid that does not cover exactly one run of placeholders
    raises ValueError instead of silently mis-positioning the row, and a VS as very last token is just text.
    """
    n = ids_n.numel()
    if n < 2:
        return []
    heads = ids_n[:-1] == tokens.vision_start_token_id
    num_images = int((heads & (ids_n[1:] == tokens.image_token_id)).sum())
    num_videos = int((heads & (ids_n[1:] == tokens.video_token_id)).sum())
    if num_images + num_videos == 0:
        return []
    image_at = torch.nonzero(ids_n == tokens.image_token_id).flatten().tolist()
    video_at = torch.nonzero(ids_n == tokens.video_token_id).flatten().tolist()
    blocks: list[tuple[int, Block]] = []
    st = 0
    for _ in range(num_images + num_videos):
        i_img = bisect.bisect_left(image_at, st)
        i_vid = bisect.bisect_left(video_at, st)
        ed_img = image_at[i_img] if num_images > 0 and i_img < len(image_at) else n + 1
        ed_vid = video_at[i_vid] if num_videos > 0 and i_vid < len(video_at) else n + 1
        if ed_img == ed_vid:  # both n + 1
            raise ValueError(f"input_ids: a vision_start at or after token {st} has no placeholder run left")
        is_video = ed_vid < ed_img
        blk = cursor.take(is_video)
        ed, at, i = (ed_vid, video_at, i_vid) if is_video else (ed_img, image_at, i_img)
        last = i + blk.num_tokens - 1
        # The N placeholders from `ed` must be consecutive and followed by a non-placeholder.
        if (
            last >= len(at)
            or at[last] != ed + blk.num_tokens - 1
            or (last + 1 < len(at) and at[last + 1] == ed + blk.num_tokens)
        ):
            key = "video_grid_thw" if is_video else "image_grid_thw"
            raise ValueError(
                f"{key}: grid (t={blk.num_t}, h'={blk.num_h}, w'={blk.num_w}) = {blk.num_tokens} tokens does not match "
                f"the placeholder run at token {ed} (layout={blk.layout!r}; qwen3 expects per-frame VS..VE video blocks, "
                "qwen2/qwen2_5 one contiguous block per video)"
            )
        if is_video:
            num_videos -= 1
        else:
            num_images -= 1
        blocks.append((ed, blk))
        st = ed + blk.num_tokens
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# rows, batches, packed rows, decoding


def row_positions(
    design: PositionDesign,
    ids_n: Tensor,
    cursor: GridCursor,
    tokens: TokenIds,
    generator: torch.Generator | None,
) -> tuple[Tensor, float]:
    """Float32 positions [3, n] of one unpadded row (or one packed sample) and its M."""
    n = ids_n.numel()
    pos_3n = torch.empty(3, n, dtype=torch.float32)
    cur = design.start()
    st = 0
    for ed, blk in find_blocks(ids_n, tokens, cursor):
        text_len = ed - st
        if text_len:
            pos_3n[:, st:ed] = design.text_run(cur, text_len)
        blk_pos_3N, cur = design.block(cur, text_len, blk, generator)
        pos_3n[:, ed : ed + blk.num_tokens] = blk_pos_3N
        st = ed + blk.num_tokens
    if st < n:
        pos_3n[:, st:] = design.text_run(cur, n - st)
        cur = cur + (n - st)
    if n == 0:
        return pos_3n, -1.0
    return pos_3n, design.row_max(pos_3n, cur)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def text_only_positions(
    design: PositionDesign, input_ids_BL: Tensor, attention_mask_BL: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Spec 2.2 text-only path: cumsum(mask) - 1 with pads = 1 (or arange), on 3 identical rows.

    M is taken over valid tokens only (the reference's max also sees the pads' 1, which shifts decoding by one for a
    row with a single valid token; fix 6.7). Identical to the reference for every row with >= 2 valid tokens.
    """
    num_rows, length = input_ids_BL.shape
    if attention_mask_BL is None:
        pos_BL = torch.arange(length, dtype=torch.int64).expand(num_rows, length)
        deltas_B1 = torch.zeros(num_rows, 1, dtype=torch.int64)
    else:
        valid_BL = attention_mask_BL.bool()
        pos_BL = valid_BL.long().cumsum(-1) - 1
        pos_BL = pos_BL.masked_fill(~valid_BL, 1)
        max_B1 = pos_BL.masked_fill(~valid_BL, -1).max(-1, keepdim=True).values
        deltas_B1 = max_B1 + 1 - length
    pos_3BL = pos_BL.unsqueeze(0).expand(3, num_rows, length).to(design.text_dtype).contiguous()
    if design.text_axes == "temporal":  # (p, 0, 0); pads keep 1 on every row
        pads_BL = torch.zeros_like(pos_BL, dtype=torch.bool) if attention_mask_BL is None else ~valid_BL
        pos_3BL[1:] = pads_BL.to(design.text_dtype)
    return pos_3BL, deltas_B1.to(design.text_dtype)


def batch_positions(
    design: PositionDesign,
    input_ids_BL: Tensor,
    *,
    tokens: TokenIds,
    image_grid_thw: Any,
    video_grid_thw: Any,
    attention_mask_BL: Tensor | None,
    second_per_grid_ts: Any,
    layout: str,
    tokens_per_second: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """(pos_3BL, rope_deltas_B1) of a (padded) batch; see the module docstring."""
    _check_layout(layout)
    if input_ids_BL.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids_BL.shape)}")
    if attention_mask_BL is not None and attention_mask_BL.shape != input_ids_BL.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask_BL.shape)} != input_ids shape {tuple(input_ids_BL.shape)}"
        )
    device = input_ids_BL.device
    ids_BL = input_ids_BL.cpu()
    mask_BL = None if attention_mask_BL is None else attention_mask_BL.cpu().bool()
    if image_grid_thw is None and video_grid_thw is None:
        pos_3BL, deltas_B1 = text_only_positions(design, ids_BL, mask_BL)
        return pos_3BL.to(device), deltas_B1.to(device)

    cursor = GridCursor(
        image_grid_thw,
        video_grid_thw,
        second_per_grid_ts,
        layout=layout,
        tokens_per_second=tokens_per_second,
        spatial_merge_size=tokens.spatial_merge_size,
    )
    num_rows, length = ids_BL.shape
    pos_3BL = torch.ones(3, num_rows, length, dtype=torch.float32)  # pads stay 1
    maxes = []
    for b in range(num_rows):
        keep_L = None if mask_BL is None else mask_BL[b]
        ids_n = ids_BL[b] if keep_L is None else ids_BL[b][keep_L]
        pos_3n, row_max = row_positions(design, ids_n, cursor, tokens, generator)
        if keep_L is None:
            pos_3BL[:, b] = pos_3n
        else:
            pos_3BL[:, b, keep_L] = pos_3n
        maxes.append(row_max)
    cursor.check_consumed()
    # float32 like the reference's `max + 1 - L`, then the design's dtype (spec 2.6).
    deltas_B1 = (torch.tensor(maxes, dtype=torch.float32).view(num_rows, 1) + 1) - length
    return pos_3BL.to(design.grid_dtype).to(device), deltas_B1.to(design.deltas_dtype(layout)).to(device)


def packed_positions(
    design: PositionDesign,
    input_ids_L: Tensor,
    cu_seqlens: Tensor | Sequence[int],
    *,
    tokens: TokenIds,
    image_grid_thw: Any,
    video_grid_thw: Any,
    second_per_grid_ts: Any,
    layout: str,
    tokens_per_second: float,
    generator: torch.Generator | None,
) -> Tensor:
    """pos_3L of a packed row: every sample [cu[i], cu[i+1]) computed alone (restarting at 0), grids consumed in
    order across samples. Tokens after cu[-1] (tail padding) get 1."""
    _check_layout(layout)
    if input_ids_L.dim() != 1:
        raise ValueError(f"input_ids must be [L] for a packed row, got shape {tuple(input_ids_L.shape)}")
    device = input_ids_L.device
    ids_L = input_ids_L.cpu()
    bounds = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    length = ids_L.numel()
    if not bounds or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds)) or bounds[-1] > length:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end <= {length}, got {bounds}")
    text_only = image_grid_thw is None and video_grid_thw is None
    pos_3L = torch.ones(3, length, dtype=torch.float32)
    cursor = GridCursor(
        image_grid_thw,
        video_grid_thw,
        second_per_grid_ts,
        layout=layout,
        tokens_per_second=tokens_per_second,
        spatial_merge_size=tokens.spatial_merge_size,
    )
    for start, end in zip(bounds[:-1], bounds[1:]):
        if text_only:
            pos_3L[:, start:end] = design.text_run(0.0, end - start)
        else:
            pos_3L[:, start:end], _ = row_positions(design, ids_L[start:end], cursor, tokens, generator)
    cursor.check_consumed()
    return pos_3L.to(design.text_dtype if text_only else design.grid_dtype).to(device)


def decode_positions(design: PositionDesign, rope_deltas_B1: Tensor, cache_position: Tensor) -> Tensor:
    """pos_3BN = cache_position + delta on all three axes (spec 2.5, the 4.57.1 convention); on the t axis only,
    h = w = 0, for a design whose text is "temporal" (new tokens are text).

    `cache_position` is [N] (shared by the batch) or [B, N]. Integer designs truncate toward zero like their
    full-sequence positions, so decoded ids equal what a full forward over prompt + new tokens would assign;
    after a text-only prompt with integer deltas the ids are int64 as well (the text-only path's dtype).
    """
    cache_BN = cache_position.unsqueeze(0) if cache_position.dim() == 1 else cache_position
    pos_BN = cache_BN + rope_deltas_B1.to(cache_BN.device)
    # int64 for integer designs (truncating fractional mrope-family deltas) and after an integer text-only prompt
    integer = design.grid_dtype == torch.int64 or not rope_deltas_B1.is_floating_point()
    pos_BN = pos_BN.to(torch.int64) if integer else pos_BN.to(torch.float32)
    pos_3BN = pos_BN.unsqueeze(0).expand(3, *pos_BN.shape).contiguous()
    if design.text_axes == "temporal":
        pos_3BN[1:] = 0
    return pos_3BN
