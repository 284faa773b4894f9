"""The SFT objective under Ulysses sequence parallelism: `SequenceParallelObjective`.

The single-device `SFTObjective` (`mmrope.model.objective`) with two steps changed, the loss itself shared:
- the vision tower: each rank of the group encodes a patch-balanced share of the row's images and videos and one
  all-gather gives every rank the whole row's features (`mmrope.distributed.vision_split`; `split_vision=False`
  runs the whole row's media on every rank instead);
- the decoder: the merged embeddings, labels and positions are split along the sequence and the decoder runs on
  this rank's slice, its attention exchanging q/k/v with the SP group (`UlyssesAttention`, installed on the
  layers by `mmrope.distributed.sequence_parallel.apply_sequence_parallel`).
"""

from __future__ import annotations

import torch
from torch import nn

from mmrope.distributed.sequence_parallel import SequenceParallel, pad_and_slice, pad_cu_seqlens
from mmrope.distributed.vision_split import encode_split
from mmrope.model.install import seam_kwargs
from mmrope.model.loss import IGNORE_INDEX, shift_labels
from mmrope.model.objective import SFTObjective, num_supervised


class SequenceParallelObjective(SFTObjective):
    def __init__(
        self,
        vlm: nn.Module,
        sp: SequenceParallel,
        *,
        loss_backend: str = "chunked",
        loss_chunk_size: int = 4096,
        balance_vision: bool = False,
        split_vision: bool = True,
    ):
        super().__init__(
            vlm, loss_backend=loss_backend, loss_chunk_size=loss_chunk_size, balance_vision=balance_vision
        )
        self.sp = sp
        self.split_vision = split_vision  # each rank encodes a share of the row's media

    def forward(self, batch: dict, num_global_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """This rank's slice of the row through the decoder; its share of the row's loss (divided by
        `num_global_tokens`, None = the whole row's supervised tokens: every rank of the group holds the row).

        The merge (vision features into the placeholder embeddings) is transformers' own (`get_placeholder_mask`
        + `masked_scatter`, as the stock forward does), on the whole row; the split comes after it. Sample
        boundaries and DIPE's modality mask stay whole: attention sees the whole row after the all-to-all.
        """
        media, media_zero = self._encode_media(batch)
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
        return self.loss(out.last_hidden_state[0], labels_L, num_global_tokens) + media_zero

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
        """Each rank encodes its share of the row's media and the features are all-gathered
        (`mmrope.distributed.vision_split.encode_split`: same order, same dummies as the single-device path)."""
        if not self.split_vision:
            return super()._encode_media(batch)
        return encode_split(
            {"image": self.vlm.model.get_image_features, "video": self.vlm.model.get_video_features},
            batch,
            self.sp,
            merge_size=int(self.vlm.config.vision_config.spatial_merge_size),
            dummy=self._dummy_media(batch["input_ids"].device),
            encode_absent=self.balance_vision,
        )


def pad_mask(mask_BL: torch.Tensor, padded_len: int) -> torch.Tensor:
    """A `[B, L]` bool mask padded with False to `padded_len` (kept whole: every rank needs the whole row's)."""
    return torch.cat([mask_BL, mask_BL.new_zeros(mask_BL.shape[0], padded_len - mask_BL.shape[1])], dim=1)
