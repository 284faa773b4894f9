"""`make gpu-check`: the one script a session with a GPU runs first (<= 8 minutes on one H200 from a cold start).

    make wheelhouse                 # here, once: the wheels the GPU box lacks, into .whl/ (ignored by git)
    make gpu-check                  # on the GPU box (device tool: carry .whl); figures land in $OUT
    make gpu-check DRY=1            # every step on CPU at tiny sizes (CI runs this, so the script cannot rot)

Steps, in order of value, each a subprocess with its own time cap inside one overall budget (`--budget-s`); a
failing or timed-out step is recorded and the next one still runs (the dry run runs two steps at a time):

| step | what |
|---|---|
| setup | install `.whl/*.whl` into a private site dir with `pip --no-index` (the box reaches no registry) |
| tests | the GPU-marked tests that compile nothing: every backend vs the eager reference, fwd + bwd, DIPE too |
| train_mrope | the real trainer on CUDA: 20 steps, DeepSpeed ZeRO-2, bf16, packed rows, `attn_backend=auto` |
| bench | `make bench-gpu`: one optimizer step at 32K, Qwen2.5-VL-7B shape, mmrope vs the usual recipe; LLM MFU of mmrope's variants (every layer recomputed, + `model.compile`, + only 20 of 28 layers recomputed, + Liger's loss) with a kernel-time profile; DIPE vs MRoPE at 32K |
| train_dipe | the same trainer run with `rope.dipe=true` |
| train_lora, train_qlora | the same run with `adapter=lora` / `adapter=qlora`: step time and peak memory vs full (train_mrope) |
| train_sp | the same run on 2 ranks with `trainer.sequence_parallel_size=2` (split vision tower, Ulysses); 2+ GPUs only |
| attention | DIPE attention alone: time and memory 8K -> 32K (tests/perf/bench_attention.py) |
| compiled | the GPU tests that compile kernels first (FlexAttention, `model.compile`, Liger's loss): last |

Writes to `$OUT` (else `--out`, default runs/gpu-check): `gpu_check.json` (every figure), `gpu_check.log` (all
output), `bench_step.json`, and `RESULTS_block.md`, a block to paste into tests/perf/RESULTS.md with the command,
commit, device and the goals of issue 14 marked met / not met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_TEST_FILES = [
    "tests/unit/attention/test_attention_packed.py",
    "tests/unit/attention/test_attention_dipe.py",
    "tests/gpu",
]
# GPU tests whose kernels compile on first use (triton: tens of seconds each, cold): they run last.
COMPILING = "flex or liger or compiled"
# The GPU goals (issues 14 and 23; benchmarks, never tests): name -> (figure path in the results, comparison, threshold).
GOALS = {
    "mmrope tokens/s >= 1.4x the usual recipe": ("bench.speedup_tokens_per_s", ">=", 1.4),
    "LLM MFU >= 50% at 32K (best variant)": ("bench.best.llm_mfu", ">=", 0.50),
    "whole-step MFU >= 45% at 32K (best variant)": ("bench.best.mfu", ">=", 0.45),
    "DIPE step time <= 1.15x MRoPE (32K)": ("bench.dipe_32k.step_time_ratio", "<=", 1.15),
    "DIPE peak memory <= 1.1x MRoPE (32K)": ("bench.dipe_32k.peak_mem_ratio", "<=", 1.1),
    "DIPE attention memory 8K -> 32K <= 4.5x": ("attention.dipe_memory_growth", "<=", 4.5),
}


class Check:
    def __init__(self, out: Path, budget_s: float, dry: bool) -> None:
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.log = open(out / "gpu_check.log", "a")
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
        self.results: dict = {"steps": {}}
        self.cache_dir: Path | None = None  # the trainer's data cache (tokenizer, synthetic shards)
        self.bench_args: list[str] = []  # extra arguments of the step benchmark (GPU only)
        self.lock = threading.Lock()  # the dry run runs two steps at a time: one writer of the log at once

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            self.log.write(text + "\n")
            self.log.flush()

    def run(self, name: str, cmd: list[str], cap_s: float) -> tuple[int | None, str]:
        """Run one step, its output to `<out>/<name>.out` then the log; `(returncode or None on timeout, output)`.

        A step killed by a signal it did not ask for (one CI run saw a trainer step die of SIGABRT after 4.5 s,
        never reproduced in later runs) is run once more: the first attempt's status and last output lines stay in
        the results (`first_attempt`) and the report, so the retry hides nothing."""
        code, output = self._run_once(name, cmd, cap_s)
        if code is not None and code < 0:
            first = self.results["steps"][name]
            self.say(f"== {name}: killed by signal {-code}; running it once more")
            code, output = self._run_once(name, cmd, cap_s)
            self.results["steps"][name]["first_attempt"] = first
        return code, output

    def _run_once(self, name: str, cmd: list[str], cap_s: float) -> tuple[int | None, str]:
        left = self.deadline - time.monotonic()
        if left < 20:
            self.results["steps"][name] = {"status": "skipped: out of budget"}
            self.say(f"== {name}: skipped, {left:.0f} s of the budget left")
            return None, ""
        cap = min(cap_s, left)
        self.say(f"== {name} (cap {cap:.0f} s): {' '.join(cmd)}")
        tic = time.monotonic()
        step_log = self.out / f"{name}.out"
        with open(step_log, "w") as sink:
            # Its own process group, so a timeout also stops its children (data workers, compile workers).
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                # torchrun starts its workers in sessions of their own, out of the group's reach (a killed
                # train_sp left its 2 ranks running on): they are found as descendants, before the kill.
                stray = _descendants(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                for pid in stray:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                code = None
        output = step_log.read_text(errors="replace")
        step_log.unlink()  # $OUT brings back few files: everything goes to the one log
        with self.lock:
            self.log.write(output)
        secs = time.monotonic() - tic
        status = "ok" if code == 0 else "timed out" if code is None else f"failed (exit {code})"
        self.results["steps"][name] = {"status": status, "seconds": round(secs, 1)}
        tail = "\n".join(output.replace("\r", "\n").splitlines()[-15:]) if code != 0 else ""
        if code != 0:  # the step's own last words travel with the results (a CI failure shows them)
            self.results["steps"][name]["output_tail"] = "\n".join(
                output.replace("\r", "\n").splitlines()[-60:]
            )
        self.say(f"-- {name}: {status} in {secs:.0f} s" + (f"\n{tail}" if tail else ""))
        return code, output


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after "(command) state"
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


# ---------------------------------------------------------------------------------------------------------------
# steps


def step_setup(c: Check) -> None:
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if c.dry or not wheels:
        c.results["steps"]["setup"] = {
            "status": "skipped: " + ("dry run" if c.dry else "no .whl/ (make wheelhouse)")
        }
        c.say(f"== setup: {c.results['steps']['setup']['status']}")
        return
    site = Path("/tmp/mmrope_site")
    code, _ = c.run(
        "setup",
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(site),
            *map(str, wheels),
        ],
        120,
    )
    if code == 0:
        c.env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"


def step_versions(c: Check) -> None:
    probe = (
        "import json, torch, transformers\n"
        "from mmrope.attention import TORCH_VARLEN, TORCH_VARLEN_REASON\n"
        "print(json.dumps({'python': __import__('sys').version.split()[0], 'torch': torch.__version__,"
        " 'transformers': transformers.__version__, 'cuda': torch.cuda.is_available(),"
        " 'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',"
        " 'torch_varlen': TORCH_VARLEN is not None, 'torch_varlen_reason': TORCH_VARLEN_REASON}))"
    )
    code, out = c.run("versions", [sys.executable, "-c", probe], 60)
    if code == 0:
        c.results["env"] = json.loads(out.strip().splitlines()[-1])


def step_tests(c: Check, name: str, select: str, cap_s: float) -> None:
    junit = c.out / f"{name}.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        "-k",
        select,
        "-rfEs",
        f"--junitxml={junit}",
        *GPU_TEST_FILES,
    ]
    code, out = c.run(name, cmd, cap_s)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    c.results["steps"][name]["counts"] = counts
    junit.unlink(missing_ok=True)  # the counts are kept; $OUT brings back few files


def step_bench(c: Check) -> None:
    out = c.out / "bench_step.json"
    if c.dry:
        args = [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--tokens",
            "1536",
            # each path once, its warm-up step timed (CPU figures are not what a dry run is for)
            "--steps",
            "0",
            "--dipe-lengths",
            "512",
            "1024",
            "--variants",
            "all",
            "first_n=1+compile",
            # graph capture and autograd split as on the GPU, no C++ code generation (15-20 s on 2 cores with
            # a cold cache); inductor itself compiles on CPU in tests/unit/model/test_compile.py
            "--compile-backend",
            "aot_eager",
            "--profile",
        ]
    else:
        # DIPE at 32K only (its goals are there; 8K and 16K were measured in the first GPU session)
        args = ["--steps", "2", "--baseline-steps", "1", "--dipe-lengths", "32768", "--profile"]
        args += c.bench_args
    out.unlink(missing_ok=True)
    c.run("bench", [sys.executable, "tests/perf/gpu_bench_step.py", *args, "--out", str(out)], 300)
    if out.exists():  # written after each phase: a timed-out run still leaves what it measured
        bench = json.loads(out.read_text())
        scan = bench.get("dipe_vs_mrope") or [{}]
        bench["dipe_32k"] = max(scan, key=lambda e: e.get("tokens", 0))
        c.results["bench"] = bench


def step_train(c: Check, name: str, extra: list[str], steps: int, nproc: int = 1) -> None:
    run_name = f"gpu-check-{name}"
    work = c.out / "work" if c.dry else Path("/tmp/mmrope_gpu_check")
    overrides = [
        f"trainer.run_name={run_name}",
        f"trainer.output_dir={work / 'runs'}",
        f"data.cache_dir={c.cache_dir or work / 'cache'}",
        "trainer.resume=never",
        "trainer.wandb.mode=disabled",
        f"trainer.max_steps={steps}",
        "trainer.log_every=1",
        f"trainer.save_every={steps}",
        "trainer.optim.warmup_steps=2",
        "deepspeed=zero2",
        "model.attn_backend=auto",
        "data.max_tokens=2048",
        f"data.synthetic.num_samples={200 if c.dry else 600}",
        f"data.synthetic.samples_per_shard={100 if c.dry else 200}",
        *extra,
    ]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run"]
    launcher += [] if nproc == 1 else ["--standalone", "--nproc_per_node", str(nproc)]
    c.run(name, [*launcher, "train.py", *overrides], 120)
    log = work / "runs" / run_name / "metrics.jsonl"
    if not log.exists():
        return
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/loss" in r]
    if rows:
        tail = (
            rows[len(rows) // 2 :] or rows
        )  # steady state: the first steps include start-up and compilation
        c.results[name] = {
            "steps": rows[-1]["step"],
            "first_loss": rows[0]["train/loss"],
            "last_loss": rows[-1]["train/loss"],
            "loss_falls": rows[-1]["train/loss"] < rows[0]["train/loss"],
            "tokens_per_s": _mean(r.get("perf/tokens_per_s") for r in tail),
            "mfu": _mean(r.get("perf/mfu") for r in tail),
            "peak_mem_gb": max(r.get("perf/peak_mem_gb", 0.0) for r in rows),
        }


def step_train_sp(c: Check, extra: list[str], steps: int) -> None:
    """Sequence parallelism over 2 ranks: each encodes its share of the row's images, one all-gather restores them
    (mmrope.distributed.vision_split), then Ulysses attention. Needs 2 devices: the dry run's 2 CPU ranks (gloo)."""
    import torch

    if not c.dry and torch.cuda.device_count() < 2:
        c.results["steps"]["train_sp"] = {"status": "skipped: needs 2 GPUs"}
        c.say("== train_sp: skipped, needs 2 GPUs")
        return
    step_train(c, "train_sp", ["trainer.sequence_parallel_size=2", *extra], steps, nproc=2)


def step_attention(c: Check) -> None:
    if c.dry:
        args = [
            "--device",
            "cpu",
            "--lengths",
            "256",
            "512",
            # DIPE only: its growth is the figure; each measurement is a process, mostly start-up (~2.5 s on
            # CPU), and the packed baseline's attention runs in every train step anyway
            "--variants",
            "dipe-routed-sdpa_varlen",
            # 2 at a time, 1 thread each
            "--jobs",
            "2",
            "--threads",
            "1",
        ]
    else:
        args = [
            "--device",
            "cuda",
            "--no-check",
            "--repeats",
            "3",
            "--variants",
            "mrope-varlen",
            "dipe-routed-varlen",
            "mrope-sdpa_varlen",
            "dipe-routed-sdpa_varlen",
        ]
    code, out = c.run("attention", [sys.executable, "tests/perf/bench_attention.py", *args], 150)
    table = [
        {"variant": v, "seq_len": int(n), "time": float(t), "peak": float(p)}
        for v, n, t, p in re.findall(r"^(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s*$", out, flags=re.M)
    ]
    if not table:
        return
    result = {"rows": table, "units": "CPU: s, MB of RSS growth" if c.dry else "CUDA: ms, GiB above inputs"}
    dipe = sorted((r for r in table if r["variant"].startswith("dipe-")), key=lambda r: r["seq_len"])
    by_variant: dict[str, list[dict]] = {}
    for r in dipe:
        by_variant.setdefault(r["variant"], []).append(r)
    fast = by_variant.get("dipe-routed-varlen") or next(iter(by_variant.values()), [])
    if len(fast) >= 2 and fast[0]["peak"] > 0:
        result["dipe_memory_growth"] = fast[-1]["peak"] / fast[0]["peak"]
        result["dipe_memory_growth_lengths"] = [fast[0]["seq_len"], fast[-1]["seq_len"]]
    c.results["attention"] = result


# ---------------------------------------------------------------------------------------------------------------
# report


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def _get(results: dict, path: str):
    node = results
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def goals(results: dict) -> dict[str, dict]:
    out = {}
    for name, (path, op, threshold) in GOALS.items():
        value = _get(results, path)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out[name] = {"value": value, "met": met}
    return out


def results_block(results: dict, command: str) -> str:
    env, bench = results.get("env", {}), results.get("bench", {})
    lines = [
        f"### GPU check, {results['date']} ({'DRY RUN on CPU' if results['dry'] else env.get('device', '?')})",
        "",
        f"Command: `{command}`, commit `{results['commit']}`; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, Python {env.get('python')}; torch varlen kernel: "
        f"{'yes' if env.get('torch_varlen') else 'no (' + str(env.get('torch_varlen_reason')) + ')'}.",
        "",
        "| step | status | seconds | detail |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in results["steps"].items():
        detail = ", ".join(f"{v} {k}" for k, v in s.get("counts", {}).items())
        if "first_attempt" in s:  # a retried step says so, with how its first attempt ended
            detail = f"retried: the first attempt {s['first_attempt']['status']}" + (
                f"; {detail}" if detail else ""
            )
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {detail} |")
    if bench:
        lines += [
            "",
            f"Step benchmark ({bench.get('preset')}, {bench.get('num_layers')} decoder layers, "
            f"{bench.get('real_tokens')} real tokens in {bench.get('samples')} samples, "
            f"peak {bench.get('peak_tflops')} TFLOP/s):",
            "",
            "| path | step s | tokens/s | MFU | LLM MFU | peak GiB | first loss |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for path in ("baseline", "mmrope"):
            p = bench.get(path, {})
            if "step_s" not in p:
                lines.append(f"| {path} | {p.get('error', 'n/a')} | | | | | |")
                continue
            lines.append(
                f"| {path} | {p['step_s']:.3f} | {p['tokens_per_s']:,.0f} | {p['mfu']:.1%} | "
                f"{_pct(p.get('llm_mfu'))} | {p['peak_mem_gib']:.1f} | {p['first_loss']:.4f} |"
            )
        if bench.get("speedup_tokens_per_s"):
            lines.append(
                f"\nmmrope / usual recipe tokens/s: **{bench['speedup_tokens_per_s']:.2f}x**; loss "
                f"difference {bench.get('loss_abs_diff', float('nan')):.2e}."
            )
        variants = bench.get("variants") or {}
        if variants:
            lines += [
                "",
                "mmrope's variants (recompute mode; `+compile` = model.compile"
                + (
                    f" with torch.compile backend {bench['compile_backend']}"
                    if bench.get("compile_backend", "inductor") != "inductor"
                    else ""
                )
                + ", `+liger` = loss.backend=liger):",
                "",
                "| variant | step s | tokens/s | LLM MFU | peak GiB |",
                "| --- | --- | --- | --- | --- |",
            ]
            for name, v in variants.items():
                if "step_s" not in v:
                    lines.append(f"| {name} | {v.get('error', 'n/a')} | | | |")
                    continue
                lines.append(
                    f"| {name} | {v['step_s']:.3f} | {v['tokens_per_s']:,.0f} | {_pct(v.get('llm_mfu'))} | "
                    f"{v['peak_mem_gib']:.1f} |"
                )
        for name, prof in (bench.get("profile") or {}).items():
            if "error" in prof:
                lines.append(f"\nProfile of one `{name}` step: {prof['error']}")
                continue
            busy = prof.get("busy_fraction")
            lines += [
                "",
                f"Profile of one `{name}` step ({prof['unit']}, {prof['total_ms']:.0f} ms in all"
                + (f", {busy:.0%} of the step's wall time" if busy is not None else "")
                + "):",
                "",
                "| category | ms | share |",
                "| --- | --- | --- |",
            ]
            lines += [f"| {k} | {v['ms']:.1f} | {v['share']:.1%} |" for k, v in prof["categories"].items()]
            lines += ["", "| top kernel | category | calls | ms |", "| --- | --- | --- | --- |"]
            lines += [
                f"| `{t['name'][:80]}` | {t['category']} | {t['calls']} | {t['ms']:.1f} |"
                for t in prof["top"][:8]
            ]
        scan = bench.get("dipe_vs_mrope") or []
        if scan:
            lines += [
                "",
                "| tokens | MRoPE step s | DIPE step s | time ratio | MRoPE GiB | DIPE GiB | memory ratio |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for e in scan:
                m, d = e.get("mrope", {}), e.get("dipe", {})
                lines.append(
                    f"| {e['tokens']} | {m.get('step_s', float('nan')):.3f} | {d.get('step_s', float('nan')):.3f} | "
                    f"{e.get('step_time_ratio', float('nan')):.3f} | {m.get('peak_mem_gib', float('nan')):.1f} | "
                    f"{d.get('peak_mem_gib', float('nan')):.1f} | {e.get('peak_mem_ratio', float('nan')):.3f} |"
                )
    for name in ("train_mrope", "train_dipe", "train_lora", "train_qlora", "train_sp"):
        t = results.get(name)
        if t:
            lines.append(
                f"\n{name}: {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f} "
                f"({'falls' if t['loss_falls'] else 'DOES NOT FALL'}), {_num(t['tokens_per_s'])} tokens/s, "
                f"peak {t['peak_mem_gb']:.2f} GB."
            )
    full = results.get("train_mrope") or {}
    for name in ("train_lora", "train_qlora"):  # the same trainer run, adapters instead of full training
        t = results.get(name) or {}
        if full.get("tokens_per_s") and t.get("tokens_per_s") and full.get("peak_mem_gb"):
            lines.append(
                f"{name} / full: tokens/s {t['tokens_per_s'] / full['tokens_per_s']:.2f}x, peak memory "
                f"{t['peak_mem_gb'] / full['peak_mem_gb']:.2f}x."
            )
    att = results.get("attention")
    if att:
        lines += [
            "",
            f"Attention alone ({att['units']}):",
            "",
            "| variant | L | time | peak |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {r['variant']} | {r['seq_len']} | {r['time']} | {r['peak']} |" for r in att["rows"]]
    lines += ["", "| goal (issues 14, 23) | value | met |", "| --- | --- | --- |"]
    for name, g in results["goals"].items():
        v = g["value"]
        shown = "n/a" if v is None else f"{v:.1%}" if "MFU" in name else f"{v:.3f}"
        lines.append(f"| {name} | {shown} | {'n/a' if g['met'] is None else 'yes' if g['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _commit() -> str:
    if os.environ.get("MMROPE_COMMIT"):
        return os.environ["MMROPE_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no .git; set MMROPE_COMMIT)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="every step on CPU at tiny sizes")
    ap.add_argument(
        "--out", type=Path, default=None, help="results folder (default: $OUT, else runs/gpu-check)"
    )
    ap.add_argument("--budget-s", type=float, default=470.0, help="overall time budget of all steps")
    ap.add_argument("--skip", nargs="*", default=[], help="steps to leave out (e.g. compiled)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="reuse this data cache for the train steps")
    ap.add_argument(
        "--bench-args", default="", help="extra arguments of gpu_bench_step.py, e.g. '--layers 8'"
    )
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out, args.budget_s, args.dry)
    c.cache_dir = args.cache_dir
    c.bench_args = args.bench_args.split()
    if not args.dry:
        c.env.setdefault("DS_ACCELERATOR", "cuda")
    c.results.update(
        dry=args.dry,
        commit=_commit(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    steps = {
        "setup": lambda: step_setup(c),
        "versions": lambda: step_versions(c),
        "tests": lambda: step_tests(c, "tests", f"not ({COMPILING})", 120),
        "train_mrope": lambda: step_train(c, "train_mrope", [], 20),
        "bench": lambda: step_bench(c),
        "train_dipe": lambda: step_train(c, "train_dipe", ["rope.dipe=true"], 20),
        # full (train_mrope) vs LoRA vs QLoRA: step time and peak memory of the same trainer run
        "train_lora": lambda: step_train(c, "train_lora", ["adapter=lora"], 20),
        "train_qlora": lambda: step_train(c, "train_qlora", ["adapter=qlora"], 20),
        "train_sp": lambda: step_train_sp(c, [], 20),
        "attention": lambda: step_attention(c),
        "compiled": lambda: step_tests(c, "compiled", COMPILING, 170),
    }
    if args.dry:  # tiny and quick: the point is that every step still runs
        tiny = ["data.max_tokens=512", "data.num_workers=0"]
        steps["train_mrope"] = lambda: step_train(c, "train_mrope", tiny, 3)
        steps["train_dipe"] = lambda: step_train(c, "train_dipe", ["rope.dipe=true", *tiny], 2)
        steps["train_lora"] = lambda: step_train(c, "train_lora", ["adapter=lora", *tiny], 2)
        steps["train_sp"] = lambda: step_train_sp(c, tiny, 2)
        del steps["train_qlora"]  # CUDA only (refused on CPU, naming adapter=qlora)

    def run_step(name: str) -> None:
        if name in args.skip:
            c.results["steps"][name] = {"status": "skipped: --skip"}
            return
        try:
            steps[name]()
        except Exception as err:  # a broken step must not cost the figures of the others
            c.results["steps"][name] = {"status": f"error: {type(err).__name__}: {err}"}
            c.say(f"-- {name}: error {type(err).__name__}: {err}")

    # On a GPU the steps run one after another: each is timed, and they share the device. The dry run times
    # nothing and its steps are independent (separate run folders, a data cache safe for concurrent writers),
    # mostly single-threaded start-up (imports): two at a time, in the same order. Setup goes first (it sets the
    # steps' PYTHONPATH on a GPU box).
    for name in steps:
        c.results["steps"][name] = {"status": "not run"}  # the report keeps the steps' order
    run_step("setup")
    with ThreadPoolExecutor(2 if args.dry else 1) as pool:
        list(pool.map(run_step, [n for n in steps if n != "setup"]))
    c.results["goals"] = goals(c.results)
    command = "make gpu-check DRY=1" if args.dry else "make gpu-check"
    (out / "gpu_check.json").write_text(json.dumps(c.results, indent=1, default=str))
    block = results_block(c.results, command)
    (out / "RESULTS_block.md").write_text(block)
    c.say("\n" + block)
    return c.results


if __name__ == "__main__":
    results = main()
    failed = [n for n, s in results["steps"].items() if not str(s["status"]).startswith(("ok", "skipped"))]
    sys.exit(1 if failed else 0)
