"""DIPE static ("anchored") positions (specs/dipe.md section 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def anchored_positions(
    pos_3BL: Tensor,
    visual_mask_BL: Tensor,
    attention_mask_BL: Tensor | None = None,
    *,
    cu_seqlens: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Static positions of DIPE: every token takes the dynamic position (all 3 rows) of the FIRST token of its
    modality run, a run being a maximal stretch of valid text tokens (a "text segment": VS/VE are text) or of visual
    placeholders (a visual block). Works on the positions of any 3-axis encoding; for MRoPE a visual token gets
    (S, S, S), S = its block's first-patch position, and a text token the position of its segment's first token.

    - no visual token anywhere in the call: static = copy of the dynamic positions (dipe.md 2.1);
    - padding (attention_mask == 0, any side or holes) is skipped when forming runs; pads get 1 (dipe.md 2.2);
    - `cu_seqlens` (only for B == 1, a packed row): a sample boundary also starts a new run, so each sample is
      anchored on its own (positions restart per sample anyway).

    Example (dipe.md 2.3, MRoPE; `T×5, VS, image grid 1×4×6 -> 2×3 tokens, VE, T×6`)::

        index:  0 1 2 3 4 5 | 6 7 8 9 10 11 | 12 13 .. 18
        dyn t:  0 1 2 3 4 5 | 6 6 6 6  6  6 |  9 10 .. 15
        static: 0 0 0 0 0 0 | 6 6 6 6  6  6 |  9  9 ..  9   (all three rows)
    """
    if pos_3BL.dim() != 3 or pos_3BL.shape[0] != 3:
        raise ValueError(f"pos_3BL must be [3, B, L], got shape {tuple(pos_3BL.shape)}")
    num_rows, length = pos_3BL.shape[1:]
    if visual_mask_BL.shape != (num_rows, length):
        raise ValueError(f"visual_mask shape {tuple(visual_mask_BL.shape)} != {(num_rows, length)}")
    if attention_mask_BL is not None and attention_mask_BL.shape != (num_rows, length):
        raise ValueError(f"attention_mask shape {tuple(attention_mask_BL.shape)} != {(num_rows, length)}")
    if cu_seqlens is not None and num_rows != 1:
        raise ValueError(f"cu_seqlens is for a packed row (B == 1), got B = {num_rows}")

    valid_BL = (
        torch.ones(num_rows, length, dtype=torch.bool, device=pos_3BL.device)
        if attention_mask_BL is None
        else attention_mask_BL.to(pos_3BL.device).bool()
    )
    visual_BL = visual_mask_BL.to(pos_3BL.device).bool() & valid_BL
    static_3BL = torch.ones_like(pos_3BL)
    if not bool(visual_BL.any()):
        return torch.where(valid_BL.unsqueeze(0), pos_3BL, static_3BL)

    sample_start_L = torch.zeros(length, dtype=torch.bool, device=pos_3BL.device)
    if cu_seqlens is not None:
        starts = [int(s) for s in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)][
            :-1
        ]
        sample_start_L[[s for s in starts if s < length]] = True

    for b in range(num_rows):
        keep_n = torch.nonzero(valid_BL[b]).flatten()
        if keep_n.numel() == 0:
            continue
        visual_n = visual_BL[b, keep_n]
        # a run starts at the first valid token, at a modality change, or at a packed-sample boundary
        run_start_n = torch.ones_like(visual_n)
        run_start_n[1:] = visual_n[1:] != visual_n[:-1]
        run_start_n |= sample_start_L[keep_n]
        k_n = torch.arange(keep_n.numel(), device=pos_3BL.device)
        first_n = torch.cummax(torch.where(run_start_n, k_n, torch.zeros_like(k_n)), dim=0).values
        static_3BL[:, b, keep_n] = pos_3BL[:, b, keep_n[first_n]]
    return static_3BL
