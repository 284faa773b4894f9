"""Video positions use the model's own `vision_config.tokens_per_second` (issue 24.8), through the data path the
trainer builds and through generation. Reference: transformers' own Qwen2.5-VL `get_rope_index` / `generate` on
the same model: its config's value is what the stock model computes with (the tiny config keeps transformers'
default of 4, the released checkpoints say 2).

Videos are chosen so that stock transformers 5.23 is right after them too (temporal extent below max(h', w'),
see mmrope/encodings/README.md): positions are compared over the whole sequence."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from data.processing import token_ids_for
from mmrope.encodings import build
from mmrope.model.build import build_model
from mmrope.model.config import ModelConfig, TinyModelConfig
from mmrope.model.generate import greedy_generate
from mmrope.model.install import install
from mmrope.train.config import register_configs, validate
from mmrope.train.run import make_sample_processor
from tests.conftest import ROOT, tiny_overrides
from tests.unit.model.tiny import PAD_ID, TOKENS, pixels, tiny_family, video_sample


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), colour).save(buf, format="PNG")
    return buf.getvalue()


def _video_record() -> dict:
    """4 frames at 8 fps -> 2 temporal patches of 0.25 s, 4x4 merged tokens each: temporal ids 0, 0.25 * tps."""
    names = [f"v.f{i}.png" for i in range(4)]
    content = [{"type": "video", "video": names, "fps": 8.0}, {"type": "text", "text": "What moves?"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "A square."}]
    record = {"__key__": "v", "json": json.dumps({"messages": messages}).encode()}
    return record | {n: _png((40 * i, 80, 200)) for i, n in enumerate(names)}


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return validate(compose("train", overrides=overrides))


@torch.no_grad()
def test_data_path_uses_the_models_tokens_per_second(tmp_path, cache_dir, tiny_processor):
    """make_sample_processor (the trainer's data workers and evaluator) reads the model's config: the tiny model
    (transformers' default 4) and a local checkpoint saying 2 give each the positions transformers computes."""
    tiny = _compose(tiny_overrides(cache_dir, tmp_path, "rope=mrope"))
    model = build_model(
        tiny.model, vocab_size=len(tiny_processor.tokenizer), special_ids=tiny_processor.special_ids
    ).eval()
    assert model.config.vision_config.tokens_per_second == 4
    checkpoint = copy.deepcopy(model)
    checkpoint.config.vision_config.tokens_per_second = 2  # as the released Qwen2.5-VL checkpoints
    checkpoint.save_pretrained(tmp_path / "ckpt")
    pretrained = _compose(
        tiny_overrides(
            cache_dir, tmp_path, "rope=mrope", "model=qwen2_5_vl", f"model.path={tmp_path / 'ckpt'}"
        )
    )
    ids = token_ids_for(tiny_processor)
    temporal = {}
    for cfg, reference in ((tiny, model), (pretrained, checkpoint)):
        sp = make_sample_processor(cfg, tiny_processor, build("mrope"), pixels="float32")
        s = sp(_video_record())
        assert s.video_grid_thw.tolist() == [[2, 8, 8]] and s.second_per_grid_ts.tolist() == [0.25]
        input_ids = s.input_ids[None]
        mm_types = (input_ids == ids.video_token_id).int() * 2
        theirs, _ = reference.model.get_rope_index(
            input_ids, mm_types, video_grid_thw=s.video_grid_thw, second_per_grid_ts=s.second_per_grid_ts
        )
        assert torch.equal(s.position_ids.long(), theirs[:, 0].long())
        video = (s.input_ids == ids.video_token_id).nonzero().flatten()
        temporal[sp.tokens_per_second] = int(s.position_ids[0, video[-1]] - s.position_ids[0, video[0]])
    assert temporal == {4.0: 1, 2.0: 0}  # trunc(0.25 * tps): the two configs give different positions


@pytest.mark.parametrize("tps", [2, 4])
@torch.no_grad()
def test_generation_uses_the_models_tokens_per_second(tps):
    """greedy_generate (mmrope.generate) on a video prompt == transformers' generate of the same model, whose
    config says `tps`. Sharp attention (q/k scaled) makes the tokens depend on the temporal step."""
    stock = tiny_family("qwen2_5_vl", seed=0)
    stock.config.vision_config.tokens_per_second = tps
    for layer in stock.model.language_model.layers:
        layer.self_attn.q_proj.weight.mul_(20)
        layer.self_attn.k_proj.weight.mul_(20)
    ids_BL, grid = video_sample(3, (2, 8, 8), 2, seed=5)
    ids_BL = ids_BL[None]
    video = {"pixel_values_videos": pixels(grid, 6), "video_grid_thw": grid}
    seconds = torch.tensor([0.5])  # temporal step 1 (tps 2) or 2 (tps 4), both within max(h', w') - 1 = 3
    theirs = stock.generate(
        input_ids=ids_BL,
        attention_mask=torch.ones_like(ids_BL),
        mm_token_type_ids=(ids_BL == TOKENS.video_token_id).int() * 2,
        second_per_grid_ts=seconds,
        max_new_tokens=8,
        do_sample=False,
        **video,
    )
    section = list(stock.config.text_config.rope_parameters["mrope_section"])
    enc = build("mrope", mrope_section=section)
    ours = greedy_generate(
        install(copy.deepcopy(stock), enc),
        enc,
        ids_BL,
        second_per_grid_ts=seconds,
        max_new_tokens=8,
        tokens=TOKENS,
        layout="qwen2_5",
        eos_token_id=stock.generation_config.eos_token_id,
        pad_token_id=PAD_ID,
        **video,
    )
    assert ours.tolist() == theirs.tolist()
    # The check can fail: with the other tokens_per_second transformers answers differently.
    stock.config.vision_config.tokens_per_second = 6 - tps
    other = stock.generate(
        input_ids=ids_BL,
        attention_mask=torch.ones_like(ids_BL),
        mm_token_type_ids=(ids_BL == TOKENS.video_token_id).int() * 2,
        second_per_grid_ts=seconds,
        max_new_tokens=8,
        do_sample=False,
        **video,
    )
    assert other.tolist() != theirs.tolist()


def test_tokens_per_second_of_configs():
    from mmrope.model.families import DEFAULT_TOKENS_PER_SECOND, tokens_per_second

    tiny = TinyModelConfig(hidden_size=64, num_attention_heads=1, intermediate_size=64, vision_depth=1)
    ids = dict.fromkeys(
        ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), 0
    ) | {"pad_token_id": 0, "eos_token_id": 0}
    for family, expected in (("qwen2_5_vl", 4.0), ("qwen3_vl", DEFAULT_TOKENS_PER_SECOND)):
        model = build_model(ModelConfig(kind="tiny", family=family, tiny=tiny), vocab_size=8, special_ids=ids)
        assert tokens_per_second(model) == tokens_per_second(model.config) == expected
