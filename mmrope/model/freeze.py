"""Freeze policy by module group and optimizer parameter groups.

Groups: `vision` (ViT blocks + patch embedding), `connector` (the merger), `llm` (text model), `lm_head`.
With tied embeddings the lm_head weight *is* the input embedding, so it follows the `llm` group.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mmrope.model.config import FreezeConfig

GROUPS = ("vision", "connector", "llm", "lm_head")


def module_groups(model: nn.Module) -> OrderedDict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter in exactly one group (tied parameters are listed once, under `llm`)."""
    groups: OrderedDict[str, list] = OrderedDict((g, []) for g in GROUPS)
    for name, p in model.named_parameters():  # named_parameters() de-duplicates tied weights
        if ".visual.merger." in f".{name}":
            groups["connector"].append((name, p))
        elif ".visual." in f".{name}":
            groups["vision"].append((name, p))
        elif name.startswith("lm_head."):
            groups["lm_head"].append((name, p))
        else:
            groups["llm"].append((name, p))
    unknown = [n for n, _ in groups["llm"] if "language_model" not in n]
    if unknown:
        raise ValueError(f"freeze policy: parameters outside the known groups: {unknown[:5]}")
    return groups


def apply_freeze(model: nn.Module, freeze: FreezeConfig, adapter: bool = False) -> dict[str, dict[str, int]]:
    """Set requires_grad per group; returns {group: {"trainable": n, "frozen": n}} parameter counts.

    `adapter`: adapters will be added (mmrope.distributed.adapters) and train, so every group may be frozen."""
    counts = {}
    for group, params in module_groups(model).items():
        frozen = getattr(freeze, group)
        for _, p in params:
            p.requires_grad_(not frozen)
        n = sum(p.numel() for _, p in params)
        counts[group] = {"trainable": 0 if frozen else n, "frozen": n if frozen else 0}
    if not adapter and not any(c["trainable"] for c in counts.values()):
        raise ValueError("config key `model.freeze`: every module group is frozen; nothing would train")
    return counts


def group_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"trainable": n, "frozen": n}} from the parameters' requires_grad as they are now (after an adapter
    froze the base weights of the modules it adapts and added its own)."""
    counts = {}
    for group, params in module_groups(model).items():
        trainable = sum(p.numel() for _, p in params if p.requires_grad)
        counts[group] = {"trainable": trainable, "frozen": sum(p.numel() for _, p in params) - trainable}
    return counts


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms, biases and other 1-D parameters.

    Empty groups are left out (LoRA trains matrices only): DeepSpeed drops them, and the LR schedule, built on
    this list, must have as many groups as the optimizer DeepSpeed keeps. `no_decay` marks which is which."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "no_decay": False},
        {"params": no_decay, "weight_decay": 0.0, "no_decay": True},
    ]
    return [g for g in groups if g["params"]]
