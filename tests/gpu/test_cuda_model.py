"""On CUDA, the installed model's default path equals the eager reference on a packed row (forward and backward).

`attn_backend="auto"` is what every model config uses: in bf16 on CUDA it must pick torch's own varlen
FlashAttention (nothing to compile), for MRoPE and for DIPE (routed, 2D-wide q/k), and give the same logits and
parameter gradients as the same model with `attn_backend="eager"` (explicit masks and an fp32 softmax) up to
bf16 rounding. In fp32, `auto` picks per-sample SDPA and must agree to fp32 rounding. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mmrope.attention import TORCH_VARLEN, resolve_backend
from mmrope.distributed.compile import compile_decoder
from mmrope.distributed.recompute import apply_activation_checkpointing
from mmrope.encodings import anchored_positions, build
from mmrope.model.install import install, seam_kwargs
from tests.unit.model.tiny import TOKENS, image_sample, pixels, tiny_qwen2_5_vl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
HEAD_DIM = 32  # rotary sections [4, 6, 6]; the DIPE routed width 64 fits the FlashAttention kernels


def _packed_row():
    a, ga = image_sample(5, (4, 4), 9, seed=1)
    b = torch.randint(2, 50, (13,), generator=torch.Generator().manual_seed(2))
    c, gc = image_sample(3, (4, 6), 6, seed=3)
    ids_L = torch.cat([a, b, c])
    grid = torch.cat([ga, gc])
    cu = torch.tensor([0, len(a), len(a) + len(b), len(ids_L)], dtype=torch.int32)
    px = torch.cat([pixels(ga, seed=1), pixels(gc, seed=3)])
    return ids_L, grid, cu, px


def _loss_and_grads(backend: str, dipe: bool, dtype: torch.dtype, compiled: bool = False):
    enc = build("mrope", mrope_section=[4, 6, 6])
    model = tiny_qwen2_5_vl(num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM, mrope_section=[4, 6, 6], seed=0)
    install(model, enc, attn_backend=backend, dipe=dipe)
    model = model.to("cuda", dtype).train()
    if compiled:  # model.compile: RMSNorms and SwiGLU products through inductor (triton kernels on CUDA)
        apply_activation_checkpointing(model, "all")
        compile_decoder(model)
    ids_L, grid, cu, px = _packed_row()
    pos_3BL = enc.packed_position_ids(ids_L, cu, tokens=TOKENS, image_grid_thw=grid)[:, None]
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    kw = seam_kwargs(cu_seqlens=cu.cuda(), max_seqlen=max_seqlen)
    if dipe:
        visual_1L = (ids_L == TOKENS.image_token_id)[None]
        static = anchored_positions(pos_3BL, visual_1L, cu_seqlens=cu)
        kw |= seam_kwargs(static_position_ids=static.cuda(), visual_mask_BL=visual_1L.cuda())
    logits = model(
        input_ids=ids_L[None].cuda(),
        position_ids=pos_3BL.cuda(),
        pixel_values=px.to("cuda", dtype),
        image_grid_thw=grid.cuda(),
        **kw,
    ).logits[0]
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)).cuda()
    (logits.float() * weight).sum().backward()
    grads = {
        n: p.grad.float().cpu()
        for n, p in model.named_parameters()
        if p.grad is not None and "language_model" in n
    }
    return logits.float().cpu(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.skipif(TORCH_VARLEN is None, reason="this torch has no torch.nn.attention.varlen")
def test_auto_picks_torch_varlen_in_bf16_and_fp32_falls_back():
    q = torch.zeros(1, 2, 8, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q) == "varlen"
    assert resolve_backend("auto", q.float()) == "sdpa_varlen"
    assert resolve_backend("auto", q, dropout_p=0.1) == "sdpa_varlen"


@pytest.mark.skipif(TORCH_VARLEN is None, reason="this torch has no torch.nn.attention.varlen")
@pytest.mark.parametrize("dipe", [False, True], ids=["mrope", "dipe"])
def test_auto_bf16_equals_eager_on_packed_row(dipe: bool):
    # Same bf16 weights and inputs: only the attention kernel differs (bf16 rounding of P and the output).
    _assert_bf16_close(
        _loss_and_grads("auto", dipe, torch.bfloat16), _loss_and_grads("eager", dipe, torch.bfloat16)
    )


def _assert_bf16_close(out, ref) -> None:
    (logits, grads), (ref_logits, ref_grads) = out, ref
    assert torch.isfinite(logits).all()
    assert _rel(logits, ref_logits) < 2e-2
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert _rel(grads[name], ref_grads[name]) < 5e-2, name


@pytest.mark.parametrize("dipe", [False, True], ids=["mrope", "dipe"])
def test_auto_fp32_equals_eager_on_packed_row(dipe: bool):
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        logits, grads = _loss_and_grads("auto", dipe, torch.float32)
        ref_logits, ref_grads = _loss_and_grads("eager", dipe, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.skipif(TORCH_VARLEN is None, reason="this torch has no torch.nn.attention.varlen")
def test_compiled_decoder_bf16_equals_eager_path():
    """`model.compile=true` on the GPU's real path (bf16, varlen attention, recompute, DIPE): the fused triton
    norms/SwiGLU skip some intermediate bf16 roundings, so agreement is to bf16 noise, not bitwise."""
    _assert_bf16_close(
        _loss_and_grads("auto", True, torch.bfloat16, compiled=True),
        _loss_and_grads("auto", True, torch.bfloat16),
    )


@pytest.mark.skipif(TORCH_VARLEN is None, reason="this torch has no torch.nn.attention.varlen")
@torch.no_grad()
def test_vision_tower_varlen_bf16_equals_stock_sdpa():
    """`auto` gives the ViT one varlen FlashAttention call per layer over all windows/images (bf16, CUDA)."""
    enc = build("mrope", mrope_section=[2, 3, 3])
    stock = tiny_qwen2_5_vl(seed=4).to("cuda", torch.bfloat16)
    installed = install(tiny_qwen2_5_vl(seed=4), enc).to("cuda", torch.bfloat16)
    assert installed.config.vision_config._attn_implementation == "mmrope_flash_vision"
    grid = torch.tensor([[1, 16, 20], [1, 4, 4], [2, 8, 12]]).cuda()
    px = pixels(grid.cpu(), seed=9).to("cuda", torch.bfloat16)
    ref = stock.model.get_image_features(px, grid, return_dict=True).pooler_output
    out = installed.model.get_image_features(px, grid, return_dict=True).pooler_output
    ref, out = (torch.cat(list(x)) if isinstance(x, (list, tuple)) else x for x in (ref, out))
    assert _rel(out.float().cpu(), ref.float().cpu()) < 2e-2
