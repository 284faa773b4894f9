"""Every MRoPE-family VLM of transformers through the one seam (tiny fp32 models from config, CPU).

References are transformers' own stock models (logits and `get_rope_index`) and the installed model run on
each sample alone / without a cache, never the code under test's internals.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmrope.encodings import build
from mmrope.model.attention_layer import MMRopeAttention
from mmrope.model.families import FAMILIES, EncodingMisfit, check_encoding, text_geometry
from mmrope.model.generate import greedy_generate
from mmrope.model.install import install, seam_kwargs
from mmrope.model.linear_attention import PackedLinearAttention
from tests.unit.model.tiny import PAD_ID, TOKENS, image_sample, pixels, tiny_family, video_sample

ALL = sorted(FAMILIES)
NEW = ["qwen2_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
MODALITY = {TOKENS.image_token_id: 1, TOKENS.video_token_id: 2}


def stock_encoding(model):
    """The family's own encoding with the model's own sections (what the stock rotary computes)."""
    family = FAMILIES[model.config.model_type]
    section = list(model.config.text_config.rope_parameters["mrope_section"])
    return build(family.stock_encoding, mrope_section=section)


def mm_types(ids_BL):
    types = torch.zeros_like(ids_BL, dtype=torch.int32)
    for token, kind in MODALITY.items():
        types[ids_BL == token] = kind
    return types


def sample_with_media(family):
    """One sample: text, an image (4x6 patches), text; Qwen2-VL also a 2-frame contiguous video."""
    ids, grid = image_sample(5, (4, 6), 4, seed=11)
    media = {"pixel_values": pixels(grid, 3), "image_grid_thw": grid}
    if family == "qwen2_vl":
        vids, vgrid = video_sample(2, (2, 4, 4), 3, seed=12)
        ids = torch.cat([ids, vids])
        media |= {"pixel_values_videos": pixels(vgrid, 4), "video_grid_thw": vgrid}
    return ids[None], media


@pytest.mark.parametrize("family", ALL)
@torch.no_grad()
def test_stock_encoding_installed_equals_stock_model(family):
    ids_BL, media = sample_with_media(family)
    stock = tiny_family(family, attn="eager")
    hf_pos, _ = stock.model.get_rope_index(
        ids_BL,
        mm_types(ids_BL),
        image_grid_thw=media["image_grid_thw"],
        video_grid_thw=media.get("video_grid_thw"),
    )
    ref = stock(input_ids=ids_BL, position_ids=hf_pos, use_cache=False, **media).logits

    enc = stock_encoding(stock)
    layout = FAMILIES[family].layout
    pos_3BL, _ = enc.position_ids(
        ids_BL,
        tokens=TOKENS,
        image_grid_thw=media["image_grid_thw"],
        video_grid_thw=media.get("video_grid_thw"),
        layout=layout,
    )
    assert torch.equal(pos_3BL.long(), hf_pos.long()), f"{enc.name} positions differ from {family}'s own"

    model = install(copy.deepcopy(stock), enc)  # attn_backend auto: per-sample SDPA on CPU
    assert set(model.state_dict()) == set(stock.state_dict())  # stock keys: export stays a stock checkpoint
    kw = seam_kwargs(cu_seqlens=torch.tensor([0, ids_BL.shape[1]]))
    out = model(input_ids=ids_BL, position_ids=pos_3BL, use_cache=False, **media, **kw).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    # The check can fail: another encoding changes the logits far beyond that tolerance.
    other = install(copy.deepcopy(stock), build("vanilla"))
    vanilla_pos, _ = build("vanilla").position_ids(ids_BL, tokens=TOKENS, layout=layout, **_grids(media))
    moved = other(input_ids=ids_BL, position_ids=vanilla_pos, use_cache=False, **media, **kw).logits
    assert (moved - ref).abs().max() > 1e-4  # tiny init weights: small, but 10x the tolerance


def _grids(media):
    return {k: media[k] for k in ("image_grid_thw", "video_grid_thw") if k in media}


def test_qwen3_5_layers_are_composed_not_copied():
    model = tiny_family("qwen3_5")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    install(model, stock_encoding(model))
    layers = model.model.language_model.layers
    assert [type(getattr(layer, "linear_attn", None) or layer.self_attn) for layer in layers] == [
        PackedLinearAttention,
        MMRopeAttention,
    ]
    assert layers[1].self_attn.output_gate, "Qwen3.5's gated attention was not recognised"
    state = model.state_dict()
    assert set(state) == set(keys) and all(torch.equal(state[k], v) for k, v in keys.items())
    # one set of tensors: a parameter update is seen by the stock forward the layer delegates to
    mixer = layers[0].linear_attn
    assert mixer.in_proj_qkv is mixer._stock[0].in_proj_qkv and mixer.A_log is mixer._stock[0].A_log


def _packed_samples(family):
    a, ga = image_sample(3, (4, 4), 5, seed=1)
    b = torch.randint(
        2, 50, (70,), generator=torch.Generator().manual_seed(2)
    )  # > one 64-token delta-rule chunk
    c, gc = image_sample(2, (4, 6), 3, seed=3)
    return [(a, ga), (b, None), (c, gc)]


def _run_packed(model, enc, samples, layout):
    ids_L = torch.cat([s for s, _ in samples])
    grids = [g for _, g in samples if g is not None]
    grid = torch.cat(grids)
    cu = torch.tensor([0] + torch.tensor([len(s) for s, _ in samples]).cumsum(0).tolist())
    pos_3BL = enc.packed_position_ids(ids_L, cu, tokens=TOKENS, image_grid_thw=grid, layout=layout)[:, None]
    px = torch.cat([pixels(g, int(g.sum())) for g in grids])
    kw = seam_kwargs(cu_seqlens=cu)
    out = model(input_ids=ids_L[None], position_ids=pos_3BL, pixel_values=px, image_grid_thw=grid, **kw)
    return out.logits[0], cu


def _alone(model, enc, ids, grid, layout):
    pos_3BL, _ = enc.position_ids(ids[None], tokens=TOKENS, image_grid_thw=grid, layout=layout)
    px = pixels(grid, int(grid.sum())) if grid is not None else None
    return model(
        input_ids=ids[None], position_ids=pos_3BL, pixel_values=px, image_grid_thw=grid, use_cache=False
    ).logits[0]


@pytest.mark.parametrize("family", ALL)
@torch.no_grad()
def test_packed_row_equals_samples_alone(family):
    model = tiny_family(family, seed=5)
    enc = stock_encoding(model)
    install(model, enc)
    layout = FAMILIES[family].layout
    samples = _packed_samples(family)
    packed, cu = _run_packed(model, enc, samples, layout)
    for i, (ids, grid) in enumerate(samples):
        alone = _alone(model, enc, ids, grid, layout)
        torch.testing.assert_close(packed[cu[i] : cu[i + 1]], alone, rtol=0, atol=1e-5)


# Hyperparameters for 8 rotary pairs (Qwen3.5 at head_dim 64 x partial_rotary_factor 0.25); mhrope counts KV heads.
QWEN3_5_CASES = {
    "vanilla": {},
    "v2pe": {},
    "mrope": {"mrope_section": [2, 3, 3]},
    "mrope_i": {"mrope_section": [4, 2, 2], "spatial_reset": True},
    "mhrope": {"mrope_section": [1, 1, 1], "num_key_value_heads": 3},
    "videorope": {"mrope_section": [2, 3, 3]},
    "hope": {"mrope_section": [2, 3, 3], "fixed_temporal_scale": 1.0},
    "circlerope": {"mrope_section": [2, 3, 3]},
    "ilrope": {"mrope_section": [4, 2, 2], "text_axes": "temporal"},
    "omnirope": {"mrope_section": [2, 3, 3]},
    "lumos": {},
    "grape": {"mrope_section": [2, 3, 3], "grape_mode": "mixed", "block_size": 4},
}


@pytest.mark.parametrize("name", sorted(QWEN3_5_CASES))
@torch.no_grad()
def test_any_encoding_packs_on_qwen3_5(name):
    """Partial rotary (8 of 64 channels), the gated attention and the delta-net layers with every encoding."""
    heads = 3 if name == "mhrope" else 2
    model = tiny_family("qwen3_5", num_heads=heads, num_kv_heads=heads, seed=6)
    enc = build(name, **QWEN3_5_CASES[name])
    install(model, enc)
    samples = _packed_samples("qwen3_5")
    packed, cu = _run_packed(model, enc, samples, "qwen3")
    for i, (ids, grid) in enumerate(samples):
        torch.testing.assert_close(
            packed[cu[i] : cu[i + 1]], _alone(model, enc, ids, grid, "qwen3"), rtol=0, atol=1e-5
        )


@torch.no_grad()
def test_delta_net_gets_the_sample_boundaries():
    """The packed delta-net layer equals the stock mixer run on each sample alone, and the boundaries matter:
    the stock mixer over the whole row (state carried across) gives other outputs for the later samples."""
    model = install(tiny_family("qwen3_5", seed=7), build("mrope_i", mrope_section=[4, 2, 2]))
    layer = model.model.language_model.layers[0].linear_attn
    stock = layer._stock[0]
    lengths = [5, 70, 9]
    cu = torch.tensor([0, 5, 75, 84])
    x_1Ld = torch.randn(
        1, sum(lengths), model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    packed = layer(x_1Ld, **seam_kwargs(cu_seqlens=cu))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(packed[:, s:e], stock(x_1Ld[:, s:e]), rtol=0, atol=1e-6)
    carried = stock(x_1Ld)
    assert (carried[:, 5:] - packed[:, 5:]).abs().max() > 1e-3
    torch.testing.assert_close(carried[:, :5], packed[:, :5], rtol=0, atol=1e-6)


def test_dipe_on_qwen3_5():
    from mmrope.encodings import anchored_positions

    enc = build("mrope", mrope_section=[2, 3, 3])
    model = install(tiny_family("qwen3_5", seed=8), enc, dipe=True)
    eager = install(tiny_family("qwen3_5", seed=8), enc, dipe=True, attn_backend="eager")
    samples = _packed_samples("qwen3_5")
    ids_L = torch.cat([s for s, _ in samples])
    grids = [g for _, g in samples if g is not None]
    grid = torch.cat(grids)
    cu = torch.tensor([0] + torch.tensor([len(s) for s, _ in samples]).cumsum(0).tolist())
    pos_3BL = enc.packed_position_ids(ids_L, cu, tokens=TOKENS, image_grid_thw=grid)[:, None]
    visual_BL = (ids_L == TOKENS.image_token_id)[None]
    static = anchored_positions(pos_3BL, visual_BL, cu_seqlens=cu)
    kw = seam_kwargs(cu_seqlens=cu, static_position_ids=static, visual_mask_BL=visual_BL)
    px = torch.cat([pixels(g, int(g.sum())) for g in grids])
    args = dict(input_ids=ids_L[None], position_ids=pos_3BL, pixel_values=px, image_grid_thw=grid)
    out = model(**args, **kw).logits
    with torch.no_grad():
        torch.testing.assert_close(out, eager(**args, **kw).logits, rtol=0, atol=1e-5)
    F.cross_entropy(out[0, :-1], ids_L[1:]).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert [n for n in no_grad if "visual" not in n] == []


def _reference_greedy(model, enc, ids_BL, grid, mask_BL, steps, layout):
    """argmax of repeated full forwards (no cache), positions of the whole sequence from the encoding."""
    px = torch.cat([pixels(g[None], int(g.sum())) for g in grid])
    seq, mask = ids_BL, mask_BL
    for _ in range(steps):
        pos_3BL, _ = enc.position_ids(
            seq, tokens=TOKENS, image_grid_thw=grid, attention_mask_BL=mask, layout=layout
        )
        logits = model(
            input_ids=seq,
            position_ids=pos_3BL,
            pixel_values=px,
            image_grid_thw=grid,
            use_cache=False,
            **seam_kwargs(attention_mask_BL=mask),
        ).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seq


@pytest.mark.parametrize("family,rope", [(f, None) for f in NEW] + [("qwen3_5", "omnirope_temporal")])
@torch.no_grad()
def test_greedy_with_cache_equals_full_forwards(family, rope):
    """KV cache (and Qwen3.5's conv + recurrent state cache) with a left-padded batch of two prompts; also
    OmniRoPE with temporal text, whose decoded tokens sit at (p, 0, 0)."""
    model = tiny_family(family, seed=1)
    enc = (
        stock_encoding(model)
        if rope is None
        else build("omnirope", mrope_section=[2, 3, 3], text_axes="temporal")
    )
    install(model, enc)
    layout = FAMILIES[family].layout
    (a, ga), _, (c, gc) = _packed_samples(family)
    length = max(len(a), len(c))
    ids_BL = torch.full((2, length), PAD_ID)
    mask_BL = torch.zeros(2, length, dtype=torch.long)
    for row, s in enumerate((a, c)):
        ids_BL[row, length - len(s) :] = s
        mask_BL[row, length - len(s) :] = 1
    grid = torch.cat([ga, gc])
    px = torch.cat([pixels(g[None], int(g.sum())) for g in grid])
    got = greedy_generate(
        model,
        enc,
        ids_BL,
        pixel_values=px,
        image_grid_thw=grid,
        attention_mask_BL=mask_BL,
        max_new_tokens=4,
        tokens=TOKENS,
        layout=layout,
    )
    assert torch.equal(got, _reference_greedy(model, enc, ids_BL, grid, mask_BL, 4, layout))
    # the padded row generates what it generates alone (left padding is neutral for the delta-net state too)
    alone = greedy_generate(
        model,
        enc,
        c[None],
        pixel_values=px[ga.prod() :],
        image_grid_thw=gc,
        max_new_tokens=4,
        tokens=TOKENS,
        layout=layout,
    )
    assert torch.equal(got[1, length - len(c) :], alone[0])


# -- refusals -----------------------------------------------------------------------------------------------


def test_mhrope_needs_the_models_kv_heads():
    model = tiny_family("qwen3_5", num_heads=2, num_kv_heads=1)
    with pytest.raises(EncodingMisfit, match="num_key_value_heads") as err:
        install(model, build("mhrope"))
    assert err.value.hparam == "num_key_value_heads"


def test_chunked_sections_must_cover_qwen3_5_partial_rotary():
    """Real Qwen3.5 rotates 32 pairs (head_dim 256 x 0.25): the shipped chunked [16, 24, 24] cannot fit."""
    from transformers import Qwen3_5TextConfig

    geometry = text_geometry(
        Qwen3_5TextConfig(head_dim=256, rope_parameters={"rope_type": "default", "rope_theta": 1e7})
    )
    assert geometry.num_rotary_pairs == 32
    for name in ("mrope", "omnirope", "circlerope", "grape", "videorope", "hope"):
        with pytest.raises(EncodingMisfit, match=r"mrope_section.*e\.g\. \[8, 12, 12\]") as err:
            check_encoding(build(name), geometry)
        assert err.value.hparam == "mrope_section"
        check_encoding(build(name, mrope_section=[8, 12, 12]), geometry)
    check_encoding(
        build("mrope_i"), geometry
    )  # interleaved: [24, 20, 20] acts as [11, 11, 10], like the stock


def test_sliding_window_layers_are_refused():
    model = tiny_family("qwen2_vl")
    model.model.language_model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding-window"):
        install(model, build("mrope", mrope_section=[2, 3, 3]))
