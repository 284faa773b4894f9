"""Build the VLM with the real transformers classes: tiny from config, a local checkpoint, or composed.

Architecture only: no DeepSpeed, no distributed calls, no logging of metrics here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from mmrope.model.config import ModelConfig, TinyModelConfig

FAMILY_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}


def tiny_config(
    tiny: TinyModelConfig,
    *,
    vocab_size: int,
    special_ids: dict[str, int],
    mrope_section: list[int] | None = None,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config with tiny sizes and the tokenizer's special ids (the tiny tokenizer is not Qwen's)."""
    head_dim = tiny.hidden_size // tiny.num_attention_heads
    n = head_dim // 2
    section = mrope_section or [n // 4, 3 * n // 8, n - n // 4 - 3 * n // 8]  # [16, 24, 24] at head_dim 128
    text = dict(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": tiny.rope_theta, "mrope_section": section},
        tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=special_ids["eos_token_id"],
        pad_token_id=special_ids["pad_token_id"],
    )
    vision = dict(
        depth=tiny.vision_depth,
        hidden_size=tiny.vision_hidden_size,
        num_heads=tiny.vision_num_heads,
        intermediate_size=tiny.vision_intermediate_size,
        out_hidden_size=tiny.hidden_size,
        patch_size=tiny.patch_size,
        temporal_patch_size=tiny.temporal_patch_size,
        spatial_merge_size=tiny.spatial_merge_size,
        fullatt_block_indexes=[tiny.vision_depth - 1],
        window_size=112,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tiny.tie_word_embeddings,
        image_token_id=special_ids["image_token_id"],
        video_token_id=special_ids["video_token_id"],
        vision_start_token_id=special_ids["vision_start_token_id"],
        vision_end_token_id=special_ids["vision_end_token_id"],
        bos_token_id=None,
        eos_token_id=special_ids["eos_token_id"],
        pad_token_id=special_ids["pad_token_id"],
    )


def _local_dir(path: str | None, key: str) -> Path:
    if not path or not Path(path).is_dir():
        raise ValueError(f"config key `{key}`: {path!r} is not a local directory (nothing is downloaded)")
    return Path(path)


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int | None = None,
    special_ids: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """Return a `*ForConditionalGeneration` model in train mode (weights in `dtype`)."""
    attn = (
        cfg.attn_backend if cfg.attn_backend in ("sdpa", "eager") else "sdpa"
    )  # others are installed by mmrope
    if cfg.kind == "tiny":
        if vocab_size is None or special_ids is None:
            raise ValueError("the tiny model needs the tokenizer's vocab size and special token ids")
        torch.manual_seed(seed)  # identical initial weights on every rank and every run
        config = tiny_config(cfg.tiny, vocab_size=vocab_size, special_ids=special_ids)
        config._attn_implementation = attn
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    elif cfg.kind == "pretrained":
        path = _local_dir(cfg.path, "model.path")
        model = FAMILY_CLASSES[cfg.family].from_pretrained(
            path, dtype=dtype, attn_implementation=attn, local_files_only=True
        )
    else:
        model = compose_vlm(
            _local_dir(cfg.vision_path, "model.vision_path"),
            _local_dir(cfg.llm_path, "model.llm_path"),
            family=cfg.family,
            dtype=dtype,
            attn=attn,
        )
    model.train()
    return model


def compose_vlm(
    vision_path: str | os.PathLike,
    llm_path: str | os.PathLike,
    *,
    family: str = "qwen2_5_vl",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
):
    """ViT + connector from a local VLM checkpoint, LLM (+ lm_head) from a local LLM checkpoint.

    The VLM config is kept for vision and token ids; its text config is replaced by the LLM's (keeping the
    VLM's mrope_section). The connector's output width must equal the LLM hidden size. If the LLM vocabulary is
    smaller than the VLM tokenizer's (vision special tokens), embeddings are resized to the VLM's vocab size.
    """
    vlm_cls = FAMILY_CLASSES[family]
    vlm_config = AutoConfig.from_pretrained(vision_path, local_files_only=True)
    llm_config = AutoConfig.from_pretrained(llm_path, local_files_only=True)
    out_hidden = getattr(vlm_config.vision_config, "out_hidden_size", None)
    if out_hidden != llm_config.hidden_size:
        raise ValueError(
            f"config key `model.llm_path`: the connector of {vision_path} outputs {out_hidden} features but the LLM "
            f"at {llm_path} has hidden_size {llm_config.hidden_size}; they cannot be composed"
        )
    text = llm_config.to_dict()
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": llm_config.rope_theta})
    rope["mrope_section"] = vlm_config.text_config.rope_parameters.get("mrope_section", [16, 24, 24])
    text["rope_parameters"] = rope
    text["vocab_size"] = max(llm_config.vocab_size, vlm_config.text_config.vocab_size)
    for k in ("architectures", "model_type", "transformers_version"):
        text.pop(k, None)
    config = vlm_config.__class__(
        text_config=text,
        vision_config=vlm_config.vision_config.to_dict(),
        image_token_id=vlm_config.image_token_id,
        video_token_id=vlm_config.video_token_id,
        vision_start_token_id=vlm_config.vision_start_token_id,
        vision_end_token_id=vlm_config.vision_end_token_id,
        tie_word_embeddings=llm_config.tie_word_embeddings,
    )
    config._attn_implementation = attn
    model = vlm_cls(config).to(dtype)

    vlm = vlm_cls.from_pretrained(vision_path, dtype=dtype, local_files_only=True)
    model.model.visual.load_state_dict(vlm.model.visual.state_dict())
    del vlm
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, local_files_only=True)
    llm.resize_token_embeddings(config.text_config.vocab_size)
    missing, unexpected = model.model.language_model.load_state_dict(llm.model.state_dict(), strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(
            f"LLM at {llm_path} does not fit the VLM text model: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(llm.lm_head.state_dict())
    else:
        model.tie_weights()
    return model
