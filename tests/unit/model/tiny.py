"""Tiny fp32 CPU VLMs and inputs shared by the seam tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mmrope.encodings import TokenIds

VOCAB = 64
TOKENS = TokenIds(image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
PAD_ID = 0


def tiny_qwen2_5_vl(
    *,
    num_kv_heads: int = 1,
    num_heads: int = 2,
    head_dim: int = 16,
    mrope_section: list[int] | None = None,
    attn: str = "sdpa",
    seed: int = 0,
) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB,
        hidden_size=num_heads * head_dim,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=64,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section or [2, 3, 3],
        },
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=1,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        out_hidden_size=num_heads * head_dim,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        fullatt_block_indexes=[0],
        window_size=112,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=TOKENS.image_token_id,
        video_token_id=TOKENS.video_token_id,
        vision_start_token_id=TOKENS.vision_start_token_id,
        vision_end_token_id=TOKENS.vision_end_token_id,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=1,
    )
    config._attn_implementation = attn
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    return model


def image_sample(
    num_before: int, grid_hw: tuple[int, int], num_after: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [L] = text, VS, image placeholders (grid / merge^2), VE, text; and its grid_thw [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid_hw
    n_img = (h // 2) * (w // 2)
    ids = torch.cat(
        [
            torch.randint(2, 50, (num_before,), generator=g),
            torch.tensor([TOKENS.vision_start_token_id]),
            torch.full((n_img,), TOKENS.image_token_id),
            torch.tensor([TOKENS.vision_end_token_id]),
            torch.randint(2, 50, (num_after,), generator=g),
        ]
    )
    return ids, torch.tensor([[1, h, w]])


def pixels(grid_thw: torch.Tensor, seed: int) -> torch.Tensor:
    """Random patches for the ViT: sum(t*h*w) rows of 3 * temporal_patch * patch^2 features."""
    g = torch.Generator().manual_seed(seed)
    n = int(grid_thw.prod(-1).sum())
    return torch.randn(n, 3 * 2 * 14 * 14, generator=g)


SPECIAL_IDS = {
    "image_token_id": TOKENS.image_token_id,
    "video_token_id": TOKENS.video_token_id,
    "vision_start_token_id": TOKENS.vision_start_token_id,
    "vision_end_token_id": TOKENS.vision_end_token_id,
    "pad_token_id": PAD_ID,
    "eos_token_id": 1,
}


def tiny_family(
    family: str,
    *,
    head_dim: int = 16,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    attn: str = "sdpa",
    seed: int = 0,
):
    """A fp32 eval-mode `family` model from `mmrope.model.families.tiny_config` (the same builder train.py uses)
    at test sizes: 2 layers (Qwen3.5: one gated delta-net + one attention layer), 8 rotary pairs at head_dim 16
    (Qwen3.5: head_dim 64 with partial_rotary_factor 0.25), a 1-block ViT on 14-pixel patches."""
    from mmrope.model.config import TinyModelConfig
    from mmrope.model.families import FAMILIES, tiny_config

    tiny = TinyModelConfig(
        hidden_size=num_heads * head_dim,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=64,
        rope_theta=10000.0,
        vision_depth=1,
        vision_hidden_size=16,
        vision_num_heads=2,
        vision_intermediate_size=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    config = tiny_config(family, tiny, vocab_size=VOCAB, special_ids=SPECIAL_IDS)
    config._attn_implementation = attn
    return FAMILIES[family].model_class(config).float().eval()


def video_sample(num_before: int, grid_thw: tuple[int, int, int], num_after: int, seed: int):
    """ids [L] = text, VS, one contiguous block of video placeholders (t * h * w / merge^2), VE, text (the
    qwen2 / qwen2_5 layout); and its grid_thw [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid_thw
    ids = torch.cat(
        [
            torch.randint(2, 50, (num_before,), generator=g),
            torch.tensor([TOKENS.vision_start_token_id]),
            torch.full((t * (h // 2) * (w // 2),), TOKENS.video_token_id),
            torch.tensor([TOKENS.vision_end_token_id]),
            torch.randint(2, 50, (num_after,), generator=g),
        ]
    )
    return ids, torch.tensor([grid_thw])
