"""Shared rotary machinery: the inv_freq recipe, rotate-half application and the `Rotary` base module.

Conventions (spec section 1.2 / 3):
- `n` rotary pairs, `rotary_dim = 2n`. Pair j uses channels j and j+n (HF `rotate_half` convention).
- cos/sin are computed in float32 with autocast disabled: `cos[b, l, j] = cos[b, l, j + n] =
  cos(float32(pos[axis(j), b, l]) * inv_freq[j])` (elementwise float32 product).
- Channels beyond `rotary_dim` (partial rotary) pass through unrotated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "Rotary",
    "apply_rotary",
    "as_three_rows",
    "float32_region",
    "inv_freq",
    "rotary_dim",
    "rotate_half",
]


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Number of rotated channels: `max(2, d - d % 2)` with `d = int(head_dim * partial_rotary_factor)`.

    Example: head_dim 256, partial_rotary_factor 0.25 -> 64 channels (32 pairs); head_dim 128 -> 128.
    """
    _check_head_dim(head_dim)
    if not (isinstance(partial_rotary_factor, (int, float)) and 0.0 < partial_rotary_factor <= 1.0):
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
    dim = int(head_dim * partial_rotary_factor)
    return max(2, dim - dim % 2)


def inv_freq(head_dim: int, rope_theta: float, partial_rotary_factor: float = 1.0) -> Tensor:
    """Standard RoPE inverse frequencies, float32, shape [n] with n = rotary_dim / 2.

    `inv_freq[j] = 1 / theta ** (2j / dim)` computed exactly as `reciprocal(pow(tensor(theta, f32), arange(0,
    dim, 2, int64).float() / dim))`, which is bit-identical to HF's `1.0 / (theta ** (arange(0, dim,
    2).float() / dim))`. Computing in float64 and rounding differs by 1 ulp for some j, so don't.

    Example: inv_freq(4, 10000.0) -> tensor([1.0, 0.01]).
    """
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
        raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
    dim = rotary_dim(head_dim, partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return torch.pow(torch.tensor(float(rope_theta), dtype=torch.float32), exponents).reciprocal()


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")


@contextlib.contextmanager
def float32_region(device: torch.device) -> Iterator[None]:
    """Disable autocast so angles and cos/sin stay float32 even inside a bf16 autocast region."""
    device_type = device.type if torch.amp.is_autocast_available(device.type) else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def as_three_rows(pos: Tensor) -> Tensor:
    """[3, B, L] positions as they are; a [B, L] tensor is broadcast to 3 identical rows (a view, no copy)."""
    if pos.ndim == 2:
        return pos.unsqueeze(0).expand(3, -1, -1)
    if pos.ndim == 3 and pos.shape[0] == 3:
        return pos
    raise ValueError(f"position_ids must have shape [3, B, L] or [B, L], got {tuple(pos.shape)}")


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: the rotation partner of channel j is channel j + D/2."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `cos.shape[-1]` channels of x: `x * cos + rotate_half(x) * sin`; the rest pass
    through.

    cos/sin must broadcast against `x[..., :rotary_dim]` (e.g. x [B, H, L, D] with cos [B, 1, L, rotary_dim]);
    they are cast to x.dtype first, exactly as HF does, so the arithmetic runs in x's dtype.
    """
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    num_rot = cos.shape[-1]
    if num_rot == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    if num_rot > x.shape[-1]:
        raise ValueError(f"rotary_dim {num_rot} exceeds head_dim {x.shape[-1]}")
    x_rot, x_pass = x[..., :num_rot], x[..., num_rot:]
    return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)


class Rotary(nn.Module):
    """Base class: positions -> float32 (cos, sin); `apply_tables`/`rotate` put them on q/k (not `apply`: that is
    `nn.Module.apply(fn)`, which transformers and DeepSpeed call on the whole module tree).

    Subclasses implement `angles(pos_3BL) -> angles_BLn` (or `[B, H_kv, L, n]` when `per_head`), the float32
    angle of each pair. `forward` turns them into `emb = cat(angles, angles)` and returns `(emb.cos(),
    emb.sin())` in float32.

    Attributes:
        head_dim, rope_theta, partial_rotary_factor: the model's attention geometry.
        rotary_dim: 2n rotated channels; channels beyond it pass through unrotated.
        per_head: True when cos/sin carry a KV-head dim (MHRoPE): [B, H_kv, L, rotary_dim].
        allocation: the `make_rotary` allocation name.
    """

    inv_freq: Tensor
    per_head: bool = False
    allocation: str = ""

    def __init__(self, *, head_dim: int, rope_theta: float, partial_rotary_factor: float = 1.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_theta = float(rope_theta)
        self.partial_rotary_factor = float(partial_rotary_factor)
        self.rotary_dim = rotary_dim(head_dim, partial_rotary_factor)
        # Non-persistent: derived from the config, never loaded from a checkpoint.
        self.register_buffer(
            "inv_freq", inv_freq(head_dim, rope_theta, partial_rotary_factor), persistent=False
        )

    @property
    def num_pairs(self) -> int:
        return self.rotary_dim // 2

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # `model.bfloat16()` / `.half()` would round inv_freq and break the bit-exact recipe; recompute it in
        # float32
        # on the new device instead.
        module = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            exact = inv_freq(self.head_dim, self.rope_theta, self.partial_rotary_factor)
            self.inv_freq = exact.to(self.inv_freq.device)
        return module

    def angles(self, pos_3BL: Tensor) -> Tensor:
        """Float32 angle per pair, [B, L, n] (or [B, H_kv, L, n] when per_head). Called with autocast off."""
        raise NotImplementedError

    def forward(self, pos_3BL: Tensor) -> tuple[Tensor, Tensor]:
        """pos [3, B, L] (int or float) or [B, L] -> float32 (cos, sin) of shape [B, L, rotary_dim] (or [B,
        H_kv, L, rotary_dim] when per_head)."""
        with torch.no_grad(), float32_region(pos_3BL.device):
            angles = self.angles(pos_3BL)
            emb = torch.cat((angles, angles), dim=-1)
            return emb.cos(), emb.sin()

    def apply_tables(
        self, q_BHLD: Tensor, k_BHkvLD: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Rotate q [B, H, L, D] and k [B, H_kv, L, D] with (cos, sin) from `forward`; cos/sin are cast to
        q.dtype.

        Shared cos/sin [B, L, rotary_dim] are broadcast over heads. Per-head cos/sin [B, H_kv, L, rotary_dim]
        are used as they are for k, and query head i uses KV head i // (H // H_kv), the same mapping as HF
        `repeat_kv`.
        """
        cos = cos.to(q_BHLD.dtype)
        sin = sin.to(q_BHLD.dtype)
        if cos.ndim == 3:
            cos_q = cos_k = cos.unsqueeze(1)
            sin_q = sin_k = sin.unsqueeze(1)
        else:
            num_kv_heads = cos.shape[1]
            num_heads = q_BHLD.shape[1]
            if k_BHkvLD.shape[1] != num_kv_heads or num_heads % num_kv_heads:
                raise ValueError(
                    f"num_key_value_heads: per-head cos/sin have {num_kv_heads} KV heads, but k has "
                    f"{k_BHkvLD.shape[1]} and q has {num_heads} heads (must be a multiple)"
                )
            group = num_heads // num_kv_heads
            cos_q, sin_q = cos.repeat_interleave(group, dim=1), sin.repeat_interleave(group, dim=1)
            cos_k, sin_k = cos, sin
        q_out = apply_rotary(q_BHLD, cos_q, sin_q)
        k_out = apply_rotary(k_BHkvLD, cos_k, sin_k)
        return q_out, k_out

    def rotate(self, q_BHLD: Tensor, k_BHkvLD: Tensor, pos_3BL: Tensor) -> tuple[Tensor, Tensor]:
        """The model seam's single entry point: positions in, rotated (q, k) out."""
        cos, sin = self(pos_3BL)
        return self.apply_tables(q_BHLD, k_BHkvLD, cos, sin)

    def extra_repr(self) -> str:
        return (
            f"allocation={self.allocation!r}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"rope_theta={self.rope_theta:g}"
        )
