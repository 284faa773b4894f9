"""torch's own varlen FlashAttention, found once (on first use) and adapted to the installed torch's signature.

`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10) is FlashAttention-2 over packed tokens with `cu_seqlens`,
forward and backward, shipped inside torch: nothing to compile, unlike the flash-attn package. Its keyword
arguments moved between releases, so they are read from the signature rather than from a version number:

| what | older form | newer form |
|---|---|---|
| causal | `is_causal=True` | `window_size=(-1, 0)` |
| GQA | K/V heads must equal Q heads (repeated here) | `enable_gqa=True` |
| softmax scale | none: `D ** -0.5` (q is pre-scaled here) | `scale=` |

A signature with none of the causal forms disables the backend; the reason is kept in `TORCH_VARLEN_REASON`,
`auto` then falls back, and naming `varlen` explicitly raises with that reason.

`TORCH_VARLEN` / `TORCH_VARLEN_REASON` are looked up on first access (`torch_varlen()`): importing
`torch.nn.attention.varlen` imports TorchDynamo (~0.8 s), which a process that never attends (a refused config,
`train.py --help`) should not pay.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# (and TORCH_VARLEN, TORCH_VARLEN_REASON, served by the module's __getattr__)
__all__ = ["VarlenKernel", "adapt_varlen", "torch_varlen", "torch_varlen_attention"]


@dataclass(frozen=True)
class VarlenKernel:
    """A varlen attention function plus how to ask it for causal, GQA and a scale."""

    fn: Callable
    causal_kwargs: dict
    full_kwargs: dict  # bidirectional inside each segment (vision towers)
    has_gqa: bool
    has_scale: bool

    def __call__(
        self,
        q_THD: Tensor,
        k_THkvD: Tensor,
        v_THkvD: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        *,
        scale: float,
        causal: bool = True,
    ) -> Tensor:
        """Attention inside each `cu_seqlens` segment of the flattened tokens (causal or full); `[T, H, D_v]`."""
        num_heads, num_kv_heads, head_dim = q_THD.shape[1], k_THkvD.shape[1], q_THD.shape[2]
        kwargs = dict(self.causal_kwargs if causal else self.full_kwargs)
        if num_heads != num_kv_heads:
            if self.has_gqa:
                kwargs["enable_gqa"] = True
            else:  # K/V repeated to every query head: O(L) memory, same function
                group = num_heads // num_kv_heads
                k_THkvD = k_THkvD.repeat_interleave(group, dim=1)
                v_THkvD = v_THkvD.repeat_interleave(group, dim=1)
        if self.has_scale:
            kwargs["scale"] = scale
        elif scale != head_dim**-0.5:  # the kernel applies D ** -0.5: fold the rest into q
            q_THD = q_THD * (scale * head_dim**0.5)
        return self.fn(
            q_THD.contiguous(),
            k_THkvD.contiguous(),
            v_THkvD.contiguous(),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            **kwargs,
        )


def adapt_varlen(fn: Callable) -> tuple[VarlenKernel | None, str]:
    """`(kernel, "")` if `fn`'s signature is one we know how to call causally, else `(None, reason)`."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal, full = {"window_size": (-1, 0)}, {"window_size": (-1, -1)}
    elif "is_causal" in params:
        causal, full = {"is_causal": True}, {"is_causal": False}
    else:
        return None, f"varlen_attn{inspect.signature(fn)} takes neither window_size nor is_causal"
    return VarlenKernel(fn, causal, full, has_gqa="enable_gqa" in params, has_scale="scale" in params), ""


@functools.cache
def torch_varlen() -> tuple[VarlenKernel | None, str]:
    """`(TORCH_VARLEN, TORCH_VARLEN_REASON)`: torch's kernel adapted, or None and why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # imports TorchDynamo: only where attention runs
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen (it needs torch >= 2.10)"
    return adapt_varlen(varlen_attn)


def __getattr__(name: str):
    """TORCH_VARLEN and TORCH_VARLEN_REASON, found on first access (module docstring)."""
    if name == "TORCH_VARLEN":
        return torch_varlen()[0]
    if name == "TORCH_VARLEN_REASON":
        return torch_varlen()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_varlen_attention(
    q_THD: Tensor,
    k_THkvD: Tensor,
    v_THkvD: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    scale: float,
    causal: bool = True,
) -> Tensor:
    """Varlen attention with torch's kernel; raises ValueError saying why where this torch lacks one."""
    kernel, reason = torch_varlen()
    if kernel is None:
        raise ValueError(f"backend='varlen' is unavailable: {reason}; use 'auto' or 'sdpa_varlen'")
    return kernel(q_THD, k_THkvD, v_THkvD, cu_seqlens, max_seqlen, scale=scale, causal=causal)
