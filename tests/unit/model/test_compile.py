"""`model.compile`: the LLM's RMSNorms and SwiGLU products run compiled (inductor, CPU here), everything else eager.

Reference: the same installed model without compilation (same weights, same packed rows, DIPE on, every layer
recomputed as the real configs do). fp32, so the fused kernels may only differ by reassociation (~1e-6).
"""

from __future__ import annotations

import copy

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from mmrope.distributed.compile import FusedSwiGLU, compile_decoder, compiled_modules
from mmrope.distributed.recompute import apply_activation_checkpointing
from mmrope.encodings import anchored_positions, build
from mmrope.model.install import install, seam_kwargs
from tests.unit.model.tiny import TOKENS, image_sample, pixels, tiny_family, tiny_qwen2_5_vl


def _packed_row(lengths_seed: int):
    a, ga = image_sample(3, (4, 4), 5 + lengths_seed, seed=1)
    b = torch.randint(2, 50, (7 + lengths_seed,), generator=torch.Generator().manual_seed(lengths_seed))
    ids_L = torch.cat([a, b])
    cu = torch.tensor([0, len(a), len(a) + len(b)])
    return ids_L[None], ga, cu


def _loss_and_grads(model, enc, ids_BL, grid, cu):
    pos_3BL = enc.packed_position_ids(ids_BL[0], cu, tokens=TOKENS, image_grid_thw=grid)[:, None]
    visual_BL = ids_BL == TOKENS.image_token_id
    static = anchored_positions(pos_3BL, visual_BL, cu_seqlens=cu)
    kw = seam_kwargs(cu_seqlens=cu, static_position_ids=static, visual_mask_BL=visual_BL)
    logits = model(
        input_ids=ids_BL, position_ids=pos_3BL, pixel_values=pixels(grid, seed=3), image_grid_thw=grid, **kw
    ).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids_BL[0, 1:])
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_decoder_matches_eager_with_stock_keys_and_one_graph_per_kind():
    torch._dynamo.reset()
    enc = build("mrope", mrope_section=[2, 3, 3])
    eager = install(tiny_qwen2_5_vl(), enc, dipe=True)
    compiled = copy.deepcopy(eager)
    for m in (eager, compiled):
        apply_activation_checkpointing(m, "all")
        m.train()
    keys_before = list(compiled.state_dict())
    names = compile_decoder(compiled)
    num_layers = len(compiled.model.language_model.layers)
    expected = [
        f"layers.{i}.{n}"
        for i in range(num_layers)
        for n in ("input_layernorm", "mlp", "post_attention_layernorm")
    ] + ["norm"]
    assert names == expected == compiled_modules(compiled)
    assert all(isinstance(layer.mlp, FusedSwiGLU) for layer in compiled.model.language_model.layers)
    assert list(compiled.state_dict()) == keys_before  # checkpoints and exports stay stock
    assert compile_decoder(compiled) == names  # idempotent: nothing wrapped twice

    counters.clear()
    for seed in (0, 4):  # two row lengths: the second compiles once more, with a dynamic length
        row = _packed_row(seed)
        ref_loss, ref_grads = _loss_and_grads(eager, enc, *row)
        loss, grads = _loss_and_grads(compiled, enc, *row)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # Layers share their graphs: one norm graph and one SwiGLU graph, each static then dynamic; a compiled graph per
    # layer (guards on module identity) would show up here as many more.
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_moe_blocks_stay_eager_and_norms_compile():
    model = tiny_family("qwen3_vl_moe")
    names = compile_decoder(model)
    assert names == [
        "layers.0.input_layernorm",
        "layers.0.post_attention_layernorm",
        "layers.1.input_layernorm",
        "layers.1.post_attention_layernorm",
        "norm",
    ]
    assert not any(isinstance(layer.mlp, FusedSwiGLU) for layer in model.model.language_model.layers)
