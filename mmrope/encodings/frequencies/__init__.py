"""Frequency allocations: positions [3, B, L] -> cos/sin per channel (or per KV head) -> rotated q/k.

Public API:
    inv_freq(head_dim, rope_theta, partial_rotary_factor=1.0) -> Tensor[n]   bit-exact RoPE recipe (spec 1.2)
    make_rotary(allocation, *, head_dim, rope_theta, partial_rotary_factor=1.0, **kw) -> Rotary
    ALLOCATION_TABLE: name -> Allocation (knobs, default sections, builder, whether sections partition the pairs)
    Rotary: forward(pos) -> (cos, sin) float32; apply(q, k, cos, sin); rotate(q, k, pos)
    rotate_half(x), apply_rotary(x, cos, sin): helpers for attention code
    allocation maps: chunked_axes, interleaved_axes, videorope_axes, lumos_axes, cyclic_axes, multihead_axes,
        pattern
"""

from __future__ import annotations

from .allocations import (
    NOPE,
    H,
    T,
    W,
    chunked_axes,
    cyclic_axes,
    interleaved_axes,
    lumos_axes,
    multihead_axes,
    pattern,
    videorope_axes,
)
from .core import Rotary, apply_rotary, as_three_rows, float32_region, inv_freq, rotary_dim, rotate_half
from .factory import (
    ALLOCATION_KEYS,
    ALLOCATION_TABLE,
    ALLOCATIONS,
    DEFAULT_SECTIONS,
    GRAPE_MODES,
    Allocation,
    make_rotary,
)
from .grape import GRAPE_LEARNED_MODES, LearnedGrapeRotary
from .rotary import GrapeCanonicalRotary, HopeRotary, MultiHeadRotary, OneDRotary, PairAxisRotary

__all__ = [
    "ALLOCATION_KEYS",
    "ALLOCATIONS",
    "ALLOCATION_TABLE",
    "Allocation",
    "DEFAULT_SECTIONS",
    "GRAPE_LEARNED_MODES",
    "GRAPE_MODES",
    "H",
    "NOPE",
    "T",
    "W",
    "GrapeCanonicalRotary",
    "HopeRotary",
    "LearnedGrapeRotary",
    "MultiHeadRotary",
    "OneDRotary",
    "PairAxisRotary",
    "Rotary",
    "apply_rotary",
    "as_three_rows",
    "chunked_axes",
    "cyclic_axes",
    "float32_region",
    "interleaved_axes",
    "inv_freq",
    "lumos_axes",
    "make_rotary",
    "multihead_axes",
    "pattern",
    "rotary_dim",
    "rotate_half",
    "videorope_axes",
]
