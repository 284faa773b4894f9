"""The SFT objective as a module: packed row in, summed token loss out.

Wrapping the VLM in one `nn.Module` keeps the whole step inside a single forward, which is what DeepSpeed
ZeRO-3 needs to gather partitioned parameters: the LM head weight is used by the chunked loss directly (no
full-vocabulary logits), so it is registered as an external parameter of this module.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrope.model.install import is_installed, seam_kwargs
from mmrope.model.loss import linear_cross_entropy, shift_labels


class SFTObjective(nn.Module):
    def __init__(self, vlm: nn.Module, *, loss_chunk_size: int = 4096, zero_stage: int = 0):
        super().__init__()
        if not is_installed(vlm):
            raise ValueError("vlm: install an mmrope encoding first (mmrope.model.install.install)")
        self.vlm = vlm
        self.loss_chunk_size = loss_chunk_size
        if zero_stage == 3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self.vlm.lm_head.weight)

    def forward(self, batch: dict, num_global_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """Return the token cross-entropy summed over this row, divided by `num_global_tokens` (the supervised
        tokens of the whole optimizer step, all ranks and micro-steps). None = this row's own count."""
        input_ids_1L = batch["input_ids"]
        cu_seqlens = batch["cu_seqlens"]
        # Positions come with the batch (3 rows, per sample); packing goes to attention as cu_seqlens.
        kw = seam_kwargs(
            cu_seqlens=cu_seqlens,
            static_position_ids=batch.get("static_position_ids"),
            visual_mask_BL=batch.get("visual_mask") if batch.get("static_position_ids") is not None else None,
        )
        out = self.vlm.model(
            input_ids=input_ids_1L,
            position_ids=batch["position_ids"],
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw") if batch.get("pixel_values") is not None else None,
            pixel_values_videos=batch.get("pixel_values_videos"),
            video_grid_thw=batch.get("video_grid_thw")
            if batch.get("pixel_values_videos") is not None
            else None,
            use_cache=False,
            **kw,
        )
        hidden_LD = out.last_hidden_state[0]
        labels_L = shift_labels(batch["labels"], cu_seqlens)[0]
        return linear_cross_entropy(
            hidden_LD,
            self.vlm.lm_head.weight,
            labels_L,
            num_global_tokens=num_global_tokens,
            chunk_size=self.loss_chunk_size,
            lm_head_bias_V=self.vlm.lm_head.bias,
        )


def num_supervised(batch: dict) -> int:
    """Supervised tokens of a row after the in-sample shift (each sample's last label has nothing to predict)."""
    return int((shift_labels(batch["labels"], batch["cu_seqlens"]) != -100).sum())
