"""Video frames -> Qwen2-VL video patches, through the image processor.

transformers' `Qwen2VLVideoProcessor` needs torchvision, which has no CPU build here. Its output is the image
processor's per-frame pipeline (resize by min/max pixels, rescale, normalise, patchify) with one difference:
a video patch holds `temporal_patch_size` *consecutive* frames, where an image patch holds one frame repeated.
So each frame goes through the real image processor and we only regroup the temporal axis, in the video
processor's order `(grid_t, h/m, w/m, m, m | C, t, p, p)`. A video of identical frames therefore gives exactly
the patches of that frame as an image (tested).
"""

from __future__ import annotations

import torch
from PIL import Image


def video_patches(
    image_processor, frames: list[Image.Image], *, fps: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (pixel_values_videos [grid_t*h*w, C*t*p*p], video_grid_thw [1, 3], second_per_grid_t).

    Frames are resized to the size the image processor picks for the first frame, so all share one grid.
    An odd tail is padded by repeating the last frame, as the video processor does.
    """
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fps <= 0:
        raise ValueError(f"video fps must be > 0, got {fps}")
    tp = int(image_processor.temporal_patch_size)
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size, Image.BICUBIC) for f in frames]
    frames = frames + [frames[-1]] * (-len(frames) % tp)
    out = image_processor(images=frames, return_tensors="pt")
    grids = out["image_grid_thw"]
    if not (grids == grids[0]).all():
        raise ValueError("video frames were resized to different grids")
    _, gh, gw = (int(x) for x in grids[0])
    channels, patch = 3, int(image_processor.patch_size)
    # [frames, h*w, C, t(repeated), p, p] -> keep one copy of each frame, then stack consecutive frames into t.
    per_frame = out["pixel_values"].view(len(frames), gh * gw, channels, tp, patch, patch)[:, :, :, 0]
    grid_t = len(frames) // tp
    grouped = per_frame.view(grid_t, tp, gh * gw, channels, patch, patch).permute(0, 2, 3, 1, 4, 5)
    pixel_values = grouped.reshape(grid_t * gh * gw, channels * tp * patch * patch).contiguous()
    return pixel_values, torch.tensor([[grid_t, gh, gw]]), tp / fps
