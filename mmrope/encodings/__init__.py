"""mmrope.encodings: multimodal position encodings, pure torch (no transformers / deepspeed / data imports).

    from mmrope.encodings import build
    enc = build("mrope_i", spatial_reset=True)
    pos_3BL, rope_deltas_B1 = enc.position_ids(input_ids_BL, image_grid_thw=grid_thw, attention_mask_BL=mask_BL)
    cos, sin = enc.cos_sin(pos_3BL, head_dim=128, rope_theta=5e6)

`Rotary` and `make_rotary` come from `mmrope.encodings.frequencies` and are imported lazily.
"""

from __future__ import annotations

from typing import Any

from .anchored import anchored_positions
from .registry import Encoding, available, build
from .tokens import TokenIds

__all__ = ["Encoding", "Rotary", "TokenIds", "anchored_positions", "available", "build", "make_rotary"]


def __getattr__(name: str) -> Any:
    # Lazy so that the position designs import (and test) without the frequencies package.
    if name in ("Rotary", "make_rotary"):
        from . import frequencies

        return getattr(frequencies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
