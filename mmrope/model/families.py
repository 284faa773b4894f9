"""The MRoPE-family VLMs of transformers that mmrope installs into, and their tiny configs.

One row per `model.family`: the transformers classes, the video token layout its processor writes, the
encoding the stock model computes (installing it reproduces the stock logits) and whether the text model has
linear-attention (gated delta-net) layers. Architecture only: no DeepSpeed, no data.

| family | classes | layout | stock encoding | text model |
| --- | --- | --- | --- | --- |
| qwen2_vl | Qwen2VL* | qwen2 (contiguous video, 1 step per temporal patch) | mrope | attention |
| qwen2_5_vl | Qwen2_5_VL* | qwen2_5 (contiguous video, absolute time) | mrope | attention |
| qwen3_vl | Qwen3VL* | qwen3 (`<t> VS frame VE` per temporal patch) | mrope_i | attention, q/k norm |
| qwen3_vl_moe | Qwen3VLMoe* | qwen3 | mrope_i | attention, q/k norm, MoE MLP |
| qwen3_5 | Qwen3_5* | qwen3 | mrope_i (partial rotary) | 3 gated delta-net : 1 gated attention |
| qwen3_5_moe | Qwen3_5Moe* | qwen3 | mrope_i (partial rotary) | as qwen3_5, MoE MLP |

Each row also names its modules by adapter role (`adapter_roles`, for `adapter.targets`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import transformers

from mmrope.encodings.frequencies.allocations import chunked_sections, interleaved_sections
from mmrope.encodings.registry import EncodingMisfit

__all__ = [
    "FAMILIES",
    "EncodingMisfit",
    "Family",
    "TextGeometry",
    "check_encoding",
    "family_of",
    "tiny_config",
]

# ----------------------------------------------------------------------------------------------------------------
# tiny-config hooks: what a family adds to the shared tiny text / vision config (small fixed values)


def _no_text_extras(text: dict[str, Any], tiny: Any, head_dim: int) -> None:
    pass


def _moe_text(text: dict[str, Any], tiny: Any, head_dim: int) -> None:
    """4 experts, 2 per token, expert width intermediate_size / 4."""
    text.update(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=max(1, tiny.intermediate_size // 4)
    )


def _delta_net_text(text: dict[str, Any], tiny: Any, head_dim: int) -> None:
    """Gated delta-net and full-attention layers alternate (full_attention_interval 2; the checkpoints use 4),
    delta-net heads 2 key / 4 value of size head_dim / 16 (at least 8)."""
    text.update(
        layer_types=[
            "linear_attention" if i % 2 == 0 else "full_attention" for i in range(tiny.num_hidden_layers)
        ],
        linear_conv_kernel_dim=4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=max(8, head_dim // 16),
        linear_value_head_dim=max(8, head_dim // 16),
    )


def _delta_net_moe_text(text: dict[str, Any], tiny: Any, head_dim: int) -> None:
    """Qwen3.5-MoE: MoE with a shared expert of the expert width in every layer (no dense MLP), delta-net layers."""
    _moe_text(text, tiny, head_dim)
    text["shared_expert_intermediate_size"] = max(1, tiny.intermediate_size // 4)
    del text["intermediate_size"]  # every Qwen3.5-MoE layer is sparse
    _delta_net_text(text, tiny, head_dim)


def _vision_common(tiny: Any) -> dict[str, Any]:
    return dict(
        patch_size=tiny.patch_size,
        temporal_patch_size=tiny.temporal_patch_size,
        spatial_merge_size=tiny.spatial_merge_size,
        depth=tiny.vision_depth,
        num_heads=tiny.vision_num_heads,
    )


def _qwen2_vision(tiny: Any) -> dict[str, Any]:
    return dict(
        _vision_common(tiny),
        embed_dim=tiny.vision_hidden_size,
        mlp_ratio=max(1, tiny.vision_intermediate_size // tiny.vision_hidden_size),
        hidden_size=tiny.hidden_size,  # Qwen2-VL calls the connector's output width hidden_size
    )


def _qwen2_5_vision(tiny: Any) -> dict[str, Any]:
    return dict(
        _vision_common(tiny),
        hidden_size=tiny.vision_hidden_size,
        intermediate_size=tiny.vision_intermediate_size,
        out_hidden_size=tiny.hidden_size,
        fullatt_block_indexes=[tiny.vision_depth - 1],
        window_size=112,
    )


def _qwen3_vision(tiny: Any) -> dict[str, Any]:
    return dict(
        _vision_common(tiny),
        hidden_size=tiny.vision_hidden_size,
        intermediate_size=tiny.vision_intermediate_size,
        out_hidden_size=tiny.hidden_size,
        num_position_embeddings=64,
    )


def _qwen3_deepstack_vision(tiny: Any) -> dict[str, Any]:
    return dict(_qwen3_vision(tiny), deepstack_visual_indexes=[0])


# ----------------------------------------------------------------------------------------------------------------
# adapter roles (mmrope/distributed/adapters.py): what `adapter.targets` names, resolved per family to module names.
# Each role is a tuple of regular expressions that must match a module's whole qualified name in the
# `*ForConditionalGeneration` model. The stock names differ across families where users' LoRA target lists go wrong:
# the Qwen ViTs fuse q/k/v into one `attn.qkv`, Qwen2-VL's ViT MLP is `fc1/fc2`, Qwen2.5-VL's a SwiGLU, Qwen3-VL's
# `linear_fc1/fc2`; Qwen3.5's gated delta-net layers have their own projections.

ADAPTER_ROLES = ("llm.attention", "llm.mlp", "connector", "vision.attention", "vision.mlp", "lm_head")
_LLM = r"model\.language_model\.layers\.\d+\."
_VIT = r"model\.visual\.blocks\.\d+\."


def _roles(*, vision_mlp: str, connector: tuple[str, ...], delta_net: bool = False, moe: bool = False):
    return {
        "llm.attention": (_LLM + r"self_attn\.[qkvo]_proj",)
        # the gated delta-net's projections (in, gate z, out); its per-head scalars a/b stay out (width = heads)
        + ((_LLM + r"linear_attn\.(in_proj_qkv|in_proj_z|out_proj)",) if delta_net else ()),
        # MoE experts are fused 3D parameters (no nn.Linear per expert): no role matches them (refused by name)
        "llm.mlp": () if moe else (_LLM + r"mlp\.(gate|up|down)_proj",),
        "connector": connector,
        "vision.attention": (_VIT + r"attn\.(qkv|proj)",),  # fused q/k/v
        "vision.mlp": (_VIT + vision_mlp,),
        "lm_head": (r"lm_head",),
    }


_QWEN2_CONNECTOR = (r"model\.visual\.merger\.mlp\.[02]",)
_QWEN3_CONNECTOR = (
    r"model\.visual\.merger\.linear_fc[12]",
    r"model\.visual\.deepstack_merger_list\.\d+\.linear_fc[12]",  # Qwen3-VL's DeepStack mergers
)


# ----------------------------------------------------------------------------------------------------------------
# one row per family


@dataclass(frozen=True)
class Family:
    """One `model.family`: its transformers classes and everything mmrope needs to know about it. A new family is
    one row here (plus its `configs/model/<name>.yaml` to ship a checkpoint config)."""

    name: str
    class_prefix: str  # transformers' `<prefix>ForConditionalGeneration` / `<prefix>Config`
    layout: str  # video token layout of the processor (mmrope.encodings LAYOUTS)
    stock_encoding: str  # the encoding whose installed logits equal the stock model's
    linear_attention: bool = False  # Qwen3.5: gated delta-net layers next to the attention layers
    moe: bool = False
    # transformers' `mrope_interleaved` (Qwen3-VL and later): the tiny config's sections are then 24:20:20, else
    # the chunked 16:24:24
    interleaved_mrope: bool = False
    # the released checkpoints' rotary fraction; the tiny config grows head_dim by its inverse (64 pairs as others)
    partial_rotary_factor: float = 1.0
    # Qwen2-VL and Qwen2.5-VL configs: no text `head_dim` (hidden / heads), token ids on the top-level config too
    legacy_config: bool = False
    composable: bool = False  # model.kind=composed: the ViT + connector of this VLM, the LLM of a causal LM
    # FLOPs shapes (mmrope.train.flops): q_proj also emits a sigmoid output gate (Qwen3.5's gated attention);
    # the ViT MLP is SwiGLU (Qwen2.5-VL) rather than fc1 -> gelu -> fc2
    attn_output_gate: bool = False
    vision_gated_mlp: bool = False
    tiny_text: Callable[[dict[str, Any], Any, int], None] = (
        _no_text_extras  # (text, tiny, head_dim) -> in place
    )
    tiny_vision: Callable[[Any], dict[str, Any]] = _qwen3_vision
    # adapter role -> regular expressions of qualified module names (`_roles`): the hook adapters.py resolves
    adapter_roles: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def model_class(self) -> type:
        return getattr(transformers, f"{self.class_prefix}ForConditionalGeneration")

    @property
    def config_class(self) -> type:
        return getattr(transformers, f"{self.class_prefix}Config")


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "qwen2_vl",
            "Qwen2VL",
            "qwen2",
            "mrope",
            legacy_config=True,
            tiny_vision=_qwen2_vision,
            adapter_roles=_roles(vision_mlp=r"mlp\.fc[12]", connector=_QWEN2_CONNECTOR),
        ),
        Family(
            "qwen2_5_vl",
            "Qwen2_5_VL",
            "qwen2_5",
            "mrope",
            legacy_config=True,
            composable=True,
            vision_gated_mlp=True,
            tiny_vision=_qwen2_5_vision,
            adapter_roles=_roles(vision_mlp=r"mlp\.(gate|up|down)_proj", connector=_QWEN2_CONNECTOR),
        ),
        Family(
            "qwen3_vl",
            "Qwen3VL",
            "qwen3",
            "mrope_i",
            interleaved_mrope=True,
            composable=True,
            tiny_vision=_qwen3_deepstack_vision,
            adapter_roles=_roles(vision_mlp=r"mlp\.linear_fc[12]", connector=_QWEN3_CONNECTOR),
        ),
        Family(
            "qwen3_vl_moe",
            "Qwen3VLMoe",
            "qwen3",
            "mrope_i",
            moe=True,
            interleaved_mrope=True,
            tiny_text=_moe_text,
            tiny_vision=_qwen3_deepstack_vision,
            adapter_roles=_roles(vision_mlp=r"mlp\.linear_fc[12]", connector=_QWEN3_CONNECTOR, moe=True),
        ),
        Family(
            "qwen3_5",
            "Qwen3_5",
            "qwen3",
            "mrope_i",
            linear_attention=True,
            interleaved_mrope=True,
            partial_rotary_factor=0.25,
            attn_output_gate=True,
            tiny_text=_delta_net_text,
            adapter_roles=_roles(
                vision_mlp=r"mlp\.linear_fc[12]", connector=_QWEN3_CONNECTOR, delta_net=True
            ),
        ),
        Family(
            "qwen3_5_moe",
            "Qwen3_5Moe",
            "qwen3",
            "mrope_i",
            linear_attention=True,
            moe=True,
            interleaved_mrope=True,
            partial_rotary_factor=0.25,
            attn_output_gate=True,
            tiny_text=_delta_net_moe_text,
            adapter_roles=_roles(
                vision_mlp=r"mlp\.linear_fc[12]", connector=_QWEN3_CONNECTOR, delta_net=True, moe=True
            ),
        ),
    )
}


def family_of(model_or_config: Any) -> Family:
    """The family of a built model or of its (top-level) config, from transformers' `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model: {model_type!r} is not one of mmrope's families {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# Temporal position ids per second of video in the "qwen2_5" layout (Qwen2.5-VL's released checkpoints: 2); used
# for configs without `vision_config.tokens_per_second` (Qwen2-VL and Qwen3-VL's layouts ignore it).
DEFAULT_TOKENS_PER_SECOND = 2.0


def tokens_per_second(config: Any) -> float:
    """`vision_config.tokens_per_second` of a (top-level) VLM config, what transformers' `get_rope_index` reads: a
    "qwen2_5"-layout video's temporal patch i sits at `i * second_per_grid_t * tokens_per_second`. Transformers'
    Qwen2_5_VLVisionConfig defaults to 4 (the tiny configs keep it), the released Qwen2.5-VL checkpoints say 2;
    `DEFAULT_TOKENS_PER_SECOND` for a config without the field."""
    config = getattr(config, "config", config)
    value = getattr(getattr(config, "vision_config", None), "tokens_per_second", None)
    return DEFAULT_TOKENS_PER_SECOND if value is None else float(value)


@dataclass(frozen=True)
class TextGeometry:
    """What an encoding must fit: the attention geometry of the text model's attention layers."""

    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: list[int] | None
    layer_types: list[str]

    @property
    def num_rotary_pairs(self) -> int:
        dim = int(self.head_dim * self.partial_rotary_factor)
        return max(2, dim - dim % 2) // 2


def text_geometry(text_config: Any) -> TextGeometry:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    layer_types = list(getattr(text_config, "layer_types", None) or ["full_attention"])
    section = rope.get("mrope_section")
    return TextGeometry(
        head_dim=int(head_dim),
        num_attention_heads=int(heads),
        num_key_value_heads=int(text_config.num_key_value_heads or heads),
        rope_theta=float(rope.get("rope_theta", getattr(text_config, "rope_theta", 0.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0) or 1.0),
        mrope_section=list(section) if section is not None else None,
        layer_types=layer_types,
    )


# ----------------------------------------------------------------------------------------------------------------
# tiny configs (the embedded default and the tests): real classes, tiny sizes, the tokenizer's special ids


def tiny_config(
    family: str,
    tiny: Any,
    *,
    vocab_size: int,
    special_ids: dict[str, int],
    mrope_section: list[int] | None = None,
) -> Any:
    """A `family` config with the sizes of `tiny` (a `TinyModelConfig`) and the tokenizer's special ids.

    Every family rotates 64 pairs at the default sizes (head_dim 128; Qwen3.5: head_dim 512 with its real
    partial_rotary_factor 0.25), so every shipped `configs/rope` file fits the tiny model as it is. Family
    extras are fixed small values: MoE 4 experts (2 per token, expert width intermediate_size / 4, Qwen3.5-MoE
    with a shared expert of that width); Qwen3.5 alternates gated delta-net and full-attention layers
    (full_attention_interval 2; the checkpoints use 4), delta-net heads 2 key / 4 value of size head_dim / 4.
    """
    if family not in FAMILIES:
        raise ValueError(f"config key `model.family`: must be one of {sorted(FAMILIES)}, got {family!r}")
    row = FAMILIES[family]
    heads = tiny.num_attention_heads
    head_dim = (
        tiny.hidden_size // heads * round(1 / row.partial_rotary_factor)
    )  # 64 rotary pairs at the defaults
    num_pairs = int(head_dim * row.partial_rotary_factor) // 2
    sections = interleaved_sections if row.interleaved_mrope else chunked_sections
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": tiny.rope_theta}
    rope["mrope_section"] = mrope_section or sections(num_pairs)
    if row.interleaved_mrope:
        rope["mrope_interleaved"] = True
    if row.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = row.partial_rotary_factor
    token_ids = dict(
        bos_token_id=None, eos_token_id=special_ids["eos_token_id"], pad_token_id=special_ids["pad_token_id"]
    )
    text: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=tiny.num_key_value_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=32768,
        rope_parameters=rope,
        tie_word_embeddings=tiny.tie_word_embeddings,
        **token_ids,
    )
    if not row.legacy_config:
        text["head_dim"] = head_dim
    row.tiny_text(text, tiny, head_dim)
    return row.config_class(
        text_config=text,
        vision_config=row.tiny_vision(tiny),
        tie_word_embeddings=tiny.tie_word_embeddings,
        image_token_id=special_ids["image_token_id"],
        video_token_id=special_ids["video_token_id"],
        vision_start_token_id=special_ids["vision_start_token_id"],
        vision_end_token_id=special_ids["vision_end_token_id"],
        **(token_ids if row.legacy_config else {}),
    )


# ----------------------------------------------------------------------------------------------------------------
# does an encoding fit a text model?


def check_encoding(encoding: Any, geometry: TextGeometry) -> None:
    """Raise `EncodingMisfit` when `encoding` (an `mmrope.encodings.Encoding`) cannot run on a text model with
    this attention geometry: `Encoding.fits` (the registry entry's own check, e.g. MHRoPE's KV heads; sections that
    must cover the rotary pairs; anything the rotary module rejects)."""
    encoding.fits(geometry)
