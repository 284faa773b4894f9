"""Build the VLM with the real transformers classes: tiny from config, a local checkpoint, or composed.

Architecture only: no DeepSpeed, no distributed calls, no logging of metrics here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from mmrope.encodings.frequencies.allocations import chunked_sections
from mmrope.model.config import ModelConfig, TinyModelConfig
from mmrope.model.families import FAMILIES, family_of
from mmrope.model.families import tiny_config as family_tiny_config
from mmrope.model.stock import checkpoint_config

__all__ = ["FAMILY_CLASSES", "build_model", "compose_vlm", "tiny_config"]

FAMILY_CLASSES = {name: family.model_class for name, family in FAMILIES.items()}


def tiny_config(
    tiny: TinyModelConfig,
    *,
    vocab_size: int,
    special_ids: dict[str, int],
    mrope_section: list[int] | None = None,
    family: str = "qwen2_5_vl",
) -> PretrainedConfig:
    """A `family` config with tiny sizes and the tokenizer's special ids (the tiny tokenizer is not Qwen's);
    see `mmrope.model.families.tiny_config`."""
    return family_tiny_config(
        family, tiny, vocab_size=vocab_size, special_ids=special_ids, mrope_section=mrope_section
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
        config = tiny_config(cfg.tiny, vocab_size=vocab_size, special_ids=special_ids, family=cfg.family)
        config._attn_implementation = attn
        model = FAMILIES[cfg.family].model_class(config).to(dtype)
    elif cfg.kind == "pretrained":
        path = _local_dir(cfg.path, "model.path")
        config = checkpoint_config(path)
        found = family_of(config).name
        if found != cfg.family:
            raise ValueError(
                f"config key `model.family`: {cfg.family!r}, but the checkpoint at {path} is {found!r}"
            )
        model = FAMILY_CLASSES[cfg.family].from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn, local_files_only=True
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
    vlm_config = checkpoint_config(vision_path)
    llm_config = AutoConfig.from_pretrained(llm_path, local_files_only=True)
    out_hidden = getattr(vlm_config.vision_config, "out_hidden_size", None)
    if out_hidden != llm_config.hidden_size:
        raise ValueError(
            f"config key `model.llm_path`: the connector of {vision_path} outputs {out_hidden} features but the LLM "
            f"at {llm_path} has hidden_size {llm_config.hidden_size}; they cannot be composed"
        )
    text = llm_config.to_dict()
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": llm_config.rope_theta})
    rope["mrope_section"] = vlm_config.text_config.rope_parameters.get("mrope_section", chunked_sections(64))
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

    vlm = vlm_cls.from_pretrained(vision_path, config=vlm_config, dtype=dtype, local_files_only=True)
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
