"""Compact pixels: rows carry the resized image as uint8 patches; rescale + normalise happen on the device.

A row of 32K tokens holds up to ~28K visual tokens = 112K patches of 3*2*14*14 values: 530 MB as float32, 130 MB
as uint8. The data workers therefore stop after the image processor's resize + patchify (values 0..255, exact in
uint8) and the trainer expands them with a [C, 256] table built by the image processor's *own* `rescale` and
`normalize` on the 256 possible values of each channel. Every output element is the same float32 operation on
the same input as in the processor, so the expanded pixels are bitwise the processor's float32 output (tested):
CPU fp32 training does not change. On a bf16 model the model casts them as before.
"""

from __future__ import annotations

import numpy as np
import torch

PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def pixel_table(image_processor) -> torch.Tensor:
    """[C, 256] float32: the processor's rescale + normalise of value v in channel c (bitwise its pipeline)."""
    channels = len(image_processor.image_mean)
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 1, 256)).copy()  # channel-first image
    out = values
    if image_processor.do_rescale:
        out = image_processor.rescale(out, image_processor.rescale_factor)
    if image_processor.do_normalize:
        out = image_processor.normalize(out, image_processor.image_mean, image_processor.image_std)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(channels, 256)


def expand(pixels_u8: torch.Tensor, table_C256: torch.Tensor) -> torch.Tensor:
    """uint8 patches [P, C*X] (channel-major within a patch, as Qwen2-VL flattens them) -> float32 [P, C*X]."""
    num_channels = table_C256.shape[0]
    num_patches = pixels_u8.shape[0]
    offsets_1C1 = (256 * torch.arange(num_channels, device=pixels_u8.device, dtype=torch.int32)).view(
        1, -1, 1
    )
    index = pixels_u8.view(num_patches, num_channels, -1).to(torch.int32) + offsets_1C1
    out = table_C256.to(pixels_u8.device).reshape(-1).index_select(0, index.reshape(-1))
    return out.view(num_patches, -1)


def expand_pixels(batch: dict) -> dict:
    """Replace uint8 pixel tensors of a (device) batch by their float32 values; other keys untouched."""
    table = batch.pop("pixel_table", None)
    for key in PIXEL_KEYS:
        value = batch.get(key)
        if value is not None and value.dtype == torch.uint8:
            if table is None:
                raise ValueError(f"batch: uint8 {key} without a pixel_table to expand them")
            batch[key] = expand(value, table)
    return batch


def to_device(row: dict, device: torch.device) -> dict:
    """A row on the device with its pixels expanded there (the host -> device copy moves uint8)."""
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
    return expand_pixels(batch)
