"""Shard index: round trip against webdataset's own reading, corrupt or stale indexes rebuilt (never trusted),
an index that lies about a shard refused at the first read, the CLI."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import webdataset as wds
from PIL import Image

from data import index as shard_index
from data.loader import DataError, PackedRowStream
from data.processing import SampleProcessor
from mmrope.encodings import build


def _image(w: int, h: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((w, h), 50).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def _messages(*media: str) -> bytes:
    parts = [{"type": "image", "image": m} for m in media] + [{"type": "text", "text": "Describe."}]
    return json.dumps(
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Noise."}]}
    ).encode()


SIZES = {"a": [(70, 50)], "b": [(30, 90), (120, 40)], "c": [(64, 64)]}


@pytest.fixture()
def shard(tmp_path) -> str:
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for key, sizes in SIZES.items():
            names = [f"img{i}.{'png' if i % 2 == 0 else 'jpg'}" for i in range(len(sizes))]
            rec = {"__key__": key, "json": _messages(*names)}
            for name, (width, height) in zip(names, sizes):
                rec[name] = _image(width, height, "PNG" if name.endswith("png") else "JPEG")
            w.write(rec)
        w.write({"__key__": "textonly", "json": b'{"messages": []}', "txt": b"hello"})
    return str(path)


def test_round_trip(shard, tmp_path):
    built = shard_index.build(shard)
    target = shard_index.write(built, tmp_path / "x.idx")
    loaded = shard_index.load(target, shard)
    assert loaded.records == built.records and loaded.error is None
    truth = list(wds.tarfile_to_samples()([{"url": shard}]))
    assert [r["key"] for r in loaded.records] == [t["__key__"] for t in truth]
    for i, want in enumerate(truth):
        got = shard_index.read_record(loaded, i)
        assert {k: v for k, v in got.items() if k != "__url__"} == {
            k: v for k, v in want.items() if k != "__url__"
        }
        assert shard_index.read_member(loaded, i, "json") == want["json"]
        sizes = [tuple(s) for s in loaded.records[i].get("images", {}).values()]
        assert sizes == SIZES.get(want["__key__"], [])
    # Byte offsets: each record's span holds exactly its members, back to back, in file order.
    spans = [(r["offset"], r["offset"] + r["length"]) for r in loaded.records]
    assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    with open(shard, "rb") as f:
        for rec in loaded.records:
            for _name, (offset, size) in rec["members"].items():
                assert rec["offset"] < offset and offset + size <= rec["offset"] + rec["length"]
                f.seek(offset)
                assert len(f.read(size)) == size


def _corrupt_offset(path) -> None:
    raw = open(path, "rb").read()
    head, _, body = raw.partition(b"\n")
    body = body.replace(b'"offset":', b'"offset":1', 1)  # one changed digit in the body
    open(path, "wb").write(head + b"\n" + body)


def test_corrupt_or_stale_index_is_detected_and_rebuilt(shard):
    messages = []
    fresh = shard_index.load_or_build(shard, log=messages.append)
    place = shard_index.candidates(shard, None)[0]
    assert place.is_file() and not messages  # built silently the first time

    _corrupt_offset(place)
    with pytest.raises(shard_index.IndexInvalid, match="checksum"):
        shard_index.load(place, shard)
    rebuilt = shard_index.load_or_build(shard, log=messages.append)
    assert "rebuilding" in messages[-1] and rebuilt.records == fresh.records
    assert shard_index.load(place, shard).records == fresh.records  # the rebuilt index was written

    place.write_bytes(place.read_bytes()[:200])  # truncated
    with pytest.raises(shard_index.IndexInvalid):
        shard_index.load(place, shard)
    assert shard_index.load_or_build(shard, log=messages.append).records == fresh.records

    # The shard changes (one more record) after its index was written: the index describes another shard.
    records = list(wds.tarfile_to_samples()([{"url": shard}]))
    with wds.TarWriter(shard) as w:
        for r in records + [{**records[0], "__key__": "z"}]:
            w.write({k: v for k, v in r.items() if k != "__url__"})
    with pytest.raises(shard_index.IndexInvalid, match="another shard"):
        shard_index.load(place, shard)
    assert len(shard_index.load_or_build(shard, log=messages.append)) == len(fresh) + 1


def test_an_index_that_lies_about_its_shard_is_refused_at_the_first_read(shard, tiny_processor):
    """An index with a valid checksum and shard identity whose offsets point elsewhere (written by a buggy tool,
    or a shard edited in place without changing its size and ends) stops the run instead of feeding wrong bytes."""
    index = shard_index.build(shard)
    first, second = index.records[0], index.records[1]
    swapped = [dict(first, key=second["key"]), dict(second, key=first["key"]), *index.records[2:]]
    liar = shard_index.ShardIndex(index.path, swapped, index.shard)
    place = shard_index.write(liar, shard_index.candidates(shard, None)[0])
    assert shard_index.load(place, shard).records[0]["key"] == second["key"]  # passes the checks
    with pytest.raises(shard_index.IndexMismatch, match="rebuild"):
        shard_index.read_record(liar, 0)
    with pytest.raises(shard_index.IndexMismatch, match="rebuild"):
        shard_index.read_member(liar, 0, "json")
    proc = SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")
    stream = PackedRowStream([shard], proc, max_tokens=512, epochs=1)
    with pytest.raises(shard_index.IndexMismatch):
        list(stream)


def test_read_only_shards_get_their_index_in_the_cache(shard, tmp_path):
    folder = os.path.dirname(shard)
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anyway (root)")
        index = shard_index.load_or_build(shard, cache_dir=tmp_path / "cache")
        cached = shard_index.candidates(shard, tmp_path / "cache")[1]
        assert cached.is_file() and shard_index.load(cached, shard).records == index.records
    finally:
        os.chmod(folder, stat.S_IRWXU)


def test_remote_urls_are_refused_naming_the_key(tiny_processor):
    proc = SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")
    with pytest.raises(ValueError, match=r"data\.shards"):
        PackedRowStream(["pipe:curl -s https://x/shard.tar"], proc, max_tokens=512)
    with pytest.raises(DataError, match="no records"):
        PackedRowStream(["/nonexistent/shard.tar"], proc, max_tokens=512)


def test_cli_checks_builds_and_plans_rows_from_token_counts(shard, cache_dir, capsys):
    assert shard_index.main([shard, "--check"]) == 1  # missing
    processor_dir = str(cache_dir / "tiny_processor")
    assert shard_index.main([shard, "--processor", processor_dir, "--max-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "row plan at 256 tokens" in out
    assert shard_index.main([shard, "--check"]) == 0
    # The stored token counts are the ones processing the records gives.
    from data.processor import load_processor

    proc = SampleProcessor(
        load_processor(processor_dir), build("mrope"), max_tokens=1 << 20, layout="qwen2_5"
    )
    index = shard_index.load(shard_index.candidates(shard, None)[0], shard)
    for i, rec in enumerate(index.records):
        planned = rec["num_tokens"][proc.fingerprint]
        if rec["key"] == "textonly":
            assert planned == "missing_field"  # an empty message list
        else:
            assert planned == proc(shard_index.read_record(index, i)).num_tokens
    _corrupt_offset(shard_index.candidates(shard, None)[0])
    assert shard_index.main([shard, "--check"]) == 1
    assert "INVALID" in capsys.readouterr().out
