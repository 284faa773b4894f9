"""Your own small data set: the start says what the run trains on (sources, shards, readable records, slots,
epochs, the effective data settings, also in the log file), metrics carry `data/epoch`, and a slot count that
cannot fit the data is refused naming `data.num_slots` before the model is built."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import uneven_shards
from tests.integration.test_checkpoint import session

pytestmark = pytest.mark.slow


def _uneven_shards(synthetic_shards: list[str], folder, sizes=(3, 7, 10)) -> list[str]:
    return uneven_shards(synthetic_shards, folder, sizes)


def test_the_start_says_what_it_trains_on_and_metrics_carry_the_epoch(
    tmp_path, cache_dir, synthetic_shards, capsys
):
    shards = _uneven_shards(synthetic_shards, tmp_path)  # 20 records
    log_file = tmp_path / "train.log"  # as Hydra's job logging gives the run (<run>/hydra/train.log)
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        s = session(
            cache_dir,
            tmp_path,
            f"data.shards=[{','.join(shards)}]",
            "trainer.run_name=mine",
            "trainer.resume=never",
            "trainer.max_steps=4",
            "trainer.log_every=1",
            "trainer.save_every=100",
        )
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith(("data", "note: data.shards"))]
    text = "\n".join(said)
    assert f"data: 3 shards ({shards[0]} .. {shards[-1]}), 20 readable records" in text, out[-3000:]
    assert "4 slots (data.num_slots)" in text
    assert "this run: 8 rows" in text and " epochs (an epoch: every readable record once" in text
    assert "data settings (data=synthetic (the default group)): max_tokens 512" in text
    assert "note: data.shards without data=shards" in text  # the default group's small-data limits apply
    assert all(line in log_file.read_text() for line in said)

    s.trainer.train()
    s.metrics.close()
    logged = [json.loads(line) for line in (tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["data/epoch"] for r in logged]
    assert [r["step"] for r in logged] == list(range(1, 5))
    # epochs trained = samples over all ranks / the 20 readable records, from each step's own sample counts
    samples = [r["train/samples"] for r in logged]
    assert epochs == [round(sum(samples[: i + 1]) / 20, 2) for i in range(len(samples))], (epochs, samples)
    assert epochs[-1] > 2  # 8 rows of ~9 records: ~3.6 epochs


def test_a_slot_count_that_cannot_fit_the_data_is_refused_before_the_model(
    tmp_path, cache_dir, synthetic_shards, monkeypatch
):
    import mmrope.train.run as run

    built = []
    real_build_model = run.build_model
    monkeypatch.setattr(run, "build_model", lambda *a, **k: built.append(1) or real_build_model(*a, **k))
    shards = _uneven_shards(synthetic_shards, tmp_path)  # 20 records: slots would get none
    with pytest.raises(ValueError, match=r"config key `data\.num_slots`: 64 slots.*20 readable records"):
        session(
            cache_dir,
            tmp_path,
            f"data.shards=[{','.join(shards)}]",
            "data.num_slots=64",
            "trainer.run_name=refused",
            "trainer.resume=never",
        )
    assert not built, "the model was built before the refusal"
