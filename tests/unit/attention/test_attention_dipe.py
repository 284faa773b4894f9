"""DIPE attention == a plain masked reference written here from spec dipe.md section 4, forward and backward.

Reference (spec section 4, without the official code's oddities): `allowed(i, j) = same sample AND j <= i`;
`intra = allowed AND vis_i == vis_j`; `S = where(intra, q_dyn.k, q_sta.k) * scale`, `-inf` outside `allowed`,
ONE softmax, `P @ V`. GQA: query head `i` reads KV head `i // (H / H_kv)`.
"""

from __future__ import annotations

import pytest
import torch

from mmrope.attention import (
    TORCH_VARLEN,
    TORCH_VARLEN_REASON,
    cu_seqlens_from_doc_ids,
    dipe_attention,
    dipe_decode_attention,
    dipe_routed_qk,
    merge_attention_partials,
    packed_attention,
)
from mmrope.attention.dipe import _two_pass_flex

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = HEAD_DIM**-0.5

# (backend, inner_backend) pairs runnable on CPU.
CPU_VARIANTS = [
    ("eager", "sdpa"),
    ("routed", "sdpa"),
    ("routed", "sdpa_varlen"),
    ("routed", "eager"),
    ("two_pass", "sdpa"),
]


# ---------------------------------------------------------------------------------------------------------------
# layouts: a row is a list of samples, a sample a list of ("t" | "v", num_tokens) segments


def _layout(rows: list[list[list[tuple[str, int]]]]) -> tuple[torch.Tensor, torch.Tensor]:
    visual, doc_ids, next_doc = [], [], 0
    for samples in rows:
        vis_row, doc_row = [], []
        for segments in samples:
            for kind, n in segments:
                vis_row += [kind == "v"] * n
                doc_row += [next_doc] * n
            next_doc += 1
        visual.append(vis_row)
        doc_ids.append(doc_row)
    assert len({len(r) for r in visual}) == 1, "rows must have equal length"
    return torch.tensor(visual), torch.tensor(doc_ids)


STRUCTURED = [
    [  # row 0: text/image/text (VS, VE are text), an image-first sample (no text before it), a text-only sample
        [("t", 5), ("v", 6), ("t", 7)],
        [("v", 4), ("t", 3)],
        [("t", 6)],
        [("t", 1)],
    ],
    [  # row 1: several images in one sample, a text-only sample, an image-only sample
        [("t", 3), ("v", 4), ("t", 2), ("v", 5), ("t", 4), ("v", 3), ("t", 1)],
        [("t", 4)],
        [("v", 6)],
    ],
]


def _random_layout(seed: int, num_rows: int = 2, seq_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # A token switches modality with prob 0.2 and starts a new sample with prob 0.08: many blocks, several samples.
    switch = torch.rand(num_rows, seq_len, generator=gen) < 0.2
    first_visual = torch.rand(num_rows, 1, generator=gen) < 0.5
    visual = (switch.long().cumsum(dim=1) % 2 == 1) ^ first_visual
    new_doc = torch.rand(num_rows, seq_len, generator=gen) < 0.08
    doc_ids = new_doc.long().cumsum(dim=1)
    return visual, doc_ids


LAYOUTS = {
    "structured": lambda: _layout(STRUCTURED),
    "random0": lambda: _random_layout(0),
    "random1": lambda: _random_layout(1),
    "random2": lambda: _random_layout(2),
    "text_only": lambda: (torch.zeros(2, 20, dtype=torch.bool), torch.tensor([[0] * 12 + [1] * 8, [0] * 20])),
}


def reference_dipe(q_dyn, q_sta, k, v, visual, doc_ids, scale):
    """Spec section 4 with explicit loops for the masks; returns [B, L, H, D]."""
    num_rows, num_heads, seq_len, _ = q_dyn.shape
    group = num_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs = []
    for b in range(num_rows):
        vis, doc = visual[b].tolist(), doc_ids[b].tolist()
        allowed = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        intra = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        for i in range(seq_len):
            for j in range(i + 1):
                if doc[i] == doc[j]:
                    allowed[i, j] = True
                    intra[i, j] = vis[i] == vis[j]
        s_dyn = q_dyn[b] @ k[b].transpose(-1, -2) * scale
        s_sta = q_sta[b] @ k[b].transpose(-1, -2) * scale
        scores = torch.where(intra, s_dyn, s_sta).masked_fill(~allowed, float("-inf"))
        outs.append((torch.softmax(scores, dim=-1) @ v[b]).transpose(0, 1))
    return torch.stack(outs)


def _random_qkv(seed: int, num_rows: int, seq_len: int):
    gen = torch.Generator().manual_seed(seed)
    q_dyn = torch.randn(num_rows, NUM_HEADS, seq_len, HEAD_DIM, generator=gen)
    q_sta = torch.randn(num_rows, NUM_HEADS, seq_len, HEAD_DIM, generator=gen)
    k = torch.randn(num_rows, NUM_KV_HEADS, seq_len, HEAD_DIM, generator=gen)
    v = torch.randn(num_rows, NUM_KV_HEADS, seq_len, HEAD_DIM, generator=gen)
    return q_dyn, q_sta, k, v


def _run_with_grads(fn, tensors, weight):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


# ---------------------------------------------------------------------------------------------------------------
# exactness vs the reference


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend,inner", CPU_VARIANTS, ids=[f"{b}-{i}" for b, i in CPU_VARIANTS])
def test_dipe_matches_reference_forward_and_backward(layout: str, backend: str, inner: str) -> None:
    visual, doc_ids = LAYOUTS[layout]()
    num_rows, seq_len = visual.shape
    tensors = _random_qkv(10, num_rows, seq_len)
    weight = torch.randn(num_rows, seq_len, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(11))

    out, grads = _run_with_grads(
        lambda qd, qs, k, v: dipe_attention(
            qd,
            qs,
            k,
            v,
            visual_BL=visual,
            doc_ids_BL=doc_ids,
            scale=SCALE,
            backend=backend,
            inner_backend=inner,
        ),
        tensors,
        weight,
    )
    ref, ref_grads = _run_with_grads(
        lambda qd, qs, k, v: reference_dipe(qd, qs, k, v, visual, doc_ids, SCALE),
        [t.double() for t in tensors],
        weight,
    )
    assert out.shape == (num_rows, seq_len, NUM_HEADS, HEAD_DIM)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    for name, grad, ref_grad in zip(["q_dyn", "q_sta", "k", "v"], grads, ref_grads):
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=0, msg=f"d{name}")


@pytest.mark.parametrize("backend,inner", CPU_VARIANTS, ids=[f"{b}-{i}" for b, i in CPU_VARIANTS])
def test_dipe_with_cu_seqlens_equals_doc_ids(backend: str, inner: str) -> None:
    visual, doc_ids = _layout(STRUCTURED)
    cu_seqlens, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    q_dyn, q_sta, k, v = _random_qkv(12, *visual.shape)
    kwargs = {"visual_BL": visual, "scale": SCALE, "backend": backend, "inner_backend": inner}
    out_docs = dipe_attention(q_dyn, q_sta, k, v, doc_ids_BL=doc_ids, **kwargs)
    out_cu = dipe_attention(q_dyn, q_sta, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kwargs)
    torch.testing.assert_close(out_cu, out_docs, atol=1e-6, rtol=0)


def test_two_pass_flex_unfused_forward_matches_reference() -> None:
    """The CUDA two-pass path (block masks, flex LSE, -inf for empty inter rows) on FlexAttention's CPU forward."""
    for layout in ("structured", "random0", "text_only"):
        visual, doc_ids = LAYOUTS[layout]()
        q_dyn, q_sta, k, v = _random_qkv(13, *visual.shape)
        with torch.no_grad():
            out = _two_pass_flex(q_dyn, q_sta, k, v, visual, doc_ids, SCALE, compiled=False).transpose(1, 2)
        ref = reference_dipe(q_dyn.double(), q_sta.double(), k.double(), v.double(), visual, doc_ids, SCALE)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0, msg=layout)


# ---------------------------------------------------------------------------------------------------------------
# semantics


@pytest.mark.parametrize("backend", ["eager", "routed", "two_pass"])
def test_static_equal_dynamic_reduces_to_plain_attention(backend: str) -> None:
    visual, doc_ids = _layout(STRUCTURED)
    q, _, k, v = _random_qkv(14, *visual.shape)
    out = dipe_attention(q, q, k, v, visual_BL=visual, doc_ids_BL=doc_ids, scale=SCALE, backend=backend)
    plain = packed_attention(q, k, v, doc_ids_BL=doc_ids, scale=SCALE, backend="eager")
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "routed", "two_pass"])
def test_rows_without_cross_modal_keys_ignore_q_sta(backend: str) -> None:
    """Empty inter sets: text-only samples and text before a sample's first image never read q_sta."""
    visual, doc_ids = _layout(STRUCTURED)
    q_dyn, q_sta, k, v = _random_qkv(15, *visual.shape)
    kwargs = {"visual_BL": visual, "doc_ids_BL": doc_ids, "scale": SCALE, "backend": backend}
    out = dipe_attention(q_dyn, q_sta, k, v, **kwargs)
    out_other = dipe_attention(q_dyn, 100.0 * torch.randn_like(q_sta), k, v, **kwargs)
    # Row 0: text before the image (0-4), the image-first sample's visual tokens (18-21: only visual keys before
    # them), the text-only samples (25-31). Row 1: text before the first image (0-2), a text-only sample (22-25),
    # an image-only sample (26-31).
    no_inter = torch.zeros_like(visual)
    no_inter[0, 0:5] = no_inter[0, 18:22] = no_inter[0, 25:32] = True
    no_inter[1, 0:3] = no_inter[1, 22:32] = True
    delta = (out - out_other).abs().amax(dim=(2, 3))
    assert delta[no_inter].max() < 1e-6
    assert delta[~no_inter].min() > 1e-3  # every other token has a cross-modal key, so q_sta matters


def _mrope(x_BHLD: torch.Tensor, pos_3L: torch.Tensor, section: tuple[int, ...] = (2, 3, 3)) -> torch.Tensor:
    """Rotate-half MRoPE (spec section 3): frequency pair i takes its angle from axis t, h or w by `section`."""
    dim = x_BHLD.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    axis_of_pair = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    angles = pos_3L.double()[axis_of_pair].T * inv_freq  # [L, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    x1, x2 = x_BHLD[..., : dim // 2], x_BHLD[..., dim // 2 :]
    return x_BHLD * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_dipe_differs_from_mrope_on_spec_example() -> None:
    """Spec 2.3 layout: DIPE changes exactly the rows that have a cross-modal key AND a static != dynamic query."""
    # text x5, VS, img 2x3, VE, text x6 (indices 0-4, 5, 6-11, 12, 13-18)
    text_t = list(range(6))
    dynamic = torch.tensor(
        [
            text_t + [6] * 6 + list(range(9, 16)),
            text_t + [6, 6, 6, 7, 7, 7] + list(range(9, 16)),
            text_t + [6, 7, 8, 6, 7, 8] + list(range(9, 16)),
        ]
    )
    static = torch.tensor([0] * 6 + [6] * 6 + [9] * 7).expand(3, -1)
    visual = torch.zeros(1, 19, dtype=torch.bool)
    visual[0, 6:12] = True
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(1, NUM_HEADS, 19, HEAD_DIM, generator=gen)
    k = _mrope(torch.randn(1, NUM_KV_HEADS, 19, HEAD_DIM, generator=gen), dynamic)
    v = torch.randn(1, NUM_KV_HEADS, 19, HEAD_DIM, generator=gen)
    q_dyn, q_sta = _mrope(q, dynamic), _mrope(q, static)

    # Unchanged rows: 0-5 (no visual key yet; VS is text), 6 (first patch: static == dynamic = (6, 6, 6)),
    # 12 (VE opens the trailing segment: static == dynamic = 9). All others differ from MRoPE.
    same_as_mrope = torch.zeros(19, dtype=torch.bool)
    same_as_mrope[[0, 1, 2, 3, 4, 5, 6, 12]] = True
    mrope = packed_attention(q_dyn, k, v, doc_ids_BL=None, scale=SCALE, backend="eager")
    for backend in ("eager", "routed", "two_pass"):
        dipe = dipe_attention(
            q_dyn, q_sta, k, v, visual_BL=visual, doc_ids_BL=None, scale=SCALE, backend=backend
        )
        delta_L = (dipe - mrope).abs().amax(dim=(2, 3))[0]
        assert delta_L[same_as_mrope].max() < 1e-6, backend
        # >= 1000x the exactness tolerance on every changed row (patches 7-8 differ from their anchor only on
        # the low-frequency w channels), and large on the text after the image (fixed offset to every patch).
        assert delta_L[~same_as_mrope].min() > 1e-3, backend
        assert delta_L[13:].min() > 1e-2, backend


def test_routed_qk_selects_dynamic_or_static_query_per_pair() -> None:
    gen = torch.Generator().manual_seed(17)
    q_dyn, q_sta = torch.randn(1, 1, 2, 8, generator=gen), torch.randn(1, 1, 2, 8, generator=gen)
    k = torch.randn(1, 1, 2, 8, generator=gen)
    visual = torch.tensor([[False, True]])  # token 0 text, token 1 visual
    q_route, k_route = dipe_routed_qk(q_dyn, q_sta, k, visual)
    assert q_route.shape == (1, 1, 2, 16) and k_route.shape == (1, 1, 2, 16)
    logits = (q_route @ k_route.transpose(-1, -2))[0, 0]
    expected = torch.tensor(
        [
            [q_dyn[0, 0, 0] @ k[0, 0, 0], q_sta[0, 0, 0] @ k[0, 0, 1]],  # text query: text key / visual key
            [q_sta[0, 0, 1] @ k[0, 0, 0], q_dyn[0, 0, 1] @ k[0, 0, 1]],  # visual query: text key / visual key
        ]
    )
    torch.testing.assert_close(logits, expected)


# ---------------------------------------------------------------------------------------------------------------
# log-sum-exp merge


def test_merge_equals_one_softmax_over_the_union() -> None:
    gen = torch.Generator().manual_seed(18)
    scores = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    in_a = torch.rand(5, 12, generator=gen) < 0.5
    in_a[:, 0] = True  # set A never empty
    in_a[4, :] = True  # row 4: set B empty
    parts = []
    for keep in (in_a, ~in_a):
        masked = scores.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(masked, dim=-1)
        out = torch.nan_to_num(torch.softmax(masked, dim=-1)) @ values
        parts += [out, lse]
    merged, lse = merge_attention_partials(*parts)
    torch.testing.assert_close(merged.double(), torch.softmax(scores, dim=-1) @ values, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-6, rtol=0)


def test_merge_flash_style_empty_rows_give_exact_zero_weight_and_finite_grads() -> None:
    out_a = torch.randn(3, 4, requires_grad=True)
    lse_a = torch.randn(3, requires_grad=True)
    # FlashAttention-family empty rows: LSE +inf; the partial output may even be NaN.
    out_b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [float("nan")] * 4, [0.0] * 4], requires_grad=True)
    lse_b = torch.tensor([0.5, float("inf"), float("-inf")], requires_grad=True)
    merged, lse = merge_attention_partials(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(merged[1:], out_a[1:].detach())
    torch.testing.assert_close(lse[1:], lse_a[1:].detach())
    weight_a = torch.sigmoid(lse_a[0] - 0.5)
    torch.testing.assert_close(merged[0], weight_a * out_a[0] + (1 - weight_a) * out_b[0])
    (merged.sum() + lse.sum()).backward()
    for grad in (out_a.grad, lse_a.grad, out_b.grad, lse_b.grad):
        assert torch.isfinite(grad).all()
    assert out_b.grad[1:].abs().max() == 0 and lse_b.grad[1:].abs().max() == 0


# ---------------------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("num_queries", [1, 3])
def test_decode_equals_full_sequence_rows(num_queries: int) -> None:
    # Prompt with two images, then generated text: the last rows are text queries with a fixed anchor.
    visual, _ = _layout([[[("t", 4), ("v", 6), ("t", 3), ("v", 4), ("t", 7)]]])
    q_dyn, q_sta, k, v = _random_qkv(19, *visual.shape)
    full = dipe_attention(q_dyn, q_sta, k, v, visual_BL=visual, doc_ids_BL=None, scale=SCALE, backend="eager")
    out = dipe_decode_attention(
        q_dyn[:, :, -num_queries:], q_sta[:, :, -num_queries:], k, v, key_visual_BK=visual, scale=SCALE
    )
    assert out.shape == (1, num_queries, NUM_HEADS, HEAD_DIM)
    torch.testing.assert_close(out, full[:, -num_queries:], atol=1e-6, rtol=0)


def test_decode_chunk_with_visual_queries_equals_full_sequence_rows() -> None:
    visual, _ = _layout([[[("t", 4), ("v", 6), ("t", 3), ("v", 5)]]])  # last 7 queries: 2 text + 5 visual
    q_dyn, q_sta, k, v = _random_qkv(20, *visual.shape)
    full = dipe_attention(q_dyn, q_sta, k, v, visual_BL=visual, scale=SCALE, backend="eager")
    out = dipe_decode_attention(
        q_dyn[:, :, -7:],
        q_sta[:, :, -7:],
        k,
        v,
        key_visual_BK=visual,
        query_visual_BQ=visual[:, -7:],
        scale=SCALE,
    )
    torch.testing.assert_close(out, full[:, -7:], atol=1e-6, rtol=0)


def test_decode_left_padded_batch_equals_padding_as_own_sample() -> None:
    # Row 0 has 5 left pads; in dipe_attention the pads are their own sample, in decode they are invalid keys.
    visual, _ = _layout([[[("t", 8), ("v", 6), ("t", 6)]], [[("t", 3), ("v", 8), ("t", 9)]]])
    visual[0, :5] = False
    valid = torch.ones_like(visual)
    valid[0, :5] = False
    doc_ids = (~valid).long() * -1  # pads -1, real 0: two samples in row 0
    q_dyn, q_sta, k, v = _random_qkv(21, *visual.shape)
    full = dipe_attention(
        q_dyn, q_sta, k, v, visual_BL=visual, doc_ids_BL=doc_ids, scale=SCALE, backend="routed"
    )
    out = dipe_decode_attention(
        q_dyn[:, :, -2:], q_sta[:, :, -2:], k, v, key_visual_BK=visual, key_valid_BK=valid, scale=SCALE
    )
    torch.testing.assert_close(out, full[:, -2:], atol=1e-5, rtol=0)


def test_user_errors_name_the_argument() -> None:
    visual, doc_ids = _layout(STRUCTURED)
    q_dyn, q_sta, k, v = _random_qkv(22, *visual.shape)
    with pytest.raises(ValueError, match="visual_BL"):
        dipe_attention(q_dyn, q_sta, k, v, visual_BL=visual[:, :-1], scale=SCALE)
    with pytest.raises(ValueError, match="backend"):
        dipe_attention(q_dyn, q_sta, k, v, visual_BL=visual, scale=SCALE, backend="flash")
    with pytest.raises(ValueError, match="doc_ids_BL"):
        dipe_attention(
            q_dyn, q_sta, k, v, visual_BL=visual, doc_ids_BL=doc_ids[:1], scale=SCALE, backend="eager"
        )
    with pytest.raises(ValueError, match="q_sta"):
        dipe_attention(q_dyn, q_sta[:, :, :-1], k, v, visual_BL=visual, scale=SCALE)
    with pytest.raises(ValueError, match="key_visual_BK"):
        dipe_decode_attention(
            q_dyn[:, :, -1:], q_sta[:, :, -1:], k, v, key_visual_BK=visual[:, 1:], scale=SCALE
        )


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped on CPU machines): the fused paths, fwd + bwd, vs the same reference


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


CUDA_VARIANTS = [
    ("routed", "sdpa"),
    ("routed", "sdpa_varlen"),
    ("routed", "varlen"),
    ("routed", "auto"),
    ("routed", "flex"),
    ("two_pass", "flex"),  # two_pass runs on FlexAttention on CUDA (the inner backend is not used)
    ("routed", "flash"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["structured", "random0"])
@pytest.mark.parametrize("backend,inner", CUDA_VARIANTS, ids=[f"{b}-{i}" for b, i in CUDA_VARIANTS])
def test_dipe_cuda_matches_reference_forward_and_backward(layout: str, backend: str, inner: str) -> None:
    if inner == "flash" and not _has_flash_attn():
        pytest.skip("flash_attn not installed")
    if inner in ("varlen", "auto") and TORCH_VARLEN is None:
        pytest.skip(f"no torch varlen kernel: {TORCH_VARLEN_REASON}")
    # FlashAttention kernels (flash-attn's, torch's varlen; auto picks the latter in bf16) only run in half
    # precision: compare in bf16 with a bf16-sized tolerance; the rest in fp32.
    half = inner in ("flash", "varlen", "auto")
    # bf16: an absolute floor plus torch's bf16 relative tolerance (the kernels write bf16 outputs and gradients,
    # so large entries such as dv, a sum over queries and grouped heads, round at ~2^-8 of their size).
    dtype, atol, rtol = (torch.bfloat16, 3e-2, 1.6e-2) if half else (torch.float32, 1e-4, 0.0)
    visual, doc_ids = LAYOUTS[layout]()
    tensors = _random_qkv(30, *visual.shape)
    weight = torch.randn(*visual.shape, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(31))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, grads = _run_with_grads(
            lambda qd, qs, k, v: dipe_attention(
                qd,
                qs,
                k,
                v,
                visual_BL=visual.cuda(),
                doc_ids_BL=doc_ids.cuda(),
                scale=SCALE,
                backend=backend,
                inner_backend=inner,
            ),
            [t.to("cuda", dtype) for t in tensors],
            weight.cuda(),
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ref, ref_grads = _run_with_grads(
        lambda qd, qs, k, v: reference_dipe(qd, qs, k, v, visual, doc_ids, SCALE),
        [t.to(dtype).double() for t in tensors],
        weight,
    )
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=rtol)
    for name, grad, ref_grad in zip(["q_dyn", "q_sta", "k", "v"], grads, ref_grads):
        torch.testing.assert_close(
            grad.cpu().double(), ref_grad, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}"
        )
