"""The SFT objective as a module: packed row in, summed token loss out.

Wrapping the VLM in one `nn.Module` keeps the whole step inside a single forward, which is what DeepSpeed
ZeRO-3 needs to gather partitioned parameters: the LM head weight is used by the loss directly (no
full-vocabulary logits; `loss_backend` chunked or liger, both in `mmrope.model.loss`), so the engine registers it
as an external parameter of this module (`mmrope.train.engine.register_external_parameters`).

Data parallelism with rows of different media: ZeRO-3 gathers a module's partitioned parameters with collectives
each time it runs, so every rank must run the vision tower the same number of times per micro step. A rank whose
row has no image (or no video) runs the tower once on a minimal dummy grid for that media type and adds the
result to the loss with weight 0, which also gives the trainable connector a (zero) gradient on every rank.

Sequence parallelism is a subclass, `mmrope.distributed.objective.SequenceParallelObjective`: same media, same
loss, on this rank's slice of the merged row.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrope.model.install import is_installed, seam_kwargs
from mmrope.model.loss import LOSS_BACKENDS, linear_cross_entropy, shift_labels


class SFTObjective(nn.Module):
    def __init__(
        self,
        vlm: nn.Module,
        *,
        loss_backend: str = "chunked",
        loss_chunk_size: int = 4096,
        balance_vision: bool = False,
    ):
        super().__init__()
        if not is_installed(vlm):
            raise ValueError("vlm: install an mmrope encoding first (mmrope.model.install.install)")
        if loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss_backend must be one of {LOSS_BACKENDS}, got {loss_backend!r}")
        if loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {loss_chunk_size}")
        self.vlm = vlm
        self.loss_backend = loss_backend
        self.loss_chunk_size = loss_chunk_size  # rows of logits at once (the chunked backend)
        self.balance_vision = balance_vision  # set for data-parallel runs (world size > 1)

    def forward(self, batch: dict, num_global_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """Return the token cross-entropy summed over this row, divided by `num_global_tokens` (the supervised
        tokens of the whole optimizer step, all ranks and micro-steps). None = this row's own count."""
        media, media_zero = self._encode_media(batch)
        cu_seqlens = batch["cu_seqlens"]
        # Positions come with the batch (3 rows, per sample); packing goes to attention as cu_seqlens.
        # The longest sample, read on the host once per row rather than by every layer's varlen kernel.
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        kw = seam_kwargs(
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            static_position_ids=batch.get("static_position_ids"),
            visual_mask_BL=batch.get("visual_mask") if batch.get("static_position_ids") is not None else None,
        )
        out = self.vlm.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            mm_encoder_outputs=media,  # vision features computed above; transformers scatters them in
            image_grid_thw=batch.get("image_grid_thw") if "image" in media else None,
            video_grid_thw=batch.get("video_grid_thw") if "video" in media else None,
            use_cache=False,
            **kw,
        )
        labels_L = shift_labels(batch["labels"], cu_seqlens)[0]
        return self.loss(out.last_hidden_state[0], labels_L, num_global_tokens) + media_zero

    def loss(
        self, hidden_LD: torch.Tensor, labels_L: torch.Tensor, num_global_tokens: int | torch.Tensor | None
    ) -> torch.Tensor:
        """The token cross-entropy of these hidden states through the LM head, never materialising all logits."""
        return linear_cross_entropy(
            hidden_LD,
            self.vlm.lm_head.weight,
            labels_L,
            num_global_tokens=num_global_tokens,
            chunk_size=self.loss_chunk_size,
            lm_head_bias_V=self.vlm.lm_head.bias,
            backend=self.loss_backend,
        )

    def _encode_media(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Vision tower on the row's images, then on its videos, always in this order and before the LLM.

        With `balance_vision`, a media type the row lacks runs on a dummy 1 x merge x merge grid instead, and
        its output joins the loss with weight 0: every rank then runs (vision, vision, LLM) in the same order.
        """
        model, zero = self.vlm.model, torch.zeros((), device=batch["input_ids"].device)
        media = {}
        for kind, pixels_key, grid_key, encode in (
            ("image", "pixel_values", "image_grid_thw", model.get_image_features),
            ("video", "pixel_values_videos", "video_grid_thw", model.get_video_features),
        ):
            if batch.get(pixels_key) is not None:
                media[kind] = encode(batch[pixels_key], batch[grid_key], return_dict=True)
            elif self.balance_vision:
                dummy = encode(*self._dummy_media(zero.device), return_dict=True)
                zero = zero + 0.0 * sum(t.float().sum() for t in tensors_of(dummy))
        return media, zero

    def _dummy_media(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        vc = self.vlm.config.vision_config
        merge = int(vc.spatial_merge_size)
        dim = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        pixels = torch.zeros(merge * merge, dim, device=device, dtype=self.vlm.model.visual.dtype)
        return pixels, torch.tensor([[1, merge, merge]], device=device)


def num_supervised(batch: dict) -> int:
    """Supervised tokens of a row after the in-sample shift (each sample's last label has nothing to predict)."""
    return int((shift_labels(batch["labels"], batch["cu_seqlens"]) != -100).sum())


def tensors_of(value) -> list[torch.Tensor]:
    """Every tensor inside a (nested) model output."""
    if torch.is_tensor(value):
        return [value]
    if hasattr(value, "values"):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []
