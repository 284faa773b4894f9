"""Qwen3-VL through the seam: MRoPE-I installed gives the stock model's logits (its native encoding)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mmrope.encodings import TokenIds, build
from mmrope.model.install import install, seam_kwargs

TOK = TokenIds(image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)


def tiny_qwen3_vl(seed: int = 0) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=64,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=1,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=TOK.image_token_id,
        video_token_id=TOK.video_token_id,
        vision_start_token_id=TOK.vision_start_token_id,
        vision_end_token_id=TOK.vision_end_token_id,
    )
    config._attn_implementation = "eager"
    return Qwen3VLForConditionalGeneration(config).eval()


def sample(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 6]])  # 6 merged tokens
    ids = torch.cat(
        [
            torch.randint(2, 60, (5,), generator=g),
            torch.tensor([62] + [60] * 6 + [63]),
            torch.randint(2, 60, (7,), generator=g),
        ]
    )[None]
    pixels = torch.randn(24, 3 * 2 * 16 * 16, generator=g)
    mm_types = (ids == TOK.image_token_id).int()
    return ids, grid, pixels, mm_types


@pytest.mark.parametrize("spatial_reset", [False])
def test_mrope_i_installed_equals_stock_qwen3_vl(spatial_reset):
    ids, grid, pixels, mm_types = sample()
    stock = tiny_qwen3_vl()
    with torch.no_grad():
        hf_pos, _ = stock.model.get_rope_index(ids, mm_types, image_grid_thw=grid)
        ref = stock(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, position_ids=hf_pos).logits

    enc = build("mrope_i", mrope_section=[6, 5, 5], spatial_reset=spatial_reset)
    pos_3BL, _ = enc.position_ids(ids, tokens=TOK, image_grid_thw=grid, layout="qwen3")
    assert torch.equal(pos_3BL.long(), hf_pos.long()), "MRoPE-I positions differ from transformers' Qwen3-VL"

    model = install(tiny_qwen3_vl(), enc, attn_backend="eager")
    with torch.no_grad():
        kwargs = seam_kwargs(cu_seqlens=torch.tensor([0, ids.shape[1]], dtype=torch.int32))
        out = model(
            input_ids=ids, pixel_values=pixels, image_grid_thw=grid, position_ids=pos_3BL, **kwargs
        ).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # Stock keys: the installed model saves the same state dict (q_norm/k_norm reused, nothing added).
    assert set(model.state_dict()) == set(tiny_qwen3_vl().state_dict())
