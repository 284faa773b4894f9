"""The visual-fading probe against explicit attention matrices.

References: (1) a plain eager attention written here from the spec (project each layer's captured input with its
own q/k projections, rotate-half RoPE with the encoding's cos/sin tables, full L x L softmax with causal +
same-sample masks; DIPE: `where(same modality, S_dyn, S_sta)` under one softmax, dipe.md section 4), and (2) for
MRoPE, transformers' own eager attention weights (`output_attentions=True` on the stock model).
"""

from __future__ import annotations

import pytest
import torch

from data.processing import IGNORE_INDEX
from mmrope.encodings import anchored_positions, build
from mmrope.eval.probe import ProbeRecorder, probe_query_mask, visual_attention_share
from mmrope.model.install import install, seam_kwargs
from tests.unit.model.tiny import TOKENS, image_sample, pixels, tiny_qwen2_5_vl

HEAD_DIM, THETA = 16, 10000.0
ENCODINGS = {"mrope": {"mrope_section": [2, 3, 3]}, "videorope": {"mrope_section": [2, 3, 3]}}


def _packed_row():
    """Two image samples and a text-only one packed in one row: ids [1, L], grids, cu_seqlens, pixels."""
    a, ga = image_sample(3, (4, 4), 9, seed=1)
    b = torch.randint(2, 50, (6,), generator=torch.Generator().manual_seed(2))
    c, gc = image_sample(2, (4, 6), 8, seed=3)
    ids_L = torch.cat([a, b, c])
    cu = torch.tensor([0, len(a), len(a) + len(b), len(ids_L)])
    grid = torch.cat([ga, gc])
    px = torch.cat([pixels(ga, 1), pixels(gc, 2)])
    return ids_L[None], grid, cu, px


def _query_mask(ids_BL: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Every text token after the last vision_end of its sample, plus all of the text-only sample."""
    mask = torch.zeros_like(ids_BL, dtype=torch.bool)
    for s in range(len(cu) - 1):
        lo, hi = int(cu[s]), int(cu[s + 1])
        ends = (ids_BL[0, lo:hi] == TOKENS.vision_end_token_id).nonzero().flatten()
        start = lo + int(ends[-1]) + 1 if ends.numel() else lo
        mask[0, start:hi] = True
    return mask


def _rotate(x_BHLD, cos_BLD, sin_BLD):
    x1, x2 = x_BHLD.chunk(2, dim=-1)
    return x_BHLD * cos_BLD[:, None] + torch.cat([-x2, x1], dim=-1) * sin_BLD[:, None]


def _reference_shares(model, hidden_by_layer, enc, pos_3BL, static_3BL, ids_BL, cu, query_BL):
    """{layer: [H, Q_sel]} from the explicit L x L attention probabilities."""
    lm = model.model.language_model
    num_heads, num_kv = lm.config.num_attention_heads, lm.config.num_key_value_heads
    seq_len = ids_BL.shape[1]
    doc_L = torch.searchsorted(cu[1:], torch.arange(seq_len), right=True)
    idx = torch.arange(seq_len)
    allowed_LL = (idx[:, None] >= idx[None, :]) & (doc_L[:, None] == doc_L[None, :])
    visual_L = ids_BL[0] == TOKENS.image_token_id
    cos, sin = enc.cos_sin(pos_3BL, head_dim=HEAD_DIM, rope_theta=THETA)
    out = {}
    for layer_idx, h_BLd in hidden_by_layer.items():
        attn = lm.layers[layer_idx].self_attn
        q = attn.q_proj(h_BLd).view(1, seq_len, num_heads, HEAD_DIM).transpose(1, 2)
        k = attn.k_proj(h_BLd).view(1, seq_len, num_kv, HEAD_DIM).transpose(1, 2)
        k = _rotate(k, cos, sin).repeat_interleave(num_heads // num_kv, dim=1)
        scores_HLL = (_rotate(q, cos, sin) @ k.transpose(-1, -2))[0] * HEAD_DIM**-0.5
        if static_3BL is not None:
            cos_s, sin_s = enc.cos_sin(static_3BL, head_dim=HEAD_DIM, rope_theta=THETA)
            scores_sta_HLL = (_rotate(q, cos_s, sin_s) @ k.transpose(-1, -2))[0] * HEAD_DIM**-0.5
            same_LL = visual_L[:, None] == visual_L[None, :]
            scores_HLL = torch.where(same_LL, scores_HLL, scores_sta_HLL)
        probs_HLL = torch.softmax(scores_HLL.masked_fill(~allowed_LL, float("-inf")), dim=-1)
        share_HL = probs_HLL[:, :, visual_L].sum(-1)
        out[layer_idx] = share_HL[:, query_BL[0]]
    return out


def _probe_vs_reference(enc_name: str, dipe: bool):
    torch.manual_seed(0)
    enc = build(enc_name, **ENCODINGS[enc_name])
    model = install(tiny_qwen2_5_vl(seed=3), enc, attn_backend="sdpa", dipe=dipe)
    ids_BL, grid, cu, px = _packed_row()
    pos_3BL = enc.packed_position_ids(ids_BL[0], cu, tokens=TOKENS, image_grid_thw=grid)[:, None]
    visual_BL = ids_BL == TOKENS.image_token_id
    kw = seam_kwargs(cu_seqlens=cu)
    static = None
    if dipe:
        static = anchored_positions(pos_3BL, visual_BL, cu_seqlens=cu)
        kw |= seam_kwargs(static_position_ids=static, visual_mask_BL=visual_BL)
    query_BL = _query_mask(ids_BL, cu)
    recorder = ProbeRecorder(query_BL, visual_BL)

    hidden: dict[int, torch.Tensor] = {}
    lm = model.model.language_model
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: hidden.__setitem__(
                i, kwargs.get("hidden_states", args[0] if args else None)
            ),
            with_kwargs=True,
        )
        for i, layer in enumerate(lm.layers)
    ]
    args = dict(input_ids=ids_BL, position_ids=pos_3BL, pixel_values=px, image_grid_thw=grid)
    with torch.no_grad():
        plain = model(**args, **kw).logits
        probed = model(**args, **kw, mmrope_probe=recorder).logits
        for h in hooks:
            h.remove()
        ref = _reference_shares(model, hidden, enc, pos_3BL, static, ids_BL, cu, query_BL)
    assert torch.equal(plain, probed)  # the probe only observes
    assert sorted(recorder.shares) == sorted(ref) == list(range(len(lm.layers)))
    for layer, ref_HQ in ref.items():
        torch.testing.assert_close(recorder.shares[layer], ref_HQ, atol=2e-6, rtol=1e-5)
        assert recorder.layer_means()[layer] == pytest.approx(float(ref_HQ.mean()), abs=1e-6)
    # non-trivial: image queries see the image, the text-only sample's queries see none
    text_only = query_BL[0, int(cu[1]) : int(cu[2])].sum()
    q_before = int(query_BL[0, : int(cu[1])].sum())
    assert (recorder.shares[0][:, q_before : q_before + text_only] == 0).all()
    assert (recorder.shares[0][:, :q_before] > 0.01).all()
    return recorder, model, args, kw, query_BL


@pytest.mark.parametrize("enc_name", sorted(ENCODINGS))
def test_probe_matches_explicit_attention(enc_name):
    _probe_vs_reference(enc_name, dipe=False)


def test_probe_matches_explicit_joint_softmax_dipe():
    recorder, *_ = _probe_vs_reference("mrope", dipe=True)
    plain, *_ = _probe_vs_reference("mrope", dipe=False)
    # DIPE routes the inter-modal logits through the static query: the shares must differ from plain MRoPE
    assert any((recorder.shares[i] - plain.shares[i]).abs().max() > 1e-5 for i in recorder.shares)


@torch.no_grad()
def test_probe_matches_transformers_eager_attention_weights():
    """MRoPE: the probe on the installed model == the visual mass of the stock model's eager attention weights."""
    stock = tiny_qwen2_5_vl(seed=4, attn="eager")
    mine = install(tiny_qwen2_5_vl(seed=4), build("mrope", **ENCODINGS["mrope"]))
    mine.load_state_dict(stock.state_dict())
    ids, grid = image_sample(4, (4, 6), 10, seed=5)
    ids_BL = ids[None]
    px = pixels(grid, 1)
    types = (ids_BL == TOKENS.image_token_id).int()
    pos, _ = stock.model.get_rope_index(
        ids_BL, types, image_grid_thw=grid, attention_mask=torch.ones_like(ids_BL)
    )
    visual_BL = ids_BL == TOKENS.image_token_id
    query_BL = torch.zeros_like(visual_BL)
    query_BL[0, -8:] = True
    recorder = ProbeRecorder(query_BL, visual_BL)
    mine(input_ids=ids_BL, position_ids=pos, pixel_values=px, image_grid_thw=grid, mmrope_probe=recorder)
    out = stock(
        input_ids=ids_BL, position_ids=pos, pixel_values=px, image_grid_thw=grid, output_attentions=True
    )
    assert len(out.attentions) == len(recorder.shares)
    for layer, probs_BHLL in enumerate(out.attentions):
        ref_HQ = probs_BHLL[0][:, query_BL[0]][:, :, visual_BL[0]].sum(-1)
        torch.testing.assert_close(recorder.shares[layer], ref_HQ, atol=2e-6, rtol=1e-5)


def test_share_worked_example_and_chunking():
    # docstring example: logits [0, 1, 1, 0] for a text query over [VS, P, P, q] -> 2e / (2e + 2)
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).expand(1, 1, 4, 2).contiguous()
    k = torch.tensor([[0.0, 0], [1, 0], [1, 0], [0, 0]]).view(1, 1, 4, 2)
    query = torch.tensor([[False, False, False, True]])
    visual = torch.tensor([[False, True, True, False]])
    share = visual_attention_share(q, k, query_mask_BL=query, visual_BL=visual, scale=1.0)
    e = torch.e
    assert float(share) == pytest.approx(2 * e / (2 * e + 2), rel=1e-6)
    # chunking over queries does not change anything
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    query, visual = torch.rand(2, 9, generator=g) > 0.3, torch.rand(2, 9, generator=g) > 0.5
    full = visual_attention_share(q, k, query_mask_BL=query, visual_BL=visual, scale=0.3)
    chunked = visual_attention_share(q, k, query_mask_BL=query, visual_BL=visual, scale=0.3, chunk_size=2)
    torch.testing.assert_close(full, chunked)
    assert full.shape == (4, int(query.sum()))


def test_probe_query_mask_and_errors():
    labels = torch.tensor([IGNORE_INDEX] * 4 + [5, 6, IGNORE_INDEX, 7])
    assert probe_query_mask(labels, 2).tolist() == [False, False, True, True, True, True, False, False]
    with pytest.raises(ValueError, match="no supervised answer"):
        probe_query_mask(labels, 5)
    with pytest.raises(ValueError, match="same"):
        ProbeRecorder(torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool))


def test_probe_cli_on_exported_dirs(tmp_path, tiny_processor, synthetic_shards):
    """The CLI on two exported-format dirs (same weights, with and without DIPE): csv rows, means and the plot."""
    import csv
    import json

    from mmrope.eval.probe import main
    from mmrope.model.build import build_model
    from mmrope.model.config import ModelConfig

    model = build_model(
        ModelConfig(),
        vocab_size=len(tiny_processor.tokenizer),
        special_ids=tiny_processor.special_ids,
        seed=0,
    )
    dirs = []
    for dipe in (False, True):
        out = tmp_path / f"export_dipe{int(dipe)}"
        model.save_pretrained(out)
        tiny_processor.save(out)
        meta = {
            "name": "mrope",
            "hparams": {},
            "dipe": dipe,
            "layout": "qwen2_5",
            "model_family": "qwen2_5_vl",
        }
        (out / "mmrope_encoding.json").write_text(json.dumps(meta))
        dirs.append(str(out))
    argv = [
        "--data",
        synthetic_shards[0],
        "--distances",
        "0,40",
        "--num-samples",
        "2",
        "--out",
        str(tmp_path),
    ]
    results = main([*argv, "--checkpoint", dirs[0], "--checkpoint", dirs[1]])
    rows = list(csv.DictReader((tmp_path / "probe.csv").open()))
    num_layers = model.config.text_config.num_hidden_layers
    assert len(rows) == 2 * 2 * (num_layers + 1)
    for ckpt in dirs:
        for d in (0, 40):
            layer_rows = [r for r in rows if r["checkpoint"] == ckpt and int(r["distance"]) == d]
            shares = {r["layer"]: float(r["share"]) for r in layer_rows}
            assert all(0.0 < s < 1.0 for s in shares.values())
            per_layer = [shares[str(i)] for i in range(num_layers)]
            assert shares["mean"] == pytest.approx(sum(per_layer) / num_layers, rel=1e-4)
            assert results[ckpt][d]["mean"] == pytest.approx(shares["mean"], rel=1e-4)
    # same weights: at distance 0 DIPE already changes the inter-modal logits (static query for text -> image)
    assert results[dirs[0]][0]["mean"] != pytest.approx(results[dirs[1]][0]["mean"], rel=1e-6)
    assert (tmp_path / "probe.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="--distances"):
        main([*argv[:2], "--distances", "0,x", "--out", str(tmp_path), "--checkpoint", dirs[0]])


def test_probe_counts_what_it_skips_and_writes_after_every_checkpoint(
    tmp_path, tiny_processor, synthetic_shards, capsys
):
    import csv
    import json
    from collections import Counter

    import webdataset as wds

    from data.processing import SampleProcessor
    from mmrope.encodings import build
    from mmrope.eval.probe import load_probe_samples, main, read_records
    from mmrope.model.build import build_model
    from mmrope.model.config import ModelConfig

    sp = SampleProcessor(tiny_processor, build("mrope"), max_tokens=4096, layout="qwen2_5")
    skipped: Counter = Counter()
    samples = load_probe_samples(read_records(synthetic_shards[:1]), sp, 40, skipped=skipped)
    records = list(wds.tarfile_to_samples()([{"url": synthetic_shards[0]}]))
    seen = records[: len(samples) + sum(skipped.values())]
    text_only = sum(not any(k.startswith(("img", "vid")) for k in r) for r in seen)
    video_only = sum(
        any(k.startswith("vid") for k in r) and not any(k.startswith("img") for k in r) for r in seen
    )
    assert text_only > 0 and skipped["no_image"] == text_only  # counted, by reason
    assert skipped["video_only"] == video_only

    model = build_model(
        ModelConfig(), vocab_size=len(tiny_processor.tokenizer), special_ids=tiny_processor.special_ids
    )
    good = tmp_path / "good"
    model.save_pretrained(good)
    tiny_processor.save(good)
    meta = {"name": "mrope", "hparams": {}, "dipe": False, "layout": "qwen2_5", "model_family": "qwen2_5_vl"}
    (good / "mmrope_encoding.json").write_text(json.dumps(meta))
    broken = tmp_path / "broken"
    broken.mkdir()
    argv = ["--data", synthetic_shards[0], "--distances", "0", "--num-samples", "40", "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="broken"):
        main([*argv, "--checkpoint", str(good), "--checkpoint", str(broken)])
    assert f"no_image={text_only}" in capsys.readouterr().out  # the CLI says what it skipped
    rows = list(csv.DictReader((tmp_path / "probe.csv").open()))
    assert rows and {r["checkpoint"] for r in rows} == {str(good)}  # the first checkpoint's results are kept
