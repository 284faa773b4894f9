"""Every new MRoPE family end to end on CPU: 2 ranks under ZeRO-2 and ZeRO-3 (packed rows, frozen ViT), export
of the ZeRO-3 checkpoint to a stock Hugging Face directory, then, on the exported weights: the stock model's
logits per sample == the installed model on a packed row, and greedy KV-cache generation == full forwards.

One torchrun runs all (family, stage) trainings in one process group (start-up paid once); tiny shapes.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, clean_env, tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 2
RUNS = {  # family -> the encoding it is trained with: its own, so the export is a stock checkpoint
    "qwen2_vl": "mrope",
    "qwen3_vl_moe": "mrope_i",
    "qwen3_5": "mrope_i",
    "qwen3_5_moe": "mrope_i",
}
STAGES = (2, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("families")
    overrides = tiny_overrides(
        cache_dir,
        out / "runs",
        "trainer.global_batch_size=2",
        "trainer.resume=never",
        "trainer.optim.lr=1e-2",
    )
    runs = ",".join(f"{family}:{stage}:{rope}" for family, rope in RUNS.items() for stage in STAGES)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(ROOT / "tests/integration/family_worker.py"),
        str(out),
        str(STEPS),
        runs,
        *overrides,
    ]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def load_ranks(out, family: str, stage: int) -> list[dict]:
    return [torch.load(out / f"{family}-z{stage}" / f"rank_{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("family", sorted(RUNS))
def test_trains_under_zero2_and_zero3(trained, family):
    for stage in STAGES:
        r0, r1 = load_ranks(trained, family, stage)
        assert r0["losses"] == pytest.approx(r1["losses"], rel=0, abs=1e-6), stage
        assert all(torch.isfinite(torch.tensor(r0["losses"])))
        assert r0["param_sums"] == r1["param_sums"], f"ranks disagree under ZeRO-{stage}"
        assert max(r0["samples_per_row"] + r1["samples_per_row"]) > 1, "no packed row: packing not exercised"
        params, initial = r0["params"], r0["initial"]
        vision = [n for n in params if n.startswith("model.visual.") and ".merger." not in n]
        assert vision and all(torch.equal(params[n], initial[n]) for n in vision), "frozen ViT moved"
        moved = [n for n in params if not torch.equal(params[n], initial[n])]
        assert any(".merger." in n for n in moved), "connector did not train"
        layers = [n for n in params if n.startswith("model.language_model.layers.")]
        assert set(layers) <= set(moved) | {n for n in layers if "experts" in n or ".gate." in n}, (
            f"LLM layers did not train under ZeRO-{stage}: {sorted(set(layers) - set(moved))[:5]}"
        )
        if family.startswith("qwen3_5"):  # the delta-net layers train through the packed path
            assert any(".linear_attn.conv1d." in n for n in moved) and any(
                ".linear_attn.A_log" in n for n in moved
            )


def _sample(ids: dict[str, int], num_text: int, grid_hw: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    n_img = (grid_hw[0] // 2) * (grid_hw[1] // 2)
    row = torch.cat(
        [
            torch.randint(10, 200, (num_text,), generator=g),
            torch.tensor(
                [ids["vision_start_token_id"]]
                + [ids["image_token_id"]] * n_img
                + [ids["vision_end_token_id"]]
            ),
            torch.randint(10, 200, (4,), generator=g),
        ]
    )
    pixels = torch.randn(grid_hw[0] * grid_hw[1], 3 * 2 * 14 * 14, generator=g)
    return row, torch.tensor([[1, *grid_hw]]), pixels


@pytest.mark.parametrize("family", sorted(RUNS))
@torch.no_grad()
def test_export_is_stock_and_generates(trained, family, tmp_path):
    from data.processor import load_processor
    from mmrope.encodings import TokenIds, build
    from mmrope.model.families import FAMILIES
    from mmrope.model.generate import greedy_generate
    from mmrope.model.install import install, seam_kwargs
    from mmrope.train.export import export

    r0, _ = load_ranks(trained, family, 3)
    out = export(r0["step_dir"], tmp_path / "exported")
    meta = json.loads((out / "mmrope_encoding.json").read_text())
    assert (meta["model_family"], meta["name"], meta["stock"]) == (family, RUNS[family], True)
    stock = (
        FAMILIES[family].model_class.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    )
    state = stock.state_dict()
    for name, p in r0["params"].items():  # every trained tensor (frozen ViT included), bitwise
        assert torch.equal(state[name], p), name

    ids = load_processor(out).special_ids
    tokens = TokenIds(
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    enc = build(meta["name"], **meta["hparams"])
    model = install(copy.deepcopy(stock), enc)
    samples = [_sample(ids, 5, (4, 6), 1), _sample(ids, 70, (4, 4), 2)]  # 70: past one delta-rule chunk
    ids_L = torch.cat([s for s, _, _ in samples])
    grid = torch.cat([g for _, g, _ in samples])
    pixels = torch.cat([p for _, _, p in samples])
    cu = torch.tensor([0, len(samples[0][0]), len(ids_L)])
    pos = enc.packed_position_ids(ids_L, cu, tokens=tokens, image_grid_thw=grid, layout=meta["layout"])
    packed = model(
        input_ids=ids_L[None],
        position_ids=pos[:, None],
        pixel_values=pixels,
        image_grid_thw=grid,
        use_cache=False,
        **seam_kwargs(cu_seqlens=cu),
    ).logits[0]
    for i, (row, g, px) in enumerate(samples):
        types = (row == tokens.image_token_id).int()[None]
        hf_pos, _ = stock.model.get_rope_index(row[None], types, image_grid_thw=g)
        ref = stock(
            input_ids=row[None], position_ids=hf_pos, pixel_values=px, image_grid_thw=g, use_cache=False
        )
        torch.testing.assert_close(packed[cu[i] : cu[i + 1]], ref.logits[0], rtol=1e-5, atol=1e-5)

    # Greedy generation with the cache (left padding) == argmax of repeated full forwards.
    (a, ga, pa), (b, gb, pb) = samples
    length = len(b)
    prompt = torch.full((2, length), ids["pad_token_id"])
    mask = torch.zeros(2, length, dtype=torch.long)
    for r, s in enumerate((a, b)):
        prompt[r, length - len(s) :], mask[r, length - len(s) :] = s, 1
    kw = dict(pixel_values=torch.cat([pa, pb]), image_grid_thw=torch.cat([ga, gb]))
    got = greedy_generate(
        model,
        enc,
        prompt,
        attention_mask_BL=mask,
        max_new_tokens=3,
        tokens=tokens,
        layout=meta["layout"],
        **kw,
    )
    seq = prompt
    for _ in range(3):
        m = torch.cat([mask, torch.ones(2, seq.shape[1] - length, dtype=torch.long)], 1)
        p, _ = enc.position_ids(
            seq,
            tokens=tokens,
            image_grid_thw=kw["image_grid_thw"],
            attention_mask_BL=m,
            layout=meta["layout"],
        )
        logits = model(
            input_ids=seq, position_ids=p, use_cache=False, **kw, **seam_kwargs(attention_mask_BL=m)
        ).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq)
