"""Helpers for the position-design tests: build Qwen-VL token rows from a compact description."""

from __future__ import annotations

import pytest
import torch

IMG, VID, VS, VE = 151655, 151656, 151652, 151653
PAD = 151643


class Seq:
    """Token-row builders. Text ids are arbitrary non-special ids; grids are vision grids (merge size 2)."""

    IMG, VID, VS, VE, PAD = IMG, VID, VS, VE, PAD

    @staticmethod
    def text(n: int, start: int = 1000) -> list[int]:
        return list(range(start, start + n))

    @staticmethod
    def image(grid: tuple[int, int, int], close: bool = True) -> list[int]:
        t, h, w = grid
        return [VS] + [IMG] * (t * (h // 2) * (w // 2)) + ([VE] if close else [])

    @staticmethod
    def video_qwen3(grid: tuple[int, int, int], ts_start: int = 2000) -> list[int]:
        """Qwen3-VL layout: `<ts_f> VS frame_f VE` per frame."""
        t, h, w = grid
        out: list[int] = []
        for f in range(t):
            out += [ts_start + f, VS] + [VID] * ((h // 2) * (w // 2)) + [VE]
        return out

    @staticmethod
    def video_qwen25(grid: tuple[int, int, int]) -> list[int]:
        """Qwen2.5-VL layout: one contiguous `VS T*h'*w' VE` block."""
        t, h, w = grid
        return [VS] + [VID] * (t * (h // 2) * (w // 2)) + [VE]

    @staticmethod
    def batch(rows: list[list[int]], sides: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad rows to a common length; sides[i] in {"left", "right"}. Returns (input_ids_BL, attention_mask_BL)."""
        length = max(len(r) for r in rows)
        sides = sides or ["right"] * len(rows)
        ids, mask = [], []
        for row, side in zip(rows, sides):
            pad = length - len(row)
            if side == "left":
                ids.append([PAD] * pad + row)
                mask.append([0] * pad + [1] * len(row))
            else:
                ids.append(row + [PAD] * pad)
                mask.append([1] * len(row) + [0] * pad)
        return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture
def seq() -> type[Seq]:
    return Seq
