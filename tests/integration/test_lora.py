"""`adapter=lora` trained for real: 2 ranks on CPU under ZeRO-2 and ZeRO-3, then exported.

- ZeRO-2, Qwen2.5-VL, stock MRoPE, adapters on every role but lm_head (the ViT's fused qkv included);
- ZeRO-3, Qwen3.5 (gated delta-net layers), VideoRoPE + DIPE, every LLM layer recomputed, `model.compile=true`.

Each: the ranks agree; only adapters move (every frozen weight equals its initial value); the checkpoint holds the
adapters only; 0 -> 3 equals 0 -> 2 -> 3 (a second session resumes step 2) bitwise; the merged export computes the
trained (unmerged) model's logits in fp32 (<= 1e-5): in stock transformers for the stock encoding, through
`mmrope.from_pretrained` otherwise; and the `--adapter-only` folder, applied with PEFT to its base export, too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_zero_ranks import CUT, STEPS, launch
from tests.integration.zero_worker import seam_logits

pytestmark = pytest.mark.slow

VISION = "adapter.targets=[llm.attention,llm.mlp,connector,vision.attention,vision.mlp]"
RUNS = {
    "zero2_qwen2_5_vl_mrope": (2, ("adapter=lora", VISION)),
    "zero3_qwen3_5_videorope_dipe": (
        3,
        (
            "adapter=lora",
            "model.family=qwen3_5",
            "rope=videorope",
            "rope.dipe=true",
            "model.activation_checkpointing=all",
            "model.compile=true",
            "adapter.use_rslora=true",
            "adapter.dropout=0.1",  # random masks: exact resume restores the RNG too
        ),
    ),
}


SP_RUN = "sp2_zero2_qwen2_5_vl_mrope"  # the ZeRO-2 run's settings as one sequence-parallel group of 2 ranks


@pytest.fixture(scope="module")
def lora_launch(tmp_path_factory, cache_dir) -> tuple[Path, dict[str, list[dict]]]:
    """Both runs (each also resumed from step CUT) and the sequence-parallel one, in one launch of 2 ranks."""
    tmp = tmp_path_factory.mktemp("lora")
    runs = {name: (stage, extra, CUT) for name, (stage, extra) in RUNS.items()}
    runs[SP_RUN] = (2, (*RUNS["zero2_qwen2_5_vl_mrope"][1], "trainer.sequence_parallel_size=2"), None)
    return tmp / "runs", launch(tmp, cache_dir, runs)


@pytest.fixture(scope="module", params=list(RUNS))
def lora_run(request, lora_launch):
    runs, ranks = lora_launch
    return request.param, runs / request.param / "checkpoints", ranks[request.param]


def test_only_adapters_train_and_resume_is_exact(lora_run):
    name, ckpts, (r0, r1) = lora_run
    assert r0["losses"] == pytest.approx(r1["losses"], rel=0, abs=1e-6)
    assert torch.isfinite(torch.tensor(r0["losses"])).all()
    lora = [n for n in r0["trainable"] if ".lora_" in n]
    assert lora and lora == r0["trainable"], "something besides the adapters trains"
    if name.startswith("zero2"):
        assert any(".visual.blocks.0.attn.qkv.lora_A" in n for n in lora), (
            "the ViT's fused qkv is not adapted"
        )
    if "qwen3_5" in name:
        assert any(".linear_attn.in_proj_qkv.lora_A" in n for n in lora), (
            "the delta-net layers are not adapted"
        )
    moved = 0.0
    for n, p in r0["params"].items():
        torch.testing.assert_close(p, r1["params"][n], rtol=0, atol=0, msg=n)
        if n in lora:
            moved = max(moved, float((p - r0["initial"][n]).abs().max()))
        else:
            assert torch.equal(p, r0["initial"][n]), f"frozen {n} moved"
    assert moved > 1e-3, "the adapters barely moved: the checks below would prove little"
    assert all(not torch.equal(r0["params"][n], r0["initial"][n]) for n in lora if ".lora_B." in n)
    for r in (r0, r1):  # exact resume from the adapter-only checkpoint (the base rebuilt from the config)
        assert r["resumed_losses"] == r["losses"][CUT:]
        for n, p in r["params"].items():
            assert torch.equal(r["resumed_params"][n], p), f"{n} differs after the resume"
    # The checkpoint holds the adapters (+ their optimizer state), not the frozen base: far less than one copy of
    # the fp32 model.
    base_bytes = 4 * sum(p.numel() for p in r0["params"].values())
    assert r0["checkpoint_bytes"] < 0.5 * base_bytes, (r0["checkpoint_bytes"], base_bytes)


def _stock_logits(model, batch: dict) -> torch.Tensor:
    """Stock transformers on a packed row: a per-sample text index as position row 0 (it derives the block-
    diagonal causal mask from it), then the 3 M-RoPE rows (as tests/integration/test_export.py)."""
    text_L = torch.cat([torch.arange(int(n)) for n in batch["cu_seqlens"].diff()])
    position_ids = torch.cat([text_L.view(1, 1, -1).to(batch["position_ids"].dtype), batch["position_ids"]])
    media = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    media |= {k: batch[k] for k in ("pixel_values_videos", "video_grid_thw") if k in batch}
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=position_ids, use_cache=False, **media).logits


def test_merged_and_adapter_only_exports_compute_the_trained_model(lora_run, tmp_path):
    import mmrope
    from mmrope.model.families import FAMILIES
    from mmrope.train.export import main

    name, ckpts, (r0, _) = lora_run
    batch, expected = r0["probe_batch"], r0["probe_logits"]
    # fp32. Qwen3.5's tiny model (chunked gated delta rule, lr 1e-2 adapters) amplifies rounding: multiplying its
    # LLM matrices by (1 + 1.2e-7 * noise), i.e. one ulp, moves its logits (|logit| <= 4.3) by 6.8e-5, and
    # merging (W + s B A instead of x W + s (x A) B) by 1.2e-4 (measured); the eager export vs the compiled
    # training forward differ by 1.5e-5. Qwen2.5-VL: within 1e-5 throughout.
    atol = 2.5e-4 if "qwen3_5" in name else 1e-5
    assert "pixel_values" in batch or "pixel_values_videos" in batch, "the probe row has no media"
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    main([str(ckpts), "--out", str(merged)])  # the latest step: 3, saved by the resumed session
    main([str(ckpts), "--out", str(adapter), "--adapter-only"])
    meta = json.loads((merged / "mmrope_encoding.json").read_text())
    assert meta["trained_steps"] == STEPS
    cls = FAMILIES[meta["model_family"]].model_class

    # The merged export, through mmrope (the encoding installed from mmrope_encoding.json): the trained logits.
    model, _ = mmrope.from_pretrained(merged)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in model.named_parameters()), "not merged"
    torch.testing.assert_close(seam_logits(model.float().eval(), batch), expected, rtol=0, atol=atol)

    # The adapter folder on its base export, with PEFT (base/ names it in adapter_config.json).
    from peft import PeftModel

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((adapter / "base").resolve())
    assert (adapter / "adapter_model.safetensors").is_file()
    if meta["stock"]:  # Qwen2.5-VL + MRoPE: stock transformers, no mmrope anywhere
        assert name.startswith("zero2")
        stock = cls.from_pretrained(merged, local_files_only=True, dtype=torch.float32).eval()
        torch.testing.assert_close(_stock_logits(stock, batch), expected, rtol=0, atol=1e-5)
        base = cls.from_pretrained(
            config["base_model_name_or_path"], local_files_only=True, dtype=torch.float32
        )
        peft = PeftModel.from_pretrained(base, adapter).eval()
        torch.testing.assert_close(_stock_logits(peft, batch), expected, rtol=0, atol=1e-5)
        plain = cls.from_pretrained(adapter / "base", local_files_only=True, dtype=torch.float32).eval()
        assert (_stock_logits(plain, batch) - expected).abs().max() > 1e-3, "the adapters changed nothing"
    else:  # VideoRoPE + DIPE: the base export loads through mmrope (encoding installed), PEFT on top
        base, _ = mmrope.from_pretrained(adapter / "base")
        peft = PeftModel.from_pretrained(base.float(), adapter).eval()
        torch.testing.assert_close(seam_logits(peft.base_model.model, batch), expected, rtol=0, atol=atol)


def test_elastic_resume_of_an_adapter_checkpoint_on_one_rank(lora_run, cache_dir):
    """The 2-rank ZeRO-2 LoRA checkpoint of step CUT continues on 1 rank (DeepSpeed's universal checkpoint, built
    from a save without the frozen base): step CUT+1 has the loss the 2-rank run had there."""
    name, ckpts, (r0, _) = lora_run
    if not name.startswith("zero2"):
        pytest.skip("one elastic resume suffices (the ZeRO-2 run)")
    from tests.conftest import tiny_overrides
    from tests.integration.elastic_worker import run_steps
    from tests.integration.test_elastic_resume import _continue_from
    from tests.integration.test_zero_ranks import DATA_SEED

    runs = ckpts.parent.parent
    _continue_from(runs / name, runs / "one_rank", CUT)
    overrides = tiny_overrides(
        cache_dir, runs, "deepspeed=zero2", "trainer.global_batch_size=2", "trainer.run_name=one_rank",
        "trainer.resume=must", "trainer.optim.lr=1e-2", DATA_SEED, *RUNS[name][1],
    )  # fmt: skip
    out = run_steps(overrides, STEPS - CUT, [])
    assert out["start"] == CUT and (runs / "one_rank" / "checkpoints" / f"step_{CUT}" / "universal").is_dir()
    assert [s["loss"] for s in out["steps"]] == pytest.approx(r0["losses"][CUT:], rel=1e-5)
    for n, p in out["params"].items():  # the adapters after the step, as the 2-rank run had them
        torch.testing.assert_close(p, r0["params"][n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_under_sequence_parallelism_trains_what_data_parallel_lora_trains(lora_run, lora_launch):
    """2 ranks as one sequence-parallel group (`trainer.sequence_parallel_size=2`) train the rows the 2-rank
    data-parallel LoRA run trains: the same losses, the same adapters after the steps (the adapters sit inside the
    projections, before the q/k/v exchange)."""
    name, _, (r0, _) = lora_run
    if not name.startswith("zero2"):
        pytest.skip("compared with the ZeRO-2 run")
    sp0, sp1 = lora_launch[1][SP_RUN]
    assert sp0["losses"] == pytest.approx(sp1["losses"], rel=0, abs=1e-6)
    assert sp0["trainable"] == r0["trainable"]
    assert sp0["losses"] == pytest.approx(r0["losses"], rel=0, abs=5e-6)
    for n in r0["trainable"]:  # AdamW magnifies fp32 summation-order noise (as test_zero_ranks' SP test says)
        torch.testing.assert_close(sp0["params"][n], r0["params"][n], rtol=0, atol=1e-3, msg=n)
        torch.testing.assert_close(sp0["params"][n], sp1["params"][n], rtol=0, atol=0, msg=n)
