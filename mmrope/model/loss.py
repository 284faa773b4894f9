"""Token cross-entropy of the LM head without materialising full-vocabulary logits.

At 32K-token packed rows most positions are prompt or vision placeholders that need no logits, and the few
that do would still cost ``N * V * 4`` bytes in float32 (32768 * 151936 * 4 B ~ 19.9 GB). So
:func:`linear_cross_entropy` selects the supervised positions first and then walks them in chunks of
``chunk_size`` rows: each chunk's logits exist only inside one loop iteration, in forward and again
(recomputed) in backward. Peak extra memory is ``O(chunk_size * V)`` on top of the inputs and their gradients.

``backend="liger"`` hands the same selected rows to Liger-Kernel's fused linear cross-entropy instead (Triton,
CUDA only, an optional dependency: ``pip install liger-kernel``). It computes the gradients inside the forward
and keeps them until backward (``n * D + V * D`` elements in the weight's dtype) and picks its own chunking;
only its loss function is used: never one of its ``apply_liger_kernel_to_*`` patches, which would replace
transformers' rotary code under the encoding installed at mmrope's seam.

Conventions:
- The causal shift is the caller's job: ``labels_N[i]`` is the token that position ``i`` must predict. Use
  :func:`shift_labels` to build them from unshifted labels; it shifts within each packed sample so that no
  sample predicts the first token of the next one.
- The loss is ``sum of token losses / num_global_tokens``, where ``num_global_tokens`` counts supervised
  tokens over ALL gradient-accumulation micro-steps and ALL data-parallel ranks of one optimizer step. Then
  summing the gradients of the micro-steps gives exactly the gradient of one big batch. Two traps for the
  caller: DeepSpeed's ``engine.backward`` divides by ``gradient_accumulation_steps`` by default, and
  data-parallel gradient *averaging* divides by the world size; both must be undone (e.g. multiply the loss
  by ``gas * world_size``) for the global-token normalisation to hold.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
LOSS_BACKENDS = ("chunked", "liger")  # configs: loss.backend
LIGER_MODULE = "liger_kernel.transformers.functional"


def liger_unavailable_reason() -> str | None:
    """Why ``backend="liger"`` cannot run in this process (no CUDA, or Liger not importable); None if it can.

    Imports Liger (and Triton) only when CUDA is there: this is what config validation calls for
    ``loss.backend=liger``, so a machine without either learns it before anything heavy starts.
    """
    if not torch.cuda.is_available():
        return (
            "Liger's fused linear cross-entropy is a Triton kernel: it needs CUDA, and this machine has none"
        )
    try:
        importlib.import_module(LIGER_MODULE)
    except Exception as e:  # ImportError, or Triton failing to initialise
        return f"liger_kernel is not importable ({type(e).__name__}: {e})"
    return None


def shift_labels(
    labels_BL: Tensor, cu_seqlens: Tensor | None = None, *, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Shift labels left by one inside each packed sample, so that ``out[b, i]`` is the target of position i.

    The last token of every sample (and of every row) gets ``ignore_index``: it has no next token inside its
    own sample, and the next token in the row belongs to another sample.

    Args:
        labels_BL: ``[B, L]`` integer labels aligned with ``input_ids`` (``ignore_index`` where unsupervised).
        cu_seqlens: optional 1-D cumulative sample boundaries over the *flattened* ``B * L`` tokens
            (flash-attn varlen convention): starts at 0, ends at ``B * L``, non-decreasing, and every row end
            ``k * L`` is a boundary (a sample never spans two rows). ``None`` means one sample per row.

    Example (one packed row with samples of length 3 and 2)::

        labels_BL  = [[10, 11, 12, 20, 21]]
        cu_seqlens = [0, 3, 5]
        shift_labels(labels_BL, cu_seqlens) == [[11, 12, -100, 21, -100]]
        shift_labels(labels_BL)             == [[11, 12, 20, 21, -100]]   # wrong for packed rows: 12 -> 20

    Returns:
        ``[B, L]`` tensor, same dtype and device as ``labels_BL``.
    """
    if labels_BL.dim() != 2:
        raise ValueError(f"labels_BL must be [B, L], got shape {tuple(labels_BL.shape)}")
    num_rows, row_len = labels_BL.shape
    shifted_BL = torch.full_like(labels_BL, ignore_index)
    shifted_BL[:, :-1] = labels_BL[:, 1:]
    if cu_seqlens is None:
        return shifted_BL

    _check_cu_seqlens(cu_seqlens, num_rows, row_len)
    cu_seqlens = cu_seqlens.to(device=labels_BL.device, dtype=torch.long)
    seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
    # Last token of every non-empty sample, as an index into the flattened row-major B*L tokens.
    last_token_idx = cu_seqlens[1:][seqlens > 0] - 1
    shifted_BL.view(-1)[last_token_idx] = ignore_index
    return shifted_BL


def _check_cu_seqlens(cu_seqlens: Tensor, num_rows: int, row_len: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of length >= 2, got {cu_seqlens!r}")
    cu = cu_seqlens.detach().to("cpu", torch.long)
    num_tokens = num_rows * row_len
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at B*L={num_tokens}, got {cu[0]}..{cu[-1]}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    row_ends = torch.arange(row_len, num_tokens + 1, row_len)
    if not bool(torch.isin(row_ends, cu).all()):
        raise ValueError(
            f"cu_seqlens: a sample spans two rows (every row end k*L, L={row_len}, must be a boundary)"
        )


def linear_cross_entropy(
    hidden_ND: Tensor,
    lm_head_weight_VD: Tensor,
    labels_N: Tensor,
    *,
    num_global_tokens: int | Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    lm_head_bias_V: Tensor | None = None,
    backend: str = "chunked",
) -> Tensor:
    """Cross-entropy of ``hidden @ W.T (+ b)`` against ``labels``, never holding ``[N, V]`` logits.

    Equal to ``F.cross_entropy(F.linear(hidden, W, b).float(), labels, ignore_index=ignore_index,
    reduction="sum") / num_global_tokens`` (the usual HF path: logits in the weight's dtype, softmax in fp32).

    Args:
        hidden_ND: final hidden states ``[N, D]`` (or ``[..., D]``, leading dims flattened), bf16 or fp32.
        lm_head_weight_VD: LM head (or tied embedding) weight ``[V, D]``. Matmuls run in its dtype; a hidden
            of another dtype is cast (only the selected rows) and its gradient is returned in its own dtype.
        labels_N: ``[N]`` (or the same leading dims as hidden) target ids ALREADY aligned with ``hidden_ND``
            (shifted left by one, see :func:`shift_labels`); ``ignore_index`` marks unsupervised positions.
        num_global_tokens: supervised tokens summed over all micro-steps and data-parallel ranks of the
            optimizer step; ``None`` uses the local count. A count of 0 gives a loss of 0 (not NaN).
        chunk_size: rows of logits materialised at once; peak extra memory ~ ``6 * chunk_size * V`` bytes
            for bf16 weights (``4 * chunk_size * V`` for fp32).
        ignore_index: label value of positions without loss.
        lm_head_bias_V: optional bias ``[V]``.
        backend: ``"chunked"`` (the loop below) or ``"liger"`` (Liger-Kernel's fused kernel on the same selected
            rows; CUDA only, ``chunk_size`` does not apply). A row set with no supervised token takes the
            chunked path on either backend (no work, exact zeros).

    Returns:
        0-dim float32 loss (float64 for float64 weights).

    Notes:
        - Finding the supervised rows costs one host sync (their number decides the work), plus one for the
          label range check.
        - The weight gradient is accumulated chunk by chunk in the weight's dtype (each chunk's matmul
          accumulates in fp32 internally); an fp32 accumulator would cost another ``V * D * 4`` bytes.
        - Under ZeRO-3 the caller must gather ``lm_head_weight_VD`` (it is used outside the module's forward).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    if lm_head_weight_VD.dim() != 2:
        raise ValueError(f"lm_head_weight_VD must be [V, D], got shape {tuple(lm_head_weight_VD.shape)}")
    vocab_size, dim = lm_head_weight_VD.shape
    if hidden_ND.shape[-1] != dim or hidden_ND.shape[:-1] != labels_N.shape:
        raise ValueError(
            f"hidden_ND {tuple(hidden_ND.shape)} must be labels_N {tuple(labels_N.shape)} + [D={dim}]"
        )
    if labels_N.is_floating_point():
        raise ValueError(f"labels_N must be an integer tensor, got {labels_N.dtype}")
    if lm_head_bias_V is not None and lm_head_bias_V.shape != (vocab_size,):
        raise ValueError(f"lm_head_bias_V must be [V={vocab_size}], got {tuple(lm_head_bias_V.shape)}")

    hidden_ND = hidden_ND.reshape(-1, dim)
    labels_N = labels_N.reshape(-1)
    # Select the supervised rows FIRST: the LM head then runs only on them.
    positions_n = (labels_N != ignore_index).nonzero().squeeze(1)
    targets_n = labels_N[positions_n]
    num_local_tokens = positions_n.numel()
    if num_local_tokens > 0 and bool(((targets_n < 0) | (targets_n >= vocab_size)).any()):
        raise ValueError(
            f"labels_N holds ids outside [0, V={vocab_size}) other than ignore_index={ignore_index}"
        )

    if num_local_tokens == hidden_ND.shape[0]:
        hidden_nD = hidden_ND  # everything supervised: no gather copy
    else:
        hidden_nD = hidden_ND.index_select(0, positions_n.to(hidden_ND.device))
    # Casts are autograd ops, so gradients come back in the caller's dtypes.
    hidden_nD = hidden_nD.to(lm_head_weight_VD.dtype)
    bias_V = None if lm_head_bias_V is None else lm_head_bias_V.to(lm_head_weight_VD.dtype)
    targets_n = targets_n.to(device=hidden_ND.device, dtype=torch.long)

    if backend == "liger" and num_local_tokens > 0:
        loss_sum = _liger_loss_sum(hidden_nD, lm_head_weight_VD, bias_V, targets_n)
    else:
        loss_sum = _ChunkedLinearCrossEntropy.apply(
            hidden_nD, lm_head_weight_VD, bias_V, targets_n, chunk_size
        )

    if num_global_tokens is None:
        num_global_tokens = num_local_tokens
    if isinstance(num_global_tokens, Tensor):
        return loss_sum / num_global_tokens.clamp_min(1).to(loss_sum.dtype)
    if num_global_tokens < 0:
        raise ValueError(f"num_global_tokens must be >= 0, got {num_global_tokens}")
    return loss_sum / max(num_global_tokens, 1)


def _liger_loss_sum(hidden_nD: Tensor, weight_VD: Tensor, bias_V: Tensor | None, targets_n: Tensor) -> Tensor:
    """Summed token loss of the selected rows by Liger's fused linear cross-entropy (0-dim, float32).

    ``reduction="sum"``: the caller divides by the global token count, as for the chunked loss (Liger's "mean"
    would divide by this call's own count). Liger fills the weight gradient only while computing the hidden
    one, so a hidden that needs no gradient (frozen LLM, trained head) is made to need one, then dropped.
    """
    if hidden_nD.device.type != "cuda":
        raise ValueError(f"backend='liger' needs CUDA tensors, got hidden on {hidden_nD.device}")
    fused_linear_cross_entropy = importlib.import_module(LIGER_MODULE).liger_fused_linear_cross_entropy
    if torch.is_grad_enabled() and weight_VD.requires_grad and not hidden_nD.requires_grad:
        hidden_nD = hidden_nD.detach().requires_grad_()
    with _autocast_off(hidden_nD.device):  # matmuls in the weight's dtype, as in the chunked path
        return fused_linear_cross_entropy(
            hidden_nD, weight_VD, targets_n, bias=bias_V, ignore_index=IGNORE_INDEX, reduction="sum"
        )


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # The chunks choose their own precision; autocast would re-cast the [V, D] weight on every call.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _chunk_logits(hidden_cD: Tensor, weight_VD: Tensor, bias_V: Tensor | None) -> Tensor:
    """Logits of one chunk: matmul in the weight's dtype, returned as a fresh ``[c, V]`` tensor, >= fp32."""
    logits_cV = F.linear(hidden_cD, weight_VD, bias_V)
    # The cast aliases when the dtype already fits; fine, the matmul output is ours to overwrite.
    return logits_cV.to(_softmax_dtype(weight_VD))


def _softmax_dtype(weight_VD: Tensor) -> torch.dtype:
    return torch.promote_types(weight_VD.dtype, torch.float32)  # bf16/fp16/fp32 -> fp32, fp64 stays fp64


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i [logsumexp(z_i) - z_i[t_i]]`` with ``z = hidden @ W.T + b``, computed chunk by chunk.

    Saves only the inputs, the targets and the per-row logsumexp ``[n]``; backward recomputes each chunk's
    logits to form ``softmax(z) - onehot(t)``.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_nD: Tensor,
        weight_VD: Tensor,
        bias_V: Tensor | None,
        targets_n: Tensor,
        chunk_size: int,
    ) -> Tensor:
        num_tokens = hidden_nD.shape[0]
        lse_n = torch.empty(num_tokens, dtype=_softmax_dtype(weight_VD), device=hidden_nD.device)
        loss_sum = torch.zeros((), dtype=_softmax_dtype(weight_VD), device=hidden_nD.device)
        with _autocast_off(hidden_nD.device):
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                logits_cV = _chunk_logits(hidden_nD[start:end], weight_VD, bias_V)
                target_logit_c = logits_cV.gather(1, targets_n[start:end, None]).squeeze(1)
                # In-place logsumexp (torch.logsumexp would allocate two more [c, V] fp32 temporaries).
                # Rows of a matmul are finite, so the max is finite and never gives inf - inf.
                max_c1 = logits_cV.amax(dim=1, keepdim=True)
                sumexp_c = logits_cV.sub_(max_c1).exp_().sum(dim=1)
                lse_c = sumexp_c.log_().add_(max_c1.squeeze(1))
                del logits_cV
                lse_n[start:end] = lse_c
                loss_sum += (lse_c - target_logit_c).sum()
        ctx.save_for_backward(hidden_nD, weight_VD, bias_V, targets_n, lse_n)
        ctx.chunk_size = chunk_size
        return loss_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        hidden_nD, weight_VD, bias_V, targets_n, lse_n = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        num_tokens = hidden_nD.shape[0]
        grad_hidden_nD = torch.empty_like(hidden_nD) if needs_hidden else None
        # zeros, not empty: with no supervised token the loop never runs and the gradient is exactly 0.
        grad_weight_VD = torch.zeros_like(weight_VD) if needs_weight else None
        grad_bias_V = (
            torch.zeros(weight_VD.shape[0], dtype=lse_n.dtype, device=weight_VD.device)
            if needs_bias
            else None
        )
        with _autocast_off(hidden_nD.device):
            for start in range(0, num_tokens, ctx.chunk_size):
                end = min(start + ctx.chunk_size, num_tokens)
                hidden_cD = hidden_nD[start:end]
                # d loss / d z = softmax(z) - onehot(t), from the saved logsumexp: exp(z - lse).
                grad_logits_cV = _chunk_logits(hidden_cD, weight_VD, bias_V)
                grad_logits_cV.sub_(lse_n[start:end, None]).exp_()
                minus_one_c1 = grad_logits_cV.new_full((end - start, 1), -1.0)
                grad_logits_cV.scatter_add_(1, targets_n[start:end, None], minus_one_c1)
                grad_logits_cV.mul_(grad_loss)
                if needs_bias:
                    grad_bias_V += grad_logits_cV.sum(dim=0)
                # Same cast as autograd through `.float()` would do in the full-logits path.
                grad_logits_cV = grad_logits_cV.to(weight_VD.dtype)
                if needs_hidden:
                    torch.mm(grad_logits_cV, weight_VD, out=grad_hidden_nD[start:end])
                if needs_weight:
                    grad_weight_VD.addmm_(grad_logits_cV.T, hidden_cD)
                del grad_logits_cV
        grad_bias_V = grad_bias_V.to(bias_V.dtype) if needs_bias else None
        return grad_hidden_nD, grad_weight_VD, grad_bias_V, None, None
