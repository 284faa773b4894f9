"""The text decoder's self-attention under mmrope: `MMRopeAttention` (training, prefill, decoding, probing).

Every text decoder layer's `self_attn` becomes `MMRopeAttention` (`mmrope.model.install.install`), which REUSES
the original q/k/v/o projections (and Qwen3-VL's q_norm/k_norm) under the same attribute names, so `state_dict`
keys stay stock. It rotates q/k itself (the first rotary_dim channels: Qwen3.5's partial rotary), applies
Qwen3.5's sigmoid output gate, puts ROTATED keys in the KV cache and calls `mmrope.attention.packed_attention` /
`dipe_attention`. It is single-device code: its attention function, `attend`, is the point where
`mmrope.distributed.parallelize` wraps it (Ulysses sequence parallelism).

Probing (issue 8, `mmrope.eval.probe`): an optional `mmrope_probe=<recorder>` kwarg makes every layer hand its
ROTATED queries/keys (DIPE: the dynamic and static queries and the modality routing) and its packing to
`recorder.record(...)` on full forwards, so statistics such as the attention share to visual tokens are computed
from exactly the tensors and masks the attention itself uses. The recorder is duck-typed (this module never
imports the eval package); see `mmrope.eval.probe.ProbeRecorder`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrope.attention import dipe_attention, dipe_decode_attention, doc_ids_from_cu_seqlens, packed_attention
from mmrope.model.rotary import MMRopeRotaryEmbedding

PROBE_KWARG = "mmrope_probe"  # optional forward kwarg: an object with `record(layer_idx, **tensors)`


class MMRopeAttention(nn.Module):
    """A text decoder self-attention with the mmrope encoding; reuses the stock layer's projections.

    Calls:
    - training / prefill (`q_len == k_len`): `packed_attention` (or `dipe_attention`) with sample ids from
      `mmrope_cu_seqlens` or `mmrope_doc_ids` (none = one sample per row);
    - decoding (`q_len < k_len`, keys from the cache): the last `q_len` queries against all cached keys, keys
      masked by `mmrope_key_valid`; DIPE via `dipe_decode_attention` with `mmrope_key_visual`.
    """

    def __init__(
        self,
        stock: nn.Module,
        rotary_emb: MMRopeRotaryEmbedding,
        *,
        attn_backend: str,
        dipe: bool,
    ) -> None:
        super().__init__()
        self.config = stock.config
        self.layer_idx = stock.layer_idx
        self.head_dim = stock.head_dim
        self.scaling = stock.scaling
        self.attention_dropout = stock.attention_dropout
        self.is_causal = True
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            stock.q_proj,
            stock.k_proj,
            stock.v_proj,
            stock.o_proj,
        )
        # Qwen3-VL normalises q/k per head before rotation; reuse the same modules (same state_dict keys).
        self.q_norm = getattr(stock, "q_norm", None)
        self.k_norm = getattr(stock, "k_norm", None)
        # Qwen3.5 gates the attention output: q_proj yields (query, gate) per head, out * sigmoid(gate) -> o_proj.
        num_heads = stock.config.num_attention_heads
        self.output_gate = stock.q_proj.out_features == 2 * num_heads * self.head_dim
        self.attn_backend = attn_backend
        self.dipe = dipe
        # A plain reference, not a submodule: the Rotary is registered once, on the text model.
        self._rotary_emb = (rotary_emb,)

    def _project(self, proj: nn.Module, norm: nn.Module | None, x_BLd: Tensor) -> Tensor:
        x_BLHD = proj(x_BLd).view(*x_BLd.shape[:-1], -1, self.head_dim)
        if norm is not None:
            x_BLHD = norm(x_BLHD)
        return x_BLHD.transpose(1, 2)

    def _query_and_gate(self, x_BLd: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.output_gate:
            return self._project(self.q_proj, self.q_norm, x_BLd), None
        q_BLHD, gate_BLHD = torch.chunk(
            self.q_proj(x_BLd).view(*x_BLd.shape[:-1], -1, 2 * self.head_dim), 2, -1
        )
        if self.q_norm is not None:
            q_BLHD = self.q_norm(q_BLHD)
        return q_BLHD.transpose(1, 2), gate_BLHD.reshape(*x_BLd.shape[:-1], -1)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        position_embeddings: tuple[Tensor, Tensor] | Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        if attention_mask is not None:
            raise RuntimeError(
                "an mmrope model got a prepared attention mask; padding/packing must come through seam_kwargs "
                "(the text config's _attn_implementation must stay 'mmrope')"
            )
        if position_embeddings is None:
            raise RuntimeError("MMRopeAttention needs position_embeddings from MMRopeRotaryEmbedding")
        rotary_emb = self._rotary_emb[0]
        num_rows, q_len, _ = hidden_states.shape
        q_BHLD, gate_BLd = self._query_and_gate(hidden_states)
        k_BHkvLD = self._project(self.k_proj, self.k_norm, hidden_states)
        v_BHkvLD = self._project(self.v_proj, None, hidden_states)

        q_dyn_BHLD, k_rot_BHkvLD = rotary_emb.rotate(q_BHLD, k_BHkvLD, position_embeddings)
        q_sta_BHLD = None
        if self.dipe:
            static_3BL = kwargs.get("mmrope_static_position_ids")
            visual_BL = kwargs.get("mmrope_visual_mask")
            if static_3BL is None or visual_BL is None:
                raise ValueError(
                    "DIPE is installed: the forward needs mmrope_static_position_ids and mmrope_visual_mask "
                    "(seam_kwargs(static_position_ids=..., visual_mask_BL=...))"
                )
            # q rotated with the static (anchored) positions, for inter-modal pairs; its k is not used
            q_sta_BHLD, _ = rotary_emb.rotate(q_BHLD, k_BHkvLD, rotary_emb(hidden_states, static_3BL))

        # The attention function over the rotated q/k/v: single-device here; `parallelize` may replace it on the
        # instance (Ulysses sequence parallelism, mmrope.distributed.sequence_parallel.UlyssesAttention).
        out_BLHD = self.attend(q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, v_BHkvLD, past_key_values, kwargs)
        out_BLd = out_BLHD.reshape(num_rows, q_len, -1)
        if gate_BLd is not None:
            out_BLd = out_BLd * torch.sigmoid(gate_BLd)
        return self.o_proj(out_BLd), None

    def attend(self, q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, v_BHkvLD, past_key_values, kwargs) -> Tensor:
        """Attention of this call's queries over the row (training, prefill) or over the KV cache (decoding)."""
        q_len = q_dyn_BHLD.shape[2]
        if past_key_values is not None:  # the cache holds keys rotated once with their dynamic positions
            k_rot_BHkvLD, v_BHkvLD = past_key_values.update(k_rot_BHkvLD, v_BHkvLD, self.layer_idx)

        probe = kwargs.get(PROBE_KWARG)
        if probe is not None:
            self._probe(probe, q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, q_len, kwargs)

        if k_rot_BHkvLD.shape[2] == q_len:
            return self._full(q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, v_BHkvLD, kwargs)
        return self._decode(q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, v_BHkvLD, kwargs)

    def _probe(self, probe: Any, q_dyn, q_sta, k, q_len: int, kwargs: dict[str, Any]) -> None:
        """Hand the rotated q/k and the masks of this call to `probe.record` (no effect on the output)."""
        if k.shape[2] != q_len:
            raise ValueError(
                f"{PROBE_KWARG}: probes run on full forwards only, not on KV-cache decoding steps"
            )
        doc_ids_BL = kwargs.get("mmrope_doc_ids")
        cu_seqlens = kwargs.get("mmrope_cu_seqlens")
        if doc_ids_BL is None and cu_seqlens is not None and cu_seqlens.numel() != q_dyn.shape[0] + 1:
            doc_ids_BL = doc_ids_from_cu_seqlens(cu_seqlens, q_len, num_rows=q_dyn.shape[0])
        with torch.no_grad():
            probe.record(
                self.layer_idx,
                q_dyn_BHLD=q_dyn.detach(),
                k_BHkvLD=k.detach(),
                scale=self.scaling,
                doc_ids_BL=doc_ids_BL,
                q_sta_BHLD=q_sta.detach() if q_sta is not None else None,
                route_visual_BL=kwargs.get("mmrope_visual_mask") if self.dipe else None,
            )

    def _full(self, q_dyn, q_sta, k, v, kwargs: dict[str, Any]) -> Tensor:
        doc_ids_BL = kwargs.get("mmrope_doc_ids")
        cu_seqlens = kwargs.get("mmrope_cu_seqlens")
        if doc_ids_BL is not None and cu_seqlens is not None:
            raise ValueError("pass either cu_seqlens (packed rows) or attention_mask_BL (padding), not both")
        if not self.dipe:
            return packed_attention(
                q_dyn,
                k,
                v,
                doc_ids_BL=doc_ids_BL,
                cu_seqlens=cu_seqlens,
                max_seqlen=kwargs.get("mmrope_max_seqlen") if cu_seqlens is not None else None,
                scale=self.scaling,
                backend=self.attn_backend,
                dropout_p=self.attention_dropout if self.training else 0.0,
            )
        return dipe_attention(
            q_dyn,
            q_sta,
            k,
            v,
            visual_BL=kwargs["mmrope_visual_mask"],
            doc_ids_BL=doc_ids_BL,
            cu_seqlens=cu_seqlens,
            max_seqlen=kwargs.get("mmrope_max_seqlen") if cu_seqlens is not None else None,
            scale=self.scaling,
            backend="eager" if self.attn_backend == "eager" else "routed",
            inner_backend=self.attn_backend,
        )

    def _decode(self, q_dyn, q_sta, k, v, kwargs: dict[str, Any]) -> Tensor:
        num_rows, num_keys = k.shape[0], k.shape[2]
        key_valid_BK = kwargs.get("mmrope_key_valid")
        if key_valid_BK is not None and tuple(key_valid_BK.shape) != (num_rows, num_keys):
            raise ValueError(
                f"mmrope_key_valid must be [B, K]={num_rows, num_keys}, got {tuple(key_valid_BK.shape)}"
            )
        if self.dipe:
            key_visual_BK = kwargs.get("mmrope_key_visual")
            if key_visual_BK is None:
                raise ValueError("DIPE decoding needs mmrope_key_visual (seam_kwargs(key_visual_BK=...))")
            return dipe_decode_attention(
                q_dyn,
                q_sta,
                k,
                v,
                key_visual_BK=key_visual_BK,
                key_valid_BK=key_valid_BK,
                query_visual_BQ=kwargs["mmrope_visual_mask"],
                scale=self.scaling,
            )
        # query t of the last Q sits at key index K - Q + t and sees keys j <= K - Q + t that are valid
        num_queries = q_dyn.shape[2]
        query_pos_Q = torch.arange(num_keys - num_queries, num_keys, device=q_dyn.device)
        allowed_BQK = (torch.arange(num_keys, device=q_dyn.device)[None, :] <= query_pos_Q[:, None])[None]
        if key_valid_BK is not None:
            allowed_BQK = allowed_BQK & key_valid_BK.to(device=q_dyn.device, dtype=torch.bool)[:, None, :]
        group = q_dyn.shape[1] // k.shape[1]
        out_BHQD = F.scaled_dot_product_attention(
            q_dyn,
            k.repeat_interleave(group, dim=1),
            v.repeat_interleave(group, dim=1),
            attn_mask=allowed_BQK[:, None],
            scale=self.scaling,
        )
        return out_BHQD.transpose(1, 2)
