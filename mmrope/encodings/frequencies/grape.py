"""GRAPE learned modes (spec 4.12(b)-(d), reproduced per 6.10): multiplicative GRAPE with learned rank-2
planes.

A plane p is a pair of orthonormal vectors (a_p, b_p) in the rotated channel space. A token at (mixed)
position s rotates the component of x in span(a_p, b_p) by the angle `s * freq_p`:

    xa = <x, a_p>, xb = <x, b_p>
    x' = x + (xa cos - xb sin - xa) a_p + (xa sin + xb cos - xb) b_p

The planes are stored unnormalised and Gram-Schmidt-orthonormalised at use, so any learned value is a valid
plane. With `rope_init=True` plane p starts on the ADJACENT channel pair (2p, 2p+1) (GPT-J pairing, not HF's
(j, j+n)), so even at initialisation these modes are not equivalent to a pretrained Qwen's RoPE (spec
4.12(d)). The plane frequencies are fixed (the model's inv_freq, resampled when num_planes != n, then
`exp(log(f) / log_freq_scale)`); the planes and the axis weights are what is learned.

Modes:
- `axis`: three banks of `num_planes` planes, one per axis, applied in turn (t, then h, then w). All three
  banks start on the same planes, so at init a text token (t = h = w = p) rotates by 3 * p * theta_j.
- `mixed`: one bank of planes; plane p rotates with a learned mix of the three rows, `s_p = <pos, w_p /
  |w_p|>`, where w_p starts one-hot cyclic (t, h, w, t, ...). At init this equals interleaved RoPE (axis(p) =
  p mod 3) on adjacent pairs.
- `block_mixed`: like `mixed`, but the channels are cut into blocks of `block_size` and each block has
  `planes_per_block` planes living inside it (cheap, local planes). Block k uses the frequencies `inv_freq[k *
  block_size/2 : (k+1) * block_size/2]` (resampled to planes_per_block); axis weights start one-hot cyclic
  over the flattened (block, plane) index, so with the default planes_per_block = block_size / 2 the init
  equals `mixed` (interleaved RoPE on adjacent pairs).

Learned modes cannot be written as cos/sin tensors: `forward` raises; call `apply_qk(q, k, pos_3BL)` (or
`rotate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import Rotary, float32_region

__all__ = ["GRAPE_LEARNED_MODES", "LearnedGrapeRotary", "PlaneRotation", "resample_freq", "scale_freq"]

GRAPE_LEARNED_MODES = ("axis", "mixed", "block_mixed")


def resample_freq(freq_n: Tensor, num: int) -> Tensor:
    """`num` frequencies picked evenly from `freq_n` (indices round(linspace(0, n-1, num))); identity if num
    == n."""
    if num == freq_n.shape[-1]:
        return freq_n.clone()
    index = torch.linspace(0, freq_n.shape[-1] - 1, num).round().long()
    return freq_n[..., index]


def scale_freq(freq: Tensor, log_freq_scale: float) -> Tensor:
    """GRAPE's log-frequency scaling: `exp(log(freq) / log_freq_scale)`; identity for scale 1."""
    if log_freq_scale == 1.0:
        return freq
    return torch.exp(freq.log() / log_freq_scale)


def rotate_in_planes(x_ND: Tensor, a_KPd: Tensor, b_KPd: Tensor, angles_NKP: Tensor) -> Tensor:
    """Rotate x in K blocks of P planes each. x [..., K*d] (K blocks of d channels), a/b [K, P, d] orthonormal
    planes, angles [..., K, P] float32 broadcastable against x's leading dims. Returns x' in x's dtype."""
    num_blocks, _, block_dim = a_KPd.shape
    x_blocks = x_ND.reshape(*x_ND.shape[:-1], num_blocks, block_dim)
    a = a_KPd.to(x_ND.dtype)
    b = b_KPd.to(x_ND.dtype)
    xa = torch.einsum("...kd,kpd->...kp", x_blocks, a)
    xb = torch.einsum("...kd,kpd->...kp", x_blocks, b)
    cos = angles_NKP.cos().to(x_ND.dtype)
    sin = angles_NKP.sin().to(x_ND.dtype)
    delta_a = xa * cos - xb * sin - xa
    delta_b = xa * sin + xb * cos - xb
    delta = torch.einsum("...kp,kpd->...kd", delta_a, a) + torch.einsum("...kp,kpd->...kd", delta_b, b)
    return (x_blocks + delta).reshape(x_ND.shape)


class PlaneRotation(nn.Module):
    """K blocks x P learned planes over d channels each (K * d = rotated channels), with optional axis
    weights.

    With `mix_axes=True` each plane owns a learned 3-vector w (normalised at use) and rotates with position
    `<pos_thw, w / |w|>`; otherwise the caller passes one position row.
    """

    a: Tensor
    b: Tensor
    axis_weight: Tensor
    inv_freq: Tensor

    def __init__(
        self,
        freq_KP: Tensor,
        *,
        block_dim: int,
        mix_axes: bool,
        rope_init: bool,
        learnable: bool,
    ) -> None:
        super().__init__()
        num_blocks, num_planes = freq_KP.shape
        self.mix_axes = mix_axes
        a = torch.zeros(num_blocks, num_planes, block_dim)
        b = torch.zeros(num_blocks, num_planes, block_dim)
        weight = torch.zeros(num_blocks, num_planes, 3)
        if rope_init:
            for p in range(num_planes):
                # Plane p on the adjacent channel pair (2p, 2p+1) of its block (GPT-J pairing).
                a[:, p, (2 * p) % block_dim] = 1.0
                b[:, p, (2 * p + 1) % block_dim] = 1.0
            flat = weight.view(-1, 3)
            for i in range(flat.shape[0]):
                flat[i, i % 3] = 1.0  # one-hot cyclic t, h, w over the flattened (block, plane) index
        else:
            nn.init.normal_(a, std=0.02)
            nn.init.normal_(b, std=0.02)
            nn.init.normal_(weight, std=0.02)
        tensors = {"a": a, "b": b}
        if mix_axes:
            tensors["axis_weight"] = weight
        for name, value in tensors.items():
            if learnable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)  # frozen, but still saved with the model
        self.register_buffer("inv_freq", freq_KP.float(), persistent=False)
        self._exact_freq = freq_KP.float().clone()  # unregistered copy: survives `.bfloat16()` on the model

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        module = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._exact_freq.to(self.inv_freq.device)
        return module

    def orthonormal_planes(self) -> tuple[Tensor, Tensor]:
        """Gram-Schmidt: a <- a/|a|, b <- (b - <b,a> a)/|...|."""
        a = F.normalize(self.a, dim=-1)
        b = self.b - (self.b * a).sum(dim=-1, keepdim=True) * a
        return a, F.normalize(b, dim=-1)

    def forward(self, x_BHLD: Tensor, pos_BL3: Tensor) -> Tensor:
        """x [B, H, L, K*d]; pos [B, L, 3] float32 (mixed) or [B, L, 1] (a single row). Returns rotated x."""
        if self.mix_axes:
            weight = F.normalize(self.axis_weight, dim=-1)
            pos_BLKP = torch.einsum("blc,kpc->blkp", pos_BL3, weight.float())
        else:
            pos_BLKP = pos_BL3[..., 0][..., None, None]
        angles_BLKP = pos_BLKP * self.inv_freq.float()
        a, b = self.orthonormal_planes()
        return rotate_in_planes(x_BHLD, a, b, angles_BLKP.unsqueeze(1))


class LearnedGrapeRotary(Rotary):
    """GRAPE learned modes `axis` / `mixed` / `block_mixed` (see the module docstring).

    `forward` raises: there are no cos/sin tensors. `apply_qk(q, k, pos_3BL)` (= `rotate`) rotates the first
    `rotary_dim` channels of q [B, H, L, D] and k [B, H_kv, L, D] directly; positions must be [3, B, L].
    """

    def __init__(
        self,
        *,
        grape_mode: str,
        head_dim: int,
        rope_theta: float,
        partial_rotary_factor: float = 1.0,
        log_freq_scale: float = 1.0,
        num_planes: int | None = None,
        block_size: int = 16,
        planes_per_block: int | None = None,
        rope_init: bool = True,
        learnable: bool = True,
    ) -> None:
        super().__init__(
            head_dim=head_dim, rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor
        )
        if grape_mode not in GRAPE_LEARNED_MODES:
            raise ValueError(
                f"grape_mode must be one of {GRAPE_LEARNED_MODES} for learned GRAPE, got {grape_mode!r}"
            )
        self.allocation = "grape"
        self.grape_mode = grape_mode
        self.log_freq_scale = float(log_freq_scale)
        n = self.num_pairs
        base_freq = self.inv_freq.float()
        flags = {"rope_init": bool(rope_init), "learnable": bool(learnable)}
        self.learned_rotation: nn.Module
        if grape_mode in ("axis", "mixed"):
            num_planes = n if num_planes is None else num_planes
            if isinstance(num_planes, bool) or not isinstance(num_planes, int) or not 1 <= num_planes <= n:
                raise ValueError(
                    f"num_planes must be an int in [1, {n}] (rotary_dim / 2), got {num_planes!r}"
                )
            freq_1P = scale_freq(resample_freq(base_freq, num_planes), self.log_freq_scale)[None]
            if grape_mode == "axis":
                self.learned_rotation = nn.ModuleList(
                    PlaneRotation(freq_1P, block_dim=self.rotary_dim, mix_axes=False, **flags)
                    for _ in range(3)
                )
            else:
                self.learned_rotation = PlaneRotation(
                    freq_1P, block_dim=self.rotary_dim, mix_axes=True, **flags
                )
            self.num_planes = num_planes
        else:
            if (
                isinstance(block_size, bool)
                or not isinstance(block_size, int)
                or block_size < 2
                or block_size % 2
            ):
                raise ValueError(f"block_size must be a positive even int, got {block_size!r}")
            if self.rotary_dim % block_size:
                raise ValueError(f"block_size {block_size} must divide rotary_dim {self.rotary_dim}")
            half = block_size // 2
            planes_per_block = half if planes_per_block is None else planes_per_block
            if isinstance(planes_per_block, bool) or not isinstance(planes_per_block, int):
                raise ValueError(f"planes_per_block must be an int, got {planes_per_block!r}")
            if not 1 <= planes_per_block <= half:
                raise ValueError(
                    f"planes_per_block must be in [1, block_size / 2 = {half}], got {planes_per_block}"
                )
            num_blocks = self.rotary_dim // block_size
            # Block k keeps the frequencies of the RoPE pairs it spans, resampled to planes_per_block.
            freq_KP = resample_freq(base_freq.reshape(num_blocks, half), planes_per_block)
            freq_KP = scale_freq(freq_KP, self.log_freq_scale)
            self.learned_rotation = PlaneRotation(freq_KP, block_dim=block_size, mix_axes=True, **flags)
            self.block_size = block_size
            self.planes_per_block = planes_per_block
            self.num_planes = num_blocks * planes_per_block

    def forward(self, pos_3BL: Tensor) -> tuple[Tensor, Tensor]:
        raise RuntimeError(
            f"GRAPE grape_mode={self.grape_mode!r} learned modes rotate q/k directly and have no cos/sin "
            "tensors; call rotary.apply_qk(q, k, pos_3BL) (or rotary.rotate(q, k, pos_3BL)) instead"
        )

    def apply_tables(
        self, q_BHLD: Tensor, k_BHkvLD: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor]:
        raise RuntimeError(
            f"GRAPE grape_mode={self.grape_mode!r} learned modes rotate q/k directly; "
            "use apply_qk(q, k, pos_3BL)"
        )

    def rotate(self, q_BHLD: Tensor, k_BHkvLD: Tensor, pos_3BL: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply_qk(q_BHLD, k_BHkvLD, pos_3BL)

    def apply_qk(self, q_BHLD: Tensor, k_BHkvLD: Tensor, pos_3BL: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate the first rotary_dim channels of q and k with the learned planes; returns tensors in their
        dtypes."""
        if pos_3BL.ndim != 3 or pos_3BL.shape[0] != 3:
            raise ValueError(
                "position_ids: learned GRAPE modes need explicit 3D position_ids of shape [3, B, L], got "
                f"{tuple(pos_3BL.shape)}; use grape_mode='canonical' for 1D/2D positions"
            )
        return self._rotate_one(q_BHLD, pos_3BL), self._rotate_one(k_BHkvLD, pos_3BL)

    def _rotate_one(self, x_BHLD: Tensor, pos_3BL: Tensor) -> Tensor:
        if x_BHLD.shape[-1] < self.rotary_dim:
            raise ValueError(
                f"head_dim {x_BHLD.shape[-1]} of q/k is smaller than rotary_dim {self.rotary_dim}"
            )
        with float32_region(x_BHLD.device):
            pos_BL3 = pos_3BL.to(device=x_BHLD.device, dtype=torch.float32).permute(1, 2, 0)
            x_rot, x_pass = x_BHLD[..., : self.rotary_dim], x_BHLD[..., self.rotary_dim :]
            if self.grape_mode == "axis":
                for axis, bank in enumerate(self.learned_rotation):  # t, then h, then w
                    x_rot = bank(x_rot, pos_BL3[..., axis : axis + 1])
            else:
                x_rot = self.learned_rotation(x_rot, pos_BL3)
        if x_pass.shape[-1] == 0:
            return x_rot
        return torch.cat((x_rot, x_pass), dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grape_mode={self.grape_mode!r}, num_planes={self.num_planes}"
