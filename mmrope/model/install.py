"""The ONE seam between mmrope and transformers: `install(model, encoding)`.

    model = build_model(cfg.model, ...)
    install(model, build_encoding("mrope_i"), attn_backend="auto", dipe=False)
    out = model.model(input_ids=ids_BL, position_ids=pos_3BL, **seam_kwargs(cu_seqlens=cu_seqlens))

Families (`mmrope.model.families`): Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE. Installing a
family's own encoding (mrope / mrope_i with the checkpoint's sections) reproduces the stock logits.

Module composition, no monkey-patching of transformers functions:
- `language_model.rotary_emb` becomes `MMRopeRotaryEmbedding`, which holds the encoding's `Rotary` ONCE (GRAPE's
  learned planes live there) and turns the 3-row `position_ids` into `(cos, sin)` tables, or passes the positions
  through for GRAPE's learned modes (they rotate q/k directly, there is no table);
- every text decoder layer's `self_attn` becomes `MMRopeAttention`, which REUSES the original q/k/v/o projections
  (and Qwen3-VL's q_norm/k_norm) under the same attribute names, so `state_dict` keys stay stock. It rotates q/k
  itself (the first rotary_dim channels: Qwen3.5's partial rotary), applies Qwen3.5's sigmoid output gate, puts
  ROTATED keys in the KV cache and calls `mmrope.attention.packed_attention` / `dipe_attention`;
- every Qwen3.5 gated delta-net layer's `linear_attn` becomes `PackedLinearAttention`, which shares the stock
  layer's parameters and modules (same keys) and restarts its causal conv and recurrent state at every packed
  sample boundary (transformers' own boundary kwargs only work with optional CUDA kernels; see the class);
- the text config's `_attn_implementation` becomes "mmrope", registered in transformers' `AttentionInterface`.
  It is not a mask implementation, so `masking_utils` returns `None` instead of building O(L^2) masks; the
  registered function itself raises (being called means a layer was not installed).
- with `attn_backend="auto"` the vision tower's `_attn_implementation` becomes "mmrope_flash_vision", also an
  `AttentionInterface` entry: a name with "flash" in it is transformers' signal that the function takes packed
  segments, so the Qwen-VL vision attention hands it every window/image at once through `cu_seqlens` instead of
  looping one small SDPA call per window (thousands per layer: 38% of a 32K step at 7B scale on an H200). The
  function runs `mmrope.attention.segment_attention`: torch's varlen FlashAttention on CUDA in half precision,
  else the same per-segment SDPA calls as transformers' SDPA path.

Packing, padding and DIPE inputs travel as `**kwargs` of the model forward down to `self_attn` (transformers 5.x
forwards them); build them with `seam_kwargs`. Positions always arrive with the batch (3 rows): the model never
re-derives them from token ids.

Sequence parallelism (issue 15, `mmrope.model.sequence_parallel`): with `install(..., sequence_parallel=sp)` every
`MMRopeAttention` receives this rank's slice of the row, rotates its q/k there (all heads, the slice's positions)
and exchanges q/k/v and the output with the SP group through DeepSpeed's Ulysses all-to-all; attention itself runs
on the whole row for H/N heads, with the global sample boundaries.

Probing (issue 8, `mmrope.eval.probe`): an optional `mmrope_probe=<recorder>` kwarg makes every installed layer
hand its ROTATED queries/keys (DIPE: the dynamic and static queries and the modality routing) and its packing to
`recorder.record(...)` on full forwards, so statistics such as the attention share to visual tokens are computed
from exactly the tensors and masks the attention itself uses. The recorder is duck-typed (this module never
imports the eval package); see `mmrope.eval.probe.ProbeRecorder`.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from mmrope.attention import (
    PACKED_BACKENDS,
    dipe_attention,
    dipe_decode_attention,
    doc_ids_from_attention_mask,
    doc_ids_from_cu_seqlens,
    packed_attention,
    segment_attention,
)
from mmrope.encodings import Encoding
from mmrope.model.families import check_encoding, text_geometry
from mmrope.model.sequence_parallel import SequenceParallel, check_heads, expand_kv_heads

ATTN_IMPLEMENTATION = "mmrope"
ATTN_BACKENDS = PACKED_BACKENDS  # "auto" (the default) picks torch's varlen FlashAttention on CUDA
PROBE_KWARG = "mmrope_probe"  # optional forward kwarg: an object with `record(layer_idx, **tensors)`


def _not_installed(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        f"attention implementation {ATTN_IMPLEMENTATION!r} was called by {type(module).__name__}: this layer was "
        "not replaced by mmrope.model.install (only the text decoder's self_attn layers are)"
    )


AttentionInterface.register(ATTN_IMPLEMENTATION, _not_installed)

VISION_ATTN_IMPLEMENTATION = "mmrope_flash_vision"  # "flash" in the name: transformers passes cu_seqlens


def _vision_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Tensor | None = None,
    max_length_q: int | Tensor | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Vision-tower attention over packed windows/images: `[1, H, T, D]` in, `([1, T, H, D], None)` out."""
    if attention_mask is not None or cu_seq_lens_q is None or is_causal:
        raise RuntimeError(
            f"{VISION_ATTN_IMPLEMENTATION!r} serves vision towers that pass cu_seqlens (bidirectional, no mask); "
            f"{type(module).__name__} called it otherwise"
        )
    max_seqlen = int(max_length_q) if max_length_q is not None else None
    out_BLHD = segment_attention(
        query,
        key,
        value,
        cu_seqlens=cu_seq_lens_q,
        max_seqlen=max_seqlen,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        dropout_p=dropout,
    )
    return out_BLHD, None


AttentionInterface.register(VISION_ATTN_IMPLEMENTATION, _vision_attention)


def seam_kwargs(
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    attention_mask_BL: Tensor | None = None,
    static_position_ids: Tensor | None = None,
    visual_mask_BL: Tensor | None = None,
    key_valid_BK: Tensor | None = None,
    key_visual_BK: Tensor | None = None,
) -> dict[str, Tensor]:
    """The keyword arguments an installed model's forward reads (None entries are left out).

    Args:
        cu_seqlens: packed sample boundaries over the flattened `B * L` tokens (e.g. `[0, 3, 5, 9]`).
        max_seqlen: the longest sample of `cu_seqlens` (a host int), so varlen kernels need no device sync.
        attention_mask_BL: HF padding mask (1 = token, 0 = pad); each pad run becomes a sample of its own.
        static_position_ids: DIPE anchored positions `[3, B, L]` of the queries of this call.
        visual_mask_BL: DIPE, True at image/video placeholders among the queries of this call.
        key_valid_BK, key_visual_BK: decoding with a KV cache: which cached keys are real tokens (False = left
            padding) and which are visual, over all `K` keys in the cache after this call.
    """
    out: dict[str, Tensor] = {}
    if attention_mask_BL is not None:
        out["mmrope_doc_ids"] = doc_ids_from_attention_mask(attention_mask_BL)
        out["mmrope_token_mask"] = attention_mask_BL.bool()  # linear-attention layers zero the pads
    for key, value in (
        ("mmrope_cu_seqlens", cu_seqlens),
        ("mmrope_max_seqlen", max_seqlen),
        ("mmrope_static_position_ids", static_position_ids),
        ("mmrope_visual_mask", visual_mask_BL),
        ("mmrope_key_valid", key_valid_BK),
        ("mmrope_key_visual", key_visual_BK),
    ):
        if value is not None:
            out[key] = value
    return out


class MMRopeRotaryEmbedding(nn.Module):
    """Replaces the text model's `rotary_emb`: holds the encoding's Rotary once for all layers.

    `forward(x, position_ids_3BL)` returns the float32 `(cos, sin)` tables, or, for GRAPE's learned modes (no
    tables), the positions themselves; `MMRopeAttention` accepts both.
    """

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self.returns_positions = hasattr(rotary, "apply_qk")  # GRAPE learned planes rotate q/k directly

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        if position_ids.ndim != 3 or position_ids.shape[0] != 3:
            raise ValueError(
                f"position_ids must be [3, B, L] for an mmrope model, got {tuple(position_ids.shape)}"
            )
        if self.returns_positions:
            return position_ids
        return self.rotary(position_ids)

    def rotate(self, q_BHLD: Tensor, k_BHkvLD: Tensor, embedding: tuple[Tensor, Tensor] | Tensor):
        if self.returns_positions:
            return self.rotary.rotate(q_BHLD, k_BHkvLD, embedding)
        cos, sin = embedding
        return self.rotary.apply_tables(q_BHLD, k_BHkvLD, cos, sin)


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
        sequence_parallel: SequenceParallel | None = None,
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
        self._sp = sequence_parallel  # Ulysses: this layer sees L/N tokens and exchanges q/k/v over the group

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

        if self._sp is not None:  # Ulysses; q/k were rotated above from this rank's own positions, all heads
            if past_key_values is not None or kwargs.get(PROBE_KWARG) is not None:
                raise ValueError("sequence parallelism serves training forwards: no KV cache, no probe")
            out_BLHD = self._sequence_parallel(q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, v_BHkvLD, kwargs)
        else:
            out_BLHD = self._attend(q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, v_BHkvLD, past_key_values, kwargs)
        out_BLd = out_BLHD.reshape(num_rows, q_len, -1)
        if gate_BLd is not None:
            out_BLd = out_BLd * torch.sigmoid(gate_BLd)
        return self.o_proj(out_BLd), None

    def _attend(self, q_dyn_BHLD, q_sta_BHLD, k_rot_BHkvLD, v_BHkvLD, past_key_values, kwargs) -> Tensor:
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

    def _sequence_parallel(self, q_dyn, q_sta, k, v, kwargs: dict[str, Any]) -> Tensor:
        """Ulysses: `[B, H, L/N, D]` per rank -> all-to-all -> attention over the whole row with H/N heads (the
        global `cu_seqlens` and DIPE modality mask) -> all-to-all back: `[B, L/N, H, D]`."""
        sp = self._sp
        k, v = expand_kv_heads(k, sp.size), expand_kv_heads(v, sp.size)
        whole = [
            None if x is None else sp.heads_to_sequence(x.transpose(1, 2)).transpose(1, 2)
            for x in (q_dyn, q_sta, k, v)
        ]
        return sp.sequence_to_heads(self._full(*whole, kwargs))

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


class PackedLinearAttention(nn.Module):
    """A Qwen3.5 gated delta-net (linear-attention) layer that keeps packed samples apart.

    The causal conv window and the recurrent state of a delta-net run along the row, so on a packed row they would
    carry one sample into the next. transformers 5.23 has sanctioned kwargs for sample boundaries
    (`cu_seq_lens_q` -> `cu_seqlens` of the chunked delta rule, `seq_idx` of the causal conv), but only the optional
    CUDA kernels (flash-linear-attention, causal-conv1d) honour them: its torch path raises ValueError when given
    them (and the conv's torch path would silently ignore `cu_seq_lens_q`). So on a packed row this layer runs
    the stock projections, output norm and out_proj ONCE over the row, and the two sequence kernels that carry
    state, transformers' own `causal_conv1d_fn` and `chunk_gated_delta_rule` of the family's modeling module
    (which dispatch to those CUDA kernels when installed), once per sample from a zero state: each sample is
    computed exactly as alone. Every submodule runs once per forward, in the stock order, whatever the number of
    samples, which ZeRO-3's parameter gathering needs (ranks issue the same collectives).

    Rows without packing (one sample per row, padding, generation with the recurrent cache) run the stock forward
    itself. Padding (`seam_kwargs(attention_mask_BL=...)`) reaches it as the stock 2D mask, which zeroes pad
    tokens: a left-padded row then equals its unpadded self, as generation needs.

    Composition, not a copy: the layer shares the stock module's parameter, buffer and submodule containers
    (same names, same tensors: state_dict keys stay stock).
    """

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self._parameters = stock._parameters
        self._buffers = stock._buffers
        self._non_persistent_buffers_set = stock._non_persistent_buffers_set
        self._modules = stock._modules
        self.layer_idx = stock.layer_idx
        self._stock = (stock,)  # a plain reference: the stock forward, run on the shared parameters
        modeling = sys.modules[type(stock).__module__]
        kernels = [
            getattr(modeling, name, None) for name in ("causal_conv1d_fn", "torch_chunk_gated_delta_rule")
        ]
        if any(k is None for k in kernels):
            raise ValueError(
                f"model: {type(stock).__name__}'s module has no causal_conv1d_fn / torch_chunk_gated_delta_rule; "
                "this transformers version is not supported for packed linear attention"
            )
        self._conv_fn, self._delta_rule_fn = kernels

    def train(self, mode: bool = True) -> PackedLinearAttention:
        self._stock[0].training = mode
        return super().train(mode)

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters of submodules read without calling the submodule (the causal conv's weight): ZeRO-3 must
        gather them with this layer (`deepspeed.zero.register_external_parameter`)."""
        return [self.conv1d.weight] + ([self.conv1d.bias] if self.conv1d.bias is not None else [])

    def forward(
        self,
        hidden_states: Tensor,
        cache_params: Any = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if attention_mask is not None:
            raise RuntimeError(
                "an mmrope model got a prepared attention mask; padding/packing must come through seam_kwargs"
            )
        num_rows, seq_len, _ = hidden_states.shape
        cu_seqlens = kwargs.get("mmrope_cu_seqlens")
        if cu_seqlens is not None and cu_seqlens.numel() - 1 != num_rows:  # several samples per row
            # A packed row is never continued by decoding (its cache entries, keys and states alike, mean
            # nothing), so a cache that transformers created by default (use_cache=True) is left untouched here.
            bounds = [int(b) for b in cu_seqlens.tolist()]
            if bounds[0] != 0 or bounds[-1] != num_rows * seq_len or bounds != sorted(bounds):
                raise ValueError(f"mmrope_cu_seqlens must rise from 0 to {num_rows * seq_len}, got {bounds}")
            flat_1Nd = hidden_states.reshape(1, num_rows * seq_len, -1)
            return self._packed(flat_1Nd, bounds).view(num_rows, seq_len, -1)
        mask_BL = kwargs.get("mmrope_token_mask")
        if mask_BL is not None and (seq_len == 1 or bool(mask_BL.all())):
            mask_BL = None  # as transformers' create_recurrent_attention_mask: nothing to zero
        elif mask_BL is not None:
            mask_BL = mask_BL[:, -seq_len:]
        return self._stock[0](hidden_states, cache_params=cache_params, attention_mask=mask_BL)

    def _packed(self, x_1Nd: Tensor, bounds: list[int]) -> Tensor:
        """The stock forward (transformers 5.23 `Qwen3_5GatedDeltaNet.forward`, no cache, no mask), with the conv
        and the delta rule restarted at every sample boundary."""
        st = self._stock[0]
        num_tokens = x_1Nd.shape[1]
        segments = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        mixed_1CN = self.in_proj_qkv(x_1Nd).transpose(1, 2)
        z_1NHD = self.in_proj_z(x_1Nd).reshape(1, num_tokens, -1, st.head_v_dim)
        b_1NH = self.in_proj_b(x_1Nd)
        a_1NH = self.in_proj_a(x_1Nd)
        weight = self.conv1d.weight.squeeze(1)
        mixed_1CN = torch.cat(
            [
                self._conv_fn(mixed_1CN[:, :, s:e], weight, self.conv1d.bias, activation=st.activation)
                for s, e in segments
            ],
            dim=2,
        )
        query, key, value = torch.split(
            mixed_1CN.transpose(1, 2), [st.key_dim, st.key_dim, st.value_dim], dim=-1
        )
        query = query.reshape(1, num_tokens, -1, st.head_k_dim)
        key = key.reshape(1, num_tokens, -1, st.head_k_dim)
        value = value.reshape(1, num_tokens, -1, st.head_v_dim)
        beta = b_1NH.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a_1NH.float() + self.dt_bias)
        core_1NHD = torch.cat(
            [
                self._delta_rule_fn(
                    query[:, s:e],
                    key[:, s:e],
                    value[:, s:e],
                    g=g[:, s:e],
                    beta=beta[:, s:e],
                    initial_state=None,
                    output_final_state=False,
                    use_qk_l2norm_in_kernel=True,
                )[0]
                for s, e in segments
            ],
            dim=1,
        )
        core = self.norm(core_1NHD.reshape(-1, st.head_v_dim), z_1NHD.reshape(-1, st.head_v_dim))
        return self.out_proj(core.reshape(1, num_tokens, -1))


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a `*ForConditionalGeneration` / `*Model` VLM (has `layers` and `rotary_emb`)."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
        raise ValueError(
            f"model: {type(model).__name__} has no text model (model.language_model) to install into"
        )
    return lm


def is_installed(model: nn.Module) -> bool:
    return isinstance(text_model(model).rotary_emb, MMRopeRotaryEmbedding)


def _check_layers(lm: nn.Module) -> None:
    """Every decoder layer must be full causal attention (`self_attn`) or a gated delta-net (`linear_attn`)."""
    layer_types = list(getattr(lm.config, "layer_types", None) or [])
    if "sliding_attention" in layer_types:
        raise ValueError(
            "model: sliding-window attention layers (text_config.use_sliding_window / layer_types) are not "
            "supported by mmrope's packed attention; use a config without them (the released Qwen2-VL "
            "checkpoints have use_sliding_window=false)"
        )
    for i, layer in enumerate(lm.layers):
        if not (
            hasattr(layer, "self_attn")
            or type(getattr(layer, "linear_attn", None)).__name__.endswith("GatedDeltaNet")
        ):
            raise ValueError(
                f"model: text layer {i} ({type(layer).__name__}) has neither self_attn nor a gated delta-net "
                "linear_attn; mmrope cannot install into it"
            )


def install(
    model: nn.Module,
    encoding: Encoding,
    *,
    attn_backend: str = "auto",
    dipe: bool = False,
    sequence_parallel: SequenceParallel | None = None,
) -> nn.Module:
    """Install `encoding` (and DIPE if `dipe`) into a model of any family in `mmrope.model.families` (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) in place; returns the model.

    Attention layers become `MMRopeAttention` (Qwen3.5's output gate and partial rotary included); Qwen3.5's
    gated delta-net layers become `PackedLinearAttention` (packed samples start from a zero recurrent state).

    With `sequence_parallel` (`mmrope.model.sequence_parallel`), every attention layer sees this rank's slice of
    the row and exchanges q/k/v with the group (Ulysses); the heads must split over the group and every layer must
    be full attention.

    Raises ValueError naming the argument: unknown `attn_backend`, DIPE with a 1D encoding, an encoding whose
    geometry does not fit the model (`EncodingMisfit` naming the hyperparameter, e.g. mhrope's
    num_key_value_heads or chunked sections that do not cover the rotary pairs), sliding-window layers, or a
    model installed twice.
    """
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
    if dipe and encoding.is_1d:
        raise ValueError(f"dipe: DIPE needs a 3-axis encoding, got the 1D encoding {encoding.name!r}")
    lm = text_model(model)
    if isinstance(lm.rotary_emb, MMRopeRotaryEmbedding):
        raise ValueError("model: an mmrope encoding is already installed")
    _check_layers(lm)
    geometry = text_geometry(lm.config)
    check_encoding(encoding, geometry)
    if sequence_parallel is not None:
        check_heads(lm.config.num_attention_heads, geometry.num_key_value_heads, sequence_parallel.size)
        if any(not hasattr(layer, "self_attn") for layer in lm.layers):
            raise ValueError(
                "config key `trainer.sequence_parallel_size`: linear-attention (gated delta-net) layers carry "
                "state along the row and cannot be split over ranks; use sequence_parallel_size=1 for this model"
            )
    rotary = encoding.rotary(
        head_dim=geometry.head_dim,
        rope_theta=geometry.rope_theta,
        partial_rotary_factor=geometry.partial_rotary_factor,
        num_key_value_heads=geometry.num_key_value_heads,
    )
    # The encoding caches its Rotary; each model gets its own copy (GRAPE's planes are parameters).
    device = lm.embed_tokens.weight.device
    rotary_emb = MMRopeRotaryEmbedding(copy.deepcopy(rotary)).to(device)
    lm.rotary_emb = rotary_emb
    for layer in lm.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn = MMRopeAttention(
                layer.self_attn,
                rotary_emb,
                attn_backend=attn_backend,
                dipe=dipe,
                sequence_parallel=sequence_parallel,
            )
        else:  # checked above: a linear-attention (gated delta-net) layer
            layer.linear_attn = PackedLinearAttention(layer.linear_attn)
    lm.config._attn_implementation = ATTN_IMPLEMENTATION
    if hasattr(lm, "_attn_implementation"):
        lm._attn_implementation = ATTN_IMPLEMENTATION
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if attn_backend == "auto" and vision_config is not None:
        vision_config._attn_implementation = VISION_ATTN_IMPLEMENTATION
    return model
