"""`mmrope.from_pretrained` on exported tiny folders: the processor needs no torchvision and gives stock
transformers the inputs it needs (`mm_token_type_ids`); `mmrope.generate` equals stock `generate` for a stock
(MRoPE) export, early stop at <|im_end|> included. References are transformers' own model and generate."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

import mmrope
from data.processor import IMAGE_PAD
from tests.unit.eval.test_vqa import _export_tiny

MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What colour is the image?"}],
    }
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_processor):
    root = tmp_path_factory.mktemp("pretrained")
    return {
        "random": _export_tiny(root / "random", tiny_processor, "mrope", False, seed=3),
        "says_b": _export_tiny(root / "says_b", tiny_processor, "mrope", False, seed=0, always="B"),
        "dipe": _export_tiny(root / "dipe", tiny_processor, "mrope_i", True, seed=1),
    }


def _images():
    return [Image.new("RGB", (84, 56), (220, 40, 40)), Image.new("RGB", (56, 56), (40, 80, 220))]


def test_processor_builds_what_the_chat_template_and_image_processor_say(folders, tiny_processor):
    model, processor = mmrope.from_pretrained(folders["random"])
    assert processor.encoding.name == "mrope" and not processor.dipe and not model.training
    text = processor.apply_chat_template(MESSAGES)
    image = _images()[0]
    inputs = processor(text=text, images=[image])
    # reference: the tokenizer's template, the image processor's grid, pads expanded by hand
    grid = tiny_processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    ref_text = tiny_processor.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    ref_text = ref_text.replace(IMAGE_PAD, IMAGE_PAD * int(grid.prod() // 4))
    ref_ids = tiny_processor.tokenizer(ref_text, add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"].tolist() == [ref_ids]
    assert torch.equal(inputs["image_grid_thw"], grid)
    image_id = tiny_processor.special_ids["image_token_id"]
    assert inputs["mm_token_type_ids"].tolist() == [[int(t == image_id) for t in ref_ids]]
    assert inputs["attention_mask"].tolist() == [[1] * len(ref_ids)]
    with pytest.raises(ValueError, match="images"):
        processor(text=text, images=_images())  # two images for one placeholder


def test_generate_equals_stock_transformers_generate(folders):
    for name, max_new in (("random", 6), ("says_b", 8)):
        model, processor = mmrope.from_pretrained(folders[name])
        stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folders[name], local_files_only=True
        ).eval()
        text = processor.apply_chat_template(MESSAGES)
        # a batch of two prompts of different lengths (left padding), one image each
        texts = [text, text.replace("What colour", "Which colour, please,")]
        inputs = processor(text=texts, images=_images())
        ours = mmrope.generate(model, processor, inputs, max_new_tokens=max_new)
        with torch.no_grad():
            theirs = stock.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        assert ours.tolist() == theirs.tolist(), name
        if name == "says_b":  # the rigged model answers "B" then <|im_end|>: both stop there
            new = processor.batch_decode(ours[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            assert new == ["B", "B"] and ours.shape[1] == inputs["input_ids"].shape[1] + 2


def test_without_mm_token_type_ids_stock_positions_are_wrong(folders):
    """Why the README passes mm_token_type_ids: without it transformers uses 1-D positions (different logits)."""
    model, processor = mmrope.from_pretrained(folders["random"])
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folders["random"], local_files_only=True
    ).eval()
    inputs = processor(text=processor.apply_chat_template(MESSAGES), images=_images()[:1])
    with torch.no_grad():
        right = stock(**inputs).logits
        stock.model.rope_deltas = None
        wrong = stock(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_dipe_export_loads_with_dipe_and_generates(folders):
    model, processor = mmrope.from_pretrained(folders["dipe"])
    assert processor.dipe and processor.encoding.name == "mrope_i"
    inputs = processor(text=processor.apply_chat_template(MESSAGES), images=_images()[:1])
    out = mmrope.generate(model, processor, inputs, max_new_tokens=3)
    assert out.shape[0] == 1 and 1 <= out.shape[1] - inputs["input_ids"].shape[1] <= 3


def test_a_folder_that_is_not_an_export_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mmrope_encoding.json"):
        mmrope.from_pretrained(tmp_path)
