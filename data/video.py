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


def qwen3_frame_blocks(
    text: str,
    frame_counts: list[int],
    grids: torch.Tensor,
    fps: list[float],
    merge_area: int,
    temporal_patch_size: int,
) -> tuple[str, list[int]]:
    """Rewrite each `<|vision_start|><|video_pad|><|vision_end|>` (in order) as Qwen3-VL's per-frame layout.

    Each temporal patch becomes `<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>`, where t is the
    mean time of the frames it holds (frame j at j / fps; the tail padded with the last frame), as Qwen3-VL's
    processor (transformers 4.57) builds it. Returns the new text and the token count of every frame block,
    in order, for the placeholder expansion. Example, 4 frames at 2 fps, temporal patch 2: frames at 0, 0.5, 1,
    1.5 s -> `<0.2 seconds>VS..VE<1.2 seconds>VS..VE` (0.25 and 1.25 formatted with one decimal).
    """
    from data.processor import VIDEO_PAD, VISION_END, VISION_START

    block, marker = VISION_START + VIDEO_PAD + VISION_END, "\x01"
    per_frame: list[int] = []
    for n_frames, grid, video_fps in zip(frame_counts, grids.tolist(), fps):
        indices = list(range(n_frames)) + [n_frames - 1] * (-n_frames % temporal_patch_size)
        times = [i / video_fps for i in indices]
        stamps = [
            (times[k] + times[k + temporal_patch_size - 1]) / 2
            for k in range(0, len(times), temporal_patch_size)
        ]
        grid_t, gh, gw = grid
        if len(stamps) != grid_t or block not in text:
            raise ValueError("video placeholder or temporal grid does not match the frames")
        frames = "".join(f"<{t:.1f} seconds>{VISION_START}{marker}{VISION_END}" for t in stamps)
        text = text.replace(block, frames, 1)
        per_frame += [gh * gw // merge_area] * grid_t
    return text.replace(marker, VIDEO_PAD), per_frame
