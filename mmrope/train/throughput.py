"""Per-step throughput metrics: tokens/s, samples/s, model FLOPs and MFU, peak memory.

FLOPs follow the convention of `mmrope.train.flops` (README "Metrics and MFU convention"): attention is
counted per packed sample, the frozen ViT forward-only, the LM head only on supervised tokens.
"""

from __future__ import annotations

import resource
import sys

import torch

from mmrope.train.flops import mfu, seqlens_from_cu_seqlens, shapes_from_hf_config, step_flops


class Throughput:
    def __init__(self, hf_config, *, peak_tflops: float, world_size: int, freeze) -> None:
        self.llm, self.vit = shapes_from_hf_config(hf_config)
        self.peak_flops = peak_tflops * 1e12
        self.world_size = world_size
        self.freeze = freeze

    def step_metrics(
        self,
        step_seconds: float,
        *,
        rows: list[dict],
        num_supervised_global: float,
        global_scale: float,
        tokens_global: float,
        samples_global: float,
    ) -> dict[str, float]:
        """`rows` are this rank's rows; FLOPs are scaled to the whole step by `global_scale` (tokens_global /
        tokens_local), which is exact when ranks see similar row compositions and cheap (no extra collective)."""
        seqlens = [n for r in rows for n in seqlens_from_cu_seqlens(r["cu_seqlens"])]
        grids = [  # images and videos both go through the (frozen) ViT and the connector
            r[key]
            for r in rows
            for key in ("image_grid_thw", "video_grid_thw")
            if r.get(key) is not None and len(r[key])
        ]
        grid = torch.cat(grids) if grids else None
        local_supervised = num_supervised_global / max(global_scale, 1e-9)
        flops = step_flops(
            self.llm,
            self.vit,
            seqlens,
            int(round(local_supervised)),
            grid,
            train_llm=not self.freeze.llm,
            train_connector=not self.freeze.connector,
            train_vit=not self.freeze.vision,
            fused_lm_head=True,
        )
        total = flops["total"] * global_scale
        return {
            "perf/tokens_per_s": tokens_global / step_seconds,
            "perf/samples_per_s": samples_global / step_seconds,
            "perf/tflops_per_device": total / step_seconds / self.world_size / 1e12,
            "perf/mfu": mfu(total, step_seconds, self.peak_flops, self.world_size),
            "perf/peak_mem_gb": peak_memory_gb(),
        }


def peak_memory_gb() -> float:
    """Peak device memory on GPU (allocator high-water mark), peak RSS of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
