"""Concrete cos/sin modules: one position row per pair (1D, chunked, interleaved, VideoRoPE, HoPE, Lumos,
GRAPE canonical) and one position row per KV head (MHRoPE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .allocations import NOPE, T, pattern
from .core import Rotary, as_three_rows, rotary_dim

__all__ = ["GrapeCanonicalRotary", "HopeRotary", "MultiHeadRotary", "OneDRotary", "PairAxisRotary"]


class PairAxisRotary(Rotary):
    """Pair j rotates with position row `axes[j]`: `angle[b, l, j] = float32(pos[axes[j], b, l]) * freq[j]`.

    `freq` is `inv_freq` unless a subclass rescales it (GRAPE's log_freq_scale). A [B, L] input is broadcast
    to 3 identical rows, so every allocation reduces to 1D RoPE on text-only input.
    """

    axis_index: Tensor

    def __init__(
        self,
        axes: Sequence[int],
        *,
        allocation: str,
        head_dim: int,
        rope_theta: float,
        partial_rotary_factor: float = 1.0,
    ) -> None:
        super().__init__(
            head_dim=head_dim, rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor
        )
        if len(axes) != self.num_pairs or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"axes must map each of the {self.num_pairs} pairs to 0/1/2, got {list(axes)}")
        self.allocation = allocation
        self.axes = list(axes)
        self.register_buffer("axis_index", torch.tensor(self.axes, dtype=torch.long), persistent=False)

    @property
    def pattern(self) -> str:
        """The pair -> axis map as a string, e.g. "THWTHW...TTTT"."""
        return pattern(self.axes)

    def angle_freq(self) -> Tensor:
        """Float32 angular frequency per pair, [n]."""
        return self.inv_freq.float()

    def angles(self, pos_3BL: Tensor) -> Tensor:
        pos_BL3 = as_three_rows(pos_3BL).float().permute(1, 2, 0)
        pos_BLn = pos_BL3[..., self.axis_index.to(pos_BL3.device)]  # row axes[j] of each token, per pair
        return pos_BLn * self.angle_freq().to(pos_BLn.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}"


class OneDRotary(PairAxisRotary):
    """Plain 1D RoPE (vanilla, v2pe): row 0 of a [3, B, L] input, or the [B, L] input itself, on every
    pair."""

    def __init__(self, *, head_dim: int, rope_theta: float, partial_rotary_factor: float = 1.0) -> None:
        n = rotary_dim(head_dim, partial_rotary_factor) // 2
        super().__init__(
            [T] * n,
            allocation="1d",
            head_dim=head_dim,
            rope_theta=rope_theta,
            partial_rotary_factor=partial_rotary_factor,
        )

    def angles(self, pos_3BL: Tensor) -> Tensor:
        pos_BL = as_three_rows(pos_3BL)[0].float()
        return pos_BL[..., None] * self.angle_freq().to(pos_BL.device)


class HopeRotary(PairAxisRotary):
    """HoPE: the VideoRoPE layout with the t row zeroed, so every T pair is NoPE (spec 4.6(b), reproduced per
    6.2).

    Reproduces the package exactly: `pos[0][pos[0] > 0] = 0` (only positive t values are zeroed; text tokens
    are included). Unlike the original package (which zeroed the caller's tensor in place), this works on a
    clone and never mutates its input.
    """

    def angles(self, pos_3BL: Tensor) -> Tensor:
        pos = as_three_rows(pos_3BL).clone()
        pos[0][pos[0] > 0] = 0
        return super().angles(pos)


class GrapeCanonicalRotary(PairAxisRotary):
    """Canonical multimodal GRAPE (spec 4.12(b)): fixed commuting planes = RoPE pairs, allocated chunked (like
    mrope) or interleaved (axis(j) = j mod 3). With `log_freq_scale != 1` the frequencies become
    `exp(log(inv_freq) / log_freq_scale)`. A [B, L] input gives plain 1D RoPE (3 identical rows)."""

    def __init__(
        self,
        axes: Sequence[int],
        *,
        log_freq_scale: float = 1.0,
        head_dim: int,
        rope_theta: float,
        partial_rotary_factor: float = 1.0,
    ) -> None:
        super().__init__(
            axes,
            allocation="grape",
            head_dim=head_dim,
            rope_theta=rope_theta,
            partial_rotary_factor=partial_rotary_factor,
        )
        self.log_freq_scale = float(log_freq_scale)

    def angle_freq(self) -> Tensor:
        freq = self.inv_freq.float()
        if self.log_freq_scale != 1.0:
            freq = torch.exp(freq.log() / self.log_freq_scale)
        return freq


class MultiHeadRotary(Rotary):
    """MHRoPE (spec 4.4(b)): `mrope_section` counts KV heads; KV head h rotates all n pairs with position row
    `head_axes[h]`; heads beyond the sections are NoPE (angle 0: cos=1, sin=0).

    cos/sin are [B, H_kv, L, rotary_dim]; `apply` maps query head i to KV head i // (H // H_kv) (HF
    `repeat_kv`). Text tokens get the same angle on every non-NoPE head, so text equals vanilla RoPE there.
    """

    per_head = True
    head_index: Tensor

    def __init__(
        self,
        head_axes: Sequence[int],
        *,
        head_dim: int,
        rope_theta: float,
        partial_rotary_factor: float = 1.0,
    ) -> None:
        super().__init__(
            head_dim=head_dim, rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor
        )
        if not head_axes or any(a not in (T, 1, 2, NOPE) for a in head_axes):
            raise ValueError(f"head_axes must map each KV head to 0/1/2/-1, got {list(head_axes)}")
        self.allocation = "multihead"
        self.head_axes = list(head_axes)
        self.num_key_value_heads = len(self.head_axes)
        # Row 3 of the padded angle tensor is all zeros: that is where NoPE heads read from.
        index = [3 if a == NOPE else a for a in self.head_axes]
        self.register_buffer("head_index", torch.tensor(index, dtype=torch.long), persistent=False)

    @property
    def pattern(self) -> str:
        return pattern(self.head_axes)

    def angles(self, pos_3BL: Tensor) -> Tensor:
        pos_3BL = as_three_rows(pos_3BL).float()
        freqs_3BLn = pos_3BL[..., None] * self.inv_freq.float().to(pos_3BL.device)
        freqs_4BLn = torch.cat((freqs_3BLn, torch.zeros_like(freqs_3BLn[:1])), dim=0)
        freqs_HBLn = freqs_4BLn[self.head_index.to(pos_3BL.device)]
        return freqs_HBLn.permute(1, 0, 2, 3)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.pattern!r}"
