"""CircleRoPE position design, extended to video by stacking rings (spec 4.7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .skeleton import Block, PositionDesign


def _plane_basis() -> tuple[Tensor, Tensor]:
    """u, v spanning the plane orthogonal to (1, 1, 1), built with float32 torch ops (norm, stack, cross)."""
    text = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float32)
    text = text / torch.norm(text)
    u = torch.stack([-text[1], text[0], torch.tensor(0.0)])
    u = u / torch.norm(u)
    v = torch.linalg.cross(text, u, dim=0)
    v = v / torch.norm(v)
    return u, v


def _rotate(cx: Tensor, cy: Tensor) -> Tensor:
    """(cx, cy) in the plane -> stacked (X, Y, Z) in 3D; the input's third coordinate is dropped."""
    u, v = _plane_basis()
    return torch.stack([cx * u[0] + cy * v[0], cx * u[1] + cy * v[1], cx * u[2] + cy * v[2]])


class CircleRoPEPositions(PositionDesign):
    """CircleRoPE: each block's grid is mapped onto a ring in the plane orthogonal to the text direction (1,1,1).

    Per block, in float32 (spec 4.7 (a)): `ori = stack(w, h, t*s)` [3, t, h', w'] (x=w, y=h, z=t); optional
    `move_to_origin` (subtract per-channel (max+min)/2); radius `float(radius)` or `|max(ori)| * k` for "auto" /
    "auto-k"; `method="circle"` maps frame 0's (x, y) to `r(cos θ, sin θ)` with `θ = α·θn + (1-α)·θi` (θn = atan2
    min-max normalised to [0, 2π], θi = raster index / (h'w') · 2π), `"no_circle"` keeps (x, y); both are rotated
    into the plane with `u = (-1,1,0)/√2`, `v = (-1,-1,2)/√6`; `dff_rate = d` blends `(1-d)·rot(circle) + d·rot(ori)`
    (d=True is pure rot(ori), so radius/alpha have no effect); `move_to_positive` adds `|min| + offset` (offset 0
    for "auto", else `float(move_to_positive)`, i.e. 1.0 for True). Rows `t=Z, h=Y, w=X`, plus `fi·s` for frame fi,
    plus text_len, plus the running start, in that order. The next text starts at `max(block) + 1` (fractional).

    Reproduced as in the reference (policy 7): the literal defaults radius = -1 (flips the circle) and alpha = -1
    (θ = 2θi - θn), `dff_rate=True` semantics, fractional positions after the first block.
    Fixed (6.3): the reference crashes for blocks with t > 1 when `dff_rate` is set (or with "no_circle"). Here the
    mapping is applied frame by frame: x = w and y = h do not depend on the frame and z is dropped by the
    projection, so every frame gets frame 0's mapped coordinates (exactly what the reference does for
    "circle" without dff_rate) and time enters through `+ fi·s`. Equal to the reference wherever it does not crash.
    Layout "qwen2_5": a contiguous video uses `s = second_per_grid_t * tokens_per_second`.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, defaults: circle, radius=-1,
    alpha=-1; values rounded to 4 decimals)::

        t: 0 1 2 3.0000 3.0000 3.0000 3.0000 4.7071 5.7071
        h: 0 1 2 2.2929 3.7071 2.2929 2.2929 4.7071 5.7071
        w: 0 1 2 3.7071 2.2929 3.7071 3.7071 4.7071 5.7071
        rope_deltas: -2.2929
    """

    name = "circlerope"

    def __init__(
        self,
        temporal_stride: float = 1.0,
        move_to_origin: bool = False,
        move_to_positive: bool | str | float = False,
        dff_rate: bool | float = False,
        method: str = "circle",
        radius: float | str = -1,
        alpha: float = -1,
    ) -> None:
        self.temporal_stride = temporal_stride
        self.move_to_origin = move_to_origin
        self.move_to_positive = move_to_positive
        self.dff_rate = dff_rate
        self.method = method
        self.radius = radius
        self.alpha = alpha
        # the mapping depends only on the grid and the stride: cache it per design instance
        self._rings: dict[tuple[int, int, int, float], Tensor] = {}

    def ring(self, num_t: int, num_h: int, num_w: int, stride: float) -> Tensor:
        """Mapped coordinates [3 (t, h, w), h'*w'] of one frame (identical for every frame of the block)."""
        shape = (num_t, num_h, num_w)
        x = torch.arange(num_w, dtype=torch.float32).view(1, 1, -1).expand(shape)
        y = torch.arange(num_h, dtype=torch.float32).view(1, -1, 1).expand(shape)
        z = (torch.arange(num_t, dtype=torch.float32) * stride).view(-1, 1, 1).expand(shape)
        ori = torch.stack([x, y, z])
        if self.move_to_origin:
            centers = (torch.amax(ori, dim=(1, 2, 3)) + torch.amin(ori, dim=(1, 2, 3))) / 2.0
            ori = ori - centers.view(-1, 1, 1, 1)
        if "auto" in str(self.radius):
            scale = 1.0 if self.radius == "auto" else float(str(self.radius).split("-")[1])
            radius: Tensor | float = ori.max().abs() * scale
        else:
            radius = float(self.radius)
        x0, y0 = ori[0, 0], ori[1, 0]  # frame 0, [h', w']
        if self.method == "circle":
            theta_orig = torch.atan2(y0, x0)
            theta_range = theta_orig.max() - theta_orig.min()
            theta_norm = theta_orig
            if theta_range > 0:
                theta_norm = (theta_orig - theta_orig.min()) / theta_range * (2 * math.pi)
            index = torch.arange(num_h * num_w, dtype=torch.float32).reshape(num_h, num_w)
            theta_index = index / (num_h * num_w) * (2 * math.pi)
            theta = self.alpha * theta_norm + (1 - self.alpha) * theta_index
            conv = _rotate(radius * torch.cos(theta), radius * torch.sin(theta))
        else:
            conv = _rotate(x0, y0)
        if self.dff_rate:
            rate = float(self.dff_rate)
            conv = (1 - rate) * conv + rate * _rotate(x0, y0)
        if self.move_to_positive:
            offset = 0.0 if self.move_to_positive == "auto" else float(self.move_to_positive)
            conv = conv + torch.abs(torch.min(conv)) + offset
        x_P, y_P, z_P = conv.reshape(3, -1)
        return torch.stack([z_P, y_P, x_P])

    def block(
        self, cur: float, text_len: int, blk: Block, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        stride = self.temporal_step(blk, self.temporal_stride)
        key = (blk.num_t, blk.num_h, blk.num_w, stride)
        if key not in self._rings:
            self._rings[key] = self.ring(*key)
        ring_3P = self._rings[key]
        frame_N = torch.arange(blk.num_t, dtype=torch.float32).repeat_interleave(blk.num_h * blk.num_w)
        pos_3N = ring_3P.repeat(1, blk.num_t) + frame_N * stride
        pos_3N = pos_3N + text_len + cur
        return pos_3N, pos_3N.max().item() + 1
