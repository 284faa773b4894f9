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

from dataclasses import dataclass, field
from typing import Any

import transformers

# ----------------------------------------------------------------------------------------------------------------
# adapter roles (mmrope/model/adapters.py): what `adapter.targets` names, resolved per family to module names.
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


@dataclass(frozen=True)
class Family:
    name: str
    class_prefix: str  # transformers' `<prefix>ForConditionalGeneration` / `<prefix>Config`
    layout: str  # video token layout of the processor (mmrope.encodings LAYOUTS)
    stock_encoding: str  # the encoding whose installed logits equal the stock model's
    linear_attention: bool = False  # Qwen3.5: gated delta-net layers next to the attention layers
    moe: bool = False
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
            adapter_roles=_roles(vision_mlp=r"mlp\.fc[12]", connector=_QWEN2_CONNECTOR),
        ),
        Family(
            "qwen2_5_vl",
            "Qwen2_5_VL",
            "qwen2_5",
            "mrope",
            adapter_roles=_roles(vision_mlp=r"mlp\.(gate|up|down)_proj", connector=_QWEN2_CONNECTOR),
        ),
        Family(
            "qwen3_vl",
            "Qwen3VL",
            "qwen3",
            "mrope_i",
            adapter_roles=_roles(vision_mlp=r"mlp\.linear_fc[12]", connector=_QWEN3_CONNECTOR),
        ),
        Family(
            "qwen3_vl_moe",
            "Qwen3VLMoe",
            "qwen3",
            "mrope_i",
            moe=True,
            adapter_roles=_roles(vision_mlp=r"mlp\.linear_fc[12]", connector=_QWEN3_CONNECTOR, moe=True),
        ),
        Family(
            "qwen3_5",
            "Qwen3_5",
            "qwen3",
            "mrope_i",
            linear_attention=True,
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
    heads = tiny.num_attention_heads
    head_dim = tiny.hidden_size // heads
    qwen3_5 = family in ("qwen3_5", "qwen3_5_moe")
    if qwen3_5:
        head_dim *= 4  # partial_rotary_factor 0.25 below: 64 rotary pairs at the default sizes
    n = head_dim // 2 if not qwen3_5 else head_dim // 8
    chunked = [n // 4, 3 * n // 8, n - n // 4 - 3 * n // 8]  # [16, 24, 24] at 64 pairs
    interleaved = [n - 2 * (5 * n // 16), 5 * n // 16, 5 * n // 16]  # [24, 20, 20] at 64 pairs
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": tiny.rope_theta}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope["mrope_section"] = mrope_section or chunked
    else:
        rope["mrope_section"] = mrope_section or interleaved
        rope["mrope_interleaved"] = True
    if qwen3_5:
        rope["partial_rotary_factor"] = 0.25
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
        bos_token_id=None,
        eos_token_id=special_ids["eos_token_id"],
        pad_token_id=special_ids["pad_token_id"],
    )
    if family != "qwen2_vl" and family != "qwen2_5_vl":
        text["head_dim"] = head_dim
    if family in ("qwen3_vl_moe", "qwen3_5_moe"):
        text.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=max(1, tiny.intermediate_size // 4)
        )
        if family == "qwen3_5_moe":
            text["shared_expert_intermediate_size"] = max(1, tiny.intermediate_size // 4)
    if qwen3_5:
        if family == "qwen3_5_moe":
            del text["intermediate_size"]  # every Qwen3.5-MoE layer is sparse
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
    vision = _tiny_vision(family, tiny)
    return FAMILIES[family].config_class(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tiny.tie_word_embeddings,
        image_token_id=special_ids["image_token_id"],
        video_token_id=special_ids["video_token_id"],
        vision_start_token_id=special_ids["vision_start_token_id"],
        vision_end_token_id=special_ids["vision_end_token_id"],
        **(
            dict(
                bos_token_id=None,
                eos_token_id=special_ids["eos_token_id"],
                pad_token_id=special_ids["pad_token_id"],
            )
            if family in ("qwen2_vl", "qwen2_5_vl")
            else {}
        ),
    )


def _tiny_vision(family: str, tiny: Any) -> dict[str, Any]:
    common = dict(
        patch_size=tiny.patch_size,
        temporal_patch_size=tiny.temporal_patch_size,
        spatial_merge_size=tiny.spatial_merge_size,
        depth=tiny.vision_depth,
        num_heads=tiny.vision_num_heads,
    )
    if family == "qwen2_vl":
        return dict(
            common,
            embed_dim=tiny.vision_hidden_size,
            mlp_ratio=max(1, tiny.vision_intermediate_size // tiny.vision_hidden_size),
            hidden_size=tiny.hidden_size,  # Qwen2-VL calls the connector's output width hidden_size
        )
    if family == "qwen2_5_vl":
        return dict(
            common,
            hidden_size=tiny.vision_hidden_size,
            intermediate_size=tiny.vision_intermediate_size,
            out_hidden_size=tiny.hidden_size,
            fullatt_block_indexes=[tiny.vision_depth - 1],
            window_size=112,
        )
    vision = dict(
        common,
        hidden_size=tiny.vision_hidden_size,
        intermediate_size=tiny.vision_intermediate_size,
        out_hidden_size=tiny.hidden_size,
        num_position_embeddings=64,
    )
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        vision["deepstack_visual_indexes"] = [0]
    return vision


# ----------------------------------------------------------------------------------------------------------------
# does an encoding fit a text model?


class EncodingMisfit(ValueError):
    """An encoding that cannot run on a text model; `hparam` names the encoding hyperparameter to change (None
    when the encoding as a whole does not fit)."""

    def __init__(self, hparam: str | None, reason: str) -> None:
        super().__init__(f"{hparam or 'encoding'}: {reason}")
        self.hparam = hparam
        self.reason = reason


def suggested_sections(num_pairs: int, interleaved: bool = False) -> list[int]:
    """The default section proportions at `num_pairs` pairs: chunked 16:24:24 ([8, 12, 12] at 32 pairs),
    interleaved 24:20:20 ([12, 10, 10] at 32)."""
    if interleaved:
        h = 5 * num_pairs // 16
        return [num_pairs - 2 * h, h, h]
    t, h = num_pairs // 4, 3 * num_pairs // 8
    return [t, h, num_pairs - t - h]


def check_encoding(encoding: Any, geometry: TextGeometry) -> None:
    """Raise `EncodingMisfit` when `encoding` (an `mmrope.encodings.Encoding`) cannot run on a text model with
    this attention geometry: MHRoPE's KV heads differ from the model's, chunked sections do not cover the rotary
    pairs (head_dim x partial_rotary_factor / 2: 32 on real Qwen3.5; VideoRoPE/HoPE sections too), or anything the
    rotary module rejects (GRAPE's block sizes, ...). Interleaved sections are not checked, like transformers' own
    interleaved MRoPE (larger sections are truncated by the rule: [24, 20, 20] acts as [11, 11, 10] at 32 pairs)."""
    hp = encoding.hparams
    num_pairs = geometry.num_rotary_pairs
    where = (
        f"the model rotates {num_pairs} pairs (head_dim {geometry.head_dim} x partial_rotary_factor "
        f"{geometry.partial_rotary_factor:g} / 2)"
    )
    if encoding.name == "mhrope" and hp["num_key_value_heads"] != geometry.num_key_value_heads:
        raise EncodingMisfit(
            "num_key_value_heads",
            f"mhrope assigns whole KV heads to t/h/w and was set for {hp['num_key_value_heads']} KV heads, but the "
            f"model has {geometry.num_key_value_heads} (mrope_section must then sum to at most that)",
        )
    # Allocations whose sections partition the pairs: chunked (mrope, circlerope, omnirope, canonical chunked GRAPE)
    # and VideoRoPE/HoPE (whose layout rule with larger sections would leave t a single pair).
    partition = encoding.allocation in ("chunked", "videorope", "hope") or (
        encoding.name == "grape"
        and hp["grape_mode"] == "canonical"
        and hp["frequency_allocation"] == "chunked"
    )
    if partition and sum(hp["mrope_section"]) != num_pairs:
        raise EncodingMisfit(
            "mrope_section",
            f"{list(hp['mrope_section'])} gives the {encoding.allocation} allocation {sum(hp['mrope_section'])} "
            f"pairs but {where}; e.g. {suggested_sections(num_pairs)}",
        )
    try:
        encoding.rotary(
            head_dim=geometry.head_dim,
            rope_theta=geometry.rope_theta,
            partial_rotary_factor=geometry.partial_rotary_factor,
            num_key_value_heads=geometry.num_key_value_heads,
        )
    except ValueError as e:
        word = str(e).split(" ", 1)[0].rstrip(":")
        raise EncodingMisfit(word if word in hp else None, f"{e} ({where})") from e
