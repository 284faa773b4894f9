"""The paper recipe's model: ViT + connector from a local VLM checkpoint, the LLM from a local LLM checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mmrope.model.build import build_model, compose_vlm
from mmrope.model.config import ModelConfig, TinyModelConfig

SPECIAL = {
    "image_token_id": 5,
    "video_token_id": 6,
    "vision_start_token_id": 3,
    "vision_end_token_id": 4,
    "pad_token_id": 0,
    "eos_token_id": 2,
}
TINY = TinyModelConfig(hidden_size=128, num_attention_heads=1, num_key_value_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm")
    build_model(ModelConfig(tiny=TINY), vocab_size=80, special_ids=SPECIAL, seed=1).save_pretrained(path)
    return path


def llm_dir(tmp_path, *, hidden: int = 128, vocab: int = 72, tied: bool = False, seed: int = 2):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=tied,
        rope_theta=1e6,
    )
    llm = Qwen2ForCausalLM(cfg)
    path = tmp_path / f"llm_{hidden}_{vocab}_{tied}"
    llm.save_pretrained(path)
    return path, llm


@pytest.mark.parametrize("tied", [False, True])
def test_weights_come_from_the_right_checkpoints(vlm_dir, tmp_path, tied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    llm_path, llm = llm_dir(tmp_path, tied=tied)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_dir)
    model = compose_vlm(vlm_dir, llm_path)

    for name, p in vlm.model.visual.state_dict().items():  # ViT and connector from the VLM
        torch.testing.assert_close(model.model.visual.state_dict()[name], p, rtol=0, atol=0, msg=name)
    ours = model.model.language_model.state_dict()
    for name, p in llm.model.state_dict().items():  # the LLM body from the LLM (embedding rows it has)
        if name == "embed_tokens.weight":
            assert ours[name].shape[0] == 80  # resized up to the VLM tokenizer's vocabulary
            torch.testing.assert_close(ours[name][:72], p, rtol=0, atol=0)
        else:
            torch.testing.assert_close(ours[name], p, rtol=0, atol=0, msg=name)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    else:
        torch.testing.assert_close(model.lm_head.weight[:72], llm.lm_head.weight, rtol=0, atol=0)
    # Vision token ids and the VLM's rotary sections are kept; the LLM's theta is used.
    assert model.config.image_token_id == SPECIAL["image_token_id"]
    assert (
        model.config.text_config.rope_parameters["mrope_section"]
        == vlm.config.text_config.rope_parameters["mrope_section"]
    )
    ids = torch.tensor([[7, 3, 5, 4, 9]])
    out = model(
        input_ids=ids, pixel_values=torch.randn(4, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 2, 2]])
    )
    assert out.logits.shape == (1, 5, 80) and torch.isfinite(out.logits).all()


def test_width_mismatch_is_a_clear_error(vlm_dir, tmp_path):
    llm_path, _ = llm_dir(tmp_path, hidden=64)
    with pytest.raises(ValueError, match="model.llm_path.*64"):
        compose_vlm(vlm_dir, llm_path)


def test_missing_paths_name_the_key(tmp_path):
    cfg = ModelConfig(kind="composed", vision_path=str(tmp_path / "nope"), llm_path=str(tmp_path))
    with pytest.raises(ValueError, match="model.vision_path"):
        build_model(cfg)
