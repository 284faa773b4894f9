"""The SFT objective as a module: packed row in, summed token loss out.

Wrapping the VLM in one `nn.Module` keeps the whole step inside a single forward, which is what DeepSpeed
ZeRO-3 needs to gather partitioned parameters: the LM head weight is used by the loss directly (no
full-vocabulary logits; `loss_backend` chunked or liger, both in `mmrope.model.loss`), so it is registered as an
external parameter of this module.

Data parallelism with rows of different media: ZeRO-3 gathers a module's partitioned parameters with collectives
each time it runs, so every rank must run the vision tower the same number of times per micro step. A rank whose
row has no image (or no video) runs the tower once on a minimal dummy grid for that media type and adds the
result to the loss with weight 0, which also gives the trainable connector a (zero) gradient on every rank.

Sequence parallelism (`sequence_parallel`, see `mmrope.model.sequence_parallel`): each rank of the group encodes
a patch-balanced share of the row's images and videos and one all-gather gives every rank the whole row's
features (`mmrope.model.vision_split`; `split_vision=False` runs the whole row's media on every rank instead);
the merged embeddings, labels and positions are then split along the sequence and the decoder runs on this
rank's slice, its attention exchanging q/k/v with the SP group.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrope.model.install import is_installed, seam_kwargs
from mmrope.model.loss import IGNORE_INDEX, LOSS_BACKENDS, linear_cross_entropy, shift_labels
from mmrope.model.sequence_parallel import SequenceParallel, pad_and_slice, pad_cu_seqlens
from mmrope.model.vision_split import encode_split, tensors_of


class SFTObjective(nn.Module):
    def __init__(
        self,
        vlm: nn.Module,
        *,
        loss_backend: str = "chunked",
        loss_chunk_size: int = 4096,
        zero_stage: int = 0,
        balance_vision: bool = False,
        sequence_parallel: SequenceParallel | None = None,
        split_vision: bool = True,
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
        self.sp = sequence_parallel
        self.split_vision = split_vision  # under SP: each rank encodes a share of the row's media
        if zero_stage == 3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self.vlm.lm_head.weight)
            # Qwen3.5's delta-net reads its causal conv's weight without calling the conv module: gather it
            # with the layer that uses it.
            for module in self.vlm.modules():
                for param in getattr(module, "external_parameters", lambda: [])():
                    deepspeed.zero.register_external_parameter(module, param)

    def forward(self, batch: dict, num_global_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """Return the token cross-entropy summed over this row, divided by `num_global_tokens` (the supervised
        tokens of the whole optimizer step, all ranks and micro-steps). None = this row's own count."""
        media, media_zero = self._encode_media(batch)
        if self.sp is not None:
            return self._forward_sequence_parallel(batch, media, num_global_tokens) + media_zero
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
        hidden_LD = out.last_hidden_state[0]
        labels_L = shift_labels(batch["labels"], cu_seqlens)[0]
        loss = linear_cross_entropy(
            hidden_LD,
            self.vlm.lm_head.weight,
            labels_L,
            num_global_tokens=num_global_tokens,
            chunk_size=self.loss_chunk_size,
            lm_head_bias_V=self.vlm.lm_head.bias,
            backend=self.loss_backend,
        )
        return loss + media_zero

    def _forward_sequence_parallel(
        self, batch: dict, media: dict, num_global_tokens: int | torch.Tensor | None
    ) -> torch.Tensor:
        """This rank's slice of the row through the decoder; its share of the row's loss.

        The merge (vision features into the placeholder embeddings) is transformers' own (`get_placeholder_mask`
        + `masked_scatter`, as the stock forward does), on the whole row; the split comes after it. Sample
        boundaries and DIPE's modality mask stay whole: attention sees the whole row after the all-to-all.
        """
        sp, model = self.sp, self.vlm.model
        ids_BL, cu_seqlens = batch["input_ids"], batch["cu_seqlens"]
        if ids_BL.shape[0] != 1:
            raise ValueError("sequence parallelism takes one packed row per micro batch")
        embeds_BLD = model.get_input_embeddings()(ids_BL)
        masks_BL = {}
        for kind, mask_index in (("image", 0), ("video", 1)):
            if kind in media:
                feats_ND = torch.cat(media[kind].pooler_output, dim=0).to(embeds_BLD.device, embeds_BLD.dtype)
                mask_BLD = model.get_placeholder_mask(
                    ids_BL, inputs_embeds=embeds_BLD, **{f"{kind}_features": feats_ND}
                )[mask_index]
                embeds_BLD = embeds_BLD.masked_scatter(mask_BLD, feats_ND)
                masks_BL[kind] = mask_BLD[..., 0]
        padded_len = sp.padded_length(ids_BL.shape[1])
        cu_seqlens = pad_cu_seqlens(cu_seqlens, padded_len)  # the pad is a sample of its own
        static_3BL = batch.get("static_position_ids")
        visual_BL = None
        if static_3BL is not None:  # DIPE: static positions go with the slice, the modality mask stays whole
            static_3BL = pad_and_slice(sp, static_3BL, 2, 0)
            visual_BL = pad_mask(batch["visual_mask"], padded_len)
        kw = seam_kwargs(
            cu_seqlens=cu_seqlens,
            max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            static_position_ids=static_3BL,
            visual_mask_BL=visual_BL,
        )
        out = model.language_model(
            input_ids=None,
            inputs_embeds=pad_and_slice(sp, embeds_BLD, 1, 0.0),
            position_ids=pad_and_slice(sp, batch["position_ids"], 2, 0),
            use_cache=False,
            **self._deepstack_slice(media, masks_BL, padded_len),
            **kw,
        )
        # Labels are shifted on the whole row (a slice's last token predicts the next slice's first one).
        labels_L = pad_and_slice(sp, shift_labels(batch["labels"], batch["cu_seqlens"]), 1, IGNORE_INDEX)[0]
        if num_global_tokens is None:  # the whole row's count (every rank of the group holds the whole row)
            num_global_tokens = num_supervised(batch)
        return linear_cross_entropy(
            out.last_hidden_state[0],
            self.vlm.lm_head.weight,
            labels_L,
            num_global_tokens=num_global_tokens,
            chunk_size=self.loss_chunk_size,
            lm_head_bias_V=self.vlm.lm_head.bias,
            backend=self.loss_backend,
        )

    def _deepstack_slice(self, media: dict, masks_BL: dict, padded_len: int) -> dict:
        """Qwen3-VL's deepstack: the vision features some early decoder layers add at the visual positions, for
        this rank's slice (`visual_pos_masks` of the slice and the rows of the features that fall in it).

        The joint image + video features in row order are built as the stock forward builds them; the slice's
        visual tokens are a contiguous run of them (those before the slice start are skipped).
        """
        feats = {
            k: media[k].deepstack_features for k in masks_BL if getattr(media[k], "deepstack_features", None)
        }
        if not feats:
            return {}
        visual_BL = torch.zeros_like(next(iter(masks_BL.values())))
        for mask_BL in masks_BL.values():
            visual_BL = visual_BL | mask_BL
        num_visual = int(visual_BL.sum())
        layers = []
        for per_kind in zip(*feats.values()):  # per deepstack layer: each kind's per-image feature chunks
            joint_VD = None
            for kind, chunks in zip(feats, per_kind):
                kind_VD = torch.cat(chunks, dim=0)
                joint_VD = kind_VD.new_zeros(num_visual, kind_VD.shape[-1]) if joint_VD is None else joint_VD
                joint_VD = joint_VD.index_put((masks_BL[kind][visual_BL],), kind_VD)
            layers.append(joint_VD)
        visual_BL = pad_mask(visual_BL, padded_len)
        local = self.sp.local_slice(padded_len)
        first = int(visual_BL[:, : local.start].sum())
        local_BL = visual_BL[:, local]
        count = int(local_BL.sum())
        return {
            "visual_pos_masks": local_BL,
            "deepstack_visual_embeds": [joint_VD[first : first + count] for joint_VD in layers],
        }

    def _encode_media(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Vision tower on the row's images, then on its videos, always in this order and before the LLM.

        With `balance_vision`, a media type the row lacks runs on a dummy 1 x merge x merge grid instead, and
        its output joins the loss with weight 0: every rank then runs (vision, vision, LLM) in the same order.
        Under sequence parallelism (`split_vision`) each rank encodes its share of the row's media and the
        features are all-gathered (`mmrope.model.vision_split.encode_split`, same order, same dummies).
        """
        model, zero = self.vlm.model, torch.zeros((), device=batch["input_ids"].device)
        if self.sp is not None and self.split_vision:
            return encode_split(
                {"image": model.get_image_features, "video": model.get_video_features},
                batch,
                self.sp,
                merge_size=int(self.vlm.config.vision_config.spatial_merge_size),
                dummy=self._dummy_media(zero.device),
                encode_absent=self.balance_vision,
            )
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


def pad_mask(mask_BL: torch.Tensor, padded_len: int) -> torch.Tensor:
    """A `[B, L]` bool mask padded with False to `padded_len` (kept whole: every rank needs the whole row's)."""
    return torch.cat([mask_BL, mask_BL.new_zeros(mask_BL.shape[0], padded_len - mask_BL.shape[1])], dim=1)


def num_supervised(batch: dict) -> int:
    """Supervised tokens of a row after the in-sample shift (each sample's last label has nothing to predict)."""
    return int((shift_labels(batch["labels"], batch["cu_seqlens"]) != -100).sum())
