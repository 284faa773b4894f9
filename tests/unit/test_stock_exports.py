"""No silently wrong stock load (issue 20.6): an export that is not its family's stock model refuses stock
transformers (AutoConfig, AutoModelForImageTextToText, the family's own class) with a message naming
`mmrope.from_pretrained` and lmms-eval's `--model mmrope`; `mmrope.from_pretrained` loads it. A stock export stays a
plain transformers checkpoint whose stock logits equal mmrope's. Untrained tiny models written by the export's own
`write_export` (the CLI's last step), Qwen2.5-VL and Qwen3-VL."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

import mmrope
from mmrope.model.build import build_model
from mmrope.model.config import ModelConfig, TinyModelConfig
from mmrope.model.families import FAMILIES
from mmrope.model.install import seam_kwargs
from mmrope.train.export import write_export

TINY = TinyModelConfig(hidden_size=128, num_attention_heads=1, intermediate_size=128, vision_depth=1)
EXPORTS = {  # name: (family, rope, hparams, dipe, stock)
    "qwen25_mrope": ("qwen2_5_vl", "mrope", {}, False, True),
    "qwen25_videorope_dipe": ("qwen2_5_vl", "videorope", {}, True, False),
    "qwen25_mrope_stride1": (
        "qwen2_5_vl",
        "mrope",
        {"temporal_stride": 1.0},
        False,
        False,
    ),  # a hyperparameter
    "qwen3_mrope_i": ("qwen3_vl", "mrope_i", {}, False, True),
    "qwen3_mrope_i_section": (
        "qwen3_vl",
        "mrope_i",
        {"mrope_section": [32, 16, 16]},
        False,
        True,
    ),  # in config
    "qwen3_ilrope_temporal": ("qwen3_vl", "ilrope", {"text_axes": "temporal"}, False, False),
}
NOT_STOCK = [k for k, v in EXPORTS.items() if not v[4]]
STOCK = [k for k, v in EXPORTS.items() if v[4]]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


@torch.no_grad()
def _tiny(family, tiny_processor, seed=0):
    """An untrained tiny model with sharp attention (q/k scaled), so that other positions move the logits."""
    model = build_model(
        ModelConfig(kind="tiny", family=family, tiny=TINY),
        vocab_size=len(tiny_processor.tokenizer),
        special_ids=tiny_processor.special_ids,
        seed=seed,
    ).eval()
    for layer in model.model.language_model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            attn.q_proj.weight.mul_(20)
            attn.k_proj.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_processor):
    root = tmp_path_factory.mktemp("stock_exports")
    out = {}
    for key, (family, name, hparams, dipe, _) in EXPORTS.items():
        model = _tiny(family, tiny_processor)
        out[key] = (model, root / key)
        write_export(
            model,
            tiny_processor,
            root / key,
            name=name,
            hparams=hparams,
            dipe=dipe,
            layout=FAMILIES[family].layout,
            family=family,
        )
    return out


@pytest.mark.parametrize("key", NOT_STOCK)
def test_stock_transformers_refuses_a_non_stock_export_naming_mmrope(exports, key):
    family, name, *_ = EXPORTS[key]
    model, path = exports[key]
    loaders = {
        "AutoConfig": lambda: AutoConfig.from_pretrained(path, local_files_only=True),
        "AutoModelForImageTextToText": lambda: AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True
        ),
        "family class": lambda: FAMILIES[family].model_class.from_pretrained(path, local_files_only=True),
    }
    for what, load in loaders.items():
        with pytest.raises((ValueError, KeyError)) as refused:
            load()
        message = str(refused.value)
        assert "mmrope.from_pretrained(path)" in message and "--model mmrope" in message, (what, message)
        assert f"rope={name}" in message, message

    meta = json.loads((path / "mmrope_encoding.json").read_text())
    assert meta["stock"] is False and set(meta["stock_fields"]) == {
        "model_type",
        "text_config.rope_parameters.rope_type",
    }
    loaded, processor = mmrope.from_pretrained(path)  # restores the marked fields
    assert loaded.config.model_type == family
    assert loaded.config.text_config.rope_parameters == model.config.text_config.rope_parameters
    assert processor.encoding.name == name and processor.dipe == EXPORTS[key][3]
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    inputs = processor(
        text=processor.apply_chat_template(MESSAGES), images=[Image.new("RGB", (56, 84), "red")]
    )
    out = mmrope.generate(loaded, processor, inputs, max_new_tokens=2)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("key", STOCK)
@torch.no_grad()
def test_a_stock_export_stays_stock_with_mmrope_logits(exports, key, tmp_path):
    family = EXPORTS[key][0]
    model, path = exports[key]
    model.save_pretrained(tmp_path, safe_serialization=True)  # what transformers itself writes
    assert (path / "config.json").read_bytes() == (tmp_path / "config.json").read_bytes()
    assert "stock_fields" not in json.loads((path / "mmrope_encoding.json").read_text())
    assert AutoConfig.from_pretrained(path, local_files_only=True).model_type == family

    stock = FAMILIES[family].model_class.from_pretrained(path, local_files_only=True).eval()
    ours, processor = mmrope.from_pretrained(path)
    image = Image.new("RGB", (84, 56), (220, 40, 40))
    inputs = processor(text=processor.apply_chat_template(MESSAGES), images=[image])
    theirs = stock(**inputs, use_cache=False).logits  # positions from the family's get_rope_index
    pos_3BL, _ = processor.encoding.position_ids(
        inputs["input_ids"],
        tokens=processor.tokens,
        image_grid_thw=inputs["image_grid_thw"],
        layout=processor.layout,
    )
    length = inputs["input_ids"].shape[1]
    logits = ours(
        input_ids=inputs["input_ids"],
        position_ids=pos_3BL,
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        use_cache=False,
        **seam_kwargs(cu_seqlens=torch.tensor([0, length])),
    ).logits
    torch.testing.assert_close(logits, theirs, rtol=0, atol=1e-5)
    # The check can fail: other positions (1-D ones, given to the stock model) move the logits.
    flat_3BL = torch.arange(length).expand(3, 1, length)
    flat = stock(**inputs, position_ids=flat_3BL, use_cache=False).logits
    assert (flat - theirs).abs().max() > 1e-3


def test_a_non_stock_export_is_a_base_model_for_a_new_run(exports):
    """Training from an export (model=pretrained model.path=<export>) reads the restored config."""
    model, path = exports["qwen25_videorope_dipe"]
    built = build_model(ModelConfig(kind="pretrained", family="qwen2_5_vl", path=str(path)))
    assert built.config.model_type == "qwen2_5_vl"
    state = built.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_every_family_refuses_a_non_stock_export(family, tiny_processor, tmp_path):
    model = _tiny(family, tiny_processor)
    write_export(
        model, tiny_processor, tmp_path, name="vanilla", hparams={}, dipe=False, layout="qwen3", family=family
    )
    for load in (
        lambda: AutoConfig.from_pretrained(tmp_path, local_files_only=True),
        lambda: FAMILIES[family].model_class.from_pretrained(tmp_path, local_files_only=True),
    ):
        with pytest.raises((ValueError, KeyError), match=r"mmrope\.from_pretrained\(path\).*--model mmrope"):
            load()
    loaded, _ = mmrope.from_pretrained(tmp_path)
    assert loaded.config.model_type == family
