"""Ulysses sequence parallelism on CPU (gloo): 2 ranks with trainer.sequence_parallel_size=2 against 1 process
without SP, on the same packed rows (images, a video, text-only samples; one row of odd length, so padded).

One torchrun launch (`sp_worker.py`) runs every case: per encoding (and Qwen3-VL with its deepstack features) the plain model's loss and gradients (the
reference, no SP, no DeepSpeed) and the SP engine's under ZeRO-2 and ZeRO-3 (+ activation checkpointing), then a
training session under SP resumed from a checkpoint next to the uninterrupted one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, clean_env, tiny_overrides

pytestmark = pytest.mark.slow
STAGES = (2, 3)
CASES = ("mrope", "mrope_i", "mhrope", "grape:axis", "vanilla", "mrope+dipe", "mrope_i@qwen3_vl")
RESUME_CASE = "mrope+dipe"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, cache_dir) -> list[dict]:
    out = tmp_path_factory.mktemp("sp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(ROOT / "tests/integration/sp_worker.py"), str(out), ",".join(map(str, STAGES)), ",".join(CASES),
        RESUME_CASE, "--", *tiny_overrides(cache_dir, out / "runs"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", CASES)
def test_sp_equals_one_rank_without_sp(ranks, stage, case):
    for r in ranks:
        res = r["parity"][(stage, case)]
        # The rows hold what the issue asks for; one of them needs padding to a multiple of 2.
        assert res["media"] == ["pixel_values", "pixel_values_videos"]
        assert res["text_only_samples"] > 0
        assert any(n % 2 for n in res["row_lens"]), res["row_lens"]
        # Loss: the sum of the ranks' shares equals the whole rows' loss (fp32 sums in another order).
        assert res["sp_loss"] == pytest.approx(res["ref_loss"], rel=0, abs=1e-6)
        # Every trainable parameter's gradient (connector, LLM, GRAPE's planes) within 1e-6.
        ref, sp = res["ref_grads"], res["sp_grads"]
        assert ref.keys() == sp.keys()
        for name in ref:
            assert (ref[name] is None) == (sp[name] is None), name
            if ref[name] is not None:
                torch.testing.assert_close(sp[name], ref[name], rtol=0, atol=1e-6, msg=name)
        assert sum(float(g.abs().sum()) for g in ref.values() if g is not None) > 0
        if case.startswith("grape"):
            planes = [n for n in ref if "rotary_emb" in n]
            assert planes and all(ref[n] is not None and ref[n].abs().sum() > 0 for n in planes), planes


def test_resume_under_sp_equals_uninterrupted(ranks):
    for r in ranks:
        full, resumed = r["resume"]["full"], r["resume"]["resumed"]
        assert resumed["start"] == 2
        assert [s["step"] for s in resumed["steps"]] == [3, 4]
        # Same rows and the same loss at steps 3 and 4, and the same parameters at the end.
        for a, b in zip(full["steps"][2:], resumed["steps"]):
            assert a["rows"] == b["rows"]
            assert a["loss"] == b["loss"]
        assert full["params"].keys() == resumed["params"].keys()
        for name in full["params"]:
            torch.testing.assert_close(
                resumed["params"][name], full["params"][name], rtol=0, atol=0, msg=name
            )
    # Both ranks of the SP group trained the same rows and agree on the loss.
    assert [s["loss"] for s in ranks[0]["resume"]["full"]["steps"]] == [
        s["loss"] for s in ranks[1]["resume"]["full"]["steps"]
    ]
    assert ranks[0]["resume"]["full"]["steps"][0]["rows"] == ranks[1]["resume"]["full"]["steps"][0]["rows"]
