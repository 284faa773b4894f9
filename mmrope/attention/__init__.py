"""Attention functions: packing-aware causal attention backends and exact, memory-linear DIPE attention.

Conventions (see `masks` for details): HF layout in (`q [B, H, L, D]`, `k/v [B, H_kv, L, D]`), `[B, L, H, D]`
out; packing by sample ids or `cu_seqlens` with padding as its own sample; causal on sequence index.
"""

from __future__ import annotations

from mmrope.attention.dipe import (
    DIPE_BACKENDS,
    dipe_attention,
    dipe_decode_attention,
    dipe_routed_qk,
    merge_attention_partials,
)
from mmrope.attention.masks import (
    causal_doc_mask,
    cu_seqlens_from_doc_ids,
    dipe_masks,
    doc_ids_from_attention_mask,
    doc_ids_from_cu_seqlens,
    flex_block_mask,
    normalize_doc_ids,
)
from mmrope.attention.packed import (
    PACKED_BACKENDS,
    eager_masked_attention,
    flex_attention_call,
    packed_attention,
    resolve_backend,
    segment_attention,
)

__all__ = [
    "DIPE_BACKENDS",
    "PACKED_BACKENDS",
    "TORCH_VARLEN",
    "TORCH_VARLEN_REASON",
    "causal_doc_mask",
    "cu_seqlens_from_doc_ids",
    "dipe_attention",
    "dipe_decode_attention",
    "dipe_masks",
    "dipe_routed_qk",
    "doc_ids_from_attention_mask",
    "doc_ids_from_cu_seqlens",
    "eager_masked_attention",
    "flex_attention_call",
    "flex_block_mask",
    "merge_attention_partials",
    "normalize_doc_ids",
    "packed_attention",
    "resolve_backend",
    "segment_attention",
]


def __getattr__(name: str):
    """TORCH_VARLEN and TORCH_VARLEN_REASON: found on first access (mmrope/attention/kernels.py says why)."""
    if name in ("TORCH_VARLEN", "TORCH_VARLEN_REASON"):
        from mmrope.attention import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
