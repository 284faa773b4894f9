"""Videos: frame sampling (files through PyAV, or frame lists), then Qwen2-VL video patches through the image
processor.

**Files** (mp4/webm/mkv/... members of a record) are read with PyAV, a registry wheel that bundles FFmpeg, so no
system ffmpeg is needed. Frames are sampled like Qwen's own `qwen_vl_utils` (`smart_nframes` + `fetch_video`):

    nframes = total_frames / video_fps * fps, clamped to [min_frames, min(max_frames, total_frames)] (both rounded
              to the temporal patch size), floored to a multiple of the temporal patch size
    indices = linspace(0, total_frames - 1, nframes).round()        effective fps = nframes / total_frames * video_fps
    per-frame pixel budget = max(min(max_pixels, total_pixels / nframes * temporal_patch), int(min_pixels * 1.05))

A 10 s clip at 30 fps sampled at fps 2 gives 20 frames (indices 0, 16, 31, ..., 299), effective fps 2.0, i.e.
10 temporal patches. Frame times are `index / video_fps`; Qwen3-VL stamps each temporal patch with the mean time
of its frames (`qwen3_frame_blocks`), Qwen2.5-VL uses `second_per_grid_t = temporal_patch / effective_fps`.

**Frame lists** (already-extracted frames with an optional `fps`, default 2) keep their frames; frame j is at
`j / fps`. Without a video pixel budget (`VideoSampling.min_pixels/max_pixels` unset) frames are resized by the
image processor's own min/max pixels, as before files were supported.

**Patches.** transformers' `Qwen2VLVideoProcessor` needs torchvision, which has no CPU build here. Its output is
the image processor's per-frame pipeline (resize, rescale, normalise, patchify) with one difference: a video
patch holds `temporal_patch_size` *consecutive* frames, where an image patch holds one frame repeated. So each
frame goes through the real image processor and we only regroup the temporal axis, in the video processor's
order `(grid_t, h/m, w/m, m, m | C, t, p, p)`. A video of identical frames gives exactly the patches of that
frame as an image (tested).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
from PIL import Image

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")


@dataclass
class VideoSampling:
    """How video files are sampled, like Qwen's `qwen_vl_utils`; the schema of the `data.video` config key.

    `fps` frames per second of video, `min_frames`..`max_frames` per video, frames resized within
    `min_pixels`..`max_pixels` and, with `total_pixels`, to at most that many pixels per video (Qwen2.5-VL's
    defaults: fps 2, 4..768 frames, 128..768 merged tokens per frame and 24576 per video, see
    configs/data/shards.yaml). Unset pixel limits: the image limits (data.min_pixels, data.max_pixels) and no
    per-video budget. Frame lists keep their frames (and their own `fps`). Not frozen: Hydra overrides it."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"config key `data.video.fps`: must be > 0, got {self.fps}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(
                f"config key `data.video.min_frames`: need 1 <= min_frames <= max_frames, got "
                f"{self.min_frames}, {self.max_frames}"
            )
        if (self.min_pixels is None) != (self.max_pixels is None):
            raise ValueError(
                "config key `data.video.min_pixels`: give both min_pixels and max_pixels, or neither"
            )
        if self.min_pixels is not None and not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError("config key `data.video.min_pixels`: must satisfy 0 < min_pixels <= max_pixels")
        if self.total_pixels is not None and self.total_pixels <= 0:
            raise ValueError(f"config key `data.video.total_pixels`: must be > 0, got {self.total_pixels}")


@dataclass(frozen=True)
class VideoMeta:
    """What planning needs to know about a video file without decoding it (kept in the shard index)."""

    frames: int  # total decodable frames
    fps: float  # average frame rate of the stream
    width: int
    height: int


@dataclass(frozen=True)
class VideoPlan:
    """The sampled frames of one video: which, when, and how large once resized."""

    indices: list[int]  # frame indices in the source (frame lists: 0..n-1)
    times: list[float]  # seconds of each sampled frame
    effective_fps: float  # sampled frames per second of video
    min_pixels: int  # resize limits for these frames (smart_resize)
    max_pixels: int


# Qwen2.5-VL's qwen_vl_utils defaults (configs/data/shards.yaml): what the converter reports videos with.
QWEN_VIDEO = VideoSampling(
    fps=2.0, min_frames=4, max_frames=768, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28,
    total_pixels=24576 * 28 * 28,
)  # fmt: skip


def describe(
    meta: VideoMeta,
    sampling: VideoSampling,
    *,
    image_limits: tuple[int, int] = (56 * 56, 28 * 28 * 1280),
    patch: int = 14,
    merge: int = 2,
    temporal: int = 2,
    fps: float | None = None,
) -> dict:
    """How a video file is sampled: frames kept, effective fps, grid and visual (merged) tokens. Raises
    ValueError for a video that cannot be sampled (too short, degenerate size)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    plan = plan_file(meta, sampling, image_limits, temporal, fps)
    h, w = smart_resize(meta.height, meta.width, patch * merge, plan.min_pixels, plan.max_pixels)
    grid = [-(-len(plan.indices) // temporal), h // patch, w // patch]
    return {
        "frames": len(plan.indices),
        "effective_fps": plan.effective_fps,
        "grid": grid,
        "visual_tokens": grid[0] * grid[1] * grid[2] // merge**2,
    }


def _round(n: float, factor: int) -> int:
    return round(n / factor) * factor


def _ceil(n: float, factor: int) -> int:
    return math.ceil(n / factor) * factor


def _floor(n: float, factor: int) -> int:
    return math.floor(n / factor) * factor


def sample_indices(
    total_frames: int, video_fps: float, sampling: VideoSampling, frame_factor: int
) -> list[int]:
    """Frame indices to keep, like `qwen_vl_utils.smart_nframes` + `linspace(...).round()`.

    >>> sample_indices(300, 30.0, VideoSampling(fps=2.0), 2)[:4]
    [0, 16, 31, 47]
    """
    if total_frames < frame_factor or video_fps <= 0:
        raise ValueError(f"video has {total_frames} frames at {video_fps} fps: too short to sample")
    min_frames = _ceil(sampling.min_frames, frame_factor)
    max_frames = _floor(min(sampling.max_frames, total_frames), frame_factor)
    nframes = total_frames / video_fps * sampling.fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    nframes = _floor(nframes, frame_factor)
    if not frame_factor <= nframes <= total_frames:
        raise ValueError(f"video: sampled {nframes} frames, not in [{frame_factor}, {total_frames}]")
    return torch.linspace(0, total_frames - 1, nframes).round().long().tolist()


def frame_limits(
    num_frames: int, sampling: VideoSampling | None, image_limits: tuple[int, int], frame_factor: int
) -> tuple[int, int]:
    """(min_pixels, max_pixels) for each frame of a video of `num_frames` sampled frames (qwen_vl_utils)."""
    if sampling is None or sampling.min_pixels is None:
        return image_limits
    max_pixels = sampling.max_pixels
    if sampling.total_pixels is not None:
        max_pixels = max(
            min(max_pixels, sampling.total_pixels / num_frames * frame_factor),
            int(sampling.min_pixels * 1.05),
        )
    return sampling.min_pixels, int(max_pixels)


def plan_file(
    meta: VideoMeta,
    sampling: VideoSampling,
    image_limits: tuple[int, int],
    frame_factor: int,
    fps: float | None = None,
) -> VideoPlan:
    """Sampling of a video file from its metadata alone (no decoding). `fps` overrides `sampling.fps`."""
    if fps is not None:
        sampling = VideoSampling(**{**sampling.__dict__, "fps": fps})
    indices = sample_indices(meta.frames, meta.fps, sampling, frame_factor)
    lo, hi = frame_limits(len(indices), sampling, image_limits, frame_factor)
    return VideoPlan(
        indices=indices,
        times=[i / meta.fps for i in indices],
        effective_fps=len(indices) / meta.frames * meta.fps,
        min_pixels=lo,
        max_pixels=hi,
    )


def plan_frames(
    num_frames: int,
    fps: float,
    sampling: VideoSampling | None,
    image_limits: tuple[int, int],
    frame_factor: int,
) -> VideoPlan:
    """A frame list keeps every frame; frame j is at j / fps."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if fps <= 0:
        raise ValueError(f"video fps must be > 0, got {fps}")
    lo, hi = frame_limits(_ceil(num_frames, frame_factor), sampling, image_limits, frame_factor)
    return VideoPlan(list(range(num_frames)), [j / fps for j in range(num_frames)], fps, lo, hi)


# -- files ---------------------------------------------------------------------------------------------------------
def probe(blob: bytes) -> VideoMeta:
    """Frame count, frame rate and size of the first video stream, from the container (no decoding; when the
    container does not store a frame count, e.g. many webm/mkv files, packets are counted)."""
    import av

    with av.open(io.BytesIO(blob)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frames = int(stream.frames or 0)
        if frames <= 0:
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if frames <= 0 or rate is None or float(rate) <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"unusable video stream: {frames} frames at {rate} fps, {width}x{height}")
    return VideoMeta(frames=frames, fps=float(rate), width=width, height=height)


def decode_frames(blob: bytes, indices: list[int]) -> list[Image.Image]:
    """The frames at `indices` (sorted, may repeat), decoded in one pass and converted to RGB."""
    import av

    wanted = sorted(set(indices))
    found: dict[int, Image.Image] = {}
    with av.open(io.BytesIO(blob)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                found[i] = frame.to_image().convert("RGB")
            if i >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ValueError(
            f"video: frames {missing[:3]} could not be decoded ({len(found)} of {len(wanted)} found)"
        )
    return [found[i] for i in indices]


# -- patches ---------------------------------------------------------------------------------------------------------
def video_patches(
    image_processor,
    frames: list[Image.Image],
    *,
    fps: float = 2.0,
    limits: tuple[int, int] | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (pixel_values_videos [grid_t*h*w, C*t*p*p], video_grid_thw [1, 3], second_per_grid_t).

    Frames are resized to the size the image processor picks for the first frame (within `limits` =
    (min_pixels, max_pixels), default the processor's own), so all share one grid. An odd tail is padded by
    repeating the last frame, as the video processor does. `fps` is the effective frame rate of `frames`.
    `normalize=False` keeps the resized 0..255 values (rescale and normalisation happen on the device).
    """
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fps <= 0:
        raise ValueError(f"video fps must be > 0, got {fps}")
    tp = int(image_processor.temporal_patch_size)
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size, Image.BICUBIC) for f in frames]
    frames = frames + [frames[-1]] * (-len(frames) % tp)
    kwargs = {} if limits is None else {"size": {"shortest_edge": limits[0], "longest_edge": limits[1]}}
    if not normalize:
        kwargs.update(do_rescale=False, do_normalize=False)
    out = image_processor(images=frames, return_tensors="pt", **kwargs)
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
    frame_times: list[list[float]],
    grids: torch.Tensor,
    merge_area: int,
    temporal_patch_size: int,
) -> tuple[str, list[int]]:
    """Rewrite each `<|vision_start|><|video_pad|><|vision_end|>` (in order) as Qwen3-VL's per-frame layout.

    Each temporal patch becomes `<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>`, where t is the
    mean time of the frames it holds (`frame_times[i]` per video; the tail padded with the last frame), as
    Qwen3-VL's processor (transformers 4.57) builds it. Returns the new text and the token count of every frame
    block, in order, for the placeholder expansion. Example, frames at 0, 0.5, 1, 1.5 s, temporal patch 2:
    `<0.2 seconds>VS..VE<1.2 seconds>VS..VE` (0.25 and 1.25 formatted with one decimal).
    """
    from data.processor import VIDEO_PAD, VISION_END, VISION_START

    block, marker = VISION_START + VIDEO_PAD + VISION_END, "\x01"
    per_frame: list[int] = []
    for times, grid in zip(frame_times, grids.tolist()):
        times = list(times) + [times[-1]] * (-len(times) % temporal_patch_size)
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
