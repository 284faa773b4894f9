"""The plan of the vision split (mmrope.distributed.vision_split): contiguous shares of whole images, balanced by patch
count, the same on every rank. The split itself (all-gather, gradients, deepstack) runs against one process without
SP in tests/integration/test_sequence_parallel.py."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from mmrope.distributed.vision_split import grid_patches, plan_media, plan_shares


def best_largest_share(patches: list[int], size: int) -> int:
    """The smallest possible largest share over every way to cut `patches` into `size` contiguous ranges."""
    n = len(patches)
    best = sum(patches)
    for cuts in itertools.combinations_with_replacement(range(n + 1), size - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(sum(patches[a:b]) for a, b in zip(bounds[:-1], bounds[1:])))
    return best


def check_shares(shares: list[tuple[int, int]], num_items: int, size: int) -> None:
    assert len(shares) == size
    assert shares[0][0] == 0 and shares[-1][1] == num_items
    for (_, b), (a, _) in zip(shares[:-1], shares[1:]):
        assert a == b  # contiguous, in rank order, every item once
    assert all(a <= b for a, b in shares)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shares_are_contiguous_and_minimise_the_largest(size):
    rng = random.Random(size)
    for _ in range(40):
        patches = [rng.choice([4, 16, 64, 256, 1024]) * rng.randint(1, 4) for _ in range(rng.randint(1, 7))]
        shares = plan_shares(patches, size)
        check_shares(shares, len(patches), size)
        largest = max(sum(patches[a:b]) for a, b in shares)
        assert largest == best_largest_share(patches, size), (patches, shares)


def test_fewer_images_than_ranks_and_no_images():
    # one image per rank while they last, the other ranks encode nothing
    assert plan_shares([64, 16], 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert plan_shares([], 2) == [(0, 0), (0, 0)]
    # a large image alone, the small ones together
    assert plan_shares([16, 16, 16, 1024], 2) == [(0, 3), (3, 4)]
    with pytest.raises(ValueError, match="size"):
        plan_shares([1], 0)


def test_images_and_videos_are_cut_together():
    # images [64, 64] then a video of 128 patches: the video gets a rank of its own
    plan = plan_media({"image": [64, 64], "video": [128]}, 2)
    assert plan == [{"image": (0, 2), "video": (0, 0)}, {"image": (2, 2), "video": (0, 1)}]
    # a share may span both kinds: the last image and the video
    plan = plan_media({"image": [100, 20], "video": [80]}, 2)
    assert plan == [{"image": (0, 1), "video": (0, 0)}, {"image": (1, 2), "video": (0, 1)}]
    assert plan_media({"video": [8, 8]}, 2) == [{"video": (0, 1)}, {"video": (1, 2)}]
    assert plan_media({}, 3) == [{}, {}, {}]


def test_patches_are_t_h_w():
    assert grid_patches(torch.tensor([[1, 4, 6], [2, 8, 8]])) == [24, 128]
