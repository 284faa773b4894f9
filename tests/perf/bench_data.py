"""Data-path benchmark (not a test) at real resolution with the paper's loader settings: peak RSS per DataLoader
worker, samples/s and tokens/s per worker, and packing efficiency planned from the shard indexes.

    PYTHONPATH=. .venv/bin/python tests/perf/bench_data.py [--num-samples 1000] [--rows 12] [--workers 4]

Data: tests/perf/llava_like.py (JPEG images of 256..1600 px per side, some two/three-image samples, 5% mp4 video
files, 10% text only), converted with `python -m data.convert` (shard indexes with token counts). Loader: the
`data=shards` settings (max_pixels 1003520, Qwen2.5-VL video sampling, 32768-token rows, 64 slots, 4 workers;
`--slots auto` for the derived count). Peak RSS is the kernel's high-water mark
(VmHWM) of each worker process, shared pages (torch, the parent's heap) included. Throughput is per worker:
a worker's samples over the wall time, and over its own CPU time (the machine's cores may be shared).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from data import index as shard_index
from data.loader import PackedRowStream, ResumableLoader
from data.processing import SampleError
from data.processor import build_tiny_processor
from data.synthetic import corpus
from tests.perf.llava_like import build as build_shards
from tests.perf.llava_like import real_resolution_processor

GIB = 1 << 30


def _status(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu_seconds(pid: int) -> float:
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run(shards, proc, *, workers: int, rows: int, slots: int | str, max_tokens: int) -> dict:
    stream = PackedRowStream(shards, proc, max_tokens=max_tokens, seed=0)
    stream.fit_slots(slots, workers)
    loader = ResumableLoader(stream, workers)
    tic = time.perf_counter()
    got = [next(loader) for _ in range(rows)]
    wall = time.perf_counter() - tic
    pids = [w.pid for w in loader._it._workers]  # DataLoader's worker processes
    peak = [_status(pid, "VmHWM") for pid in pids]
    cpu = [_cpu_seconds(pid) for pid in pids]
    del loader
    per_worker = [got[k::workers] for k in range(workers)]
    samples = [sum(r["num_samples"] for r in rs) for rs in per_worker]
    tokens = [sum(int(r["input_ids"].numel()) for r in rs) for rs in per_worker]
    pixel_mb = max(r.get("pixel_values", r["input_ids"]).numel() for r in got) / 2**20
    return {
        "wall": wall,
        "peak": peak,
        "samples": samples,
        "tokens": tokens,
        "cpu": cpu,
        "videos": sum(len(r["videos"]) for r in got),
        "images": sum(len(r["image_grid_thw"]) for r in got),
        "max_row_pixel_mb": pixel_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=12, help="rows per run (over all workers)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--slots", default="64", help="data.num_slots: an int or auto")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--data", type=Path, default=None, help="reuse a llava_like folder (else a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        processor = build_tiny_processor(
            root / "proc", corpus(), min_pixels=3136, max_pixels=1003520, patch_size=14, merge_size=2
        )
        shards = sorted(str(p) for p in (root / "shards").glob("shard-*.tar"))
        if not shards:
            tic = time.perf_counter()
            shards = build_shards(root, args.num_samples, processor=str(root / "proc"))
            print(f"generated + converted {args.num_samples} samples: {time.perf_counter() - tic:.0f} s")
        proc = real_resolution_processor(processor, args.max_tokens)
        # Packing planned from the token counts the loader plans with (the index's, else the record's JSON and
        # media sizes: an index written by the converter holds no counts for this processor); nothing decoded.
        planner = PackedRowStream(shards, proc, max_tokens=args.max_tokens, seed=0)
        lengths, ok = 0, []
        for url in shards:
            for i in range(len(planner.index(url))):
                lengths += 1
                try:
                    ok.append(planner.plan_tokens(url, i))
                except SampleError:  # too long or unplannable: the loader skips it too
                    continue
        rng = random.Random(0)
        resampled = [rng.choice(ok) for _ in range(20_000)]
        num_rows = shard_index.plan_rows(resampled, args.max_tokens)
        print(
            f"data: {len(shards)} shards, {lengths} records ({len(ok)} trainable), mean {sum(ok) / len(ok):.0f} tokens, max {max(ok)}; "
            f"packing planned from the index (20k resampled lengths, 8 open rows): "
            f"{sum(resampled) / (num_rows * args.max_tokens):.2%} of {num_rows} rows x {args.max_tokens}"
        )
        slots = args.slots if args.slots == "auto" else int(args.slots)
        r = run(shards, proc, workers=args.workers, rows=args.rows, slots=slots, max_tokens=args.max_tokens)
        print(
            f"slots {args.slots}: {args.rows} rows of {args.max_tokens} tokens ({r['images']} images, "
            f"{r['videos']} videos; largest row {r['max_row_pixel_mb']:.0f} MB of uint8 pixels) in {r['wall']:.0f} s"
        )
        for k in range(args.workers):
            print(
                f"  worker {k}: peak RSS {r['peak'][k] / GIB:.2f} GiB; {r['samples'][k]} samples, "
                f"{r['tokens'][k]:,} tokens: {r['samples'][k] / r['wall']:.2f} samples/s, "
                f"{r['tokens'][k] / r['wall']:,.0f} tokens/s (wall); {r['samples'][k] / r['cpu'][k]:.2f} samples/s, "
                f"{r['tokens'][k] / r['cpu'][k]:,.0f} tokens/s per CPU second"
            )
        print(f"main process peak RSS: {_status(__import__('os').getpid(), 'VmHWM') / GIB:.2f} GiB")
        print(
            f"peak RSS per worker: max {max(r['peak']) / GIB:.2f} GiB; goal <= 2 GiB: "
            f"{'met' if max(r['peak']) <= 2 * GIB else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
