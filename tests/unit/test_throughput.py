"""MFU needs the device's peak: detected for known GPUs, settable, and "n/a" (not 0.0%) where unknown."""

from __future__ import annotations

import pytest
import torch

from mmrope.model.config import FreezeConfig
from mmrope.train.throughput import Throughput, detect_peak_tflops
from tests.unit.model.tiny import tiny_qwen2_5_vl

# Dense bf16 TFLOP/s from NVIDIA's datasheets (which print the sparse figure, twice these).
DATASHEET = [
    ("NVIDIA H100 80GB HBM3", 989.5),  # H100 SXM5
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5),  # H200 SXM
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
]


@pytest.mark.parametrize("name,peak", DATASHEET)
def test_known_gpus_are_detected(name, peak):
    assert detect_peak_tflops(name) == peak


@pytest.mark.parametrize("name", ["cpu", "NVIDIA GeForce RTX 4090", "NVIDIA L4", "", None])
def test_unknown_devices_have_no_peak(name):
    assert detect_peak_tflops(name) is None


def step_metrics(peak_tflops):
    config = tiny_qwen2_5_vl().config
    t = Throughput(config, peak_tflops=peak_tflops, world_size=2, freeze=FreezeConfig())
    row = {"cu_seqlens": torch.tensor([0, 40, 100]), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    return t.step_metrics(
        0.5, rows=[row], num_supervised_global=60, global_scale=2.0, tokens_global=200, samples_global=4
    )


def test_mfu_is_left_out_without_a_peak_and_follows_a_set_one():
    unknown = step_metrics(None)
    assert "perf/mfu" not in unknown  # the report shows "n/a", never 0.0%
    assert unknown["perf/tflops_per_device"] > 0 and unknown["perf/tokens_per_s"] == 400
    known = step_metrics(400.0)
    assert known["perf/mfu"] == pytest.approx(known["perf/tflops_per_device"] / 400.0, rel=1e-12)
