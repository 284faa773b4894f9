"""`python train.py` as a user runs it: what the console says (and does not), and what a refused call leaves.

One short real run, then two refused calls on its folder:
- the console says what start-up is doing (processor and model, DeepSpeed engine, data, first batch), and none
  of the noise every run used to print: DeepSpeed's accelerator warning (DS_ACCELERATOR is not set here), the
  gcc lines of DeepSpeed's libaio probe, torch's "workers > cores" warning (data.num_workers above the cores is
  capped, with a note);
- an accepted run records its config (`hydra/.hydra/*.yaml`) and its log (`hydra/train.log`);
- a refused call (`trainer.resume=never` on this run; a key added with `+` the schema lacks) changes nothing in
  the run's folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, clean_env, tiny_overrides

pytestmark = pytest.mark.slow


def train(*overrides: str) -> subprocess.CompletedProcess:
    env = clean_env()
    env.pop("DS_ACCELERATOR")  # as a user's shell has it: train.py names the accelerator itself
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_console_and_the_runs_record(tmp_path, cache_dir):
    from mmrope.train.run import available_cores

    cores = available_cores()
    workers = cores + 2  # more than the cores: capped to the largest count <= cores that divides the 8 slots
    common = tiny_overrides(cache_dir, tmp_path / "runs", "trainer.run_name=console", "trainer.max_steps=2")
    proc = train(*common, f"data.num_workers={workers}", "data.num_slots=8")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    said = [
        "building the processor...",
        "opening the data (shard indexes)...",
        "building the model...",
        "creating DeepSpeed engine...",
        "run dir: ",
        "waiting for the first batch...",
        "first batch after ",
        "first loss ",
    ]
    positions = [out.find(s) for s in said]
    assert -1 not in positions and positions == sorted(positions), out[-4000:]
    assert f"data.num_workers={workers} > {cores} CPU cores available to this process" in out
    assert "Setting accelerator to CPU" not in out and "ds_accelerator" not in out
    assert "gcc " not in out and "[compilers" not in out
    assert "worker processes in total" not in out  # torch's warning, printed twice per run before

    run = tmp_path / "runs" / "console"
    recorded = yaml.safe_load((run / "hydra/.hydra/config.yaml").read_text())
    assert recorded["trainer"]["max_steps"] == 2 and recorded["trainer"]["resume"] == "auto"
    assert f"data.num_workers={workers}" in yaml.safe_load((run / "hydra/.hydra/overrides.yaml").read_text())
    assert (run / "hydra/train.log").is_file()

    before = snapshot(run)
    refusals = {
        "trainer.resume=never": "config key `trainer.run_name`: ",
        "+trainer.max_step=3": "config key `trainer.max_step`: not a key of `trainer`; did you mean",
    }
    for override, message in refusals.items():
        proc = train(*common, override)
        assert proc.returncode == 1 and message in proc.stderr, proc.stdout + proc.stderr
        assert snapshot(run) == before, f"{override} changed the run's folder"
