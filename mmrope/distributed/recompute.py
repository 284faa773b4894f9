"""Activation checkpointing (recomputation) on the LLM decoder layers, at a chosen granularity.

Only the LLM is checkpointed: the frozen ViT's forward records no graph at all (no parameter or input of it
requires grad), so there is nothing to store or recompute there.
"""

from __future__ import annotations

from torch import nn

MODES = ("none", "all", "every_k", "first_n")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1, layers: int = 0) -> list[int]:
    """Checkpoint every LLM decoder layer (`all`), every `every`-th one (`every_k`), the first `layers` ones
    (`first_n`: Megatron's "block" method; the other layers keep their activations, which trades memory for the
    ~1/4 of a layer's step time that recomputing it costs), or none.

    Returns the indices of checkpointed layers. Uses transformers' own `GradientCheckpointingLayer` switch
    (non-reentrant `torch.utils.checkpoint`), then turns it off on the layers that should keep activations.
    """
    if mode not in MODES:
        raise ValueError(
            f"config key `model.activation_checkpointing`: must be one of {list(MODES)}, got {mode!r}"
        )
    if mode == "every_k" and every < 1:
        raise ValueError("config key `model.activation_checkpointing_every`: must be >= 1")
    text_model = model.model.language_model
    num_layers = len(text_model.layers)
    if mode == "first_n" and not 1 <= layers <= num_layers:
        raise ValueError(
            f"config key `model.activation_checkpointing_layers`: with first_n it must be in 1..{num_layers} "
            f"(the LLM's decoder layers), got {layers}"
        )
    if mode == "none":
        return []
    text_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the input embeddings so that their outputs require grad, which only reentrant
    # checkpointing needs. Such hooks make frozen modules record a graph and keep their activations (on the whole
    # VLM they reach the ViT's patch embedding: ~90 GB for a 32K row of images at 7B scale): remove them.
    text_model.disable_input_require_grads()
    chosen = []
    for i, layer in enumerate(text_model.layers):
        on = (
            mode == "all"
            or (mode == "every_k" and i % every == every - 1)
            or (mode == "first_n" and i < layers)
        )
        layer.gradient_checkpointing = on
        if on:
            chosen.append(i)
    return chosen
