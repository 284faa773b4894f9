"""Spec-golden checks: every design's rule on hand-derived values (never printed from the code under test).

- the spec's 29-token sequence (specs/encodings.md 1.4) with the golden test's per-variant kwargs;
- the worked example in each design's docstring (parsed from the docstring and compared with a hand table here);
- the reference bugs that policy 7 says to fix, and the knobs (fractional strides, HoPE's generator, V2PE).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from mmrope.encodings import available, build
from mmrope.encodings.registry import ENCODINGS

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def _run(start: float, n: int) -> list[float]:
    return [start + k for k in range(n)]


# --------------------------------------------------------------------------------------- spec 1.4: 29 tokens

# 5 text, VS, 4 image (1x4x4), VE, 2 text, 300, VS, 4 video, VE, 400, 301, VS, 4 video, VE, 500; video (2, 4, 4).
GOLDEN_IDS = [
    10,
    11,
    12,
    13,
    14,
    VS,
    IMG,
    IMG,
    IMG,
    IMG,
    VE,
    15,
    16,
    300,
    VS,
    VID,
    VID,
    VID,
    VID,
    VE,
    400,
    301,
    VS,
    VID,
    VID,
    VID,
    VID,
    VE,
    500,
]
GOLDEN_KWARGS = {
    "vanilla": {},
    "mrope": {"mrope_section": [16, 24, 24], "temporal_stride": 2},
    "mrope_i": {"mrope_section": [24, 20, 20], "temporal_stride": 1, "spatial_reset": False},
    "mhrope": {
        "num_key_value_heads": 8,
        "mrope_section": [2, 3, 3],
        "temporal_stride": 1,
        "spatial_reset": True,
    },
    "videorope": {},
    "hope": {},
    "circlerope": {"move_to_origin": True, "dff_rate": True, "radius": 10, "alpha": 0.5},
    "v2pe": {"visual_stride": 16.0},
    "ilrope": {},
    "omnirope": {},
    "lumos": {"position_scale": (4, 8, 8)},
    "grape": {},
}


def _mrope_like(next_after, h_local: bool, scale=(1, 1, 1)):
    """Positions of the golden row for MRoPE-like designs, written from the spec rule (4.2/4.3/4.11)."""
    rows = ([], [], [])
    cur = 0
    segments = [(0, 6), (10, 5), (19, 4)]
    for (_, n_text), _blk in zip(segments, range(3)):
        for r in rows:
            r.extend(_run(cur, n_text))
        base = cur + n_text
        rows[0].extend([base] * 4)
        hs = [0, 0, 1, 1]
        ws = [0, 1, 0, 1]
        rows[1].extend([(0 if h_local else base) + scale[1] * x for x in hs])
        rows[2].extend([(0 if h_local else base) + scale[2] * x for x in ws])
        cur = base + next_after
    for r in rows:
        r.extend(_run(cur, 2))
    return rows


def _golden_expected(name: str):
    if name == "vanilla":
        return [list(range(29))] * 3, 0.0
    if name in ("mrope", "mrope_i", "grape"):  # next text = base + max(0, 1, 1) + 1
        return _mrope_like(2, h_local=False), -6.0
    if name in ("mhrope", "ilrope", "omnirope"):  # h/w local; text positions as in MRoPE
        return _mrope_like(2, h_local=True), -6.0
    if name == "lumos":  # image advances by 8 * max(h'-1, w'-1) + 1 = 9
        return _mrope_like(9, h_local=False, scale=(4, 8, 8)), 15.0
    if name in ("videorope", "hope"):  # diagonal, (h'-1)//2 = 0, next text = T + 1
        return _mrope_like(1, h_local=False), -9.0
    if name == "v2pe":  # 4-token blocks span 16: step 4; text resumes at ceil(last) + 1
        row = (
            list(range(6))
            + [9, 13, 17, 21]
            + _run(22, 5)
            + [30, 34, 38, 42]
            + _run(43, 4)
            + [50, 54, 58, 62, 63, 64]
        )
        return [row] * 3, 36.0
    if (
        name == "circlerope"
    ):  # dff_rate=True: pure rotation of the origin-centred 2x2 grid into the plane (1,1,1)^⊥
        r2, r6 = 1 / math.sqrt(2), 1 / math.sqrt(6)
        xy = [
            (-0.5, -0.5),
            (0.5, -0.5),
            (-0.5, 0.5),
            (0.5, 0.5),
        ]  # (x=w, y=h) for raster (0,0) (0,1) (1,0) (1,1)
        ring = [(2 * y * r6, x * r2 - y * r6, -x * r2 - y * r6) for x, y in xy]  # (t=Z, h=Y, w=X)
        top = max(max(p) for p in ring)
        rows = ([], [], [])
        cur = 0.0
        for n_text in (6, 5, 4):
            for r in rows:
                r.extend(_run(cur, n_text))
            base = cur + n_text
            for p in ring:
                for a in range(3):
                    rows[a].append(base + p[a])
            cur = base + top + 1
        for r in rows:
            r.extend(_run(cur, 2))
        return rows, cur + 1 + 1 - 29
    raise KeyError(name)


GOLDEN_DTYPES = {  # spec 2.6 with the golden kwargs (int strides for mrope / mrope_i / mhrope)
    "vanilla": (torch.int64, torch.int64),
    "mrope": (torch.int64, torch.int64),
    "mrope_i": (torch.int64, torch.int64),
    "mhrope": (torch.int64, torch.int64),
    "grape": (torch.int64, torch.float32),
}


@pytest.mark.parametrize("name", available())
def test_golden_29_tokens(name):
    enc = build(name, **GOLDEN_KWARGS[name])
    pos, deltas = enc.position_ids(
        torch.tensor([GOLDEN_IDS]),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        video_grid_thw=torch.tensor([[2, 4, 4]]),
        attention_mask_BL=torch.ones(1, 29, dtype=torch.long),
    )
    rows, delta = _golden_expected(name)
    expected = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(pos[:, 0].double(), expected, atol=1e-5, rtol=0)
    assert deltas.shape == (1, 1) and abs(deltas.item() - delta) < 1e-5
    assert (pos.dtype, deltas.dtype) == GOLDEN_DTYPES.get(name, (torch.float32, torch.float32))


# --------------------------------------------------------------------------------------- docstring examples

# `T T VS I I I I VE T` with image grid (1, 4, 4); derived by hand from spec section 4.
DOC_IDS = [1000, 1001, VS, IMG, IMG, IMG, IMG, VE, 1002]
_MR = ([0, 1, 2, 3, 3, 3, 3, 5, 6], [0, 1, 2, 3, 3, 4, 4, 5, 6], [0, 1, 2, 3, 4, 3, 4, 5, 6])
_RESET = ([0, 1, 2, 3, 3, 3, 3, 5, 6], [0, 1, 2, 0, 0, 1, 1, 5, 6], [0, 1, 2, 0, 1, 0, 1, 5, 6])
_DIAG = ([0, 1, 2, 3, 3, 3, 3, 4, 5], [0, 1, 2, 3, 3, 4, 4, 4, 5], [0, 1, 2, 3, 4, 3, 4, 4, 5])
_R = 1 / math.sqrt(
    2
)  # circlerope defaults: radius -1, alpha -1 -> θ = 2θi - θn = 0, π, 0, 2π; (cx, cy) = -(cos, sin)
DOC_TABLE = {
    "vanilla": ({}, ([*range(9)],) * 3, 0),
    "mrope": ({}, _MR, -2),
    "mrope_i": ({"spatial_reset": True}, _RESET, -2),
    "mhrope": ({}, _MR, -2),
    "grape": ({}, _MR, -2),
    "videorope": ({}, _DIAG, -3),
    "hope": ({}, _DIAG, -3),
    "circlerope": (
        {},
        (
            [0, 1, 2, 3, 3, 3, 3, 4 + _R, 5 + _R],
            [0, 1, 2, 3 - _R, 3 + _R, 3 - _R, 3 - _R, 4 + _R, 5 + _R],
            [0, 1, 2, 3 + _R, 3 - _R, 3 + _R, 3 + _R, 4 + _R, 5 + _R],
        ),
        5 + _R + 1 - 9,
    ),
    "v2pe": ({}, ([0, 1, 2, 6, 10, 14, 18, 19, 20],) * 3, 12),
    "ilrope": ({}, _RESET, -2),
    "omnirope": ({}, _RESET, -2),
    "lumos": (
        {"position_scale": (4, 8, 8)},
        ([0, 1, 2, 3, 3, 3, 3, 12, 13], [0, 1, 2, 3, 3, 11, 11, 12, 13], [0, 1, 2, 3, 11, 3, 11, 12, 13]),
        5,
    ),
}


def _parse_docstring_example(doc: str) -> tuple[list[list[float]], float]:
    rows = {}
    for axis in ("t", "h", "w"):
        match = re.search(rf"^\s*{axis}: ([-\d. ]+)$", doc, flags=re.MULTILINE)
        assert match, f"docstring lacks a '{axis}:' example row"
        rows[axis] = [float(x) for x in match.group(1).split()]
    delta = re.search(r"^\s*rope_deltas: (-?[\d.]+)$", doc, flags=re.MULTILINE)
    assert delta, "docstring lacks a 'rope_deltas:' example line"
    return [rows["t"], rows["h"], rows["w"]], float(delta.group(1))


@pytest.mark.parametrize("name", available())
def test_docstring_example(name):
    kwargs, rows, delta = DOC_TABLE[name]
    doc_rows, doc_delta = _parse_docstring_example(ENCODINGS[name].design.__doc__)
    torch.testing.assert_close(
        torch.tensor(doc_rows), torch.tensor(rows, dtype=torch.float32), atol=1e-4, rtol=0
    )
    assert abs(doc_delta - delta) < 1e-4
    pos, deltas = build(name, **kwargs).position_ids(
        torch.tensor([DOC_IDS]), image_grid_thw=torch.tensor([[1, 4, 4]])
    )
    torch.testing.assert_close(pos[:, 0].double(), torch.tensor(rows, dtype=torch.float64), atol=1e-5, rtol=0)
    assert abs(deltas.item() - delta) < 1e-5


# --------------------------------------------------------------------------------------- fixes (policy 7)


@pytest.mark.parametrize(
    "name,kwargs", [("mrope_i", {"spatial_reset": True}), ("mhrope", {"spatial_reset": True})]
)
def test_spatial_reset_block_ends_sequence(name, kwargs):
    """Fix 6.4: the reference crashes when a block ends the row. Here M reserves v - 1 so that decoding continues at
    v = base + max((t-1)s, h'-1, w'-1) + 1 (where the VE would have gone). Row: T T VS + 2x3 image (grid 1x4x6)."""
    enc = build(name, **kwargs)
    ids = torch.tensor([[1000, 1001, VS] + [IMG] * 6])
    pos, deltas = enc.position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert pos[0, 0].tolist() == [0, 1, 2] + [3] * 6
    assert pos[1, 0].tolist() == [0, 1, 2, 0, 0, 0, 1, 1, 1]
    assert pos[2, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    v = 3 + 2 + 1
    assert deltas.item() == v - 1 + 1 - 9
    assert enc.decode_position_ids(deltas, torch.tensor([9]))[:, 0].tolist() == [[v]] * 3


def test_spatial_reset_block_followed_by_non_ve_text():
    """Fix 6.4: the token after the block gets v whether or not it is VE; text continues at v + 1 (same values as
    the reference's VE slot, which it silently gave to any token)."""
    enc = build("mrope_i", spatial_reset=True)
    ids = torch.tensor([[1000, VS] + [IMG] * 4 + [1001, 1002, VS] + [IMG] * 4])
    pos, _ = enc.position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    # T VS | img base 2 (t=2, local h/w) | T T VS at v=4,5,6 | img base 7
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 7, 7, 7]
    assert pos[1, 0].tolist() == [0, 1, 0, 0, 1, 1, 4, 5, 6, 0, 0, 1, 1]


def test_circlerope_t2_block_with_dff_rate_is_mapped_frame_by_frame():
    """Fix 6.3: the reference crashes for t > 1 with dff_rate. Each frame gets frame 0's ring (x = w, y = h do not
    depend on the frame; the projection drops z) plus fi * s. Documented kwargs, temporal_stride 1.5, grid 2x4x4."""
    enc = build("circlerope", move_to_origin=True, dff_rate=True, radius=10, alpha=0.5, temporal_stride=1.5)
    ids = torch.tensor([[1000, VS] + [IMG] * 8 + [VE]])
    pos, _ = enc.position_ids(ids, image_grid_thw=torch.tensor([[2, 4, 4]]))
    r2, r6 = 1 / math.sqrt(2), 1 / math.sqrt(6)
    xy = [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)]
    ring = [(2 * y * r6, x * r2 - y * r6, -x * r2 - y * r6) for x, y in xy]
    expected = [[0.0, 1.0] + [2 + f * 1.5 + p[a] for f in range(2) for p in ring] for a in range(3)]
    top = max(e for row in expected for e in row)
    for row in expected:
        row.append(top + 1)
    torch.testing.assert_close(
        pos[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_circlerope_move_to_positive_true_adds_one():
    """move_to_positive=True adds |min| + float(True) = |min| + 1 (reference semantics); no_circle, no dff."""
    enc = build("circlerope", method="no_circle", move_to_positive=True)
    pos, _ = enc.position_ids(torch.tensor([[VS] + [IMG] * 4]), image_grid_thw=torch.tensor([[1, 4, 4]]))
    r2, r6 = 1 / math.sqrt(2), 1 / math.sqrt(6)
    ring = [(2 * y * r6, x * r2 - y * r6, -x * r2 - y * r6) for x, y in [(0, 0), (1, 0), (0, 1), (1, 1)]]
    low = min(min(p) for p in ring)
    expected = [[0.0] + [1 + p[a] - low + 1 for p in ring] for a in range(3)]
    torch.testing.assert_close(
        pos[:, 0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0
    )


# --------------------------------------------------------------------------------------- knobs


def test_mrope_fractional_stride_truncates_positions_not_deltas():
    """Spec 2.6 / 6.5: float32 intermediates truncated toward 0, deltas stay fractional. Grid (3, 2, 2): t offsets
    0, 1.25, 2.5 from base 2 -> 2, 3.25, 4.5 -> 2, 3, 4; next text at 5.5 -> 5, 6.5 -> 6; M = 6.5."""
    enc = build("mrope", temporal_stride=1.25)
    ids = torch.tensor([[1000, VS, IMG, IMG, IMG, VE, 1001]])
    pos, deltas = enc.position_ids(ids, image_grid_thw=torch.tensor([[3, 2, 2]]))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 2, 5, 6]
    assert deltas.dtype == torch.float32 and deltas.item() == 6.5 + 1 - 7
    assert enc.decode_position_ids(deltas, torch.tensor([7]))[:, 0].tolist() == [[7]] * 3  # trunc(7.5)


def test_mrope_int_stride_gives_int_deltas():
    pos, deltas = build("mrope", temporal_stride=2).position_ids(
        torch.tensor([[VS, IMG, VE]]), image_grid_thw=torch.tensor([[1, 2, 2]])
    )
    assert deltas.dtype == torch.int64 and pos.dtype == torch.int64


def test_v2pe_uses_torch_arange_recipe():
    """Spec 4.8: a 6-token block (grid 1x4x6) spans 16 with step 16/6 from last = 2, values from the float32 CPU
    arange with the reference's arguments; text resumes at ceil(last value) + 1."""
    ids = torch.tensor([[1000, 1001, VS] + [IMG] * 6 + [VE]])
    pos, deltas = build("v2pe").position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    step = 16.0 / 6
    visual = torch.arange(2 + step, 2 + step * 7, step, dtype=torch.float32)[:6]
    assert torch.equal(pos[0, 0, 3:9], visual) and torch.equal(pos[1, 0], pos[0, 0])
    assert pos[0, 0, 9].item() == math.ceil(visual[-1].item()) + 1 == 19
    assert deltas.item() == 19 + 1 - 10


def test_hope_scale_from_generator_and_fixed_scale():
    """Spec 4.6 / policy 7: one draw per block from the caller's torch.Generator; a fixed scale for evaluation."""
    ids = torch.tensor([[1000, VS] + [IMG] * 3 + [VE]])
    grid = torch.tensor([[3, 2, 2]])  # t = 3 so the scale shows
    enc = build("hope")
    runs = [
        enc.position_ids(ids, image_grid_thw=grid, generator=torch.Generator().manual_seed(s))[0]
        for s in range(8)
    ]
    assert torch.equal(
        runs[0], enc.position_ids(ids, image_grid_thw=grid, generator=torch.Generator().manual_seed(0))[0]
    )
    lst = [0.5, 0.75, 1.0, 1.25, 1.5]
    steps = {(r[0, 0, 3] - r[0, 0, 2]).item() for r in runs}
    assert steps <= set(lst) and len(steps) > 1
    pos, deltas = build("hope", fixed_temporal_scale=1.5).position_ids(ids, image_grid_thw=grid)
    assert pos[0, 0].tolist() == [0, 1, 2, 3.5, 5, 6]  # T = 2 + 1.5 ti, next = max(T) + 1
    assert deltas.item() == 6 + 1 - 6


def test_videorope_qwen25_video_uses_absolute_time_step(seq):
    """Layout qwen2_5: a contiguous video's temporal stride is second_per_grid_t * tokens_per_second (here 0.75 * 2)."""
    ids = torch.tensor([seq.video_qwen25((3, 2, 2))])
    pos, _ = build("videorope").position_ids(
        ids, video_grid_thw=torch.tensor([[3, 2, 2]]), second_per_grid_ts=[0.75], layout="qwen2_5"
    )
    assert pos[0, 0].tolist() == [0, 1, 2.5, 4, 5]


def test_mrope_qwen2_layout_steps_one_per_temporal_patch(seq):
    """Layout qwen2 (Qwen2-VL, transformers 4.57.1): a contiguous video gets t = base + ti whatever its frame rate,
    and text resumes after the block's full extent (here the temporal one, 3 > h' - 1, w' - 1).

    T T | VS | video grid (4, 2, 4) -> 4 x 1 x 2 tokens | VE T: base 3; t 3,3,4,4,5,5,6,6; h 3; w 3,4; next 7."""
    ids = torch.tensor([seq.text(2) + seq.video_qwen25((4, 2, 4)) + seq.text(1)])
    pos, deltas = build("mrope").position_ids(
        ids, video_grid_thw=torch.tensor([[4, 2, 4]]), second_per_grid_ts=[0.5], layout="qwen2"
    )
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 8]
    assert pos[1, 0].tolist() == [0, 1, 2] + [3] * 8 + [7, 8]
    assert pos[2, 0].tolist() == [0, 1, 2] + [3, 4] * 4 + [7, 8]
    assert deltas.dtype == torch.int64 and deltas.item() == 8 + 1 - 13
    # an image with t = 2 in the qwen2 layout: t = base + ti too (Qwen2.5-VL's qwen2_5 layout gives t = base)
    img = torch.tensor([seq.image((2, 2, 2))])
    pos2, _ = build("mrope").position_ids(img, image_grid_thw=torch.tensor([[2, 2, 2]]), layout="qwen2")
    pos25, _ = build("mrope").position_ids(img, image_grid_thw=torch.tensor([[2, 2, 2]]), layout="qwen2_5")
    assert pos2[0, 0].tolist() == [0, 1, 2, 3] and pos25[0, 0].tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("layout", ["qwen3", "qwen2_5"])
def test_grid_token_mismatch_raises(seq, layout):
    ids = torch.tensor([seq.text(2) + seq.image((1, 4, 4)) + seq.text(1)])
    with pytest.raises(ValueError, match="image_grid_thw"):
        build("mrope").position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 6]]), layout=layout)
    with pytest.raises(ValueError, match="image_grid_thw"):  # leftover grid row
        build("mrope").position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]), layout=layout)
    with pytest.raises(ValueError, match="layout"):
        build("mrope").position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 4]]), layout="qwen4")


def test_qwen25_contiguous_video_in_qwen3_layout_raises(seq):
    ids = torch.tensor([seq.video_qwen25((2, 4, 4))])
    with pytest.raises(ValueError, match="video_grid_thw"):
        build("mrope_i").position_ids(ids, video_grid_thw=torch.tensor([[2, 4, 4]]), layout="qwen3")
    with pytest.raises(ValueError, match="second_per_grid_ts"):
        build("mrope").position_ids(
            ids, video_grid_thw=torch.tensor([[2, 4, 4]]), second_per_grid_ts=[], layout="qwen2_5"
        )


def test_caller_grids_are_not_mutated(seq):
    """Spec 2.1: splitting videos per frame must not touch the caller's tensor."""
    videos = torch.tensor([[2, 4, 4]])
    ids = torch.tensor([seq.video_qwen3((2, 4, 4))])
    build("mrope_i").position_ids(ids, video_grid_thw=videos)
    assert videos.tolist() == [[2, 4, 4]]
