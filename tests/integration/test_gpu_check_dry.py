"""`make gpu-check DRY=1`: the prepared GPU check runs every one of its steps on CPU at tiny sizes.

The script is what a session with a GPU runs first, with little device time to spare: here it must get through
every step (tests, step benchmark, 2-3 step trainer runs (one of them on 2 ranks with sequence parallelism), attention benchmark) and write its figures and
the RESULTS.md block, so a broken import, a renamed option or a changed metric name fails CI, not the GPU run.
"""

from __future__ import annotations

import json
import subprocess
import warnings

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.slow


def test_dry_run_goes_through_every_step(tmp_path, cache_dir):
    cmd = ["make", "-s", "gpu-check", "DRY=1"]
    env = clean_env(OUT=str(tmp_path / "out"), GPU_CHECK_ARGS=f"--cache-dir {cache_dir}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = tmp_path / "out"
    results = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    # A failing step's own output (not only the report table printed last) is what explains the failure.
    for name, s in results.get(
        "steps", {}
    ).items():  # a step the script ran twice: how its first attempt ended
        if "first_attempt" in s:
            first = s["first_attempt"]
            warnings.warn(
                f"gpu-check step {name} was retried: {first['status']}\n{first.get('output_tail')}",
                stacklevel=1,
            )
    failing = {n: s for n, s in results.get("steps", {}).items() if "output_tail" in s}
    assert proc.returncode == 0, "\n\n".join(
        [f"== step {n}: {s['status']}\n{s['output_tail']}" for n, s in failing.items()]
        + [proc.stdout[-3000:], proc.stderr[-3000:]]
    )
    assert results["dry"] is True
    ran = {name for name, s in results["steps"].items() if s["status"] == "ok"}
    assert ran == {
        "versions",
        "tests",
        "bench",
        "train_mrope",
        "train_dipe",
        "train_lora",
        "train_sp",
        "attention",
        "compiled",
    }, results["steps"]
    # every figure the RESULTS block reports was produced
    bench = results["bench"]
    assert bench["loss_abs_diff"] < 1e-4  # both paths of the step benchmark optimise the same loss
    assert bench["mmrope"]["tokens_per_s"] > 0 and len(bench["dipe_vs_mrope"]) == 2
    # mmrope's variants: the compiled one with fewer recomputed layers trains the same loss (same weights, lr=0)
    variants = bench["variants"]
    assert list(variants) == ["all", "first_n=1+compile"], variants
    assert all("error" not in v for v in variants.values()), variants
    assert abs(variants["first_n=1+compile"]["first_loss"] - variants["all"]["first_loss"]) < 1e-4
    assert bench["best"]["variant"] in variants and bench["best"]["llm_mfu"] > 0
    for prof in bench["profile"].values():  # kernel-time breakdown of the first and last variant
        assert prof["categories"]["matmul"]["ms"] > 0 and prof["top"], prof
    assert all("step_time_ratio" in e for e in bench["dipe_vs_mrope"])
    assert results["train_mrope"]["steps"] == 3 and results["train_dipe"]["steps"] == 2
    assert (
        results["train_lora"]["steps"] == 2
        and "train_lora / full: tokens/s" in (out / "RESULTS_block.md").read_text()
    )
    assert results["train_sp"]["steps"] == 2  # 2 CPU ranks: the split vision tower and Ulysses (issue 23)
    assert results["attention"]["dipe_memory_growth"] > 0
    block = (out / "RESULTS_block.md").read_text()
    assert "make gpu-check DRY=1" in block and results["commit"] in block
    assert "Profile of one `all` step" in block and "| first_n=1+compile |" in block
    for goal in results["goals"]:
        assert goal in block
    assert (out / "gpu_check.log").stat().st_size > 0
