"""Position designs: token layout (+ grids) -> 3-axis (t, h, w) position ids. One class per registry name."""

from __future__ import annotations

from .circlerope import CircleRoPEPositions
from .lumos import LumosPositions
from .mrope import GrapePositions, MHRoPEPositions, MRoPEInterleavePositions, MRoPEPositions
from .omnirope import ILRoPEPositions, OmniRoPEPositions
from .skeleton import LAYOUTS, Block, PositionDesign
from .v2pe import V2PEPositions
from .vanilla import VanillaPositions
from .videorope import HoPEPositions, VideoRoPEPositions

DESIGNS: dict[str, type[PositionDesign]] = {
    "vanilla": VanillaPositions,
    "mrope": MRoPEPositions,
    "mrope_i": MRoPEInterleavePositions,
    "mhrope": MHRoPEPositions,
    "videorope": VideoRoPEPositions,
    "hope": HoPEPositions,
    "circlerope": CircleRoPEPositions,
    "v2pe": V2PEPositions,
    "ilrope": ILRoPEPositions,
    "omnirope": OmniRoPEPositions,
    "lumos": LumosPositions,
    "grape": GrapePositions,
}

__all__ = [
    "DESIGNS",
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
