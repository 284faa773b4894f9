"""Parity of the MRoPE designs with the INSTALLED transformers (5.x) where its implementation is correct.

Conventions that differ by design and are accounted for in every comparison (spec 2.2 / 2.5 / 5):
- transformers 5.x writes 0 on padding, we write 1 -> compare valid tokens only, and check pads == 1;
- transformers 5.x computes rope_deltas with the UNPADDED length, we with the padded length L (4.57.1 convention)
  -> ours == theirs - num_pads.
Cases where 5.x is buggy per spec section 5 are tested against hand-derived values (see each docstring).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from mmrope.encodings import build

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel  # noqa: E402

IMG, VID = 151655, 151656


def _stub(model_cls: type, config: object) -> SimpleNamespace:
    """`self` for the unbound get_rope_index: it only reads config and calls get_vision_position_ids."""
    stub = SimpleNamespace(config=config)
    stub.get_vision_position_ids = functools.partial(model_cls.get_vision_position_ids, stub)
    return stub


def _mm_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMG).int() + 2 * (ids == VID).int()


def hf_qwen25(ids, mask=None, image_grid=None, video_grid=None, seconds=None, tokens_per_second=2):
    config = transformers.Qwen2_5_VLConfig()
    config.vision_config.tokens_per_second = tokens_per_second
    return Qwen2_5_VLModel.get_rope_index(
        _stub(Qwen2_5_VLModel, config), ids, _mm_types(ids), image_grid, video_grid, seconds, mask
    )


def hf_qwen2(ids, mask=None, image_grid=None, video_grid=None):
    config = transformers.Qwen2VLConfig()
    return Qwen2VLModel.get_rope_index(
        _stub(Qwen2VLModel, config), ids, _mm_types(ids), image_grid, video_grid, mask
    )


def hf_qwen3(ids, mask=None, image_grid=None, video_grid=None):
    config = transformers.Qwen3VLConfig()
    return Qwen3VLModel.get_rope_index(
        _stub(Qwen3VLModel, config), ids, _mm_types(ids), image_grid, video_grid, mask
    )


def assert_parity(ours, theirs, mask_BL=None, upto=None):
    (pos, deltas), (hf_pos, hf_deltas) = ours, theirs
    valid = torch.ones(pos.shape[1:], dtype=torch.bool) if mask_BL is None else mask_BL.bool()
    if upto is not None:  # compare only the first `upto` valid tokens of each row
        valid = valid & (valid.long().cumsum(-1) <= upto)
    assert torch.equal(pos[:, valid].long(), hf_pos[:, valid].long())
    if upto is None:
        num_pads = (~(torch.ones_like(valid) if mask_BL is None else mask_BL.bool())).sum(-1, keepdim=True)
        assert torch.equal(deltas.double(), (hf_deltas - num_pads).double())
    if mask_BL is not None:
        assert (pos[:, ~mask_BL.bool()] == 1).all()


# ----------------------------------------------------------------------------------------------- Qwen2.5-VL / mrope


def test_mrope_qwen25_text_only_padded(seq):
    ids, mask = seq.batch([seq.text(7), seq.text(4)], ["left", "right"])
    ours = build("mrope").position_ids(ids, attention_mask_BL=mask, layout="qwen2_5")
    assert_parity(ours, hf_qwen25(ids, mask), mask)


def test_mrope_qwen25_images_padded_batch(seq):
    grids = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 2]])
    row0 = seq.text(3) + seq.image((1, 4, 6)) + seq.text(5) + seq.image((1, 8, 4)) + seq.text(2)
    row1 = seq.text(6) + seq.image((1, 2, 2)) + seq.text(9)
    for sides in (["left", "right"], ["right", "left"]):
        ids, mask = seq.batch([row0, row1], sides)
        ours = build("mrope").position_ids(
            ids, image_grid_thw=grids, attention_mask_BL=mask, layout="qwen2_5"
        )
        assert_parity(ours, hf_qwen25(ids, mask, image_grid=grids), mask)


def test_mrope_qwen25_image_first_no_mask(seq):
    grids = torch.tensor([[1, 6, 4]])
    ids = torch.tensor([seq.image((1, 6, 4)) + seq.text(3)])
    ours = build("mrope").position_ids(ids, image_grid_thw=grids, layout="qwen2_5")
    assert_parity(ours, hf_qwen25(ids, image_grid=grids))


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2 / 3])
def test_mrope_qwen25_video_block_matches_hf(seq, seconds):
    """5.x's video t ids no longer int-cast second_per_grid_t (PR #45400), so video tokens match the fixed rule;
    a video whose temporal extent stays below max(h', w') also resumes identically -> full parity."""
    grids = torch.tensor([[3, 12, 12]])  # h' = w' = 6; temporal extent trunc(2 * seconds * 2) <= 4 <= h' - 1
    ids, mask = seq.batch(
        [seq.text(4) + seq.video_qwen25((3, 12, 12)) + seq.text(3), seq.text(2)], ["left", "left"]
    )
    spgt = torch.tensor([seconds])
    ours = build("mrope").position_ids(
        ids[:1], video_grid_thw=grids, attention_mask_BL=mask[:1], second_per_grid_ts=spgt, layout="qwen2_5"
    )
    theirs = hf_qwen25(ids[:1], mask[:1], video_grid=grids, seconds=spgt)
    assert_parity(ours, theirs, mask[:1])


def test_mrope_qwen25_long_video_resumes_after_temporal_extent(seq):
    """Hand-derived (spec 5.1): 5.x resumes text at base + max(h', w') (a bug); 4.57.1 semantics, kept here, resume
    after the video's full temporal extent. Video grid (4, 4, 4): h' = w' = 2, second_per_grid_t = 1.5, 2 tok/s ->
    step 3: frame ti has t = base + trunc(3 * ti) = base + 0, 3, 6, 9. Tokens: 2 text, VS (pos 0..2), base = 3."""
    grids = torch.tensor([[4, 4, 4]])
    ids = torch.tensor([seq.text(2) + seq.video_qwen25((4, 4, 4)) + seq.text(2)])
    pos, deltas = build("mrope").position_ids(
        ids, video_grid_thw=grids, second_per_grid_ts=[1.5], layout="qwen2_5"
    )
    base = 3
    t_video = [base + 3 * f for f in range(4) for _ in range(4)]
    h_video = [base + hi for _ in range(4) for hi in (0, 0, 1, 1)]
    w_video = [base + wi for _ in range(4) for wi in (0, 1, 0, 1)]
    nxt = base + 9 + 1  # max(9, 1, 1) + 1
    assert pos[0, 0].tolist() == [0, 1, 2] + t_video + [nxt, nxt + 1, nxt + 2]
    assert pos[1, 0].tolist() == [0, 1, 2] + h_video + [nxt, nxt + 1, nxt + 2]
    assert pos[2, 0].tolist() == [0, 1, 2] + w_video + [nxt, nxt + 1, nxt + 2]
    assert deltas.tolist() == [[nxt + 2 + 1 - ids.shape[1]]] and deltas.dtype == torch.int64
    # 5.x agrees on everything up to the end of the video block:
    assert_parity((pos, deltas), hf_qwen25(ids, video_grid=grids, seconds=torch.tensor([1.5])), upto=3 + 16)


@pytest.mark.parametrize(
    "layout,num_patches,stock_next,ours_next",
    [("qwen2_5", 8, 19, 19), ("qwen2_5", 9, 19, 20), ("qwen2", 16, 19, 19), ("qwen2", 17, 19, 20)],
)
def test_long_video_divergence_from_transformers_is_pinned(seq, layout, num_patches, stock_next, ours_next):
    """The long-video divergence (mmrope/encodings/README.md), pinned on both sides: an upgrade of transformers or
    a change here fails loudly. 448x448 frames (32x32 patches -> 16x16 tokens per temporal patch); Qwen2.5-VL at
    2 fps (second_per_grid_t 1.0 x tokens_per_second 2 = temporal step 2), Qwen2-VL (step 1). Tokens: 2 text, VS,
    the video from position 3, VE, 2 text. Transformers 5.x resumes at VE = 3 + max(h', w') = 19 whatever the
    length; mmrope (the Qwen rule, transformers 4.57.1) at 3 + max(last temporal id - 3, 15) + 1: the same for a
    short video, one past the video's last temporal id for a long one (8 * 2 = 16 > 15, 16 * 1 = 16 > 15)."""
    grid = (num_patches, 32, 32)
    grids = torch.tensor([grid])
    ids = torch.tensor([seq.text(2) + seq.video_qwen25(grid) + seq.text(2)])
    if layout == "qwen2_5":
        ours = build("mrope").position_ids(
            ids, video_grid_thw=grids, second_per_grid_ts=[1.0], layout=layout, tokens_per_second=2
        )
        theirs = hf_qwen25(ids, video_grid=grids, seconds=torch.tensor([1.0]), tokens_per_second=2)
    else:
        ours = build("mrope").position_ids(ids, video_grid_thw=grids, layout=layout)
        theirs = hf_qwen2(ids, video_grid=grids)
    ve = 3 + num_patches * 16 * 16  # index of vision_end
    last_t = int(theirs[0][0, 0, ve - 1])  # the video's last temporal id (both sides agree on the video)
    assert theirs[0][:, 0, ve].tolist() == [stock_next] * 3, (
        f"transformers {transformers.__version__} changed"
    )
    assert ours[0][:, 0, ve].tolist() == [ours_next] * 3
    assert_parity(ours, theirs, upto=ve)  # text, VS and every video token: identical
    if stock_next == ours_next:
        assert_parity(ours, theirs)
    else:  # stock puts the following text at temporal ids the video itself still uses
        assert stock_next <= last_t < ours_next == last_t + 1
        assert torch.equal(ours[1], theirs[1] + (ours_next - stock_next))


def test_mrope_qwen25_image_with_t2_hand_derived(seq):
    """Hand-derived (spec 5 table): 4.57.1 gives every frame of an IMAGE t = base (second_per_grid_t = 0 for
    images); 5.x gives base + ti (issue #45325 territory), so no parity. Grid (2, 4, 4): 2 frames of 2x2."""
    ids = torch.tensor([seq.text(1) + seq.image((2, 4, 4)) + seq.text(1)])
    pos, deltas = build("mrope").position_ids(ids, image_grid_thw=torch.tensor([[2, 4, 4]]), layout="qwen2_5")
    # T VS | 8 image tokens (base 2) | VE T ; next = 2 + max(0, 1, 1) + 1 = 4
    assert pos[0, 0].tolist() == [0, 1] + [2] * 8 + [4, 5]
    assert pos[1, 0].tolist() == [0, 1] + [2, 2, 3, 3] * 2 + [4, 5]
    assert pos[2, 0].tolist() == [0, 1] + [2, 3, 2, 3] * 2 + [4, 5]
    assert deltas.tolist() == [[5 + 1 - 12]]


def test_mrope_qwen25_second_per_grid_int_cast_is_fixed(seq):
    """Hand-derived (spec 5.1): 4.57.1 casts second_per_grid_t=0.5 to 0 first (all frames t = base); the fix uses
    0.5 * 2 tok/s = 1 per frame."""
    ids = torch.tensor([seq.video_qwen25((3, 2, 2))])
    pos, _ = build("mrope").position_ids(
        ids,
        video_grid_thw=torch.tensor([[3, 2, 2]]),
        second_per_grid_ts=torch.tensor([0.5]),
        layout="qwen2_5",
    )
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4]  # VS, frames at 1 + 0/1/2, VE at 1 + 2 + 1


# ----------------------------------------------------------------------------------------------- Qwen3-VL / mrope_i


def test_mrope_i_qwen3_images_and_videos_padded_batch(seq):
    images = torch.tensor([[1, 4, 6], [1, 6, 6]])
    videos = torch.tensor([[3, 4, 4], [2, 6, 4]])
    row0 = seq.text(3) + seq.image((1, 4, 6)) + seq.text(2) + seq.video_qwen3((3, 4, 4)) + seq.text(4)
    row1 = seq.video_qwen3((2, 6, 4)) + seq.text(5) + seq.image((1, 6, 6)) + seq.text(1)
    for sides in (["left", "left"], ["right", "left"], ["left", "right"]):
        ids, mask = seq.batch([row0, row1], sides)
        ours = build("mrope_i").position_ids(
            ids, image_grid_thw=images, video_grid_thw=videos, attention_mask_BL=mask
        )
        theirs = hf_qwen3(ids, mask, images, videos.clone())
        assert_parity(ours, theirs, mask)


def test_mrope_i_qwen3_text_only_and_t2_image(seq):
    ids, mask = seq.batch([seq.text(5), seq.text(8)], ["left", "right"])
    assert_parity(build("mrope_i").position_ids(ids, attention_mask_BL=mask), hf_qwen3(ids, mask), mask)
    # t = 2 image with h' = 2, w' = 3: temporal extent 1 < max(h', w') - 1, so 5.x resumes identically.
    ids = torch.tensor([seq.text(2) + seq.image((2, 4, 6)) + seq.text(3)])
    grids = torch.tensor([[2, 4, 6]])
    assert_parity(build("mrope_i").position_ids(ids, image_grid_thw=grids), hf_qwen3(ids, image_grid=grids))


def test_mrope_i_qwen3_deep_image_hand_derived(seq):
    """Hand-derived (spec 4.3 = 4.57.1): a t=4 block with h' = w' = 1 resumes at base + max(3, 0, 0) + 1; 5.x
    resumes at base + max(h', w') = base + 1 (it ignores the temporal extent), so no parity here."""
    ids = torch.tensor([seq.text(1) + seq.image((4, 2, 2)) + seq.text(1)])
    pos, _ = build("mrope_i").position_ids(ids, image_grid_thw=torch.tensor([[4, 2, 2]]))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 2, 2, 6, 7]
