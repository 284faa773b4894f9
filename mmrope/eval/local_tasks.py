"""Small offline lmms-eval tasks built from the synthetic shapes (`data.synthetic`): the whole benchmark path on CPU.

    python -m mmrope.eval.local_tasks eval_tasks/            # writes the tasks (a second call reuses them)
    .venv-eval/bin/lmms-eval --model mmrope --model_args pretrained=exported/mrope \\
        --tasks mmrope_shapes_mc,mmrope_shapes_qa --include_path eval_tasks --output_path results/

Two tasks in lmms-eval's own format (task YAML with `dataset_path: json` + a local JSONL + image files, a
`utils.py` with `doc_to_visual` / `doc_to_text` / `process_results`), read from disk only:
- `mmrope_shapes_mc` (multiple choice): "What shape is in the image?" with the four shapes as options A-D,
  scored by the option letter (`mmrope.eval.scoring`);
- `mmrope_shapes_qa` (short answer): one video item first (an mp4 of a shape moving left or right: "Which way
  does the <shape> move?" left/right), one two-image item ("Do the two images show the same shape?" yes/no),
  then "What colour is the <shape>?" items; scored by the normalised string match.
Prompts are the LLaVA evaluation prompts of `mmrope.eval.vqa.question_text`. Metric: `accuracy` (mean).
The data-file paths in the YAMLs are absolute: move the folder and write it again.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data.synthetic import COLOURS, SHAPES, draw_shape

TASKS = ("mmrope_shapes_mc", "mmrope_shapes_qa")
FORMAT = 2  # bump when the generated files change: an older folder is rewritten

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  until: ["\\n"]
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

UTILS = '''"""lmms-eval hooks of the mmrope local tasks: see mmrope/eval/local_tasks.py."""

from mmrope.eval.local_tasks import doc_to_text, doc_to_visual, process_results  # noqa: F401
'''


# -- lmms-eval hooks (utils.py of the task folder re-exports them) -------------------------------------------------
def doc_to_visual(doc: dict) -> list:
    """PIL images for the image items, the file path for a video (lmms-eval's convention for videos)."""
    from PIL import Image

    visuals = []
    for path in doc.get("images") or []:
        with Image.open(path) as img:
            visuals.append(img.convert("RGB"))
    if doc.get("video"):
        visuals.append(doc["video"])
    return visuals


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    from mmrope.eval.vqa import question_text

    return question_text(doc["question"], doc.get("options"))


def process_results(doc: dict, results: list[str]) -> dict:
    from mmrope.eval.scoring import score

    return {"accuracy": float(score(results[0], doc["answer"], doc.get("options")))}


# -- writing the tasks ------------------------------------------------------------------------------------------------
def _video_mp4(path: Path, shape: str, colour: str, background: str, rightwards: bool, size: int) -> None:
    """A 2 s clip at 4 fps (8 frames): the shape moves from one bottom corner to the other."""
    import av

    order = (
        ("bottom left", "center", "bottom right") if rightwards else ("bottom right", "center", "bottom left")
    )
    frames = [
        draw_shape(shape, colour, background, (size, size), pos, 0.3) for pos in order for _ in range(3)
    ]
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=4, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for frame in frames[:8]:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _items(root: Path, num_items: int, rng: random.Random, min_size: int, max_size: int) -> dict[str, list]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)

    def image(name: str) -> tuple[str, dict]:
        colour, background = rng.sample(sorted(COLOURS), 2)
        facts = {"shape": rng.choice(SHAPES), "colour": colour, "background": background}
        size = (rng.randint(min_size, max_size), rng.randint(min_size, max_size))
        path = root / "images" / f"{name}.png"
        draw_shape(facts["shape"], colour, background, size, "center", rng.uniform(0.3, 0.45)).save(path)
        return str(path.resolve()), facts

    mc, qa = [], []
    for i in range(num_items):
        path, f = image(f"mc{i}")
        options = rng.sample(SHAPES, len(SHAPES))
        mc.append(
            {"id": f"mc{i}", "images": [path], "question": "What shape is in the image?", "options": options,
             "answer": f["shape"]}
        )  # fmt: skip
    # the video and the two-image item first, so that `--limit 2` keeps them
    colour, background = rng.sample(sorted(COLOURS), 2)
    shape, rightwards = rng.choice(SHAPES), rng.random() < 0.5
    video = root / "videos" / "moving.mp4"
    _video_mp4(video, shape, colour, background, rightwards, size=max(max_size // 28 * 28, 56))
    qa.append(
        {"id": "video", "video": str(video.resolve()), "question": f"Which way does the {shape} move?",
         "answer": "right" if rightwards else "left"}
    )  # fmt: skip
    (p0, f0), (p1, f1) = image("pair0"), image("pair1")
    qa.append(
        {"id": "pair", "images": [p0, p1], "question": "Do the two images show the same shape?",
         "answer": "yes" if f0["shape"] == f1["shape"] else "no"}
    )  # fmt: skip
    for i in range(max(num_items - 2, 1)):
        path, f = image(f"qa{i}")
        qa.append(
            {"id": f"qa{i}", "images": [path], "question": f"What colour is the {f['shape']}?", "answer": f["colour"]}
        )  # fmt: skip
    return {"mmrope_shapes_mc": mc, "mmrope_shapes_qa": qa}


def write_local_tasks(
    out_dir: str | Path, *, num_items: int = 8, seed: int = 0, min_size: int = 56, max_size: int = 140
) -> Path:
    """Write both tasks into `out_dir` (an `--include_path` folder); reused when written with the same settings."""
    if num_items < 1:
        raise ValueError(f"num_items: must be >= 1, got {num_items}")
    root = Path(out_dir).resolve()
    settings = {
        "format": FORMAT,
        "num_items": num_items,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
    }
    stamp = root / "mmrope_tasks.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {**settings, "root": str(root)}:
        return root
    root.mkdir(parents=True, exist_ok=True)
    items = _items(root, num_items, random.Random(seed), min_size, max_size)
    for task, rows in items.items():
        data = root / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        max_new_tokens = 8 if task.endswith("mc") else 16
        (root / f"{task}.yaml").write_text(
            TASK_YAML.format(task=task, data=data, max_new_tokens=max_new_tokens, version=FORMAT)
        )
    (root / "utils.py").write_text(UTILS)
    stamp.write_text(json.dumps({**settings, "root": str(root)}))
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mmrope.eval.local_tasks", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("out_dir", help="folder for the task YAMLs, data and utils.py (lmms-eval --include_path)")
    p.add_argument("--num-items", type=int, default=8, help="items of the multiple-choice task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = write_local_tasks(args.out_dir, num_items=args.num_items, seed=args.seed)
    print(f"wrote {', '.join(TASKS)} to {root} (lmms-eval --include_path {root})")


if __name__ == "__main__":
    main()
