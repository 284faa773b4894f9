"""The GPU step benchmark runs end to end on CPU (tiny preset), and its two paths optimise the same loss.

mmrope's path (one packed row, installed encoding, per-sample attention, chunked loss on supervised tokens)
and the usual one (padded micro batches, stock attention with a padding mask, full logits, transformers'
loss) see identical weights, so their first losses must agree: this checks the whole packed pipeline
against transformers' own, not just the speed script.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_bench_paths_agree_on_the_loss():
    spec = importlib.util.spec_from_file_location("gpu_bench_step", ROOT / "tests/perf/gpu_bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--preset", "tiny", "--device", "cpu", "--tokens", "1536", "--steps", "1"]
    # a variant that cannot run (the tiny preset has 2 layers) is recorded, and the one after it still runs
    r = bench.main([*args, "--variants", "all", "first_n=99", "every_k=2"])
    assert "activation_checkpointing_layers" in r["variants"]["first_n=99"]["error"], r["variants"]
    assert r["variants"]["every_k=2"]["first_loss"] == pytest.approx(
        r["variants"]["all"]["first_loss"], abs=1e-5
    )
    assert r["best"]["variant"] in ("all", "every_k=2") and r["mmrope"]["variant"] == "all"
    assert (
        r["samples"] >= 2 and r["baseline_padded_tokens"] > r["real_tokens"]
    )  # the baseline pays for padding
    assert r["loss_abs_diff"] < 1e-4, r
    for path in ("baseline", "mmrope"):
        assert r[path]["step_s"] > 0 and r[path]["tokens_per_s"] > 0 and 0 < r[path]["mfu"] < 1
