"""Video files (mp4 / webm / mkv written here with PyAV): frame sampling by fps with min/max frames and a pixel
budget like Qwen's `qwen_vl_utils`, the sampled frames' content, timestamps in both layouts, and the index."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data import index as shard_index
from data.loader import PackedRowStream, ResumableLoader, video_report
from data.processing import SampleProcessor, token_ids_for
from data.video import VideoSampling, probe, video_patches
from mmrope.encodings import build

GRAY_STEP = 4  # frame i is a flat gray image of level 4 * i: the decoded level tells which frame it was


def encode(num_frames: int, fps: int, container: str = "mp4", size=(64, 48)) -> bytes:
    """A clip whose frame i is gray level 4*i, losslessly encoded with PyAV (H.264 or VP9)."""
    codec, options = {"webm": ("libvpx-vp9", {"lossless": "1"})}.get(container, ("libx264", {"qp": "0"}))
    buf = io.BytesIO()
    with av.open(buf, "w", format={"mkv": "matroska"}.get(container, container)) as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, (GRAY_STEP * i,) * 3))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def all_frames(blob: bytes) -> list[Image.Image]:
    with av.open(io.BytesIO(blob)) as c:
        return [f.to_image().convert("RGB") for f in c.decode(video=0)]


def video_record(blob: bytes, ext: str = "mp4", **part) -> dict:
    content = [{"type": "video", "video": f"vid0.{ext}", **part}, {"type": "text", "text": "What happens?"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "It gets brighter."}]
    return {"__key__": "v", "json": json.dumps({"messages": messages}).encode(), f"vid0.{ext}": blob}


@pytest.mark.parametrize("container", ["mp4", "webm", "mkv"])
def test_probe_reads_frame_count_rate_and_size(container):
    meta = probe(encode(40, 10, container))
    assert (meta.frames, meta.fps, meta.width, meta.height) == (40, 10.0, 64, 48)


@pytest.mark.parametrize(
    "num_frames,fps,sampling,expected",
    [
        # 4 s at 10 fps sampled at 2 fps: 8 frames, linspace(0, 39, 8) = 0, 5.57, 11.14, 16.71, ... rounded.
        (40, 10, VideoSampling(fps=2.0), [0, 6, 11, 17, 22, 28, 33, 39]),
        # 1 s at 10 fps would give 2 frames: min_frames=4 wins, linspace(0, 9, 4) = 0, 3, 6, 9.
        (10, 10, VideoSampling(fps=2.0, min_frames=4), [0, 3, 6, 9]),
        # max_frames caps: linspace(0, 39, 4) = 0, 13, 26, 39.
        (40, 10, VideoSampling(fps=2.0, max_frames=4), [0, 13, 26, 39]),
    ],
)
def test_sampled_frames_are_the_expected_ones(tiny_processor, num_frames, fps, sampling, expected):
    proc = SampleProcessor(tiny_processor, build("mrope"), max_tokens=1024, layout="qwen2_5", video=sampling)
    s = proc(video_record(encode(num_frames, fps)))
    grid_t = len(expected) // 2
    assert s.video_grid_thw.tolist() == [[grid_t, 4, 4]]  # 64x48 -> 56x56 -> 4x4 patches
    assert s.videos == [
        {
            "frames": len(expected),
            "effective_fps": len(expected) / num_frames * fps,
            "visual_tokens": grid_t * 4,
        }
    ]
    # Qwen2.5-VL: seconds per temporal patch = temporal_patch_size / effective fps.
    assert s.second_per_grid_ts.tolist() == pytest.approx([2 / (len(expected) / num_frames * fps)])
    # The pixels are exactly those of the expected frames (decoded here, independently) through the processor.
    frames = all_frames(encode(num_frames, fps))
    levels = [int(np.asarray(frames[i])[0, 0, 0]) for i in expected]
    assert [round(level / GRAY_STEP) for level in levels] == expected  # (YUV conversion: +-1 level)
    want, _, _ = video_patches(tiny_processor.image_processor, [frames[i] for i in expected], fps=2.0)
    assert torch.equal(s.pixel_values_videos, want)


def test_qwen3_layout_stamps_each_temporal_patch_with_its_frames_mean_time(tiny_processor):
    proc = SampleProcessor(
        tiny_processor, build("mrope_i"), max_tokens=1024, layout="qwen3", video=VideoSampling(fps=2.0)
    )
    s = proc(video_record(encode(40, 10, "webm"), ext="webm"))
    text = tiny_processor.tokenizer.decode(s.input_ids)
    # Frames 0, 6, 11, 17, 22, 28, 33, 39 at 10 fps: 0.0, 0.6, 1.1, 1.7, 2.2, 2.8, 3.3, 3.9 s; pairs' means
    # 0.3, 1.4, 2.5, 3.6.
    stamps = [part.split(" seconds>")[0] for part in text.split("<")[1:] if " seconds>" in part]
    assert stamps == ["0.3", "1.4", "2.5", "3.6"]
    ids = token_ids_for(tiny_processor)
    assert int((s.input_ids == ids.video_token_id).sum()) == 4 * 4  # 4 temporal patches x 2x2 merged tokens


def test_the_per_video_pixel_budget_shrinks_frames_like_qwen(tiny_processor):
    blob = encode(40, 10, size=(320, 240))
    limits = dict(fps=2.0, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    free = SampleProcessor(
        tiny_processor, build("mrope"), max_tokens=4096, layout="qwen2_5", video=VideoSampling(**limits)
    )
    tight = SampleProcessor(
        tiny_processor,
        build("mrope"),
        max_tokens=4096,
        layout="qwen2_5",
        video=VideoSampling(**limits, total_pixels=40_000),
    )
    # By hand. Per frame max_pixels = 50176: 240x320 -> 168x252 (scale 1.237, floored to 28s) -> grid 12x18.
    assert free(video_record(blob)).video_grid_thw.tolist() == [[4, 12, 18]]
    # With 40000 pixels per video over 8 frames: max(min(50176, 40000 / 8 * 2), 3136 * 1.05) = 10000 per
    # frame -> 84x112 -> grid 6x8.
    assert tight(video_record(blob)).video_grid_thw.tolist() == [[4, 6, 8]]


def test_a_broken_video_is_bad_video(tiny_processor):
    proc = SampleProcessor(tiny_processor, build("mrope"), max_tokens=1024, layout="qwen2_5")
    from data.processing import SampleError

    with pytest.raises(SampleError) as e:
        proc(video_record(b"\x00\x00\x00\x18ftypmp42 not really a video"))
    assert e.value.reason == "bad_video"


def test_video_files_through_the_index_and_the_loader(tiny_processor, tmp_path):
    shard = tmp_path / "videos.tar"
    with wds.TarWriter(str(shard)) as w:
        for i, (n, container) in enumerate([(40, "mp4"), (10, "mkv"), (20, "webm")]):
            rec = video_record(encode(n, 10, container), ext=container)
            rec["__key__"] = f"{i:04d}"
            w.write(rec)
    index = shard_index.build(str(shard))
    assert [list(r["videos"].values())[0]["frames"] for r in index.records] == [40, 10, 20]
    proc = SampleProcessor(
        tiny_processor,
        build("mrope"),
        max_tokens=1024,
        layout="qwen2_5",
        video=VideoSampling(),
        pixels="uint8",
    )
    stream = PackedRowStream([str(shard)], proc, max_tokens=1024, epochs=1)
    rows = list(ResumableLoader(stream, 0))
    assert sum(r["num_samples"] for r in rows) == 3 and not any(r["skipped"] for r in rows)
    frames = sorted(v["frames"] for r in rows for v in r["videos"])
    assert frames == [4, 4, 8]  # 40 @ 10 fps -> 8; 10 -> min 4; 20 frames (2 s) -> 4
    report = "\n".join(video_report(stream))
    assert "3 video files" in report and "effective fps" in report and "visual tokens" in report
