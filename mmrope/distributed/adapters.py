"""LoRA / QLoRA adapters through PEFT: `adapter=lora|qlora` (configs/adapter/, schema `AdapterConfig`).

One entry point, `apply_adapter(model, cfg, seed=...)`, applied to the built model after `install` and the freeze
policy, before activation checkpointing, `model.compile` and the DeepSpeed engine (mmrope/train/run.py). It injects
PEFT's LoRA layers in place (`peft.inject_adapter_in_model`): the model keeps its class and every module path, an
adapted `q_proj` becomes a PEFT `lora.Linear` holding the stock layer as `q_proj.base_layer` and the adapter as
`q_proj.lora_A.default` / `q_proj.lora_B.default`. Everything that finds modules by path (the freeze groups, the
installed attention, activation checkpointing, compile, ZeRO-3's hooks) keeps working unchanged.

Targets are roles (`adapter.targets`), resolved per family by the `adapter_roles` hook of its row in
mmrope/model/families.py to the real module names (the fused ViT `qkv`, each family's ViT MLP, Qwen3.5's gated
delta-net projections). A role that matches no module is refused, naming `adapter.targets`.

Trainable after `apply_adapter`: the adapters; every parameter the freeze policy left trainable outside the adapted
modules; the encoding's own parameters (GRAPE's learned planes). Frozen: the base weights of adapted modules.

Export (mmrope/train/export.py) rebuilds the base model, wraps it with `peft.get_peft_model` (which injects into
the same module paths), loads the trained state and writes the merged model (`merge_and_unload`) or, with
`--adapter-only`, the PEFT adapter folder (`PeftModel.save_pretrained`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mmrope.model.config import AdapterConfig
from mmrope.model.families import family_of

ADAPTER_NAME = "default"  # PEFT's adapter name: parameter paths hold `.lora_A.default.`


def is_adapter_parameter(name: str) -> bool:
    """A LoRA/DoRA parameter PEFT injected (`...lora_A.default.weight`, `...lora_magnitude_vector.default...`)."""
    return ".lora_" in f".{name}"


@dataclass
class AdapterSummary:
    """What `apply_adapter` did: modules adapted per role, adapter and other trainable parameter counts."""

    modules_by_role: dict[str, list[str]]
    adapter_params: int
    other_trainable_params: int  # outside the adapters: unfrozen groups, GRAPE's planes
    frozen_params: int

    def lines(self, cfg: AdapterConfig) -> list[str]:
        scale = "alpha/sqrt(r)" if cfg.use_rslora else "alpha/r"
        head = (
            f"adapter: {cfg.name} r={cfg.rank} alpha={cfg.alpha:g} ({scale}) dropout={cfg.dropout:g}"
            f"{' DoRA' if cfg.use_dora else ''}: "
            + ", ".join(f"{role} {len(names)} modules" for role, names in self.modules_by_role.items())
        )
        return [
            head,
            f"  adapter params {self.adapter_params:,}, other trainable {self.other_trainable_params:,}, "
            f"frozen {self.frozen_params:,}",
        ]


def resolve_targets(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """Role -> qualified names of the modules it adapts in `model` (its family's `adapter_roles` patterns).

    Raises ValueError naming `adapter.targets` when a role matches nothing (or is unknown to the family)."""
    family = family_of(model)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    out: dict[str, list[str]] = {}
    for role in targets:
        patterns = family.adapter_roles.get(role, ())
        matched = [n for n in names if any(re.fullmatch(p, n) for p in patterns)]
        if not matched:
            raise ValueError(
                f"config key `adapter.targets`: {role} matches no module of this {family.name} model "
                f"(patterns {list(patterns)}); drop it from adapter.targets"
            )
        out[role] = matched
    seen: dict[str, str] = {}
    for role, matched in out.items():
        for n in matched:
            if n in seen:
                raise ValueError(f"config key `adapter.targets`: {n} is in both {seen[n]} and {role}")
            seen[n] = role
    return out


def lora_config(cfg: AdapterConfig, target_modules: list[str]):
    """The PEFT LoraConfig of `cfg` over exactly `target_modules` (qualified names)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        target_modules=list(target_modules),
        bias="none",
    )


def encoding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the installed encoding (GRAPE's learned planes; none for table encodings)."""
    from mmrope.model.install import text_model

    return list(text_model(model).rotary_emb.parameters())


def apply_adapter(model: nn.Module, cfg: AdapterConfig, *, seed: int) -> AdapterSummary | None:
    """Inject `cfg`'s LoRA adapters into `model` in place (nothing for adapter=none) and set what trains.

    Call after `install` and `apply_freeze`, before activation checkpointing, compile and the engine. The adapter
    init draws from a generator seeded with `seed`, so every rank (and every run) starts from the same adapters.
    """
    if cfg.name == "none":
        return None
    from peft import inject_adapter_in_model

    by_role = resolve_targets(model, cfg.targets)
    targets = [n for names in by_role.values() for n in names]
    policy = {n: p.requires_grad for n, p in model.named_parameters()}  # the freeze policy, before PEFT's own
    if cfg.name == "qlora":  # PEFT then wraps the 4-bit layers with its bitsandbytes LoRA layers
        quantize_frozen_linears(model, set(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(cfg, targets), model, adapter_name=ADAPTER_NAME)
    encoding = {id(p) for p in encoding_parameters(model)}
    adapter = other = frozen = 0
    for name, p in model.named_parameters():
        if is_adapter_parameter(name):
            train = True
        elif ".base_layer." in name:  # the stock weight of an adapted module
            train = False
        else:  # untouched by PEFT (same path as before): the freeze policy decides; the encoding always trains
            train = policy[name] or id(p) in encoding
        p.requires_grad_(train)
        n = p.numel()
        if not train:
            frozen += n
        elif is_adapter_parameter(name):
            adapter += n
        else:
            other += n
    return AdapterSummary(by_role, adapter, other, frozen)


def quantize_frozen_linears(model: nn.Module, adapted: set[str]) -> list[str]:
    """adapter=qlora: every frozen `nn.Linear` (the adapted ones, and the others the freeze policy freezes) becomes a
    bitsandbytes NF4 `Linear4bit` (double quantisation, bf16 compute) on the current CUDA device; the lm_head, the
    embeddings and every trainable module stay as they are. Returns the quantised names. CUDA only (refused on CPU
    at validation, naming adapter=qlora)."""
    import bitsandbytes as bnb

    device = torch.device("cuda", torch.cuda.current_device())
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name == "lm_head":
            continue
        if name not in adapted and any(p.requires_grad for p in module.parameters()):
            continue  # a module the freeze policy trains fully: full precision
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            compress_statistics=True,
        )
        q.weight = bnb.nn.Params4bit(
            module.weight.data.to(torch.bfloat16),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=True,
        )
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.to(torch.bfloat16), requires_grad=False)
        q.to(device)  # bitsandbytes quantises on the move to CUDA
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        done.append(name)
    return done
