"""Picture an encoding before choosing it: where its positions go and how fast each axis decays.

    python -m mmrope.encodings.plot --rope mrope --out layout.png [--hparams temporal_stride=1.0 ...]
        [--head-dim 128] [--rope-theta 1e6] [--max-distance 4096]
    python -m mmrope.encodings.plot --rope ilrope --compare text_axes=diagonal text_axes=temporal --out cmp.png

The figure has three panels:
1. Position layout of an example sequence (text, an image 1x8x8 -> 4x4 tokens, text, a 2-frame video of 4x4
   tokens per frame in the Qwen3-VL per-frame layout, text): the t/h/w id of every token, visual blocks
   shaded.
2. Frequency allocation: which axis owns each rotary pair (or each KV head for MHRoPE), highest frequency
   first.
3. Long-term decay per axis: mean over the pairs an axis owns of cos(delta * theta_j), i.e. the attention
   score of identical unit q/k vectors moved apart by delta along that axis only, for delta in
   1..max_distance (log scale). An axis whose pairs never rotate (HoPE's zeroed t row) is flat at 1 and
   marked NoPE.

matplotlib is imported only here (and lazily), so `mmrope.encodings` never needs it.
"""

from __future__ import annotations

import argparse
import ast
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .frequencies import LearnedGrapeRotary, Rotary

__all__ = [
    "DecayCurves",
    "ExampleSequence",
    "decay_curves",
    "example_sequence",
    "main",
    "plot_encoding",
    "plot_layouts",
]

AXES = ("t", "h", "w")
AXIS_COLORS = {"t": "#d62728", "h": "#1f77b4", "w": "#2ca02c", "N": "#bbbbbb"}
TEXT_IDS_START = 1000  # arbitrary non-special ids for the example's text tokens


@dataclass
class ExampleSequence:
    """A tiny multimodal row: input_ids [1, L] plus grids, and labelled spans for shading."""

    input_ids_BL: Tensor
    image_grid_thw: Tensor
    video_grid_thw: Tensor
    spans: list[tuple[int, int, str]]  # (start, end, label) of each visual block, end exclusive


def example_sequence(tokens: Any = None) -> ExampleSequence:
    """text(6) VS img(4x4) VE text(4) [ts(2) VS frame(4x4) VE] x2 text(3): 72 tokens (Qwen3-VL per-frame
    video)."""
    if tokens is None:
        from .tokens import TokenIds

        tokens = TokenIds()
    ids: list[int] = []
    spans: list[tuple[int, int, str]] = []
    next_text = iter(range(TEXT_IDS_START, TEXT_IDS_START + 1000))

    def text(count: int) -> None:
        ids.extend(next(next_text) for _ in range(count))

    def block(token_id: int, count: int, label: str) -> None:
        ids.append(tokens.vision_start_token_id)
        spans.append((len(ids), len(ids) + count, label))
        ids.extend([token_id] * count)
        ids.append(tokens.vision_end_token_id)

    text(6)
    block(tokens.image_token_id, 16, "image 4x4")
    text(4)
    for frame in range(2):
        text(2)  # the frame's timestamp, e.g. "<0.5 seconds>"
        block(tokens.video_token_id, 16, f"video frame {frame}")
    text(3)
    m = tokens.spatial_merge_size
    return ExampleSequence(
        input_ids_BL=torch.tensor([ids]),
        image_grid_thw=torch.tensor([[1, 4 * m, 4 * m]]),
        video_grid_thw=torch.tensor([[2, 4 * m, 4 * m]]),
        spans=spans,
    )


@dataclass
class DecayCurves:
    distance: Tensor  # [N] float64
    curves: dict[str, Tensor]  # axis -> [N] mean cos over its pairs
    owners: dict[str, str]  # axis -> what rotates with it, e.g. "16 pairs", "2 heads x 64 pairs", "NoPE"


def _channel_cosines(rotary: Rotary, pos_3BL: Tensor) -> tuple[Tensor, Tensor, int]:
    """cos(angle) of every rotated unit [L, P], which units rotate at all [P] (from sin / the rotated basis,
    since cos of a tiny float32 angle rounds to 1), and how many columns make one pair (2 for learned
    planes)."""
    if isinstance(rotary, LearnedGrapeRotary):
        # No cos/sin tensors: rotate each unit basis vector e_i and read <R e_i, e_i> = cos(angle of i's
        # plane).
        dim = rotary.rotary_dim
        basis = torch.eye(dim)[None, :, None, :].expand(1, dim, pos_3BL.shape[-1], dim)
        with torch.no_grad():
            rotated, _ = rotary.apply_qk(basis, basis[:, :1], pos_3BL)
        moves = (rotated - basis).abs().amax(dim=(0, 2, 3)) > 0  # angle 0 is an exact identity
        return (rotated * basis).sum(-1)[0].T, moves, 2  # both channels of a plane carry its cos
    cos, sin = rotary(pos_3BL)
    n = rotary.rotary_dim // 2
    cos, sin = cos[..., :n], sin[..., :n]
    if cos.ndim == 4:  # [B, H_kv, L, n] -> [L, H_kv * n]
        cos = cos[0].permute(1, 0, 2).reshape(cos.shape[2], -1)
        sin = sin[0].permute(1, 0, 2).reshape(sin.shape[2], -1)
        return cos, sin.abs().amax(0) > 0, 1
    return cos[0], sin[0].abs().amax(0) > 0, 1


def decay_curves(rotary: Rotary, max_distance: int = 4096, num_points: int = 400) -> DecayCurves:
    """Per axis: move only that axis by delta (others 0) and average cos(delta * theta_j) over the pairs it
    owns."""
    distance = torch.unique(torch.logspace(0, math.log10(max(2, max_distance)), num_points).round()).long()
    n = rotary.rotary_dim // 2
    curves, owners = {}, {}
    for axis, name in enumerate(AXES):
        pos = torch.zeros(3, 1, distance.numel(), dtype=torch.long)
        pos[axis, 0] = distance
        cos_LP, moves, per_pair = _channel_cosines(rotary, pos)
        num = int(moves.sum()) // per_pair
        if num == 0:
            owners[name] = "NoPE"
            curves[name] = torch.ones(distance.numel(), dtype=torch.float64)
            continue
        curves[name] = cos_LP.double()[:, moves].mean(-1)
        if rotary.per_head:
            owners[name] = f"{num // n} heads x {n} pairs"
        else:
            owners[name] = f"{num} {'planes' if per_pair == 2 else 'pairs'}"
    return DecayCurves(distance=distance.double(), curves=curves, owners=owners)


def _allocation_labels(rotary: Rotary) -> tuple[list[str], str]:
    """Letters per pair (or per KV head) and a caption for the allocation strip."""
    if isinstance(rotary, LearnedGrapeRotary):
        weight = getattr(rotary.learned_rotation, "axis_weight", None)
        if weight is None:  # axis mode: every plane is in all three banks
            return [], f"learned GRAPE (axis): t, h and w banks of {rotary.num_planes} planes each"
        letters = ["THW"[i] for i in weight.detach().abs().reshape(-1, 3).argmax(-1).tolist()]
        return letters, f"learned GRAPE ({rotary.grape_mode}): dominant axis of each plane's learned weights"
    pattern = getattr(rotary, "pattern", None)
    if not pattern:
        return [], "allocation pattern unavailable"
    if rotary.per_head:
        return list(
            pattern
        ), f"per KV head ({len(pattern)} heads, each with all {rotary.rotary_dim // 2} pairs)"
    return list(pattern), f"per rotary pair ({len(pattern)} pairs, highest frequency on the left)"


def _format_hparams(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())) or "defaults"


def _draw_layout(ax: Any, pos_3BL: Tensor, example: ExampleSequence, title: str = "") -> None:
    """Panel: the t/h/w id of every token of the example, visual blocks shaded."""
    from matplotlib.patches import Patch

    pos = pos_3BL[:, 0].double()
    index = torch.arange(pos.shape[-1])
    shades = {"image": "#f2d7a6", "video": "#cfe3f7"}
    for start, end, label in example.spans:
        ax.axvspan(start - 0.5, end - 0.5, color=shades[label.split()[0]], alpha=0.7, lw=0)
        ax.text(
            (start + end - 1) / 2,
            0.98,
            label,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
        )
    for axis, (letter, offset, marker) in enumerate(zip(AXES, (-0.18, 0.0, 0.18), ("o", "s", "^"))):
        ax.plot(
            index + offset,
            pos[axis],
            marker=marker,
            ms=3.5,
            lw=0.9,
            color=AXIS_COLORS[letter],
            label=f"{letter} id",
        )
    ax.set_xlim(-1, pos.shape[-1])
    ax.set_xlabel("token index (text unshaded; VS/VE/timestamps are text)")
    ax.set_ylabel("position id")
    ax.grid(alpha=0.3)
    legend = [
        *ax.get_legend_handles_labels()[0],
        Patch(color=shades["image"], label="image block"),
        Patch(color=shades["video"], label="video frame block"),
    ]
    ax.legend(handles=legend, loc="upper left", fontsize=8, ncol=5)
    ax.set_title(title or "Position layout of an example sequence", fontsize=10, loc="left")


def plot_layouts(name: str, variants: Sequence[dict[str, Any]], out: str | Path, *, dpi: int = 120) -> Path:
    """One position-layout panel per hyperparameter set of encoding `name`, stacked on one y scale: how an
    option moves the ids (e.g. ILRoPE `text_axes=diagonal` vs `text_axes=temporal`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import build

    example = example_sequence()
    fig, axes = plt.subplots(
        len(variants), 1, figsize=(13, 3.4 * len(variants)), sharex=True, sharey=True, constrained_layout=True
    )
    axes = [axes] if len(variants) == 1 else list(axes)
    for ax, hparams in zip(axes, variants):
        encoding = build(name, **hparams)
        pos_3BL, _ = encoding.position_ids(
            example.input_ids_BL, image_grid_thw=example.image_grid_thw, video_grid_thw=example.video_grid_thw
        )
        _draw_layout(ax, pos_3BL, example, title=f"{name}: {_format_hparams(hparams)}")
    fig.suptitle(f"{name}: position layout per option (same example sequence)", fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_encoding(
    name: str,
    out: str | Path,
    hparams: dict[str, Any] | None = None,
    *,
    head_dim: int = 128,
    rope_theta: float = 1e6,
    max_distance: int = 4096,
    dpi: int = 120,
) -> Path:
    """Render the layout / allocation / decay figure of encoding `name` to `out` (PNG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from . import build

    hparams = dict(hparams or {})
    encoding = build(name, **hparams)
    example = example_sequence()
    pos_3BL, _ = encoding.position_ids(
        example.input_ids_BL,
        image_grid_thw=example.image_grid_thw,
        video_grid_thw=example.video_grid_thw,
    )
    rotary = encoding.rotary(
        head_dim=head_dim, rope_theta=rope_theta, num_key_value_heads=hparams.get("num_key_value_heads")
    )
    decay = decay_curves(rotary, max_distance=max_distance)
    labels, caption = _allocation_labels(rotary)

    fig = plt.figure(figsize=(13, 10), constrained_layout=True)
    grid = fig.add_gridspec(3, 1, height_ratios=[3.2, 0.55, 2.6])
    ax_pos, ax_alloc, ax_decay = (fig.add_subplot(grid[i]) for i in range(3))

    # 1. Position layout.
    _draw_layout(ax_pos, pos_3BL, example)

    # 2. Frequency allocation strip.
    if labels:
        for j, letter in enumerate(labels):
            key = letter.lower() if letter in "THW" else "N"
            ax_alloc.add_patch(plt.Rectangle((j, 0), 1, 1, color=AXIS_COLORS[key], lw=0))
        ax_alloc.set_xlim(0, len(labels))
        handles = [Patch(color=AXIS_COLORS[a], label=a) for a in AXES]
        if "N" in labels:
            handles.append(Patch(color=AXIS_COLORS["N"], label="NoPE"))
        ax_alloc.legend(
            handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False
        )
    ax_alloc.set_ylim(0, 1)
    ax_alloc.set_yticks([])
    ax_alloc.set_title(f"Frequency allocation: {caption}", fontsize=10, loc="left")
    if not labels:
        ax_alloc.set_xticks([])

    # 3. Decay per axis.
    for letter, style in zip(AXES, ("-", "--", ":")):
        ax_decay.plot(
            decay.distance,
            decay.curves[letter],
            style,
            lw=1.6,
            color=AXIS_COLORS[letter],
            label=f"{letter} ({decay.owners[letter]})",
        )
    ax_decay.set_xscale("log")
    ax_decay.axhline(0, color="k", lw=0.6)
    ax_decay.set_xlim(1, decay.distance[-1].item())
    ax_decay.set_xlabel("relative distance Δ along one axis")
    ax_decay.set_ylabel("mean cos(Δ·θ_j) over the axis' pairs")
    ax_decay.grid(alpha=0.3, which="both")
    ax_decay.legend(fontsize=9)
    ax_decay.set_title(
        f"Long-term decay per axis (head_dim {head_dim}, θ {rope_theta:g}, rotary_dim {rotary.rotary_dim})",
        fontsize=10,
        loc="left",
    )

    shown = getattr(encoding, "hparams", hparams)
    fig.suptitle(textwrap.fill(f"{name}  —  {_format_hparams(shown)}", width=140), fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _parse_hparams(items: Sequence[str]) -> dict[str, Any]:
    """["k=v", ...] -> {k: literal(v)}; values that are not Python literals stay strings ("method=circle")."""
    hparams: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--hparams expects key=value, got {item!r}")
        try:
            hparams[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            hparams[key] = raw
    return hparams


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m mmrope.encodings.plot", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rope", required=True, help="registry name, e.g. mrope, mrope_i, videorope, hope")
    parser.add_argument("--out", default="layout.png", help="output image path (default layout.png)")
    parser.add_argument(
        "--hparams", nargs="*", default=[], metavar="KEY=VALUE", help="encoding hyperparameters"
    )
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rope-theta", type=float, default=1e6)
    parser.add_argument("--max-distance", type=int, default=4096)
    parser.add_argument("--dpi", type=int, default=120)
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="instead of the full figure, one layout panel per option set, e.g. text_axes=diagonal text_axes=temporal",
    )
    args = parser.parse_args(argv)
    if args.compare:
        base = _parse_hparams(args.hparams)
        variants = [base | _parse_hparams(item.split(",")) for item in args.compare]
        out = plot_layouts(args.rope, variants, args.out, dpi=args.dpi)
        print(out)
        return out
    out = plot_encoding(
        args.rope,
        args.out,
        _parse_hparams(args.hparams),
        head_dim=args.head_dim,
        rope_theta=args.rope_theta,
        max_distance=args.max_distance,
        dpi=args.dpi,
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
