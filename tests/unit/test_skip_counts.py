"""Skipped records are counted as records, not as encounters: one over-long record of 56, met in each of 6 epochs,
is "1 of 56 records", not "6 of 336" (the loader's rows carry the skipped records' identities, data/loader.py;
the data stats keep the set, mmrope/train/data_stats.py)."""

from __future__ import annotations

import json

import webdataset as wds

from data.loader import PackedRowStream
from data.processing import SampleProcessor
from mmrope.encodings import build
from mmrope.train.data_stats import DataStats

NUM_RECORDS, EPOCHS, TOO_LONG = 56, 6, 17


def test_a_record_skipped_in_every_epoch_counts_once(tmp_path, tiny_processor, capsys):
    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(NUM_RECORDS):
            question = "word " * 600 if i == TOO_LONG else f"what is {i} plus 1?"
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": str(i + 1)}]
            w.write(
                {"__key__": f"{i:06d}", "json": json.dumps({"messages": messages, "id": f"r{i}"}).encode()}
            )
    processor = SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")
    stream = PackedRowStream(
        [str(shard)], processor, max_tokens=512, epochs=EPOCHS, index_cache_dir=str(tmp_path)
    )
    rows = list(stream)

    data_stats = DataStats(num_readable=sum(stream.lengths.values()))
    data_stats.account(rows)
    stats = data_stats.skip_report(0, print)

    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("data: ")]
    assert line.startswith(
        f"data: 1 more record(s) skipped by step 0; 1 of {NUM_RECORDS} records (1.79%) so far "
        f"({EPOCHS} skips in {EPOCHS * NUM_RECORDS} records read: epochs meet them again): {{'too_long': 1}}; "
        f"{shard} (too_long {EPOCHS})"
    ), line
    assert stats == {"data/records": EPOCHS * NUM_RECORDS, "data/skips": EPOCHS, "data/skipped/too_long": 1}
    assert data_stats.skipped_records == {f"{shard}#{TOO_LONG}": "too_long"}
    assert (
        data_stats.skip_report(0, print) == stats and not capsys.readouterr().out
    )  # nothing new: no second line


def test_the_stats_resume_from_their_state(tmp_path):
    """state_dict() holds the keys of a checkpoint's rank_N.pt; a loaded copy reports the same and goes on."""
    rows = [
        {
            "records": 9,
            "skipped": {"too_long": 1},
            "skipped_shards": {"a.tar": {"too_long": 1}},
            "skipped_records": {"a.tar#3": "too_long"},
            "sample_epochs": [1, 2],
            "sample_sources": [0, 0],
        }
    ]
    before = DataStats(num_readable=9)
    before.account(rows)
    state = before.state_dict()
    assert set(state) == {"records", "skipped", "skipped_shards", "skipped_records", "samples"}
    after = DataStats(num_readable=9)
    after.load_state_dict(state)
    assert after.state_dict() == state
    lines = []
    assert after.skip_report(5, lines.append) == before.skip_report(5, lambda _: None)
    assert not lines  # the resumed record was reported before the checkpoint: no new line
    after.account(rows)  # one more step: 4 samples of a 3-record source
    after.source_records = [3]
    assert after.epoch_report() == {"data/epoch": round(4 / 3, 2)} and after.last_epoch == round(4 / 3, 2)
    empty = DataStats()
    empty.load_state_dict({})  # a checkpoint that predates the keys
    assert empty.state_dict()["records"] == 0 and empty.last_epoch is None and empty.epoch_report() == {}


def test_epochs_are_samples_trained_per_readable_record_and_a_sp_group_counts_once():
    """4 rows of 3 samples each from a 2-source mixture (sources of 4 and 2 records): the first source is trained
    on 8 times out of 4 records (2 epochs), the second 4 times out of 2 (2 epochs); a sequence-parallel group of
    2 ranks whose ranks both account the same rows (one process here: the counts doubled) reports the same."""
    rows = [{"sample_sources": [0, 0, 1], "records": 3} for _ in range(4)]
    solo = DataStats(per_source_epochs=True)
    solo.account(rows)
    solo.source_records = [4, 2]
    assert solo.epoch_report() == {"data/epoch": 2.0, "data/epoch/0": 2.0, "data/epoch/1": 2.0}
    group = DataStats(per_source_epochs=True, sp_size=2)
    group.account(rows + rows)  # both ranks' view of the same rows
    group.source_records = [4, 2]
    assert group.epoch_report() == solo.epoch_report()
    assert group.skip_report(1, print)["data/records"] == solo.skip_report(1, print)["data/records"] == 12
