"""Properties every encoding must have: text-only == vanilla, packing == per-sample, padding invariance,
decoding == full forward. Run for all 12 names on both layouts."""

from __future__ import annotations

import pytest
import torch

from mmrope.encodings import available, build

NAMES = available()
IMAGE_GRIDS = [(1, 4, 6), (2, 4, 4), (1, 6, 4)]
VIDEO_GRIDS = [(3, 4, 4)]


def _tol(name: str) -> float:
    return (
        1e-3 if name == "circlerope" else 0.0
    )  # circlerope is fractional; float32 rounding differs by <= 1 ulp


def _assert_close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(a.double(), b.double(), atol=_tol(name), rtol=0)


def _samples(seq, layout: str):
    """Three samples (ids, image grids, video grids), consuming grids in order."""
    video = seq.video_qwen3 if layout == "qwen3" else seq.video_qwen25
    return [
        (
            seq.text(3) + seq.image(IMAGE_GRIDS[0]) + seq.text(4) + seq.image(IMAGE_GRIDS[1]) + seq.text(2),
            IMAGE_GRIDS[:2],
            [],
        ),
        (seq.text(6), [], []),
        (
            seq.image(IMAGE_GRIDS[2]) + seq.text(2) + video(VIDEO_GRIDS[0]) + seq.text(5),
            IMAGE_GRIDS[2:],
            VIDEO_GRIDS,
        ),
    ]


def _grids(rows):
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("name", NAMES)
def test_text_only_equals_vanilla_positions(seq, name):
    enc = build(name)
    ids, mask = seq.batch([seq.text(7), seq.text(3)], ["left", "right"])
    pos, deltas = enc.position_ids(ids, attention_mask_BL=mask)
    expected = torch.where(mask.bool(), mask.long().cumsum(-1) - 1, torch.ones_like(mask))
    assert torch.equal(pos.long(), expected.expand(3, -1, -1))
    assert deltas.view(-1).tolist() == [0, -4]
    # no mask: arange, delta 0; a text-only row inside a grid batch: arange from 0 as well
    pos, deltas = enc.position_ids(ids[:1])
    assert pos.long()[:, 0].tolist() == [list(range(7))] * 3 and deltas.item() == 0
    row = seq.text(2) + seq.image((1, 4, 4)) + seq.text(1)
    ids, mask = seq.batch([row, seq.text(5)])
    pos, _ = enc.position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 4]]), attention_mask_BL=mask)
    assert pos[:, 1, :5].double().tolist() == [[0, 1, 2, 3, 4]] * 3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["qwen3", "qwen2_5"])
def test_packed_row_equals_samples_alone(seq, name, layout):
    enc = build(name)
    samples = _samples(seq, layout)
    kw = {"layout": layout, "second_per_grid_ts": [0.5] if layout == "qwen2_5" else None}
    gen_alone = _gen()
    alone = []
    for ids, images, videos in samples:
        pos, _ = (
            enc.position_ids(
                torch.tensor([ids]),
                image_grid_thw=_grids(images) if images else None,
                video_grid_thw=_grids(videos) if videos else None,
                generator=gen_alone,
                **kw,
            )
            if (images or videos)
            else enc.position_ids(torch.tensor([ids]), image_grid_thw=_grids([]), **kw)
        )
        alone.append(pos[:, 0])
    row = [t for ids, _, _ in samples for t in ids]
    cu = torch.tensor([0, *torch.tensor([len(s[0]) for s in samples]).cumsum(0).tolist()])
    packed = enc.packed_position_ids(
        torch.tensor(row + [seq.PAD] * 3),
        cu,
        image_grid_thw=_grids(IMAGE_GRIDS),
        video_grid_thw=_grids(VIDEO_GRIDS),
        generator=_gen(),
        **kw,
    )
    assert packed.shape == (3, len(row) + 3)
    _assert_close(packed[:, : len(row)], torch.cat(alone, dim=1), name)
    assert (packed[:, len(row) :] == 1).all()
    # restart at 0 per sample
    assert (packed[:, cu[:-1]].double() == 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["qwen3", "qwen2_5"])
def test_padding_does_not_change_valid_positions(seq, name, layout):
    enc = build(name)
    samples = [s for s in _samples(seq, layout) if s[1] or s[2]]
    kw = {"layout": layout, "second_per_grid_ts": [0.5] if layout == "qwen2_5" else None}
    images = _grids([g for s in samples for g in s[1]])
    videos = _grids([g for s in samples for g in s[2]])
    alone_pos, alone_deltas = enc.position_ids(
        torch.tensor([samples[0][0]]), image_grid_thw=_grids(samples[0][1]), generator=_gen(), **kw
    )
    gen = _gen()
    ref = [
        enc.position_ids(
            torch.tensor([s[0]]),
            image_grid_thw=_grids(s[1]) if s[1] else None,
            video_grid_thw=_grids(s[2]) if s[2] else None,
            generator=gen,
            **kw,
        )
        for s in samples
    ]
    assert torch.equal(ref[0][0], alone_pos) and torch.equal(ref[0][1], alone_deltas)
    for sides in (["left", "right"], ["right", "left"], ["left", "left"]):
        ids, mask = seq.batch([s[0] for s in samples], sides)
        # a hole in the middle of row 1 must be skipped too
        hole = 4 if sides[1] == "right" else ids.shape[1] - len(samples[1][0]) + 4
        ids = torch.cat([ids[:, :hole], torch.full((2, 1), seq.PAD), ids[:, hole:]], dim=1)
        mask = torch.cat([mask[:, :hole], torch.tensor([[1], [0]]), mask[:, hole:]], dim=1)
        ids[0, hole], mask[0, hole] = seq.PAD, 0
        pos, deltas = enc.position_ids(
            ids, image_grid_thw=images, video_grid_thw=videos, attention_mask_BL=mask, generator=_gen(), **kw
        )
        for b in range(2):
            valid = mask[b].bool()
            _assert_close(pos[:, b, valid], ref[b][0][:, 0], name)
            assert (pos[:, b, ~valid] == 1).all()
            num_pads = int((~valid).sum())
            assert abs(deltas[b].item() - (ref[b][1].item() - num_pads)) <= _tol(name)
            assert deltas.dtype == ref[b][1].dtype and pos.dtype == ref[b][0].dtype


def _decode_case(enc, name, prompt_rows, grids, layout, seq, num_new=3):
    """positions of prompt + new text tokens (full forward) vs decode_position_ids from the prompt's deltas."""
    kw = {"layout": layout, "second_per_grid_ts": [0.5] if layout == "qwen2_5" else None}
    for sides in (["left", "right"], ["right", "left"]):
        ids, mask = seq.batch(prompt_rows, sides)
        _, deltas = enc.position_ids(ids, attention_mask_BL=mask, generator=_gen(), **grids, **kw)
        new = torch.tensor([seq.text(num_new, start=5000)] * len(prompt_rows))
        full_ids = torch.cat([ids, new], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        full, _ = enc.position_ids(full_ids, attention_mask_BL=full_mask, generator=_gen(), **grids, **kw)
        cache_position = torch.arange(ids.shape[1], ids.shape[1] + num_new)
        decoded = enc.decode_position_ids(deltas, cache_position)
        assert decoded.shape == (3, len(prompt_rows), num_new) and decoded.dtype == full.dtype
        _assert_close(decoded, full[:, :, -num_new:], name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["qwen3", "qwen2_5"])
def test_decode_positions_equal_full_forward(seq, name, layout):
    enc = build(name)
    samples = _samples(seq, layout)
    rows = [samples[0][0], samples[2][0]]
    grids = {"image_grid_thw": _grids(IMAGE_GRIDS), "video_grid_thw": _grids(VIDEO_GRIDS)}
    _decode_case(enc, name, rows, grids, layout, seq)
    _decode_case(enc, name, [seq.text(5), seq.text(2)], {}, layout, seq)  # text-only path


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("omnirope", "ilrope")])
def test_decode_after_prompt_ending_with_a_block(seq, name):
    """A prompt ending right after a visual block (no VE): decoding continues where the next text would go.
    (omnirope / ilrope keep the reference's M = max over rows, whose M + 1 is not the next shift.)"""
    kwargs = {"spatial_reset": True} if name in ("mrope_i", "mhrope") else {}
    enc = build(name, **kwargs)
    rows = [seq.text(3) + seq.image((2, 4, 6), close=False), seq.text(2) + seq.image((1, 4, 4), close=False)]
    _decode_case(enc, name, rows, {"image_grid_thw": _grids([(2, 4, 6), (1, 4, 4)])}, "qwen3", seq)


@pytest.mark.parametrize("name", NAMES)
def test_text_only_cos_sin_equals_vanilla_when_prior_preserved(name):
    pytest.importorskip("mmrope.encodings.frequencies")
    enc = build(name)
    pos, _ = enc.position_ids(torch.arange(1000, 1012).view(1, -1))
    geometry = {"head_dim": 128, "rope_theta": 1e6}
    if name == "mhrope":
        geometry["num_key_value_heads"] = 8
    if not enc.preserves_text_prior:
        pytest.skip("text prior not preserved by design (hope, mhrope NoPE heads, grape learned/rescaled)")
    cos, sin = enc.cos_sin(pos, **geometry)
    ref_cos, ref_sin = build("vanilla").cos_sin(pos, head_dim=128, rope_theta=1e6)
    if cos.dim() == 4:  # mhrope: per KV head
        ref_cos, ref_sin = ref_cos.unsqueeze(1).expand_as(cos), ref_sin.unsqueeze(1).expand_as(sin)
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
