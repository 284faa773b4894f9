"""Export: a trained ZeRO checkpoint -> HF directory that stock transformers loads in a fresh process and that
computes the training model's logits (fp32, <= 1e-5)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import clean_env
from tests.integration.test_checkpoint import params, record_step, session

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter: the CLI, then stock transformers on the exported directory (no mmrope import).
FRESH = """
import sys, torch
from mmrope.train.export import main
ckpt, out, inputs, logits_out = sys.argv[1:5]
main([ckpt, "--out", out])
sys.modules.pop("mmrope", None)
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
batch = torch.load(inputs)
with torch.no_grad():
    logits = model(**batch, use_cache=False).logits
tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
torch.save({"logits": logits, "chat_template": tok.chat_template,
            "params": {k: v.clone() for k, v in model.state_dict().items()}}, logits_out)
"""


# ZeRO-3 also trains with a non-default mrope_section: stock transformers must split the rotary channels the
# way training did (the export writes the section into config.json).
@pytest.mark.parametrize("stage,section", [(2, None), (3, "[32,16,16]")])
def test_export_matches_training_model_in_a_fresh_process(tmp_path, cache_dir, stage, section):
    from mmrope.model.install import seam_kwargs

    s = session(
        cache_dir,
        tmp_path,
        f"deepspeed=zero{stage}",
        "trainer.run_name=export",
        "trainer.resume=never",
        "trainer.max_steps=2",
        "trainer.optim.lr=1e-2",
        *([f"rope.hparams.mrope_section={section}"] if section else []),
    )
    initial = None if stage == 3 else params(s)
    for _ in range(2):
        record_step(s)
    step_dir = s.trainer.save()
    row = next(s.trainer.rows)
    assert row["pixel_values"] is not None, "the row has no image: the ViT would not be checked"
    cu_seqlens = row["cu_seqlens"]
    # Stock transformers reads a packed row from 4-row position_ids: a per-sample text index 0..n-1 first
    # (it derives the block-diagonal causal mask from it), then the 3 M-RoPE rows.
    text_L = torch.cat([torch.arange(int(n)) for n in cu_seqlens.diff()])
    position_ids = torch.cat([text_L.view(1, 1, -1).to(row["position_ids"].dtype), row["position_ids"]])
    images = {"pixel_values": row["pixel_values"], "image_grid_thw": row["image_grid_thw"]}
    vlm = s.engine.module.vlm
    vlm.eval()
    with torch.no_grad():  # the training path: installed encoding, packing as cu_seqlens
        hidden = vlm.model(
            input_ids=row["input_ids"],
            position_ids=row["position_ids"],
            use_cache=False,
            **images,
            **seam_kwargs(cu_seqlens=cu_seqlens),
        ).last_hidden_state
        expected = vlm.lm_head(hidden)
    batch = {"input_ids": row["input_ids"], "position_ids": position_ids, **images}
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(vlm.parameters())):
            trained = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    else:
        trained = params(s)
    s.metrics.close()
    torch.save(batch, tmp_path / "inputs.pt")

    out = tmp_path / "exported"
    env = clean_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH,
            str(step_dir.parent),
            str(out),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "fresh.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=False)

    torch.testing.assert_close(fresh["logits"], expected, rtol=0, atol=1e-5)
    # Every trained tensor (frozen ViT included) is in the export, bitwise in fp32.
    for name, p in trained.items():
        assert torch.equal(fresh["params"][name], p), name
    assert any(n.startswith("model.visual.blocks.") for n in trained), "no ViT parameters checked"
    if initial is not None:
        assert any(not torch.equal(trained[n], initial[n]) for n in trained), "training did not move weights"
    assert (out / "model.safetensors").is_file()
    assert fresh["chat_template"], "chat template lost"
    encoding = json.loads((out / "mmrope_encoding.json").read_text())
    assert encoding["name"] == "mrope" and encoding["stock"] is True and encoding["trained_steps"] == 2


@pytest.mark.parametrize(
    "name,hparams,dipe,family,stock",
    [
        ("mrope", {}, False, "qwen2_5_vl", True),
        ("mrope", {"mrope_section": [32, 16, 16]}, False, "qwen2_5_vl", True),  # written to config.json
        ("mrope", {}, True, "qwen2_5_vl", False),  # DIPE: stock attention cannot do it
        ("mrope_i", {}, False, "qwen2_5_vl", False),  # Qwen2.5-VL's stock rotary is chunked, not interleaved
        ("mrope_i", {}, False, "qwen3_vl", True),
        ("mrope_i", {"spatial_reset": True}, False, "qwen3_vl", False),  # stock positions never reset
        ("mrope", {}, False, "qwen3_vl", False),
        ("vanilla", {}, False, "qwen2_5_vl", False),
    ],
)
def test_which_exports_stock_transformers_reproduces(name, hparams, dipe, family, stock):
    from mmrope.train.export import is_stock

    assert is_stock(name, hparams, dipe, family) is stock


def test_learned_grape_planes_survive_export(tmp_path, cache_dir):
    """GRAPE's learned planes live in the installed rotary module, not in the transformers model: the export
    writes them beside it and `mmrope.from_pretrained` loads them (same logits as training); without the file
    the load is refused rather than run with untrained planes."""
    import mmrope
    from mmrope.encodings import build as build_encoding
    from mmrope.model.build import build_model
    from mmrope.model.install import seam_kwargs, text_model
    from mmrope.pretrained import ROTARY_FILE
    from mmrope.train.export import main
    from mmrope.train.run import install_encoding
    from tests.conftest import tiny_overrides
    from tests.integration.test_checkpoint import compose_cfg

    s = session(
        cache_dir,
        tmp_path,
        "rope=grape",
        "rope.hparams.grape_mode=axis",
        "trainer.run_name=grape",
        "trainer.resume=never",
        "trainer.max_steps=1",
        "trainer.optim.lr=1e-2",
    )
    vlm = s.engine.module.vlm
    planes = text_model(vlm).rotary_emb.rotary
    initial = {n: p.detach().clone() for n, p in planes.named_parameters()}
    assert initial, "grape_mode=axis has no learned parameters: nothing to check"
    record_step(s)
    step_dir = s.trainer.save()
    row = next(s.trainer.rows)
    inputs = dict(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False)
    inputs.update(pixel_values=row["pixel_values"], image_grid_thw=row["image_grid_thw"])
    packing = seam_kwargs(cu_seqlens=row["cu_seqlens"])
    vlm.eval()
    with torch.no_grad():
        expected = vlm.lm_head(vlm.model(**inputs, **packing).last_hidden_state)
    trained = {n: p.detach().clone() for n, p in planes.named_parameters()}
    s.metrics.close()
    assert any(not torch.equal(trained[n], initial[n]) for n in trained), "training did not move the planes"

    out = tmp_path / "exported"
    main([str(step_dir), "--out", str(out)])
    model, _ = mmrope.from_pretrained(out)
    loaded = dict(text_model(model).rotary_emb.rotary.named_parameters())
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    with torch.no_grad():
        logits = model.lm_head(model.model(**inputs, **packing).last_hidden_state)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    # the export as the base of a new run: the same encoding continues from the trained planes, another starts
    # from its own init
    for hparams, continues in (
        ("rope.hparams.grape_mode=axis", True),
        ("rope.hparams.grape_mode=axis rope.hparams.rope_init=false", False),
    ):
        cfg = compose_cfg(
            tiny_overrides(
                cache_dir,
                tmp_path,
                "rope=grape",
                *hparams.split(),
                "model.kind=pretrained",
                f"model.path={out}",
            )
        )
        base = build_model(cfg.model, seed=0)
        install_encoding(base, build_encoding(cfg.rope.name, **cfg.rope.hparams), cfg)
        started = dict(text_model(base).rotary_emb.rotary.named_parameters())
        same = all(torch.equal(started[n], trained[n]) for n in trained)
        assert same is continues, hparams

    (out / ROTARY_FILE).unlink()
    with pytest.raises(ValueError, match=ROTARY_FILE):
        mmrope.from_pretrained(out)
