"""Long-context VQA: accuracy vs. inter-modal distance (specs/dipe.md section 7).

    python -m mmrope.eval.vqa --checkpoint exported/mrope --checkpoint exported/mrope_dipe \\
        --data vqa/items.jsonl --distances 0,1024,2048,4096,8192,16384,32768 --corpus 'essays/*.txt' --out eval/

For every exported checkpoint (`python -m mmrope.train.export`: stock transformers weights + processor +
`mmrope_encoding.json`) and every distance d, each item is prompted as one user turn (its image(s), then the
question and any options) followed by the generation prompt, with d tokens of distractor text spliced between
the last image and the question; the answer is generated greedily with the KV cache and scored
(`mmrope.eval.scoring.score`). The distractors of distance d are the first d tokens of the corpus, so a longer
distance extends a shorter one. Writes `<out>/vqa.csv` (checkpoint, distance, n, skipped, accuracy),
`<out>/vqa.png` (accuracy vs. distance, one curve per checkpoint), `<out>/predictions.jsonl` (one line per item and
distance) and `<out>/skipped.jsonl` (items that cannot be evaluated, with the reason: `no_image` for a text-only
item, which has no image to put distractors after; `missing_image` / `bad_image` for an image file or member
that is missing or unreadable, named in the detail and on the console with the item id). Predictions are written
as they are scored, the table and plot after every checkpoint.

Data (`--data`, several allowed):
- webdataset shards in the project format (`.tar`, brace patterns ok): `<key>.json` holds `{"messages": [...]}`
  (+ optional `"options": [...]`); the messages before the first assistant turn are the prompt, used as
  they are, and the first assistant turn's text is the answer;
- JSON (a list, or `{"items": [...]}`) or JSONL; an item is `{"image": path | "images": [paths], "question":
  str, "answer": str, "options": [str, ...] (optional), "id": str (optional)}`, paths relative to the file
  (an item without images is text only: skipped and counted).
  The question gets the options as `A. ...` lines and an instruction to answer with a letter (or, without
  options, with a single word or phrase), the LLaVA evaluation prompts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data.processing import IGNORE_INDEX, Sample, SampleError, SampleProcessor
from data.processor import VLProcessor
from mmrope.encodings import Encoding, TokenIds
from mmrope.eval.chat import decode_new
from mmrope.eval.distractors import distractor_ids, insert_distractor, insertion_index, load_corpus
from mmrope.eval.scoring import option_letters, score
from mmrope.model.families import tokens_per_second

DEFAULT_DISTANCES = (0, 1024, 2048, 4096, 8192, 16384, 32768)
OPTIONS_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class VQAItem:
    key: str
    messages: list[dict]  # the prompt turns (chat format); images referenced by member name
    answer: str
    options: list[str] | None
    images: dict[str, bytes]  # member name -> encoded image
    # (reason, detail) when the item cannot be evaluated whatever the checkpoint: e.g. ("missing_image", the path
    # looked up). Skipped and counted, like a text-only item.
    unusable: tuple[str, str] | None = None
    # member name -> the file it was read from (JSON items), to name the file when it cannot be read
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """An exported checkpoint loaded for evaluation: the model with its encoding installed."""

    path: str
    model: nn.Module
    processor: VLProcessor
    encoding: Encoding
    tokens: TokenIds
    layout: str
    dipe: bool


# -- data --------------------------------------------------------------------------------------------------------


def question_text(question: str, options: Sequence[str] | None) -> str:
    """The user text of a JSON item.

    >>> question_text("What animal?", ["cat", "dog"])
    "What animal?\\nA. cat\\nB. dog\\nAnswer with the option's letter from the given choices directly."
    """
    if options:
        lines = [f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options)]
        return "\n".join([question, *lines, OPTIONS_INSTRUCTION])
    return f"{question}\n{OPEN_INSTRUCTION}"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _check_options(options: Any, where: str) -> list[str] | None:
    if options is None:
        return None
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: `options` must be a non-empty list of strings, got {options!r:.80}")
    option_letters(len(options))
    return options


def item_from_record(record: dict) -> VQAItem:
    """A shard record -> item: the turns before the first assistant turn, whose text is the answer."""
    key = str(record.get("__key__", "?"))
    raw = record.get("json")
    if raw is None:
        raise ValueError(f"--data: record {key!r} has no .json member")
    meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    messages = meta.get("messages") if isinstance(meta, dict) else None
    if not isinstance(messages, list):
        raise ValueError(f"--data: record {key!r} has no `messages` list")
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
    if first is None or first == 0:
        raise ValueError(f"--data: record {key!r} needs a prompt turn followed by an assistant turn")
    prompt = messages[:first]
    names = [
        p["image"]
        for m in prompt
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image"
    ]
    missing = [n for n in names if n not in record]
    return VQAItem(
        key=key,
        messages=prompt,
        answer=_text_of(messages[first]["content"]).strip(),
        options=_check_options(meta.get("options"), f"--data: record {key!r}"),
        images={n: record[n] for n in names if n in record},
        unusable=(
            (
                "missing_image",
                f"{record.get('__url__', 'shard')}: record {key!r} lacks the image members {missing}",
            )
            if missing
            else None
        ),
    )


def item_from_json(entry: dict, base: Path, index: int) -> VQAItem:
    where = f"--data: {base} item {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an item must be an object, got {entry!r:.80}")
    for name in ("question", "answer"):
        if not isinstance(entry.get(name), str):
            raise ValueError(f"{where}: `{name}` must be a string")
    paths = entry.get("images", [entry["image"]] if "image" in entry else [])  # none: text only (skipped)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{where}: `image` must be a path, `images` a list of paths")
    options = _check_options(entry.get("options"), where)
    images, parts, missing, files = {}, [], [], {}
    for i, p in enumerate(paths):
        path = Path(p) if Path(p).is_absolute() else base / p
        name = f"img{i}{path.suffix or '.png'}"
        if path.is_file():
            images[name] = path.read_bytes()
            files[name] = str(path.absolute())
        else:  # skipped and counted (usable_items), naming the file: one bad item never stops the evaluation
            missing.append(str(path.absolute()))
        parts.append({"type": "image", "image": name})
    parts.append({"type": "text", "text": question_text(entry["question"], options)})
    return VQAItem(
        key=str(entry.get("id", index)),
        messages=[{"role": "user", "content": parts}],
        answer=entry["answer"].strip(),
        options=options,
        images=images,
        unusable=("missing_image", f"{', '.join(missing)} not found") if missing else None,
        files=files,
    )


def read_items(data: Sequence[str], limit: int | None = None) -> list[VQAItem]:
    """Items from shards (`.tar`, brace patterns) and JSON/JSONL files, in the order given."""
    import webdataset as wds

    from data.index import expand_urls

    items: list[VQAItem] = []
    for source in data:
        if source.endswith((".json", ".jsonl")):
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"--data: {source!r} is not a file")
            text = path.read_text()
            if source.endswith(".jsonl"):
                entries = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                loaded = json.loads(text)
                entries = loaded.get("items") if isinstance(loaded, dict) else loaded
                if not isinstance(entries, list):
                    raise ValueError(f"--data: {source!r} must hold a list of items or {{'items': [...]}}")
            items += [item_from_json(e, path.parent, i) for i, e in enumerate(entries)]
        else:
            for url in expand_urls(source):
                if not Path(url).is_file():
                    raise ValueError(f"--data: shard {url!r} not found")
                items += [item_from_record(r) for r in wds.tarfile_to_samples()([{"url": url}])]
    if not items:
        raise ValueError(f"--data: no items in {list(data)}")
    return items[:limit] if limit else items


def item_sample(item: VQAItem, sample_processor: SampleProcessor) -> Sample:
    """Prompt + gold answer as a Sample (the answer is supervised: it marks where the prompt ends)."""
    messages = [*item.messages, {"role": "assistant", "content": item.answer}]
    return sample_processor({"__key__": item.key, "json": {"messages": messages}, **item.images})


def prompt_ids(sample: Sample) -> Tensor:
    """The prompt of a Sample: everything before its first supervised token (ends with the generation prompt)."""
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    return sample.input_ids[:first]


# -- model -------------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32, attn_backend: str = "auto"
) -> Checkpoint:
    """An exported checkpoint (`mmrope.from_pretrained`): the stock transformers class + its encoding (and DIPE)
    installed, and its processor."""
    from mmrope.pretrained import from_pretrained

    try:
        model, processor = from_pretrained(path, device=device, dtype=dtype, attn_backend=attn_backend)
    except ValueError as e:
        raise ValueError(f"--checkpoint: {e}") from e
    return Checkpoint(
        str(path), model, processor, processor.encoding, processor.tokens, processor.layout, processor.dipe
    )


def _decode_answer(processor: VLProcessor, new_ids: Tensor) -> str:
    return decode_new(processor.tokenizer, new_ids, processor.special_ids).strip()


def generate_answers(ckpt: Checkpoint, samples: list[Sample], max_new_tokens: int) -> list[str]:
    """Greedy answers for a batch of prompts (left padded, as `greedy_generate` expects)."""
    from mmrope.model.generate import greedy_generate

    device = next(ckpt.model.parameters()).device
    dtype = next(ckpt.model.parameters()).dtype
    prompts = [prompt_ids(s) for s in samples]
    length = max(p.numel() for p in prompts)
    pad = ckpt.processor.special_ids["pad_token_id"]
    ids_BL = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask_BL = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids_BL[row, length - p.numel() :] = p
        mask_BL[row, length - p.numel() :] = 1
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    grids = [s.image_grid_thw for s in samples if len(s.image_grid_thw)]
    out_BN = greedy_generate(
        ckpt.model,
        ckpt.encoding,
        ids_BL.to(device),
        pixel_values=torch.cat(pixels).to(device, dtype) if pixels else None,
        image_grid_thw=torch.cat(grids).to(device) if grids else None,
        attention_mask_BL=mask_BL.to(device),
        max_new_tokens=max_new_tokens,
        tokens=ckpt.tokens,
        layout=ckpt.layout,
        dipe=ckpt.dipe,
    )
    return [_decode_answer(ckpt.processor, row[length:].cpu()) for row in out_BN]


def usable_items(
    items: list[VQAItem], sample_processor: SampleProcessor, *, checkpoint: str
) -> tuple[list[tuple[VQAItem, Sample]], list[dict]]:
    """(item, prompt sample) pairs that can be evaluated, and one skip record per item that cannot: an image file
    or member that is missing (`missing_image`) or cannot be read (`bad_image`), an item without an image
    (`no_image`: no image to put distractors after), or whose prompt has no visual block before the question
    (`no_insertion_point`). Any other record that cannot be processed raises, naming it."""
    usable, skipped = [], []
    for item in items:
        reason, detail = None, ""
        if item.unusable is not None:
            reason, detail = item.unusable
        elif not item.images:
            reason = "no_image"
        else:
            try:
                sample = item_sample(item, sample_processor)
            except SampleError as e:
                if e.reason != "bad_image":
                    raise ValueError(f"--data: item {item.key!r}: {e}") from e
                reason, detail = e.reason, e.detail
                if item.files:  # a JSON item: name the files, not only the member names given to them
                    detail = f"{', '.join(item.files.values())}: {detail}"
            try:
                insertion_index(sample.input_ids, sample.labels, sample_processor.tokens)
            except ValueError as e:
                reason, detail = "no_insertion_point", str(e)
        if reason is None:
            usable.append((item, sample))
        else:
            skipped.append({"checkpoint": checkpoint, "key": item.key, "reason": reason, "detail": detail})
    return usable, skipped


def evaluate(
    ckpt: Checkpoint,
    items: list[VQAItem],
    distances: Sequence[int],
    corpus: str,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 1,
    progress: bool = True,
    on_prediction: Callable[[dict], None] | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows of (checkpoint, distance, n, skipped, accuracy), per-item predictions, skipped items) of one
    checkpoint. `on_prediction` gets every prediction as soon as it is scored (to write it out at once)."""
    from tqdm import tqdm

    # Positions (and DIPE's static ones) are recomputed from the tokens by greedy_generate; no need here.
    sample_processor = SampleProcessor(
        ckpt.processor,
        ckpt.encoding,
        max_tokens=1 << 62,
        layout=ckpt.layout,
        tokens_per_second=tokens_per_second(ckpt.model.config),
    )
    usable, skipped = usable_items(items, sample_processor, checkpoint=ckpt.path)
    if not usable:
        reasons = Counter(s["reason"] for s in skipped)
        raise ValueError(
            f"--data: none of the {len(items)} items can be evaluated (skipped: {dict(reasons)})"
        )
    tokenizer = ckpt.processor.tokenizer
    correct = {d: 0 for d in distances}
    predictions: list[dict] = []
    bar = tqdm(
        total=len(usable) * len(distances), desc=Path(ckpt.path).name, unit="item", disable=not progress
    )
    for start in range(0, len(usable), batch_size):
        chunk = usable[start : start + batch_size]
        for distance in distances:
            ids_N = distractor_ids(tokenizer, corpus, distance)
            keys = [item.key for item, _ in chunk]
            try:
                samples = [
                    insert_distractor(
                        base,
                        ids_N,
                        tokens=ckpt.tokens,
                        encoding=ckpt.encoding,
                        layout=ckpt.layout,
                        dipe=False,
                    )
                    for _, base in chunk
                ]
                answers = generate_answers(ckpt, samples, max_new_tokens)
            except Exception as e:  # name what failed: a run of hours should not end in an anonymous trace
                raise RuntimeError(f"{ckpt.path}: items {keys} at distance {distance}: {e}") from e
            for (item, _), prediction in zip(chunk, answers):
                ok = score(prediction, item.answer, item.options)
                correct[distance] += int(ok)
                record = {
                    "checkpoint": ckpt.path,
                    "distance": distance,
                    "key": item.key,
                    "prediction": prediction,
                    "answer": item.answer,
                    "options": item.options,
                    "correct": ok,
                }
                predictions.append(record)
                if on_prediction is not None:
                    on_prediction(record)
            bar.update(len(chunk))
    bar.close()
    rows = [
        {
            "checkpoint": ckpt.path,
            "distance": d,
            "n": len(usable),
            "skipped": len(skipped),
            "accuracy": correct[d] / len(usable),
        }
        for d in distances
    ]
    return rows, predictions, skipped


# -- outputs -----------------------------------------------------------------------------------------------------


def _distance_label(distance: int) -> str:
    return f"{distance // 1024}K" if distance % 1024 == 0 else str(distance)


def write_csv(rows: list[dict], path: Path) -> None:
    """All rows so far, replacing `path` atomically (it is rewritten after every checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["checkpoint", "distance", "n", "skipped", "accuracy"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs. distance, one curve per checkpoint; distances evenly spaced like the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distances = sorted({r["distance"] for r in rows})
    x_of = {d: i for i, d in enumerate(distances)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for checkpoint in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = sorted((r for r in rows if r["checkpoint"] == checkpoint), key=lambda r: r["distance"])
        ax.plot(
            [x_of[r["distance"]] for r in mine],
            [100 * r["accuracy"] for r in mine],
            marker="o",
            label=checkpoint,
        )
    ax.set_xticks(range(len(distances)), [_distance_label(d) for d in distances])
    ax.set_xlabel("inter-modal distance (distractor tokens between image and question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Long-context VQA (n = {rows[0]['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_distances(text: str) -> list[int]:
    try:
        distances = [int(d) for d in text.split(",") if d.strip()]
    except ValueError as e:
        raise ValueError(f"--distances: expected comma-separated token counts, got {text!r}") from e
    if not distances or any(d < 0 for d in distances) or len(set(distances)) != len(distances):
        raise ValueError(f"--distances: expected distinct counts >= 0, got {text!r}")
    return distances


def run_vqa(
    checkpoints: Sequence[str],
    data: Sequence[str],
    out: str | Path,
    *,
    distances: Sequence[int] = DEFAULT_DISTANCES,
    corpus: Sequence[str] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 1,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn_backend: str = "auto",
    progress: bool = True,
) -> list[dict]:
    """Evaluate every checkpoint at every distance; write vqa.csv, vqa.png and predictions.jsonl under `out`."""
    if not checkpoints:
        raise ValueError("--checkpoint: give at least one exported checkpoint directory")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    torch_device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    if dtype == "auto":
        dtype = "bf16" if torch_device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    items = read_items(data, limit)
    corpus_text = load_corpus(list(corpus) if corpus else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    # Results are written as they come: every prediction at once, the table and plot after every checkpoint,
    # so a long evaluation that stops keeps everything it had computed.
    with (out / "predictions.jsonl").open("w") as f, (out / "skipped.jsonl").open("w") as skipped_file:

        def write_prediction(record: dict) -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()

        for path in checkpoints:
            ckpt = load_checkpoint(path, device=torch_device, dtype=DTYPES[dtype], attn_backend=attn_backend)
            ckpt_rows, _, skipped = evaluate(
                ckpt,
                items,
                distances,
                corpus_text,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                on_prediction=write_prediction,
            )
            skipped_file.writelines(json.dumps(s) + "\n" for s in skipped)
            skipped_file.flush()
            if skipped:
                reasons = ", ".join(
                    f"{k}={n}" for k, n in sorted(Counter(s["reason"] for s in skipped).items())
                )
                print(f"{path}: skipped {len(skipped)} of {len(items)} items ({reasons}; see skipped.jsonl)")
                for skip in [x for x in skipped if x["detail"]][:5]:  # the files to fix, by item id
                    print(f"  skipped item {skip['key']!r}: {skip['reason']}: {skip['detail']}")
            rows += ckpt_rows
            write_csv(rows, out / "vqa.csv")
            plot(rows, out / "vqa.png")
            for r in ckpt_rows:
                print(f"{path}  distance {r['distance']:>6}  n {r['n']}  accuracy {r['accuracy']:.4f}")
            del ckpt
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()  # the next checkpoint gets the memory
    print(f"wrote {out / 'vqa.csv'} and {out / 'vqa.png'}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmrope.eval.vqa", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", action="append", required=True, help="exported checkpoint dir (repeatable)"
    )
    p.add_argument(
        "--data", action="append", required=True, help="shards (.tar, brace patterns) or .json/.jsonl"
    )
    p.add_argument(
        "--distances", default=",".join(map(str, DEFAULT_DISTANCES)), help="comma-separated tokens"
    )
    p.add_argument(
        "--corpus", nargs="+", default=None, help="distractor text files/globs (default: built-in)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1, help="items per generate call (left padded)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument(
        "--attn-backend",
        default="auto",
        help="mmrope attention backend (auto, varlen, sdpa_varlen, sdpa, eager, flex, flash)",
    )
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    run_vqa(
        args.checkpoint,
        args.data,
        args.out,
        distances=parse_distances(args.distances),
        corpus=args.corpus,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        attn_backend=args.attn_backend,
    )


if __name__ == "__main__":
    main()
