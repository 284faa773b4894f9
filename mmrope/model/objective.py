"""The SFT objective as a module: packed row in, summed token loss out.

Wrapping the VLM in one `nn.Module` keeps the whole step inside a single forward, which is what DeepSpeed
ZeRO-3 needs to gather partitioned parameters: the LM head weight is used by the chunked loss directly (no
full-vocabulary logits), so it is registered as an external parameter of this module.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrope.model.loss import linear_cross_entropy, shift_labels


def packed_text_positions(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Per-sample 0..n-1 index over a packed row: [0,1,2, 0,1, 0,1,2,3] for lengths 3,2,4.

    transformers derives its packed (block-diagonal causal) attention mask from this row when `position_ids`
    has 4 rows (text row first), so samples never attend to each other.
    """
    idx_L = torch.arange(length, device=cu_seqlens.device)
    starts_L = cu_seqlens[:-1].repeat_interleave(cu_seqlens.diff()).to(idx_L)
    return idx_L - starts_L


class SFTObjective(nn.Module):
    def __init__(self, vlm: nn.Module, *, loss_chunk_size: int = 4096, zero_stage: int = 0):
        super().__init__()
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
        pos_3BL = batch["position_ids"]
        text_1L = packed_text_positions(cu_seqlens, input_ids_1L.shape[-1])[None]
        position_ids = torch.cat([text_1L[None].to(pos_3BL.dtype), pos_3BL], dim=0)  # [4, 1, L]
        out = self.vlm.model(
            input_ids=input_ids_1L,
            position_ids=position_ids,
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw") if batch.get("pixel_values") is not None else None,
            use_cache=False,
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
