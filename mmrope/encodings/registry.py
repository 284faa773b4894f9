"""Registry: an encoding = (position design, frequency allocation) with validated hyperparameters.

    enc = build("mrope_i", spatial_reset=True)
    pos_3BL, rope_deltas_B1 = enc.position_ids(input_ids_BL, image_grid_thw=grid, attention_mask_BL=mask)
    cos, sin = enc.cos_sin(pos_3BL, head_dim=128, rope_theta=5e6)

Names follow configs/rope/<name>.yaml; defaults follow specs/encodings.md section 4 (c).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .positions import DESIGNS, PositionDesign
from .positions.skeleton import batch_positions, decode_positions, packed_positions
from .tokens import TokenIds

if TYPE_CHECKING:
    from .frequencies import Rotary

QWEN_TOKENS = TokenIds()  # Qwen2.5-VL / Qwen3-VL special token ids, merge size 2

# ----------------------------------------------------------------------------------------------------------------
# hyperparameter validators: each raises ValueError naming the key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(key: str, value: Any) -> Any:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a bool, got {value!r}")
    return value


def _sequence(key: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list, got {value!r}")
    return list(value)


def _sections(key: str, value: Any) -> list[int]:
    items = _sequence(key, value)
    if len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"{key} must be 3 positive ints (t, h, w), got {value!r}")
    return items


def _stride_list(key: str, value: Any) -> list[float]:
    items = _sequence(key, value)
    if not items or any(not _is_number(v) or v <= 0 for v in items):
        raise ValueError(f"{key} must be a non-empty list of positive numbers, got {value!r}")
    return items


def _optional_positive(key: str, value: Any) -> Any:
    return None if value is None else _positive_number(key, value)


def _optional_positive_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int or None, got {value!r}")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int, got {value!r}")
    return value


def _choice(*options: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise ValueError(f"{key} must be one of {options}, got {value!r}")
        return value

    return check


def _dff_rate(key: str, value: Any) -> bool | float:
    if isinstance(value, bool) or (_is_number(value) and 0 <= value <= 1):
        return value
    raise ValueError(f"{key} must be a bool or a number in [0, 1], got {value!r}")


def _radius(key: str, value: Any) -> float | str:
    if _is_number(value):
        return value
    if isinstance(value, str) and (value == "auto" or value.startswith("auto-")):
        if value != "auto":
            try:
                float(value.split("-", 1)[1])
            except ValueError:
                raise ValueError(f"{key} must be a number, 'auto' or 'auto-<scale>', got {value!r}") from None
        return value
    raise ValueError(f"{key} must be a number, 'auto' or 'auto-<scale>', got {value!r}")


def _alpha(key: str, value: Any) -> float:
    if _is_number(value) and (0 <= value <= 1 or value == -1):
        return value
    raise ValueError(f"{key} must be in [0, 1] or -1, got {value!r}")


def _move_to_positive(key: str, value: Any) -> bool | str | float:
    if isinstance(value, bool) or value == "auto" or (_is_number(value) and value >= 0):
        return value
    raise ValueError(f"{key} must be a bool, 'auto' or a non-negative offset, got {value!r}")


def _scales(key: str, value: Any) -> tuple[float, float, float]:
    items = _sequence(key, value)
    if len(items) != 3 or any(not _is_number(v) or v <= 0 for v in items):
        raise ValueError(f"{key} must be 3 positive numbers (t, h, w), got {value!r}")
    return tuple(items)  # type: ignore[return-value]


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "mrope_section": _sections,
    "temporal_stride": _positive_number,
    "spatial_reset": _flag,
    "num_key_value_heads": _positive_int,
    "temporal_stride_lst": _stride_list,
    "fixed_temporal_scale": _optional_positive,
    "frequency_layout": _choice("package", "official"),
    "move_to_origin": _flag,
    "move_to_positive": _move_to_positive,
    "dff_rate": _dff_rate,
    "method": _choice("circle", "no_circle"),
    "radius": _radius,
    "alpha": _alpha,
    "visual_stride": _positive_number,
    "position_scale": _scales,
    "log_freq_scale": _positive_number,
    "frequency_allocation": _choice("chunked", "interleaved"),
    "grape_mode": _choice("canonical", "axis", "mixed", "block_mixed"),
    "num_planes": _optional_positive_int,
    "block_size": _positive_int,
    "planes_per_block": _optional_positive_int,
    "rope_init": _flag,
    "learnable": _flag,
    "text_axes": _choice("diagonal", "temporal"),
}

# ----------------------------------------------------------------------------------------------------------------
# variants


@dataclass(frozen=True)
class Variant:
    """A registry entry: defaults (spec 4 (c)), which of them the position design / the allocation consume."""

    name: str
    allocation: str
    defaults: dict[str, Any]
    position_keys: tuple[str, ...] = ()
    extra_check: Callable[[dict[str, Any]], None] | None = field(default=None)


def _check_mhrope(hp: dict[str, Any]) -> None:
    if sum(hp["mrope_section"]) > hp["num_key_value_heads"]:
        raise ValueError(
            f"mrope_section counts KV heads for mhrope and must sum to <= num_key_value_heads "
            f"({hp['num_key_value_heads']}), got {hp['mrope_section']}"
        )


def _check_ilrope(hp: dict[str, Any]) -> None:
    if hp["spatial_reset"] is not True:
        raise ValueError("spatial_reset must be True for ilrope (its layout always resets h/w)")


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("vanilla", "1d", {}),
        Variant(
            "mrope",
            "chunked",
            {"mrope_section": [16, 24, 24], "temporal_stride": 2.0},
            position_keys=("temporal_stride",),
        ),
        Variant(
            "mrope_i",
            "interleaved",
            {"mrope_section": [24, 20, 20], "temporal_stride": 1.0, "spatial_reset": False},
            position_keys=("temporal_stride", "spatial_reset"),
        ),
        Variant(
            "mhrope",
            "multihead",
            {
                "mrope_section": [2, 3, 3],
                "num_key_value_heads": 8,
                "temporal_stride": 1.0,
                "spatial_reset": False,
            },
            position_keys=("temporal_stride", "spatial_reset"),
            extra_check=_check_mhrope,
        ),
        Variant(
            "videorope",
            "videorope",
            {"mrope_section": [16, 24, 24], "temporal_stride": 2.0, "frequency_layout": "package"},
            position_keys=("temporal_stride",),
        ),
        Variant(
            "hope",
            "hope",
            {
                "mrope_section": [16, 24, 24],
                "temporal_stride": 2.0,
                "temporal_stride_lst": [0.5, 0.75, 1.0, 1.25, 1.5],
                "fixed_temporal_scale": None,
                "frequency_layout": "package",
            },
            position_keys=("temporal_stride", "temporal_stride_lst", "fixed_temporal_scale"),
        ),
        Variant(
            "circlerope",
            "chunked",
            {
                "mrope_section": [16, 24, 24],
                "temporal_stride": 1.0,
                "move_to_origin": False,
                "move_to_positive": False,
                "dff_rate": False,
                "method": "circle",
                "radius": -1,
                "alpha": -1,
            },
            position_keys=(
                "temporal_stride",
                "move_to_origin",
                "move_to_positive",
                "dff_rate",
                "method",
                "radius",
                "alpha",
            ),
        ),
        Variant("v2pe", "1d", {"visual_stride": 16.0}, position_keys=("visual_stride",)),
        Variant(
            "ilrope",
            "interleaved",
            {
                "mrope_section": [24, 20, 20],
                "temporal_stride": 1.0,
                "spatial_reset": True,
                "text_axes": "diagonal",
            },
            position_keys=("temporal_stride", "text_axes"),
            extra_check=_check_ilrope,
        ),
        Variant(
            "omnirope",
            "chunked",
            {"mrope_section": [16, 24, 24], "temporal_stride": 1.0, "text_axes": "diagonal"},
            position_keys=("temporal_stride", "text_axes"),
        ),
        Variant(
            # mrope_section is kept for API symmetry but ignored by the fixed TTHWHWHW meta pattern (spec 4.11 (b)).
            "lumos",
            "lumos",
            {"mrope_section": [16, 24, 24], "temporal_stride": 1.0, "position_scale": [1.0, 1.0, 1.0]},
            position_keys=("temporal_stride", "position_scale"),
        ),
        Variant(
            "grape",
            "grape",
            {
                "mrope_section": [16, 24, 24],
                "temporal_stride": 1.0,
                "log_freq_scale": 1.0,
                "frequency_allocation": "chunked",
                "grape_mode": "canonical",
                "num_planes": None,
                "block_size": 16,
                "planes_per_block": None,
                "rope_init": True,
                "learnable": True,
            },
            position_keys=("temporal_stride",),
        ),
    ]
}


def available() -> list[str]:
    """Registry names, in the spec's order."""
    return list(VARIANTS)


# ----------------------------------------------------------------------------------------------------------------
# Encoding


class Encoding:
    """A multimodal position encoding: position ids (this package) + cos/sin (`mmrope.encodings.frequencies`).

    Attributes: `name`, `hparams` (all hyperparameters, defaults filled in), `allocation`, `design`
    (the `PositionDesign`), `is_1d`, `preserves_text_prior` (text-only input == vanilla RoPE; False for hope's zeroed
    t row, mhrope with NoPE heads, grape learned modes or a rescaled GRAPE spectrum).
    """

    def __init__(self, variant: Variant, hparams: dict[str, Any]) -> None:
        self.name = variant.name
        self.allocation = variant.allocation
        self.hparams = hparams
        self._variant = variant
        self.design: PositionDesign = DESIGNS[variant.name](**{k: hparams[k] for k in variant.position_keys})
        self.is_1d = self.design.is_1d
        self._rotaries: dict[tuple[Any, ...], Rotary] = {}

    @property
    def preserves_text_prior(self) -> bool:
        hp = self.hparams
        if self.name == "hope":
            return False
        if self.name == "mhrope":
            return sum(hp["mrope_section"]) == hp["num_key_value_heads"]
        if self.name == "grape":
            return hp["grape_mode"] == "canonical" and hp["log_freq_scale"] == 1.0
        return True

    def __repr__(self) -> str:
        return f"Encoding({self.name!r}, allocation={self.allocation!r}, hparams={self.hparams})"

    def position_ids(
        self,
        input_ids_BL: Tensor,
        *,
        tokens: TokenIds = QWEN_TOKENS,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        attention_mask_BL: Tensor | None = None,
        second_per_grid_ts: Tensor | Sequence[float] | None = None,
        layout: str = "qwen3",
        tokens_per_second: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(pos_3BL, rope_deltas_B1) for a padded batch. See `positions.skeleton` and the design's docstring.

        layout "qwen3": per-frame video blocks (grids split per frame, spec 2.1); "qwen2_5": one contiguous block per
        video with temporal step `second_per_grid_ts[i] * tokens_per_second` (spec 5.1, fixed); "qwen2" (Qwen2-VL):
        one contiguous block per video with temporal step 1. `generator` seeds HoPE's per-block temporal scale; the
        other designs ignore it.
        """
        return batch_positions(
            self.design,
            input_ids_BL,
            tokens=tokens,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask_BL=attention_mask_BL,
            second_per_grid_ts=second_per_grid_ts,
            layout=layout,
            tokens_per_second=tokens_per_second,
            generator=generator,
        )

    def packed_position_ids(
        self,
        input_ids_L: Tensor,
        cu_seqlens: Tensor | Sequence[int],
        *,
        tokens: TokenIds = QWEN_TOKENS,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | Sequence[float] | None = None,
        layout: str = "qwen3",
        tokens_per_second: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """pos_3L of a packed row: each sample [cu[i], cu[i+1]) computed alone (positions restart at 0), grids
        consumed in order across samples; equals the concatenation of per-sample `position_ids`."""
        return packed_positions(
            self.design,
            input_ids_L,
            cu_seqlens,
            tokens=tokens,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            layout=layout,
            tokens_per_second=tokens_per_second,
            generator=generator,
        )

    def decode_position_ids(self, rope_deltas_B1: Tensor, cache_position_N: Tensor) -> Tensor:
        """pos_3BN of new tokens: `cache_position + rope_deltas` on all three axes ([N] or [B, N] cache positions)."""
        return decode_positions(self.design, rope_deltas_B1, cache_position_N)

    def rotary(
        self,
        *,
        head_dim: int,
        rope_theta: float,
        partial_rotary_factor: float = 1.0,
        num_key_value_heads: int | None = None,
    ) -> Rotary:
        """The cos/sin module of this encoding, via `frequencies.make_rotary`, validated against the model.

        Raises ValueError naming the key: head_dim not a positive even int, rope_theta <= 0, partial_rotary_factor
        outside (0, 1], mhrope's num_key_value_heads differing from the model's (and anything make_rotary rejects).
        """
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
        if not _is_number(rope_theta) or rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
        if not _is_number(partial_rotary_factor) or not 0 < partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
        if num_key_value_heads is not None and self.name == "mhrope":
            if num_key_value_heads != self.hparams["num_key_value_heads"]:
                raise ValueError(
                    f"num_key_value_heads: mhrope was built for {self.hparams['num_key_value_heads']} KV heads but the "
                    f"model has {num_key_value_heads}"
                )
        key = (head_dim, rope_theta, partial_rotary_factor, num_key_value_heads)
        if key not in self._rotaries:
            from .frequencies import ALLOCATION_KEYS, make_rotary  # lazy: positions need no frequencies

            kw = {k: v for k, v in self.hparams.items() if k in ALLOCATION_KEYS[self.allocation]}
            self._rotaries[key] = make_rotary(
                self.allocation,
                head_dim=head_dim,
                rope_theta=rope_theta,
                partial_rotary_factor=partial_rotary_factor,
                **kw,
            )
        return self._rotaries[key]

    def cos_sin(
        self,
        pos_3BL: Tensor,
        *,
        head_dim: int,
        rope_theta: float,
        partial_rotary_factor: float = 1.0,
        num_key_value_heads: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """float32 (cos, sin) for positions [3, B, L] (or [B, L]); [B, L, rotary_dim] or [B, H_kv, L, rotary_dim]."""
        rotary = self.rotary(
            head_dim=head_dim,
            rope_theta=rope_theta,
            partial_rotary_factor=partial_rotary_factor,
            num_key_value_heads=num_key_value_heads,
        )
        return rotary(pos_3BL)


def build(name: str, **hparams: Any) -> Encoding:
    """Encoding `name` with spec defaults overridden by `hparams`.

    Raises ValueError naming the offending name/key: unknown name, unknown hyperparameter for this name, or an
    invalid value (e.g. `mrope_section` not 3 positive ints, `alpha` outside [0, 1] and != -1).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown encoding name {name!r}; available: {available()}")
    variant = VARIANTS[name]
    unknown = sorted(set(hparams) - set(variant.defaults))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for encoding {name!r}; accepted: {sorted(variant.defaults)}"
        )
    merged = {**variant.defaults, **hparams}
    checked = {key: _VALIDATORS[key](key, value) for key, value in merged.items()}
    if variant.extra_check is not None:
        variant.extra_check(checked)
    return Encoding(variant, checked)
