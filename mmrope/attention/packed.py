"""Packing-aware causal attention with interchangeable backends (pure torch; flash-attn optional).

Layout: HF inputs `q_BHLD [B, H, L, D]`, `k_BHkvLD`/`v_BHkvLD [B, H_kv, L, D]` (GQA: query head `i` uses KV head
`i // (H // H_kv)`); the output is `[B, L, H, D_v]`, i.e. already transposed the way HF's attention interface
returns it (the caller reshapes to `[B, L, H * D_v]`). Packing follows `mmrope.attention.masks` (sample ids or
`cu_seqlens`; padding is its own sample; causal on sequence index).

Backends (all compute the same function: a softmax over the keys `j <= i` of the query's own sample):

| backend | device | how | extra memory |
|---|---|---|---|
| `auto` | any | `varlen` on CUDA in bf16/fp16 (head dim <= 256, no dropout), else `sdpa_varlen` | O(L) |
| `eager` | any | explicit scores, boolean mask, fp32 softmax (the reference) | O(H L^2) |
| `sdpa` | any | `F.scaled_dot_product_attention` with a `[B, 1, L, L]` boolean block-diagonal causal mask; `is_causal=True` (no mask) when each row is one sample | O(L^2) bool mask |
| `sdpa_varlen` | any | one `is_causal` SDPA call per sample (host-side loop over `cu_seqlens`, one sync) | O(L) |
| `varlen` | CUDA | torch's own varlen FlashAttention (`torch.nn.attention.varlen`, torch >= 2.10): nothing to compile | O(L) |
| `flex` | CUDA | compiled FlexAttention with a `BlockMask` from the sample ids | O(L^2 / 128^2) |
| `flash` | CUDA | the flash-attn package's `flash_attn_varlen_func(causal=True)` on the flattened tokens | O(L) |

`varlen`, `flex` and `flash` raise `ValueError` on CPU tensors (FlashAttention kernels are CUDA only; FlexAttention
has no CPU backward): there is no silent fallback when a backend is named. `auto` is the one that chooses, per call,
from the tensors it gets, and never picks a backend that builds an L x L mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrope.attention.kernels import torch_varlen, torch_varlen_attention
from mmrope.attention.masks import (
    causal_doc_mask,
    cu_seqlens_from_doc_ids,
    doc_ids_from_cu_seqlens,
    flex_block_mask,
)

__all__ = ["PACKED_BACKENDS", "packed_attention", "resolve_backend", "segment_attention"]

PACKED_BACKENDS = ("auto", "eager", "sdpa", "sdpa_varlen", "varlen", "flex", "flash")
FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2 kernels (torch's and flash-attn's) take head dims up to 256


def resolve_backend(backend: str, q_BHLD: Tensor, *, dropout_p: float = 0.0) -> str:
    """The concrete backend `auto` stands for with these queries; any other name is returned unchanged.

    `auto`: torch's built-in varlen FlashAttention where it can run (CUDA, bf16/fp16, head dim <= 256, no
    dropout, a torch that ships it), else `sdpa_varlen` (per-sample fused SDPA, O(L) memory; the CPU choice).
    The flash-attn package and FlexAttention are used only when named: neither is needed for the fast path.
    """
    if backend != "auto":
        return backend
    fast = (
        q_BHLD.is_cuda
        and torch_varlen()[0] is not None
        and q_BHLD.dtype in (torch.bfloat16, torch.float16)
        and q_BHLD.shape[-1] <= FLASH_MAX_HEAD_DIM
        and dropout_p == 0.0
    )
    return "varlen" if fast else "sdpa_varlen"


_compiled_flex_attention = None


def packed_attention(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    *,
    doc_ids_BL: Tensor | None = None,
    scale: float,
    backend: str = "auto",
    dropout_p: float = 0.0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    block_mask=None,
) -> Tensor:
    """Causal attention restricted to each packed sample; returns `[B, L, H, D_v]`.

    Args:
        q_BHLD, k_BHkvLD, v_BHkvLD: HF layout; `H % H_kv == 0`; query and key length must match (training /
            prefill; decoding with a KV cache is not a packed call). `D_v` may differ from `D` except for `flash`.
        doc_ids_BL: sample id per token (see `mmrope.attention.masks`); `None` with `cu_seqlens=None` means one
            sample per row.
        scale: softmax scale, always explicit (callers of the DIPE routed path pass `D**-0.5` for 2D-wide q/k).
        backend: one of `PACKED_BACKENDS`.
        dropout_p: attention-probability dropout (not supported by `flex`; pass 0.0 in eval).
        cu_seqlens, max_seqlen: flash-attn style boundaries over the flattened `B*L` tokens; used directly by
            `flash`/`sdpa_varlen`, converted to sample ids for the other backends. If both `doc_ids_BL` and
            `cu_seqlens` are given they must describe the same partition (not checked, to avoid a host sync).
        block_mask: optional precomputed FlexAttention `BlockMask` (`flex` only) so a model can build it once per
            forward instead of once per layer.

    Exactness: every backend evaluates `softmax_j(scale * q_i . k_j)` over exactly the keys with `j <= i` in the
    sample of `i`; the block-diagonal causal mask, the per-sample `is_causal` calls, the varlen boundaries and the
    BlockMask are four encodings of that one key set, so the results agree to rounding.
    """
    num_rows, num_heads, seq_len, _ = _check_qkv(q_BHLD, k_BHkvLD, v_BHkvLD)
    if backend not in PACKED_BACKENDS:
        raise ValueError(f"backend must be one of {PACKED_BACKENDS}, got {backend!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if doc_ids_BL is not None and tuple(doc_ids_BL.shape) != (num_rows, seq_len):
        raise ValueError(f"doc_ids_BL must be [B, L]={num_rows, seq_len}, got {tuple(doc_ids_BL.shape)}")
    if doc_ids_BL is not None:
        doc_ids_BL = doc_ids_BL.to(q_BHLD.device)
    backend = resolve_backend(backend, q_BHLD, dropout_p=dropout_p)
    # One sample per row is known without looking at device data: no ids, or exactly one cu_seqlens entry per row.
    one_sample_per_row = doc_ids_BL is None and (cu_seqlens is None or cu_seqlens.numel() == num_rows + 1)

    if backend == "varlen":
        return _torch_varlen(q_BHLD, k_BHkvLD, v_BHkvLD, doc_ids_BL, cu_seqlens, max_seqlen, scale, dropout_p)
    if backend == "flash":
        return _flash_varlen(q_BHLD, k_BHkvLD, v_BHkvLD, doc_ids_BL, cu_seqlens, max_seqlen, scale, dropout_p)
    if backend == "sdpa_varlen":
        return _sdpa_varlen(q_BHLD, k_BHkvLD, v_BHkvLD, doc_ids_BL, cu_seqlens, scale, dropout_p)

    if doc_ids_BL is None and not one_sample_per_row:
        doc_ids_BL = doc_ids_from_cu_seqlens(cu_seqlens, seq_len, num_rows=num_rows)
    if backend == "eager":
        allowed_B1LL = causal_doc_mask(doc_ids_BL, seq_len, device=q_BHLD.device)
        return eager_masked_attention(q_BHLD, k_BHkvLD, v_BHkvLD, allowed_B1LL, scale, dropout_p)
    if backend == "sdpa":
        return _sdpa(q_BHLD, k_BHkvLD, v_BHkvLD, doc_ids_BL, scale, dropout_p)
    # backend == "flex"
    if dropout_p > 0.0:
        raise ValueError("backend='flex' does not support dropout_p > 0")
    _require_cuda(q_BHLD, "flex")
    if block_mask is None:
        block_mask = flex_block_mask(doc_ids_BL, seq_len, device=q_BHLD.device)
    out_BHLD = flex_attention_call(q_BHLD, k_BHkvLD, v_BHkvLD, block_mask, scale)
    return out_BHLD.transpose(1, 2).contiguous()


def segment_attention(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    *,
    cu_seqlens: Tensor,
    scale: float,
    max_seqlen: int | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> Tensor:
    """Bidirectional (non-causal) attention inside each `cu_seqlens` segment; returns `[B, L, H, D_v]`.

    For vision towers, whose attention is full inside each image or window and absent across them. Backends:
    `auto` (torch's varlen FlashAttention on CUDA in half precision, else `sdpa_varlen`), `varlen`, `sdpa_varlen`
    (one SDPA call per segment: the same calls transformers' SDPA path of Qwen-VL vision towers makes).
    Example: `cu_seqlens = [0, 2, 5]`: tokens 0-1 see each other, tokens 2-4 see each other.
    """
    num_rows, _, seq_len, _ = _check_qkv(q_BHLD, k_BHkvLD, v_BHkvLD)
    backend = resolve_backend(backend, q_BHLD, dropout_p=dropout_p)
    if backend == "varlen":
        return _torch_varlen(
            q_BHLD, k_BHkvLD, v_BHkvLD, None, cu_seqlens, max_seqlen, scale, dropout_p, causal=False
        )
    if backend == "sdpa_varlen":
        return _sdpa_varlen(q_BHLD, k_BHkvLD, v_BHkvLD, None, cu_seqlens, scale, dropout_p, causal=False)
    raise ValueError(f"segment_attention: backend must be 'auto', 'varlen' or 'sdpa_varlen', got {backend!r}")


def eager_masked_attention(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    allowed_B1LL: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Reference attention with an explicit boolean mask (`True` = attend); fp32 softmax; returns `[B, L, H, D_v]`.

    GQA without copying K/V: queries are viewed as `[B, H_kv, G, L, D]` so group `g` of KV head `h` is query head
    `h * G + g`, i.e. query head `i` reads KV head `i // G`. Every row must have at least one allowed key.
    """
    num_rows, num_heads, seq_len, head_dim = q_BHLD.shape
    num_kv_heads = k_BHkvLD.shape[1]
    group = num_heads // num_kv_heads
    q_BKGLD = q_BHLD.reshape(num_rows, num_kv_heads, group, seq_len, head_dim)
    scores_BKGLL = torch.matmul(q_BKGLD, k_BHkvLD[:, :, None].transpose(-1, -2)) * scale
    scores_BKGLL = scores_BKGLL.masked_fill(~allowed_B1LL[:, :, None], float("-inf"))
    probs_BKGLL = torch.softmax(scores_BKGLL.float(), dim=-1).to(v_BHkvLD.dtype)
    if dropout_p > 0.0:
        probs_BKGLL = F.dropout(probs_BKGLL, p=dropout_p, training=True)
    out_BKGLD = torch.matmul(probs_BKGLL, v_BHkvLD[:, :, None])
    return out_BKGLD.reshape(num_rows, num_heads, seq_len, -1).transpose(1, 2).contiguous()


def flex_attention_call(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    block_mask,
    scale: float,
    *,
    return_lse: bool = False,
    compiled: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """FlexAttention in `[B, H, L, D]` layout with GQA; optionally also the natural-log LSE `[B, H, L]` (fp32).

    `compiled=False` runs the unfused reference implementation (CPU forward only; used by tests to check the
    masks and the LSE convention: fully masked rows give `out = 0`, `lse = -inf`).
    """
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    global _compiled_flex_attention
    fn = flex_attention
    if compiled:
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex_attention
    enable_gqa = q_BHLD.shape[1] != k_BHkvLD.shape[1]
    if not return_lse:
        return fn(q_BHLD, k_BHkvLD, v_BHkvLD, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    out_BHLD, aux = fn(
        q_BHLD,
        k_BHkvLD,
        v_BHkvLD,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=enable_gqa,
        return_aux=AuxRequest(lse=True),
    )
    return out_BHLD, aux.lse


def _check_qkv(q_BHLD: Tensor, k_BHkvLD: Tensor, v_BHkvLD: Tensor) -> tuple[int, int, int, int]:
    if q_BHLD.dim() != 4 or k_BHkvLD.dim() != 4 or v_BHkvLD.dim() != 4:
        raise ValueError("q, k and v must be 4-D [B, H, L, D] (HF layout)")
    num_rows, num_heads, seq_len, head_dim = q_BHLD.shape
    kb, num_kv_heads, kv_len, k_dim = k_BHkvLD.shape
    if (kb, kv_len, k_dim) != (num_rows, seq_len, head_dim):
        raise ValueError(f"k shape {tuple(k_BHkvLD.shape)} does not match q shape {tuple(q_BHLD.shape)}")
    if v_BHkvLD.shape[:3] != k_BHkvLD.shape[:3]:
        raise ValueError(f"v shape {tuple(v_BHkvLD.shape)} does not match k shape {tuple(k_BHkvLD.shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num query heads {num_heads} is not a multiple of num kv heads {num_kv_heads}")
    return num_rows, num_heads, seq_len, head_dim


def _require_cuda(x: Tensor, backend: str) -> None:
    if x.device.type != "cuda":
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors (got {x.device.type}); use 'sdpa', 'sdpa_varlen' or 'eager'"
        )


def _repeat_kv(x_BHkvLD: Tensor, group: int) -> Tensor:
    return x_BHkvLD if group == 1 else x_BHkvLD.repeat_interleave(group, dim=1)


def _sdpa(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    doc_ids_BL: Tensor | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    # K/V are repeated to all query heads (O(L) memory): the masked fused kernels do not all accept GQA.
    group = q_BHLD.shape[1] // k_BHkvLD.shape[1]
    k_BHLD, v_BHLD = _repeat_kv(k_BHkvLD, group), _repeat_kv(v_BHkvLD, group)
    if doc_ids_BL is None:  # one sample per row: no mask tensor, the fused causal kernels apply
        out_BHLD = F.scaled_dot_product_attention(
            q_BHLD, k_BHLD, v_BHLD, is_causal=True, dropout_p=dropout_p, scale=scale
        )
    else:
        allowed_B1LL = causal_doc_mask(doc_ids_BL, q_BHLD.shape[2])
        out_BHLD = F.scaled_dot_product_attention(
            q_BHLD, k_BHLD, v_BHLD, attn_mask=allowed_B1LL, dropout_p=dropout_p, scale=scale
        )
    return out_BHLD.transpose(1, 2).contiguous()


def _host_cu_seqlens(
    doc_ids_BL: Tensor | None, cu_seqlens: Tensor | None, num_rows: int, seq_len: int, device: torch.device
) -> tuple[Tensor, int]:
    """`(cu_seqlens int32 on device, max_seqlen)`, from whichever description was given."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if doc_ids_BL is not None:
        return cu_seqlens_from_doc_ids(doc_ids_BL.to(device))
    cu_seqlens = torch.arange(0, num_rows * seq_len + 1, seq_len, device=device, dtype=torch.int32)
    return cu_seqlens, seq_len


def _sdpa_varlen(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    doc_ids_BL: Tensor | None,
    cu_seqlens: Tensor | None,
    scale: float,
    dropout_p: float,
    causal: bool = True,
) -> Tensor:
    num_rows, num_heads, seq_len, _ = q_BHLD.shape
    group = num_heads // k_BHkvLD.shape[1]
    cu, _ = _host_cu_seqlens(doc_ids_BL, cu_seqlens, num_rows, seq_len, q_BHLD.device)
    bounds = cu.tolist()  # the one host sync of this backend
    # Flatten to tokens [B*L, H, D]; a sample is a contiguous token slice that never crosses a row.
    q_THD = q_BHLD.transpose(1, 2).reshape(num_rows * seq_len, num_heads, -1)
    k_THD = _repeat_kv(k_BHkvLD, group).transpose(1, 2).reshape(num_rows * seq_len, num_heads, -1)
    v_THD = _repeat_kv(v_BHkvLD, group).transpose(1, 2).reshape(num_rows * seq_len, num_heads, -1)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q_1HnD, k_1HnD, v_1HnD = (x[start:end].transpose(0, 1)[None] for x in (q_THD, k_THD, v_THD))
        out_1HnD = F.scaled_dot_product_attention(
            q_1HnD, k_1HnD, v_1HnD, is_causal=causal, dropout_p=dropout_p, scale=scale
        )
        outs.append(out_1HnD[0].transpose(0, 1))
    return torch.cat(outs, dim=0).view(num_rows, seq_len, num_heads, -1)


def _torch_varlen(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    doc_ids_BL: Tensor | None,
    cu_seqlens: Tensor | None,
    max_seqlen: int | None,
    scale: float,
    dropout_p: float,
    causal: bool = True,
) -> Tensor:
    _require_cuda(q_BHLD, "varlen")
    if dropout_p > 0.0:
        raise ValueError(
            "backend='varlen' has no attention dropout; use 'sdpa_varlen' (or 'auto') with dropout_p > 0"
        )
    num_rows, num_heads, seq_len, _ = q_BHLD.shape
    if cu_seqlens is not None and max_seqlen is not None:  # the batch's own boundaries: no host sync here
        cu = cu_seqlens.to(device=q_BHLD.device, dtype=torch.int32)
    else:
        cu, max_seqlen = _host_cu_seqlens(doc_ids_BL, cu_seqlens, num_rows, seq_len, q_BHLD.device)
    out_THD = torch_varlen_attention(
        _tokens(q_BHLD), _tokens(k_BHkvLD), _tokens(v_BHkvLD), cu, int(max_seqlen), scale=scale, causal=causal
    )
    return out_THD.view(num_rows, seq_len, num_heads, -1)


def _tokens(x_BHLD: Tensor) -> Tensor:
    """`[B, H, L, D]` -> `[B*L, H, D]` (a view when x came from a `[B, L, H, D]` projection, as in HF layers)."""
    num_rows, num_heads, seq_len, head_dim = x_BHLD.shape
    return x_BHLD.transpose(1, 2).reshape(num_rows * seq_len, num_heads, head_dim)


def _flash_varlen(
    q_BHLD: Tensor,
    k_BHkvLD: Tensor,
    v_BHkvLD: Tensor,
    doc_ids_BL: Tensor | None,
    cu_seqlens: Tensor | None,
    max_seqlen: int | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    _require_cuda(q_BHLD, "flash")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ValueError("backend='flash' needs the flash_attn package; use 'flex' or 'sdpa'") from err
    num_rows, num_heads, seq_len, head_dim = q_BHLD.shape
    num_kv_heads = k_BHkvLD.shape[1]
    if v_BHkvLD.shape[-1] != head_dim:
        raise ValueError("backend='flash' needs v head_dim == q head_dim (zero-pad v)")
    cu, derived_max = _host_cu_seqlens(doc_ids_BL, cu_seqlens, num_rows, seq_len, q_BHLD.device)
    max_seqlen = derived_max if max_seqlen is None else max_seqlen
    q_THD = q_BHLD.transpose(1, 2).reshape(num_rows * seq_len, num_heads, head_dim)
    k_THD = k_BHkvLD.transpose(1, 2).reshape(num_rows * seq_len, num_kv_heads, head_dim)
    v_THD = v_BHkvLD.transpose(1, 2).reshape(num_rows * seq_len, num_kv_heads, head_dim)
    out_THD = flash_attn_varlen_func(
        q_THD,
        k_THD,
        v_THD,
        cu,
        cu,
        max_seqlen,
        max_seqlen,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
    )
    return out_THD.view(num_rows, seq_len, num_heads, head_dim)
