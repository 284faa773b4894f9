"""`text_axes` of ILRoPE and OmniRoPE: "diagonal" (the reference package, default) vs "temporal" (the papers).

Every expected position below is derived by hand from the rule, written next to it:
- diagonal: text at (p, p, p); a block at t = shift + ti*s, h = hi, w = wi; shift += max(extent, h', w');
- temporal: text at (p, 0, 0); blocks the same; shift += extent = (t - 1)s + 1; M = max of the t row.
"""

from __future__ import annotations

import pytest
import torch

from mmrope.encodings import build

NAMES = ["ilrope", "omnirope"]


def two_images(seq):
    """T T VS [image 1x4x6 -> 2x3] VE T VS [image 1x4x4 -> 2x2] VE T T: 19 tokens."""
    ids = seq.text(2) + seq.image((1, 4, 6)) + seq.text(1) + seq.image((1, 4, 4)) + seq.text(2)
    return torch.tensor([ids]), torch.tensor([[1, 4, 6], [1, 4, 4]])


# text 0..2 (T T VS) -> 0,1,2; shift 3: image 1 at t=3, (h, w) local 2x3;
#   diagonal: shift = 3 + max(1, 2, 3) = 6 -> VE T VS at 6,7,8; image 2 at t=9; shift = 9 + 2 = 11 -> VE T T 11..13
#   temporal: shift = 3 + 1 = 4 -> VE T VS at t 4,5,6; image 2 at t=7; shift = 8 -> VE T T at t 8..10
DIAGONAL = (
    [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9, 9, 9, 9, 11, 12, 13],
    [0, 1, 2, 0, 0, 0, 1, 1, 1, 6, 7, 8, 0, 0, 1, 1, 11, 12, 13],
    [0, 1, 2, 0, 1, 2, 0, 1, 2, 6, 7, 8, 0, 1, 0, 1, 11, 12, 13],
)
TEMPORAL = (
    [0, 1, 2, 3, 3, 3, 3, 3, 3, 4, 5, 6, 7, 7, 7, 7, 8, 9, 10],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0],
)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "text_axes,expected,delta", [("diagonal", DIAGONAL, 13 + 1 - 19), ("temporal", TEMPORAL, 10 + 1 - 19)]
)
def test_two_images(seq, name, text_axes, expected, delta):
    ids, grid = two_images(seq)
    pos, deltas = build(name, text_axes=text_axes).position_ids(ids, image_grid_thw=grid)
    assert pos[:, 0].tolist() == [list(map(float, row)) for row in expected]
    assert deltas.item() == delta


def test_diagonal_is_the_default_and_the_reference(seq):
    """The default did not move: same values as the default build and as MRoPE-I with spatial reset (spec 4.9)."""
    ids, grid = two_images(seq)
    for name in NAMES:
        default, d_default = build(name).position_ids(ids, image_grid_thw=grid)
        diagonal, d_diagonal = build(name, text_axes="diagonal").position_ids(ids, image_grid_thw=grid)
        assert torch.equal(default, diagonal) and torch.equal(d_default, d_diagonal)
        reset, _ = build("mrope_i", spatial_reset=True).position_ids(ids, image_grid_thw=grid)
        assert torch.equal(default, reset.float())


@pytest.mark.parametrize("name", NAMES)
def test_contiguous_video_advances_by_its_temporal_extent(seq, name):
    """T VS [video 3x4x4 -> 3 frames of 2x2, layout qwen2: step 1] VE T (16 tokens).

    shift after T VS = 2; video t = 2 + ti = 2,2,2,2,3,3,3,3,4,4,4,4; extent = (3-1)*1 + 1 = 3 >= h', w' = 2,
    so both modes resume at 5: VE at 5, T at 6; M = 6, delta = 6 + 1 - 16."""
    ids = torch.tensor([seq.text(1) + seq.video_qwen25((3, 4, 4)) + seq.text(1)])
    grid = torch.tensor([[3, 4, 4]])
    video_t = [2.0] * 4 + [3.0] * 4 + [4.0] * 4
    hw_h, hw_w = [0.0, 0.0, 1.0, 1.0] * 3, [0.0, 1.0, 0.0, 1.0] * 3
    temporal, d_t = build(name, text_axes="temporal").position_ids(ids, video_grid_thw=grid, layout="qwen2")
    assert temporal[:, 0].tolist() == [
        [0.0, 1.0, *video_t, 5.0, 6.0],
        [0.0, 0.0, *hw_h, 0.0, 0.0],
        [0.0, 0.0, *hw_w, 0.0, 0.0],
    ]
    diagonal, d_d = build(name).position_ids(ids, video_grid_thw=grid, layout="qwen2")
    assert diagonal[:, 0].tolist() == [
        [0.0, 1.0, *video_t, 5.0, 6.0],
        [0.0, 1.0, *hw_h, 5.0, 6.0],
        [0.0, 1.0, *hw_w, 5.0, 6.0],
    ]
    assert d_t.item() == d_d.item() == 6 + 1 - 16


def test_qwen3_video_frames_take_one_step_each(seq):
    """Qwen3-VL layout: `<ts> VS frame VE` per frame, 2 frames of 2x2 (grid 2x4x4), then T.

    temporal: ts=0, VS=1, frame 0 at t=2 (one step) -> VE=3, ts=4, VS=5, frame 1 at t=6 -> VE=7, T=8.
    diagonal: frame 0 at 2, shift = 2 + max(1, 2, 2) = 4 -> VE 4, ts 5, VS 6, frame 1 at 7 -> VE 9, T 10."""
    ids = torch.tensor([seq.video_qwen3((2, 4, 4)) + seq.text(1)])
    grid = torch.tensor([[2, 4, 4]])
    temporal, _ = build("omnirope", text_axes="temporal").position_ids(ids, video_grid_thw=grid)
    assert temporal[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 6, 6, 6, 7, 8]
    assert temporal[1, 0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    diagonal, _ = build("omnirope").position_ids(ids, video_grid_thw=grid)
    assert diagonal[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 7, 7, 7, 9, 10]
    assert diagonal[1, 0].tolist() == [0, 1, 0, 0, 1, 1, 4, 5, 6, 0, 0, 1, 1, 9, 10]


def test_text_only_and_padding(seq):
    """No grids: temporal text is (p, 0, 0) = cumsum(mask) - 1 on t, pads 1 on every row (spec 2.2)."""
    ids, mask = seq.batch([seq.text(3), seq.text(5)], sides=["left", "right"])
    pos, deltas = build("ilrope", text_axes="temporal").position_ids(ids, attention_mask_BL=mask)
    assert pos[:, 0].tolist() == [[1, 1, 0, 1, 2], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert pos[:, 1].tolist() == [[0, 1, 2, 3, 4], [0] * 5, [0] * 5]
    assert deltas.flatten().tolist() == [2 + 1 - 5, 4 + 1 - 5]
    diagonal, _ = build("ilrope").position_ids(ids, attention_mask_BL=mask)
    assert diagonal[:, 0].tolist() == [[1, 1, 0, 1, 2]] * 3


@pytest.mark.parametrize("text_axes", ["diagonal", "temporal"])
def test_decoding_continues_the_full_sequence(seq, text_axes):
    """A new (text) token decoded at cache_position + delta gets exactly the position a full pass over prompt +
    new tokens gives it, for a left-padded and a right-ending row: (p, 0, 0) for temporal, (p, p, p) else."""
    enc = build("omnirope", text_axes=text_axes)
    # temporal: row 0 ends with its image (no VE). The diagonal default keeps the reference's M = max over all
    # rows, which for a block ending the row is not where the next text goes, so it gets its VE there.
    first = seq.text(1) + seq.image((1, 4, 6), close=text_axes == "diagonal")
    rows = [first, seq.text(3) + seq.image((1, 4, 4)) + seq.text(2)]
    ids, mask = seq.batch(rows, sides=["left", "left"])
    grid = torch.tensor([[1, 4, 6], [1, 4, 4]])
    _, deltas = enc.position_ids(ids, image_grid_thw=grid, attention_mask_BL=mask)
    new = torch.tensor([[1500, 1501]] * 2)
    full, _ = enc.position_ids(
        torch.cat([ids, new], 1),
        image_grid_thw=grid,
        attention_mask_BL=torch.cat([mask, torch.ones_like(new)], 1),
    )
    length = ids.shape[1]
    for k in range(2):
        step = enc.decode_position_ids(deltas, torch.tensor([length + k]))
        assert torch.equal(step[:, :, 0], full[:, :, length + k])
    if text_axes == "temporal":
        # row 0 ends with the 2x3 image at t = 2: the next token is (3, 0, 0), not past the image's w = 2
        assert full[:, 0, length].tolist() == [3.0, 0.0, 0.0]


def test_packed_row_restarts_per_sample(seq):
    enc = build("ilrope", text_axes="temporal")
    a = seq.text(2) + seq.image((1, 4, 6)) + seq.text(1)
    b = seq.text(4)
    c = seq.image((1, 4, 4)) + seq.text(1)
    ids = torch.tensor(a + b + c)
    cu = [0, len(a), len(a) + len(b), len(ids)]
    packed = enc.packed_position_ids(ids, cu, image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 4]]))
    alone = [
        enc.position_ids(torch.tensor([a]), image_grid_thw=torch.tensor([[1, 4, 6]]))[0][:, 0],
        enc.position_ids(torch.tensor([b]))[0][:, 0].float(),
        enc.position_ids(torch.tensor([c]), image_grid_thw=torch.tensor([[1, 4, 4]]))[0][:, 0],
    ]
    assert torch.equal(packed, torch.cat(alone, dim=1))
    assert packed[:, len(a) : len(a) + len(b)].tolist() == [[0, 1, 2, 3], [0] * 4, [0] * 4]


def test_temporal_text_rotates_only_its_t_pairs(seq):
    """Frequencies are untouched by text_axes; a temporal text token at (p, 0, 0) has angle 0 (cos 1, sin 0) on
    every h/w pair and p * inv_freq[j] on its t pairs (interleaved [24, 20, 20]: j % 3 == 0 -> t)."""
    ids = torch.tensor([seq.text(4)])
    enc = build("ilrope", text_axes="temporal")
    pos, _ = enc.position_ids(ids)
    cos, sin = enc.cos_sin(pos, head_dim=128, rope_theta=1e6)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    t_pairs = [j for j in range(64) if j % 3 == 0 or j >= 60]
    hw_pairs = [j for j in range(64) if j not in t_pairs]
    p = 3
    assert torch.all(cos[0, p, hw_pairs] == 1) and torch.all(sin[0, p, hw_pairs] == 0)
    torch.testing.assert_close(cos[0, p, t_pairs], torch.cos(p * inv[t_pairs]), rtol=0, atol=1e-6)
