"""torch's varlen kernel adapter and `auto` backend selection (CPU).

The adapter is exercised against plain varlen attention functions written here with the signatures torch has
shipped (causal as `is_causal` or as `window_size=(-1, 0)`, with or without `enable_gqa` and `scale`): whatever
the signature, the adapted call must compute per-sample causal attention with the requested scale and GQA.
The CUDA kernel itself is checked against the eager reference by the GPU-marked tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mmrope.attention import packed_attention, resolve_backend
from mmrope.attention.kernels import adapt_varlen
from mmrope.encodings import build
from mmrope.model.install import install
from tests.unit.model.tiny import tiny_qwen2_5_vl

LENGTHS = [5, 1, 9, 7]
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


def _segments_attention(q, k, v, cu, *, causal: bool, scale: float | None) -> torch.Tensor:
    """Plain varlen attention over `[T, H, D]` tokens; K/V heads must equal Q heads (callers repeat them)."""
    assert q.shape[1] == k.shape[1], "this reference has no GQA: heads must match"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        scores = qs @ ks.transpose(-1, -2) * scale
        if causal:
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out


def old_style(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's form: `is_causal`, no scale (D ** -0.5), no GQA."""
    return _segments_attention(query, key, value, cu_seq_q, causal=is_causal, scale=None)


def new_style(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    """torch >= 2.11's form: causal is `window_size=(-1, 0)`, explicit scale, GQA by flag."""
    if enable_gqa:
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    assert tuple(window_size) in ((-1, -1), (-1, 0)), "this reference knows full and causal windows only"
    return _segments_attention(query, key, value, cu_seq_q, causal=tuple(window_size) == (-1, 0), scale=scale)


def _reference(q, k, v, cu, scale, causal: bool = True):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _segments_attention(q.double(), k.double(), v.double(), cu, causal=causal, scale=scale)


@pytest.mark.parametrize("fn", [old_style, new_style], ids=["is_causal", "window_size"])
@pytest.mark.parametrize("scale", [HEAD_DIM**-0.5, 0.17], ids=["default_scale", "other_scale"])
def test_adapted_kernel_is_causal_per_sample_with_scale_and_gqa(fn, scale):
    kernel, reason = adapt_varlen(fn)
    assert kernel is not None, reason
    gen = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    q = torch.randn(total, NUM_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    out = kernel(q, k, v, cu, max(LENGTHS), scale=scale)
    torch.testing.assert_close(out, _reference(q, k, v, cu, scale), atol=1e-10, rtol=0)
    # bidirectional inside each segment (vision towers)
    full = kernel(q, k, v, cu, max(LENGTHS), scale=scale, causal=False)
    torch.testing.assert_close(full, _reference(q, k, v, cu, scale, causal=False), atol=1e-10, rtol=0)
    assert not torch.allclose(full, out)


def test_unknown_signature_is_refused_with_the_reason():
    def no_causal_flag(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        raise AssertionError("must not be called")

    kernel, reason = adapt_varlen(no_causal_flag)
    assert kernel is None and "window_size" in reason and "is_causal" in reason


def test_auto_is_per_sample_sdpa_on_cpu():
    q = torch.randn(1, NUM_HEADS, 12, HEAD_DIM)
    assert resolve_backend("auto", q) == "sdpa_varlen"
    assert (
        resolve_backend("auto", q.bfloat16()) == "sdpa_varlen"
    )  # half precision alone does not make it CUDA
    assert resolve_backend("eager", q) == "eager"  # a named backend is never replaced
    k = torch.randn(1, NUM_KV_HEADS, 12, HEAD_DIM)
    v = torch.randn(1, NUM_KV_HEADS, 12, HEAD_DIM)
    cu = torch.tensor([0, 5, 12])
    auto = packed_attention(q, k, v, cu_seqlens=cu, scale=0.3, backend="auto")
    torch.testing.assert_close(
        auto, packed_attention(q, k, v, cu_seqlens=cu, scale=0.3, backend="sdpa_varlen"), atol=0, rtol=0
    )


def test_auto_is_the_default_of_the_seam_and_of_every_model_config():
    model = install(tiny_qwen2_5_vl(), build("mrope", mrope_section=[2, 3, 3]))
    assert model.model.language_model.layers[0].self_attn.attn_backend == "auto"
    configs = sorted((Path(__file__).resolve().parents[3] / "configs" / "model").glob("*.yaml"))
    assert configs
    from mmrope.model.config import ModelConfig

    assert ModelConfig().attn_backend == "auto"  # the schema's default, which no model config overrides
    for path in configs:
        assert yaml.safe_load(path.read_text()).get("attn_backend", "auto") == "auto", path.name


def test_named_varlen_refuses_cpu_tensors():
    q = torch.randn(1, NUM_HEADS, 6, HEAD_DIM)
    k = v = torch.randn(1, NUM_KV_HEADS, 6, HEAD_DIM)
    with pytest.raises(ValueError, match="CUDA"):
        packed_attention(q, k, v, scale=0.3, backend="varlen")
