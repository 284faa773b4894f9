"""Loader: exact and elastic resume over virtual slots, exactly-once epoch coverage over ranks x workers,
mixtures, counted bad input, and a resume whose cost does not depend on shard size."""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from data import index as shard_index
from data.loader import PackedRowStream, ResumableLoader, merge_states
from data.processing import SampleProcessor
from mmrope.encodings import build
from mmrope.train.config import DataConfig
from tests.conftest import uneven_shards


@pytest.fixture()
def proc(tiny_processor):
    return SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5", pixels="uint8")


def _stream(proc, shards, **kw) -> PackedRowStream:
    kw = {"max_tokens": 512, "num_open_rows": 4, "seed": 3, **kw}
    return PackedRowStream(shards, proc, **kw)


def _same_row(a: dict, b: dict) -> bool:
    return (
        a["sample_keys"] == b["sample_keys"]
        and torch.equal(a["input_ids"], b["input_ids"])
        and torch.equal(a.get("pixel_values", torch.zeros(0)), b.get("pixel_values", torch.zeros(0)))
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_continues_the_same_rows(proc, synthetic_shards, num_workers):
    reference = ResumableLoader(_stream(proc, synthetic_shards, num_slots=2), num_workers)
    expected = [next(reference)]
    while sum(r["epoch"] == 1 for r in expected) < 3:  # run into the second epoch
        expected.append(next(reference))
    total, cut = len(expected), sum(r["epoch"] == 0 for r in expected) // 2  # cut mid-epoch
    cut -= cut % 2  # a step boundary: every slot made its rows

    first = ResumableLoader(_stream(proc, synthetic_shards, num_slots=2), num_workers)
    head = [next(first) for _ in range(cut)]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # what a checkpoint stores
    assert sorted(state["slots"]) == [0, 1], "the state holds the position of every slot"
    resumed = ResumableLoader(_stream(proc, synthetic_shards, num_slots=2), num_workers, state=state)
    tail = [next(resumed) for _ in range(total - cut)]

    assert [r["global_row"] for r in head + tail] == list(range(total))
    assert all(_same_row(a, b) for a, b in zip(head + tail, expected, strict=True))


def _rank_rows(proc, shards, world: int, workers: int, num_rows: int, state=None) -> tuple[dict, list[dict]]:
    """Each rank takes `num_rows // world` rows (one "step" of num_rows global rows); returns {global row:
    keys} and the ranks' states."""
    rows, states = {}, []
    for rank in range(world):
        stream = _stream(proc, shards, rank=rank, world_size=world, num_slots=4)
        loader = ResumableLoader(stream, workers, state=state)
        for _ in range(num_rows // world):
            row = next(loader)
            rows[row["global_row"]] = (row["sample_keys"], row["input_ids"])
        states.append(pickle.loads(pickle.dumps(loader.state_dict())))
    return rows, states


def test_elastic_resume_gives_the_same_global_rows_on_any_world_size_and_worker_count(proc, synthetic_shards):
    # Reference: one rank, no workers, 16 global rows.
    reference, _ = _rank_rows(proc, synthetic_shards, world=1, workers=0, num_rows=16)
    assert sorted(reference) == list(range(16))
    # 2 ranks x 2 workers for 8 rows, then resumed on 1 rank x 4 workers for 8 more.
    head, states = _rank_rows(proc, synthetic_shards, world=2, workers=2, num_rows=8)
    state = merge_states(states)
    tail, states = _rank_rows(proc, synthetic_shards, world=1, workers=4, num_rows=8, state=state)
    # ... and back to 4 ranks x 1 worker (a state merged from one rank is complete too).
    more, _ = _rank_rows(proc, synthetic_shards, world=4, workers=1, num_rows=4, state=merge_states(states))
    full, _ = _rank_rows(proc, synthetic_shards, world=1, workers=0, num_rows=20)
    got = {**head, **tail, **more}
    assert sorted(got) == list(range(20))
    for g in range(20):
        assert got[g][0] == full[g][0] and torch.equal(got[g][1], full[g][1]), f"global row {g}"
    # The reference's rows did not depend on the split either.
    assert all(reference[g][0] == full[g][0] for g in range(16))


def test_slots_that_do_not_divide_are_refused_naming_the_key(proc, synthetic_shards):
    with pytest.raises(ValueError, match=r"data\.num_slots"):
        ResumableLoader(_stream(proc, synthetic_shards, num_slots=4, world_size=3), 0)
    with pytest.raises(ValueError, match=r"data\.num_slots"):
        ResumableLoader(_stream(proc, synthetic_shards, num_slots=4), 3)
    # Rank states of different steps (rank 0 three rows ahead of rank 1) are not one position.
    ranks = [
        ResumableLoader(_stream(proc, synthetic_shards, num_slots=4, rank=r, world_size=2), 0) for r in (0, 1)
    ]
    for loader, num_rows in zip(ranks, (3, 1)):
        for _ in range(num_rows):
            next(loader)
    with pytest.raises(ValueError, match="not of the same step"):
        merge_states([loader.state_dict() for loader in ranks])
    # A rank's own state resumes that rank on the same world size only: its slots are checked.
    next(ranks[1])
    next(ranks[1])  # now both ranks made 3 rows: a step boundary
    own = ranks[1].state_dict()
    assert own["consumed"] == 6 and set(own["slots"]) == {1, 3}
    ResumableLoader(_stream(proc, synthetic_shards, num_slots=4, rank=1, world_size=2), 0, state=own)
    with pytest.raises(ValueError, match="merged from every rank"):
        ResumableLoader(_stream(proc, synthetic_shards, num_slots=4), 0, state=own)
    with pytest.raises(ValueError, match=r"data\.num_slots"):
        ResumableLoader(_stream(proc, synthetic_shards, num_slots=2), 0, state=own)


def _keys(shards: list[str]) -> Counter:
    return Counter(r["__key__"] for url in shards for r in wds.tarfile_to_samples()([{"url": url}]))


@pytest.mark.parametrize("split_shards,num_slots", [(True, None), (False, None), (False, 8)])
def test_one_epoch_over_2_ranks_x_2_workers_covers_every_sample_once(
    proc, synthetic_shards, split_shards, num_slots, tmp_path
):
    shards = synthetic_shards
    if split_shards:  # 4 shards for 4 slots (shard dealing); otherwise 2 shards (record striding)
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
        stream = _stream(proc, shards, rank=rank, world_size=2, epochs=1, num_slots=num_slots)
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
    expected = ResumableLoader(_stream(proc, None, mixture=mixture, num_slots=2), 0)
    expected_rows = [next(expected)["sample_keys"] for _ in range(10)]
    first = ResumableLoader(_stream(proc, None, mixture=mixture, num_slots=2), 0)
    got = [next(first)["sample_keys"] for _ in range(4)]
    resumed = ResumableLoader(_stream(proc, None, mixture=mixture, num_slots=2), 2, state=first.state_dict())
    got += [next(resumed)["sample_keys"] for _ in range(6)]
    assert got == expected_rows


def test_rows_planned_from_the_json_equal_rows_planned_from_index_token_counts(
    proc, synthetic_shards, tmp_path
):
    """An index without this processor's token counts (e.g. written by data.convert without --processor): the
    loader plans from each record's JSON member and the index's media sizes, and packs the same rows."""
    plain = []
    for url in synthetic_shards:
        copy = tmp_path / url.split("/")[-1]
        copy.write_bytes(open(url, "rb").read())
        shard_index.write(shard_index.build(str(copy)), shard_index.candidates(str(copy), None)[0])
        plain.append(str(copy))
    shard_index.IO.clear()
    a = ResumableLoader(_stream(proc, plain, num_slots=2), 0)
    rows_a = [next(a) for _ in range(6)]
    assert shard_index.IO["members_read"] > 0, "planning did not read the JSON members"
    b = ResumableLoader(_stream(proc, synthetic_shards, num_slots=2), 0)  # indexes with token counts
    rows_b = [next(b) for _ in range(6)]
    assert [r["sample_keys"] for r in rows_a] == [r["sample_keys"] for r in rows_b]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(rows_a, rows_b))


def _png(w: int, h: int, seed: int = 9) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((w, h), 64).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _shard(path, num_records: int, image_px: int) -> str:
    with wds.TarWriter(str(path)) as w:
        for i in range(num_records):
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "?"}],
                },
                {"role": "assistant", "content": f"answer {i}"},
            ]
            w.write(
                {
                    "__key__": f"{i:06d}",
                    "json": json.dumps({"messages": messages}).encode(),
                    "img0.png": _png(image_px, image_px),
                }
            )
    return str(path)


def test_resume_cost_does_not_grow_with_the_shard(proc, tmp_path):
    """Resuming deep into a shard reads nothing to restore the buffer and the packer (references with their
    planned token counts), and then only the records of the rows it makes: the same for a shard 10x larger."""
    cost = {}
    for num_records in (60, 600):
        shard = _shard(tmp_path / f"s{num_records}.tar", num_records, 56)
        first = ResumableLoader(_stream(proc, [shard], num_slots=1), 0)
        while True:  # go deep: past 80% of the shard
            row = next(first)
            if first.states[0]["cursors"][0][1] > 0.8 * num_records:
                break
        state = pickle.loads(pickle.dumps(first.state_dict()))
        shard_index.IO.clear()
        resumed = ResumableLoader(_stream(proc, [shard], num_slots=1), 0, state=state)
        restored = shard_index.IO["bytes_read"] + shard_index.IO["members_read"]
        row = next(resumed)
        cost[num_records] = (restored, shard_index.IO["records_read"], row["num_samples"])
    assert cost[60][0] == cost[600][0] == 0, cost  # constructing the resumed loader read no record
    # The first resumed row reads its own records (plus planning reads of nothing: counts are in the index).
    for _restored, records_read, num_samples in cost.values():
        assert records_read == num_samples, cost


def test_every_bad_input_is_a_counted_reason_and_eval_raises(proc, synthetic_shards, tmp_path):
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
    by_shard: dict = {}
    for r in rows:
        skipped.update(r["skipped"])
        for url, reasons in r["skipped_shards"].items():
            by_shard.setdefault(url, Counter()).update(reasons)
    expected = Counter(reason for _, reason in bad)
    assert {k: skipped[k] for k in expected} == dict(expected)
    assert skipped["bad_shard"] == 1 and rows  # the truncated shard's good head still trains
    assert by_shard == {str(zoo): expected, str(truncated): Counter(bad_shard=1)}
    assert sum(r["records"] for r in rows) == sum(r["num_samples"] for r in rows) + sum(expected.values())

    with pytest.raises(Exception, match="|".join(expected)):
        list(_stream(proc, [str(zoo)], for_eval=True))
    # a source whose every shard is unreadable stops with an error instead of spinning forever
    with pytest.raises(Exception, match="no records could be read"):
        next(iter(_stream(proc, [str(tmp_path / "missing.tar")])))


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"mixture": [{"shards": [], "weight": 1.0}]}, "data.mixture[0]"),
        ({"mixture": [{"shards": ["/a.tar"], "weight": 0}]}, "data.mixture[0].weight"),
        ({"mixture": [{"shards": ["/a.tar"], "weight": 1}], "shards": ["/b.tar"]}, "data.mixture"),
        ({"source": "shards"}, "data.shards"),
        ({"num_slots": 6, "num_workers": 4}, "data.num_slots"),
        ({"fps": 0}, "data.video.fps"),
    ],
)
def test_data_config_errors_name_their_key(kw, key):
    from data.video import VideoSampling
    from mmrope.train.config import DataConfig

    build_config = VideoSampling if "fps" in kw else DataConfig
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        build_config(**kw)


def test_a_handed_out_row_is_not_kept_alive_by_the_stream(proc, synthetic_shards):
    """A worker keeps every slot's generator suspended; none may pin the row it last yielded (with 16 slots per
    worker and ~100 MB rows, that was gigabytes)."""
    import gc
    import weakref

    loader = ResumableLoader(_stream(proc, synthetic_shards, num_slots=4), 0)
    refs = []
    for _ in range(8):  # two rows of every slot
        row = next(loader)
        refs.append(weakref.ref(row["input_ids"]))
        del row
    gc.collect()
    assert all(r() is None for r in refs)


def _uneven_shards(synthetic_shards: list[str], folder, sizes=(7, 19, 30)) -> list[str]:
    """Shards of uneven sizes cut from the synthetic set."""
    return uneven_shards(synthetic_shards, folder, sizes)


def _by_epoch(rows: list[dict]) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for row in rows:
        assert len(set(row["sample_keys"])) == row["num_samples"], (
            f"a row repeats a record: {row['sample_keys']}"
        )
        for key, epoch in zip(row["sample_keys"], row["sample_epochs"], strict=True):
            out.setdefault(epoch, Counter())[key] += 1
    return out


@pytest.mark.parametrize("vit_balance", [None, DataConfig().vit_balance])  # off, and the default
def test_every_epoch_is_every_record_once_over_ranks_workers_slots_a_resume_and_an_elastic_resume(
    proc, synthetic_shards, tmp_path, vit_balance
):
    """72 records in shards of 11, 24 and 37; 4 slots of 18 records per epoch, 2 open rows each. 2 ranks x 2
    workers read 3 steps of 4 rows, resume exactly (each rank its own state) for 3 more, then continue on 1 rank
    x 4 workers (the merged state) for 3 more: the rows are those of an uninterrupted single reader, and every
    epoch holds each record at most once, the completed ones every record exactly once. Also with the packer's
    ViT balance (data.vit_balance), whose visual counts travel in the slot states."""
    shards = _uneven_shards(synthetic_shards, tmp_path, sizes=(11, 24, 37))
    keys = _keys(shards)

    def read(world: int, workers: int, steps: int, states: list | None) -> tuple[dict, list]:
        rows, out = {}, []
        for rank in range(world):
            stream = _stream(
                proc,
                shards,
                rank=rank,
                world_size=world,
                num_slots=4,
                num_open_rows=2,
                vit_balance=vit_balance,
            )
            loader = ResumableLoader(stream, workers, state=states[rank] if states else None)
            for _ in range(steps * 4 // world):
                row = next(loader)
                rows[row["global_row"]] = row
            out.append(pickle.loads(pickle.dumps(loader.state_dict())))
        return rows, out

    head, states = read(2, 2, 3, None)
    middle, states = read(2, 2, 3, states)  # exact resume: each rank its own state
    tail, _ = read(1, 4, 3, [merge_states(states)])  # elastic: 2 ranks -> 1, 2 -> 4 workers
    got = {**head, **middle, **tail}
    assert sorted(got) == list(range(36))
    reference = ResumableLoader(
        _stream(proc, shards, num_slots=4, num_open_rows=2, vit_balance=vit_balance), 0
    )
    for g in range(36):
        assert got[g]["sample_keys"] == next(reference)["sample_keys"], f"global row {g}"

    epochs = _by_epoch([got[g] for g in range(36)])
    assert len(epochs) >= 3, f"the rows should cover two epochs and start a third: {sorted(epochs)}"
    for e, seen in epochs.items():
        assert max(seen.values()) == 1, f"epoch {e} repeats {[k for k, n in seen.items() if n > 1]}"
        assert set(seen) <= set(keys)
    assert epochs[0] == keys and epochs[1] == keys  # every record exactly once per completed epoch
    assert [k for e in sorted(epochs) for k in epochs[e]] != list(keys) * len(epochs)  # reshuffled


def test_rows_never_repeat_a_record_with_fewer_records_per_slot_than_a_row(proc, synthetic_shards, tmp_path):
    """42 records on 4 slots (the README journey's shape): ~10 records per slot and epoch, rows of more than
    that. Rows span epochs, never holding a record twice, and epochs stay exact (each slot's share dealt from
    one permutation per epoch)."""
    shards = _uneven_shards(synthetic_shards, tmp_path, sizes=(42,))
    loader = ResumableLoader(_stream(proc, shards, num_slots=4, max_tokens=1024), 0)
    rows = [next(loader) for _ in range(16)]
    assert max(r["num_samples"] for r in rows) > 42 // 4, "rows must be larger than a slot's share"
    epochs = _by_epoch(rows)  # asserts: no row repeats a record
    assert epochs[0] == _keys(shards)
    assert all(max(seen.values()) == 1 for seen in epochs.values())


def test_num_slots_fits_the_data_or_is_refused_naming_the_key(proc, synthetic_shards, tmp_path):
    shards = _uneven_shards(synthetic_shards, tmp_path)  # 56 records
    stream = _stream(proc, shards, world_size=2)
    with pytest.raises(ValueError, match=r"data\.num_slots.*64 slots.*56 readable records"):
        stream.fit_slots(64, num_workers=2)
    with pytest.raises(ValueError, match=r"data\.num_slots"):
        stream.fit_slots(6, num_workers=4)  # does not divide over 2 x 4 consumers
    # auto: consumers x 2^k, every slot a row's worth of records per epoch
    per_row = stream.estimate_rows()
    slots = stream.fit_slots("auto", num_workers=2)
    assert slots % 4 == 0 and (slots == 4 or 56 / slots >= per_row), (slots, per_row)
    # fewer records than consumers: auto cannot give every consumer a slot
    tiny = _stream(proc, _uneven_shards(synthetic_shards, tmp_path / "..", sizes=(3,)), world_size=2)
    with pytest.raises(ValueError, match=r"data\.num_slots.*data\.num_workers"):
        tiny.fit_slots("auto", num_workers=2)
