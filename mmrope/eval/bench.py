"""Judge checkpoints, or a whole sweep, on lmms-eval tasks through the `mmrope` model plugin.

    python -m mmrope.eval.bench --checkpoint exported/mrope --checkpoint exported/videorope_dipe \\
        --tasks mmstar_qwen,mmmu_val_qwen --out bench/
    python -m mmrope.eval.bench --checkpoint runs/sweeps/rope_sweep --tasks mmrope_shapes_mc \\
        --include-path eval_tasks --limit 20 --out runs/sweeps/rope_sweep/bench

A `--checkpoint` is an exported folder (`mmrope_encoding.json`), a training checkpoint (a committed `step_N`
folder, a run's `checkpoints` folder or a run folder: its latest step), or a Hydra sweep folder (every run's
latest checkpoint). Training checkpoints are exported first, into `<out>/exports/<name>`, by
`python -m mmrope.train.export` in a subprocess (evaluation never imports the trainer). Each export then goes
through lmms-eval (`.venv-eval/bin/lmms-eval`, made by `make eval-setup`, or `--lmms-eval PATH`) with
`--model mmrope`, in a subprocess, offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1; `--online` lifts it).

lmms-eval exits 0 even when a task or the model failed, so the bench checks its results JSON: a task missing
from it, a non-zero exit, or a task without a numeric metric stops the bench with the reason and the tail of
the log (`<out>/logs/<name>.log`). Writes, after every checkpoint, `<out>/scores.csv` (checkpoint, encoding,
dipe, task, metric, value, stderr, n) and at the end `<out>/scores.png`, a grouped bar plot (one group per
task/metric, one bar per checkpoint, stderr as error bars). `python -m mmrope.train.report` adds the scores
of `<sweep>/bench/scores.csv` to the sweep's report.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ENCODING_FILE = "mmrope_encoding.json"  # (mmrope.pretrained.ENCODING_FILE, without importing torch)
MANIFEST = "manifest.json"  # a committed training step (mmrope.train.checkpoint.MANIFEST)
COLUMNS = ("checkpoint", "encoding", "dipe", "task", "metric", "value", "stderr", "n")
LOG_TAIL_LINES = 25


class BenchError(RuntimeError):
    """A checkpoint that could not be exported or evaluated; the message says why."""


@dataclass
class Target:
    """One checkpoint to judge: a display name and either an export folder or a training checkpoint to export."""

    name: str
    path: Path
    is_export: bool


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_lmms_eval() -> str | None:
    """`.venv-eval/bin/lmms-eval` of this checkout (`make eval-setup`), else `lmms-eval` on PATH."""
    local = repo_root() / ".venv-eval" / "bin" / "lmms-eval"
    return str(local) if local.is_file() else shutil.which("lmms-eval")


# -- what to judge -----------------------------------------------------------------------------------------------
def _sweep_runs(sweep: Path) -> list[Target]:
    """Every Hydra job folder of a sweep with its run folder's checkpoints (as `mmrope.train.report` finds runs:
    the job folder itself, or `trainer.output_dir/<override_dirname>` when output_dir was given)."""
    targets = []
    for overrides in sorted(sweep.glob("**/.hydra/overrides.yaml")):
        job = overrides.parent.parent
        run = job
        if not (job / "checkpoints").is_dir():
            config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}
            hydra = (yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text()) or {}).get("hydra", {})
            output_dir = Path(str((config.get("trainer") or {}).get("output_dir", "")))
            if not output_dir.is_absolute():
                output_dir = Path(hydra.get("runtime", {}).get("cwd", ".")) / output_dir
            run = output_dir / str(hydra.get("job", {}).get("override_dirname", ""))
        if not (run / "checkpoints").is_dir():
            raise BenchError(
                f"--checkpoint: sweep run {job} has no checkpoints folder ({run / 'checkpoints'})"
            )
        targets.append(Target(job.name, run / "checkpoints", is_export=False))
    return targets


def resolve_targets(paths: list[str]) -> list[Target]:
    """`--checkpoint` values -> what to judge, in order; a sweep folder expands to its runs."""
    targets: list[Target] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise BenchError(f"--checkpoint: {raw!r} does not exist")
        if (path / ENCODING_FILE).is_file():
            targets.append(Target(path.name, path, is_export=True))
        elif (path / MANIFEST).is_file() or list(path.glob(f"step_*/{MANIFEST}")):
            name = path.parent.parent.name if (path / MANIFEST).is_file() else path.parent.name
            targets.append(Target(name, path, is_export=False))
        elif list(path.glob(f"checkpoints/step_*/{MANIFEST}")):
            targets.append(Target(path.name, path / "checkpoints", is_export=False))
        elif list(path.glob("**/.hydra/overrides.yaml")):
            runs = _sweep_runs(path)
            targets += runs
        else:
            raise BenchError(
                f"--checkpoint: {raw!r} is neither an export ({ENCODING_FILE}), a training checkpoint "
                f"({MANIFEST}) nor a sweep folder (*/.hydra/overrides.yaml)"
            )
    names = [t.name for t in targets]
    if len(set(names)) < len(names):  # e.g. two `export/step_300`: fall back to the paths
        for t in targets:
            t.name = str(t.path).replace(os.sep, "_").strip("_")
    return targets


# -- running ---------------------------------------------------------------------------------------------------------
def _tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join(text[-lines:])


def safe_name(name: str) -> str:
    """A checkpoint's name as a folder name for lmms-eval's outputs: `rope=videorope,rope.dipe=true` ->
    `rope-videorope-rope.dipe-true`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "checkpoint"


def committed_step(path: Path) -> Path | None:
    """A committed `step_N` folder (it has the manifest) as is; a checkpoints folder -> its newest committed step
    (what `mmrope.train.export` resolves it to); else None."""
    if (path / MANIFEST).is_file():
        return path
    steps = [p.parent for p in path.glob(f"step_*/{MANIFEST}") if p.parent.name.split("_")[1].isdigit()]
    return max(steps, key=lambda p: int(p.name.split("_")[1])) if steps else None


def run_export(checkpoint: Path, dest: Path, log: Path) -> Path:
    """`python -m mmrope.train.export CHECKPOINT --out DEST` in a subprocess (evaluation never imports the
    trainer); BenchError with the log's tail when it fails."""
    cmd = [sys.executable, "-m", "mmrope.train.export", str(checkpoint), "--out", str(dest)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(online=True)).returncode
    if rc != 0 or not (dest / ENCODING_FILE).is_file():
        raise BenchError(f"export of {checkpoint} failed (exit {rc}); log {log}:\n{_tail(log)}")
    return dest


def export_checkpoint(target: Target, out_dir: Path, log_dir: Path) -> Path:
    """A training checkpoint -> `<out>/exports/<name>` through `python -m mmrope.train.export` (a subprocess)."""
    dest = out_dir / "exports" / safe_name(target.name)
    return run_export(target.path, dest, log_dir / f"{safe_name(target.name)}.export.log")


def _child_env(*, online: bool) -> dict[str, str]:
    env = dict(os.environ)
    # the child finds this checkout first (an editable .venv-eval install points here anyway)
    env["PYTHONPATH"] = os.pathsep.join([str(repo_root()), *filter(None, [env.get("PYTHONPATH")])])
    if not online:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def lmms_eval_command(
    lmms_eval: str,
    export: Path,
    tasks: list[str],
    output: Path,
    *,
    include_path: list[str],
    limit: int | None,
    batch_size: int,
    model_args: str,
) -> list[str]:
    args = f"pretrained={export}" + (f",{model_args}" if model_args else "")
    cmd = [lmms_eval, "--model", "mmrope", "--model_args", args, "--tasks", ",".join(tasks)]
    cmd += ["--batch_size", str(batch_size), "--output_path", str(output), "--log_samples"]
    for path in include_path:
        cmd += ["--include_path", str(Path(path).resolve())]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def read_results(output: Path, tasks: list[str], log: Path) -> tuple[dict, dict]:
    """(results, n-samples) of the newest results JSON under `output`; BenchError when lmms-eval wrote none or a
    task is missing (lmms-eval exits 0 when a task fails)."""
    found = sorted(output.glob("**/*_results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise BenchError(
            f"lmms-eval wrote no results for the task(s) {tasks} under {output} (it exits 0 when a task or the "
            f"model fails); log {log}:\n{_tail(log)}"
        )
    data = json.loads(found[-1].read_text())
    results, counts = data.get("results") or {}, data.get("n-samples") or {}
    missing = [t for t in tasks if t not in results]
    if missing:
        raise BenchError(
            f"lmms-eval results {found[-1]} lack the task(s) {missing} (the task or the model failed); "
            f"log {log}:\n{_tail(log)}"
        )
    return results, counts


def score_rows(target_name: str, meta: dict, results: dict, counts: dict, tasks: list[str]) -> list[dict]:
    """One row per task and numeric metric (`metric` or `metric,filter` when the filter is not `none`)."""
    rows = []
    for task in tasks:
        task_results = results[task]
        n = (counts.get(task) or {}).get("effective")
        for key, value in task_results.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = task_results.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "checkpoint": target_name,
                    "encoding": meta.get("name", "?"),
                    "dipe": bool(meta.get("dipe", False)),
                    "task": task,
                    "metric": metric if filt == "none" else f"{metric},{filt}",
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else "",
                    "n": n if n is not None else "",
                }
            )
        if not any(r["task"] == task for r in rows):
            raise BenchError(f"lmms-eval results hold no numeric metric for task {task!r}: {task_results}")
    return rows


def evaluate_export(
    target: Target, export: Path, tasks: list[str], out_dir: Path, log_dir: Path, args: argparse.Namespace
) -> list[dict]:
    meta = json.loads((export / ENCODING_FILE).read_text())
    output = out_dir / "lmms" / safe_name(target.name)
    shutil.rmtree(output, ignore_errors=True)  # a stale results JSON must never pass for this run's
    output.mkdir(parents=True)
    log = log_dir / f"{safe_name(target.name)}.log"
    # lmms-eval splits `--model_args` and `--output_path` at ',' and '=', which sweep run names hold
    # (`rope=videorope,rope.dipe=true`): it gets links from a temporary folder instead.
    with tempfile.TemporaryDirectory(prefix="mmrope-bench-") as tmp:
        (Path(tmp) / "model").symlink_to(export.resolve(), target_is_directory=True)
        (Path(tmp) / "results").symlink_to(output.resolve(), target_is_directory=True)
        cmd = lmms_eval_command(
            args.lmms_eval,
            Path(tmp) / "model",
            tasks,
            Path(tmp) / "results",
            include_path=args.include_path,
            limit=args.limit,
            batch_size=args.batch_size,
            model_args=args.model_args,
        )
        tic = time.perf_counter()
        with open(log, "w") as f:
            f.write(f"# {target.name}: model {export}, results {output}\n" + " ".join(cmd) + "\n")
            f.flush()
            env = _child_env(online=args.online)
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp).returncode
        seconds = time.perf_counter() - tic
    if rc != 0:
        raise BenchError(f"lmms-eval failed on {target.name} (exit {rc}); log {log}:\n{_tail(log)}")
    results, counts = read_results(output, tasks, log)
    rows = score_rows(target.name, meta, results, counts, tasks)
    items = sum((counts.get(t) or {}).get("effective", 0) for t in tasks)
    print(
        f"bench: {target.name}: {len(rows)} scores, {items} items in {seconds:.1f} s (lmms-eval, load included)"
    )
    return rows


# -- outputs ---------------------------------------------------------------------------------------------------------
def write_scores(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_scores(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: not a bench scores.csv (missing columns {missing})")
    return rows


def label(row: dict) -> str:
    dipe = str(row["dipe"]).lower() == "true"
    return f"{row['encoding']}{' + DIPE' if dipe else ''} ({row['checkpoint']})"


def plot_scores(rows: list[dict], path: Path, title: str = "benchmarks") -> None:
    """Grouped bars: one group per task/metric, one bar per checkpoint (legend: encoding + DIPE, name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(f"{r['task']}\n{r['metric']}" for r in rows))
    series = list(dict.fromkeys(label(r) for r in rows))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(
        figsize=(max(6.0, 1.6 * len(groups) * max(1, len(series)) ** 0.5 + 2), 4.5), dpi=120
    )
    for i, name in enumerate(series):
        values, errors = [], []
        for g in groups:
            match = [r for r in rows if label(r) == name and f"{r['task']}\n{r['metric']}" == g]
            values.append(float(match[0]["value"]) if match else math.nan)
            err = match[0]["stderr"] if match else ""
            errors.append(float(err) if err not in ("", None) else 0.0)
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="checkpoint", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_bench(args: argparse.Namespace) -> list[dict]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise BenchError("--tasks: give at least one task")
    if args.limit is not None and args.limit < 1:
        raise BenchError(f"--limit: must be >= 1, got {args.limit}")
    if not args.lmms_eval or not Path(args.lmms_eval).is_file():
        raise BenchError(
            f"--lmms-eval: {args.lmms_eval!r} not found; run `make eval-setup` (creates .venv-eval/bin/lmms-eval) "
            "or pass the path of an lmms-eval executable"
        )
    for path in args.include_path:
        if not Path(path).is_dir():
            raise BenchError(f"--include-path: {path!r} is not a folder")
    targets = resolve_targets(args.checkpoint)
    out_dir = Path(args.out)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for target in targets:
        export = target.path if target.is_export else export_checkpoint(target, out_dir, log_dir)
        rows += evaluate_export(target, export, tasks, out_dir, log_dir, args)
        write_scores(rows, out_dir / "scores.csv")
    plot_scores(rows, out_dir / "scores.png", title=f"lmms-eval: {', '.join(tasks)}")
    print(f"bench: wrote {out_dir / 'scores.csv'} and {out_dir / 'scores.png'}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmrope.eval.bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", action="append", required=True, help="export, training checkpoint or sweep"
    )
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    p.add_argument("--include-path", action="append", default=[], help="folder of extra task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--out", required=True, help="output folder (scores.csv, scores.png, logs/, lmms/)")
    p.add_argument("--batch-size", type=int, default=1, help="generation batch size (left padded)")
    p.add_argument("--model-args", default="", help="extra mmrope model_args, e.g. device=cuda,dtype=bf16")
    p.add_argument("--lmms-eval", default=default_lmms_eval(), help="lmms-eval executable (.venv-eval's)")
    p.add_argument("--online", action="store_true", help="let lmms-eval reach the HF hub (default: offline)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        run_bench(parse_args(argv))
    except BenchError as e:
        sys.exit(f"bench: {e}")


if __name__ == "__main__":
    main()
