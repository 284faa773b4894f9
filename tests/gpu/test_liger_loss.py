"""`loss.backend=liger` against the built-in chunked loss on CUDA: loss and gradients of hidden and weight.

Both backends get the same inputs through `linear_cross_entropy`, which selects the supervised rows first (ignored
rows are present here and must cost nothing and contribute nothing) and divides the summed loss by a global token
count larger than this call's own (as with other ranks and micro steps). An fp64 run of the chunked loss is the
truth for bf16, where neither backend can be exact.

Tolerances, and why:
- fp32: the same arithmetic in the same precision, only summed in other orders (Liger walks the rows in its own
  chunks and reduces inside a Triton kernel): 1e-5 relative (the loss, and the norm of each gradient's
  difference) is ~40x what the chunked loss itself shows between 16-row and 4096-row chunks (2.6e-7), and any
  real mistake (a missed or extra row, another normalisation) is >= 1e-1.
- bf16: both round the logits and their gradient to bf16 and take the softmax in fp32. Liger also accumulates
  the weight gradient in bf16 over its k row chunks (k = 44 here: chunks of next_pow2(ceil(n / ceil(V / D))) = 16
  rows), the chunked loss in one matmul (n <= loss.chunk_size). The chunked loss run with 16-row chunks (the
  same bf16 accumulation) measures, against the fp64 truth: loss 3.3e-6, hidden gradient 2.2e-3, weight gradient
  2.8e-3 (2.2e-3 in one chunk). Bounds: hidden gradient within 1e-2, weight gradient within 1e-2 (chunked) and
  2e-2 (Liger) of the truth, 4-7x those, for other GEMM tilings and Triton's exp on the GPU; the loss (which
  averages the rounding out) within 5e-4 of each other and 2e-3 of the truth.
Skipped without CUDA or liger_kernel (`make wheelhouse` carries it to the GPU box).
"""

from __future__ import annotations

import sys

import pytest
import torch

from mmrope.model.loss import IGNORE_INDEX, liger_unavailable_reason, linear_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
NUM_ROWS, DIM = 1536, 512
VOCAB = 33000  # above Liger's 32768-wide block: its kernel loops over the vocabulary and masks the tail
NUM_SUPERVISED = 700  # the other 836 rows are ignore_index
NUM_GLOBAL = 2500  # supervised tokens of the whole step (all ranks and micro steps), > this call's 700


@pytest.fixture(scope="module", autouse=True)
def liger_here():
    if (reason := liger_unavailable_reason()) is not None:
        pytest.skip(reason)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 (no TF32) for both backends
    yield
    torch.set_float32_matmul_precision(precision)


def make_inputs(dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden_ND = 2.0 * torch.randn(NUM_ROWS, DIM, generator=g)
    weight_VD = torch.randn(VOCAB, DIM, generator=g) / DIM**0.5
    bias_V = 0.1 * torch.randn(VOCAB, generator=g) if bias else None
    labels_N = torch.full((NUM_ROWS,), IGNORE_INDEX, dtype=torch.long)
    supervised = torch.randperm(NUM_ROWS, generator=g)[:NUM_SUPERVISED]
    labels_N[supervised] = torch.randint(0, VOCAB, (NUM_SUPERVISED,), generator=g)
    tensors = [t if t is None else t.to("cuda", dtype) for t in (hidden_ND, weight_VD, bias_V)]
    return *tensors, labels_N.cuda()


def loss_and_grads(backend: str, hidden_ND, weight_VD, bias_V, labels_N, *, dtype=None):
    """(loss, grads of hidden, weight and bias) of fresh leaves, optionally cast to `dtype` first."""
    leaves = [
        None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
        for t in (hidden_ND, weight_VD, bias_V)
    ]
    loss = linear_cross_entropy(
        leaves[0],
        leaves[1],
        labels_N,
        num_global_tokens=NUM_GLOBAL,
        lm_head_bias_V=leaves[2],
        backend=backend,
    )
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss.detach(), list(grads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_fp32_liger_matches_chunked(bias):
    inputs = make_inputs(torch.float32, bias)
    loss_liger, grads_liger = loss_and_grads("liger", *inputs)
    loss_chunked, grads_chunked = loss_and_grads("chunked", *inputs)
    assert loss_liger.dtype == loss_chunked.dtype == torch.float32
    assert rel(loss_liger, loss_chunked) <= 1e-5, (float(loss_liger), float(loss_chunked))
    # Divided by the global count: per supervised token, a loss near ln(V) ~ 10.4 (logits of std 2: ~12.4).
    per_token = float(loss_liger) * NUM_GLOBAL / NUM_SUPERVISED
    assert 10.0 < per_token < 15.0, per_token
    for name, got, want in zip(("hidden", "weight", "bias"), grads_liger, grads_chunked):
        assert got.dtype == want.dtype == torch.float32
        assert rel(got, want) <= 1e-5, (name, rel(got, want))
    ignored = inputs[3] == IGNORE_INDEX
    assert not grads_liger[0][ignored].any()  # ignored rows: exactly zero gradient


def test_bf16_liger_matches_chunked_and_the_fp64_truth():
    inputs = make_inputs(torch.bfloat16, bias=False)
    loss_liger, grads_liger = loss_and_grads("liger", *inputs)
    loss_chunked, grads_chunked = loss_and_grads("chunked", *inputs)
    loss_truth, grads_truth = loss_and_grads("chunked", *inputs, dtype=torch.float64)
    assert loss_liger.dtype == torch.float32
    assert rel(loss_liger, loss_chunked) <= 5e-4, (float(loss_liger), float(loss_chunked))
    assert rel(loss_liger, loss_truth) <= 2e-3 and rel(loss_chunked, loss_truth) <= 2e-3
    (hidden_liger, weight_liger), (hidden_chunked, weight_chunked) = grads_liger, grads_chunked
    assert hidden_liger.dtype == weight_liger.dtype == torch.bfloat16
    assert rel(hidden_liger, hidden_chunked) <= 1e-2
    assert rel(hidden_liger, grads_truth[0]) <= 1e-2
    assert rel(weight_chunked, grads_truth[1]) <= 1e-2
    assert rel(weight_liger, grads_truth[1]) <= 2e-2
    assert not hidden_liger[inputs[3] == IGNORE_INDEX].any()


def test_frozen_llm_with_a_trained_head_still_gets_the_head_gradient():
    """Liger computes the weight gradient only alongside the hidden one: a hidden that needs no gradient (frozen
    LLM, `model.freeze.lm_head=false`) must still give the head its gradient."""
    hidden_ND, weight_VD, _, labels_N = make_inputs(torch.float32, bias=False)
    grads = {}
    for backend in ("liger", "chunked"):
        weight = weight_VD.detach().clone().requires_grad_()
        loss = linear_cross_entropy(
            hidden_ND.detach(), weight, labels_N, num_global_tokens=NUM_GLOBAL, backend=backend
        )
        (grads[backend],) = torch.autograd.grad(loss, [weight])
    assert grads["liger"].abs().sum() > 0
    assert rel(grads["liger"], grads["chunked"]) <= 1e-5


def test_liger_leaves_transformers_rotary_alone():
    """Only Liger's loss function is used: no `apply_liger_kernel_to_*` patch replaced anything of transformers'
    Qwen-VL modelling code (rotary embedding, RMSNorm, MLP, forward), which mmrope's seam relies on."""
    from mmrope.model.families import FAMILIES
    from mmrope.train.config import validate
    from tests.unit.test_configs import compose_cfg

    assert validate(compose_cfg(["loss.backend=liger"])).loss.backend == "liger"  # accepted here
    loss_and_grads("liger", *make_inputs(torch.float32, bias=False))
    modules = {sys.modules[f.model_class.__module__] for f in FAMILIES.values()}
    assert all(hasattr(m, "apply_rotary_pos_emb") for m in modules)  # what a rotary patch would replace
    patched = []
    for module in modules:
        for name, value in vars(module).items():
            origin = getattr(value, "__module__", "") or ""
            if origin.startswith("liger_kernel"):
                patched.append(f"{module.__name__}.{name}")
            for attr, member in vars(value).items() if isinstance(value, type) else ():
                if (getattr(member, "__module__", "") or "").startswith("liger_kernel"):
                    patched.append(f"{module.__name__}.{name}.{attr}")
    assert patched == []
