"""Exact DIPE attention (spec dipe.md sections 0, 3, 4, 9), memory-linear on the fused backends.

The function (spec section 0/4): for an allowed pair (`same sample AND j <= i`, causal on sequence index), the
logit is `scale * q_dyn_i . k_j` when `i` and `j` have the same modality (text-text, visual-visual; "intra") and
`scale * q_sta_i . k_j` when they differ (text-visual, visual-text; "inter"); all allowed pairs of a query go
through ONE softmax. `q_dyn`/`q_sta` are the query rotated with the dynamic / static (anchored) positions and `k`
is rotated with the dynamic positions: the caller rotates, this module only combines. `visual_BL` marks the
image/video placeholder tokens (vision_start/vision_end are text, spec section 1/11.1).

Deliberately NOT reproduced from the official code (spec section 10): samples are separated in training AND
eval (from `doc_ids_BL`/`cu_seqlens`, not from t-position drops), padding is a sample of its own (see
`mmrope.attention.masks`), any batch size works, masked logits are -inf (the official -1e7 fill is equivalent
because every row keeps its own key), no O(N^2) masks on the fused paths, and decoding caches keys rotated once.
The DIPE paths take no dropout argument: the official code silently runs with attention dropout 0.

Backends of `dipe_attention`:

| backend | how | memory |
|---|---|---|
| `eager` | dense `where(intra, S_dyn, S_sta)` + one softmax (spec section 4, the reference) | O(H L^2) |
| `routed` | spec 9.2: 2D-wide modality-routed q/k, ONE standard packed causal attention (`inner_backend`) | see below |
| `two_pass` | spec 9.1: intra pass (q_dyn) + inter pass (q_sta) merged by log-sum-exp; FlexAttention on CUDA, an exact dense torch fallback elsewhere | CUDA O(L), CPU O(H L^2) |

`routed` memory follows its inner packed backend: `auto`, `varlen`, `sdpa_varlen`, `flash`, `flex` and `sdpa` with
one sample per row (no mask) never build an L x L tensor; `sdpa` with several samples per row passes a `[B, 1, L, L]` boolean
mask (1 byte per pair, shared by heads); `eager` is O(H L^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrope.attention.masks import dipe_masks, doc_ids_from_cu_seqlens, flex_block_mask
from mmrope.attention.packed import _check_qkv, flex_attention_call, packed_attention, resolve_backend

__all__ = [
    "DIPE_BACKENDS",
    "dipe_attention",
    "dipe_decode_attention",
    "dipe_routed_qk",
    "merge_attention_partials",
]

DIPE_BACKENDS = ("eager", "routed", "two_pass")


def dipe_attention(
    q_dyn_BHLD: Tensor,
    q_sta_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    *,
    visual_BL: Tensor,
    doc_ids_BL: Tensor | None = None,
    scale: float,
    backend: str = "routed",
    inner_backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """Exact DIPE attention over packed rows; returns `[B, L, H, D]` (HF interface layout).

    Args:
        q_dyn_BHLD, q_sta_BHLD: the same queries rotated with dynamic / static positions, `[B, H, L, D]`.
        k_BHkvLD, v_BHkvLD: keys rotated with dynamic positions, values, `[B, H_kv, L, D]` (GQA shared by both
            query rotations: no extra KV memory).
        visual_BL: bool `[B, L]`, True at image/video placeholder tokens.
        doc_ids_BL / cu_seqlens / max_seqlen: packing, as in `mmrope.attention.masks` (padding = own sample).
        scale: softmax scale, normally `D ** -0.5` of the ORIGINAL head dim (the routed path widens q/k to 2D
            and must not fall back to a kernel's default `2D ** -0.5`).
        backend: `eager`, `routed` (default; exact on CPU and GPU) or `two_pass`.
        inner_backend: packed backend used by `routed` (`auto`, `varlen`, `sdpa`, `sdpa_varlen`, `flex`, `flash`,
            `eager`); `auto` picks torch's varlen FlashAttention on CUDA in half precision.

    Exactness: all three backends evaluate, for every query, one softmax over the same allowed key set with the
    logits of spec section 4; `routed` by construction of the routed dot product (see `dipe_routed_qk`, spec
    9.2), `two_pass` by the log-sum-exp identity (see `merge_attention_partials`, spec 9.1).
    """
    num_rows, _, seq_len, _ = _check_qkv(q_dyn_BHLD, k_BHkvLD, v_BHkvLD)
    if q_sta_BHLD.shape != q_dyn_BHLD.shape:
        raise ValueError(f"q_sta shape {tuple(q_sta_BHLD.shape)} != q_dyn shape {tuple(q_dyn_BHLD.shape)}")
    if tuple(visual_BL.shape) != (num_rows, seq_len):
        raise ValueError(f"visual_BL must be [B, L]={num_rows, seq_len}, got {tuple(visual_BL.shape)}")
    if backend not in DIPE_BACKENDS:
        raise ValueError(f"backend must be one of {DIPE_BACKENDS}, got {backend!r}")
    visual_BL = visual_BL.to(device=q_dyn_BHLD.device, dtype=torch.bool)
    if doc_ids_BL is not None:
        if tuple(doc_ids_BL.shape) != (num_rows, seq_len):
            raise ValueError(f"doc_ids_BL must be [B, L]={num_rows, seq_len}, got {tuple(doc_ids_BL.shape)}")
        doc_ids_BL = doc_ids_BL.to(q_dyn_BHLD.device)

    if backend == "routed":
        packing = {"doc_ids_BL": doc_ids_BL, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        return _routed(q_dyn_BHLD, q_sta_BHLD, k_BHkvLD, v_BHkvLD, visual_BL, scale, inner_backend, **packing)
    if doc_ids_BL is None and cu_seqlens is not None and cu_seqlens.numel() != num_rows + 1:
        doc_ids_BL = doc_ids_from_cu_seqlens(cu_seqlens, seq_len, num_rows=num_rows)
    if backend == "eager":
        return _eager(q_dyn_BHLD, q_sta_BHLD, k_BHkvLD, v_BHkvLD, visual_BL, doc_ids_BL, scale)
    if q_dyn_BHLD.device.type == "cuda":
        out_BHLD = _two_pass_flex(q_dyn_BHLD, q_sta_BHLD, k_BHkvLD, v_BHkvLD, visual_BL, doc_ids_BL, scale)
        return out_BHLD.transpose(1, 2).contiguous()
    return _two_pass_torch(q_dyn_BHLD, q_sta_BHLD, k_BHkvLD, v_BHkvLD, visual_BL, doc_ids_BL, scale)


def dipe_routed_qk(
    q_dyn_BHLD: Tensor, q_sta_BHLD: Tensor, k_BHkvLD: Tensor, visual_BL: Tensor
) -> tuple[Tensor, Tensor]:
    """Modality-routed 2D-wide query/key (spec dipe.md 9.2): `q.k` picks the dynamic or static query per pair.

    `q~_i = [q_dyn_i ; q_sta_i]` for a text query and `[q_sta_i ; q_dyn_i]` for a visual query;
    `k~_j = [k_j ; 0]` for a text key and `[0 ; k_j]` for a visual key. Then
    text.text = `q_dyn.k`, text.visual = `q_sta.k`, visual.text = `q_sta.k`, visual.visual = `q_dyn.k`: exactly
    the intra/inter rule, for every pair at once, so ONE ordinary causal packed softmax over `q~.k~` (with the
    original `scale`) is the DIPE softmax, and autograd through the concatenation/selection returns exactly
    `dq_dyn`, `dq_sta`, `dk` (the zero halves of `k~` receive no gradient path to `k`).
    Example (D = 1, q_dyn = 2, q_sta = 3, k = 5): text query vs visual key: `[2, 3] . [0, 5] = 15 = q_sta k`.
    """
    vis_B1L1 = visual_BL.bool()[:, None, :, None]
    q_route_BHL2D = torch.cat(
        [torch.where(vis_B1L1, q_sta_BHLD, q_dyn_BHLD), torch.where(vis_B1L1, q_dyn_BHLD, q_sta_BHLD)], dim=-1
    )
    zeros_BHkvLD = torch.zeros_like(k_BHkvLD)
    k_route_BHkvL2D = torch.cat(
        [torch.where(vis_B1L1, zeros_BHkvLD, k_BHkvLD), torch.where(vis_B1L1, k_BHkvLD, zeros_BHkvLD)], dim=-1
    )
    return q_route_BHL2D, k_route_BHkvL2D


def merge_attention_partials(
    out_a_XD: Tensor, lse_a_X: Tensor, out_b_XD: Tensor, lse_b_X: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge two attentions over disjoint key sets into the attention over their union (fp32 result).

    With `l_A = log sum_{j in A} e^{s_j}`, `o_A = sum_A e^{s_j - l_A} v_j` (and B alike), `l = logaddexp(l_A, l_B)`
    gives `e^{l_A - l} o_A + e^{l_B - l} o_B = sum_{A u B} e^{s_j - l} v_j`: the single softmax over `A u B`
    (spec dipe.md 9.1). Empty key sets: an LSE of `-inf` gets weight exactly 0; the `+inf` that FlashAttention-
    family kernels write for an empty row is mapped to `-inf` first; a partial output of an empty row is zeroed
    before multiplying, so `0 * NaN` cannot leak into the result or the gradients. Shapes: `out [..., D]`,
    `lse [...]` (any leading dims). Returns `(out fp32, lse fp32)`.
    """
    lse_a_X, lse_b_X = _empty_lse_to_neg_inf(lse_a_X.float()), _empty_lse_to_neg_inf(lse_b_X.float())
    nonempty_a_X, nonempty_b_X = torch.isfinite(lse_a_X), torch.isfinite(lse_b_X)
    # Rows where both sets are empty (never in DIPE: a token always sees itself) get finite dummy LSEs so that
    # logaddexp's backward stays finite; their contributions are zeroed below and their LSE reported as -inf.
    both_empty_X = ~nonempty_a_X & ~nonempty_b_X
    zeros_X = torch.zeros_like(lse_a_X)
    lse_a_X = torch.where(both_empty_X, zeros_X, lse_a_X)
    lse_b_X = torch.where(both_empty_X, zeros_X, lse_b_X)
    lse_X = torch.logaddexp(lse_a_X, lse_b_X)
    out_XD = torch.zeros_like(out_a_XD, dtype=torch.float32)
    for out_p_XD, lse_p_X, nonempty_p_X in (
        (out_a_XD, lse_a_X, nonempty_a_X),
        (out_b_XD, lse_b_X, nonempty_b_X),
    ):
        clean_XD = torch.where(nonempty_p_X[..., None], out_p_XD.float(), 0.0)  # guard 0 * NaN (fwd and bwd)
        out_XD = out_XD + torch.exp(lse_p_X - lse_X)[..., None] * clean_XD
    lse_X = torch.where(both_empty_X, float("-inf"), lse_X)
    return out_XD, lse_X


def dipe_decode_attention(
    q_dyn_BHQD: Tensor,
    q_sta_BHQD: Tensor,
    k_cache_BHkvKD: Tensor,
    v_cache_BHkvKD: Tensor,
    *,
    key_visual_BK: Tensor,
    scale: float,
    key_valid_BK: Tensor | None = None,
    query_visual_BQ: Tensor | None = None,
) -> Tensor:
    """DIPE attention of the last `Q` tokens against a KV cache of `K >= Q` keys; returns `[B, Q, H, D]`.

    The cache already contains the new tokens (HF `cache.update` returns the full K/V), so query `t` sits at key
    index `K - Q + t` and sees keys `j <= K - Q + t` (spec dipe.md 9.3). Keys are cached ONCE, rotated with their
    dynamic positions, plus one modality bit per key (`key_visual_BK`); `key_valid_BK` (False = left padding or
    an unused slot) excludes keys. Queries are text by default (generated tokens, with dynamic position
    `max+1+step` in `q_dyn` and the constant anchor of the last prompt token in `q_sta`); pass `query_visual_BQ`
    for chunked prefill of visual tokens.

    Exactness: two products `q_dyn.K^T`, `q_sta.K^T` are selected per key by "same modality as the query" and go
    through one softmax: the spec section 4 logits of the query's row restricted to the cache, i.e. the last rows
    of `dipe_attention` on the full sequence. Cost is 2 x (Q x K) logits per head, O(K) memory for small Q.
    A row with no valid key (an all-padding row) returns 0 instead of NaN.
    """
    if q_dyn_BHQD.shape != q_sta_BHQD.shape:
        raise ValueError(f"q_sta shape {tuple(q_sta_BHQD.shape)} != q_dyn shape {tuple(q_dyn_BHQD.shape)}")
    num_rows, num_heads, num_queries, head_dim = q_dyn_BHQD.shape
    num_kv_heads, num_keys = k_cache_BHkvKD.shape[1], k_cache_BHkvKD.shape[2]
    if num_queries > num_keys:
        raise ValueError(
            f"more queries ({num_queries}) than cached keys ({num_keys}); append them to the cache"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num query heads {num_heads} is not a multiple of num kv heads {num_kv_heads}")
    if tuple(key_visual_BK.shape) != (num_rows, num_keys):
        raise ValueError(
            f"key_visual_BK must be [B, K]={num_rows, num_keys}, got {tuple(key_visual_BK.shape)}"
        )
    device = q_dyn_BHQD.device
    key_vis_BK = key_visual_BK.to(device=device, dtype=torch.bool)
    if query_visual_BQ is None:
        query_vis_BQ = torch.zeros(num_rows, num_queries, dtype=torch.bool, device=device)
    else:
        query_vis_BQ = query_visual_BQ.to(device=device, dtype=torch.bool)

    query_pos_Q = torch.arange(num_keys - num_queries, num_keys, device=device)
    allowed_BQK = (torch.arange(num_keys, device=device)[None, :] <= query_pos_Q[:, None])[None]
    if key_valid_BK is not None:
        allowed_BQK = allowed_BQK & key_valid_BK.to(device=device, dtype=torch.bool)[:, None, :]
    same_modality_BQK = query_vis_BQ[:, :, None] == key_vis_BK[:, None, :]

    group = num_heads // num_kv_heads
    kT_BKv1DK = k_cache_BHkvKD[:, :, None].transpose(-1, -2)
    q_dyn_BKvGQD = q_dyn_BHQD.reshape(num_rows, num_kv_heads, group, num_queries, head_dim)
    q_sta_BKvGQD = q_sta_BHQD.reshape(num_rows, num_kv_heads, group, num_queries, head_dim)
    scores_BKvGQK = (
        torch.where(
            same_modality_BQK[:, None, None],
            torch.matmul(q_dyn_BKvGQD, kT_BKv1DK),
            torch.matmul(q_sta_BKvGQD, kT_BKv1DK),
        )
        * scale
    )
    allowed_B11QK = allowed_BQK[:, None, None]
    scores_BKvGQK = scores_BKvGQK.float().masked_fill(~allowed_B11QK, float("-inf"))
    probs_BKvGQK = torch.softmax(scores_BKvGQK, dim=-1)
    probs_BKvGQK = torch.where(allowed_B11QK.any(dim=-1, keepdim=True), probs_BKvGQK, 0.0).to(
        v_cache_BHkvKD.dtype
    )
    out_BKvGQD = torch.matmul(probs_BKvGQK, v_cache_BHkvKD[:, :, None])
    return out_BKvGQD.reshape(num_rows, num_heads, num_queries, -1).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# backends


def _eager(
    q_dyn_BHLD: Tensor,
    q_sta_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    visual_BL: Tensor,
    doc_ids_BL: Tensor | None,
    scale: float,
) -> Tensor:
    """Spec section 4 on dense masks: `S = where(intra, S_dyn, S_sta)`, -inf outside `intra | inter`, fp32 softmax."""
    num_rows, num_heads, seq_len, head_dim = q_dyn_BHLD.shape
    num_kv_heads = k_BHkvLD.shape[1]
    group = num_heads // num_kv_heads
    intra_B1LL, inter_B1LL = dipe_masks(doc_ids_BL, visual_BL)
    intra_B11LL, allowed_B11LL = intra_B1LL[:, :, None], (intra_B1LL | inter_B1LL)[:, :, None]
    kT_BKv1DL = k_BHkvLD[:, :, None].transpose(-1, -2)
    s_dyn_BKvGLL = torch.matmul(
        q_dyn_BHLD.reshape(num_rows, num_kv_heads, group, seq_len, head_dim), kT_BKv1DL
    )
    s_sta_BKvGLL = torch.matmul(
        q_sta_BHLD.reshape(num_rows, num_kv_heads, group, seq_len, head_dim), kT_BKv1DL
    )
    scores_BKvGLL = torch.where(intra_B11LL, s_dyn_BKvGLL, s_sta_BKvGLL) * scale
    scores_BKvGLL = scores_BKvGLL.masked_fill(~allowed_B11LL, float("-inf"))
    probs_BKvGLL = torch.softmax(scores_BKvGLL.float(), dim=-1).to(v_BHkvLD.dtype)
    out_BKvGLD = torch.matmul(probs_BKvGLL, v_BHkvLD[:, :, None])
    return out_BKvGLD.reshape(num_rows, num_heads, seq_len, -1).transpose(1, 2).contiguous()


def _routed(
    q_dyn_BHLD: Tensor,
    q_sta_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    visual_BL: Tensor,
    scale: float,
    inner_backend: str,
    **packing,
) -> Tensor:
    head_dim = v_BHkvLD.shape[-1]
    q_route_BHL2D, k_route_BHkvL2D = dipe_routed_qk(q_dyn_BHLD, q_sta_BHLD, k_BHkvLD, visual_BL)
    # `auto` is resolved on the routed (2D-wide) queries: with D = 128 the routed width 256 still fits the
    # FlashAttention kernels; a wider head falls back to per-sample SDPA.
    inner_backend = resolve_backend(inner_backend, q_route_BHL2D)
    # Zero-pad V to the routed width where the fused kernels need q/k/v head dims to match (FlashAttention, torch's
    # or flash-attn's; torch's CPU flash SDPA kernel, which otherwise falls back to the O(L^2) math path). The
    # padded output columns are P @ 0 = 0 and are sliced off, so this is exact; flex and eager accept a narrower V.
    if inner_backend in ("sdpa", "sdpa_varlen", "varlen", "flash"):
        v_in_BHkvLE = F.pad(v_BHkvLD, (0, q_route_BHL2D.shape[-1] - head_dim))
    else:
        v_in_BHkvLE = v_BHkvLD
    out_BLHE = packed_attention(
        q_route_BHL2D, k_route_BHkvL2D, v_in_BHkvLE, scale=scale, backend=inner_backend, **packing
    )
    return out_BLHE[..., :head_dim]


def _partial_attention_torch(
    q_XLD: Tensor, k_XLD: Tensor, v_XLD: Tensor, keep_XLL: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Dense attention restricted to `keep`, returning `(out fp32, lse fp32)`; empty rows give `(0, -inf)`.

    Every operation on an empty row is guarded (the row max is replaced by 0 and the denominator by 1 through
    `where`), so no NaN is produced in the forward pass nor in the backward pass.
    """
    scores_XLL = (torch.matmul(q_XLD, k_XLD.transpose(-1, -2)) * scale).float()
    scores_XLL = scores_XLL.masked_fill(~keep_XLL, float("-inf"))
    row_max_XL1 = scores_XLL.amax(dim=-1, keepdim=True).detach()  # the result does not depend on the shift
    nonempty_XL1 = torch.isfinite(row_max_XL1)
    row_max_XL1 = torch.where(nonempty_XL1, row_max_XL1, torch.zeros_like(row_max_XL1))
    weights_XLL = torch.exp(scores_XLL - row_max_XL1)  # exp(-inf) = 0 outside keep
    denom_XL1 = torch.where(nonempty_XL1, weights_XLL.sum(dim=-1, keepdim=True), torch.ones_like(row_max_XL1))
    out_XLD = torch.matmul(weights_XLL, v_XLD.float()) / denom_XL1
    lse_XL1 = torch.where(nonempty_XL1, row_max_XL1 + torch.log(denom_XL1), float("-inf"))
    return out_XLD, lse_XL1[..., 0]


def _two_pass_torch(
    q_dyn_BHLD: Tensor,
    q_sta_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    visual_BL: Tensor,
    doc_ids_BL: Tensor | None,
    scale: float,
) -> Tensor:
    """Spec 9.1 with dense masks (CPU fallback, O(H L^2)): pass A = q_dyn on intra, pass B = q_sta on inter."""
    num_rows, num_heads, seq_len, head_dim = q_dyn_BHLD.shape
    num_kv_heads = k_BHkvLD.shape[1]
    group = num_heads // num_kv_heads
    intra_B1LL, inter_B1LL = dipe_masks(doc_ids_BL, visual_BL)
    k_BKv1LD, v_BKv1LD = k_BHkvLD[:, :, None], v_BHkvLD[:, :, None]
    q_dyn_BKvGLD = q_dyn_BHLD.reshape(num_rows, num_kv_heads, group, seq_len, head_dim)
    q_sta_BKvGLD = q_sta_BHLD.reshape(num_rows, num_kv_heads, group, seq_len, head_dim)
    out_a, lse_a = _partial_attention_torch(q_dyn_BKvGLD, k_BKv1LD, v_BKv1LD, intra_B1LL[:, :, None], scale)
    out_b, lse_b = _partial_attention_torch(q_sta_BKvGLD, k_BKv1LD, v_BKv1LD, inter_B1LL[:, :, None], scale)
    out_BKvGLD, _ = merge_attention_partials(out_a, lse_a, out_b, lse_b)
    out_BKvGLD = out_BKvGLD.to(v_BHkvLD.dtype)
    return out_BKvGLD.reshape(num_rows, num_heads, seq_len, -1).transpose(1, 2).contiguous()


def _two_pass_flex(
    q_dyn_BHLD: Tensor,
    q_sta_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    visual_BL: Tensor,
    doc_ids_BL: Tensor | None,
    scale: float,
    *,
    compiled: bool = True,
) -> Tensor:
    """Spec 9.1 with FlexAttention block masks; returns `[B, H, L, D]`.

    Gradients flow through the returned LSE (FlexAttention's Triton backward supports dLSE), so autograd of the
    merge yields `P_ij (v_j - o_i)` with the GLOBAL normaliser, i.e. the exact joint-softmax gradient. Only
    blocks straddling a modality boundary are computed by both passes. `compiled=False` is the unfused CPU
    reference (forward only), used by tests to check masks and the empty-row LSE convention.
    """
    seq_len = q_dyn_BHLD.shape[2]
    device = q_dyn_BHLD.device
    intra_mask = flex_block_mask(doc_ids_BL, seq_len, visual_BL=visual_BL, pairs="intra", device=device)
    inter_mask = flex_block_mask(doc_ids_BL, seq_len, visual_BL=visual_BL, pairs="inter", device=device)
    out_a, lse_a = flex_attention_call(
        q_dyn_BHLD, k_BHkvLD, v_BHkvLD, intra_mask, scale, return_lse=True, compiled=compiled
    )
    out_b, lse_b = flex_attention_call(
        q_sta_BHLD, k_BHkvLD, v_BHkvLD, inter_mask, scale, return_lse=True, compiled=compiled
    )
    out_BHLD, _ = merge_attention_partials(out_a, lse_a, out_b, lse_b)
    return out_BHLD.to(v_BHkvLD.dtype)


def _empty_lse_to_neg_inf(lse: Tensor) -> Tensor:
    # FlashAttention-family kernels report an empty row as +inf; FlexAttention and the torch path as -inf.
    return torch.where(lse == float("inf"), torch.full_like(lse, float("-inf")), lse)
