"""A LLaVA-like SFT set at real resolution, generated locally: JPEG photos-like images of 256..1600 px per side,
mp4 video files, a LLaVA-format JSON. Used by the data benchmark and the real-resolution training check.

    PYTHONPATH=. .venv/bin/python tests/perf/llava_like.py --out /tmp/llava_like --num-samples 1000
    # -> /tmp/llava_like/{llava.json, media/, shards/ (python -m data.convert output, with indexes)}

The mix: 70% one image, 10% two images, 5% three images, 5% a video file (4-12 s at 10 or 15 fps, 320x240 to
640x360, H.264 through PyAV), 10% text only; 1-4 turns; questions of 5-30 words, answers of 5-300 words.
Images are smooth random blobs + gradients + mild noise, so their JPEG sizes are photo-like (~100-400 KB/MP).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = (
    "the a red blue green image shows circle square left right top bottom large small colour shape person "
    "street table window dog cat car tree sky water light dark next to behind in front of"
).split()


def real_resolution_processor(processor, max_tokens: int):
    """The SampleProcessor the data benchmarks read this set with: MRoPE positions, Qwen2.5-VL layout and video
    sampling, uint8 pixels (expanded on the device), as `data=shards` trains."""
    from data.processing import SampleProcessor
    from data.video import QWEN_VIDEO
    from mmrope.encodings import build

    return SampleProcessor(
        processor, build("mrope"), max_tokens=max_tokens, layout="qwen2_5", video=QWEN_VIDEO, pixels="uint8"
    )


def photo(rng: random.Random, w: int, h: int) -> Image.Image:
    nprng = np.random.default_rng(rng.randrange(1 << 30))
    blobs = Image.fromarray(
        nprng.integers(0, 256, size=(max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    )
    base = np.asarray(blobs.resize((w, h), Image.BICUBIC), dtype=np.int16)
    yy, xx = np.mgrid[0:h, 0:w]
    base = base + ((xx * 64) // max(w, 1))[..., None] - ((yy * 32) // max(h, 1))[..., None]
    base = base + nprng.integers(-6, 7, size=(h, w, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def video(rng: random.Random, path: Path) -> None:
    import av

    seconds, fps = rng.randint(4, 12), rng.choice((10, 15))
    w, h = rng.choice(((320, 240), (480, 360), (640, 360)))
    background = np.asarray(photo(rng, w, h))
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * fps):
            frame = np.roll(background, shift=(3 * i) % w, axis=1).copy()
            x = (i * 7) % max(1, w - 40)
            frame[h // 3 : h // 3 + 40, x : x + 40] = (255, 40, 40)  # a red square crossing the scene
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_llava_like(
    out: Path, num_samples: int, seed: int = 0, min_side: int = 256, max_side: int = 1600
) -> Path:
    """Write media + llava.json under `out`; returns the JSON path (image root: out / "media")."""
    rng = random.Random(seed)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        kind = rng.random()
        rec: dict = {"id": f"s{i:06d}"}
        placeholder = ""
        if kind < 0.9:  # images
            num_images = 1 if kind < 0.7 else (2 if kind < 0.8 else (3 if kind < 0.85 else 0))
            if num_images:
                names = []
                for j in range(num_images):
                    name = f"{i:06d}_{j}.jpg"
                    size = (rng.randint(min_side, max_side), rng.randint(min_side, max_side))
                    photo(rng, *size).save(media / name, format="JPEG", quality=85)
                    names.append(name)
                rec["image"] = names if len(names) > 1 else names[0]
                placeholder = "<image>\n" * num_images
            else:  # a video file
                name = f"{i:06d}.mp4"
                video(rng, media / name)
                rec["video"] = name
                placeholder = "<video>\n"
        turns = []
        for t in range(rng.randint(1, 4)):
            turns += [
                {"from": "human", "value": (placeholder if t == 0 else "") + text(rng, 5, 30) + "?"},
                {"from": "gpt", "value": text(rng, 5, 300) + "."},
            ]
        rec["conversations"] = turns
        records.append(rec)
    path = out / "llava.json"
    path.write_text(json.dumps(records))
    return path


def build(out: Path, num_samples: int, seed: int = 0, processor: str | None = None) -> list[str]:
    """Generate the set and convert it to shards (with indexes); returns the shard paths."""
    from data.convert import convert

    source = make_llava_like(out, num_samples, seed)
    convert(
        [source], out / "media", out / "shards", max_shard_samples=250, progress=False, processor=processor
    )
    return sorted(str(p) for p in (out / "shards").glob("shard-*.tar"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--processor", default=None, help="tokenizer + image processor dir: token counts in the indexes"
    )
    args = ap.parse_args()
    shards = build(args.out, args.num_samples, args.seed, args.processor)
    print(f"{len(shards)} shards under {args.out / 'shards'}")


if __name__ == "__main__":
    main()
