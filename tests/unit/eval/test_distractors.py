"""Distractor text and its insertion between the image(s) and the question (specs/dipe.md section 7)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from data.processing import IGNORE_INDEX, SampleProcessor
from mmrope.encodings import anchored_positions, build
from mmrope.eval.distractors import (
    default_corpus,
    distractor_ids,
    insert_distractor,
    insertion_index,
    load_corpus,
)


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _record(num_images: int = 1, question: str = "What colour is the square?", answer: str = "red") -> dict:
    parts = [{"type": "image", "image": f"img{i}.png"} for i in range(num_images)]
    messages = [
        {"role": "user", "content": [*parts, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]
    record = {"__key__": "item", "json": json.dumps({"messages": messages})}
    for i in range(num_images):
        record[f"img{i}.png"] = _png((56 + 28 * i, 84), (200, 30 * i, 30))
    return record


def _processor(tiny_processor, name: str, dipe: bool = False, **hparams) -> SampleProcessor:
    return SampleProcessor(
        tiny_processor, build(name, **hparams), max_tokens=1 << 20, layout="qwen3", dipe=dipe
    )


# -- corpus ----------------------------------------------------------------------------------------------------


def test_default_corpus_is_deterministic_english_like_text():
    text = default_corpus(2000, seed=0)
    assert text == default_corpus(2000, seed=0)
    assert text != default_corpus(2000, seed=1)
    words = text.split()
    assert 2000 <= len(words) < 2030  # stops at the first full sentence past the requested count
    assert text[0].isupper() and text.endswith(".")
    assert "\n" not in text


def test_load_corpus_globs_files_and_replaces_newlines(tmp_path):
    (tmp_path / "b.txt").write_text("second\nfile")
    (tmp_path / "a.txt").write_text("first line\nsecond line")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_corpus([str(tmp_path / "*.txt")]) == "first line second line second file"
    assert load_corpus([str(tmp_path / "b.txt")]) == "second file"
    assert load_corpus(None) == default_corpus()
    with pytest.raises(ValueError, match="corpus"):
        load_corpus([str(tmp_path / "*.pdf")])


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 32, 1000])
def test_distractor_ids_exact_count_and_no_special_tokens(tiny_processor, num_tokens):
    tok = tiny_processor.tokenizer
    corpus = "Short text. <|image_pad|> <|vision_start|> stays plain text."  # far fewer than 1000 tokens
    ids_N = distractor_ids(tok, corpus, num_tokens)
    assert ids_N.shape == (num_tokens,) and ids_N.dtype == torch.long
    special = set(tiny_processor.special_ids.values())
    assert not any(int(i) in special for i in ids_N)


def test_distractor_ids_follow_the_corpus_stream_with_offset_and_wrap(tiny_processor):
    tok = tiny_processor.tokenizer
    corpus = default_corpus(300)
    stream = tok(corpus, add_special_tokens=False)["input_ids"]  # plain text: nothing special to split
    n = len(stream)
    assert distractor_ids(tok, corpus, 50).tolist() == stream[:50]
    assert distractor_ids(tok, corpus, 50, offset=10).tolist() == stream[10:60]
    assert distractor_ids(tok, corpus, n + 5).tolist() == stream + stream[:5]  # wraps around
    assert tok.decode(distractor_ids(tok, corpus, n)) == corpus
    with pytest.raises(ValueError, match="num_tokens"):
        distractor_ids(tok, corpus, -1)


# -- insertion -------------------------------------------------------------------------------------------------

ENCODINGS = [
    ("mrope", {}),
    ("mrope_i", {"spatial_reset": True}),
    ("videorope", {}),
    ("circlerope", {}),
    ("vanilla", {}),
    ("v2pe", {}),
]


@pytest.mark.parametrize("name,hparams", ENCODINGS)
@pytest.mark.parametrize("num_images", [1, 2])
def test_insert_keeps_tokens_and_recomputes_positions(tiny_processor, name, hparams, num_images):
    sp = _processor(tiny_processor, name, **hparams)
    tokens, encoding = sp.tokens, sp.encoding
    sample = sp(_record(num_images))
    ids = sample.input_ids
    # Where the question starts, found independently: the token after the last vision_end.
    vision_ends = (ids == tokens.vision_end_token_id).nonzero().flatten().tolist()
    assert len(vision_ends) == num_images
    question_start = vision_ends[-1] + 1
    assert insertion_index(ids, sample.labels, tokens) == question_start

    for num_tokens in (0, 1, 32):
        ids_N = distractor_ids(tiny_processor.tokenizer, default_corpus(500), num_tokens)
        far = insert_distractor(sample, ids_N, tokens=tokens, encoding=encoding, layout="qwen3")
        cut = question_start
        assert far.num_tokens == sample.num_tokens + num_tokens
        # images + everything before the cut, the distractors, then question + answer: token for token.
        assert torch.equal(far.input_ids[:cut], ids[:cut])
        assert torch.equal(far.input_ids[cut : cut + num_tokens], ids_N)
        assert torch.equal(far.input_ids[cut + num_tokens :], ids[cut:])
        assert torch.equal(far.labels[:cut], sample.labels[:cut])
        assert (far.labels[cut : cut + num_tokens] == IGNORE_INDEX).all()
        assert torch.equal(far.labels[cut + num_tokens :], sample.labels[cut:])
        # exactly num_tokens tokens between the last image's vision_end and the question's first token
        new_last_ve = (far.input_ids == tokens.vision_end_token_id).nonzero().flatten()[-1].item()
        assert new_last_ve == vision_ends[-1]
        assert (cut + num_tokens) - new_last_ve - 1 == num_tokens
        assert far.pixel_values is sample.pixel_values and far.image_grid_thw is sample.image_grid_thw
        assert far.static_position_ids is None
        # positions: what the encoding gives for the spliced sequence processed from scratch
        ref_3BL, _ = encoding.position_ids(
            far.input_ids[None], tokens=tokens, image_grid_thw=sample.image_grid_thw, layout="qwen3"
        )
        assert torch.equal(far.position_ids, ref_3BL[:, 0])
        assert torch.equal(far.position_ids[:, :cut], sample.position_ids[:, :cut])


@pytest.mark.parametrize("name", ["mrope", "mrope_i", "vanilla"])
def test_text_after_the_image_moves_by_exactly_the_distance(tiny_processor, name):
    # Spec (encodings.md): after a visual block text positions advance by 1 per token on every axis, so
    # inserting N text tokens shifts every later position by exactly N, and the distractors count on from VE.
    sp = _processor(tiny_processor, name)
    sample = sp(_record(1))
    cut = insertion_index(sample.input_ids, sample.labels, sp.tokens)
    far = insert_distractor(
        sample, torch.full((17,), 70), tokens=sp.tokens, encoding=sp.encoding, layout="qwen3"
    )
    assert torch.equal(far.position_ids[:, cut + 17 :], sample.position_ids[:, cut:] + 17)
    ve_pos_3 = sample.position_ids[:, cut - 1]
    expected_3N = ve_pos_3[:, None] + torch.arange(1, 18)[None]
    assert torch.equal(far.position_ids[:, cut : cut + 17], expected_3N)


@pytest.mark.parametrize("name", ["mrope", "mrope_i", "videorope"])
def test_insert_with_dipe_recomputes_static_positions(tiny_processor, name):
    sp = _processor(tiny_processor, name, dipe=True)
    sample = sp(_record(2))
    cut = insertion_index(sample.input_ids, sample.labels, sp.tokens)
    near_static = sample.static_position_ids
    for num_tokens in (0, 5, 64):
        ids_N = distractor_ids(tiny_processor.tokenizer, default_corpus(500), num_tokens, offset=3)
        far = insert_distractor(
            sample, ids_N, tokens=sp.tokens, encoding=sp.encoding, layout="qwen3", dipe=True
        )
        visual_L = (far.input_ids == sp.tokens.image_token_id)[None]
        assert torch.equal(
            far.static_position_ids, anchored_positions(far.position_ids[:, None], visual_L)[:, 0]
        )
        # dipe.md 2: every text token after the last image is anchored to the first token of its text run,
        # the vision_end (VS/VE are text) -- so the question's static position ignores the distance.
        ve_dyn_3 = far.position_ids[:, cut - 1]
        assert (far.static_position_ids[:, cut - 1 :] == ve_dyn_3[:, None]).all()
        assert torch.equal(far.static_position_ids[:, cut + num_tokens :], near_static[:, cut:])
        # what the data path computes for the same token sequence from scratch
        ref_3BL, _ = sp.encoding.position_ids(
            far.input_ids[None], tokens=sp.tokens, image_grid_thw=far.image_grid_thw, layout="qwen3"
        )
        assert torch.equal(far.position_ids, ref_3BL[:, 0])


def test_insert_goes_before_the_first_answer_in_multi_turn(tiny_processor):
    sp = _processor(tiny_processor, "mrope")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "Q1?"}],
        },
        {"role": "assistant", "content": "A1"},
        {
            "role": "user",
            "content": [{"type": "image", "image": "img1.png"}, {"type": "text", "text": "Q2?"}],
        },
        {"role": "assistant", "content": "A2"},
    ]
    record = {"__key__": "mt", "json": json.dumps({"messages": messages})}
    record["img0.png"] = _png((56, 56), (0, 0, 200))
    record["img1.png"] = _png((56, 56), (0, 200, 0))
    sample = sp(record)
    first_ve = (sample.input_ids == sp.tokens.vision_end_token_id).nonzero().flatten()[0].item()
    assert insertion_index(sample.input_ids, sample.labels, sp.tokens) == first_ve + 1
    # a prompt without labels: after the last image
    no_labels = torch.full_like(sample.labels, IGNORE_INDEX)
    last_ve = (sample.input_ids == sp.tokens.vision_end_token_id).nonzero().flatten()[-1].item()
    assert insertion_index(sample.input_ids, no_labels, sp.tokens) == last_ve + 1


def test_insert_rejects_bad_input(tiny_processor):
    sp = _processor(tiny_processor, "mrope")
    text_only = sp(
        {
            "__key__": "t",
            "json": json.dumps(
                {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
            ),
        }
    )
    with pytest.raises(ValueError, match="no visual block"):
        insert_distractor(
            text_only, torch.tensor([70]), tokens=sp.tokens, encoding=sp.encoding, layout="qwen3"
        )
    sample = sp(_record(1))
    with pytest.raises(ValueError, match="ids_N"):
        insert_distractor(
            sample,
            torch.tensor([70, sp.tokens.image_token_id]),
            tokens=sp.tokens,
            encoding=sp.encoding,
            layout="qwen3",
        )
    with pytest.raises(ValueError, match="ids_N"):
        insert_distractor(
            sample, torch.ones(2, 2, dtype=torch.long), tokens=sp.tokens, encoding=sp.encoding, layout="qwen3"
        )
