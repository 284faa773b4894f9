"""packed_attention == each sample run alone through a plain causal softmax (written here), fwd and bwd."""

from __future__ import annotations

import pytest
import torch

from mmrope.attention import (
    TORCH_VARLEN,
    TORCH_VARLEN_REASON,
    causal_doc_mask,
    cu_seqlens_from_doc_ids,
    doc_ids_from_attention_mask,
    doc_ids_from_cu_seqlens,
    flex_attention_call,
    flex_block_mask,
    normalize_doc_ids,
    packed_attention,
)

CPU_BACKENDS = ["eager", "sdpa", "sdpa_varlen"]
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16
# Two rows of 40 tokens; row 0 holds three samples, row 1 two (the last one could be padding).
SAMPLE_LENGTHS = [[13, 1, 26], [31, 9]]
SEQ_LEN = 40


def _doc_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    rows = []
    next_id = 0
    for lengths in lengths_per_row:
        row = []
        for n in lengths:
            row += [next_id] * n
            next_id += 1
        rows.append(row)
    return torch.tensor(rows)


def _per_sample_reference(q, k, v, lengths_per_row, scale):
    """Each sample alone: repeat KV heads for GQA, lower-triangular softmax; result [B, L, H, D]."""
    group = q.shape[1] // k.shape[1]
    rows = []
    for b, lengths in enumerate(lengths_per_row):
        outs, start = [], 0
        for n in lengths:
            qs = q[b, :, start : start + n]
            ks = k[b, :, start : start + n].repeat_interleave(group, dim=0)
            vs = v[b, :, start : start + n].repeat_interleave(group, dim=0)
            scores = qs @ ks.transpose(-1, -2) * scale
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            outs.append((probs @ vs).transpose(0, 1))  # [n, H, D]
            start += n
        rows.append(torch.cat(outs, dim=0))
    return torch.stack(rows)


def _random_qkv(seed: int, num_rows: int = 2, seq_len: int = SEQ_LEN):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_rows, NUM_HEADS, seq_len, HEAD_DIM, generator=gen)
    k = torch.randn(num_rows, NUM_KV_HEADS, seq_len, HEAD_DIM, generator=gen)
    v = torch.randn(num_rows, NUM_KV_HEADS, seq_len, HEAD_DIM, generator=gen)
    return q, k, v


def _grads(fn, tensors, weight):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("packing", ["doc_ids", "cu_seqlens"])
def test_packed_matches_per_sample_forward_and_backward(backend: str, packing: str) -> None:
    q, k, v = _random_qkv(0)
    scale = HEAD_DIM**-0.5
    doc_ids = _doc_ids(SAMPLE_LENGTHS)
    cu_seqlens, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    kwargs = (
        {"doc_ids_BL": doc_ids}
        if packing == "doc_ids"
        else {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    )
    weight = torch.randn(2, SEQ_LEN, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))

    out, grads = _grads(
        lambda q, k, v: packed_attention(q, k, v, scale=scale, backend=backend, **kwargs), (q, k, v), weight
    )
    ref, ref_grads = _grads(
        lambda q, k, v: _per_sample_reference(q, k, v, SAMPLE_LENGTHS, scale),
        (q.double(), k.double(), v.double()),
        weight,
    )
    assert out.shape == (2, SEQ_LEN, NUM_HEADS, HEAD_DIM)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=0, msg=f"d{name} ({backend})")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_sample_per_row_is_plain_causal(backend: str) -> None:
    q, k, v = _random_qkv(2)
    scale = 0.3
    ref = _per_sample_reference(q.double(), k.double(), v.double(), [[SEQ_LEN], [SEQ_LEN]], scale)
    out = packed_attention(q, k, v, doc_ids_BL=None, scale=scale, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_attention_across_samples(backend: str) -> None:
    q, k, v = _random_qkv(3)
    doc_ids = _doc_ids(SAMPLE_LENGTHS)
    out = packed_attention(q, k, v, doc_ids_BL=doc_ids, scale=0.25, backend=backend)
    # Perturb V (and K) of row 0's middle sample (token 13) only: every other token must be bit-for-bit stable
    # up to kernel rounding, and the perturbed sample itself must change.
    k2, v2 = k.clone(), v.clone()
    v2[0, :, 13] += 10.0
    k2[0, :, 13] -= 3.0
    out2 = packed_attention(q, k2, v2, doc_ids_BL=doc_ids, scale=0.25, backend=backend)
    changed = (out2 - out).abs().amax(dim=(2, 3))  # [B, L]
    assert changed[0, 13] > 1.0
    changed[0, 13] = 0.0
    assert changed.max() < 1e-6


def test_normalized_doc_ids_split_repeated_ids() -> None:
    # Id 0 reappearing after id 1 is a NEW sample (runs), the partition flash varlen would see.
    doc_ids = torch.tensor([[0, 0, 1, 1, 0, 0]])
    assert normalize_doc_ids(doc_ids).tolist() == [[0, 0, 1, 1, 2, 2]]
    q, k, v = _random_qkv(4, num_rows=1, seq_len=6)
    ref = _per_sample_reference(q.double(), k.double(), v.double(), [[2, 2, 2]], 0.5)
    for backend in CPU_BACKENDS:
        out = packed_attention(q, k, v, doc_ids_BL=doc_ids, scale=0.5, backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_cu_seqlens_round_trip_and_validation() -> None:
    doc_ids = _doc_ids(SAMPLE_LENGTHS)
    cu_seqlens, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 13, 14, 40, 71, 80]
    assert max_seqlen == 31
    assert torch.equal(doc_ids_from_cu_seqlens(cu_seqlens, SEQ_LEN), doc_ids)
    assert torch.equal(doc_ids_from_cu_seqlens(cu_seqlens, SEQ_LEN, num_rows=2), doc_ids)
    with pytest.raises(ValueError, match="crosses the row"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 13, 50, 80], dtype=torch.int32), SEQ_LEN)
    with pytest.raises(ValueError, match="end at B\\*L"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 13, 40], dtype=torch.int32), SEQ_LEN, num_rows=2)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 13, 41], dtype=torch.int32), SEQ_LEN)


def test_doc_ids_from_attention_mask_makes_padding_its_own_sample() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert doc_ids_from_attention_mask(mask).tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_causal_doc_mask_matches_loops() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    mask = causal_doc_mask(doc_ids, 6)
    assert mask.shape == (2, 1, 6, 6)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert bool(mask[b, 0, i, j]) == (j <= i and doc_ids[b, i] == doc_ids[b, j])


def test_flex_block_mask_dense_equals_causal_doc_mask() -> None:
    from torch.nn.attention.flex_attention import create_mask

    doc_ids = _doc_ids(SAMPLE_LENGTHS)
    block_mask = flex_block_mask(doc_ids, SEQ_LEN, block_size=16)
    dense = create_mask(block_mask.mask_mod, 2, 1, SEQ_LEN, SEQ_LEN, device="cpu")
    assert torch.equal(dense, causal_doc_mask(doc_ids, SEQ_LEN))


def test_flex_unfused_forward_matches_reference() -> None:
    """The flex backend's mask is right (CPU can only run FlexAttention's unfused forward; CUDA runs the kernel)."""
    q, k, v = _random_qkv(5)
    doc_ids = _doc_ids(SAMPLE_LENGTHS)
    block_mask = flex_block_mask(doc_ids, SEQ_LEN)
    with torch.no_grad():
        out = flex_attention_call(q, k, v, block_mask, 0.25, compiled=False).transpose(1, 2)
    ref = _per_sample_reference(q.double(), k.double(), v.double(), SAMPLE_LENGTHS, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["varlen", "flex", "flash"])
def test_gpu_only_backends_refuse_cpu(backend: str) -> None:
    q, k, v = _random_qkv(6)
    with pytest.raises(ValueError, match="CUDA"):
        packed_attention(q, k, v, doc_ids_BL=_doc_ids(SAMPLE_LENGTHS), scale=0.25, backend=backend)


def test_user_errors_name_the_argument() -> None:
    q, k, v = _random_qkv(7)
    with pytest.raises(ValueError, match="backend"):
        packed_attention(q, k, v, scale=0.25, backend="cudnn")
    with pytest.raises(ValueError, match="doc_ids_BL"):
        packed_attention(q, k, v, doc_ids_BL=torch.zeros(2, 7, dtype=torch.long), scale=0.25)
    with pytest.raises(ValueError, match="kv heads"):
        packed_attention(q[:, :3], k, v, scale=0.25)
    with pytest.raises(ValueError, match="dropout_p"):
        packed_attention(q, k, v, scale=0.25, dropout_p=1.5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dropout_is_applied_in_training(backend: str) -> None:
    q, k, v = _random_qkv(8)
    plain = packed_attention(q, k, v, scale=0.25, backend=backend)
    torch.manual_seed(0)
    dropped = packed_attention(q, k, v, scale=0.25, backend=backend, dropout_p=0.5)
    assert (dropped - plain).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_varlen", "varlen", "auto", "flex", "flash"])
def test_cuda_backends_match_per_sample_forward_and_backward(backend: str) -> None:
    if backend == "flash":
        pytest.importorskip("flash_attn")
    if backend in ("varlen", "auto") and TORCH_VARLEN is None:
        pytest.skip(f"no torch varlen kernel: {TORCH_VARLEN_REASON}")
    # FlashAttention kernels (flash-attn's, torch's varlen; auto picks the latter in bf16) only run in half
    # precision: compare in bf16 with a bf16-sized tolerance; the rest in fp32.
    half = backend in ("flash", "varlen", "auto")
    # bf16: an absolute floor plus torch's bf16 relative tolerance (outputs and gradients are written in bf16).
    dtype, atol, rtol = (torch.bfloat16, 3e-2, 1.6e-2) if half else (torch.float32, 1e-4, 0.0)
    q, k, v = _random_qkv(9)
    scale = HEAD_DIM**-0.5
    doc_ids = _doc_ids(SAMPLE_LENGTHS)
    weight = torch.randn(2, SEQ_LEN, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, grads = _grads(
            lambda q, k, v: packed_attention(
                q, k, v, doc_ids_BL=doc_ids.cuda(), scale=scale, backend=backend
            ),
            [t.to("cuda", dtype) for t in (q, k, v)],
            weight.cuda(),
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ref, ref_grads = _grads(
        lambda q, k, v: _per_sample_reference(q, k, v, SAMPLE_LENGTHS, scale),
        [t.to(dtype).double() for t in (q, k, v)],
        weight,
    )
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=rtol)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(
            grad.cpu().double(),
            ref_grad,
            atol=atol,
            rtol=rtol,
            msg=lambda m, name=name: f"d{name} ({backend}): {m}",
        )
