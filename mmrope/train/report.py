"""Compare the runs of a sweep from their local logs: a markdown table and a loss-curve plot.

    python train.py -m rope=mrope,mrope_i,vanilla hydra.job.name=rope_sweep
    python -m mmrope.train.report runs/sweeps/rope_sweep --out runs/sweeps/rope_sweep/report

A sweep folder holds one Hydra job folder per run (`<override_dirname>/`), each with `.hydra/config.yaml`,
`.hydra/overrides.yaml` and the trainer's `metrics.jsonl` (one JSON object per logged step). Nothing is read
from wandb. Writes `<out>/report.md` (one row per run: encoding, final and min loss, tokens/s, MFU, peak
memory; "n/a" where a run did not log the metric) and `<out>/loss.png` (one curve per run from step 1, labelled
with its encoding + DIPE and the other overrides that tell it apart; `--log-y` for a log-scale loss axis).
When the sweep was judged on benchmarks (`python -m mmrope.eval.bench --checkpoint SWEEP --out SWEEP/bench`),
report.md also holds their scores (`SWEEP/bench/scores.csv`, or `--scores PATH`) and links their bar plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

NA = "n/a"
# Keys that locate or label a run rather than change what it trains: never used to tell runs apart.
BOOKKEEPING_KEYS = ("trainer.run_name", "trainer.output_dir", "trainer.wandb.group", "trainer.wandb.mode")
# Overrides the encoding's name already says (`mrope + DIPE`): left out of legends.
ENCODING_KEYS = ("rope", "rope.name", "rope.dipe")


@dataclass
class RunLog:
    """One run of a sweep: where it is, what it trained and what it logged (one record per step)."""

    job_dir: Path
    encoding: str  # rope.name, with " + DIPE" when rope.dipe
    overrides: dict[str, str]
    records: list[dict] = field(default_factory=list)
    label: str = ""  # the overrides that tell this run apart from the others of the sweep
    legend: str = ""  # the encoding (+ DIPE), then the other overrides that tell this run apart
    log_every: int | None = None  # trainer.log_every of the run (None: not in its config)


def parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def read_metrics(path: Path) -> list[dict]:
    """Records of `metrics.jsonl` sorted by step; the records of one step are merged, a later value of a key
    winning. A resumed run re-logs the steps after its last checkpoint: its values win (they belong to the
    history the final model comes from). Background benchmark scores arrive as extra records of their
    checkpoint's step (`bench/*`, mmrope.train.benchmarks)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for num_line, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{num_line}: not a JSON object ({e})") from e
            by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def load_run(job_dir: Path) -> RunLog:
    hydra_dir = job_dir / ".hydra"
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {}
    rope = config.get("rope") or {}
    encoding = str(rope.get("name", "?")) + (" + DIPE" if rope.get("dipe") else "")
    overrides = dict(
        parse_override(o) for o in yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
    )
    metrics = job_dir / "metrics.jsonl"
    if not metrics.exists():  # trainer.output_dir given on the command line: the run is output_dir/run_name
        hydra = (yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) or {}).get("hydra", {})
        output_dir = Path(str((config.get("trainer") or {}).get("output_dir", "")))
        if not output_dir.is_absolute():
            output_dir = Path(hydra.get("runtime", {}).get("cwd", ".")) / output_dir
        metrics = output_dir / str(hydra.get("job", {}).get("override_dirname", "")) / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    log_every = (config.get("trainer") or {}).get("log_every")
    return RunLog(
        job_dir, encoding, overrides, records, log_every=log_every if isinstance(log_every, int) else None
    )


def load_sweep(sweep_dir: Path) -> list[RunLog]:
    """Every Hydra job folder under `sweep_dir` (sorted), labelled by the overrides that differ between them."""
    sweep_dir = Path(sweep_dir)
    job_dirs = sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml"))
    if not job_dirs:
        raise ValueError(
            f"argument `sweep_dir`: no Hydra job folder (*/.hydra/overrides.yaml) in {sweep_dir}"
        )
    runs = [load_run(d) for d in job_dirs]
    if not any(r.records for r in runs):
        raise ValueError(f"argument `sweep_dir`: no run under {sweep_dir} has a metrics.jsonl with records")
    keys = sorted({k for r in runs for k in r.overrides if k not in BOOKKEEPING_KEYS})
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    others = [k for k in varying if k not in ENCODING_KEYS]
    for r in runs:
        r.label = ",".join(f"{k}={r.overrides.get(k, '-')}" for k in varying) or r.encoding
        rest = ",".join(f"{k}={r.overrides.get(k, '-')}" for k in others)
        r.legend = f"{r.encoding} ({rest})" if rest else r.encoding
    if len({r.legend for r in runs}) < len(runs):  # e.g. `rope=mrope` next to `rope.name=mrope`
        for r in runs:
            r.legend = f"{r.encoding} ({r.label})"
    return runs


def _values(run: RunLog, key: str) -> list[float]:
    out = []
    for record in run.records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append(float(value))
    return out


def _steady(values: list[float]) -> float | None:
    """Median over the logged steps, the first one left out when there are others (start-up, compilation)."""
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


def summarize(run: RunLog) -> dict[str, float | int | None]:
    losses = _values(run, "train/loss")
    peak_mem = _values(run, "perf/peak_mem_gb")
    return {
        "steps": run.records[-1]["step"] if run.records else 0,
        "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "tokens_per_s": _steady(_values(run, "perf/tokens_per_s")),
        "mfu": _steady(_values(run, "perf/mfu")),
        "peak_mem_gb": max(peak_mem) if peak_mem else None,
    }


def _fmt(value: float | int | None, spec: str) -> str:
    return NA if value is None else format(value, spec)


def markdown_table(runs: list[RunLog]) -> str:
    lines = [
        "| run | encoding | steps | final loss | min loss | tokens/s | MFU | peak mem (GB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        s = summarize(run)
        mfu = NA if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
        cells = [
            f"`{run.label}`",
            run.encoding,
            str(s["steps"]),
            _fmt(s["final_loss"], ".4f"),
            _fmt(s["min_loss"], ".4f"),
            _fmt(s["tokens_per_s"], ",.0f"),
            mfu,
            _fmt(s["peak_mem_gb"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FEW_POINTS = 5  # fewer logged steps than this make a curve of a few straight segments


def few_points_note(runs: list[RunLog]) -> str:
    """How to get a finer curve when runs logged only a few steps (a short run with trainer.log_every=10 logs
    steps 1 and max_steps: two points); empty when every run logged enough."""
    sparse = [r for r in runs if 0 < len(r.records) < FEW_POINTS]
    if not sparse:
        return ""
    every = sorted({r.log_every for r in sparse if r.log_every})
    setting = f"trainer.log_every={','.join(map(str, every))}" if every else "trainer.log_every"
    return (
        f"Only {', '.join(f'{len(r.records)} logged steps in `{r.label}`' for r in sparse)}: the trainer logs "
        f"every {setting} steps (and at step 1 and max_steps). For one point per step, run with "
        "trainer.log_every=1.\n"
    )


def loss_figure(runs: list[RunLog], title: str, *, log_y: bool = False):
    """The training loss of every run from its first logged step (step 1), one curve per run, labelled with
    its encoding (+ DIPE) and the other overrides that tell it apart. `log_y`: log-scale loss axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for run in runs:
        points = [
            (r["step"], r["train/loss"]) for r in run.records if isinstance(r.get("train/loss"), (int, float))
        ]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker="o" if len(points) < 30 else None, markersize=3, label=run.legend)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/loss" + (" (log scale)" if log_y else ""))
    ax.set_title(title)
    ax.grid(True, which="both" if log_y else "major", alpha=0.3)
    ax.legend(title="encoding", fontsize=8)
    fig.tight_layout()
    return fig


def plot_losses(runs: list[RunLog], path: Path, title: str, *, log_y: bool = False) -> None:
    import matplotlib.pyplot as plt

    fig = loss_figure(runs, title, log_y=log_y)
    fig.savefig(path)
    plt.close(fig)


def scores_section(scores_csv: Path, out_dir: Path) -> str:
    """The benchmark scores of `mmrope.eval.bench` as a markdown table (one row per checkpoint, one column per
    task/metric: value +- stderr), with a link to the bench's bar plot when it is there."""
    from mmrope.eval.bench import read_scores

    rows = read_scores(scores_csv)
    columns = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    checkpoints = list(dict.fromkeys((r["checkpoint"], r["encoding"], r["dipe"]) for r in rows))
    lines = [
        "| checkpoint | encoding | " + " | ".join(f"{t} {m}" for t, m in columns) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for name, encoding, dipe in checkpoints:
        cells = []
        for task, metric in columns:
            hit = [r for r in rows if (r["checkpoint"], r["task"], r["metric"]) == (name, task, metric)]
            if not hit:
                cells.append(NA)
                continue
            value, stderr, n = hit[0]["value"], hit[0]["stderr"], hit[0]["n"]
            cells.append(
                f"{float(value):.4f}"
                + (f" ± {float(stderr):.4f}" if stderr else "")
                + (f" (n={n})" if n else "")
            )
        shown = encoding + (" + DIPE" if str(dipe).lower() == "true" else "")
        lines.append(f"| `{name}` | {shown} | " + " | ".join(cells) + " |")
    text = f"\n## Benchmarks (lmms-eval)\n\nFrom `{scores_csv}`.\n\n" + "\n".join(lines) + "\n"
    plot = scores_csv.with_name("scores.png")
    if plot.is_file():
        text += f"\n![benchmark scores]({os.path.relpath(plot, out_dir)})\n"
    return text


def write_report(
    sweep_dir: Path, out_dir: Path, *, log_y: bool = False, scores: Path | None = None
) -> tuple[Path, Path]:
    """Write `report.md` and `loss.png` for the sweep into `out_dir`; returns their paths. `scores`: a bench
    scores.csv to include (default: `<sweep_dir>/bench/scores.csv` when it exists)."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    runs = load_sweep(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out_dir / "report.md", out_dir / "loss.png"
    plot_losses(runs, png_path, title=f"sweep {sweep_dir.name}: training loss", log_y=log_y)
    if scores is None and (sweep_dir / "bench" / "scores.csv").is_file():
        scores = sweep_dir / "bench" / "scores.csv"
    if scores is not None and not Path(scores).is_file():
        raise ValueError(f"argument `--scores`: {scores} is not a file")
    md_path.write_text(
        f"# Sweep `{sweep_dir.name}`\n\n{len(runs)} runs from `{sweep_dir}`. Final and min loss over logged steps; "
        "tokens/s and MFU: median over logged steps after the first; peak memory: max over steps.\n\n"
        + markdown_table(runs)
        + (f"\n{note}" if (note := few_points_note(runs)) else "")
        + f"\n![training loss]({png_path.name})\n"
        + (scores_section(Path(scores), out_dir) if scores is not None else "")
    )
    return md_path, png_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep folder (e.g. runs/sweeps/<name>)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument("--log-y", action="store_true", help="loss axis on a log scale")
    parser.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="bench scores.csv (default: SWEEP_DIR/bench/scores.csv if present)",
    )
    args = parser.parse_args(argv)
    out = args.out or args.sweep_dir / "report"
    md_path, png_path = write_report(args.sweep_dir, out, log_y=args.log_y, scores=args.scores)
    print(md_path.read_text())
    print(f"wrote {md_path} and {png_path}")


if __name__ == "__main__":
    main()
