"""Vanilla 1D positions (spec 4.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from .skeleton import Block, PositionDesign


class VanillaPositions(PositionDesign):
    """Vanilla RoPE positions: a plain 1D index over the unpadded tokens, identical on the 3 rows; visual tokens
    advance by 1 like text. Pads are 1, M = n_tok - 1, so rope_deltas = n_tok - L. int64.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens)::

        t: 0 1 2 3 4 5 6 7 8
        h: 0 1 2 3 4 5 6 7 8
        w: 0 1 2 3 4 5 6 7 8
        rope_deltas: 0
    """

    name = "vanilla"
    grid_dtype = torch.int64
    text_dtype = torch.int64
    is_1d = True

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        base = cur + text_len
        pos_N = torch.arange(blk.num_tokens, dtype=torch.float32) + base
        return pos_N.expand(3, -1), base + blk.num_tokens
