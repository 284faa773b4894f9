"""Data-path benchmark (not a test): samples/s per worker for read + decode + process + pack, and packing
efficiency (non-pad fraction of rows) at max_tokens 32768, on a LLaVA-like mix.

    PYTHONPATH=. .venv/bin/python tests/perf/bench_data.py [--num-samples 300] [--max-tokens 32768]

The mix: JPEG photos-like images of 200..1200 px per side (noise + gradients, so JPEG sizes are realistic),
80% one image, 10% two images, 10% text only; 1-4 turns; answers of 5..300 words. Resized by the Qwen
min/max pixel defaults of configs/data/shards.yaml (max 1003520 px -> up to 1280 visual tokens per image).
Throughput is one consumer (= one DataLoader worker). Packing efficiency is measured on the rows the real
stream produced, and, for a stable figure, on 20k lengths resampled from the processed samples.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from data.loader import PackedRowStream, ResumableLoader
from data.packing import BestFitPacker
from data.processing import Sample, SampleProcessor
from data.processor import build_tiny_processor
from data.synthetic import corpus
from mmrope.encodings import build

WORDS = (
    "the a red blue green image shows circle square left right top bottom large small colour shape".split()
)


def _jpeg(rng: random.Random, w: int, h: int) -> bytes:
    nprng = np.random.default_rng(rng.randrange(1 << 30))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w, 1)), (yy * 255 // max(h, 1)), ((xx + yy) % 256)], -1)
    noise = nprng.integers(0, 40, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_shards(out: Path, num_samples: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "bench-%04d.tar"), maxcount=100, verbose=0) as sink:
        for i in range(num_samples):
            kind = rng.random()
            num_images = 0 if kind < 0.1 else (2 if kind < 0.2 else 1)
            record = {"__key__": f"{i:08d}"}
            parts = []
            for j in range(num_images):
                record[f"img{j}.jpg"] = _jpeg(rng, rng.randint(200, 1200), rng.randint(200, 1200))
                parts.append({"type": "image", "image": f"img{j}.jpg"})
            messages = []
            for turn in range(rng.randint(1, 4)):
                q = _text(rng, 5, 30)
                content = [*parts, {"type": "text", "text": q}] if turn == 0 and parts else q
                messages += [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": _text(rng, 5, 300)},
                ]
            record["json"] = json.dumps({"messages": messages}).encode()
            sink.write(record)
    return sorted(str(p) for p in out.glob("bench-*.tar"))


class _Len(Sample):
    """A stand-in with only a length, for packing many resampled lengths quickly."""

    def __init__(self, n: int, key: str):
        self.key, self._n = key, n

    @property
    def num_tokens(self) -> int:
        return self._n


def efficiency(lengths: list[int], max_tokens: int, num_open: int) -> tuple[float, float]:
    """(efficiency over all rows, over rows completed before the final flush)."""
    packer = BestFitPacker(max_tokens, num_open)
    done = [r for i, n in enumerate(lengths) for r in packer.add(_Len(n, str(i)))]
    tail = packer.flush()

    def eff(rows):
        return sum(s.num_tokens for r in rows for s in r) / (max_tokens * len(rows)) if rows else float("nan")

    return eff(done + tail), eff(done)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-samples", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--num-open-rows", type=int, nargs="+", default=[8, 16, 32])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        shards = make_shards(tmp / "shards", args.num_samples)
        print(
            f"generated {args.num_samples} samples in {len(shards)} shards: {time.perf_counter() - t0:.1f} s"
        )
        processor = build_tiny_processor(
            tmp / "proc",
            corpus(),
            min_pixels=3136,
            max_pixels=1003520,
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        )
        proc = SampleProcessor(processor, build("mrope"), max_tokens=args.max_tokens, layout="qwen2_5")
        stream = PackedRowStream(shards, proc, max_tokens=args.max_tokens, epochs=1, shuffle_buffer=64)
        t0 = time.perf_counter()
        rows = list(ResumableLoader(stream, 0))
        dt = time.perf_counter() - t0
        num = sum(r["num_samples"] for r in rows)
        tokens = sum(int(r["input_ids"].numel()) for r in rows)
        print(
            f"read+decode+process+pack: {num} samples, {tokens} tokens, {len(rows)} rows in {dt:.1f} s -> "
            f"{num / dt:.1f} samples/s/worker, {tokens / dt:,.0f} tokens/s/worker"
        )
        full = [r for r in rows[:-8]]  # rows before the final flush (at most num_open_rows=8 come from it)
        if full:
            eff = sum(int(r["input_ids"].numel()) for r in full) / (args.max_tokens * len(full))
            print(f"packing efficiency of the stream's rows (excluding the final flush): {eff:.2%}")
        lengths = []
        for r in rows:
            cu = r["cu_seqlens"].tolist()
            lengths += [b - a for a, b in zip(cu, cu[1:])]
        print(f"sample length: mean {np.mean(lengths):.0f}, p50 {np.median(lengths):.0f}, max {max(lengths)}")
        rng = random.Random(0)
        resampled = [rng.choice(lengths) for _ in range(20_000)]
        for num_open in args.num_open_rows:
            all_rows, steady = efficiency(resampled, args.max_tokens, num_open)
            print(
                f"packing efficiency, 20k resampled lengths, num_open_rows={num_open}: "
                f"{steady:.2%} (steady state), {all_rows:.2%} (including the final flush)"
            )


if __name__ == "__main__":
    main()
