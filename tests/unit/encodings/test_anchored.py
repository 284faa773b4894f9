"""DIPE static (anchored) positions, specs/dipe.md section 2 (values derived by hand from the spec)."""

from __future__ import annotations

import pytest
import torch

from mmrope.encodings import anchored_positions, build

IMG, VS, VE = 151655, 151652, 151653


def _visual(ids: torch.Tensor) -> torch.Tensor:
    return ids == IMG


def test_worked_example_dipe_2_3(seq):
    """text x5, VS, image (1, 4, 6) -> 2x3 tokens, VE, text x6 (dipe.md 2.3)."""
    ids = torch.tensor([seq.text(5) + seq.image((1, 4, 6)) + seq.text(6)])
    dyn, _ = build("mrope").position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert dyn[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 9, 10, 11, 12, 13, 14, 15]
    assert dyn[1, 0, 5:13].tolist() == [5, 6, 6, 6, 7, 7, 7, 9]
    assert dyn[2, 0, 5:13].tolist() == [5, 6, 7, 8, 6, 7, 8, 9]
    static = anchored_positions(dyn, _visual(ids))
    expected = [0] * 6 + [6] * 6 + [9] * 7
    assert static[:, 0].tolist() == [expected] * 3 and static.dtype == dyn.dtype


def test_no_visual_token_is_a_copy_and_pads_are_one(seq):
    ids, mask = seq.batch([seq.text(4), seq.text(2)], ["left", "right"])
    dyn, _ = build("mrope").position_ids(ids, attention_mask_BL=mask)
    static = anchored_positions(dyn, _visual(ids), mask)
    assert torch.equal(static, dyn)
    assert (static[:, ~mask.bool()] == 1).all()


def test_two_images_padding_and_mixed_batch(seq):
    """Text between image k and k+1 is anchored on image k's VE (= max(image k) + 1); a text-only row in an image
    batch gets 0 everywhere (dipe.md 2.2); left padding is skipped and pads are 1."""
    row0 = seq.text(2) + seq.image((1, 4, 4)) + seq.text(3) + seq.image((1, 2, 2)) + seq.text(2)
    row1 = seq.text(4)
    ids, mask = seq.batch([row0, row1], ["right", "left"])
    dyn, _ = build("mrope").position_ids(
        ids, image_grid_thw=torch.tensor([[1, 4, 4], [1, 2, 2]]), attention_mask_BL=mask
    )
    static = anchored_positions(dyn, _visual(ids), mask)
    # row0: T T VS (0..2) | img base 3 -> (3,3,3) | VE T T T VS at 5..9 | img base 10 | VE T T at 11..13
    assert static[0, 0].tolist() == [0, 0, 0, 3, 3, 3, 3, 5, 5, 5, 5, 5, 10, 11, 11, 11]
    assert static[1, 0, :12].tolist() == [0, 0, 0, 3, 3, 3, 3, 5, 5, 5, 5, 5]
    assert static[:, 1].tolist() == [[1] * 12 + [0] * 4] * 3


def test_packed_samples_are_anchored_separately(seq):
    s0 = seq.text(2) + seq.image((1, 4, 4)) + seq.text(2)
    s1 = seq.text(3) + seq.image((1, 2, 2)) + seq.text(1)
    ids = torch.tensor(s0 + s1)
    enc = build("mrope")
    cu = [0, len(s0), len(s0) + len(s1)]
    dyn = enc.packed_position_ids(ids, cu, image_grid_thw=torch.tensor([[1, 4, 4], [1, 2, 2]]))
    static = anchored_positions(dyn.unsqueeze(1), _visual(ids).unsqueeze(0), cu_seqlens=cu)[:, 0]
    # sample 1 starts with text at position 0 (its own segment), not with sample 0's trailing segment anchor
    assert static[0].tolist() == [0, 0, 0, 3, 3, 3, 3, 5, 5, 5] + [0, 0, 0, 0, 4, 5, 5]
    with pytest.raises(ValueError, match="cu_seqlens"):
        anchored_positions(torch.zeros(3, 2, 4), torch.zeros(2, 4, dtype=torch.bool), cu_seqlens=[0, 4])


def test_any_three_axis_encoding_uses_the_first_token_vector(seq):
    """With MRoPE-I spatial reset the first patch is (S, 0, 0), so that vector is every patch's anchor."""
    ids = torch.tensor([seq.text(1) + seq.image((1, 4, 6)) + seq.text(2)])
    dyn, _ = build("mrope_i", spatial_reset=True).position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    static = anchored_positions(dyn, _visual(ids))
    assert static[:, 0, 2:8].tolist() == [[2] * 6, [0] * 6, [0] * 6]
    assert static[:, 0, 8:].tolist() == [[5, 5, 5]] * 3
