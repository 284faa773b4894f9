"""Activation checkpointing on the LLM: same loss and gradients as no recomputation, ViT untouched."""

from __future__ import annotations

import pytest
import torch

from mmrope.distributed.recompute import apply_activation_checkpointing
from mmrope.model.build import build_model
from mmrope.model.config import FreezeConfig, ModelConfig, TinyModelConfig
from mmrope.model.freeze import apply_freeze

SPECIAL = {
    "image_token_id": 5,
    "video_token_id": 6,
    "vision_start_token_id": 3,
    "vision_end_token_id": 4,
    "pad_token_id": 0,
    "eos_token_id": 2,
}


def loss_and_grads(mode: str, every: int = 1, layers: int = 0):
    cfg = ModelConfig(
        tiny=TinyModelConfig(
            hidden_size=128,
            num_attention_heads=1,
            num_key_value_heads=1,
            num_hidden_layers=4,
            intermediate_size=64,
        )
    )
    model = build_model(cfg, vocab_size=64, special_ids=SPECIAL, seed=0)
    apply_freeze(model, FreezeConfig())
    chosen = apply_activation_checkpointing(model, mode, every, layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 64, (1, 10), generator=g)
    ids[0, 2:6] = torch.tensor([3, 5, 5, 4])  # VS, 2 image tokens (grid 1x2x4 -> 2 merged), VE
    pixels = torch.randn(8, 3 * 2 * 14 * 14, generator=g)
    out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 2, 4]]), labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.loss.detach(), grads, chosen, model


@pytest.mark.parametrize(
    "mode,every,layers,expected",
    [("all", 1, 0, [0, 1, 2, 3]), ("every_k", 2, 0, [1, 3]), ("first_n", 1, 3, [0, 1, 2])],
)
def test_recompute_is_exact_and_only_on_the_llm(mode, every, layers, expected):
    ref_loss, ref_grads, none_chosen, _ = loss_and_grads("none")
    loss, grads, chosen, model = loss_and_grads(mode, every, layers)
    assert none_chosen == [] and chosen == expected
    assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [
        i in expected for i in range(4)
    ]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.model.visual.modules())
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name, g in grads.items():
        if ".visual." in f".{name}" and ".merger." not in name:
            assert g is None, f"frozen ViT parameter {name} got a gradient"
        else:
            assert g is not None, f"trainable parameter {name} got no gradient"
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_mode_names_the_key():
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        ModelConfig(activation_checkpointing="sometimes")
    with pytest.raises(ValueError, match="model.activation_checkpointing_layers"):
        ModelConfig(activation_checkpointing="first_n")  # how many layers is not said
    with pytest.raises(ValueError, match=r"model.activation_checkpointing_layers.*1\.\.4"):
        loss_and_grads("first_n", layers=5)  # more layers than the model has


def _saved_bytes_and_vit_graph(mode: str) -> tuple[int, bool]:
    """Bytes autograd saves during one forward, and whether any ViT block's output is part of the graph."""
    model = build_model(
        ModelConfig(tiny=TinyModelConfig(num_hidden_layers=4)), vocab_size=64, special_ids=SPECIAL, seed=0
    )
    apply_freeze(model, FreezeConfig())
    apply_activation_checkpointing(model, mode)
    assert not getattr(model.model.language_model, "_require_grads_hooks", None), (
        "input-require-grads hooks left"
    )
    model.train()
    vit_outputs_require_grad = []
    for block in model.model.visual.blocks:
        block.register_forward_hook(lambda m, i, o: vit_outputs_require_grad.append(o.requires_grad))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 64, (1, 200), generator=g)
    ids[0, 2:6] = torch.tensor([3, 5, 5, 4])
    pixels = torch.randn(8, 3 * 2 * 14 * 14, generator=g)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 2, 4]]), labels=ids)
    assert vit_outputs_require_grad, "the ViT did not run"
    return sum(saved), any(vit_outputs_require_grad)


def test_recompute_saves_less_and_the_frozen_vit_records_no_graph():
    none_bytes, none_vit_graph = _saved_bytes_and_vit_graph("none")
    all_bytes, all_vit_graph = _saved_bytes_and_vit_graph("all")
    # transformers' checkpointing switch also hooks input embeddings to require grad (for reentrant
    # checkpointing); left in place, the frozen ViT would record its graph and keep every activation.
    assert not none_vit_graph and not all_vit_graph
    assert all_bytes < none_bytes / 2, (all_bytes, none_bytes)
