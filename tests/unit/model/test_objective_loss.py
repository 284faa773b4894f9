"""The SFT objective's loss settings (`loss.backend`, `loss.chunk_size`) reach the loss it computes.

The observable for the chunk size: the LM head's matmuls themselves. Every chunk of the chunked loss is one
`[rows, V]` matmul with the head's weight in forward, so a dispatch mode that records the rows of each such
matmul sees exactly how the supervised rows were walked; the loss must not depend on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmrope.encodings import build
from mmrope.model.install import install
from mmrope.model.objective import SFTObjective, num_supervised
from tests.unit.model.tiny import TOKENS, image_sample, pixels, tiny_qwen2_5_vl

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class LMHeadMatmulRows(TorchDispatchMode):
    """Rows of every matmul with the LM head weight (the logits chunks, `[rows, V]`), in call order."""

    def __init__(self, lm_head_weight_VD: torch.Tensor):
        super().__init__()
        # The weight's own address and size, not its storage's: DeepSpeed keeps parameters in flat buffers.
        self.weight = (lm_head_weight_VD.data_ptr(), lm_head_weight_VD.numel())
        self.vocab_size = lm_head_weight_VD.shape[0]
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS and any(
            isinstance(a, torch.Tensor) and (a.data_ptr(), a.numel()) == self.weight for a in args
        ):
            assert out.shape[1] == self.vocab_size, "forward only: the logits of a chunk"
            self.rows.append(out.shape[0])
        return out


def packed_batch() -> dict:
    """One packed row of two samples (image + text, text only); the text tokens are supervised."""
    enc = build("mrope", mrope_section=[2, 3, 3])
    a, grid = image_sample(6, (4, 4), 20, seed=1)
    b = torch.randint(2, 50, (17,), generator=torch.Generator().manual_seed(2))
    ids_L = torch.cat([a, b])
    cu = torch.tensor([0, len(a), len(ids_L)], dtype=torch.int32)
    labels_L = torch.where(ids_L < 50, ids_L, torch.full_like(ids_L, -100))
    return {
        "input_ids": ids_L[None],
        "labels": labels_L[None],
        "position_ids": enc.packed_position_ids(ids_L, cu, tokens=TOKENS, image_grid_thw=grid)[:, None],
        "cu_seqlens": cu,
        "pixel_values": pixels(grid, seed=1),
        "image_grid_thw": grid,
    }


def objective(**loss_kwargs) -> SFTObjective:
    model = tiny_qwen2_5_vl(seed=0)
    install(model, build("mrope", mrope_section=[2, 3, 3]))
    return SFTObjective(model, **loss_kwargs)


def test_loss_chunk_size_reaches_the_loss_and_leaves_its_value():
    batch = packed_batch()
    n = num_supervised(batch)
    assert n > 8  # several chunks of 3 below
    results = {}
    for chunk_size in (3, 4096):
        obj = objective(loss_chunk_size=chunk_size)
        with LMHeadMatmulRows(obj.vlm.lm_head.weight) as seen:
            loss = obj(batch)
        results[chunk_size] = (loss.detach(), seen.rows)
    loss_small, rows_small = results[3]
    loss_default, rows_default = results[4096]
    assert rows_small == [3] * (n // 3) + ([n % 3] if n % 3 else [])  # ceil(n / 3) chunks of the n rows
    assert len(rows_small) == math.ceil(n / 3)
    assert rows_default == [n]  # one chunk: only the supervised rows get logits
    torch.testing.assert_close(loss_small, loss_default, rtol=1e-6, atol=1e-6)


def test_loss_settings_are_checked_by_the_objective():
    with pytest.raises(ValueError, match="loss_backend"):
        objective(loss_backend="fused")
    with pytest.raises(ValueError, match="loss_chunk_size"):
        objective(loss_chunk_size=0)
    assert objective(loss_backend="liger").loss_backend == "liger"  # running it needs CUDA (tests/gpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_liger_objective_on_cpu_is_refused_in_forward():
    """Reached only by code that skips validate() (train.py refuses loss.backend=liger first)."""
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        objective(loss_backend="liger")(packed_batch())
