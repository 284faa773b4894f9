"""The vision tower's work split across a sequence-parallel group (issue 23).

Under Ulysses sequence parallelism every rank of a group holds the same packed row. Without this module each of
them would run the vision tower on every image and video of the row: N times the ViT work and its transient
memory. Here each rank encodes a contiguous share of the row's media, and one all-gather over the group gives
every rank the whole row's features again, in row order:

    media, zero = encode_split(encoders, batch, sp, dummy=(pixels, grid), encode_absent=balance_vision)
    # media["image"].pooler_output: one feature chunk per image, as `get_image_features` returns them

- The plan (`plan_media`): the row's images then its videos, the order the tower encodes them, are cut into
  `sp.size` contiguous shares of whole images (never a part of one) that minimise the largest share's patch
  count (t*h*w of each grid, the ViT's token count). Every rank computes the same plan from the row's grids, so
  nothing is exchanged to agree on it. A share may be empty (fewer images than ranks).
- The split covers the whole `visual` module: ViT blocks, the connector (merger) and Qwen3-VL's deepstack
  mergers. The connector trains, so its gradient must come back exactly: the all-gather is autograd-aware
  (`GatherRows`: reduce-scatter in backward on NCCL, all-reduce then this rank's rows on gloo), so the rank
  that computed an image receives the sum of every rank's gradient for that image's features. Each
  visual token lies in exactly one rank's sequence slice, so only that rank's gradient for it is non-zero and
  the sum is exact; the connector gradients summed over the group (the data-parallel reduction) equal those of
  one process on the whole row. Splitting only the ViT and running the connector on every rank would keep the
  connector's (small) work duplicated and gather the wider ViT hidden states instead: no gain.
- One collective per micro step: each rank packs its image and video features, pooler and deepstack side by side
  (`[tokens, D * (1 + deepstack layers)]`), padded to the largest share (all_gather needs equal sizes).
- Every rank still runs the tower once per media kind of the row, on a dummy 1 x merge x merge grid when its
  share of that kind is empty (and, with `encode_absent`, for a kind the row lacks), joined to the loss with
  weight 0: ZeRO-3 gathers the tower's parameters with collectives each time it runs, so all ranks must run it
  equally often, and the dummy tells an empty rank the features' width and dtype for the all-gather.

Single-device model code stays untouched: this is a wrapper around the model's own `get_image_features` /
`get_video_features`, given the group (`mmrope.distributed.sequence_parallel.SequenceParallel`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmrope.model.objective import tensors_of

if TYPE_CHECKING:
    from mmrope.distributed.sequence_parallel import SequenceParallel

# (media kind, pixels key, grid key) in the order the tower encodes them (images first, as the stock forward)
KINDS = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


@dataclass
class VisionFeatures:
    """What `get_image_features` returns, as the SP objective reads it: one chunk per image / video."""

    pooler_output: tuple[Tensor, ...]
    deepstack_features: list[tuple[Tensor, ...]] | None = None  # Qwen3-VL: per deepstack layer, per image


def plan_shares(patches: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Cut items with these patch counts into `size` contiguous `[start, end)` ranges (rank order, covering every
    item once) whose largest patch sum is the smallest possible. Trailing ranges may be empty."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not patches:
        return [(0, 0)] * size

    def shares_within(cap: int) -> list[tuple[int, int]]:  # greedy: each share takes items while they fit
        out, start, total = [], 0, 0
        for i, n in enumerate(patches):
            if total + n > cap:
                out.append((start, i))
                start, total = i, 0
            total += n
        return out + [(start, len(patches))]

    low, high = max(patches), sum(patches)  # the smallest feasible cap, found by bisection
    while low < high:
        cap = (low + high) // 2
        if len(shares_within(cap)) <= size:
            high = cap
        else:
            low = cap + 1
    shares = shares_within(low)
    return shares + [(len(patches), len(patches))] * (size - len(shares))


def plan_media(patches: dict[str, Sequence[int]], size: int) -> list[dict[str, tuple[int, int]]]:
    """Per rank, the `[start, end)` items of each media kind it encodes: one contiguous cut of the kinds' items
    in `KINDS` order (images, then videos), balanced by patch count over both kinds together."""
    kinds = [k for k, _, _ in KINDS if k in patches]
    joint = [n for k in kinds for n in patches[k]]
    offsets = {}
    start = 0
    for k in kinds:
        offsets[k] = start
        start += len(patches[k])
    plan = []
    for a, b in plan_shares(joint, size):
        share = {}
        for k in kinds:
            lo, hi = offsets[k], offsets[k] + len(patches[k])
            share[k] = (min(max(a, lo), hi) - lo, min(max(b, lo), hi) - lo)
        plan.append(share)
    return plan


def grid_patches(grid_thw: Tensor) -> list[int]:
    """Patch count t*h*w of each image / video (the ViT's tokens; features are these / merge**2)."""
    return [int(n) for n in grid_thw.prod(-1).tolist()]


def encode_split(
    encoders: dict[str, Callable],
    batch: dict,
    sp: SequenceParallel,
    *,
    merge_size: int,
    dummy: tuple[Tensor, Tensor],
    encode_absent: bool,
) -> tuple[dict[str, VisionFeatures], Tensor]:
    """Encode this rank's share of the row's media and all-gather the features over `sp.group`.

    Args:
        encoders: media kind -> the model's `get_image_features` / `get_video_features`.
        batch: the packed row (`pixel_values` + `image_grid_thw`, `pixel_values_videos` + `video_grid_thw`).
        sp: the group (`SequenceParallel`: group, size, rank).
        merge_size: the connector's spatial merge (features per image = patches / merge_size**2).
        dummy: pixels and grid of a minimal image, encoded when a rank's share of a kind is empty.
        encode_absent: also encode the dummy for a kind the row lacks (data parallelism under ZeRO-3).

    Returns the whole row's features per kind present (as the unsplit path returns them) and a zero scalar that
    carries the dummy encodings into the loss with weight 0.
    """
    present = {k: batch[grid_key] for k, pixels_key, grid_key in KINDS if batch.get(pixels_key) is not None}
    patches = {k: grid_patches(grid) for k, grid in present.items()}
    plan = plan_media(patches, sp.size)
    zero = torch.zeros((), device=batch["input_ids"].device)
    local: dict[str, Tensor] = {}  # this rank's packed features per kind
    template, num_blocks = None, 1  # an encoder output's packing: width, dtype, device; pooler + deepstack
    for kind, pixels_key, _ in KINDS:
        if kind not in present and not encode_absent:
            continue
        start, end = plan[sp.rank][kind] if kind in present else (0, 0)
        if end > start:
            rows = torch.tensor([0, *patches[kind]]).cumsum(0).tolist()
            out = encoders[kind](
                batch[pixels_key][rows[start] : rows[end]], present[kind][start:end], return_dict=True
            )
            local[kind], num_blocks = _pack(out)
            template = local[kind]
        else:
            out = encoders[kind](*dummy, return_dict=True)
            zero = zero + 0.0 * sum(t.float().sum() for t in tensors_of(out))
            if template is None:
                template, num_blocks = _pack(out)
    if not present:
        return {}, zero

    # Feature rows of every rank's share (the same arithmetic on every rank), then one all-gather.
    tokens = {k: [n // merge_size**2 for n in patches[k]] for k in present}
    share_rows = [[sum(tokens[k][a:b]) for k, (a, b) in share.items()] for share in plan]
    largest = max(sum(r) for r in share_rows)
    mine_ND = torch.cat([local[k] for k in present if k in local] or [template[:0]], dim=0)
    if mine_ND.shape[0] != sum(share_rows[sp.rank]):  # the unpacking below relies on this count
        raise RuntimeError(
            f"vision split: the tower returned {mine_ND.shape[0]} feature rows for a share of "
            f"{sum(share_rows[sp.rank])} (patches / spatial_merge_size**2 = {merge_size}**2)"
        )
    padded_ND = torch.cat([mine_ND, mine_ND.new_zeros(largest - mine_ND.shape[0], mine_ND.shape[1])])
    gathered = GatherRows.apply(padded_ND, sp.group).chunk(sp.size, dim=0)
    # Unpack in rank order: each kind's rows of rank 0, rank 1, ... are its items in row order.
    per_kind: dict[str, list[Tensor]] = {k: [] for k in present}
    for rank_ND, rows in zip(gathered, share_rows):
        offset = 0
        for k, n in zip(present, rows):
            per_kind[k].append(rank_ND[offset : offset + n])
            offset += n
    width = template.shape[1] // num_blocks
    media = {}
    for k in present:
        all_ND = torch.cat(per_kind[k], dim=0)
        blocks = all_ND.split(width, dim=1)  # pooler, then each deepstack layer
        media[k] = VisionFeatures(
            pooler_output=blocks[0].split(tokens[k]),
            deepstack_features=[b.split(tokens[k]) for b in blocks[1:]] or None,
        )
    return media, zero


class GatherRows(torch.autograd.Function):
    """All-gather equal-sized `[N, D]` tensors over `group` into `[size * N, D]` (rank order); backward sums every
    rank's gradient for a rank's rows and hands them to that rank.

    Why not `torch.distributed.nn.functional.all_gather`: its backward off NCCL (gloo) scatters with group ranks
    taken as global ranks, which fails on any group that does not start at rank 0 (data-parallel x SP).
    """

    @staticmethod
    def forward(ctx, x_ND: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        parts = [torch.empty_like(x_ND) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x_ND.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_ND: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad_ND = grad_ND.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out_ND = grad_ND.new_empty(grad_ND.shape[0] // size, *grad_ND.shape[1:])
            dist.reduce_scatter_tensor(out_ND, grad_ND, group=ctx.group)
            return out_ND, None
        grad_ND = (
            grad_ND.clone()
        )  # all_reduce works in place; autograd's incoming gradient is not ours to change
        dist.all_reduce(grad_ND, group=ctx.group)  # off NCCL: an all-reduce (twice the volume), the same sum
        return grad_ND.chunk(size, dim=0)[rank], None


def _pack(out) -> tuple[Tensor, int]:
    """An encoder output as one `[tokens, D * blocks]` tensor (the pooler, then each deepstack layer, all of
    width D) and its number of blocks."""
    blocks = [torch.cat(out.pooler_output, dim=0)]
    for layer in getattr(out, "deepstack_features", None) or []:
        blocks.append(torch.cat(layer, dim=0))
    return torch.cat(blocks, dim=1), len(blocks)
