"""FLOPs counter: hand counts on tiny configs, packing, and parity with transformers' architectures."""

from __future__ import annotations

import pytest
import torch

from mmrope.train.flops import (
    LLMShape,
    ViTShape,
    connector_flops,
    llm_flops,
    llm_flops_breakdown,
    mfu,
    shapes_from_hf_config,
    step_flops,
    vit_attention_seqlens,
    vit_flops,
)

TINY_LLM = LLMShape(
    num_layers=2, hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4, vocab=10
)
TINY_VIT = ViTShape(
    depth=2,
    hidden=4,
    intermediate=6,
    num_heads=2,
    patch_size=2,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
    out_hidden=8,
)
# One image of 1x4x4 patches and one video of 2 frames x 2x4 patches.
GRID_THW = torch.tensor([[1, 4, 4], [2, 2, 4]])


def test_llm_hand_count():
    # Per token per layer (q_width = 2 heads * 4 = 8, kv_width = 1 * 4 = 4):
    #   q_proj 2*8*8 = 128, k_proj + v_proj 2*2*8*4 = 128, o_proj 2*8*8 = 128, MLP 3*2*8*16 = 768 -> 1152
    # 8 tokens (samples of 3 and 5), 2 layers: 1152 * 8 * 2 = 18432 forward
    # Attention per layer: 2*2 * (3^2/2 + 5^2/2) * 8 = 4 * 17 * 8 = 544; 2 layers: 1088 forward
    # LM head on 4 supervised tokens: 2*8*10*4 = 640 forward; on all 8 tokens: 1280
    parts = llm_flops_breakdown(TINY_LLM, [3, 5], num_supervised_tokens=4)
    assert parts == {"llm": 3 * 18432, "attention": 3 * 1088, "lm_head": 3 * 640}
    assert llm_flops(TINY_LLM, [3, 5], 4) == 3 * (18432 + 1088 + 640) == 60480
    assert llm_flops(TINY_LLM, torch.tensor([3, 5]), 4, trainable=False) == 18432 + 1088 + 640
    assert llm_flops_breakdown(TINY_LLM, [3, 5], 4, fused_lm_head=False)["lm_head"] == 3 * 1280


def test_packing_two_halves_costs_less_attention_than_one_sample():
    full = llm_flops_breakdown(TINY_LLM, [64], num_supervised_tokens=10)
    packed = llm_flops_breakdown(TINY_LLM, [32, 32], num_supervised_tokens=10)
    assert packed["attention"] == full["attention"] / 2  # 2 * (L/2)^2 = L^2 / 2
    assert packed["llm"] == full["llm"] and packed["lm_head"] == full["lm_head"]


def test_vit_hand_count():
    # 32 patches (16 + 2*8). Patch embed: in = 3 * 2 * 2*2 = 24 -> 2 * 24 * 4 * 32 = 6144
    # Per patch per block: qkv 2*4*12 = 96, proj 2*4*4 = 32, SwiGLU 3*2*4*6 = 144 -> 272
    #   2 blocks: 272*32*2 = 17408
    # Attention segments: image [16], video frames [8, 8] -> 16^2 + 8^2 + 8^2 = 384
    #   per block 2*2*384*4 = 6144; 2 blocks: 12288
    assert vit_attention_seqlens(TINY_VIT, GRID_THW) == ([16, 8, 8], [])
    assert vit_flops(TINY_VIT, GRID_THW) == 6144 + 17408 + 12288 == 35840
    assert vit_flops(TINY_VIT, GRID_THW, backward=True) == 3 * 35840
    # Non-gated MLP (Qwen3-VL style): 2*2*4*6 = 96 instead of 144 per patch per block: -48 * 32 * 2
    plain = ViTShape(**{**TINY_VIT.__dict__, "gated_mlp": False})
    assert vit_flops(plain, GRID_THW) == 35840 - 48 * 32 * 2


def test_vit_window_attention_hand_count():
    # window 8 px / patch 2 / merge 2 = 2 merged tokens per side. Grid 1x6x4 -> merged 3x2
    #   -> window rows [2, 1] x cols [2] -> merged sizes 4, 2 -> patches [16, 8]; full segment [24].
    # 3 blocks, block 2 full: attention = 2*2*24^2*4 * 1 + 2*2*(16^2 + 8^2)*4 * 2 = 9216 + 10240
    vit = ViTShape(**{**TINY_VIT.__dict__, "depth": 3, "window_size": 8, "fullatt_block_indexes": (2,)})
    grid = [[1, 6, 4]]
    assert vit_attention_seqlens(vit, grid) == ([24], [16, 8])
    # Patch embed 2*24*4*24 = 4608; blocks 272 * 24 * 3 = 19584
    assert vit_flops(vit, grid) == 4608 + 19584 + 9216 + 10240


def test_connector_hand_count():
    # 32 patches / 2^2 = 8 merged tokens; width 4 * 4 = 16: 2*16*16 + 2*16*8 = 768 per token -> 6144
    assert connector_flops(TINY_VIT, GRID_THW, trainable=False) == 6144
    assert connector_flops(TINY_VIT, GRID_THW) == 3 * 6144
    deepstack = ViTShape(**{**TINY_VIT.__dict__, "num_deepstack_mergers": 3})
    assert connector_flops(deepstack, GRID_THW, trainable=False) == 4 * 6144


def test_step_flops_and_mfu():
    step = step_flops(TINY_LLM, TINY_VIT, [3, 5], 4, GRID_THW)
    assert step == {
        "llm": 3 * 18432,
        "attention": 3 * 1088,
        "lm_head": 3 * 640,
        "vit": 35840,  # frozen: forward only
        "connector": 3 * 6144,
        "total": 3 * (18432 + 1088 + 640) + 35840 + 3 * 6144,
    }
    text_only = step_flops(TINY_LLM, TINY_VIT, [3, 5], 4, None)
    assert text_only["vit"] == text_only["connector"] == 0 and text_only["total"] == 60480
    assert mfu(1e15, 2.0, 1e15, 4) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="step_seconds"):
        mfu(1.0, 0.0, 1.0, 1)
    with pytest.raises(ValueError, match="num_supervised_tokens"):
        llm_flops(TINY_LLM, [3, 5], 9)


# ------------------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("grid", [[[1, 12, 20]], [[2, 8, 8], [1, 16, 4]], [[1, 2, 2]], [[3, 30, 18]]])
def test_window_segments_match_transformers(grid):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    vit = ViTShape(
        **{**TINY_VIT.__dict__, "patch_size": 14, "window_size": 112, "fullatt_block_indexes": (0,)}
    )
    grid_thw = torch.tensor(grid)
    full, windows = vit_attention_seqlens(vit, grid_thw)
    _, cu_window = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)
    assert windows == torch.diff(cu_window).tolist()
    assert full == torch.diff(get_vision_cu_seqlens(grid_thw)).tolist()


def _linear_weight_numel(module, name_part: str) -> int:
    return sum(
        m.weight.numel()
        for name, m in module.named_modules()
        if name_part in name and isinstance(m, torch.nn.Linear)
    )


def _tiny_qwen_config(kind: str):
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=3,
            hidden_size=16,
            intermediate_size=24,
            num_heads=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=32,
            window_size=112,
            fullatt_block_indexes=[2],
        )
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    from transformers import Qwen3VLConfig

    vision = dict(
        depth=3,
        hidden_size=16,
        intermediate_size=24,
        num_heads=2,
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=32,
        deepstack_visual_indexes=[1],
        num_position_embeddings=16,
    )
    text.update(
        head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e6}
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_counts_match_the_linear_layers_of_the_transformers_model(kind):
    """Forward FLOPs per token = 2 x weights of the Linear layers a token goes through, in the real model."""
    from transformers import AutoModelForImageTextToText

    config = _tiny_qwen_config(kind)
    llm, vit = shapes_from_hf_config(config)
    model = AutoModelForImageTextToText.from_config(config)

    decoder_weights = _linear_weight_numel(model, "language_model.layers")
    assert llm_flops_breakdown(llm, [1], 0, trainable=False)["llm"] == 2 * decoder_weights
    assert llm_flops_breakdown(llm, [1], 1, trainable=False)["lm_head"] == 2 * model.lm_head.weight.numel()

    block_weights = _linear_weight_numel(model, "visual.blocks")
    patch_embed = next(m for n, m in model.named_modules() if n.endswith("patch_embed.proj"))
    # 2x2 patches = one merged token = one window: per block attention 2*2*4^2*hidden, in every block.
    four_patches = [[1, 2, 2]]
    per_patch_linear = 2 * (block_weights + patch_embed.weight.numel())
    assert vit_flops(vit, four_patches) == 4 * per_patch_linear + 2 * 2 * 4**2 * vit.hidden * vit.depth

    merger_weights = _linear_weight_numel(model, "visual.merger") + _linear_weight_numel(
        model, "deepstack_merger"
    )
    merged_grid = [[1, 2, 2]]  # 4 patches -> 1 merged token
    assert connector_flops(vit, merged_grid, trainable=False) == 2 * merger_weights
    assert vit.gated_mlp == (kind == "qwen2_5_vl")
    assert vit.num_deepstack_mergers == (1 if kind == "qwen3_vl" else 0)
    assert (vit.window_size, vit.fullatt_block_indexes) == (
        (112, (2,)) if kind == "qwen2_5_vl" else (None, ())
    )


def test_shapes_from_flat_qwen2_5_vl_7b_numbers():
    """Published Qwen2.5-VL-7B sizes; the decoder's linear weights come to the known ~6.5B."""
    from types import SimpleNamespace

    text = SimpleNamespace(
        num_hidden_layers=28,
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    )
    vision = SimpleNamespace(
        model_type="qwen2_5_vl",
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        patch_size=14,
        temporal_patch_size=2,
        in_channels=3,
        spatial_merge_size=2,
        out_hidden_size=3584,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    llm, vit = shapes_from_hf_config(SimpleNamespace(text_config=text, vision_config=vision))
    assert llm == LLMShape(28, 3584, 18944, 28, 4, 128, 152064)
    assert vit.window_size == 112 and vit.fullatt_block_indexes == (7, 15, 23, 31) and vit.gated_mlp
    decoder_params = llm_flops_breakdown(llm, [1], 0, trainable=False)["llm"] / 2
    assert 6.4e9 < decoder_params < 6.6e9


def test_moe_and_delta_net_hand_count():
    """Qwen3.5-MoE-like: 1 gated-attention + 1 delta-net layer, MoE (4 experts, top-2, shared expert) in both."""
    shape = LLMShape(
        num_layers=2,
        hidden=8,
        intermediate=0,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        vocab=10,
        attn_output_gate=True,
        num_linear_layers=1,
        linear_num_k_heads=1,
        linear_num_v_heads=2,
        linear_head_k_dim=2,
        linear_head_v_dim=3,
        num_moe_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate=5,
        shared_expert_intermediate=6,
    )
    # attention layer: q_proj (+gate) 2*8*8*2 = 256, k/v 2*2*8*4 = 128, o 2*8*8 = 128 -> 512
    # delta-net layer (key dim 2, value dim 6): qkv 2*8*10 = 160, z 2*8*6 = 96, b/a 2*2*8*2 = 64, out 2*6*8 = 96,
    #   delta rule 3*2 * 2 heads * 2 * 3 = 72 -> 488
    # MoE per layer: router 2*8*4 = 64, 2 experts 2*3*2*8*5 = 480, shared 3*2*8*6 + gate 2*8 = 304 -> 848, x2 = 1696
    # per token 512 + 488 + 1696 = 2696; 8 tokens -> 21568. Attention only in 1 layer: 2*2*(9/2 + 25/2)*8 = 544.
    parts = llm_flops_breakdown(shape, [3, 5], num_supervised_tokens=4, trainable=False)
    assert parts == {"llm": 21568, "attention": 544, "lm_head": 640}


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen2_vl"])
def test_llm_flops_match_the_built_models_active_weights(family):
    """Forward FLOPs per token / 2 = the matmul weights a token meets in the real transformers model: every 2-D
    decoder weight, MoE experts at top-k of num_experts (active, not total), plus the delta rule's state term."""
    from mmrope.model.config import TinyModelConfig
    from mmrope.model.families import FAMILIES, tiny_config

    ids = dict.fromkeys(
        ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), 1
    )
    config = tiny_config(
        family, TinyModelConfig(), vocab_size=64, special_ids=ids | {"pad_token_id": 0, "eos_token_id": 0}
    )
    model = FAMILIES[family].model_class(config)
    llm, _ = shapes_from_hf_config(config)
    text = config.text_config
    active = 0.0
    for name, p in model.model.language_model.layers.named_parameters():
        if "experts" in name and "shared_expert" not in name:
            active += p.numel() * text.num_experts_per_tok / text.num_experts
        elif p.ndim >= 2 and "conv1d" not in name:
            active += p.numel()
    delta_rule = (
        llm.num_linear_layers * 3 * 2 * llm.linear_num_v_heads * llm.linear_head_k_dim * llm.linear_head_v_dim
    )
    per_token = llm_flops_breakdown(llm, [1], 0, trainable=False)["llm"]
    assert per_token == 2 * active + delta_rule
