"""The seam: install(model, encoding) on tiny fp32 Qwen2.5-VL models (CPU).

Parity references are transformers' own model (MRoPE) and the same installed model run on each sample alone /
unpadded / without a cache, never the code under test's internals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmrope.encodings import anchored_positions, available, build
from mmrope.model.attention_layer import MMRopeAttention
from mmrope.model.generate import greedy_generate
from mmrope.model.install import install, seam_kwargs
from tests.unit.model.tiny import PAD_ID, TOKENS, image_sample, pixels, tiny_qwen2_5_vl

# Hyperparameters that fit head_dim 16 (8 rotary pairs); mhrope counts KV heads.
HPARAMS: dict[str, dict] = {
    "vanilla": {},
    "v2pe": {},
    "mrope": {"mrope_section": [2, 3, 3]},
    "mrope_i": {"mrope_section": [3, 3, 2]},
    "mhrope": {"mrope_section": [1, 1, 1], "num_key_value_heads": 3},
    "videorope": {"mrope_section": [2, 3, 3]},
    "hope": {"mrope_section": [2, 3, 3], "fixed_temporal_scale": 1.0},
    "circlerope": {"mrope_section": [2, 3, 3]},
    "ilrope": {"mrope_section": [3, 3, 2]},
    "omnirope": {"mrope_section": [2, 3, 3]},
    "lumos": {},
    "grape": {"mrope_section": [2, 3, 3]},
    "grape_axis": {"mrope_section": [2, 3, 3], "grape_mode": "axis", "block_size": 4},
    "grape_mixed": {"mrope_section": [2, 3, 3], "grape_mode": "mixed", "block_size": 4},
    "grape_block_mixed": {"mrope_section": [2, 3, 3], "grape_mode": "block_mixed", "block_size": 4},
}
CASES = sorted(HPARAMS)


def _encoding(case: str):
    return build(case.split("_")[0] if case.startswith("grape") else case, **HPARAMS[case])


def _model(case: str, **kw):
    if case == "mhrope":
        return tiny_qwen2_5_vl(num_heads=3, num_kv_heads=3, **kw)
    return tiny_qwen2_5_vl(**kw)


def _samples():
    a, ga = image_sample(3, (4, 4), 5, seed=1)
    b = torch.randint(2, 50, (7,), generator=torch.Generator().manual_seed(2))
    c, gc = image_sample(2, (4, 6), 3, seed=3)
    return [(a, ga), (b, None), (c, gc)]


def _forward(model, enc, ids_BL, grid, *, dipe=False, cu_seqlens=None, mask_BL=None):
    """Logits of the installed model; positions (and DIPE anchors) computed by the encoding, as the data does."""
    px = pixels(grid, seed=int(grid.sum())) if grid is not None else None
    if cu_seqlens is not None:
        pos_3BL = enc.packed_position_ids(ids_BL[0], cu_seqlens, tokens=TOKENS, image_grid_thw=grid)[:, None]
    else:
        pos_3BL, _ = enc.position_ids(ids_BL, tokens=TOKENS, image_grid_thw=grid, attention_mask_BL=mask_BL)
    kw = seam_kwargs(cu_seqlens=cu_seqlens, attention_mask_BL=mask_BL)
    if dipe:
        visual_BL = ids_BL == TOKENS.image_token_id
        static = anchored_positions(pos_3BL, visual_BL, mask_BL, cu_seqlens=cu_seqlens)
        kw |= seam_kwargs(static_position_ids=static, visual_mask_BL=visual_BL)
    return model(input_ids=ids_BL, position_ids=pos_3BL, pixel_values=px, image_grid_thw=grid, **kw).logits


def _pixels_for(grids):
    # pixels of several images = concatenation of each image's pixels, seeded per image like `_forward`
    return torch.cat([pixels(g, seed=int(g.sum())) for g in grids]) if grids else None


def test_installed_layers_keep_stock_state_dict():
    model = tiny_qwen2_5_vl()
    keys = set(model.state_dict())
    install(model, _encoding("mrope"))
    assert set(model.state_dict()) == keys
    assert all(isinstance(layer.self_attn, MMRopeAttention) for layer in model.model.language_model.layers)
    assert model.config.text_config._attn_implementation == "mmrope"
    # the default backend (auto) also gives the vision tower packed-segment attention; a named one leaves it stock
    assert model.config.vision_config._attn_implementation == "mmrope_flash_vision"
    named = install(tiny_qwen2_5_vl(), _encoding("mrope"), attn_backend="sdpa")
    assert named.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_vision_tower_with_packed_segments_equals_stock(family):
    """`auto` hands the ViT's windows/images to one segment-attention call instead of transformers' loop of SDPA
    calls: same features (windowed and full-attention blocks, several images of different sizes)."""
    if family == "qwen2_5_vl":
        stock, installed = tiny_qwen2_5_vl(seed=4), tiny_qwen2_5_vl(seed=4)
        encoding = _encoding("mrope")
    else:
        from tests.unit.model.test_qwen3vl import tiny_qwen3_vl

        stock, installed = tiny_qwen3_vl(seed=4), tiny_qwen3_vl(seed=4)
        encoding = build(
            "mrope_i", mrope_section=list(stock.config.text_config.rope_parameters["mrope_section"])
        )
    install(installed, encoding)
    assert installed.config.vision_config._attn_implementation == "mmrope_flash_vision"
    grid = torch.tensor([[1, 16, 20], [1, 4, 4], [2, 8, 12]])  # several windows per image, a two-frame one
    px = pixels(grid, seed=9)
    if family == "qwen3_vl":  # Qwen3-VL's patch embedding takes 16x16 patches
        px = torch.randn(
            int(grid.prod(-1).sum()), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(9)
        )
    ref = stock.model.get_image_features(px, grid, return_dict=True).pooler_output
    out = installed.model.get_image_features(px, grid, return_dict=True).pooler_output
    ref, out = (torch.cat(list(x)) if isinstance(x, (list, tuple)) else x for x in (ref, out))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_packed_row_equals_samples_alone(case):
    enc = _encoding(case)
    model = install(_model(case), enc)
    samples = _samples()
    ids_L = torch.cat([s for s, _ in samples])
    grids = [g for _, g in samples if g is not None]
    grid = torch.cat(grids)
    cu = torch.tensor([0] + list(torch.tensor([len(s) for s, _ in samples]).cumsum(0)))
    pos_3BL = enc.packed_position_ids(ids_L, cu, tokens=TOKENS, image_grid_thw=grid)[:, None]
    packed = model(
        input_ids=ids_L[None],
        position_ids=pos_3BL,
        pixel_values=_pixels_for(grids),
        image_grid_thw=grid,
        **seam_kwargs(cu_seqlens=cu),
    ).logits[0]
    for i, (ids, g) in enumerate(samples):
        alone = _forward(model, enc, ids[None], g)[0]
        part = packed[cu[i] : cu[i + 1]]
        torch.testing.assert_close(part, alone, atol=1e-5, rtol=0)
        labels = ids[1:]
        loss_alone = F.cross_entropy(alone[:-1], labels)
        assert abs(F.cross_entropy(part[:-1], labels) - loss_alone) <= 1e-5


@pytest.mark.parametrize("case", ["mrope", "mhrope", "grape_mixed", "vanilla"])
@torch.no_grad()
def test_left_padded_batch_equals_unpadded(case):
    enc = _encoding(case)
    model = install(_model(case), enc)
    (a, ga), _, (c, gc) = _samples()
    length = max(len(a), len(c))
    ids_BL = torch.full((2, length), PAD_ID)
    mask_BL = torch.zeros(2, length, dtype=torch.long)
    for row, s in enumerate((a, c)):
        ids_BL[row, length - len(s) :] = s
        mask_BL[row, length - len(s) :] = 1
    grid = torch.cat([ga, gc])
    px = torch.cat([pixels(ga, int(ga.sum())), pixels(gc, int(gc.sum()))])
    pos_3BL, _ = enc.position_ids(ids_BL, tokens=TOKENS, image_grid_thw=grid, attention_mask_BL=mask_BL)
    batch = model(
        input_ids=ids_BL,
        position_ids=pos_3BL,
        pixel_values=px,
        image_grid_thw=grid,
        **seam_kwargs(attention_mask_BL=mask_BL),
    ).logits
    for row, (s, g) in enumerate(((a, ga), (c, gc))):
        alone = _forward(model, enc, s[None], g)[0]
        torch.testing.assert_close(batch[row, length - len(s) :], alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_mrope_matches_stock_transformers():
    stock = tiny_qwen2_5_vl()
    mine = install(tiny_qwen2_5_vl(), _encoding("mrope"))
    mine.load_state_dict(stock.state_dict())
    ids, grid = image_sample(4, (4, 6), 6, seed=5)
    ids_BL = ids[None].repeat(2, 1)
    ids_BL[1, 0] = 7
    px = torch.cat([pixels(grid, 1), pixels(grid, 1)])
    grid2 = grid.repeat(2, 1)
    types = (ids_BL == TOKENS.image_token_id).int()
    hf_pos, _ = stock.model.get_rope_index(
        ids_BL, types, image_grid_thw=grid2, attention_mask=torch.ones_like(ids_BL)
    )
    ref = stock(input_ids=ids_BL, position_ids=hf_pos, pixel_values=px, image_grid_thw=grid2).logits
    out = mine(input_ids=ids_BL, position_ids=hf_pos, pixel_values=px, image_grid_thw=grid2).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # the encoding's own positions are HF's (layout qwen2_5)
    pos, _ = _encoding("mrope").position_ids(ids_BL, tokens=TOKENS, image_grid_thw=grid2, layout="qwen2_5")
    assert torch.equal(pos, hf_pos)


def _packed_dipe_batch(enc):
    samples = _samples()
    ids_L = torch.cat([s for s, _ in samples])
    grids = [g for _, g in samples if g is not None]
    cu = torch.tensor([0] + list(torch.tensor([len(s) for s, _ in samples]).cumsum(0)))
    return ids_L[None], torch.cat(grids), cu, _pixels_for(grids)


def test_dipe_through_the_model():
    enc = _encoding("mrope")
    plain = install(tiny_qwen2_5_vl(), enc)
    routed = install(tiny_qwen2_5_vl(), enc, dipe=True)
    eager = install(tiny_qwen2_5_vl(), enc, dipe=True, attn_backend="eager")
    ids_BL, grid, cu, px = _packed_dipe_batch(enc)
    pos_3BL = enc.packed_position_ids(ids_BL[0], cu, tokens=TOKENS, image_grid_thw=grid)[:, None]
    visual_BL = ids_BL == TOKENS.image_token_id
    static = anchored_positions(pos_3BL, visual_BL, cu_seqlens=cu)
    kw = seam_kwargs(cu_seqlens=cu, static_position_ids=static, visual_mask_BL=visual_BL)
    args = dict(input_ids=ids_BL, position_ids=pos_3BL, pixel_values=px, image_grid_thw=grid)
    out = routed(**args, **kw).logits
    with torch.no_grad():
        ref_plain = plain(**args, **seam_kwargs(cu_seqlens=cu)).logits
        ref_eager = eager(**args, **kw).logits
    assert (out - ref_plain).abs().max() > 1e-4  # tiny init weights: small but far above fp32 noise
    torch.testing.assert_close(out, ref_eager, atol=1e-5, rtol=0)
    # packed DIPE == each sample alone
    with torch.no_grad():
        for i, (s, g) in enumerate(_samples()):
            alone = _forward(routed, enc, s[None], g, dipe=True)[0]
            torch.testing.assert_close(out[0, cu[i] : cu[i + 1]], alone, atol=1e-5, rtol=0)
    out.square().mean().backward()
    no_grad = [
        n
        for n, p in routed.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert no_grad == []


def test_gradient_checkpointing_with_frozen_vit():
    enc = _encoding("grape_mixed")
    model = install(tiny_qwen2_5_vl(), enc)
    model.train()
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.language_model.gradient_checkpointing
    ids_BL, grid, cu, px = _packed_dipe_batch(enc)
    logits = _forward(model, enc, ids_BL, grid, cu_seqlens=cu)
    F.cross_entropy(logits[0, :-1], ids_BL[0, 1:]).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("rotary_emb" in n for n, _ in trainable)  # GRAPE's learned planes train
    assert [n for n, p in trainable if p.grad is None] == []
    assert all(p.grad is None for p in model.model.visual.parameters())


def _reference_greedy(model, enc, ids_BL, grid, mask_BL, steps, dipe):
    """argmax of repeated full forwards (no cache), positions of the whole sequence from the encoding."""
    px = torch.cat([pixels(g[None], int(g.sum())) for g in grid])
    seq, mask = ids_BL, mask_BL
    for _ in range(steps):
        pos_3BL, _ = enc.position_ids(seq, tokens=TOKENS, image_grid_thw=grid, attention_mask_BL=mask)
        kw = seam_kwargs(attention_mask_BL=mask)
        if dipe:
            visual_BL = seq == TOKENS.image_token_id
            kw |= seam_kwargs(
                static_position_ids=anchored_positions(pos_3BL, visual_BL, mask), visual_mask_BL=visual_BL
            )
        logits = model(input_ids=seq, position_ids=pos_3BL, pixel_values=px, image_grid_thw=grid, **kw).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seq


@pytest.mark.parametrize("case,dipe", [(c, False) for c in CASES] + [("mrope", True), ("videorope", True)])
@torch.no_grad()
def test_greedy_with_cache_equals_full_forwards(case, dipe):
    enc = _encoding(case)
    model = install(_model(case, seed=1), enc, dipe=dipe)
    (a, ga), _, (c, gc) = _samples()
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
        max_new_tokens=3,
        tokens=TOKENS,
        dipe=dipe,
    )
    ref = _reference_greedy(model, enc, ids_BL, grid, mask_BL, 3, dipe)
    assert torch.equal(got, ref)


def test_cases_cover_every_registered_encoding():
    assert {c.split("_")[0] if c.startswith("grape") else c for c in CASES} == set(available())
