"""The vision tower's attention over packed windows/images, registered by the seam (`mmrope.model.install`) as the
`AttentionInterface` entry "mmrope_flash_vision" when `attn_backend="auto"`.

A name with "flash" in it is transformers' signal that the function takes packed segments, so the Qwen-VL vision
attention hands it every window/image at once through `cu_seqlens` instead of looping one small SDPA call per
window (thousands per layer: 38% of a 32K step at 7B scale on an H200). The function runs
`mmrope.attention.segment_attention`: torch's varlen FlashAttention on CUDA in half precision, else the same
per-segment SDPA calls as transformers' SDPA path.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mmrope.attention import segment_attention

VISION_ATTN_IMPLEMENTATION = "mmrope_flash_vision"  # "flash" in the name: transformers passes cu_seqlens


def vision_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Tensor | None = None,
    max_length_q: int | Tensor | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Vision-tower attention over packed windows/images: `[1, H, T, D]` in, `([1, T, H, D], None)` out."""
    if attention_mask is not None or cu_seq_lens_q is None or is_causal:
        raise RuntimeError(
            f"{VISION_ATTN_IMPLEMENTATION!r} serves vision towers that pass cu_seqlens (bidirectional, no mask); "
            f"{type(module).__name__} called it otherwise"
        )
    max_seqlen = int(max_length_q) if max_length_q is not None else None
    out_BLHD = segment_attention(
        query,
        key,
        value,
        cu_seqlens=cu_seq_lens_q,
        max_seqlen=max_seqlen,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        dropout_p=dropout,
    )
    return out_BLHD, None
