"""`model.compile=true`: torch.compile the memory-bound parts of every LLM decoder layer, nothing else.

What is compiled: each decoder layer's two RMSNorms, the final norm, and the SiLU(gate) * up product of each dense
SwiGLU MLP. In eager mode an RMSNorm is ~6 kernels (upcast, square, mean, rsqrt, scale, downcast + weight) and SwiGLU
runs SiLU and the product as separate passes over `[L, intermediate]` tensors; at a 32K row each pass moves hundreds
of MB, in forward, recomputation and backward. Inductor fuses each into one or two kernels, and its partitioner
stores less for backward (it recomputes SiLU instead of saving it). Every matmul stays an eager cuBLAS call.

What is not: attention (mmrope's packed/varlen kernels and DIPE are already fused kernels, and their Python-side
packing logic would only break the graph), the rotary tables (exact positions are this project's contract: the
encodings run eagerly, bit for bit as specified), MoE blocks (data-dependent routing), the frozen ViT.

No compiled region contains a submodule call: DeepSpeed ZeRO-3 gathers parameters in module hooks, which must run
eagerly around compiled code, never be traced into it (that recompiles on every module). So a norm's `forward` is
compiled (its hooks stay outside, in the module call), and the MLP becomes `FusedSwiGLU`, which calls the stock
projections eagerly and compiles only the elementwise product; it holds them under the stock attribute names, so
`state_dict` keys stay stock. All layers share one compiled graph per dtype (one code object; parameters are graph
inputs), recompiled once with a dynamic row length when the second length arrives. Numerics: fp32 matches eager to
~1e-6; in bf16 the fused kernels skip some intermediate roundings of the eager path (a few bf16 ulps).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrope.model.install import text_model

__all__ = ["FusedSwiGLU", "compile_decoder", "compiled_modules"]

_COMPILED_FLAG = "_mmrope_compiled"
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def _is_rms_norm(module: nn.Module | None) -> bool:
    return module is not None and type(module).__name__.endswith("RMSNorm")


def _is_dense_swiglu(module: nn.Module | None) -> bool:
    """A dense SiLU gate/up/down MLP (the Qwen2/Qwen3/Qwen3.5 text MLP), not a mixture of experts."""
    return (
        module is not None
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
        and not hasattr(module, "experts")
    )


def _silu_mul_eager(gate_LI: Tensor, up_LI: Tensor) -> Tensor:
    return F.silu(gate_LI) * up_LI


@functools.cache
def _silu_mul() -> Callable[[Tensor, Tensor], Tensor]:
    """The compiled product, made on first use: `torch.compile` imports Inductor's compiler (~1 s), which a run
    without model.compile (every process that imports this module) should not pay."""
    return torch.compile(_silu_mul_eager)


class FusedSwiGLU(nn.Module):
    """A stock dense MLP, `down(silu(gate(x)) * up(x))`, with the elementwise product as one compiled kernel.

    Holds the stock projections (same modules, same parameter names); the matmuls run eagerly.
    """

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = stock.gate_proj, stock.up_proj, stock.down_proj

    def forward(self, x_BLd: Tensor) -> Tensor:
        return self.down_proj(_silu_mul()(self.gate_proj(x_BLd), self.up_proj(x_BLd)))


def compile_decoder(model: nn.Module) -> list[str]:
    """Compile the norms and dense MLPs of `model`'s text decoder in place; returns their qualified names.

    Call after `install` and activation checkpointing, before the DeepSpeed engine wraps the model. Idempotent.
    """
    lm = text_model(model)
    norms: list[tuple[str, nn.Module]] = []
    names: list[str] = []
    for i, layer in enumerate(lm.layers):
        norms += [
            (f"layers.{i}.{n}", getattr(layer, n))
            for n in _LAYER_NORMS
            if _is_rms_norm(getattr(layer, n, None))
        ]
        if isinstance(getattr(layer, "mlp", None), FusedSwiGLU):
            names.append(f"layers.{i}.mlp")
        elif _is_dense_swiglu(getattr(layer, "mlp", None)):
            layer.mlp = FusedSwiGLU(layer.mlp)
            names.append(f"layers.{i}.mlp")
    if _is_rms_norm(getattr(lm, "norm", None)):
        norms.append(("norm", lm.norm))
    for name, norm in norms:
        if not getattr(norm, _COMPILED_FLAG, False):
            # The class's function bound to this instance: one code object for all layers, so one compiled graph.
            norm.forward = torch.compile(type(norm).forward).__get__(norm)
            setattr(norm, _COMPILED_FLAG, True)
        names.append(name)
    return sorted(names, key=_layer_order)


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "layers" else (1 << 30, name)


def compiled_modules(model: nn.Module) -> list[str]:
    """Qualified names (under the text model) of the modules `compile_decoder` compiled."""
    lm = text_model(model)
    found = [
        n for n, m in lm.named_modules() if getattr(m, _COMPILED_FLAG, False) or isinstance(m, FusedSwiGLU)
    ]
    return sorted(found, key=_layer_order)
