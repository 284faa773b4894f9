"""A Hydra multirun over encodings on the tiny default (CPU, basic launcher), then the sweep report.

The sweep must put every run in its own job folder named from its overrides, with the trainer writing its
metrics and checkpoints there (trainer.run_name and output_dir derived per job), every variant reading the
same data stream, and `mmrope.train.report` must turn the folder into a table and a loss plot.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from mmrope.train.report import main as report_main
from mmrope.train.report import write_report
from tests.readme import readme_commands, run_readme_command

ENCODINGS = ("mrope", "mrope_i", "vanilla")
STEPS = 3
SWEEP = "rope_sweep"
# The README's sweep command, verbatim (one after another, here), plus what makes it fast and points it at the
# session's data cache. The appended overrides also make every run name hold several `key=value` pairs.
SWEEP_COMMANDS = [c for c in readme_commands("python", "train.py", "-m") if f"hydra.job.name={SWEEP}" in c]
(README_SWEEP,) = [c for c in SWEEP_COMMANDS if not any("launcher" in a for a in c)]
FAST = [
    "data.synthetic.num_samples=200",
    "data.synthetic.samples_per_shard=100",
    "data.max_tokens=512",
    "data.num_workers=0",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every=1",
]


def metrics(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, cache_dir) -> Path:
    cwd = tmp_path_factory.mktemp("sweep")
    assert f"rope={','.join(ENCODINGS)}" in README_SWEEP and f"hydra.job.name={SWEEP}" in README_SWEEP
    run_readme_command(README_SWEEP, cwd, f"data.cache_dir={cache_dir}", *FAST)  # wandb offline
    return cwd / "runs" / "sweeps" / SWEEP


@pytest.mark.slow
def test_each_run_has_its_own_named_folder_and_run_name(sweep_dir):
    job_dirs = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))
    assert len(job_dirs) == len(ENCODINGS)
    for job_dir, name in zip(job_dirs, sorted(ENCODINGS)):
        hydra_cfg = yaml.safe_load((job_dir / ".hydra/hydra.yaml").read_text())["hydra"]
        # The folder is named from the run's overrides (bookkeeping keys excluded) ...
        assert job_dir.name == hydra_cfg["job"]["override_dirname"]
        assert f"rope={name}" in job_dir.name.split(",")
        assert "trainer.run_name" not in job_dir.name and "trainer.output_dir" not in job_dir.name
        # ... and the trainer ran there: output_dir/run_name is the job folder, so run names differ per run.
        steps = [r["step"] for r in metrics(job_dir)]
        assert steps == list(range(1, STEPS + 1))
        assert (job_dir / "checkpoints" / f"step_{STEPS}").is_dir()
        overrides = yaml.safe_load((job_dir / ".hydra/overrides.yaml").read_text())
        assert f"trainer.wandb.group={SWEEP}" in overrides  # wandb groups the runs by sweep
        # wandb ran (offline, as users run it) under an id it accepts, one run per job folder
        (wandb_run,) = (job_dir / "wandb").glob("offline-run-*")
        assert "," not in wandb_run.name and "=" not in wandb_run.name
    # nothing outside the sweep folder (no runs/tiny-default, no runs/<override_dirname>)
    assert sorted(p.name for p in sweep_dir.parent.parent.iterdir()) == ["sweeps"]


@pytest.mark.slow
def test_variants_see_the_same_data_stream(sweep_dir):
    job_dirs = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))
    per_run = [[(r["train/tokens"], r["train/samples"]) for r in metrics(d)] for d in job_dirs]
    assert all(p == per_run[0] for p in per_run), per_run
    losses = [[r["train/loss"] for r in metrics(d)] for d in job_dirs]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=0.2)  # same init and rows: similar start


@pytest.mark.slow
def test_report_table_and_plot(sweep_dir, tmp_path, capsys):
    report_main([str(sweep_dir), "--out", str(tmp_path)])
    assert "wrote" in capsys.readouterr().out
    table = (tmp_path / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(ENCODINGS)
    by_encoding = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8, row
        by_encoding[cells[1]] = cells
    assert set(by_encoding) == set(ENCODINGS)
    for name, cells in by_encoding.items():
        assert cells[0] == f"`rope={name}`"  # only the encoding differs between the runs
        job_dir = next(d for d in sweep_dir.iterdir() if f"rope={name}" in d.name.split(","))
        records = metrics(job_dir)
        assert int(cells[2]) == STEPS
        assert float(cells[3]) == pytest.approx(records[-1]["train/loss"], abs=5e-5)
        assert float(cells[4]) == pytest.approx(min(r["train/loss"] for r in records), abs=5e-5)
        # perf/* columns: a parsed number where the trainer logs the metric, "n/a" where it does not
        if not torch.cuda.is_available():
            assert cells[6] == "n/a"  # no known peak TFLOP/s on a CPU: no MFU (it used to say 0.0%)
        for cell, key in zip(cells[5:], ("perf/tokens_per_s", "perf/mfu", "perf/peak_mem_gb")):
            if key in records[-1]:
                assert re.fullmatch(r"[\d,]+(\.\d+)?%?", cell), (key, cell)
                assert float(cell.rstrip("%").replace(",", "")) >= 0
            else:
                assert cell == "n/a", (key, cell)

    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_readme_parallel_sweep_on_a_fresh_machine(tmp_path):
    """The README's parallel sweep (submitit, local processes), verbatim from a fresh folder: its runs start at
    once and all generate the data cache (.cache) on first use."""
    (command,) = [c for c in SWEEP_COMMANDS if "hydra/launcher=local" in c]
    run_readme_command(command, tmp_path, *FAST)
    job_dirs = sorted(p.parent for p in (tmp_path / "runs" / "sweeps" / SWEEP).glob("*/metrics.jsonl"))
    assert [next(p for p in d.name.split(",") if p.startswith("rope=")) for d in job_dirs] == [
        f"rope={e}" for e in sorted(ENCODINGS)
    ]
    per_run = [[(r["step"], r["train/tokens"], r["train/samples"]) for r in metrics(d)] for d in job_dirs]
    assert [s for s, _, _ in per_run[0]] == list(range(1, STEPS + 1))
    assert all(p == per_run[0] for p in per_run), per_run  # one data set, seen alike by every run
    assert (tmp_path / ".cache" / "synthetic" / "manifest.json").is_file()


@pytest.mark.slow
def test_readme_report_command(sweep_dir):
    (command,) = [c for c in readme_commands("python", "-m", "mmrope.train.report") if SWEEP in c[3]]
    out = run_readme_command(command, cwd=sweep_dir.parents[2])
    report = sweep_dir / "report"
    assert f"wrote {Path('runs/sweeps') / SWEEP / 'report' / 'report.md'}" in out
    assert len([r for r in (report / "report.md").read_text().splitlines() if r.startswith("| `")]) == 3
    assert (report / "loss.png").stat().st_size > 1000


def _fake_run(sweep: Path, name: str, overrides: list[str], records: list[dict], dipe: bool = False) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra/config.yaml").write_text(yaml.safe_dump({"rope": {"name": name, "dipe": dipe}}))
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_uses_perf_metrics_dedupes_resumed_steps_and_marks_missing(tmp_path):
    sweep = tmp_path / "sweep"
    perf = [
        {"step": 1, "train/loss": 3.0, "perf/tokens_per_s": 10.0, "perf/mfu": 0.1, "perf/peak_mem_gb": 5.0},
        {"step": 2, "train/loss": 2.0, "perf/tokens_per_s": 1000.0, "perf/mfu": 0.4, "perf/peak_mem_gb": 7.5},
        {"step": 3, "train/loss": 2.5, "perf/tokens_per_s": 2000.0, "perf/mfu": 0.5, "perf/peak_mem_gb": 6.0},
        # resumed from the step-2 checkpoint: step 3 logged again, this record is the one that counts
        {"step": 3, "train/loss": 1.5, "perf/tokens_per_s": 3000.0, "perf/mfu": 0.6, "perf/peak_mem_gb": 6.0},
    ]
    _fake_run(
        sweep, "mrope", ["rope=mrope", "trainer.run_name=${hydra:job.override_dirname}"], perf, dipe=True
    )
    _fake_run(
        sweep, "vanilla", ["rope=vanilla"], [{"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.5}]
    )
    md, png = write_report(sweep, tmp_path / "out")
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
        for r in md.read_text().splitlines()
        if r.startswith("| `")
    }
    # steps 2 and 3 after the first: median tokens/s (1000+3000)/2, MFU (0.4+0.6)/2; peak memory is the max
    assert rows["`rope=mrope`"][1:] == ["mrope + DIPE", "3", "1.5000", "1.5000", "2,000", "50.0%", "7.5"]
    assert rows["`rope=vanilla`"][1:] == ["vanilla", "2", "3.5000", "3.5000", "n/a", "n/a", "n/a"]
    assert png.stat().st_size > 1000


def test_report_says_how_to_get_more_points_for_short_runs(tmp_path):
    """A 4-step run with trainer.log_every=10 logs steps 1 and 4: two points per curve. The report says so and
    how to get one point per step; runs with enough points get no note."""
    sweep = tmp_path / "sweep"
    for name, steps in (("mrope", 2), ("vanilla", 2)):
        job = sweep / f"rope={name}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump([f"rope={name}"]))
        config = {"rope": {"name": name, "dipe": False}, "trainer": {"log_every": 10, "max_steps": 4}}
        (job / ".hydra/config.yaml").write_text(yaml.safe_dump(config))
        records = [{"step": s, "train/loss": 3.0 - s / 4} for s in (1, 4)[:steps]]
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md, _ = write_report(sweep, tmp_path / "out")
    assert (
        "Only 2 logged steps in `rope=mrope`, 2 logged steps in `rope=vanilla`: the trainer logs every "
        "trainer.log_every=10 steps (and at step 1 and max_steps). For one point per step, run with "
        "trainer.log_every=1." in md.read_text()
    )
    dense = tmp_path / "dense"
    _run_with(
        dense, "rope=mrope", ["rope=mrope"], {"name": "mrope", "dipe": False}, [3.0, 2.5, 2.0, 1.8, 1.7]
    )
    md, _ = write_report(dense, tmp_path / "out_dense")
    assert "trainer.log_every=1" not in md.read_text()


def test_report_refuses_a_folder_without_runs(tmp_path):
    with pytest.raises(ValueError, match="sweep_dir"):
        write_report(tmp_path, tmp_path / "out")


def _run_with(sweep: Path, folder: str, overrides: list[str], rope: dict, losses: list[float]) -> None:
    job = sweep / folder
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra/config.yaml").write_text(yaml.safe_dump({"rope": rope}))
    records = [{"step": i + 1, "train/loss": v} for i, v in enumerate(losses)]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_loss_plot_legends_name_the_encoding_and_can_use_a_log_scale(tmp_path):
    from mmrope.train.report import load_sweep, loss_figure

    # A DIPE sweep on one encoding: only `rope.dipe` differs, the legend must still say which encoding.
    dipe = tmp_path / "dipe"
    _run_with(dipe, "rope.dipe=false", ["rope.dipe=false"], {"name": "mrope", "dipe": False}, [5.0, 2.0])
    _run_with(dipe, "rope.dipe=true", ["rope.dipe=true"], {"name": "mrope", "dipe": True}, [5.0, 1.0])
    fig = loss_figure(load_sweep(dipe), "dipe", log_y=True)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["mrope", "mrope + DIPE"]
    assert ax.get_yscale() == "log"
    assert sorted(line.get_xdata()[0] for line in ax.get_lines()) == [1, 1]  # curves start at step 1

    # Two encodings x two learning rates: encoding first, then the override that tells the runs apart.
    grid = tmp_path / "grid"
    for enc in ("mrope", "vanilla"):
        for lr in ("0.001", "0.002"):
            over = [f"rope={enc}", f"trainer.optim.lr={lr}"]
            _run_with(grid, ",".join(over), over, {"name": enc, "dipe": False}, [3.0])
    legend = sorted(r.legend for r in load_sweep(grid))
    assert legend == [
        "mrope (trainer.optim.lr=0.001)",
        "mrope (trainer.optim.lr=0.002)",
        "vanilla (trainer.optim.lr=0.001)",
        "vanilla (trainer.optim.lr=0.002)",
    ]
    assert loss_figure(load_sweep(grid), "grid").axes[0].get_yscale() == "linear"
