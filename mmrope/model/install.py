"""The ONE seam between mmrope and transformers: `install(model, encoding)`.

    model = build_model(cfg.model, ...)
    install(model, build_encoding("mrope_i"), attn_backend="auto", dipe=False)
    out = model.model(input_ids=ids_BL, position_ids=pos_3BL, **seam_kwargs(cu_seqlens=cu_seqlens))

Families (`mmrope.model.families`): Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE. Installing a
family's own encoding (mrope / mrope_i with the checkpoint's sections) reproduces the stock logits.

Module composition, no monkey-patching of transformers functions; one module per replacement:
- `language_model.rotary_emb` becomes `MMRopeRotaryEmbedding` (`mmrope.model.rotary`), which holds the encoding's
  `Rotary` ONCE (GRAPE's learned planes live there) and turns the 3-row `position_ids` into `(cos, sin)` tables,
  or passes the positions through for GRAPE's learned modes (they rotate q/k directly, there is no table);
- every text decoder layer's `self_attn` becomes `MMRopeAttention` (`mmrope.model.attention_layer`), which REUSES
  the original q/k/v/o projections (and Qwen3-VL's q_norm/k_norm) under the same attribute names, so
  `state_dict` keys stay stock. It rotates q/k itself (the first rotary_dim channels: Qwen3.5's partial rotary),
  applies Qwen3.5's sigmoid output gate, puts ROTATED keys in the KV cache and calls
  `mmrope.attention.packed_attention` / `dipe_attention`;
- every Qwen3.5 gated delta-net layer's `linear_attn` becomes `PackedLinearAttention`
  (`mmrope.model.linear_attention`), which shares the stock layer's parameters and modules (same keys) and
  restarts its causal conv and recurrent state at every packed sample boundary (transformers' own boundary
  kwargs only work with optional CUDA kernels; see the class);
- the text config's `_attn_implementation` becomes "mmrope", registered in transformers' `AttentionInterface`.
  It is not a mask implementation, so `masking_utils` returns `None` instead of building O(L^2) masks; the
  registered function itself raises (being called means a layer was not installed).
- with `attn_backend="auto"` the vision tower's `_attn_implementation` becomes "mmrope_flash_vision", also an
  `AttentionInterface` entry (`mmrope.model.vision_attention`): a name with "flash" in it is transformers' signal
  that the function takes packed segments, so the Qwen-VL vision attention hands it every window/image at once
  through `cu_seqlens` instead of looping one small SDPA call per window.

Packing, padding and DIPE inputs travel as `**kwargs` of the model forward down to `self_attn` (transformers 5.x
forwards them); build them with `seam_kwargs`. Positions always arrive with the batch (3 rows): the model never
re-derives them from token ids.

Sequence parallelism (issue 15) is not installed here: the model stays single-device and
`mmrope.distributed.parallelize` wraps each attention layer's `attend` (`mmrope.distributed.sequence_parallel`).

Probing (issue 8, `mmrope.eval.probe`): the `mmrope_probe=<recorder>` kwarg, see `mmrope.model.attention_layer`.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn
from transformers import AttentionInterface

from mmrope.attention import PACKED_BACKENDS, doc_ids_from_attention_mask
from mmrope.encodings import Encoding
from mmrope.model.attention_layer import PROBE_KWARG, MMRopeAttention
from mmrope.model.families import check_encoding, text_geometry
from mmrope.model.linear_attention import PackedLinearAttention
from mmrope.model.rotary import MMRopeRotaryEmbedding
from mmrope.model.vision_attention import VISION_ATTN_IMPLEMENTATION, vision_attention

__all__ = ["PROBE_KWARG", "install", "is_installed", "seam_kwargs", "text_model"]

ATTN_IMPLEMENTATION = "mmrope"
ATTN_BACKENDS = PACKED_BACKENDS  # "auto" (the default) picks torch's varlen FlashAttention on CUDA


def _not_installed(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        f"attention implementation {ATTN_IMPLEMENTATION!r} was called by {type(module).__name__}: this layer was "
        "not replaced by mmrope.model.install (only the text decoder's self_attn layers are)"
    )


# transformers' sanctioned hook for custom attention: the text stack's name (never called), the vision tower's
AttentionInterface.register(ATTN_IMPLEMENTATION, _not_installed)
AttentionInterface.register(VISION_ATTN_IMPLEMENTATION, vision_attention)


def seam_kwargs(
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    attention_mask_BL: Tensor | None = None,
    static_position_ids: Tensor | None = None,
    visual_mask_BL: Tensor | None = None,
    key_valid_BK: Tensor | None = None,
    key_visual_BK: Tensor | None = None,
) -> dict[str, Tensor]:
    """The keyword arguments an installed model's forward reads (None entries are left out).

    Args:
        cu_seqlens: packed sample boundaries over the flattened `B * L` tokens (e.g. `[0, 3, 5, 9]`).
        max_seqlen: the longest sample of `cu_seqlens` (a host int), so varlen kernels need no device sync.
        attention_mask_BL: HF padding mask (1 = token, 0 = pad); each pad run becomes a sample of its own.
        static_position_ids: DIPE anchored positions `[3, B, L]` of the queries of this call.
        visual_mask_BL: DIPE, True at image/video placeholders among the queries of this call.
        key_valid_BK, key_visual_BK: decoding with a KV cache: which cached keys are real tokens (False = left
            padding) and which are visual, over all `K` keys in the cache after this call.
    """
    out: dict[str, Tensor] = {}
    if attention_mask_BL is not None:
        out["mmrope_doc_ids"] = doc_ids_from_attention_mask(attention_mask_BL)
        out["mmrope_token_mask"] = attention_mask_BL.bool()  # linear-attention layers zero the pads
    for key, value in (
        ("mmrope_cu_seqlens", cu_seqlens),
        ("mmrope_max_seqlen", max_seqlen),
        ("mmrope_static_position_ids", static_position_ids),
        ("mmrope_visual_mask", visual_mask_BL),
        ("mmrope_key_valid", key_valid_BK),
        ("mmrope_key_visual", key_visual_BK),
    ):
        if value is not None:
            out[key] = value
    return out


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a `*ForConditionalGeneration` / `*Model` VLM (has `layers` and `rotary_emb`)."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
        raise ValueError(
            f"model: {type(model).__name__} has no text model (model.language_model) to install into"
        )
    return lm


def is_installed(model: nn.Module) -> bool:
    return isinstance(text_model(model).rotary_emb, MMRopeRotaryEmbedding)


def _check_layers(lm: nn.Module) -> None:
    """Every decoder layer must be full causal attention (`self_attn`) or a gated delta-net (`linear_attn`)."""
    layer_types = list(getattr(lm.config, "layer_types", None) or [])
    if "sliding_attention" in layer_types:
        raise ValueError(
            "model: sliding-window attention layers (text_config.use_sliding_window / layer_types) are not "
            "supported by mmrope's packed attention; use a config without them (the released Qwen2-VL "
            "checkpoints have use_sliding_window=false)"
        )
    for i, layer in enumerate(lm.layers):
        if not (
            hasattr(layer, "self_attn")
            or type(getattr(layer, "linear_attn", None)).__name__.endswith("GatedDeltaNet")
        ):
            raise ValueError(
                f"model: text layer {i} ({type(layer).__name__}) has neither self_attn nor a gated delta-net "
                "linear_attn; mmrope cannot install into it"
            )


def install(
    model: nn.Module,
    encoding: Encoding,
    *,
    attn_backend: str = "auto",
    dipe: bool = False,
) -> nn.Module:
    """Install `encoding` (and DIPE if `dipe`) into a model of any family in `mmrope.model.families` (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) in place; returns the model.

    Attention layers become `MMRopeAttention` (Qwen3.5's output gate and partial rotary included); Qwen3.5's
    gated delta-net layers become `PackedLinearAttention` (packed samples start from a zero recurrent state).

    Raises ValueError naming the argument: unknown `attn_backend`, DIPE with a 1D encoding, an encoding whose
    geometry does not fit the model (`EncodingMisfit` naming the hyperparameter, e.g. mhrope's
    num_key_value_heads or chunked sections that do not cover the rotary pairs), sliding-window layers, or a
    model installed twice.
    """
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
    if dipe and encoding.is_1d:
        raise ValueError(f"dipe: DIPE needs a 3-axis encoding, got the 1D encoding {encoding.name!r}")
    lm = text_model(model)
    if isinstance(lm.rotary_emb, MMRopeRotaryEmbedding):
        raise ValueError("model: an mmrope encoding is already installed")
    _check_layers(lm)
    geometry = text_geometry(lm.config)
    check_encoding(encoding, geometry)
    rotary = encoding.rotary(
        head_dim=geometry.head_dim,
        rope_theta=geometry.rope_theta,
        partial_rotary_factor=geometry.partial_rotary_factor,
        num_key_value_heads=geometry.num_key_value_heads,
    )
    # The encoding caches its Rotary; each model gets its own copy (GRAPE's planes are parameters).
    device = lm.embed_tokens.weight.device
    rotary_emb = MMRopeRotaryEmbedding(copy.deepcopy(rotary)).to(device)
    lm.rotary_emb = rotary_emb
    for layer in lm.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn = MMRopeAttention(
                layer.self_attn,
                rotary_emb,
                attn_backend=attn_backend,
                dipe=dipe,
            )
        else:  # checked above: a linear-attention (gated delta-net) layer
            layer.linear_attn = PackedLinearAttention(layer.linear_attn)
    lm.config._attn_implementation = ATTN_IMPLEMENTATION
    if hasattr(lm, "_attn_implementation"):
        lm._attn_implementation = ATTN_IMPLEMENTATION
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if attn_backend == "auto" and vision_config is not None:
        vision_config._attn_implementation = VISION_ATTN_IMPLEMENTATION
    return model
