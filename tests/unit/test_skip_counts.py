"""Skipped records are counted as records, not as encounters: one over-long record of 56, met in each of 6 epochs,
is "1 of 56 records", not "6 of 336" (the loader's rows carry the skipped records' identities, data/loader.py;
the trainer keeps the set, mmrope/train/loop.py)."""

from __future__ import annotations

import json

import torch
import webdataset as wds

from data.loader import PackedRowStream
from data.processing import SampleProcessor
from mmrope.encodings import build
from mmrope.train.config import TrainConfig
from mmrope.train.engine import Dist
from mmrope.train.loop import Trainer
from mmrope.train.metrics import Metrics

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

    cfg = TrainConfig()
    cfg.trainer.wandb.mode = "disabled"
    metrics = Metrics(cfg, tmp_path / "run", enabled=True, start_step=0, flat_config={})
    trainer = Trainer(cfg, Dist(0, 1, 0, torch.device("cpu")), None, iter(()), None, metrics, {})
    trainer.num_readable = sum(stream.lengths.values())
    trainer._account(rows)
    stats = trainer._skip_report()
    metrics.close()

    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("data: ")]
    assert line.startswith(
        f"data: 1 more record(s) skipped by step 0; 1 of {NUM_RECORDS} records (1.79%) so far "
        f"({EPOCHS} skips in {EPOCHS * NUM_RECORDS} records read: epochs meet them again): {{'too_long': 1}}; "
        f"{shard} (too_long {EPOCHS})"
    ), line
    assert stats == {"data/records": EPOCHS * NUM_RECORDS, "data/skips": EPOCHS, "data/skipped/too_long": 1}
    assert trainer.skipped_records == {f"{shard}#{TOO_LONG}": "too_long"}
    assert trainer._skip_report() == stats and not capsys.readouterr().out  # nothing new: no second line
