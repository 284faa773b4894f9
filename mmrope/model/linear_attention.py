"""Qwen3.5's gated delta-net layer under mmrope: `PackedLinearAttention` keeps packed samples apart.

Every Qwen3.5 gated delta-net layer's `linear_attn` becomes `PackedLinearAttention` (`mmrope.model.install`),
which shares the stock layer's parameters and modules (same keys) and restarts its causal conv and recurrent
state at every packed sample boundary (see the class for why transformers' own boundary kwargs do not serve).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
