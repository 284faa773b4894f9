"""Pair -> axis maps (spec sections 4.x (b)). Each returns a list with one entry per rotary pair j
(0 <= j < n): `T` (0), `H` (1) or `W` (2), the row of the [3, B, L] positions that pair j rotates with.
MHRoPE's map is per KV head instead and may contain `NOPE` (-1).

`pattern(axes)` renders a map as a string ("THWTHW...") for docs, tests and plots.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "H",
    "NOPE",
    "T",
    "W",
    "MULTIHEAD_SECTION",
    "check_sections",
    "chunked_axes",
    "chunked_sections",
    "cyclic_axes",
    "interleaved_axes",
    "interleaved_sections",
    "lumos_axes",
    "multihead_axes",
    "pattern",
    "videorope_axes",
]

T, H, W = 0, 1, 2
NOPE = -1
_LETTERS = {T: "T", H: "H", W: "W", NOPE: "N"}
# Lumos-1 MM-RoPE meta component (distributed 2:3:3), repeated every 8 pairs.
_LUMOS_META = (T, T, H, W, H, W, H, W)


def chunked_sections(num_pairs: int) -> list[int]:
    """The chunked default 16:24:24 at `num_pairs` pairs (t and h rounded down, w the rest): [16, 24, 24] at 64
    (spec 4 (c): mrope, circlerope, omnirope, videorope, hope, lumos, grape), [8, 12, 12] at 32."""
    t, h = num_pairs // 4, 3 * num_pairs // 8
    return [t, h, num_pairs - t - h]


def interleaved_sections(num_pairs: int) -> list[int]:
    """The interleaved default 24:20:20 at `num_pairs` pairs (h and w rounded down, t the rest): [24, 20, 20] at 64
    (spec 4 (c): mrope_i, ilrope; what Qwen3-VL ships), [12, 10, 10] at 32."""
    h = 5 * num_pairs // 16
    return [num_pairs - 2 * h, h, h]


# MHRoPE's default counts KV heads, not pairs: t 2, h 3, w 3 of 8 KV heads (spec 4.4 (c)).
MULTIHEAD_SECTION = [2, 3, 3]


def check_sections(mrope_section: Sequence[int], key: str = "mrope_section") -> list[int]:
    """3 positive ints, else ValueError naming `key`."""
    values = list(mrope_section) if isinstance(mrope_section, (list, tuple)) else None
    if (
        values is None
        or len(values) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        raise ValueError(f"{key} must be 3 positive ints [t, h, w], got {mrope_section!r}")
    return values


def chunked_axes(mrope_section: Sequence[int], num_pairs: int) -> list[int]:
    """MRoPE (Qwen2-VL/2.5-VL): pairs [0, s_t) -> T, [s_t, s_t+s_h) -> H, [s_t+s_h, n) -> W.

    The sections must sum to n (HF's `split` would fail otherwise). Example: [2, 1, 1], n=4 -> "TTHW".
    """
    s_t, s_h, s_w = check_sections(mrope_section)
    if s_t + s_h + s_w != num_pairs:
        raise ValueError(
            f"mrope_section {list(mrope_section)} must sum to the number of rotary pairs {num_pairs} "
            f"(rotary_dim / 2) for the chunked allocation"
        )
    return [T] * s_t + [H] * s_h + [W] * s_w


def interleaved_axes(mrope_section: Sequence[int], num_pairs: int) -> list[int]:
    """MRoPE-I (Qwen3-VL): H if j%3==1 and j < 3*s_h; W if j%3==2 and j < 3*s_w; otherwise T.

    Bit-identical to HF `apply_interleaved_mrope`. [24, 20, 20], n=64 -> "THW"*20 + "TTTT" (T24/H20/W20). Like
    HF, sections larger than the available pairs are truncated by the rule (the Qwen3-VL default [24, 20, 20]
    on a 16-pair model acts as [6, 5, 5]); only non-positive or malformed sections are rejected.
    """
    _, s_h, s_w = check_sections(mrope_section)
    axes = []
    for j in range(num_pairs):
        if j % 3 == 1 and j < 3 * s_h:
            axes.append(H)
        elif j % 3 == 2 and j < 3 * s_w:
            axes.append(W)
        else:
            axes.append(T)
    return axes


def videorope_axes(
    mrope_section: Sequence[int], num_pairs: int, frequency_layout: str = "package"
) -> list[int]:
    """VideoRoPE/HoPE frequency layout.

    `frequency_layout="package"` (default; spec 4.5(b), reproduces Multimodal-RoPEs cd413b9, spec 6.1): pair 0
    -> T, odd j < 2*s_h -> H, even 2 <= j < 2*s_w -> W, everything else -> T. [16, 24, 24], n=64 gives
    "THWHW...WH" + 16*"T" (T17/H24/W23); [4, 6, 6], n=16 gives "THWHWHWHWHWHTTTT". This is the official layout
    shifted by one pair, with T on the highest-frequency pair and h/w parity swapped.

    `frequency_layout="official"` (the original VideoRoPE `apply_m_modify_multimodal_rotary_pos_emb`): even j
    < 2*s_h -> H, odd j < 2*s_w -> W, everything else -> T, i.e. "HWHW...HW" then T on the last
    (lowest-frequency) pairs. [16, 24, 24], n=64 gives H24/W24/T16.
    """
    _, s_h, s_w = check_sections(mrope_section)
    if frequency_layout not in ("package", "official"):
        raise ValueError(f"frequency_layout must be 'package' or 'official', got {frequency_layout!r}")
    axes = []
    for j in range(num_pairs):
        if frequency_layout == "package":
            is_h = j % 2 == 1 and j < 2 * s_h
            is_w = j % 2 == 0 and 2 <= j < 2 * s_w
        else:
            is_h = j % 2 == 0 and j < 2 * s_h
            is_w = j % 2 == 1 and j < 2 * s_w
        axes.append(H if is_h else W if is_w else T)
    return axes


def lumos_axes(num_pairs: int) -> list[int]:
    """Lumos-1 MM-RoPE: axis(j) = [T, T, H, W, H, W, H, W][j mod 8]; mrope_section plays no role."""
    return [_LUMOS_META[j % len(_LUMOS_META)] for j in range(num_pairs)]


def cyclic_axes(num_pairs: int) -> list[int]:
    """GRAPE canonical "interleaved": axis(j) = j mod 3 (T gets the extra pair: T22/H21/W21 for n=64)."""
    return [j % 3 for j in range(num_pairs)]


def multihead_axes(mrope_section: Sequence[int], num_key_value_heads: int) -> list[int]:
    """MHRoPE: sections count KV heads. Heads [0, s_t) -> T, [s_t, s_t+s_h) -> H, [.., sum) -> W, rest NoPE.

    Example: [2, 3, 3] with 8 KV heads -> "TTHHHWWW"; [1, 1, 1] with 4 -> "THWN".
    """
    s_t, s_h, s_w = check_sections(mrope_section)
    if (
        isinstance(num_key_value_heads, bool)
        or not isinstance(num_key_value_heads, int)
        or num_key_value_heads < 1
    ):
        raise ValueError(f"num_key_value_heads must be a positive int, got {num_key_value_heads!r}")
    if s_t + s_h + s_w > num_key_value_heads:
        raise ValueError(
            f"mrope_section {list(mrope_section)} counts KV heads for MHRoPE and must sum to at most "
            f"num_key_value_heads={num_key_value_heads}"
        )
    return [T] * s_t + [H] * s_h + [W] * s_w + [NOPE] * (num_key_value_heads - s_t - s_h - s_w)


def pattern(axes: Sequence[int]) -> str:
    """Render an axis map, e.g. [0, 1, 2, 0] -> "THWT" (NoPE heads are "N")."""
    return "".join(_LETTERS[a] for a in axes)
