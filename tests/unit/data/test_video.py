"""Video samples on the Qwen2.5-VL (contiguous) layout: patches, tokens, grids and positions."""

from __future__ import annotations

import io
import json

import pytest
import torch

from data.processing import SampleError, SampleProcessor, token_ids_for
from data.synthetic import draw_shape
from data.video import video_patches
from mmrope.encodings import build


def frame(pos: str, size=(84, 56)):
    return draw_shape("square", "yellow", "purple", size, pos, 0.3)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_identical_frames_give_the_image_patches(tiny_processor):
    ip = tiny_processor.image_processor
    img = frame("center")
    as_image = ip(images=[img], return_tensors="pt")
    pixels, grid, seconds = video_patches(ip, [img, img], fps=2.0)
    assert grid.tolist() == [[1, 4, 6]] and seconds == pytest.approx(1.0)
    torch.testing.assert_close(pixels, as_image["pixel_values"], rtol=0, atol=0)


def test_frames_are_grouped_in_time_order(tiny_processor):
    ip = tiny_processor.image_processor
    frames = [frame("bottom left"), frame("center"), frame("bottom right")]  # odd: the last frame is repeated
    pixels, grid, _ = video_patches(ip, frames, fps=4.0)
    assert grid.tolist() == [[2, 4, 6]]
    single = [
        ip(images=[f], return_tensors="pt")["pixel_values"].view(24, 3, 2, 14, 14)[:, :, 0] for f in frames
    ]
    v = pixels.view(2, 24, 3, 2, 14, 14)  # [grid_t, patches, C, t, p, p]
    torch.testing.assert_close(v[0, :, :, 0], single[0], rtol=0, atol=0)
    torch.testing.assert_close(v[0, :, :, 1], single[1], rtol=0, atol=0)
    torch.testing.assert_close(v[1, :, :, 0], single[2], rtol=0, atol=0)
    torch.testing.assert_close(v[1, :, :, 1], single[2], rtol=0, atol=0)  # padding repeats the last frame


def video_record(num_frames: int = 4, fps: float = 2.0) -> dict:
    names = [f"vid0.f{i:03d}.png" for i in range(num_frames)]
    content = [{"type": "video", "video": names, "fps": fps}, {"type": "text", "text": "Which way?"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "Right."}]
    rec = {"__key__": "v", "json": json.dumps({"messages": messages}).encode()}
    rec.update(
        {n: png(frame(p)) for n, p in zip(names, ["bottom left", "center", "bottom right", "bottom right"])}
    )
    return rec


def test_video_sample_tokens_grid_and_positions(tiny_processor):
    proc = SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")
    s = proc(video_record())
    ids = token_ids_for(tiny_processor)
    assert s.video_grid_thw.tolist() == [[2, 4, 6]] and s.second_per_grid_ts.tolist() == [1.0]
    video_at = (s.input_ids == ids.video_token_id).nonzero().flatten()
    assert len(video_at) == 2 * 4 * 6 // 4  # 12 merged tokens: 2 temporal groups x (2 x 3)
    assert s.pixel_values_videos.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    # By hand (Qwen2.5-VL, 4.57.1 semantics without the int cast): t = S + ti * second_per_grid_t * tokens_per_second
    # = S + 2 * ti; h = S + row, w = S + col over the 2x3 merged grid; text resumes at max + 1.
    S = int(video_at[0])
    t, h, w = s.position_ids[:, video_at]
    assert t.tolist() == [S] * 6 + [S + 2] * 6
    assert h.tolist() == [S, S, S, S + 1, S + 1, S + 1] * 2
    assert w.tolist() == [S, S + 1, S + 2] * 4
    assert s.position_ids[0, int(video_at[-1]) + 1] == S + 3  # vision_end: max(S+2, S+1, S+2) + 1


def test_qwen3_layout_gives_per_frame_blocks_with_timestamps(tiny_processor):
    proc = SampleProcessor(tiny_processor, build("mrope_i"), max_tokens=512, layout="qwen3")
    s = proc(video_record(num_frames=4, fps=2.0))
    ids = token_ids_for(tiny_processor)
    text = tiny_processor.tokenizer.decode(s.input_ids)
    # By hand: frames at 0, 0.5, 1.0, 1.5 s; temporal patches of 2 -> mean times 0.25 and 1.25 -> "0.2", "1.2".
    pads = "<|video_pad|>" * 6
    expected = (
        f"<0.2 seconds><|vision_start|>{pads}<|vision_end|><1.2 seconds><|vision_start|>{pads}<|vision_end|>"
    )
    assert expected in text and "<|vision_start|><0.2" not in text  # no outer wrapper around the frames
    assert s.video_grid_thw.tolist() == [[2, 4, 6]]
    # Positions (MRoPE-I, Qwen3-VL layout): each frame is its own t=1 block; text between frames counts on.
    video_at = (s.input_ids == ids.video_token_id).nonzero().flatten().tolist()
    f0, f1 = video_at[:6], video_at[6:]
    t, h, w = s.position_ids
    S0 = int(t[f0[0]])
    assert t[f0].tolist() == [S0] * 6 and h[f0].tolist() == [S0, S0, S0, S0 + 1, S0 + 1, S0 + 1]
    assert w[f0].tolist() == [S0, S0 + 1, S0 + 2] * 2
    ve0 = f0[-1] + 1  # vision_end of frame 0 resumes at S0 + max(0, 1, 2) + 1
    assert t[ve0] == S0 + 3
    S1 = S0 + 3 + (f1[0] - ve0)  # timestamp text and vision_start advance by one each
    assert t[f1].tolist() == [S1] * 6 and w[f1].tolist() == [S1, S1 + 1, S1 + 2] * 2


def test_video_with_a_broken_frame_is_bad_image(tiny_processor):
    rec = video_record()
    rec["vid0.f002.png"] = b"not a png"
    with pytest.raises(SampleError) as e:
        SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")(rec)
    assert e.value.reason == "bad_image"
