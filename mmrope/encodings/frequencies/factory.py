"""`make_rotary`: allocation name + model geometry + variant knobs -> a validated `Rotary`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..knobs import KNOBS
from .allocations import (
    MULTIHEAD_SECTION,
    chunked_axes,
    chunked_sections,
    cyclic_axes,
    interleaved_axes,
    interleaved_sections,
    lumos_axes,
    multihead_axes,
    videorope_axes,
)
from .core import Rotary, rotary_dim
from .grape import LearnedGrapeRotary
from .rotary import GrapeCanonicalRotary, HopeRotary, MultiHeadRotary, OneDRotary, PairAxisRotary

__all__ = [
    "ALLOCATIONS",
    "ALLOCATION_KEYS",
    "ALLOCATION_TABLE",
    "DEFAULT_SECTIONS",
    "Allocation",
    "make_rotary",
]

GRAPE_MODES = ("canonical", "axis", "mixed", "block_mixed")

# What every builder receives: the rotary pairs' sections (None where the allocation has none), the number of
# rotary pairs, the model geometry (head_dim, rope_theta, partial_rotary_factor) and the allocation's knobs.
Builder = Callable[[list[int] | None, int, dict[str, Any], dict[str, Any]], Rotary]


def _always(opts: dict[str, Any]) -> bool:
    return True


def _never(opts: dict[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class Allocation:
    """One frequency allocation: the knobs it reads, its default sections (spec 4 (c)), its builder, and whether
    its sections must partition the model's rotary pairs (checked against a model by `Encoding.fits`)."""

    name: str
    keys: frozenset[str]
    build: Builder
    default_section: list[int] | None = None
    # chunked sections partition the pairs; VideoRoPE/HoPE's layout rule with larger sections would leave t a
    # single pair; interleaved sections are truncated by the rule like transformers' own interleaved MRoPE.
    partitions: Callable[[dict[str, Any]], bool] = _never


def _chunked(section, num_pairs, geometry, opts) -> Rotary:
    return PairAxisRotary(chunked_axes(section, num_pairs), allocation="chunked", **geometry)


def _interleaved(section, num_pairs, geometry, opts) -> Rotary:
    return PairAxisRotary(interleaved_axes(section, num_pairs), allocation="interleaved", **geometry)


def _lumos(section, num_pairs, geometry, opts) -> Rotary:
    return PairAxisRotary(lumos_axes(num_pairs), allocation="lumos", **geometry)


def _videorope_like(cls: type[PairAxisRotary], allocation: str) -> Builder:
    def build(section, num_pairs, geometry, opts) -> Rotary:
        layout = opts.get("frequency_layout", "package")
        rotary = cls(videorope_axes(section, num_pairs, layout), allocation=allocation, **geometry)
        rotary.frequency_layout = layout
        return rotary

    return build


def _multihead(section, num_pairs, geometry, opts) -> Rotary:
    return MultiHeadRotary(multihead_axes(section, opts.get("num_key_value_heads", 8)), **geometry)


def _grape_partitions(opts: dict[str, Any]) -> bool:
    return opts.get("grape_mode", "canonical") == "canonical" and opts.get(
        "frequency_allocation", "chunked"
    ) == ("chunked")


_GRAPE_KEYS = frozenset(
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
)
_VIDEOROPE_KEYS = frozenset({"mrope_section", "frequency_layout"})

ALLOCATION_TABLE: dict[str, Allocation] = {
    a.name: a
    for a in (
        Allocation("1d", frozenset(), lambda section, num_pairs, geometry, opts: OneDRotary(**geometry)),
        Allocation("chunked", frozenset({"mrope_section"}), _chunked, chunked_sections(64), _always),
        Allocation("interleaved", frozenset({"mrope_section"}), _interleaved, interleaved_sections(64)),
        Allocation(
            "multihead", frozenset({"mrope_section", "num_key_value_heads"}), _multihead, MULTIHEAD_SECTION
        ),
        Allocation(
            "videorope",
            _VIDEOROPE_KEYS,
            _videorope_like(PairAxisRotary, "videorope"),
            chunked_sections(64),
            _always,
        ),
        Allocation(
            "hope", _VIDEOROPE_KEYS, _videorope_like(HopeRotary, "hope"), chunked_sections(64), _always
        ),
        Allocation("lumos", frozenset(), _lumos),
        Allocation("grape", _GRAPE_KEYS, lambda *a: _make_grape(*a), chunked_sections(64), _grape_partitions),
    )
}
ALLOCATIONS = tuple(ALLOCATION_TABLE)
# Spec section 4 (c) defaults, used when `mrope_section` is not given.
DEFAULT_SECTIONS: dict[str, list[int]] = {
    a.name: a.default_section for a in ALLOCATION_TABLE.values() if a.default_section is not None
}
# Knobs each allocation reads. Other known encoding hyperparameters (position-design knobs, or e.g. lumos'
# mrope_section which the spec says is ignored) are accepted and ignored so a registry can pass an encoding's
# hparams through; anything else is a typo and raises.
ALLOCATION_KEYS: dict[str, frozenset[str]] = {a.name: a.keys for a in ALLOCATION_TABLE.values()}


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
    if allocation not in ALLOCATION_TABLE:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    unknown = sorted(set(kw) - set(KNOBS).union(*ALLOCATION_KEYS.values()))
    if unknown:
        raise ValueError(f"unknown frequency hyperparameter(s) {unknown} for allocation {allocation!r}")
    opts = {k: v for k, v in kw.items() if k in ALLOCATION_KEYS[allocation] and v is not None}
    geometry = {
        "head_dim": head_dim,
        "rope_theta": rope_theta,
        "partial_rotary_factor": partial_rotary_factor,
    }
    num_pairs = rotary_dim(head_dim, partial_rotary_factor) // 2  # validates head_dim / partial_rotary_factor
    entry = ALLOCATION_TABLE[allocation]
    section = opts.get("mrope_section", entry.default_section)
    return entry.build(section, num_pairs, geometry, opts)


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
