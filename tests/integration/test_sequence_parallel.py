"""Ulysses sequence parallelism on CPU (gloo): 2 ranks with trainer.sequence_parallel_size=2 (and 4 ranks with 4)
against 1 process without SP, on the same packed rows (images, a video, text-only samples; one row of odd length,
so padded). Every rank encodes only its share of the rows' images and videos (mmrope.distributed.vision_split).

One torchrun launch per group size (`sp_worker.py`) runs every case: per encoding (and Qwen3-VL with its deepstack
features) the plain model's loss and gradients (the reference, no SP, no DeepSpeed) and the SP engine's under
ZeRO-2 and ZeRO-3 (+ activation checkpointing); the 2-rank launch then runs a training session under SP resumed
from a checkpoint next to the uninterrupted one.
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
DUMMY_PATCHES = 4  # the 1 x 2 x 2 grid a rank encodes when its share of a media kind is empty
# SP=4 needs 4 query heads (head_dim 64: 32 rotary pairs; the one KV head is repeated to 4): the plain encoding
# and Qwen3-VL's deepstack, both ZeRO stages. Rows of 160 tokens hold 2-3 images or videos: fewer than the ranks,
# so some rank encodes nothing of a row and joins the all-gather with an empty share.
CASES_4 = ("mrope", "mrope_i@qwen3_vl")
OVERRIDES_4 = [
    "model.tiny.num_attention_heads=4",
    "rope.hparams.mrope_section=[8,12,12]",
    "data.max_tokens=160",
]


def launch(out, nproc: int, cases, resume_case: str, cache_dir, *extra: str) -> list[dict]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
        str(ROOT / "tests/integration/sp_worker.py"), str(out), ",".join(map(str, STAGES)), ",".join(cases),
        resume_case, "--", *tiny_overrides(cache_dir, out / "runs"), *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, cache_dir) -> list[dict]:
    return launch(tmp_path_factory.mktemp("sp"), 2, CASES, RESUME_CASE, cache_dir)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory, cache_dir) -> list[dict]:
    return launch(tmp_path_factory.mktemp("sp4"), 4, CASES_4, "none", cache_dir, *OVERRIDES_4)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", CASES)
def test_sp_equals_one_rank_without_sp(ranks, stage, case):
    check_parity(ranks, stage, case)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", CASES_4)
def test_sp4_equals_one_rank_without_sp(ranks4, stage, case):
    check_parity(ranks4, stage, case)


def check_parity(ranks: list[dict], stage: int, case: str) -> None:
    """Each rank's SP loss and gradients equal the reference's; the group encoded every image once."""
    for r in ranks:
        res = r["parity"][(stage, case)]
        # The rows hold what the issue asks for; one of them needs padding to a multiple of the group size.
        assert res["media"] == ["pixel_values", "pixel_values_videos"]
        assert res["text_only_samples"] > 0
        assert any(n % len(ranks) for n in res["row_lens"]), res["row_lens"]
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
        connector = [n for n in ref if ".visual.merger." in n]
        assert connector and all(ref[n].abs().sum() > 0 for n in connector), connector
        if case.startswith("grape"):
            planes = [n for n in ref if "rotary_emb" in n]
            assert planes and all(ref[n] is not None and ref[n].abs().sum() > 0 for n in planes), planes
    check_vision_split(ranks, stage, case)


def check_vision_split(ranks: list[dict], stage: int, case: str) -> None:
    """Over the group, every image and video of a row went through the vision tower exactly once; a rank with an
    empty share of a media kind ran the tiny dummy grid (DUMMY_PATCHES) instead, and no rank ran the whole row."""
    rows = ranks[0]["parity"][(stage, case)]["row_patches"]
    calls = [r["parity"][(stage, case)]["vit_patches"] for r in ranks]
    assert all(len(c) == len(calls[0]) for c in calls), calls  # ZeRO-3: the same number of tower calls
    real = sum(n for c in calls for n in c if n != DUMMY_PATCHES)
    assert DUMMY_PATCHES not in [n for row in rows for n in row]  # else the count below would be ambiguous
    assert real == sum(map(sum, rows)), (calls, rows)
    assert max(sum(c) for c in calls) < sum(map(sum, rows)), (calls, rows)
    if len(ranks) == 4:  # the rows hold fewer media than ranks: for a row, some rank encoded only dummies
        assert all(len(row) < 4 for row in rows), rows
        assert any(n == DUMMY_PATCHES for c in calls for n in c), calls


def test_resume_under_sp_equals_uninterrupted(ranks):
    # The sessions split the vision work: the two ranks encoded different images.
    assert ranks[0]["resume"]["vit_patches"] != ranks[1]["resume"]["vit_patches"]
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
