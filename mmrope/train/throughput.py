"""Per-step throughput metrics: tokens/s, samples/s, model FLOPs and MFU, peak memory.

FLOPs follow the convention in the docstring of `mmrope.train.flops`: attention is
counted per packed sample, the frozen ViT forward-only, the LM head only on supervised tokens.
"""

from __future__ import annotations

import resource
import sys

import torch

from mmrope.train.flops import mfu, seqlens_from_cu_seqlens, shapes_from_hf_config, step_flops

# Dense bf16 tensor-core peak per device, TFLOP/s (NVIDIA datasheets list them "with sparsity": half of that).
# Matched against `torch.cuda.get_device_name()` in this order (the first substring found wins).
PEAK_TFLOPS_BF16 = (
    ("H200 NVL", 835.5),
    ("H200", 989.5),  # SXM
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.5),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM4 and PCIe, 40 and 80 GB
)


def detect_peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a known GPU by its name (e.g. "NVIDIA H200" -> 989.5), else None (CPU, unknown)."""
    if not device_name:
        return None
    name = device_name.lower()
    return next((peak for key, peak in PEAK_TFLOPS_BF16 if key.lower() in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class Throughput:
    """`peak_tflops`: the device's peak for MFU; None (unknown device) leaves MFU out: it is reported "n/a"."""

    def __init__(self, hf_config, *, peak_tflops: float | None, world_size: int, freeze) -> None:
        self.llm, self.vit = shapes_from_hf_config(hf_config)
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
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
        out = {
            "perf/tokens_per_s": tokens_global / step_seconds,
            "perf/samples_per_s": samples_global / step_seconds,
            "perf/tflops_per_device": total / step_seconds / self.world_size / 1e12,
            "perf/peak_mem_gb": peak_memory_gb(),
        }
        if self.peak_flops is not None:
            out["perf/mfu"] = mfu(total, step_seconds, self.peak_flops, self.world_size)
        return out


def peak_memory_gb() -> float:
    """Peak device memory on GPU (allocator high-water mark), peak RSS of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
