"""Special token ids that delimit visual blocks in a Qwen-VL token stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenIds:
    """Token ids read by the position designs (defaults: the Qwen2.5-VL / Qwen3-VL vocabulary).

    A visual block is found as a `vision_start_token_id` immediately followed by an image or video placeholder;
    `spatial_merge_size` turns a vision grid (t, H, W) into the LLM grid (t, H // m, W // m).
    `vision_end_token_id` is text for every design (it gets an ordinary text position).
    """

    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    spatial_merge_size: int = 2

    def __post_init__(self) -> None:
        if self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be >= 1, got {self.spatial_merge_size}")
        ids = (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)
        if len(set(ids)) != len(ids):
            raise ValueError(f"image/video/vision_start/vision_end token ids must be distinct, got {ids}")
