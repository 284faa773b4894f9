"""Model FLOPs per optimizer step for Qwen2.5-VL / Qwen3-VL style VLMs, and MFU.

Convention (mmrope/train/README.md links here rather than copying it):
- A matmul ``[m, k] @ [k, n]`` costs ``2 * m * n * k`` FLOPs. Only matmuls are counted: no FLOPs for norms,
  activations, residual adds, biases, rotary embeddings, softmax or embedding lookups.
- Training costs 3x the forward (forward + backward, the backward being ~2x: input grads and weight grads) for
  trainable parts. A frozen part costs 1x (forward only) when nothing upstream of it is trainable, which is
  the frozen ViT here (pixels -> ViT -> connector -> LLM). If a trainable parameter sat upstream of a frozen
  part (e.g. a frozen LLM after a trainable connector), its activations would need a backward and it would
  cost 2x; that case is not modelled (``trainable=False`` means 1x). Note also that a trainable connector
  after a frozen ViT needs no input gradient, so its exact cost is 2x; we keep the 3x convention for it
  (the connector is < 1% of a step).
- MFU counts model FLOPs, not hardware FLOPs: recomputation (activation checkpointing, flash-attention's
  backward recompute, the chunked loss recomputing logits) is NOT counted.
- LLM attention is causal PER PACKED SAMPLE: forward ``2 * 2 * sum_s (L_s^2 / 2) * H * D`` per layer
  (``QK^T`` and ``PV``, causal half), with H query heads of size D. Counting per sample, not per packed row,
  is what makes packing honest: samples of a row never attend to each other.
- Linear layers of the LLM: q/k/v/o projections (GQA: k and v have ``num_kv_heads * head_dim`` outputs) and
  the SwiGLU MLP (gate, up, down), on every token of every sample. Pass real sample lengths (exclude padding).
  Qwen3.5's q_proj is twice as wide (it also yields the output gate).
- Mixture of experts (Qwen3-VL-MoE, Qwen3.5-MoE): the router ``2 * hidden * num_experts`` plus the
  ``num_experts_per_tok`` routed SwiGLU experts actually run per token (active, not total, parameters), plus the
  shared expert and its 1-wide gate where there is one.
- Gated delta-net layers (Qwen3.5): their projections (qkv, z, b, a, out) on every token, and the delta rule as
  its recurrent form ``3 * 2 * Dk * Dv`` per token and value head (read ``k.S``, rank-1 write, read ``q.S``); the
  depthwise causal conv is not a matmul and is not counted. These layers have no softmax attention term.
- LM head: ``2 * hidden * vocab`` per token, only on supervised tokens when the fused loss is used
  (``fused_lm_head=True``), else on every token.
- ViT: patch embedding (a Conv3d = a matmul of ``in_channels * temporal_patch_size * patch_size^2`` by hidden
  per patch), per block qkv + proj + MLP (SwiGLU for Qwen2.5-VL, fc1/fc2 for Qwen3-VL), and FULL (non-causal)
  attention ``2 * 2 * n^2 * hidden`` per attention segment of ``n`` patches. Segments follow transformers:
  each FRAME (``h * w`` patches, ``t`` frames per grid entry) for full-attention blocks; with
  ``window_size`` set (Qwen2.5-VL), the other blocks attend within windows of
  ``window_size // patch_size // spatial_merge_size`` merged tokens per side.
- Connector: the patch merger MLP on merged tokens (``patches / spatial_merge_size^2``), ``Linear(c, c)`` then
  ``Linear(c, out_hidden)`` with ``c = hidden * spatial_merge_size^2``; Qwen3-VL's deepstack mergers add one
  merger each.
- All numbers are per optimizer step: pass the batch composition summed over gradient-accumulation micro-steps
  AND data-parallel ranks; MFU then divides by ``num_devices``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LLMShape:
    num_layers: int
    hidden: int
    intermediate: int  # dense SwiGLU width (0: no dense MLP, every layer is MoE)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    # Qwen3.5: q_proj also yields a per-head output gate (q_proj twice as wide)
    attn_output_gate: bool = False
    # Qwen3.5: gated delta-net layers instead of attention in `num_linear_layers` of the layers
    num_linear_layers: int = 0
    linear_num_k_heads: int = 0
    linear_num_v_heads: int = 0
    linear_head_k_dim: int = 0
    linear_head_v_dim: int = 0
    # Mixture of experts in `num_moe_layers` of the layers (replacing their dense MLP)
    num_moe_layers: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0  # Qwen3.5-MoE: one shared SwiGLU expert (+ a 1-wide gate)


@dataclass(frozen=True)
class ViTShape:
    depth: int
    hidden: int
    intermediate: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    out_hidden: int  # connector output = LLM hidden
    gated_mlp: bool = True  # SwiGLU (Qwen2.5-VL); False: fc1 -> act -> fc2 (Qwen2-VL, Qwen3-VL)
    window_size: int | None = None  # pixels (Qwen2.5-VL: 112); None: every block is full attention
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks with full attention when window_size is set
    num_deepstack_mergers: int = 0  # Qwen3-VL: extra mergers (len(deepstack_visual_indexes))


def _train_factor(trainable: bool) -> int:
    return 3 if trainable else 1


def _as_int_list(seqlens: Sequence[int] | Tensor) -> list[int]:
    values = seqlens.tolist() if isinstance(seqlens, Tensor) else list(seqlens)
    values = [int(v) for v in values]
    if any(v < 0 for v in values):
        raise ValueError(f"seqlens must be >= 0, got {values}")
    return values


def _grid_list(grid_thw: Tensor | Sequence[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if isinstance(grid_thw, Tensor) else [list(r) for r in grid_thw]
    if any(len(r) != 3 for r in rows):
        raise ValueError(f"grid_thw must be [num_images, 3] (t, h, w), got {rows}")
    return [(int(t), int(h), int(w)) for t, h, w in rows]


# ------------------------------------------------------------------------------------------------ LLM


def llm_flops_breakdown(
    shape: LLMShape,
    seqlens: Sequence[int] | Tensor,
    num_supervised_tokens: int,
    trainable: bool = True,
    *,
    fused_lm_head: bool = True,
) -> dict[str, float]:
    """LLM FLOPs split as ``{"llm": linear layers, "attention": QK^T and PV, "lm_head": ...}``.

    ``seqlens`` are the packed samples' lengths (e.g. ``cu_seqlens.diff()``), all tokens incl. vision
    placeholders and prompts; ``num_supervised_tokens`` the tokens with a label.
    """
    lengths = _as_int_list(seqlens)
    num_tokens = sum(lengths)
    if not 0 <= num_supervised_tokens <= num_tokens:
        raise ValueError(f"num_supervised_tokens={num_supervised_tokens} must be in [0, {num_tokens}]")
    factor = _train_factor(trainable)
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    h = shape.hidden
    num_attn_layers = shape.num_layers - shape.num_linear_layers
    attn_proj = (
        2 * h * q_width * (2 if shape.attn_output_gate else 1)  # q_proj (+ output gate)
        + 2 * 2 * h * kv_width  # k_proj, v_proj
        + 2 * q_width * h  # o_proj
    )
    key_dim = shape.linear_num_k_heads * shape.linear_head_k_dim
    value_dim = shape.linear_num_v_heads * shape.linear_head_v_dim
    delta_net = (
        2 * h * (2 * key_dim + value_dim)  # in_proj_qkv
        + 2 * h * value_dim  # in_proj_z
        + 2 * 2 * h * shape.linear_num_v_heads  # in_proj_b, in_proj_a
        + 2 * value_dim * h  # out_proj
        # the delta rule per token and value head on its [Dk, Dv] state: read k.S, write k (x) delta, read q.S
        + 3 * 2 * shape.linear_num_v_heads * shape.linear_head_k_dim * shape.linear_head_v_dim
    )
    dense_mlp = 3 * 2 * h * shape.intermediate  # gate, up, down
    moe_mlp = (
        2 * h * shape.num_experts  # router
        + shape.num_experts_per_tok * 3 * 2 * h * shape.moe_intermediate  # the routed experts
        + (3 * 2 * h * shape.shared_expert_intermediate + 2 * h if shape.shared_expert_intermediate else 0)
    )
    num_dense_layers = shape.num_layers - shape.num_moe_layers
    per_token = (
        num_attn_layers * attn_proj
        + shape.num_linear_layers * delta_net
        + num_dense_layers * dense_mlp
        + shape.num_moe_layers * moe_mlp
    )
    linear = per_token * num_tokens
    # Causal, per sample: QK^T and PV each 2 * (L^2 / 2) * H * D (softmax-attention layers only).
    attention = 2 * 2 * sum(length * length / 2 for length in lengths) * q_width * num_attn_layers
    lm_head_tokens = num_supervised_tokens if fused_lm_head else num_tokens
    lm_head = 2 * shape.hidden * shape.vocab * lm_head_tokens
    return {
        "llm": float(factor * linear),
        "attention": float(factor * attention),
        "lm_head": float(factor * lm_head),
    }


def llm_flops(
    shape: LLMShape,
    seqlens: Sequence[int] | Tensor,
    num_supervised_tokens: int,
    trainable: bool = True,
    *,
    fused_lm_head: bool = True,
) -> float:
    """All LLM FLOPs (linear layers + causal attention + LM head), see :func:`llm_flops_breakdown`."""
    parts = llm_flops_breakdown(shape, seqlens, num_supervised_tokens, trainable, fused_lm_head=fused_lm_head)
    return sum(parts.values())


# ------------------------------------------------------------------------------------------------ ViT


def vit_attention_seqlens(
    shape: ViTShape, grid_thw: Tensor | Sequence[Sequence[int]]
) -> tuple[list[int], list[int]]:
    """Attention segment lengths in patches: (full-attention segments, window segments).

    Full attention: one segment per frame, ``h * w`` patches, repeated ``t`` times. Windows (Qwen2.5-VL): the
    merged grid ``(h / m) x (w / m)`` is tiled by squares of ``window_size // patch_size // m`` merged tokens;
    edge windows are smaller; each merged token is ``m^2`` patches.

    Example: patch 14, merge 2, window 112 -> 4x4 merged tokens per window; a 1 x 12 x 20 grid is a 6 x 10
    merged grid -> window rows [4, 2] x window cols [4, 4, 2] -> merged sizes 16, 16, 8, 8, 8, 4, times 4
    patches = [64, 64, 32, 32, 32, 16]; the full segment is [240].
    """
    grids = _grid_list(grid_thw)
    merge = shape.spatial_merge_size
    full = [h * w for t, h, w in grids for _ in range(t)]
    if shape.window_size is None:
        return full, []
    side = shape.window_size // shape.patch_size // merge
    if side <= 0:
        raise ValueError(f"window_size={shape.window_size} is smaller than patch_size * spatial_merge_size")
    windows = []
    for t, h, w in grids:
        merged_h, merged_w = h // merge, w // merge
        rows = [min(side, merged_h - i) for i in range(0, merged_h, side)]
        cols = [min(side, merged_w - j) for j in range(0, merged_w, side)]
        windows += [r * c * merge * merge for _ in range(t) for r in rows for c in cols]
    return full, windows


def vit_flops(
    shape: ViTShape, grid_thw: Tensor | Sequence[Sequence[int]] | None, backward: bool = False
) -> float:
    """ViT FLOPs (patch embed + blocks incl. full/window attention) for all images/videos in ``grid_thw``.

    ``grid_thw``: ``[num_images, 3]`` patches per (t, h, w), as in ``image_grid_thw`` / ``video_grid_thw``.
    ``backward=False``: frozen ViT with nothing trainable upstream -> forward only.
    """
    grids = _grid_list(grid_thw)
    num_patches = sum(t * h * w for t, h, w in grids)
    dim = shape.hidden
    patch_in = shape.in_channels * shape.temporal_patch_size * shape.patch_size**2
    patch_embed = 2 * patch_in * dim * num_patches
    mlp_mats = 3 if shape.gated_mlp else 2
    per_patch_per_block = (
        2 * dim * 3 * dim + 2 * dim * dim + mlp_mats * 2 * dim * shape.intermediate
    )  # qkv, proj
    blocks = per_patch_per_block * num_patches * shape.depth

    full, windows = vit_attention_seqlens(shape, grids)
    # Non-causal: QK^T and PV each 2 * n^2 * (heads * head_dim = hidden).
    full_block_attention = 2 * 2 * sum(n * n for n in full) * dim
    if shape.window_size is None:
        attention = full_block_attention * shape.depth
    else:
        num_full = len(shape.fullatt_block_indexes)
        window_block_attention = 2 * 2 * sum(n * n for n in windows) * dim
        attention = full_block_attention * num_full + window_block_attention * (shape.depth - num_full)
    return float(_train_factor(backward) * (patch_embed + blocks + attention))


def connector_flops(
    shape: ViTShape, grid_thw: Tensor | Sequence[Sequence[int]] | None, trainable: bool = True
) -> float:
    """Patch-merger MLP(s) on merged tokens: ``Linear(c, c)``, ``Linear(c, out_hidden)``; c = hidden * m^2."""
    grids = _grid_list(grid_thw)
    merge_area = shape.spatial_merge_size**2
    num_merged = sum(t * h * w for t, h, w in grids) // merge_area
    width = shape.hidden * merge_area
    per_token = 2 * width * width + 2 * width * shape.out_hidden
    num_mergers = 1 + shape.num_deepstack_mergers
    return float(_train_factor(trainable) * per_token * num_merged * num_mergers)


# ---------------------------------------------------------------------------------------------- totals


def step_flops(
    llm: LLMShape,
    vit: ViTShape | None,
    seqlens: Sequence[int] | Tensor,
    num_supervised_tokens: int,
    grid_thw: Tensor | Sequence[Sequence[int]] | None = None,
    *,
    train_llm: bool = True,
    train_connector: bool = True,
    train_vit: bool = False,
    fused_lm_head: bool = True,
) -> dict[str, float]:
    """FLOPs of one optimizer step: ``{"llm", "attention", "vit", "connector", "lm_head", "total"}``.

    ``"llm"`` is the decoder's linear layers, ``"attention"`` the LLM's causal attention (ViT attention is
    inside ``"vit"``). ``grid_thw`` stacks image and video grids
    (``torch.cat([image_grid_thw, video_grid_thw])``).
    Everything is for the whole step: all micro-steps and all data-parallel ranks.
    """
    parts = llm_flops_breakdown(llm, seqlens, num_supervised_tokens, train_llm, fused_lm_head=fused_lm_head)
    has_vision = vit is not None and len(_grid_list(grid_thw)) > 0
    parts["vit"] = vit_flops(vit, grid_thw, backward=train_vit) if has_vision else 0.0
    parts["connector"] = connector_flops(vit, grid_thw, trainable=train_connector) if has_vision else 0.0
    parts["total"] = sum(parts.values())
    return parts


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak (dense bf16, e.g. 989e12 for H100)."""
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
    if peak_flops_per_device <= 0:
        raise ValueError(f"peak_flops_per_device must be > 0, got {peak_flops_per_device}")
    if num_devices <= 0:
        raise ValueError(f"num_devices must be > 0, got {num_devices}")
    return flops_per_step / (step_seconds * peak_flops_per_device * num_devices)


# --------------------------------------------------------------------------------------------- configs


def shapes_from_hf_config(config) -> tuple[LLMShape, ViTShape]:
    """Read a Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) / Qwen3.5(-MoE) config (duck-typed: ``text_config`` and
    ``vision_config``). Older flat configs (text attributes on the top-level object) are accepted.
    """
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValueError("config has no vision_config")

    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    num_layers = text.num_hidden_layers
    layer_types = list(getattr(text, "layer_types", None) or [])[:num_layers]
    num_experts = getattr(text, "num_experts", None) or 0
    moe_layers = 0
    if num_experts:
        if hasattr(text, "decoder_sparse_step"):  # Qwen3-VL-MoE: sparse every `step` layers, except mlp_only
            step, dense = text.decoder_sparse_step or 1, set(getattr(text, "mlp_only_layers", None) or ())
            moe_layers = sum(1 for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
        else:  # Qwen3.5-MoE: every layer
            moe_layers = num_layers
    family = _family(config, vision)
    llm = LLMShape(
        num_layers=num_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 0,
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        attn_output_gate=family.attn_output_gate,
        num_linear_layers=layer_types.count("linear_attention"),
        linear_num_k_heads=getattr(text, "linear_num_key_heads", 0) or 0,
        linear_num_v_heads=getattr(text, "linear_num_value_heads", 0) or 0,
        linear_head_k_dim=getattr(text, "linear_key_head_dim", 0) or 0,
        linear_head_v_dim=getattr(text, "linear_value_head_dim", 0) or 0,
        num_moe_layers=moe_layers,
        num_experts=num_experts,
        num_experts_per_tok=getattr(text, "num_experts_per_tok", 0) or 0,
        moe_intermediate=getattr(text, "moe_intermediate_size", 0) or 0,
        shared_expert_intermediate=getattr(text, "shared_expert_intermediate_size", 0) or 0,
    )

    if hasattr(vision, "embed_dim"):  # Qwen2-VL: embed_dim is the ViT width, hidden_size the LLM's
        vit_hidden = vision.embed_dim
        intermediate = int(vit_hidden * vision.mlp_ratio)
        out_hidden = vision.hidden_size
        gated = False
    else:
        vit_hidden = vision.hidden_size
        intermediate = vision.intermediate_size
        out_hidden = vision.out_hidden_size
        gated = family.vision_gated_mlp  # Qwen2.5-VL's vision MLP is SwiGLU; Qwen3-VL's is fc1 -> gelu -> fc2
    fullatt = tuple(getattr(vision, "fullatt_block_indexes", None) or ())
    window_size = getattr(vision, "window_size", None) if fullatt else None
    vit = ViTShape(
        depth=vision.depth,
        hidden=vit_hidden,
        intermediate=intermediate,
        num_heads=vision.num_heads,
        patch_size=_scalar(vision.patch_size),
        temporal_patch_size=_scalar(vision.temporal_patch_size),
        in_channels=getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3),
        spatial_merge_size=vision.spatial_merge_size,
        out_hidden=out_hidden,
        gated_mlp=gated,
        window_size=window_size,
        fullatt_block_indexes=fullatt,
        num_deepstack_mergers=len(getattr(vision, "deepstack_visual_indexes", None) or ()),
    )
    return llm, vit


def _family(config, vision):
    """The `mmrope.model.families` row of a config: its `model_type`, else its vision config's (`<family>_vision`;
    a flat config has no top-level type)."""
    from mmrope.model.families import FAMILIES

    for model_type in (getattr(config, "model_type", None), getattr(vision, "model_type", None)):
        name = str(model_type or "").removesuffix("_vision")
        if name in FAMILIES:
            return FAMILIES[name]
    raise ValueError(
        f"config: model_type {getattr(config, 'model_type', None)!r} (vision {getattr(vision, 'model_type', None)!r}) "
        f"is not one of mmrope's families {sorted(FAMILIES)}"
    )


def _scalar(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square patch sizes are not supported: {value}")
        return int(value[0])
    return int(value)


def seqlens_from_cu_seqlens(cu_seqlens: Tensor) -> list[int]:
    """Sample lengths from flash-attn style cumulative boundaries."""
    return torch.diff(cu_seqlens.detach().to("cpu", torch.long)).tolist()
