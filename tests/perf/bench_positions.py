"""Benchmark (not a test; run by `make bench`): position ids of a 32K-token packed row with ~40 images.

Times mmrope's MRoPE design (layout qwen2_5) against transformers' `Qwen2_5_VLModel.get_rope_index` on the same
row (as one sequence, since transformers has no per-sample packing) and prints the ratio. Also times the packed
path (per-sample restart) and a few other designs.
"""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import torch

from mmrope.encodings import build

IMG, VS, VE = 151655, 151652, 151653
ROW_TOKENS = 32_768
NUM_SAMPLES = 8


def make_row(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """~40 images (5 per sample) of random grids, text in between; exactly ROW_TOKENS tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    grids: list[list[int]] = []
    cu = [0]
    per_sample = ROW_TOKENS // NUM_SAMPLES
    for _ in range(NUM_SAMPLES):
        sample: list[int] = []
        for _ in range(5):
            h, w = (int(x) * 2 for x in torch.randint(8, 24, (2,), generator=gen))
            grids.append([1, h, w])
            sample += list(range(1000, 1000 + int(torch.randint(20, 200, (1,), generator=gen)))) + [VS]
            sample += [IMG] * (h // 2 * w // 2) + [VE]
        sample += list(range(1000, 1000 + per_sample - len(sample)))
        ids += sample
        cu.append(len(ids))
    return torch.tensor(ids), torch.tensor(grids), cu


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    ids_L, grids, cu = make_row()
    ids_1L = ids_L.view(1, -1)
    print(f"row: {ids_L.numel()} tokens, {len(grids)} images, {NUM_SAMPLES} samples")
    enc = build("mrope")
    ours = best_of(lambda: enc.position_ids(ids_1L, image_grid_thw=grids, layout="qwen2_5"))
    print(f"mmrope mrope position_ids (one sequence):     {ours * 1e3:8.2f} ms")
    packed = best_of(lambda: enc.packed_position_ids(ids_L, cu, image_grid_thw=grids, layout="qwen2_5"))
    print(f"mmrope mrope packed_position_ids (8 samples): {packed * 1e3:8.2f} ms")
    for name in ("videorope", "circlerope", "v2pe", "lumos"):
        t = best_of(functools.partial(build(name).position_ids, ids_1L, image_grid_thw=grids))
        print(f"mmrope {name:10s} position_ids:               {t * 1e3:8.2f} ms")
    try:
        import transformers
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    except ImportError:
        print("transformers not installed: no reference timing")
        return
    stub = SimpleNamespace(config=transformers.Qwen2_5_VLConfig())
    stub.config.vision_config.tokens_per_second = 2
    stub.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, stub)
    mm_types = (ids_1L == IMG).int()
    hf = best_of(lambda: Qwen2_5_VLModel.get_rope_index(stub, ids_1L, mm_types, grids, None, None, None))
    hf_pos, _ = Qwen2_5_VLModel.get_rope_index(stub, ids_1L, mm_types, grids, None, None, None)
    our_pos, _ = enc.position_ids(ids_1L, image_grid_thw=grids, layout="qwen2_5")
    print(f"transformers {transformers.__version__} get_rope_index:       {hf * 1e3:8.2f} ms")
    print(f"ratio transformers / mmrope: {hf / ours:.2f}x  (positions equal: {torch.equal(hf_pos, our_pos)})")


if __name__ == "__main__":
    main()
