"""Loader: exact resume from a saved state, exactly-once epoch coverage over ranks x workers, mixtures."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch
import webdataset as wds

from data.loader import PackedRowStream, ResumableLoader
from data.processing import SampleProcessor
from mmrope.encodings import build


@pytest.fixture()
def proc(tiny_processor):
    return SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")


def _stream(proc, shards, **kw) -> PackedRowStream:
    kw = {"max_tokens": 512, "shuffle_buffer": 16, "num_open_rows": 4, "seed": 3, **kw}
    return PackedRowStream(shards, proc, **kw)


def _same_row(a: dict, b: dict) -> bool:
    return a["sample_keys"] == b["sample_keys"] and torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_continues_the_same_rows(proc, synthetic_shards, num_workers):
    reference = ResumableLoader(_stream(proc, synthetic_shards), num_workers)
    expected = [next(reference)]
    while sum(r["epoch"] == 1 for r in expected) < 3:  # run into the second epoch
        expected.append(next(reference))
    total, cut = len(expected), sum(r["epoch"] == 0 for r in expected) // 2  # cut mid-epoch

    first = ResumableLoader(_stream(proc, synthetic_shards), num_workers)
    head = [next(first) for _ in range(cut)]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["workers"], "the state names the position of every worker that produced a row"
    resumed = ResumableLoader(_stream(proc, synthetic_shards), num_workers, state=state)
    tail = [next(resumed) for _ in range(total - cut)]

    assert all(_same_row(a, b) for a, b in zip(head + tail, expected, strict=True))


def test_resume_refuses_a_different_worker_count(proc, synthetic_shards):
    loader = ResumableLoader(_stream(proc, synthetic_shards), 0)
    next(loader)
    with pytest.raises(ValueError, match="data.num_workers"):
        ResumableLoader(_stream(proc, synthetic_shards), 2, state=loader.state_dict())


def _keys(shards: list[str]) -> Counter:
    return Counter(r["__key__"] for url in shards for r in wds.tarfile_to_samples()([{"url": url}]))


@pytest.mark.parametrize("split_shards", [True, False])
def test_one_epoch_over_2_ranks_x_2_workers_covers_every_sample_once(
    proc, synthetic_shards, split_shards, tmp_path
):
    shards = synthetic_shards
    if split_shards:  # 4 shards for 4 consumers (shard dealing); otherwise 2 shards (record striding)
        shards = []
        for i, url in enumerate(synthetic_shards):
            records = list(wds.tarfile_to_samples()([{"url": url}]))
            for j, part in enumerate((records[::2], records[1::2])):
                path = tmp_path / f"s{i}{j}.tar"
                with wds.TarWriter(str(path)) as w:
                    for r in part:
                        w.write({k: v for k, v in r.items() if k != "__url__"})
                shards.append(str(path))
    seen: Counter = Counter()
    records = 0
    for rank in range(2):
        stream = _stream(proc, shards, rank=rank, world_size=2, epochs=1)
        for row in ResumableLoader(stream, 2):
            seen.update(row["sample_keys"])
            records += row["records"]
            assert not row["skipped"]
    assert seen == _keys(shards)  # every key exactly once (synthetic samples are all valid)
    assert records == sum(seen.values())


def test_mixture_is_deterministic_and_follows_the_weights(proc, synthetic_shards):
    mixture = [([synthetic_shards[0]], 0.8), ([synthetic_shards[1]], 0.2)]

    def keys(seed: int) -> list[str]:
        loader = ResumableLoader(_stream(proc, None, mixture=mixture, seed=seed), 0)
        return [k for _ in range(8) for k in next(loader)["sample_keys"]]

    a, b = keys(1), keys(1)
    assert a == b and a != keys(2)
    first = set(_keys([synthetic_shards[0]]))
    share = sum(k in first for k in a) / len(a)
    assert 0.65 < share < 0.95, share


def test_mixture_resume_is_exact(proc, synthetic_shards):
    mixture = [([synthetic_shards[0]], 0.5), ([synthetic_shards[1]], 0.5)]
    expected = ResumableLoader(_stream(proc, None, mixture=mixture), 0)
    expected_rows = [next(expected)["sample_keys"] for _ in range(9)]
    first = ResumableLoader(_stream(proc, None, mixture=mixture), 0)
    got = [next(first)["sample_keys"] for _ in range(4)]
    resumed = ResumableLoader(_stream(proc, None, mixture=mixture), 0, state=first.state_dict())
    got += [next(resumed)["sample_keys"] for _ in range(5)]
    assert got == expected_rows


def _png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_bad_input_is_a_counted_reason_and_eval_raises(proc, synthetic_shards, tmp_path):
    import json

    def rec(key, messages, **members):
        return {"__key__": key, "json": json.dumps({"messages": messages}).encode(), **members}

    img_q = [
        {"role": "user", "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "x"},
    ]
    bad = [
        ({"__key__": "nojson", "img0.png": _png(56, 56)}, "missing_field"),
        ({"__key__": "badjson", "json": b"{oops"}, "bad_json"),
        (rec("undecodable", img_q, **{"img0.png": b"\x89PNG\r\n garbage"}), "bad_image"),
        (rec("degenerate", img_q, **{"img0.png": _png(1, 1000)}), "bad_image"),
        (rec("noimage", img_q), "missing_field"),
        (
            rec("parts", [{"role": "user", "content": ["str part"]}, {"role": "assistant", "content": "x"}]),
            "bad_structure",
        ),
        (
            rec(
                "grid", [{"role": "user", "content": "<|image_pad|>"}, {"role": "assistant", "content": "x"}]
            ),
            "token_grid_mismatch",
        ),
        (
            rec("long", [{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "x"}]),
            "too_long",
        ),
        (rec("nolabel", [{"role": "user", "content": "hi"}]), "no_labels"),
    ]
    zoo = tmp_path / "zoo.tar"
    with wds.TarWriter(str(zoo)) as w:
        for r, _ in bad:
            w.write(r)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(open(synthetic_shards[0], "rb").read()[:20_000])
    rows = list(ResumableLoader(_stream(proc, [str(zoo), str(truncated)], epochs=1), 0))
    skipped: Counter = Counter()
    for r in rows:
        skipped.update(r["skipped"])
    expected = Counter(reason for _, reason in bad)
    assert {k: skipped[k] for k in expected} == dict(expected)
    assert skipped["bad_shard"] >= 1 and rows  # the truncated shard's good head still trains
    assert sum(r["records"] for r in rows) == sum(r["num_samples"] for r in rows) + sum(expected.values())

    with pytest.raises(Exception, match="missing_field|bad_json|bad_image"):
        list(_stream(proc, [str(zoo)], for_eval=True))
    # a consumer whose every shard is unreadable stops with an error instead of spinning forever
    with pytest.raises(Exception, match="no records could be read"):
        next(iter(_stream(proc, [str(tmp_path / "missing.tar")])))


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"mixture": [{"shards": [], "weight": 1.0}]}, "data.mixture[0]"),
        ({"mixture": [{"shards": ["/a.tar"], "weight": 0}]}, "data.mixture[0].weight"),
        ({"mixture": [{"shards": ["/a.tar"], "weight": 1}], "shards": ["/b.tar"]}, "data.mixture"),
    ],
)
def test_mixture_config_errors_name_their_key(kw, key):
    from mmrope.train.config import DataConfig

    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        DataConfig(**kw)
