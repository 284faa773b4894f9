"""Hyperparameter ("knob") validators of the encodings: each takes (key, value), returns the value and raises a
ValueError naming the key. `KNOBS` maps every shared knob to its validator; the registry reads it, and
`frequencies.make_rotary` accepts exactly these names (plus its allocation's keys) as pass-through."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Validator = Callable[[str, Any], Any]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_number(key: str, value: Any) -> Any:
    if not is_number(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    return value


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a bool, got {value!r}")
    return value


def sequence(key: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list, got {value!r}")
    return list(value)


def sections(key: str, value: Any) -> list[int]:
    items = sequence(key, value)
    if len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"{key} must be 3 positive ints (t, h, w), got {value!r}")
    return items


def stride_list(key: str, value: Any) -> list[float]:
    items = sequence(key, value)
    if not items or any(not is_number(v) or v <= 0 for v in items):
        raise ValueError(f"{key} must be a non-empty list of positive numbers, got {value!r}")
    return items


def optional_positive(key: str, value: Any) -> Any:
    return None if value is None else positive_number(key, value)


def optional_positive_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int or None, got {value!r}")
    return value


def positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int, got {value!r}")
    return value


def choice(*options: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise ValueError(f"{key} must be one of {options}, got {value!r}")
        return value

    return check


def dff_rate(key: str, value: Any) -> bool | float:
    if isinstance(value, bool) or (is_number(value) and 0 <= value <= 1):
        return value
    raise ValueError(f"{key} must be a bool or a number in [0, 1], got {value!r}")


def radius(key: str, value: Any) -> float | str:
    if is_number(value):
        return value
    if isinstance(value, str) and (value == "auto" or value.startswith("auto-")):
        if value != "auto":
            try:
                float(value.split("-", 1)[1])
            except ValueError:
                raise ValueError(f"{key} must be a number, 'auto' or 'auto-<scale>', got {value!r}") from None
        return value
    raise ValueError(f"{key} must be a number, 'auto' or 'auto-<scale>', got {value!r}")


def alpha(key: str, value: Any) -> float:
    if is_number(value) and (0 <= value <= 1 or value == -1):
        return value
    raise ValueError(f"{key} must be in [0, 1] or -1, got {value!r}")


def move_to_positive(key: str, value: Any) -> bool | str | float:
    if isinstance(value, bool) or value == "auto" or (is_number(value) and value >= 0):
        return value
    raise ValueError(f"{key} must be a bool, 'auto' or a non-negative offset, got {value!r}")


def scales(key: str, value: Any) -> tuple[float, float, float]:
    items = sequence(key, value)
    if len(items) != 3 or any(not is_number(v) or v <= 0 for v in items):
        raise ValueError(f"{key} must be 3 positive numbers (t, h, w), got {value!r}")
    return tuple(items)  # type: ignore[return-value]


# The knobs the shipped encodings share, by name. An encoding with a knob of its own declares its validator in its
# registry entry (`EncodingSpec.validators`).
KNOBS: dict[str, Validator] = {
    "mrope_section": sections,
    "temporal_stride": positive_number,
    "spatial_reset": flag,
    "num_key_value_heads": positive_int,
    "temporal_stride_lst": stride_list,
    "fixed_temporal_scale": optional_positive,
    "frequency_layout": choice("package", "official"),
    "move_to_origin": flag,
    "move_to_positive": move_to_positive,
    "dff_rate": dff_rate,
    "method": choice("circle", "no_circle"),
    "radius": radius,
    "alpha": alpha,
    "visual_stride": positive_number,
    "position_scale": scales,
    "log_freq_scale": positive_number,
    "frequency_allocation": choice("chunked", "interleaved"),
    "grape_mode": choice("canonical", "axis", "mixed", "block_mixed"),
    "num_planes": optional_positive_int,
    "block_size": positive_int,
    "planes_per_block": optional_positive_int,
    "rope_init": flag,
    "learnable": flag,
    "text_axes": choice("diagonal", "temporal"),
}
