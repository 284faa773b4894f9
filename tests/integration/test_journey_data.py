"""The README journey ("Your data, end to end") on the data sets a new user brings that the 48-record journey
does not cover: one converted into several shards, and one with fewer records than the slot count.

The README's own convert command (plus the converter's shard-size option), then the train command the
converter prints (several shards) or the README's (few records), each trained for 2 steps in this process with
the same overrides (Hydra parses them the same way as `train.py`; only test plumbing is added: the session's
cache, an output folder, wandb off). Every row the steps train on is checked: no record twice in a row, every
epoch's records once.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections import Counter
from pathlib import Path

import pytest

import mmrope.train.run as run
from data import convert
from tests.integration.test_journey import write_llava_data
from tests.integration.test_loss_config import compose_cfg
from tests.readme import marked_block, shell_commands

pytestmark = pytest.mark.slow

STEPS = 2


def journey() -> tuple[list[str], list[str]]:
    convert_argv, train_argv, *_ = shell_commands(marked_block("journey:commands"))
    return convert_argv, train_argv


def plumbing(cache_dir: Path, out: Path) -> list[str]:
    """What a test adds to a user's command: the session's cache, its own output folder, wandb off, 2 steps."""
    return [
        f"data.cache_dir={cache_dir}",
        f"trainer.output_dir={out}",
        "trainer.wandb.mode=disabled",
        f"trainer.max_steps={STEPS}",
    ]


def run_convert(argv: list[str], *extra: str, capsys) -> str:
    assert argv[:3] == ["python", "-m", "data.convert"]
    convert.main([*argv[3:], *extra, "--quiet"])
    return capsys.readouterr().out


def train_rows(overrides: list[str]) -> list[dict]:
    """STEPS optimizer steps of the run these overrides make; the rows each step trained on, in order."""
    s = run.build_session(compose_cfg(overrides))
    rows = []
    try:
        for _ in range(STEPS):
            loss, _ = s.trainer.train_step()
            s.trainer.step += 1
            assert loss == loss and loss > 0
            rows += s.trainer._step_composition["rows"]
    finally:
        s.metrics.close()
    return rows


def assert_epochs_exact(rows: list[dict], keys: set[str]) -> Counter:
    """No record twice in a row; no record twice in an epoch over all rows; every record one of the data set's.
    Returns how many samples each epoch contributed."""
    per_epoch: dict[int, list[str]] = {}
    for row in rows:
        assert len(row["sample_keys"]) == len(set(row["sample_keys"])), row["sample_keys"]
        for key, epoch in zip(row["sample_keys"], row["sample_epochs"]):
            per_epoch.setdefault(epoch, []).append(key)
    for epoch, seen in per_epoch.items():
        assert len(seen) == len(set(seen)), f"epoch {epoch}: {Counter(seen).most_common(3)}"
        assert set(seen) <= keys
    return Counter({e: len(seen) for e, seen in per_epoch.items()})


def converted_keys(shards_dir: Path) -> set[str]:
    """The record keys in the converter's shards (index.json lists them)."""
    import webdataset as wds

    names = [shard["name"] for shard in json.loads((shards_dir / "index.json").read_text())["shards"]]
    return {
        r["__key__"] for name in names for r in wds.tarfile_to_samples()([{"url": str(shards_dir / name)}])
    }


def test_several_shards_train_as_the_converter_prints(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_llava_data(tmp_path)  # 48 records, 1 with a missing image
    convert_argv, _ = journey()

    out = run_convert(convert_argv, "--max-shard-samples", "16", capsys=capsys)
    assert "47 samples in 3 shard(s)" in out, out
    (printed,) = [
        line.removeprefix("train on them: ") for line in out.splitlines() if "train on them" in line
    ]
    # The quoted brace form the README recommends, naming every shard the converter wrote.
    assert printed == (
        "python train.py data=shards 'data.shards=[\"my_data/shards/shard-{000000..000002}.tar\"]'"
    ), printed
    written = sorted(p.name for p in (tmp_path / "my_data" / "shards").glob("shard-*.tar"))
    first, last = re.search(r"\{(\d+)\.\.(\d+)\}", printed).groups()
    assert written == [f"shard-{i:06d}.tar" for i in range(int(first), int(last) + 1)]

    argv = shlex.split(printed)
    assert argv[:2] == ["python", "train.py"]
    rows = train_rows([*argv[2:], *plumbing(cache_dir, tmp_path / "runs")])
    keys = converted_keys(tmp_path / "my_data" / "shards")
    assert len(keys) == 47
    per_epoch = assert_epochs_exact(rows, keys)
    assert len(rows) == 2 * STEPS
    # 47 records < 64 (data=shards' slot count before `auto`): 4 slots of ~12 records, rows of 32k tokens hold
    # more than a slot's share, so each of the 4 rows spans epochs; the first epoch (all 3 shards) is complete.
    assert per_epoch[0] == 47 and len(per_epoch) > 1, per_epoch


def test_fewer_records_than_slots_refused_at_start_then_trains_with_auto(
    tmp_path, cache_dir, capsys, monkeypatch
):
    """3 records: the README's train command (the default data group: 4 slots) is refused before the model is
    built, naming data.num_slots; with the setting the refusal suggests it trains, every row without repeats.
    The converter's printed command (data=shards: auto slots, 4 workers) is refused too, naming both keys."""
    full = tmp_path / "full"
    full.mkdir()
    write_llava_data(full)
    mine = tmp_path / "my_data"
    (mine / "images").mkdir(parents=True)
    records = json.loads((full / "my_data" / "llava.json").read_text())[:3]
    (mine / "llava.json").write_text(json.dumps(records))
    for r in records:
        shutil.copy(full / "my_data" / "images" / r["image"], mine / "images" / r["image"])
    monkeypatch.chdir(tmp_path)

    convert_argv, train_argv = journey()
    out = run_convert(convert_argv, capsys=capsys)
    assert "3 samples in 1 shard(s)" in out, out
    (printed,) = [
        line.removeprefix("train on them: ") for line in out.splitlines() if "train on them" in line
    ]

    built = []
    real_build_model = run.build_model
    monkeypatch.setattr(run, "build_model", lambda *a, **k: built.append(1) or real_build_model(*a, **k))

    # The README's command, one encoding of its sweep (-m rope=mrope,vanilla) in this process.
    assert train_argv[:4] == ["python", "train.py", "-m", "rope=mrope,vanilla"]
    readme = [*train_argv[4:], "rope=mrope", *plumbing(cache_dir, tmp_path / "runs")]
    readme = [a for a in readme if not a.startswith("trainer.max_steps=300")]
    with pytest.raises(ValueError, match=r"config key `data\.num_slots`: 4 slots.* 3 readable records.*auto"):
        run.build_session(compose_cfg(readme))
    # The converter's command on 3 records: 4 workers want 4 slots.
    with pytest.raises(
        ValueError, match=r"config key `data\.num_slots`: auto.*3 readable records.*num_workers"
    ):
        run.build_session(compose_cfg([*shlex.split(printed)[2:], *plumbing(cache_dir, tmp_path / "runs")]))
    assert not built, "the model was built before the refusal"

    capsys.readouterr()
    rows = train_rows([*readme, "data.num_slots=auto"])
    # the start's estimate: a row holds each of the 3 records at most once (not the ~21 its tokens would hold)
    assert "this run: 4 rows ~ 12 samples ~ 4.00 epochs" in capsys.readouterr().out
    assert built
    keys = converted_keys(mine / "shards")
    per_epoch = assert_epochs_exact(rows, keys)
    # 1 slot of 3 records: every row holds each record at most once, so the rows cycle epochs in order
    assert len(rows) == 2 * STEPS
    assert all(len(row["sample_keys"]) <= 3 for row in rows)
    complete = [e for e in sorted(per_epoch) if e < max(per_epoch)]
    assert complete and all(per_epoch[e] == 3 for e in complete), per_epoch
