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
    r = bench.main(["--preset", "tiny", "--device", "cpu", "--tokens", "1536", "--steps", "1"])
    assert (
        r["samples"] >= 2 and r["baseline_padded_tokens"] > r["real_tokens"]
    )  # the baseline pays for padding
    assert r["loss_abs_diff"] < 1e-4, r
    for path in ("baseline", "mmrope"):
        assert r[path]["step_s"] > 0 and r[path]["tokens_per_s"] > 0 and 0 < r[path]["mfu"] < 1
