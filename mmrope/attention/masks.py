"""Sample (document) ids, cu_seqlens and attention masks for packed rows.

Packing convention (shared by every function of `mmrope.attention`)
-------------------------------------------------------------------
A batch holds `B` rows of `L` tokens. Every token belongs to exactly one *sample*; a sample is a contiguous run
of tokens inside one row (it never crosses a row boundary). The partition is given either by

* `doc_ids_BL` (int, `[B, L]`): tokens of the same sample share an id; a new sample starts wherever the id
  changes along the row. Ids are only compared inside a row, so they may be per-row (`0, 0, 1, 1, 1, 2`) or
  global. Ids are *normalised to runs* (`normalize_doc_ids`): `[0, 0, 1, 1, 0, 0]` is three samples, exactly
  what `cu_seqlens`/flash-attn varlen can express, so every backend sees the same partition.
* `cu_seqlens` (int32, `[num_samples + 1]`): cumulative sample lengths over the flattened `B * L` tokens
  (flash-attn varlen convention), `cu_seqlens[0] == 0`, `cu_seqlens[-1] == B * L`, and every row start
  `r * L` is a boundary.
* neither: each row is one sample (plain causal attention).

**Padding is a sample like any other.** Pad tokens get their own sample id (or `cu_seqlens` entry), e.g. a
right-padded row is `doc_ids = [0, 0, 0, 1, 1]` where the 1s are pads. Real tokens then never see pads (different
sample), every token sees at least itself (so no fully-masked row, no NaN), and the pad outputs are finite junk
that the loss ignores (labels = -100). There is no separate `valid_BL` argument.
`doc_ids_from_attention_mask` turns an HF `attention_mask` into this convention.

Causality is always on the sequence index (never on RoPE positions, which are not monotone under DIPE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "causal_doc_mask",
    "cu_seqlens_from_doc_ids",
    "dipe_masks",
    "doc_ids_from_attention_mask",
    "doc_ids_from_cu_seqlens",
    "flex_block_mask",
    "normalize_doc_ids",
]


def normalize_doc_ids(doc_ids_BL: Tensor) -> Tensor:
    """Relabel sample ids as run indices per row (int64), so that only contiguous runs form a sample.

    Example: `[[7, 7, 3, 3, 7]]` -> `[[0, 0, 1, 1, 2]]`. O(L), no host sync.
    """
    if doc_ids_BL.dim() != 2:
        raise ValueError(f"doc_ids_BL must be [B, L], got shape {tuple(doc_ids_BL.shape)}")
    starts_BL = torch.zeros_like(doc_ids_BL, dtype=torch.long)
    starts_BL[:, 1:] = (doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]).long()
    return starts_BL.cumsum(dim=1)


def doc_ids_from_cu_seqlens(cu_seqlens: Tensor, seq_len: int, num_rows: int | None = None) -> Tensor:
    """Sample id of every token, `[B, L]` int64, from flash-attn style `cu_seqlens` over the flattened `B*L` tokens.

    Example: `cu_seqlens = [0, 3, 4, 8]`, `seq_len = 4` -> `[[0, 0, 0, 1], [2, 2, 2, 2]]`;
    `cu_seqlens = [0, 3, 5, 8]` is rejected (sample 1 would cross the start of row 1).

    `num_rows` avoids reading `cu_seqlens[-1]` from the device (a host sync); when `cu_seqlens` lives on the CPU
    the layout is validated (monotone, starts at 0, ends at B*L, no sample crossing a row boundary).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if num_rows is None:
        total = int(cu_seqlens[-1])
        if total % seq_len != 0:
            raise ValueError(f"cu_seqlens[-1]={total} is not a multiple of seq_len={seq_len}")
        num_rows = total // seq_len
    num_tokens = num_rows * seq_len
    if cu_seqlens.device.type == "cpu":
        _validate_cu_seqlens(cu_seqlens, seq_len, num_rows)
    token_idx = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # searchsorted(right=True) over the sample ends counts how many samples end at or before each token.
    doc_ids = torch.searchsorted(cu_seqlens[1:].contiguous(), token_idx, right=True)
    return doc_ids.long().view(num_rows, seq_len)


def _validate_cu_seqlens(cu_seqlens: Tensor, seq_len: int, num_rows: int) -> None:
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != num_rows * seq_len:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at B*L={num_rows * seq_len}, got {cu[0]}..{cu[-1]}"
        )
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (no empty samples)")
    missing_rows = sorted(set(range(0, num_rows * seq_len, seq_len)) - set(cu))
    if missing_rows:
        raise ValueError(f"cu_seqlens: a sample crosses the row start(s) {missing_rows[:4]} (L={seq_len})")


def cu_seqlens_from_doc_ids(doc_ids_BL: Tensor) -> tuple[Tensor, int]:
    """Flattened `(cu_seqlens int32, max_seqlen)` for flash-attn varlen from `doc_ids_BL` (one host sync).

    Example: `[[0, 0, 1], [5, 5, 5]]` -> `cu_seqlens = [0, 2, 3, 6]`, `max_seqlen = 3`.
    """
    num_rows, seq_len = doc_ids_BL.shape
    starts_BL = torch.ones_like(doc_ids_BL, dtype=torch.bool)  # column 0 of every row starts a sample
    starts_BL[:, 1:] = doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]
    starts = starts_BL.flatten().nonzero().flatten()
    end = torch.tensor([num_rows * seq_len], device=starts.device, dtype=starts.dtype)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, max_seqlen


def doc_ids_from_attention_mask(attention_mask_BL: Tensor) -> Tensor:
    """HF `attention_mask` (1 = real, 0 = pad) -> `doc_ids_BL` where every pad run is its own sample.

    Example: left padding `[[0, 0, 1, 1, 1]]` -> `[[0, 0, 1, 1, 1]]`; right padding `[[1, 1, 0]]` -> `[[0, 0, 1]]`.
    """
    return normalize_doc_ids(attention_mask_BL)


def causal_doc_mask(doc_ids_BL: Tensor | None, seq_len: int, device: torch.device | None = None) -> Tensor:
    """Boolean SDPA mask `[B, 1, L, L]` (`True` = may attend): causal on index AND same sample.

    With `doc_ids_BL=None` (one sample per row) this is the plain lower-triangular `[1, 1, L, L]` mask.
    Example (`doc_ids = [[0, 0, 1]]`): rows `[1,0,0], [1,1,0], [0,0,1]`.
    """
    idx = torch.arange(seq_len, device=device if doc_ids_BL is None else doc_ids_BL.device)
    causal_LL = idx[:, None] >= idx[None, :]
    if doc_ids_BL is None:
        return causal_LL[None, None]
    run_BL = normalize_doc_ids(doc_ids_BL)
    same_doc_BLL = run_BL[:, :, None] == run_BL[:, None, :]
    return (same_doc_BLL & causal_LL)[:, None]


def dipe_masks(doc_ids_BL: Tensor | None, visual_BL: Tensor) -> tuple[Tensor, Tensor]:
    """DIPE `(intra, inter)` boolean masks `[B, 1, L, L]` (spec dipe.md section 4, without the -1e7 fill).

    `allowed(i, j) = same sample AND i >= j`; `intra = allowed AND vis_i == vis_j` (text-text, visual-visual);
    `inter = allowed AND vis_i != vis_j`. The two are disjoint and their union is `allowed`. O(L^2) memory: only
    for the eager/reference paths.
    """
    allowed_B1LL = causal_doc_mask(doc_ids_BL, visual_BL.shape[1], device=visual_BL.device)
    vis_BL = visual_BL.bool()
    same_modality_B1LL = (vis_BL[:, :, None] == vis_BL[:, None, :])[:, None]
    return allowed_B1LL & same_modality_B1LL, allowed_B1LL & ~same_modality_B1LL


def flex_block_mask(
    doc_ids_BL: Tensor | None,
    seq_len: int,
    *,
    visual_BL: Tensor | None = None,
    pairs: str = "all",
    device: torch.device | str | None = None,
    block_size: int = 128,
):
    """FlexAttention `BlockMask` for causal + same-sample attention, optionally restricted by modality.

    `pairs`: `"all"` (packed causal), `"intra"` (same modality, DIPE pass A) or `"inter"` (cross modality, DIPE
    pass B; needs `visual_BL`). Memory is O(L^2 / block_size^2). Blocks with no allowed pair are skipped by the
    kernel, so a pass only pays for blocks that contain one of its pairs (spec dipe.md section 9.1).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if pairs not in ("all", "intra", "inter"):
        raise ValueError(f"pairs must be 'all', 'intra' or 'inter', got {pairs!r}")
    if pairs != "all" and visual_BL is None:
        raise ValueError(f"flex_block_mask(pairs={pairs!r}) needs visual_BL")
    if device is None:
        device = (
            doc_ids_BL.device
            if doc_ids_BL is not None
            else visual_BL.device
            if visual_BL is not None
            else "cpu"
        )
    run_BL = normalize_doc_ids(doc_ids_BL) if doc_ids_BL is not None else None
    vis_BL = visual_BL.bool() if visual_BL is not None else None
    num_rows = run_BL.shape[0] if run_BL is not None else vis_BL.shape[0] if vis_BL is not None else 1
    mask_mod = _make_mask_mod(run_BL, vis_BL, pairs)
    # Uncompiled, create_block_mask evaluates mask_mod on the dense L x L grid; compiled (CUDA) it does not.
    return create_block_mask(
        mask_mod,
        num_rows,
        None,
        seq_len,
        seq_len,
        device=device,
        BLOCK_SIZE=block_size,
        _compile=torch.device(device).type == "cuda",
    )


def _make_mask_mod(run_BL: Tensor | None, vis_BL: Tensor | None, pairs: str) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if run_BL is not None:
            keep = keep & (run_BL[b, q_idx] == run_BL[b, kv_idx])
        if pairs == "intra":
            keep = keep & (vis_BL[b, q_idx] == vis_BL[b, kv_idx])
        elif pairs == "inter":
            keep = keep & (vis_BL[b, q_idx] != vis_BL[b, kv_idx])
        return keep

    return mask_mod
