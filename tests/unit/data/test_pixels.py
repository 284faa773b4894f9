"""Compact pixels: uint8 rows expanded on the device are bitwise the image processor's float32 output, so CPU
fp32 training sees exactly the pixels it saw before (images of every PIL mode, frame-list videos, video files),
at a quarter of the bytes."""

from __future__ import annotations

import io
import json

import av
import pytest
import torch
from PIL import Image

from data.packing import collate_row
from data.pixels import expand_pixels, pixel_table, to_device
from data.processing import SampleProcessor
from data.video import VideoSampling
from mmrope.encodings import build


def _blob(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    noise = Image.effect_noise((93, 61), 80)  # "L"
    rgb = Image.merge("RGB", [noise, noise.rotate(90, expand=False), noise.transpose(Image.FLIP_LEFT_RIGHT)])
    return {
        "img0.png": _blob(rgb, "PNG"),
        "img1.jpg": _blob(rgb.resize((140, 120)), "JPEG"),
        "img2.png": _blob(noise, "PNG"),  # grayscale
        "img3.png": _blob(rgb.convert("RGBA"), "PNG"),
        "img4.png": _blob(rgb.convert("P"), "PNG"),  # palette
    }


def _mp4(num_frames: int = 12) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = 80, 60, "yuv420p"
        for i in range(num_frames):
            img = Image.effect_noise((80, 60), 40 + 5 * i).convert("RGB")
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _record() -> dict:
    images = _images()
    frames = {f"vid0.f{i:03d}.png": images["img0.png"] if i % 2 else images["img1.jpg"] for i in range(3)}
    content = [{"type": "image", "image": name} for name in images]
    content += [{"type": "video", "video": list(frames), "fps": 1.0}, {"type": "video", "video": "vid1.mp4"}]
    content += [{"type": "text", "text": "Describe all of it."}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "Noise."}]
    return {
        "__key__": "k",
        "json": json.dumps({"messages": messages}).encode(),
        **images,
        **frames,
        "vid1.mp4": _mp4(),
    }


def test_uint8_rows_expand_to_the_processors_float32_pixels_bitwise(tiny_processor):
    kw = dict(max_tokens=4096, layout="qwen2_5", video=VideoSampling(fps=2.0))
    float32 = SampleProcessor(tiny_processor, build("mrope"), **kw)
    uint8 = SampleProcessor(tiny_processor, build("mrope"), pixels="uint8", **kw)
    record = _record()
    want, got = float32(record), uint8(record)
    assert got.pixel_values.dtype == got.pixel_values_videos.dtype == torch.uint8
    assert want.pixel_values.dtype == torch.float32
    assert got.pixel_values.numel() == want.pixel_values.numel()  # 1 byte instead of 4 per value
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.position_ids, want.position_ids)

    ids = dict(image_token_id=uint8.tokens.image_token_id, video_token_id=uint8.tokens.video_token_id)
    row = collate_row([got, got], **ids, pixel_table=uint8.pixel_table)
    batch = to_device(row, torch.device("cpu"))
    assert "pixel_table" not in batch
    reference = collate_row([want, want], **ids)
    for key in ("pixel_values", "pixel_values_videos"):
        assert batch[key].dtype == torch.float32
        assert torch.equal(batch[key], reference[key]), key  # bitwise


def test_every_value_of_every_channel_expands_like_the_processor(tiny_processor):
    ip = tiny_processor.image_processor
    table = pixel_table(ip)
    assert table.shape == (3, 256) and table.dtype == torch.float32
    # 280x28 pixels holding every value 0..255 in every channel (channels shifted so they differ).
    img = Image.new("RGB", (280, 28))
    img.putdata([(x % 256, (x + 85) % 256, (x + 170) % 256) for _ in range(28) for x in range(280)])
    want = ip(images=[img], return_tensors="pt", do_resize=False)["pixel_values"]
    raw = ip(images=[img], return_tensors="pt", do_resize=False, do_rescale=False, do_normalize=False)
    u8 = raw["pixel_values"].to(torch.uint8)
    assert torch.equal(u8.float(), raw["pixel_values"])  # the kept values are integers 0..255
    assert len(torch.unique(u8)) == 256
    assert torch.equal(expand_pixels({"pixel_values": u8, "pixel_table": table})["pixel_values"], want)
    with pytest.raises(ValueError, match="pixel_table"):
        expand_pixels({"pixel_values": u8})
