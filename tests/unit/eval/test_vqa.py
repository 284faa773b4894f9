"""Scoring, VQA data/prompt construction and an end-to-end CLI run on tiny exported checkpoints."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.processor import IMAGE_PAD
from mmrope.eval.scoring import (
    answer_letter,
    exact_match,
    extract_option,
    normalize_answer,
    normalized_match,
    score,
)
from tests.conftest import ROOT, clean_env

OPTIONS = ["cat", "dog", "cow", "pig"]

# -- scoring (expected values written by hand) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction,expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("the answer is D", "D"),
        ("C) cow", "C"),
        ("A. cat", "A"),
        ("I would pick D here", "D"),
        ("dog", "B"),  # the option's text
        ("The Cow.", "C"),  # the option's text, normalised
        ("A dog is in the picture", None),  # "A" is an article, "dog" alone is not the whole answer
        ("B or C", None),  # ambiguous
        ("E", None),  # not an option
        ("", None),
    ],
)
def test_extract_option(prediction, expected):
    assert extract_option(prediction, OPTIONS) == expected


def test_extract_option_letter_range_follows_the_options():
    assert extract_option("E", ["a", "b", "c", "d", "e"]) == "E"
    assert extract_option("C", ["yes", "no"]) is None
    assert extract_option("D") == "D"  # no options: A-D


def test_normalisation_and_string_scores():
    assert normalize_answer("  The Red, circle! ") == "red circle"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match(" red circle\n", "red circle")
    assert not exact_match("Red circle", "red circle")
    assert normalized_match("Red circle.", "a red circle")
    assert not normalized_match("red square", "red circle")


def test_score_picks_the_scorer_by_options():
    assert answer_letter("B", OPTIONS) == "B" and answer_letter("(c)".upper(), OPTIONS) == "C"
    assert answer_letter("pig", OPTIONS) == "D"
    with pytest.raises(ValueError, match="answer"):
        answer_letter("horse", OPTIONS)
    assert score("The answer is B.", "B", OPTIONS)
    assert score("(B)", "dog", OPTIONS)  # gold given as the option text
    assert not score("A", "B", OPTIONS)
    assert score("Red circle.", "red circle")  # open question: normalised match
    assert not score("B", "red circle")
    assert not score("red", "red circle")


# -- data and prompts ------------------------------------------------------------------------------------------


def _png_file(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    Image.new("RGB", size, colour).save(path)
    return path.name


def _json_items(tmp_path: Path) -> Path:
    items = [
        {
            "id": "q0",
            "image": _png_file(tmp_path / "a.png", (56, 56), (220, 40, 40)),
            "question": "What colour is the image?",
            "answer": "red",
        },
        {
            "id": "q1",
            "images": [
                _png_file(tmp_path / "b.png", (84, 56), (40, 80, 220)),
                _png_file(tmp_path / "c.png", (56, 56), (40, 170, 60)),
            ],
            "question": "Which image is blue?",
            "answer": "A",
            "options": ["the first", "the second", "neither", "both"],
        },
        {
            "id": "q2",
            "image": _png_file(tmp_path / "d.png", (56, 84), (235, 200, 30)),
            "question": "Is it yellow?",
            "answer": "B",
            "options": ["no", "yes"],
        },
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def _with_text_only_item(tmp_path: Path) -> Path:
    """The items of `_json_items` with a text-only one in the middle (no image to put distractors after)."""
    lines = _json_items(tmp_path).read_text().splitlines()
    text_only = json.dumps({"id": "t0", "question": "What is 2 plus 2?", "answer": "4"})
    path = tmp_path / "items_with_text.jsonl"
    path.write_text("\n".join([*lines[:2], text_only, *lines[2:]]) + "\n")
    return path


def test_read_items_from_json_jsonl_and_shards(tmp_path, synthetic_shards):
    from mmrope.eval.vqa import OPEN_INSTRUCTION, OPTIONS_INSTRUCTION, read_items

    jsonl = _json_items(tmp_path)
    items = read_items([str(jsonl)])
    assert [i.key for i in items] == ["q0", "q1", "q2"]
    assert items[1].answer == "A" and items[1].options == ["the first", "the second", "neither", "both"]
    assert items[1].images["img0.png"] == (tmp_path / "b.png").read_bytes()
    parts = items[1].messages[0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert parts[2]["text"] == (
        "Which image is blue?\nA. the first\nB. the second\nC. neither\nD. both\n" + OPTIONS_INSTRUCTION
    )
    assert items[0].messages[0]["content"][1]["text"] == "What colour is the image?\n" + OPEN_INSTRUCTION

    as_list = tmp_path / "items.json"
    as_list.write_text(json.dumps({"items": [json.loads(line) for line in jsonl.read_text().splitlines()]}))
    assert [i.key for i in read_items([str(as_list)], limit=2)] == ["q0", "q1"]

    import webdataset as wds

    shard_items = read_items(synthetic_shards[:1], limit=5)
    records = list(wds.tarfile_to_samples()([{"url": synthetic_shards[0]}]))[:5]
    for item, record in zip(shard_items, records):
        messages = json.loads(record["json"])["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        assert item.messages == messages[:first]
        assert item.answer == messages[first]["content"].strip()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "q", "question": 1, "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="--data"):  # a malformed item is an error in the data file
        read_items([str(bad)])


def test_items_with_missing_or_unreadable_images_are_skipped_and_counted(tmp_path, tiny_processor):
    """One item whose image file is gone used to abort the whole evaluation: it is skipped with its reason,
    naming the file and the item id, and the others are evaluated."""
    from data.processing import SampleProcessor
    from mmrope.encodings import build
    from mmrope.eval.vqa import read_items, usable_items

    lines = _json_items(tmp_path).read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    extra = [
        {"id": "gone", "image": "missing.png", "question": "q", "answer": "a"},
        {"id": "broken", "image": "broken.png", "question": "q", "answer": "a"},
    ]
    path = tmp_path / "with_bad.jsonl"
    path.write_text("\n".join([lines[0], *map(json.dumps, extra), *lines[1:]]) + "\n")
    items = read_items([str(path)])
    sp = SampleProcessor(tiny_processor, build("mrope"), max_tokens=1 << 30, layout="qwen2_5")
    usable, skipped = usable_items(items, sp, checkpoint="c")
    assert [i.key for i, _ in usable] == ["q0", "q1", "q2"]
    assert [(s["key"], s["reason"]) for s in skipped] == [("gone", "missing_image"), ("broken", "bad_image")]
    assert skipped[0]["detail"] == f"{tmp_path}/missing.png not found"
    assert skipped[1]["detail"].startswith(
        f"{tmp_path}/broken.png: image member 'img0.png': not a readable image"
    )


@pytest.mark.parametrize("name,dipe", [("mrope", False), ("mrope_i", True)])
def test_prompt_is_chat_template_with_distractors_after_the_last_image(tmp_path, tiny_processor, name, dipe):
    # Reference built independently: the chat template with the generation prompt, image placeholders expanded
    # to grid / merge^2 tokens, tokenised in one go; distractors spliced after the last vision_end.
    from data.processing import SampleProcessor
    from mmrope.encodings import build
    from mmrope.eval.distractors import default_corpus, distractor_ids, insert_distractor
    from mmrope.eval.vqa import item_sample, prompt_ids, read_items

    item = read_items([str(_json_items(tmp_path))])[1]
    sp = SampleProcessor(tiny_processor, build(name), max_tokens=1 << 20, layout="qwen3", dipe=dipe)
    base = item_sample(item, sp)
    text = tiny_processor.tokenizer.apply_chat_template(
        item.messages, tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    for n in (base.image_grid_thw.prod(-1) // 4).tolist():
        text = text.replace(IMAGE_PAD, "\0" * n, 1)
    expected = tiny_processor.tokenizer(text.replace("\0", IMAGE_PAD), add_special_tokens=False)["input_ids"]
    assert prompt_ids(base).tolist() == expected

    ve = tiny_processor.special_ids["vision_end_token_id"]
    last_ve = max(i for i, t in enumerate(expected) if t == ve)
    ids_N = distractor_ids(tiny_processor.tokenizer, default_corpus(300), 40)
    far = insert_distractor(base, ids_N, tokens=sp.tokens, encoding=sp.encoding, layout="qwen3", dipe=dipe)
    assert prompt_ids(far).tolist() == expected[: last_ve + 1] + ids_N.tolist() + expected[last_ve + 1 :]


# -- end to end ------------------------------------------------------------------------------------------------


def _export_tiny(
    out: Path, tiny_processor, name: str, dipe: bool, seed: int, always: str | None = None
) -> Path:
    """A tiny VLM saved the way `mmrope.train.export` saves one (weights + processor + mmrope_encoding.json).

    `always`: rig the weights so that the model answers that one-token string, then <|im_end|>, whatever the
    image, distance and encoding: attention and MLP outputs are zeroed (o_proj, down_proj), so the last hidden
    state is the embedding of the last token; the (untied) head maps the generation prompt's last token to
    `always` and `always` to <|im_end|> (random 128-d embeddings are nearly orthogonal, so those rows win).
    """
    from mmrope.model.build import build_model
    from mmrope.model.config import ModelConfig, TinyModelConfig

    # One head of head_dim 128, like real Qwen-VL: every shipped rope config fits.
    tiny = TinyModelConfig(
        hidden_size=128,
        num_attention_heads=1,
        intermediate_size=128,
        vision_depth=1,
        tie_word_embeddings=always is None,
    )
    tokenizer, ids = tiny_processor.tokenizer, tiny_processor.special_ids
    model = build_model(
        ModelConfig(kind="tiny", tiny=tiny), vocab_size=len(tokenizer), special_ids=ids, seed=seed
    ).eval()
    if always is not None:
        (answer,) = tokenizer(always, add_special_tokens=False)["input_ids"]
        last = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-1]
        lm = model.model.language_model
        with torch.no_grad():
            for layer in lm.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            normed_VD = lm.norm(lm.embed_tokens.weight)
            model.lm_head.weight.zero_()
            model.lm_head.weight[answer] = 10 * normed_VD[last]
            model.lm_head.weight[ids["eos_token_id"]] = 10 * normed_VD[answer]
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tiny_processor.save(out)
    meta = {"name": name, "hparams": {}, "dipe": dipe, "layout": "qwen2_5", "stock": False}
    (out / "mmrope_encoding.json").write_text(json.dumps(meta | {"model_family": "qwen2_5_vl"}))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_processor) -> list[Path]:
    root = tmp_path_factory.mktemp("exported")
    return [
        _export_tiny(root / "mrope_says_b", tiny_processor, "mrope", False, seed=0, always="B"),
        _export_tiny(root / "mrope_i_dipe", tiny_processor, "mrope_i", True, seed=1),
    ]


def test_cli_end_to_end(tmp_path, exported):
    from mmrope.eval.scoring import score as reference_score

    data = _with_text_only_item(tmp_path)  # skipped and counted, not a crash
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "mmrope.eval.vqa",
        "--data",
        str(data),
        "--distances",
        "0,32",
        "--out",
        str(out),
    ]
    for ckpt in exported:
        cmd += ["--checkpoint", str(ckpt)]
    proc = subprocess.run(
        [*cmd, "--max-new-tokens", "4", "--batch-size", "2"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    with (out / "vqa.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows] == [["checkpoint", "distance", "n", "skipped", "accuracy"]] * 4
    assert {r["skipped"] for r in rows} == {"1"}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["key"], s["reason"]) for s in skipped] == [("t0", "no_image")] * 2  # once per checkpoint
    assert "skipped 1 of 4 items (no_image=1" in proc.stdout
    assert [(r["checkpoint"], int(r["distance"])) for r in rows] == [
        (str(exported[0]), 0),
        (str(exported[0]), 32),
        (str(exported[1]), 0),
        (str(exported[1]), 32),
    ]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 * 2 * 3
    for r in rows:
        mine = [
            p
            for p in predictions
            if p["checkpoint"] == r["checkpoint"] and p["distance"] == int(r["distance"])
        ]
        assert int(r["n"]) == len(mine) == 3
        assert {p["key"] for p in mine} == {"q0", "q1", "q2"}
        correct = [reference_score(p["prediction"], p["answer"], p["options"]) for p in mine]
        assert correct == [p["correct"] for p in mine]
        assert float(r["accuracy"]) == pytest.approx(sum(correct) / 3)
    # The rigged checkpoint answers "B" everywhere: right on q2 only (q0 is open, "red"; q1's gold is A).
    says_b = [p for p in predictions if p["checkpoint"] == str(exported[0])]
    assert [p["prediction"] for p in says_b] == ["B"] * 6
    assert [float(r["accuracy"]) for r in rows[:2]] == [pytest.approx(1 / 3)] * 2
    with Image.open(io.BytesIO((out / "vqa.png").read_bytes())) as png:
        png.load()
        assert png.format == "PNG" and png.size[0] > 200 and png.size[1] > 200


def test_pipeline_answer_equals_greedy_generate_on_the_reference_prompt(tmp_path, exported, tiny_processor):
    # The CLI's answer for an item at distance 32 == greedy_generate on the prompt built by hand (chat template,
    # expanded placeholders, distractors after the last vision_end), batched with left padding or not.
    from mmrope.eval.distractors import distractor_ids, load_corpus
    from mmrope.eval.vqa import evaluate, load_checkpoint, read_items
    from mmrope.model.generate import greedy_generate

    items = read_items([str(_json_items(tmp_path))])
    ckpt = load_checkpoint(exported[1], device=torch.device("cpu"))
    corpus = load_corpus(None)
    _, batched, _ = evaluate(ckpt, items, [32], corpus, max_new_tokens=5, batch_size=3, progress=False)
    _, single, _ = evaluate(ckpt, items, [32], corpus, max_new_tokens=5, batch_size=1, progress=False)
    assert [p["prediction"] for p in batched] == [p["prediction"] for p in single]

    item = items[0]
    image = Image.open(io.BytesIO(item.images["img0.png"])).convert("RGB")
    pixels = tiny_processor.image_processor(images=[image], return_tensors="pt")
    grid = pixels["image_grid_thw"].long()
    text = tiny_processor.tokenizer.apply_chat_template(
        item.messages, tokenize=False, add_generation_prompt=True
    )
    text = text.replace(IMAGE_PAD, IMAGE_PAD * int(grid.prod() // 4))
    ids = tiny_processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = ids.index(tiny_processor.special_ids["vision_end_token_id"]) + 1
    ids = ids[:cut] + distractor_ids(tiny_processor.tokenizer, corpus, 32).tolist() + ids[cut:]
    out = greedy_generate(
        ckpt.model,
        ckpt.encoding,
        torch.tensor([ids]),
        pixel_values=pixels["pixel_values"],
        image_grid_thw=grid,
        max_new_tokens=5,
        tokens=ckpt.tokens,
        layout="qwen2_5",
        dipe=True,
    )
    new = out[0, len(ids) :].tolist()
    eos = tiny_processor.special_ids["eos_token_id"]
    new = new[: new.index(eos)] if eos in new else new
    assert single[0]["prediction"] == tiny_processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_text_only_shard_records_are_skipped_with_a_reason(synthetic_shards, tiny_processor):
    """The generated shards hold text-only samples (arithmetic): they are counted as `no_image`, not a crash."""
    from data.processing import SampleProcessor
    from mmrope.encodings import build
    from mmrope.eval.vqa import read_items, usable_items

    items = read_items(synthetic_shards[:1], limit=60)
    sp = SampleProcessor(tiny_processor, build("mrope"), max_tokens=1 << 30, layout="qwen2_5")
    usable, skipped = usable_items(items, sp, checkpoint="c")
    text_only = {i.key for i in items if not i.images}
    assert text_only, "no text-only record among the first 60: the test would not test anything"
    assert {s["key"] for s in skipped} == text_only and {s["reason"] for s in skipped} == {"no_image"}
    assert len(usable) + len(skipped) == len(items)


def test_results_are_written_as_they_come(tmp_path, exported):
    """A run that stops at its second checkpoint keeps the first one's table, plot and predictions."""
    from mmrope.eval.vqa import run_vqa

    out = tmp_path / "out"
    broken = tmp_path / "broken_checkpoint"
    broken.mkdir()
    with pytest.raises(ValueError, match="broken_checkpoint"):
        run_vqa(
            [str(exported[0]), str(broken)],
            [str(_json_items(tmp_path))],
            out,
            distances=[0],
            max_new_tokens=2,
            progress=False,
        )
    with (out / "vqa.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["n"]) for r in rows] == [(str(exported[0]), "3")]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert (out / "vqa.png").stat().st_size > 1000


def test_cli_rejects_bad_arguments(tmp_path, exported):
    from mmrope.eval.vqa import main, parse_distances

    assert parse_distances("0,1024, 2048") == [0, 1024, 2048]
    with pytest.raises(ValueError, match="--distances"):
        parse_distances("0,1k")
    with pytest.raises(ValueError, match="--distances"):
        parse_distances("0,-5")
    with pytest.raises(ValueError, match="--checkpoint"):
        main(
            [
                "--checkpoint",
                str(tmp_path),
                "--data",
                str(_json_items(tmp_path)),
                "--out",
                str(tmp_path / "o"),
            ]
        )
