"""Registry: an encoding = (position design, frequency allocation) with validated hyperparameters.

    enc = build("mrope_i", spatial_reset=True)
    pos_3BL, rope_deltas_B1 = enc.position_ids(input_ids_BL, image_grid_thw=grid, attention_mask_BL=mask)
    cos, sin = enc.cos_sin(pos_3BL, head_dim=128, rope_theta=5e6)

Names follow configs/rope/<name>.yaml; defaults follow specs/encodings.md section 4 (c).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from .frequencies.allocations import MULTIHEAD_SECTION, chunked_sections, interleaved_sections
from .knobs import KNOBS, Validator, is_number
from .positions.circlerope import CircleRoPEPositions
from .positions.lumos import LumosPositions
from .positions.mrope import GrapePositions, MHRoPEPositions, MRoPEInterleavePositions, MRoPEPositions
from .positions.omnirope import ILRoPEPositions, OmniRoPEPositions
from .positions.skeleton import PositionDesign, batch_positions, decode_positions, packed_positions
from .positions.v2pe import V2PEPositions
from .positions.vanilla import VanillaPositions
from .positions.videorope import HoPEPositions, VideoRoPEPositions
from .tokens import TokenIds

if TYPE_CHECKING:
    from .frequencies import Rotary

QWEN_TOKENS = TokenIds()  # Qwen2.5-VL / Qwen3-VL special token ids, merge size 2
CHUNKED = chunked_sections(64)  # [16, 24, 24]: the spec's default rotary-pair sections at head_dim 128
INTERLEAVED = interleaved_sections(64)  # [24, 20, 20]


class Geometry(Protocol):
    """What an encoding must fit: the attention geometry of a text model (`mmrope.model.families.TextGeometry`)."""

    head_dim: int
    num_key_value_heads: int
    rope_theta: float
    partial_rotary_factor: float

    @property
    def num_rotary_pairs(self) -> int: ...


class EncodingMisfit(ValueError):
    """An encoding that cannot run on a text model; `hparam` names the encoding hyperparameter to change (None
    when the encoding as a whole does not fit)."""

    def __init__(self, hparam: str | None, reason: str) -> None:
        super().__init__(f"{hparam or 'encoding'}: {reason}")
        self.hparam = hparam
        self.reason = reason


def _always(hp: dict[str, Any]) -> bool:
    return True


# ----------------------------------------------------------------------------------------------------------------
# one entry per encoding


@dataclass(frozen=True)
class EncodingSpec:
    """Everything the project knows about one encoding; `register(spec)` is the only edit a new encoding needs
    besides its positions file (the design) and, to ship it, its `configs/rope/<name>.yaml`.

    `defaults` are the spec's (4 (c)); `position_keys` the ones the design's constructor takes, the rest go to the
    frequency allocation (its `ALLOCATION_KEYS`). `validators` adds (or overrides) the checks of `knobs.KNOBS` for
    knobs of this encoding; `check(hp)` validates combinations; `fits(hp, geometry)` raises `EncodingMisfit` for a
    model the encoding cannot run on (beyond the generic checks of `Encoding.fits`); `preserves_text_prior(hp)`:
    text-only input gives vanilla RoPE's positions and frequencies.
    """

    name: str
    design: type[PositionDesign]
    allocation: str  # a key of `frequencies.ALLOCATION_TABLE`
    defaults: Mapping[str, Any] = field(default_factory=dict)
    position_keys: tuple[str, ...] = ()
    validators: Mapping[str, Validator] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None
    fits: Callable[[dict[str, Any], Geometry], None] | None = None
    preserves_text_prior: Callable[[dict[str, Any]], bool] = _always

    def validator(self, key: str) -> Validator:
        return self.validators.get(key) or KNOBS[key]


ENCODINGS: dict[str, EncodingSpec] = {}


def register(spec: EncodingSpec) -> EncodingSpec:
    """Add `spec` to the registry (`build(spec.name)` and `rope.name` accept it from then on). Raises ValueError
    for a taken name, an unknown allocation, a knob without a validator or a position key without a default."""
    from .frequencies import ALLOCATION_TABLE  # lazy: the position designs import without the frequencies

    if spec.name in ENCODINGS:
        raise ValueError(f"encoding {spec.name!r} is already registered")
    if spec.allocation not in ALLOCATION_TABLE:
        raise ValueError(f"encoding {spec.name!r}: allocation must be one of {list(ALLOCATION_TABLE)}")
    if missing := sorted(k for k in spec.defaults if k not in spec.validators and k not in KNOBS):
        raise ValueError(
            f"encoding {spec.name!r}: knob(s) {missing} have no validator (EncodingSpec.validators)"
        )
    if missing := sorted(set(spec.position_keys) - set(spec.defaults)):
        raise ValueError(f"encoding {spec.name!r}: position key(s) {missing} have no default")
    ENCODINGS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an encoding (tests that register a toy one clean up with this)."""
    del ENCODINGS[name]


def _check_mhrope(hp: dict[str, Any]) -> None:
    if sum(hp["mrope_section"]) > hp["num_key_value_heads"]:
        raise ValueError(
            f"mrope_section counts KV heads for mhrope and must sum to <= num_key_value_heads "
            f"({hp['num_key_value_heads']}), got {hp['mrope_section']}"
        )


def _mhrope_fits(hp: dict[str, Any], geometry: Geometry) -> None:
    """The one MHRoPE KV-head check against a model (also run by `Encoding.rotary` given the model's KV heads)."""
    if hp["num_key_value_heads"] != geometry.num_key_value_heads:
        raise EncodingMisfit(
            "num_key_value_heads",
            f"mhrope assigns whole KV heads to t/h/w and was set for {hp['num_key_value_heads']} KV heads, but the "
            f"model has {geometry.num_key_value_heads} (mrope_section must then sum to at most that)",
        )


def _check_ilrope(hp: dict[str, Any]) -> None:
    if hp["spatial_reset"] is not True:
        raise ValueError("spatial_reset must be True for ilrope (its layout always resets h/w)")


for _spec in [
    EncodingSpec("vanilla", VanillaPositions, "1d"),
    EncodingSpec(
        "mrope",
        MRoPEPositions,
        "chunked",
        {"mrope_section": CHUNKED, "temporal_stride": 2.0},
        position_keys=("temporal_stride",),
    ),
    EncodingSpec(
        "mrope_i",
        MRoPEInterleavePositions,
        "interleaved",
        {"mrope_section": INTERLEAVED, "temporal_stride": 1.0, "spatial_reset": False},
        position_keys=("temporal_stride", "spatial_reset"),
    ),
    EncodingSpec(
        "mhrope",
        MHRoPEPositions,
        "multihead",
        {
            "mrope_section": MULTIHEAD_SECTION,
            "num_key_value_heads": 8,
            "temporal_stride": 1.0,
            "spatial_reset": False,
        },
        position_keys=("temporal_stride", "spatial_reset"),
        check=_check_mhrope,
        fits=_mhrope_fits,
        # NoPE heads (sections not covering every KV head) see no position at all
        preserves_text_prior=lambda hp: sum(hp["mrope_section"]) == hp["num_key_value_heads"],
    ),
    EncodingSpec(
        "videorope",
        VideoRoPEPositions,
        "videorope",
        {"mrope_section": CHUNKED, "temporal_stride": 2.0, "frequency_layout": "package"},
        position_keys=("temporal_stride",),
    ),
    EncodingSpec(
        "hope",
        HoPEPositions,
        "hope",
        {
            "mrope_section": CHUNKED,
            "temporal_stride": 2.0,
            "temporal_stride_lst": [0.5, 0.75, 1.0, 1.25, 1.5],
            "fixed_temporal_scale": None,
            "frequency_layout": "package",
        },
        position_keys=("temporal_stride", "temporal_stride_lst", "fixed_temporal_scale"),
        preserves_text_prior=lambda hp: False,  # the t row is zeroed (NoPE) in the embedding
    ),
    EncodingSpec(
        "circlerope",
        CircleRoPEPositions,
        "chunked",
        {
            "mrope_section": CHUNKED,
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
    EncodingSpec("v2pe", V2PEPositions, "1d", {"visual_stride": 16.0}, position_keys=("visual_stride",)),
    EncodingSpec(
        "ilrope",
        ILRoPEPositions,
        "interleaved",
        {
            "mrope_section": INTERLEAVED,
            "temporal_stride": 1.0,
            "spatial_reset": True,
            "text_axes": "diagonal",
        },
        position_keys=("temporal_stride", "text_axes"),
        check=_check_ilrope,
    ),
    EncodingSpec(
        "omnirope",
        OmniRoPEPositions,
        "chunked",
        {"mrope_section": CHUNKED, "temporal_stride": 1.0, "text_axes": "diagonal"},
        position_keys=("temporal_stride", "text_axes"),
    ),
    EncodingSpec(
        # mrope_section is kept for API symmetry but ignored by the fixed TTHWHWHW meta pattern (spec 4.11 (b)).
        "lumos",
        LumosPositions,
        "lumos",
        {"mrope_section": CHUNKED, "temporal_stride": 1.0, "position_scale": [1.0, 1.0, 1.0]},
        position_keys=("temporal_stride", "position_scale"),
    ),
    EncodingSpec(
        "grape",
        GrapePositions,
        "grape",
        {
            "mrope_section": CHUNKED,
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
        # learned rotation planes or a rescaled spectrum differ from RoPE on text
        preserves_text_prior=lambda hp: hp["grape_mode"] == "canonical" and hp["log_freq_scale"] == 1.0,
    ),
]:
    register(_spec)


def available() -> list[str]:
    """Registry names, in the spec's order (then any registered later)."""
    return list(ENCODINGS)


# ----------------------------------------------------------------------------------------------------------------
# Encoding


class Encoding:
    """A multimodal position encoding: position ids (this package) + cos/sin (`mmrope.encodings.frequencies`).

    Attributes: `name`, `hparams` (all hyperparameters, defaults filled in), `allocation`, `design`
    (the `PositionDesign`), `is_1d`, `preserves_text_prior` (text-only input == vanilla RoPE; False for hope's zeroed
    t row, mhrope with NoPE heads, grape learned modes or a rescaled GRAPE spectrum).
    """

    def __init__(self, spec: EncodingSpec, hparams: dict[str, Any]) -> None:
        self.name = spec.name
        self.allocation = spec.allocation
        self.hparams = hparams
        self.spec = spec
        self.design: PositionDesign = spec.design(**{k: hparams[k] for k in spec.position_keys})
        self.is_1d = self.design.is_1d
        self._rotaries: dict[tuple[Any, ...], Rotary] = {}

    @property
    def preserves_text_prior(self) -> bool:
        return self.spec.preserves_text_prior(self.hparams)

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
        if not is_number(rope_theta) or rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
        if not is_number(partial_rotary_factor) or not 0 < partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
        if num_key_value_heads is not None and self.spec.fits is not None:
            geometry = _RotaryGeometry(head_dim, rope_theta, partial_rotary_factor, num_key_value_heads)
            self.spec.fits(self.hparams, geometry)
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

    def fits(self, geometry: Geometry) -> None:
        """Raise `EncodingMisfit` when this encoding cannot run on a text model with this attention geometry: the
        entry's own check (MHRoPE's KV heads), sections that must partition the rotary pairs (head_dim x
        partial_rotary_factor / 2: 32 on real Qwen3.5) but do not, or anything the rotary module rejects (GRAPE's
        block sizes, ...). Interleaved sections are not checked, like transformers' own interleaved MRoPE (larger
        sections are truncated by the rule: [24, 20, 20] acts as [11, 11, 10] at 32 pairs)."""
        from .frequencies import ALLOCATION_TABLE

        hp = self.hparams
        num_pairs = geometry.num_rotary_pairs
        where = (
            f"the model rotates {num_pairs} pairs (head_dim {geometry.head_dim} x partial_rotary_factor "
            f"{geometry.partial_rotary_factor:g} / 2)"
        )
        if self.spec.fits is not None:
            self.spec.fits(hp, geometry)
        partitions = ALLOCATION_TABLE[self.allocation].partitions(hp) and "mrope_section" in hp
        if partitions and sum(hp["mrope_section"]) != num_pairs:
            raise EncodingMisfit(
                "mrope_section",
                f"{list(hp['mrope_section'])} gives the {self.allocation} allocation {sum(hp['mrope_section'])} "
                f"pairs but {where}; e.g. {chunked_sections(num_pairs)}",
            )
        try:
            self.rotary(
                head_dim=geometry.head_dim,
                rope_theta=geometry.rope_theta,
                partial_rotary_factor=geometry.partial_rotary_factor,
                num_key_value_heads=geometry.num_key_value_heads,
            )
        except ValueError as e:
            word = str(e).split(" ", 1)[0].rstrip(":")
            raise EncodingMisfit(word if word in hp else None, f"{e} ({where})") from e


@dataclass(frozen=True)
class _RotaryGeometry:
    """The geometry `Encoding.rotary` is given, for the entry's `fits` hook."""

    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    num_key_value_heads: int

    @property
    def num_rotary_pairs(self) -> int:
        dim = int(self.head_dim * self.partial_rotary_factor)
        return max(2, dim - dim % 2) // 2


def build(name: str, **hparams: Any) -> Encoding:
    """Encoding `name` with spec defaults overridden by `hparams`.

    Raises ValueError naming the offending name/key: unknown name, unknown hyperparameter for this name, or an
    invalid value (e.g. `mrope_section` not 3 positive ints, `alpha` outside [0, 1] and != -1).
    """
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding name {name!r}; available: {available()}")
    spec = ENCODINGS[name]
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for encoding {name!r}; accepted: {sorted(spec.defaults)}"
        )
    merged = {**spec.defaults, **hparams}
    checked = {key: spec.validator(key)(key, value) for key, value in merged.items()}
    if spec.check is not None:
        spec.check(checked)
    return Encoding(spec, checked)
