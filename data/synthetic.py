"""A small generated SFT set: images of simple shapes, conversations whose answers depend on the image.

Each sample is a webdataset record in the project's shard format (data/README.md, "The data path"):
  `<key>.json`   {"messages": [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                                           {"type": "text", "text": "What shape is this?"}]},
                               {"role": "assistant", "content": "a red circle"}, ...]}
  `<key>.img0.png` (and img1.png, ... for multi-image samples) referenced by the "image" fields.

Writing is deterministic in the seed and atomic per shard set (written to a temp dir, then renamed), so an
interrupted generation never leaves a half-written set that later runs would trust. An inter-process file lock
(`<out_dir>.lock`) makes processes that start at once (a parallel sweep on a fresh machine) generate the set
once: the others wait, then reuse it.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from filelock import FileLock
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SYNTHETIC_FORMAT = 2  # bump when the generator changes: cached sets of another format are regenerated


def draw_shape(
    shape: str, colour: str, background: str, size: tuple[int, int], position: str, scale: float
) -> Image.Image:
    w, h = size
    img = Image.new("RGB", (w, h), COLOURS[background])
    d = ImageDraw.Draw(img)
    r = int(min(w, h) * scale / 2)
    cx = {"left": w // 4, "right": 3 * w // 4}.get(position.split()[-1], w // 2)
    cy = {"top": h // 4, "bottom": 3 * h // 4}.get(position.split()[0], h // 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        t = max(1, r // 3)
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _random_image(rng: random.Random, min_size: int, max_size: int) -> tuple[Image.Image, dict]:
    colour, background = rng.sample(sorted(COLOURS), 2)
    facts = {
        "shape": rng.choice(SHAPES),
        "colour": colour,
        "background": background,
        "position": rng.choice(POSITIONS),
        "scale": rng.uniform(0.3, 0.45),
    }
    size = (rng.randint(min_size, max_size), rng.randint(min_size, max_size))
    img = draw_shape(facts["shape"], colour, background, size, facts["position"], facts["scale"])
    return img, facts


def _qa(rng: random.Random, f: dict) -> tuple[str, str]:
    kind = rng.choice(("shape", "colour", "background", "position", "describe"))
    if kind == "shape":
        return "What shape is in the image?", f"A {f['shape']}."
    if kind == "colour":
        return f"What colour is the {f['shape']}?", f"It is {f['colour']}."
    if kind == "background":
        return "What colour is the background?", f"The background is {f['background']}."
    if kind == "position":
        return f"Where is the {f['shape']}?", f"In the {f['position']}."
    return (
        "Describe the image.",
        f"A {f['colour']} {f['shape']} in the {f['position']} on a {f['background']} background.",
    )


def make_sample(rng: random.Random, index: int, min_size: int, max_size: int) -> dict:
    """One record: 1 image (78%), 2 images (7%), a 4-frame video (5%) or text only (10%), 1-3 turns."""
    kind = rng.random()
    record: dict = {"__key__": f"{index:08d}"}
    messages: list[dict] = []
    if kind < 0.1:  # text only: arithmetic, no image
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            messages += [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
    elif kind < 0.15:  # a short video: the shape moves left or right, only the frame order tells which
        colour, background = rng.sample(sorted(COLOURS), 2)
        shape, rightwards = rng.choice(SHAPES), rng.random() < 0.5
        size = (rng.randint(min_size, max_size), rng.randint(min_size, max_size))
        order = (
            ("bottom left", "center", "bottom right")
            if rightwards
            else ("bottom right", "center", "bottom left")
        )
        frames = [draw_shape(shape, colour, background, size, pos, 0.3) for pos in (*order, order[-1])]
        names = [f"vid0.f{i:03d}.png" for i in range(len(frames))]
        record.update({n: _png(f) for n, f in zip(names, frames)})
        direction = "to the right" if rightwards else "to the left"
        messages += [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": names, "fps": 2.0},
                    {"type": "text", "text": f"Which way does the {shape} move?"},
                ],
            },
            {"role": "assistant", "content": f"The {colour} {shape} moves {direction}."},
        ]
    elif kind < 0.22:  # two images: compare them
        (img0, f0), (img1, f1) = (_random_image(rng, min_size, max_size) for _ in range(2))
        record["img0.png"], record["img1.png"] = _png(img0), _png(img1)
        same = "the same shape" if f0["shape"] == f1["shape"] else "different shapes"
        messages += [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "img0.png"},
                    {"type": "image", "image": "img1.png"},
                    {"type": "text", "text": "Do the two images show the same shape?"},
                ],
            },
            {"role": "assistant", "content": f"They show {same}: a {f0['shape']} and a {f1['shape']}."},
        ]
    else:
        img, facts = _random_image(rng, min_size, max_size)
        record["img0.png"] = _png(img)
        for turn in range(rng.randint(1, 3)):
            q, a = _qa(rng, facts)
            content = (
                [{"type": "image", "image": "img0.png"}, {"type": "text", "text": q}] if turn == 0 else q
            )
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    record["json"] = json.dumps({"messages": messages}).encode()
    return record


def corpus(num_lines: int = 3000, seed: int = 1) -> Iterator[str]:
    """Text for training the tiny tokenizer: the same phrase distribution as the samples, no images."""
    rng = random.Random(seed)
    for i in range(num_lines):
        sample = make_sample(rng, i, 8, 8)
        for m in json.loads(sample["json"])["messages"]:
            c = m["content"]
            yield c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)
    yield "system user assistant You are a helpful assistant."


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    *,
    num_samples: int,
    samples_per_shard: int,
    min_image_size: int,
    max_image_size: int,
    seed: int,
) -> list[str]:
    """Write the set once (atomically) and return the shard paths; an existing complete set is reused."""
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.json"
    settings = {
        "format": SYNTHETIC_FORMAT,
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "min_image_size": min_image_size,
        "max_image_size": max_image_size,
        "seed": seed,
    }

    def published() -> list[str] | None:
        if manifest.exists():
            meta = json.loads(manifest.read_text())
            if meta["settings"] == settings:
                return [str(out_dir / s) for s in meta["shards"]]
        return None

    if (shards := published()) is not None:
        return shards
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.with_name(out_dir.name + ".lock"))):
        if (shards := published()) is not None:  # another process generated it while we waited
            return shards
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted generation (we hold the lock)
        tmp.mkdir()
        rng = random.Random(seed)
        np.random.seed(seed)
        from tqdm import tqdm

        with wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
            for i in tqdm(range(num_samples), desc="synthetic shards", unit="sample", leave=False):
                sink.write(make_sample(rng, i, min_image_size, max_image_size))
        names = sorted(p.name for p in tmp.glob("shard-*.tar"))
        counts = {s: min(samples_per_shard, num_samples - i * samples_per_shard) for i, s in enumerate(names)}
        meta = {"settings": settings, "shards": names, "counts": counts}
        (tmp / "manifest.json").write_text(json.dumps(meta))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    return [str(out_dir / s) for s in names]
