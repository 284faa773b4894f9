"""Frequency allocations vs transformers' own rotary code and vs plain references written from the spec
(/work/shared/specs/encodings.md sections 1.2, 3 and 4 (b)). References loop over pairs and never call mmrope
code."""

from __future__ import annotations

import pytest
import torch

from mmrope.encodings.frequencies import (
    ALLOCATIONS,
    apply_rotary,
    inv_freq,
    make_rotary,
    rotate_half,
)

hf_25 = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
hf_3 = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig  # noqa: E402
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig  # noqa: E402

T, H, W = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# Plain references, written from the spec text
# ----------------------------------------------------------------------------------------------------
def spec_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float = 1.0) -> torch.Tensor:
    """Spec 1.2: dim = int(head_dim * prf) -> max(2, dim - dim % 2); HF's 1 / theta ** (arange(0, dim, 2) /
    dim)."""
    dim = int(head_dim * partial_rotary_factor)
    dim = max(2, dim - dim % 2)
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def spec_cos_sin(pos_3BL: torch.Tensor, inv: torch.Tensor, axis_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec 3: cos[b, s, j] = cos[b, s, j + n] = cos(f32(pos[axis(j), b, s]) * inv[j]), one pair at a time."""
    n = inv.shape[0]
    _, B, L = pos_3BL.shape
    cos = torch.empty(B, L, 2 * n)
    sin = torch.empty(B, L, 2 * n)
    for j in range(n):
        angle = pos_3BL[axis_of(j)].float() * inv[j]
        cos[..., j] = cos[..., j + n] = angle.cos()
        sin[..., j] = sin[..., j + n] = angle.sin()
    return cos, sin


def chunked_rule(section):
    s_t, s_h, _ = section
    return lambda j: T if j < s_t else H if j < s_t + s_h else W


def interleaved_rule(section):
    _, s_h, s_w = section
    return lambda j: H if (j % 3 == 1 and j < 3 * s_h) else W if (j % 3 == 2 and j < 3 * s_w) else T


def videorope_package_rule(section):
    # Spec 4.5(b): pair 0 -> t, odd j < 2*s_h -> h, even 2 <= j < 2*s_w -> w, everything else -> t.
    _, s_h, s_w = section
    return lambda j: H if (j % 2 == 1 and j < 2 * s_h) else W if (j % 2 == 0 and 2 <= j < 2 * s_w) else T


def videorope_official_rule(section):
    # Spec 4.5(d): official VideoRoPE puts h at even and w at odd pairs from j=0, T on the last pairs.
    _, s_h, s_w = section
    return lambda j: H if (j % 2 == 0 and j < 2 * s_h) else W if (j % 2 == 1 and j < 2 * s_w) else T


def lumos_rule(j: int) -> int:
    return [T, T, H, W, H, W, H, W][j % 8]


def letters(rule, n: int) -> str:
    return "".join("THW"[rule(j)] for j in range(n))


def random_positions(B: int = 2, L: int = 37, seed: int = 0) -> torch.Tensor:
    """Random int positions [3, B, L], including large ones (up to ~2^20) and zeros."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (3, B, L), generator=g)
    pos[:, :, -5:] = torch.randint(100_000, 1_048_576, (3, B, 5), generator=g)
    pos[:, 0, 0] = 0
    return pos


def qk(B: int = 2, num_heads: int = 4, num_kv: int = 2, L: int = 37, D: int = 128, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, num_heads, L, D, generator=g), torch.randn(B, num_kv, L, D, generator=g)


# ----------------------------------------------------------------------------------------------------
# inv_freq
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("head_dim", "theta", "prf"),
    [(128, 1e6, 1.0), (128, 5e6, 1.0), (32, 1e4, 1.0), (256, 1e7, 0.25), (80, 1e6, 0.5), (8, 1e4, 0.2)],
)
def test_inv_freq_is_bit_identical_to_hf_recipe(head_dim, theta, prf):
    ours = inv_freq(head_dim, theta, prf)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, spec_inv_freq(head_dim, theta, prf))


def test_inv_freq_rotary_dim_rounding():
    # dim = int(8 * 0.2) = 1 -> max(2, 1 - 1) = 2: one pair.
    assert inv_freq(8, 1e4, 0.2).shape == (1,)
    # dim = int(10 * 0.5) = 5 -> 4: two pairs.
    assert inv_freq(10, 1e4, 0.5).shape == (2,)
    assert make_rotary("1d", head_dim=256, rope_theta=1e7, partial_rotary_factor=0.25).rotary_dim == 64


def test_float64_recipe_would_differ():
    """The spec warns that float64-then-round differs by 1 ulp: make sure we are not accidentally doing
    that."""
    f64 = (1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))).float()
    assert not torch.equal(f64, spec_inv_freq(128, 1e6))  # the premise of the spec's warning holds here
    assert not torch.equal(inv_freq(128, 1e6), f64)


# ----------------------------------------------------------------------------------------------------
# Parity with transformers' own implementations
# ----------------------------------------------------------------------------------------------------
def test_chunked_matches_hf_qwen2_5_vl():
    config = Qwen2_5_VLTextConfig(
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    hf_rotary = hf_25.Qwen2_5_VLRotaryEmbedding(config)
    ours = make_rotary("chunked", head_dim=128, rope_theta=1e6, mrope_section=[16, 24, 24])
    pos = random_positions()
    q, k = qk()

    hf_cos, hf_sin = hf_rotary(q, pos)
    cos, sin = ours(pos)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)

    hf_q, hf_k = hf_25.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    our_q, our_k = ours.apply_tables(q, k, cos, sin)
    torch.testing.assert_close(our_q, hf_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(our_k, hf_k, rtol=0, atol=1e-6)
    assert torch.equal(our_q, hf_q) and torch.equal(our_k, hf_k)
    rq, rk = ours.rotate(q, k, pos)
    assert torch.equal(rq, hf_q) and torch.equal(rk, hf_k)


@pytest.mark.parametrize(
    ("head_dim", "section"),
    [(128, [24, 20, 20]), (32, [6, 5, 5]), (32, [24, 20, 20])],  # the last: HF truncates the default section
)
def test_interleaved_matches_hf_qwen3_vl(head_dim, section):
    config = Qwen3VLTextConfig(
        head_dim=head_dim,
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": section},
    )
    hf_rotary = hf_3.Qwen3VLTextRotaryEmbedding(config)
    ours = make_rotary("interleaved", head_dim=head_dim, rope_theta=5e6, mrope_section=section)
    pos = random_positions(seed=3)
    q, k = qk(D=head_dim)

    hf_cos, hf_sin = hf_rotary(q, pos)
    cos, sin = ours(pos)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    hf_q, hf_k = hf_3.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    our_q, our_k = ours.rotate(q, k, pos)
    assert torch.equal(our_q, hf_q) and torch.equal(our_k, hf_k)


def test_text_only_2d_positions_match_hf():
    config = Qwen3VLTextConfig(
        head_dim=64,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10]},
    )
    hf_rotary = hf_3.Qwen3VLTextRotaryEmbedding(config)
    pos_BL = torch.arange(50).repeat(2, 1) + torch.tensor([[0], [7]])
    x = torch.zeros(1)
    hf_cos, hf_sin = hf_rotary(x, pos_BL)
    for allocation in ("interleaved", "chunked", "1d", "videorope", "lumos", "grape"):
        ours = make_rotary(allocation, head_dim=64, rope_theta=5e6, mrope_section=[12, 10, 10])
        cos, sin = ours(pos_BL)
        assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin), allocation


def test_partial_rotary_matches_hf_qwen3_5():
    hf_35 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        head_dim=256,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "mrope_section": [11, 11, 10],
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
        },
    )
    hf_rotary = hf_35.Qwen3_5TextRotaryEmbedding(config)
    ours = make_rotary(
        "interleaved", head_dim=256, rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[11, 11, 10]
    )
    assert ours.rotary_dim == 64
    pos = random_positions(seed=5)
    q, k = qk(D=256)

    hf_cos, hf_sin = hf_rotary(q, pos)
    cos, sin = ours(pos)
    assert cos.shape == (2, 37, 64)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    hf_q, hf_k = hf_35.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    our_q, our_k = ours.rotate(q, k, pos)
    assert torch.equal(our_q, hf_q) and torch.equal(our_k, hf_k)
    # The pass-through channels are untouched.
    assert torch.equal(our_q[..., 64:], q[..., 64:])


def test_partial_rotary_pass_through_vs_plain_reference():
    ours = make_rotary(
        "chunked", head_dim=80, rope_theta=1e6, partial_rotary_factor=0.5, mrope_section=[6, 7, 7]
    )
    pos = random_positions(seed=6)
    q, k = qk(D=80)
    cos, sin = spec_cos_sin(pos, spec_inv_freq(80, 1e6, 0.5), chunked_rule([6, 7, 7]))
    want_q = torch.cat(
        (q[..., :40] * cos[:, None] + rotate_half(q[..., :40]) * sin[:, None], q[..., 40:]), -1
    )
    our_q, our_k = ours.rotate(q, k, pos)
    torch.testing.assert_close(our_q, want_q, rtol=0, atol=1e-6)
    assert torch.equal(our_k[..., 40:], k[..., 40:])


# ----------------------------------------------------------------------------------------------------
# Spec-text references for the package's own allocations
# ----------------------------------------------------------------------------------------------------
SPEC_CASES = [
    ("chunked", dict(mrope_section=[16, 24, 24]), 128, chunked_rule([16, 24, 24])),
    ("interleaved", dict(mrope_section=[24, 20, 20]), 128, interleaved_rule([24, 20, 20])),
    ("videorope", dict(mrope_section=[16, 24, 24]), 128, videorope_package_rule([16, 24, 24])),
    ("videorope", dict(mrope_section=[4, 6, 6]), 32, videorope_package_rule([4, 6, 6])),
    (
        "videorope",
        dict(mrope_section=[16, 24, 24], frequency_layout="official"),
        128,
        videorope_official_rule([16, 24, 24]),
    ),
    ("lumos", dict(mrope_section=[16, 24, 24]), 128, lumos_rule),
    ("lumos", {}, 48, lumos_rule),
    ("grape", dict(frequency_allocation="interleaved"), 128, lambda j: j % 3),
    ("grape", dict(mrope_section=[16, 24, 24]), 128, chunked_rule([16, 24, 24])),
    ("1d", {}, 64, lambda j: T),
]


@pytest.mark.parametrize(("allocation", "kw", "head_dim", "rule"), SPEC_CASES)
def test_cos_sin_match_spec_reference(allocation, kw, head_dim, rule):
    ours = make_rotary(allocation, head_dim=head_dim, rope_theta=1e6, **kw)
    pos = random_positions(seed=11)
    want_cos, want_sin = spec_cos_sin(pos, spec_inv_freq(head_dim, 1e6), rule)
    cos, sin = ours(pos)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)


def test_stated_patterns():
    # Spec 4.3(b): [24, 20, 20], n=64 -> THW x20 + TTTT.
    assert make_rotary("interleaved", head_dim=128, rope_theta=1e6).pattern == "THW" * 20 + "TTTT"
    # Spec 4.5(b): T H W H W ... W H then 16 x T = T17/H24/W23; hd32 [4, 6, 6] -> THWHWHWHWHWHTTTT.
    package = make_rotary("videorope", head_dim=128, rope_theta=1e6, mrope_section=[16, 24, 24]).pattern
    assert package == "T" + "HW" * 23 + "H" + "T" * 16
    assert (package.count("T"), package.count("H"), package.count("W")) == (17, 24, 23)
    assert (
        make_rotary("videorope", head_dim=32, rope_theta=1e6, mrope_section=[4, 6, 6]).pattern
        == "THWHWHWHWHWHTTTT"
    )
    # Spec 4.5(d): official layout H24/W24 with T on the last 16 pairs.
    official = make_rotary("videorope", head_dim=128, rope_theta=1e6, frequency_layout="official").pattern
    assert official == "HW" * 24 + "T" * 16
    # HoPE shares the videorope layout.
    assert make_rotary("hope", head_dim=128, rope_theta=1e6).pattern == package
    # Spec 4.11(b): TTHWHWHW meta pattern; mrope_section ignored.
    assert make_rotary("lumos", head_dim=16, rope_theta=1e6, mrope_section=[1, 2, 5]).pattern == "TTHWHWHW"
    # Spec 4.12(b): GRAPE interleaved j mod 3 -> T22/H21/W21.
    grape = make_rotary("grape", head_dim=128, rope_theta=1e6, frequency_allocation="interleaved").pattern
    assert (grape.count("T"), grape.count("H"), grape.count("W")) == (22, 21, 21)
    assert make_rotary("multihead", head_dim=64, rope_theta=1e6, num_key_value_heads=8).pattern == "TTHHHWWW"
    # The rule helpers above agree with the stated strings too (guards the references themselves).
    assert letters(videorope_package_rule([4, 6, 6]), 16) == "THWHWHWHWHWHTTTT"
    assert letters(interleaved_rule([24, 20, 20]), 64) == "THW" * 20 + "TTTT"


def test_hope_zeroes_positive_t_on_a_clone():
    ours = make_rotary("hope", head_dim=128, rope_theta=1e6)
    pos = random_positions(seed=13)
    pos[0, 1, 3] = -4  # negative t survives `pos[0][pos[0] > 0] = 0`
    original = pos.clone()
    zeroed = pos.clone()
    zeroed[0][zeroed[0] > 0] = 0
    want_cos, want_sin = spec_cos_sin(zeroed, spec_inv_freq(128, 1e6), videorope_package_rule([16, 24, 24]))
    cos, sin = ours(pos)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)
    assert torch.equal(pos, original)
    # Every T pair is NoPE except where t was negative.
    t_pairs = [j for j in range(64) if videorope_package_rule([16, 24, 24])(j) == T]
    assert torch.all(cos[0][:, t_pairs] == 1) and torch.all(sin[0][:, t_pairs] == 0)
    assert not torch.all(cos[1, 3, t_pairs] == 1)
    # Text-only [B, L] input: the t row is zeroed too (text loses its T pairs).
    cos_text, _ = ours(torch.arange(1, 9).repeat(2, 1))
    assert torch.all(cos_text[..., t_pairs] == 1)
    assert not torch.all(cos_text[..., 1] == 1)


def test_hope_official_layout_option():
    ours = make_rotary("hope", head_dim=128, rope_theta=1e6, frequency_layout="official")
    pos = random_positions(seed=14)
    zeroed = pos.clone()
    zeroed[0][zeroed[0] > 0] = 0
    want_cos, _ = spec_cos_sin(zeroed, spec_inv_freq(128, 1e6), videorope_official_rule([16, 24, 24]))
    torch.testing.assert_close(ours(pos)[0], want_cos, rtol=0, atol=1e-6)


def test_one_d_uses_row_zero_and_accepts_2d():
    ours = make_rotary("1d", head_dim=64, rope_theta=1e4)
    pos = random_positions(seed=15)
    cos3, sin3 = ours(pos)
    cos2, sin2 = ours(pos[0])
    assert torch.equal(cos3, cos2) and torch.equal(sin3, sin2)
    want_cos, _ = spec_cos_sin(pos[[0, 0, 0]], spec_inv_freq(64, 1e4), lambda j: T)
    torch.testing.assert_close(cos3, want_cos, rtol=0, atol=1e-6)


def test_float_positions():
    """v2pe/circlerope give fractional float32 positions: f32(pos) * inv_freq, same rule."""
    pos = torch.rand(3, 2, 11, generator=torch.Generator().manual_seed(0)) * 500
    for allocation, rule in (("1d", lambda j: T), ("chunked", chunked_rule([16, 24, 24]))):
        ours = make_rotary(allocation, head_dim=128, rope_theta=1e6)
        want, _ = spec_cos_sin(pos if allocation != "1d" else pos[[0, 0, 0]], spec_inv_freq(128, 1e6), rule)
        torch.testing.assert_close(ours(pos)[0], want, rtol=0, atol=1e-6)


def test_grape_log_freq_scale():
    ours = make_rotary(
        "grape", head_dim=128, rope_theta=1e6, log_freq_scale=2.0, frequency_allocation="interleaved"
    )
    pos = random_positions(seed=16)
    scaled = torch.exp(torch.log(spec_inv_freq(128, 1e6)) / 2.0)
    want_cos, want_sin = spec_cos_sin(pos, scaled, lambda j: j % 3)
    cos, sin = ours(pos)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)
    # 2-D positions: plain 1D RoPE with the scaled frequencies.
    want_1d, _ = spec_cos_sin(pos[[0, 0, 0]], scaled, lambda j: T)
    torch.testing.assert_close(ours(pos[0])[0], want_1d, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# MHRoPE
# ----------------------------------------------------------------------------------------------------
def spec_multihead_cos_sin(pos_3BL, inv, section, num_kv):
    """Spec 4.4(b): KV head h uses row t/h/w for all n pairs by section; heads past the sum get angle 0."""
    n = inv.shape[0]
    _, B, L = pos_3BL.shape
    cos = torch.ones(B, num_kv, L, 2 * n)
    sin = torch.zeros(B, num_kv, L, 2 * n)
    bounds = [section[0], section[0] + section[1], sum(section)]
    for head in range(num_kv):
        if head >= bounds[2]:
            continue
        row = 0 if head < bounds[0] else 1 if head < bounds[1] else 2
        for j in range(n):
            angle = pos_3BL[row].float() * inv[j]
            cos[:, head, :, j] = cos[:, head, :, j + n] = angle.cos()
            sin[:, head, :, j] = sin[:, head, :, j + n] = angle.sin()
    return cos, sin


@pytest.mark.parametrize(("section", "num_kv"), [([2, 3, 3], 8), ([1, 1, 1], 4), ([1, 2, 1], 4)])
def test_multihead_matches_spec(section, num_kv):
    ours = make_rotary(
        "multihead", head_dim=64, rope_theta=1e6, mrope_section=section, num_key_value_heads=num_kv
    )
    assert ours.per_head
    pos = random_positions(seed=21)
    want_cos, want_sin = spec_multihead_cos_sin(pos, spec_inv_freq(64, 1e6), section, num_kv)
    cos, sin = ours(pos)
    assert cos.shape == (2, num_kv, 37, 64)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)

    # Spec 1.3 shape contract: q' = q cos.repeat_interleave(r) + rotate_half(q) sin.repeat_interleave(r); k' =
    # k cos + ..
    q, k = qk(num_heads=2 * num_kv, num_kv=num_kv, D=64)
    r = 2
    want_q = q * want_cos.repeat_interleave(r, 1) + rotate_half(q) * want_sin.repeat_interleave(r, 1)
    want_k = k * want_cos + rotate_half(k) * want_sin
    our_q, our_k = ours.rotate(q, k, pos)
    torch.testing.assert_close(our_q, want_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_k, want_k, rtol=0, atol=1e-5)
    # Query head i uses KV head i // r: head 2*num_kv - 1 matches the last KV head's rotation of the same
    # vector.
    same = q[:, -1:]
    torch.testing.assert_close(ours.rotate(q, same.expand(-1, num_kv, -1, -1), pos)[1][:, -1], our_q[:, -1])
    # NoPE heads leave q/k unchanged.
    if sum(section) < num_kv:
        assert torch.equal(our_k[:, -1], k[:, -1])


def test_multihead_text_equals_vanilla_on_rope_heads():
    ours = make_rotary(
        "multihead", head_dim=64, rope_theta=1e6, mrope_section=[1, 1, 1], num_key_value_heads=4
    )
    vanilla = make_rotary("1d", head_dim=64, rope_theta=1e6)
    pos_BL = torch.arange(20).repeat(2, 1)
    cos, _ = ours(pos_BL)
    cos_1d, _ = vanilla(pos_BL)
    for head in range(3):
        assert torch.equal(cos[:, head], cos_1d)
    assert torch.all(cos[:, 3] == 1)


# ----------------------------------------------------------------------------------------------------
# Contract details: no mutation, dtypes, autocast, module casts
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", [a for a in ALLOCATIONS if a != "multihead"])
def test_no_input_mutation_and_shapes(allocation):
    ours = make_rotary(allocation, head_dim=128, rope_theta=1e6)
    for pos in (
        random_positions(seed=31),
        random_positions(seed=32).float() + 0.5,
        random_positions(seed=33)[0],
    ):
        original = pos.clone()
        cos, sin = ours(pos)
        assert torch.equal(pos, original)
        assert cos.shape == sin.shape == (2, 37, 128)
        assert cos.dtype == torch.float32
    q, k = qk()
    q0, k0 = q.clone(), k.clone()
    ours.rotate(q, k, random_positions())
    assert torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.parametrize("allocation", ["interleaved", "multihead", "hope"])
def test_apply_casts_to_q_dtype(allocation):
    kw = dict(mrope_section=[1, 1, 1], num_key_value_heads=4) if allocation == "multihead" else {}
    ours = make_rotary(allocation, head_dim=64, rope_theta=1e6, **kw)
    pos = random_positions(seed=41)
    q, k = qk(num_heads=8, num_kv=4, D=64)
    cos, sin = ours(pos)
    bq, bk = ours.apply_tables(q.bfloat16(), k.bfloat16(), cos, sin)
    assert bq.dtype == bk.dtype == torch.bfloat16
    # Same arithmetic as HF: cos/sin cast to bf16 first, then q*cos + rotate_half(q)*sin in bf16.
    c = cos.bfloat16() if cos.ndim == 4 else cos.bfloat16()[:, None]
    s = sin.bfloat16() if sin.ndim == 4 else sin.bfloat16()[:, None]
    assert torch.equal(bk, k.bfloat16() * c + rotate_half(k.bfloat16()) * s)


def test_cos_sin_stay_float32_under_autocast():
    ours = make_rotary("chunked", head_dim=128, rope_theta=1e6)
    pos = random_positions(seed=42)
    want_cos, _ = ours(pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = ours(pos)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, want_cos)


def test_model_dtype_cast_keeps_exact_inv_freq():
    ours = make_rotary("interleaved", head_dim=128, rope_theta=5e6).bfloat16()
    assert ours.inv_freq.dtype == torch.float32
    assert torch.equal(ours.inv_freq, spec_inv_freq(128, 5e6))
    assert "inv_freq" not in ours.state_dict()


def test_apply_rotary_helper():
    x = torch.randn(2, 3, 5, 16)
    cos = torch.randn(2, 1, 5, 8)
    sin = torch.randn(2, 1, 5, 8)
    out = apply_rotary(x, cos, sin)
    half = x[..., :8]
    rot = torch.cat((-half[..., 4:], half[..., :4]), -1)
    assert torch.equal(out[..., :8], half * cos + rot * sin)
    assert torch.equal(out[..., 8:], x[..., 8:])


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("allocation", "kw", "key"),
    [
        ("chunked", dict(head_dim=128, mrope_section=[16, 24, 23]), "mrope_section"),
        ("chunked", dict(head_dim=128, mrope_section=[16, 24]), "mrope_section"),
        ("grape", dict(head_dim=32, mrope_section=[16, 24, 24]), "mrope_section"),
        ("interleaved", dict(head_dim=128, mrope_section=[24, 0, 20]), "mrope_section"),
        ("interleaved", dict(head_dim=128, mrope_section=[24, 20.0, 20]), "mrope_section"),
        ("videorope", dict(head_dim=128, mrope_section=[-1, 24, 24]), "mrope_section"),
        ("videorope", dict(head_dim=128, frequency_layout="hwt"), "frequency_layout"),
        (
            "multihead",
            dict(head_dim=128, mrope_section=[3, 3, 3], num_key_value_heads=8),
            "num_key_value_heads",
        ),
        ("multihead", dict(head_dim=128, mrope_section=[0, 3, 3]), "mrope_section"),
        ("1d", dict(head_dim=127), "head_dim"),
        ("1d", dict(head_dim=128, rope_theta=0.0), "rope_theta"),
        ("1d", dict(head_dim=128, partial_rotary_factor=1.5), "partial_rotary_factor"),
        ("mrope", dict(head_dim=128), "allocation"),
        ("chunked", dict(head_dim=128, mrope_sections=[16, 24, 24]), "mrope_sections"),
        ("grape", dict(head_dim=128, log_freq_scale=0.0), "log_freq_scale"),
        ("grape", dict(head_dim=128, frequency_allocation="spiral"), "frequency_allocation"),
        ("grape", dict(head_dim=128, grape_mode="learned"), "grape_mode"),
    ],
)
def test_validation_errors_name_the_key(allocation, kw, key):
    kw.setdefault("rope_theta", 1e6)
    with pytest.raises(ValueError, match=key):
        make_rotary(allocation, **kw)


def test_known_but_unused_hparams_are_ignored():
    ours = make_rotary("lumos", head_dim=64, rope_theta=1e6, mrope_section=[16, 24, 24], temporal_stride=1.0)
    assert ours.pattern == "TTHWHWHW" * 4
    assert make_rotary("1d", head_dim=64, rope_theta=1e6, visual_stride=16.0).allocation == "1d"


def test_gqa_mismatch_raises():
    ours = make_rotary("multihead", head_dim=64, rope_theta=1e6, num_key_value_heads=8)
    q, k = qk(num_heads=12, num_kv=8, D=64)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ours.rotate(q, k, random_positions())
    q, k = qk(num_heads=8, num_kv=4, D=64)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ours.rotate(q, k, random_positions())


def test_bad_position_shape_raises():
    ours = make_rotary("chunked", head_dim=128, rope_theta=1e6)
    with pytest.raises(ValueError, match="position_ids"):
        ours(torch.zeros(4, 2, 5, dtype=torch.long))


def test_module_tree_walk_still_works():
    """`nn.Module.apply(fn)` (used by transformers' init and DeepSpeed) must reach every Rotary unharmed."""
    from mmrope.encodings.frequencies import make_rotary

    seen = []
    for alloc, kw in [
        ("chunked", {"mrope_section": [16, 24, 24]}),
        ("multihead", {"mrope_section": [1, 1, 1], "num_key_value_heads": 3}),
    ]:
        rot = make_rotary(alloc, head_dim=128, rope_theta=1e6, **kw)
        wrapper = torch.nn.Sequential(rot)
        wrapper.apply(lambda m: seen.append(type(m).__name__))
    assert len(seen) == 4 and seen.count("Sequential") == 2
