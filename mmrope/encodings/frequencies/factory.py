"""`make_rotary`: allocation name + model geometry + variant knobs -> a validated `Rotary`."""

from __future__ import annotations

from typing import Any

from .allocations import (
    chunked_axes,
    cyclic_axes,
    interleaved_axes,
    lumos_axes,
    multihead_axes,
    videorope_axes,
)
from .core import Rotary, rotary_dim
from .grape import LearnedGrapeRotary
from .rotary import GrapeCanonicalRotary, HopeRotary, MultiHeadRotary, OneDRotary, PairAxisRotary

__all__ = ["ALLOCATIONS", "DEFAULT_SECTIONS", "make_rotary"]

ALLOCATIONS = ("1d", "chunked", "interleaved", "multihead", "videorope", "hope", "lumos", "grape")

# Spec section 4 (c) defaults, used when `mrope_section` is not given.
DEFAULT_SECTIONS: dict[str, list[int]] = {
    "chunked": [16, 24, 24],
    "interleaved": [24, 20, 20],
    "multihead": [2, 3, 3],
    "videorope": [16, 24, 24],
    "hope": [16, 24, 24],
    "grape": [16, 24, 24],
}

# Knobs each allocation reads. Other known encoding hyperparameters (position-design knobs, or e.g. lumos'
# mrope_section which the spec says is ignored) are accepted and ignored so a registry can pass an encoding's
# hparams through; anything else is a typo and raises.
ALLOCATION_KEYS: dict[str, frozenset[str]] = {
    "1d": frozenset(),
    "chunked": frozenset({"mrope_section"}),
    "interleaved": frozenset({"mrope_section"}),
    "multihead": frozenset({"mrope_section", "num_key_value_heads"}),
    "videorope": frozenset({"mrope_section", "frequency_layout"}),
    "hope": frozenset({"mrope_section", "frequency_layout"}),
    "lumos": frozenset(),
    "grape": frozenset(
        {
            "mrope_section",
            "log_freq_scale",
            "frequency_allocation",
            "grape_mode",
            "num_planes",
            "block_size",
            "planes_per_block",
            "rope_init",
            "learnable",
        }
    ),
}
_POSITION_KNOBS = frozenset(
    {
        "mrope_section",
        "num_key_value_heads",
        "temporal_stride",
        "spatial_reset",
        "temporal_stride_lst",
        "move_to_origin",
        "move_to_positive",
        "dff_rate",
        "method",
        "radius",
        "alpha",
        "visual_stride",
        "position_scale",
        "fixed_temporal_scale",
        "frequency_layout",
        "text_axes",
    }
)
_KNOWN = _POSITION_KNOBS.union(*ALLOCATION_KEYS.values())

GRAPE_MODES = ("canonical", "axis", "mixed", "block_mixed")


def make_rotary(
    allocation: str,
    *,
    head_dim: int,
    rope_theta: float,
    partial_rotary_factor: float = 1.0,
    **kw: Any,
) -> Rotary:
    """Build the cos/sin module of a frequency allocation.

    Args:
        allocation: "1d" (vanilla, v2pe), "chunked" (mrope, circlerope, omnirope), "interleaved" (mrope_i,
            ilrope), "multihead" (mhrope), "videorope", "hope", "lumos" (Lumos-1 MM-RoPE) or "grape".
        head_dim, rope_theta, partial_rotary_factor: from the model config; rotary_dim = max(2, d - d % 2)
            with d = int(head_dim * partial_rotary_factor).
        **kw: mrope_section (default per allocation, spec 4 (c)), num_key_value_heads (multihead, default 8),
            frequency_layout ("package" | "official", videorope/hope), GRAPE's log_freq_scale,
            frequency_allocation, grape_mode, num_planes, block_size, planes_per_block, rope_init, learnable.
            `None` means "default".

    Raises:
        ValueError naming the key: unknown allocation or knob, odd head_dim, rope_theta <= 0, sections not 3
            positive ints, chunked sections not summing to rotary_dim / 2, multihead sections summing past
            num_key_value_heads.

    Example: make_rotary("interleaved", head_dim=128, rope_theta=5e6, mrope_section=[24, 20, 20]).pattern ==
    "THW" * 20 + "TTTT".
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    unknown = sorted(set(kw) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown frequency hyperparameter(s) {unknown} for allocation {allocation!r}")
    opts = {k: v for k, v in kw.items() if k in ALLOCATION_KEYS[allocation] and v is not None}
    geometry = {
        "head_dim": head_dim,
        "rope_theta": rope_theta,
        "partial_rotary_factor": partial_rotary_factor,
    }
    num_pairs = rotary_dim(head_dim, partial_rotary_factor) // 2  # validates head_dim / partial_rotary_factor
    section = opts.get("mrope_section", DEFAULT_SECTIONS.get(allocation))

    if allocation == "1d":
        return OneDRotary(**geometry)
    if allocation == "chunked":
        return PairAxisRotary(chunked_axes(section, num_pairs), allocation=allocation, **geometry)
    if allocation == "interleaved":
        return PairAxisRotary(interleaved_axes(section, num_pairs), allocation=allocation, **geometry)
    if allocation == "lumos":
        return PairAxisRotary(lumos_axes(num_pairs), allocation=allocation, **geometry)
    if allocation in ("videorope", "hope"):
        layout = opts.get("frequency_layout", "package")
        axes = videorope_axes(section, num_pairs, layout)
        cls = HopeRotary if allocation == "hope" else PairAxisRotary
        rotary = cls(axes, allocation=allocation, **geometry)
        rotary.frequency_layout = layout
        return rotary
    if allocation == "multihead":
        head_axes = multihead_axes(section, opts.get("num_key_value_heads", 8))
        return MultiHeadRotary(head_axes, **geometry)
    return _make_grape(section, num_pairs, geometry, opts)


def _make_grape(section: list[int], num_pairs: int, geometry: dict[str, Any], opts: dict[str, Any]) -> Rotary:
    log_freq_scale = opts.get("log_freq_scale", 1.0)
    if (
        isinstance(log_freq_scale, bool)
        or not isinstance(log_freq_scale, (int, float))
        or not log_freq_scale > 0
    ):
        raise ValueError(f"log_freq_scale must be a positive number, got {log_freq_scale!r}")
    frequency_allocation = opts.get("frequency_allocation", "chunked")
    if frequency_allocation not in ("chunked", "interleaved"):
        raise ValueError(
            f"frequency_allocation must be 'chunked' or 'interleaved', got {frequency_allocation!r}"
        )
    grape_mode = opts.get("grape_mode", "canonical")
    if grape_mode not in GRAPE_MODES:
        raise ValueError(f"grape_mode must be one of {GRAPE_MODES}, got {grape_mode!r}")
    if grape_mode == "canonical":
        if frequency_allocation == "chunked":
            axes = chunked_axes(section, num_pairs)
        else:
            axes = cyclic_axes(num_pairs)
        rotary = GrapeCanonicalRotary(axes, log_freq_scale=log_freq_scale, **geometry)
        rotary.frequency_allocation = frequency_allocation
        return rotary
    return LearnedGrapeRotary(
        grape_mode=grape_mode,
        log_freq_scale=float(log_freq_scale),
        num_planes=opts.get("num_planes"),
        block_size=opts.get("block_size", 16),
        planes_per_block=opts.get("planes_per_block"),
        rope_init=opts.get("rope_init", True),
        learnable=opts.get("learnable", True),
        **geometry,
    )
