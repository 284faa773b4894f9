"""Skipped records are visible while training: a console line at each log step whose counts changed (with the
shards they came from), the counters in metrics.jsonl, and an abort above data.max_skip_fraction that names the
shards and the reasons."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from tests.integration.test_checkpoint import session

pytestmark = pytest.mark.slow


def _zoo(path) -> str:
    """A shard of records that cannot train: 6 with a broken image, 6 without an answer."""
    image_q = [
        {"role": "user", "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "x"},
    ]
    with wds.TarWriter(str(path)) as w:
        for i in range(6):
            w.write(
                {"__key__": f"img{i}", "json": json.dumps({"messages": image_q}).encode(), "img0.png": b"no"}
            )
            no_answer = [{"role": "user", "content": "hello"}]
            w.write({"__key__": f"txt{i}", "json": json.dumps({"messages": no_answer}).encode()})
    return str(path)


def test_skips_are_printed_logged_and_abort_naming_shards(tmp_path, cache_dir, synthetic_shards, capsys):
    zoo = _zoo(tmp_path / "zoo.tar")
    shards = f"data.shards=[{zoo},{','.join(synthetic_shards)}]"
    s = session(
        cache_dir,
        tmp_path,
        shards,
        "trainer.run_name=skips",
        "trainer.resume=never",
        "trainer.max_steps=3",
        "trainer.log_every=1",
        "trainer.save_every=100",
        "data.max_skip_fraction=1.0",
    )
    s.trainer.train()
    s.metrics.close()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "record(s) skipped" in line]
    assert lines, out[-2000:]
    assert "zoo.tar" in lines[0] and ("bad_image" in lines[0] or "no_labels" in lines[0])
    logged = [json.loads(line) for line in (tmp_path / "skips" / "metrics.jsonl").read_text().splitlines()]
    last = logged[-1]
    total = last.get("data/skipped/bad_image", 0) + last.get("data/skipped/no_labels", 0)
    assert total > 0 and last["data/records"] >= total
    # One line per log step whose counts changed, never a repeated one.
    assert len(lines) == len({line.split(";")[1] for line in lines})

    # Above data.max_skip_fraction the run stops, naming the shard and the reasons.
    s = session(
        cache_dir,
        tmp_path,
        shards,
        "trainer.run_name=abort",
        "trainer.resume=never",
        "trainer.max_steps=60",
        "data.max_skip_fraction=0.01",
    )
    with pytest.raises(RuntimeError, match=r"max_skip_fraction=0\.01") as e:
        s.trainer.train()
    s.metrics.close()
    assert "zoo.tar (" in str(e.value) and "bad_image" in str(e.value) and "no_labels" in str(e.value)
