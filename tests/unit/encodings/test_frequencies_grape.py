"""GRAPE learned modes (spec 4.12 (b)-(d)): init equivalences, relative law, learnability, errors.

The reference here is the spec's description: plane p lives on the adjacent channel pair (2p, 2p+1) (GPT-J
pairing) and rotates it by an angle phi_p; at init `axis` gives phi_p = (t + h + w) * theta_p (3 p theta_p for
text) and `mixed` / `block_mixed` give phi_p = pos[p mod 3] * theta_p (interleaved RoPE on adjacent pairs).
"""

from __future__ import annotations

import pytest
import torch

from mmrope.encodings.frequencies import LearnedGrapeRotary, make_rotary


def spec_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def gptj_rotate(x: torch.Tensor, angles_BLP: torch.Tensor, channels: list[int] | None = None) -> torch.Tensor:
    """Rotate channel pairs (c, c+1) (default c = 2p) of x [B, H, L, D] by angles [B, L, P]; others
    unchanged."""
    out = x.clone()
    for p in range(angles_BLP.shape[-1]):
        c = 2 * p if channels is None else channels[p]
        cos = angles_BLP[..., p].cos()[:, None]
        sin = angles_BLP[..., p].sin()[:, None]
        out[..., c] = x[..., c] * cos - x[..., c + 1] * sin
        out[..., c + 1] = x[..., c] * sin + x[..., c + 1] * cos
    return out


def small_positions(B: int = 2, L: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (3, B, L), generator=g)


def qk(D: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 9, D, generator=g), torch.randn(2, 2, 9, D, generator=g)


def grape(mode: str, head_dim: int = 64, **kw) -> LearnedGrapeRotary:
    rotary = make_rotary("grape", head_dim=head_dim, rope_theta=1e4, grape_mode=mode, **kw)
    assert isinstance(rotary, LearnedGrapeRotary)
    return rotary


def test_axis_mode_rotates_text_by_three_p_theta():
    rotary = grape("axis")
    inv = spec_inv_freq(64, 1e4)
    q, k = qk()
    text = torch.arange(9).repeat(2, 1)
    pos = torch.stack([text, text, text])
    want = gptj_rotate(q, 3 * text[..., None].double() * inv.double())
    q_out, _ = rotary.apply_qk(q, k, pos)
    torch.testing.assert_close(q_out, want.float(), rtol=0, atol=1e-4)
    # Visual tokens: the three banks share planes at init, so the angle is (t + h + w) * theta.
    pos = small_positions()
    want = gptj_rotate(q, pos.sum(0)[..., None].double() * inv.double())
    torch.testing.assert_close(rotary.apply_qk(q, k, pos)[0], want.float(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["mixed", "block_mixed"])
def test_mixed_modes_start_as_interleaved_rope_on_adjacent_pairs(mode):
    rotary = grape(mode)
    inv = spec_inv_freq(64, 1e4)
    pos = small_positions(seed=2)
    q, k = qk()
    angles = torch.stack([pos[p % 3].float() * inv[p] for p in range(32)], dim=-1)
    q_out, k_out = rotary.apply_qk(q, k, pos)
    torch.testing.assert_close(q_out, gptj_rotate(q, angles), rtol=0, atol=1e-5)
    torch.testing.assert_close(k_out, gptj_rotate(k, angles), rtol=0, atol=1e-5)


def test_mixed_init_is_canonical_interleaved_under_channel_permutation():
    """GPT-J pairing (2j, 2j+1) vs HF pairing (j, j+n): same rotation once channels are permuted."""
    mixed = grape("mixed")
    canonical = make_rotary("grape", head_dim=64, rope_theta=1e4, frequency_allocation="interleaved")
    pos = small_positions(seed=3)
    q, k = qk()
    gptj_from_hf = torch.stack(
        [torch.arange(32), torch.arange(32) + 32], dim=-1
    ).flatten()  # [0, 32, 1, 33, ...]
    hf_q, _ = canonical.rotate(q, k, pos)
    gptj_q, _ = mixed.apply_qk(q[..., gptj_from_hf], k[..., gptj_from_hf], pos)
    torch.testing.assert_close(gptj_q, hf_q[..., gptj_from_hf], rtol=0, atol=1e-5)


def test_block_mixed_with_fewer_planes_per_block():
    """Block k keeps the frequencies of the pairs it spans, resampled evenly to planes_per_block; axis weights
    are one-hot cyclic over the flattened (block, plane) index; plane p of block k sits on channels (16k+2p,
    16k+2p+1)."""
    rotary = grape("block_mixed", block_size=16, planes_per_block=3)
    inv = spec_inv_freq(64, 1e4)
    picks = [0, 4, 7]  # round(linspace(0, 7, 3)) = round([0, 3.5, 7]) with round-half-to-even
    pos = small_positions(seed=4)
    q, k = qk()
    channels, angles = [], []
    for block in range(4):
        for p in range(3):
            channels.append(16 * block + 2 * p)
            angles.append(pos[(block * 3 + p) % 3].float() * inv[8 * block + picks[p]])
    want = gptj_rotate(q, torch.stack(angles, -1), channels)
    torch.testing.assert_close(rotary.apply_qk(q, k, pos)[0], want, rtol=0, atol=1e-5)
    assert rotary.num_planes == 12


def test_mixed_with_fewer_planes_resamples_frequencies():
    rotary = grape("mixed", num_planes=5)
    inv = spec_inv_freq(64, 1e4)
    picks = [0, 8, 16, 23, 31]  # round(linspace(0, 31, 5)) = round([0, 7.75, 15.5, 23.25, 31])
    pos = small_positions(seed=5)
    q, k = qk()
    angles = torch.stack([pos[p % 3].float() * inv[picks[p]] for p in range(5)], dim=-1)
    out = rotary.apply_qk(q, k, pos)[0]
    torch.testing.assert_close(out, gptj_rotate(q, angles), rtol=0, atol=1e-5)
    assert torch.equal(out[..., 10:], q[..., 10:])


def test_learned_log_freq_scale():
    rotary = grape("mixed", log_freq_scale=3.0)
    inv = torch.exp(torch.log(spec_inv_freq(64, 1e4)) / 3.0)
    pos = small_positions(seed=6)
    q, k = qk()
    angles = torch.stack([pos[p % 3].float() * inv[p] for p in range(32)], dim=-1)
    torch.testing.assert_close(rotary.apply_qk(q, k, pos)[0], gptj_rotate(q, angles), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["axis", "mixed", "block_mixed"])
@pytest.mark.parametrize("rope_init", [True, False])
def test_zero_position_is_identity(mode, rope_init):
    torch.manual_seed(0)
    rotary = grape(mode, rope_init=rope_init)
    q, k = qk()
    q_out, k_out = rotary.apply_qk(q, k, torch.zeros(3, 2, 9, dtype=torch.long))
    torch.testing.assert_close(q_out, q, rtol=0, atol=1e-6)
    torch.testing.assert_close(k_out, k, rtol=0, atol=1e-6)


def test_relative_law_with_learned_axis_weights():
    """With orthogonal planes and any axis weights, scores depend only on the 3D offset between tokens."""
    rotary = grape("mixed")
    with torch.no_grad():
        rotary.learned_rotation.axis_weight.copy_(
            torch.randn(32, 3, generator=torch.Generator().manual_seed(7))
        )
    q, k = qk(seed=8)
    pos = small_positions(seed=9).float()
    shift = torch.tensor([5.0, -3.0, 11.0])[:, None, None]
    q1, k1 = rotary.apply_qk(q[:, :2], k, pos)
    q2, k2 = rotary.apply_qk(q[:, :2], k, pos + shift)
    torch.testing.assert_close(q1 @ k1.transpose(-1, -2), q2 @ k2.transpose(-1, -2), rtol=1e-4, atol=1e-4)
    # ... and the weights do matter: an unshifted h-only change moves the scores.
    q3, k3 = rotary.apply_qk(q[:, :2], k, pos + torch.tensor([0.0, 1.0, 0.0])[:, None, None] * (pos[0] > 20))
    assert not torch.allclose(q1 @ k1.transpose(-1, -2), q3 @ k3.transpose(-1, -2), atol=1e-3)


def test_learnable_parameters_get_gradients_and_frozen_mode_registers_buffers():
    rotary = grape("block_mixed")
    names = {name for name, _ in rotary.named_parameters()}
    assert names == {"learned_rotation.a", "learned_rotation.b", "learned_rotation.axis_weight"}
    q, k = qk()
    q_out, k_out = rotary.rotate(q, k, small_positions())
    (q_out.square().sum() + (q_out * k_out.repeat_interleave(2, 1)).sum()).backward()
    for _, param in rotary.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0

    axis = grape("axis")
    assert len(list(axis.parameters())) == 6  # a, b for each of the t/h/w banks

    frozen = grape("mixed", learnable=False)
    assert list(frozen.parameters()) == []
    assert {"learned_rotation.a", "learned_rotation.b", "learned_rotation.axis_weight"} <= set(
        frozen.state_dict()
    )
    torch.testing.assert_close(
        frozen.apply_qk(q, k, small_positions())[0],
        grape("mixed").apply_qk(q, k, small_positions())[0],
        rtol=0,
        atol=0,
    )


def test_partial_rotary_and_dtype():
    rotary = make_rotary("grape", head_dim=64, rope_theta=1e4, partial_rotary_factor=0.5, grape_mode="mixed")
    assert rotary.rotary_dim == 32
    q, k = qk()
    q_out, k_out = rotary.apply_qk(q, k, small_positions())
    assert torch.equal(q_out[..., 32:], q[..., 32:]) and torch.equal(k_out[..., 32:], k[..., 32:])
    assert not torch.allclose(q_out[..., :32], q[..., :32])
    bq, bk = rotary.apply_qk(q.bfloat16(), k.bfloat16(), small_positions())
    assert bq.dtype == bk.dtype == torch.bfloat16
    torch.testing.assert_close(bq.float(), q_out, rtol=0, atol=0.1)


def test_learned_modes_have_no_cos_sin_and_need_3d_positions():
    rotary = grape("axis")
    q, k = qk()
    with pytest.raises(RuntimeError, match="apply_qk"):
        rotary(small_positions())
    with pytest.raises(RuntimeError, match="apply_qk"):
        rotary.apply_tables(q, k, torch.ones(2, 9, 64), torch.zeros(2, 9, 64))
    with pytest.raises(ValueError, match="position_ids"):
        rotary.apply_qk(q, k, torch.arange(9).repeat(2, 1))


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        (dict(grape_mode="mixed", num_planes=33), "num_planes"),
        (dict(grape_mode="axis", num_planes=0), "num_planes"),
        (dict(grape_mode="block_mixed", block_size=12), "block_size"),
        (dict(grape_mode="block_mixed", block_size=7), "block_size"),
        (dict(grape_mode="block_mixed", planes_per_block=9), "planes_per_block"),
    ],
)
def test_learned_validation(kw, key):
    with pytest.raises(ValueError, match=key):
        make_rotary("grape", head_dim=64, rope_theta=1e4, **kw)
