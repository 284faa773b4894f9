"""Sample processing and packing on the real tiny tokenizer + image processor."""

from __future__ import annotations

import io
import json

import pytest
import torch

from data.loader import PackedRowStream
from data.packing import FirstFitPacker, collate_row
from data.processing import IGNORE_INDEX, SampleError, SampleProcessor, token_ids_for
from data.synthetic import draw_shape
from mmrope.encodings import build


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    draw_shape("circle", "red", "blue", (w, h), "center", 0.4).save(buf, format="PNG")
    return buf.getvalue()


def record(messages, **images) -> dict:
    return {"__key__": "k", "json": json.dumps({"messages": messages}).encode(), **images}


@pytest.fixture()
def proc(tiny_processor):
    return SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")


def test_labels_cover_exactly_the_assistant_turns(proc, tiny_processor):
    r = record(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "Shape?"}],
            },
            {"role": "assistant", "content": "A circle."},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Red."},
        ],
        **{"img0.png": png(84, 56)},
    )
    s = proc(r)
    tok = tiny_processor.tokenizer
    supervised = tok.decode(s.input_ids[s.labels != IGNORE_INDEX])
    assert supervised == "A circle.<|im_end|>Red.<|im_end|>"
    # Everything else is context: the user turns, the headers, the image.
    assert (s.labels[s.labels != IGNORE_INDEX] == s.input_ids[s.labels != IGNORE_INDEX]).all()
    assert tok.decode(s.input_ids).startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")


def test_image_tokens_match_the_grid(proc, tiny_processor):
    r = record(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "img0.png"},
                    {"type": "image", "image": "img1.png"},
                    {"type": "text", "text": "Same?"},
                ],
            },
            {"role": "assistant", "content": "No."},
        ],
        **{"img0.png": png(84, 56), "img1.png": png(140, 140)},
    )
    s = proc(r)
    ids = token_ids_for(tiny_processor)
    # 84x56 -> grid 1x4x6 (patch 14) -> 6 tokens after 2x2 merge; 140x140 -> 1x10x10 -> 25 tokens.
    assert s.image_grid_thw.tolist() == [[1, 4, 6], [1, 10, 10]]
    assert int((s.input_ids == ids.image_token_id).sum()) == 6 + 25
    assert s.pixel_values.shape[0] == 4 * 6 + 10 * 10
    # Each image's placeholder run sits between its own vision_start and vision_end.
    vs = (s.input_ids == ids.vision_start_token_id).nonzero().flatten().tolist()
    ve = (s.input_ids == ids.vision_end_token_id).nonzero().flatten().tolist()
    assert [b - a - 1 for a, b in zip(vs, ve)] == [6, 25]


@pytest.mark.parametrize(
    "rec,reason",
    [
        ({"__key__": "k"}, "missing_field"),
        ({"__key__": "k", "json": b"{not json"}, "bad_json"),
        (record([{"role": "user", "content": "hi"}]), "no_labels"),
        (
            record(
                [
                    {"role": "user", "content": [{"type": "image", "image": "img0.png"}]},
                    {"role": "assistant", "content": "x"},
                ]
            ),
            "missing_field",
        ),
        (
            record(
                [
                    {"role": "user", "content": [{"type": "image", "image": "img0.png"}]},
                    {"role": "assistant", "content": "x"},
                ],
                **{"img0.png": b"\x89PNG broken"},
            ),
            "bad_image",
        ),
        (
            record(
                [{"role": "user", "content": "look <|image_pad|>"}, {"role": "assistant", "content": "x"}]
            ),
            "token_grid_mismatch",
        ),
        (
            record([{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "x"}]),
            "too_long",
        ),
    ],
)
def test_bad_records_raise_their_reason(proc, rec, reason):
    with pytest.raises(SampleError) as e:
        proc(rec)
    assert e.value.reason == reason


def test_an_unreadable_image_is_named_not_shown_as_a_bytesio(proc):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "img0.png"}]},
        {"role": "assistant", "content": "x"},
    ]
    rec = {
        "__key__": "k",
        "json": json.dumps({"messages": messages, "id": "src-7"}).encode(),
        "img0.png": b"no",
    }
    with pytest.raises(SampleError) as e:
        proc(rec)
    assert e.value.reason == "bad_image" and "BytesIO" not in str(e.value)
    assert e.value.detail == (
        "image member 'img0.png': not a readable image (PIL cannot identify its format) (record id 'src-7')"
    )


def test_errors_name_the_records_own_id(proc, tmp_path):
    """A converted record keeps its source id in the .json member: errors name it, not only the shard key."""
    messages = [{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "x"}]
    rec = {"__key__": "000000007", "json": json.dumps({"messages": messages, "id": "llava-42"}).encode()}
    with pytest.raises(SampleError, match="llava-42") as e:
        proc(rec)
    assert e.value.reason == "too_long" and "max_tokens=512" in str(e.value)

    import webdataset as wds

    from data.loader import DataError

    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write(rec)
    stream = PackedRowStream([str(shard)], proc, max_tokens=512, epochs=1, error_policy="raise")
    with pytest.raises(DataError, match=r"too_long.*record id 'llava-42'.*000000007"):
        next(iter(stream))


def test_packed_row_positions_equal_each_sample_alone(proc, synthetic_shards):
    stream = PackedRowStream(synthetic_shards, proc, max_tokens=512, epochs=1)
    row = next(iter(stream))
    cu = row["cu_seqlens"].tolist()
    assert row["num_samples"] >= 2 and cu[-1] == row["input_ids"].shape[-1] <= 512
    # Re-process each sample alone and compare its slice of the packed row.
    keys = row["sample_keys"]
    import webdataset as wds

    records = {r["__key__"]: r for url in synthetic_shards for r in wds.tarfile_to_samples()([{"url": url}])}
    grids = []
    for i, key in enumerate(keys):
        alone = proc(records[key])
        sl = slice(cu[i], cu[i + 1])
        assert torch.equal(row["input_ids"][0, sl], alone.input_ids)
        assert torch.equal(row["position_ids"][:, 0, sl], alone.position_ids)
        assert alone.position_ids.min() == 0  # positions restart in every sample
        grids.append(alone.image_grid_thw)
    assert torch.equal(row["image_grid_thw"], torch.cat(grids))


def test_first_fit_packing_respects_budget_and_keeps_every_sample(proc, synthetic_shards):
    import webdataset as wds

    samples = [proc(r) for r in wds.tarfile_to_samples()([{"url": synthetic_shards[0]}])][:60]
    packer = FirstFitPacker(max_tokens=300, num_open=4)
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    assert sorted(s.key for r in rows for s in r) == sorted(s.key for s in samples)
    assert all(sum(s.num_tokens for s in r) <= 300 for r in rows)
    used = sum(s.num_tokens for s in samples) / (300 * len(rows))
    assert used > 0.8, f"packing efficiency {used:.2%}"
    row = collate_row(rows[0], image_token_id=5, video_token_id=6)
    assert row["cu_seqlens"].dtype == torch.int32 and row["cu_seqlens"][0] == 0


def test_corrupt_shard_is_counted_not_fatal_under_skip(proc, synthetic_shards, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(open(synthetic_shards[0], "rb").read()[:5000])  # truncated tar
    stream = PackedRowStream([str(bad), synthetic_shards[1]], proc, max_tokens=512, epochs=1)
    rows = list(stream)
    assert rows and sum(r["skipped"].get("bad_shard", 0) for r in rows) >= 1
    with pytest.raises(Exception, match="bad_shard"):
        list(PackedRowStream([str(bad)], proc, max_tokens=512, epochs=1, error_policy="raise"))
