"""Elastic exact resume on CPU (gloo, ZeRO-2): a run checkpointed on 2 ranks continues on 1, and one
checkpointed on 1 continues on 2, with the same global rows at every step and the same loss as the runs that
were never interrupted. Model and optimizer cross the world-size change through DeepSpeed's universal
checkpoint; the data position through the virtual slots (data.num_slots). On uneven shards read by 2 ranks x 2
workers x 4 slots, every epoch of the resumed runs holds each record once, the first one every record."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from tests.conftest import ROOT, clean_env, tiny_overrides, uneven_shards

pytestmark = pytest.mark.slow
STEPS, CUT = 4, 2


def _overrides(cache_dir: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return tiny_overrides(
        cache_dir,
        runs,
        "deepspeed=zero2",
        "trainer.global_batch_size=2",
        "data.num_slots=4",
        f"trainer.run_name={name}",
        f"trainer.max_steps={STEPS}",
        "trainer.optim.lr=1e-3",
        *extra,
    )


def _uneven_shards(synthetic_shards: list[str], folder: Path, sizes=(5, 13, 18)) -> list[str]:
    """36 records in shards of 5, 13 and 18: 9 per slot and epoch, about one row's worth."""
    return uneven_shards(synthetic_shards, folder, sizes)


def _assert_exact_epochs(steps: list[dict], keys: set[str]) -> None:
    """Each epoch's samples over all global rows: no record twice (nor twice in a row), the first epoch all."""
    epochs: dict[int, list[str]] = {}
    for step in steps:
        for g, row_keys in step["rows"].items():
            assert len(set(row_keys)) == len(row_keys), f"global row {g} repeats a record"
            for key, epoch in zip(row_keys, step["epochs"][g], strict=True):
                epochs.setdefault(epoch, []).append(key)
    assert sorted(epochs[0]) == sorted(keys), "the first epoch is not every record once"
    assert len(epochs) >= 2, "the steps should reach the second epoch"
    for e, seen in epochs.items():
        assert len(seen) == len(set(seen)) and set(seen) <= keys, f"epoch {e}"


def _torchrun(*jobs: tuple[Path, int, str, list[str]]) -> list[list[dict]]:
    """The jobs (out folder, steps, save_at, overrides), one after another in one launch of 2 ranks; per job, what
    each rank saw."""
    args = []
    for out, steps, save_at, overrides in jobs:
        out.mkdir(parents=True)
        args += ["--then"] if args else []
        args += [str(out), str(steps), save_at, *overrides]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(ROOT / "tests/integration/elastic_worker.py"), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [[torch.load(out / f"rank_{r}.pt") for r in range(2)] for out, *_ in jobs]


def _in_process(steps: int, save_at: list[int], overrides: list[str]) -> list[dict]:
    from tests.integration.elastic_worker import run_steps

    return [run_steps(overrides, steps, save_at)]


def _merged(ranks: list[dict]) -> list[dict]:
    """Per step: the loss (equal on every rank), the global rows of all ranks and their samples' epochs."""
    steps = []
    for i, first in enumerate(ranks[0]["steps"]):
        rows = {g: keys for r in ranks for g, keys in r["steps"][i]["rows"].items()}
        epochs = {g: e for r in ranks for g, e in r["steps"][i]["epochs"].items()}
        losses = [r["steps"][i]["loss"] for r in ranks]
        assert max(losses) == min(losses), "ranks disagree on the global loss"
        steps.append({"step": first["step"], "loss": first["loss"], "rows": rows, "epochs": epochs})
    return steps


def _continue_from(src_run: Path, dst_run: Path, step: int) -> None:
    """A run directory whose only committed checkpoint is `step` of another run (same config)."""
    ckpts = dst_run / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / f"step_{step}", ckpts / f"step_{step}")
    (ckpts / "latest").write_text(f"step_{step}")


def test_resume_2_ranks_to_1_and_1_to_2(tmp_path, cache_dir, synthetic_shards):
    runs = tmp_path / "runs"
    shards = _uneven_shards(synthetic_shards, tmp_path)
    keys = {r["__key__"] for url in shards for r in wds.tarfile_to_samples()([{"url": url}])}
    # 2 workers per rank (4 consumers on 2 ranks), one open row per slot: a record is trained on in the row it
    # was drawn for, so 2 rows per slot cover the first epoch.
    data = (f"data.shards=[{','.join(shards)}]", "data.num_workers=2", "data.num_open_rows=1")
    # Uninterrupted references on both world sizes, each committing a checkpoint at step CUT. The 2-rank launch
    # also runs the 1 -> 2 resume (checked below), after its reference: one launch of 2 ranks, not two.
    one_raw = _in_process(STEPS, [CUT], _overrides(cache_dir, runs, "one", *data))
    one = _merged(one_raw)
    _continue_from(runs / "one", runs / "one_to_two", CUT)
    two_raw, ranks = _torchrun(
        (tmp_path / "two", STEPS, str(CUT), _overrides(cache_dir, runs, "two", *data)),
        (
            tmp_path / "one_to_two",
            STEPS - CUT,
            "",
            _overrides(cache_dir, runs, "one_to_two", "trainer.resume=must", *data),
        ),
    )
    two = _merged(two_raw)
    assert [s["step"] for s in two] == [s["step"] for s in one] == [1, 2, 3, 4]
    # The global rows of a step do not depend on the world size (2 rows per step: global rows 2s-2, 2s-1).
    for a, b in zip(two, one):
        assert sorted(a["rows"]) == sorted(b["rows"]) == [2 * a["step"] - 2, 2 * a["step"] - 1]
        assert a["rows"] == b["rows"], f"step {a['step']}"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert len({s["loss"] for s in one}) == STEPS, (
        "the loss did not move: the test would not see a lost state"
    )

    # 2 ranks -> 1: continue the 2-rank run's step-2 checkpoint on one rank.
    _continue_from(runs / "two", runs / "two_to_one", CUT)
    resumed = _in_process(
        STEPS - CUT, [], _overrides(cache_dir, runs, "two_to_one", "trainer.resume=must", *data)
    )
    assert resumed[0]["start"] == CUT
    assert (runs / "two_to_one" / "checkpoints" / f"step_{CUT}" / "universal").is_dir()
    # Step 3's loss is computed before the first update after the resume (model state), step 4's after it
    # (optimizer state: moments reset by a lost optimizer change it in the 2nd decimal).
    for got, want in zip(_merged(resumed), two[CUT:], strict=True):
        assert got["step"] == want["step"] and got["rows"] == want["rows"], f"step {want['step']}"
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {want['step']}"
    _assert_exact_epochs(two[:CUT] + _merged(resumed), keys)  # across the 2 -> 1 resume

    # 1 rank -> 2: the 1-rank run's step-2 checkpoint, continued on two ranks (in the launch above).
    assert [r["start"] for r in ranks] == [CUT, CUT]
    assert (runs / "one_to_two" / "checkpoints" / f"step_{CUT}" / "universal").is_dir()
    for got, want in zip(_merged(ranks), one[CUT:], strict=True):
        assert got["step"] == want["step"] and got["rows"] == want["rows"], f"step {want['step']}"
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {want['step']}"
    _assert_exact_epochs(one[:CUT] + _merged(ranks), keys)  # across the 1 -> 2 resume
    # And the weights agree with the uninterrupted run at the end (same updates, summation order aside).
    final_one = one_raw[0]["params"]
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(p, final_one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_slots_that_do_not_divide_the_new_world_are_refused(tmp_path, cache_dir):
    """A checkpoint with 2 slots cannot continue on 2 ranks x 2 workers: refused, naming data.num_slots,
    before anything is converted."""
    runs = tmp_path / "runs"
    _in_process(1, [1], _overrides(cache_dir, runs, "odd", "data.num_slots=2", "trainer.max_steps=2"))
    out = tmp_path / "refused"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(ROOT / "tests/integration/elastic_worker.py"), str(out), "1", "",
        *_overrides(cache_dir, runs, "odd", "data.num_slots=2", "trainer.max_steps=2", "data.num_workers=2"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "data.num_slots" in proc.stdout + proc.stderr
    assert not (runs / "odd" / "checkpoints" / "step_1" / "universal").exists()
