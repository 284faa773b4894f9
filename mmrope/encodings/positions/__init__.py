"""Position designs: token layout (+ grids) -> 3-axis (t, h, w) position ids. One class per registry entry
(`mmrope.encodings.registry.ENCODINGS[name].design`)."""

from __future__ import annotations

from .circlerope import CircleRoPEPositions
from .lumos import LumosPositions
from .mrope import GrapePositions, MHRoPEPositions, MRoPEInterleavePositions, MRoPEPositions
from .omnirope import ILRoPEPositions, OmniRoPEPositions
from .skeleton import LAYOUTS, Block, PositionDesign
from .v2pe import V2PEPositions
from .vanilla import VanillaPositions
from .videorope import HoPEPositions, VideoRoPEPositions

__all__ = [
    "LAYOUTS",
    "Block",
    "CircleRoPEPositions",
    "GrapePositions",
    "HoPEPositions",
    "ILRoPEPositions",
    "LumosPositions",
    "MHRoPEPositions",
    "MRoPEInterleavePositions",
    "MRoPEPositions",
    "OmniRoPEPositions",
    "PositionDesign",
    "V2PEPositions",
    "VanillaPositions",
    "VideoRoPEPositions",
]
