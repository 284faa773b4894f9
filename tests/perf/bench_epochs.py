"""Epoch benchmark (not a test): packing fill, records repeated inside a row, and epoch coverage of the loader's
first rows, read through the public loader API (rows are really read and processed).

    PYTHONPATH=. .venv/bin/python tests/perf/bench_epochs.py --data synthetic --max-tokens 8192 --rows 12
    PYTHONPATH=. .venv/bin/python tests/perf/bench_epochs.py --data /tmp/llava_like --max-tokens 32768 --rows 48

`--data synthetic`: the default generated set (3000 records in 6 shards, images of 56..140 px) written under a
temporary folder. A folder: a tests/perf/llava_like.py set (`<folder>/proc` processor, `<folder>/shards`).
Loader: the `data=shards` settings (max_pixels 1003520, `auto` slots unless `--slots`, seed 0). `--plan-only`: the
rows as planned from the indexes' token counts, nothing read or processed (the rows' records, order and token
counts are the same; the fill of a long run at real resolution in seconds).
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from data import index as shard_index
from data import loader as loader_module
from data.loader import PackedRowStream, ResumableLoader
from data.processor import build_tiny_processor, load_processor
from data.synthetic import corpus, write_synthetic_shards
from tests.perf.llava_like import real_resolution_processor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--rows", type=int, default=12, help="rows to read (over all workers)")
    ap.add_argument(
        "--slots", default="auto", help="data.num_slots: an int, or auto (the loader of issue 24)"
    )
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--shuffle-buffer", type=int, default=1024, help="where the loader still has one")
    ap.add_argument("--plan-only", action="store_true", help="planned rows only: nothing read or processed")
    ap.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="with --plan-only: ViT balance over this many data-parallel ranks (one row each per step): "
        "max/mean ViT patches per rank per step, patches from the planned visual tokens (x merge_size^2)",
    )
    ap.add_argument("--vit-balance", type=float, default=None, help="data.vit_balance (None: the default)")
    ap.add_argument("--open-rows", type=int, default=None, help="data.num_open_rows (None: the default)")
    args = ap.parse_args()
    visual: dict[str, int] = {}  # record -> planned visual tokens

    def visual_tokens(slot, ref) -> int:
        if ref.key not in visual:
            idx, proc = slot.s.index(ref.url), slot.s.processor
            raw = shard_index.read_member(idx, ref.record, "json")
            ids = proc._plan(proc._messages(raw), idx.media_sizes(ref.record), False).input_ids
            visual[ref.key] = int(
                ((ids == proc.tokens.image_token_id) | (ids == proc.tokens.video_token_id)).sum()
            )
        return visual[ref.key]

    # --plan-only: a row of references as the loader would read them (works on the loader before 24 too)
    if args.plan_only:

        def planned(slot, refs):
            slot.counts.clear()
            slot.by_shard.clear()
            return {
                "sample_keys": [r.key for r in refs],
                "num_samples": len(refs),
                "input_ids": torch.empty(1, sum(r.num_tokens for r in refs)),
                **({"sample_epochs": [r.epoch for r in refs]} if hasattr(refs[0], "epoch") else {}),
                **({"visual_tokens": sum(visual_tokens(slot, r) for r in refs)} if args.ranks else {}),
            }

        loader_module._Slot._row = planned
    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "synthetic":
            root = Path(tmp)
            processor = build_tiny_processor(
                root / "proc", corpus(), min_pixels=3136, max_pixels=1003520, patch_size=14, merge_size=2
            )
            shards = write_synthetic_shards(
                root / "synthetic",
                num_samples=3000,
                samples_per_shard=500,
                min_image_size=56,
                max_image_size=140,
                seed=0,
            )
        else:
            root = Path(args.data)
            processor = load_processor(root / "proc")
            shards = sorted(str(p) for p in (root / "shards").glob("shard-*.tar"))
        proc = real_resolution_processor(processor, args.max_tokens)
        kw = {"max_tokens": args.max_tokens, "seed": 0, "index_cache_dir": tmp}
        if args.vit_balance is not None:
            kw["vit_balance"] = args.vit_balance or None
        if args.open_rows is not None:
            kw["num_open_rows"] = args.open_rows
        if "shuffle_buffer" in inspect.signature(PackedRowStream).parameters:  # the loader before issue 24
            kw["shuffle_buffer"] = args.shuffle_buffer
        stream = PackedRowStream(
            shards, proc, num_slots=None if args.slots == "auto" else int(args.slots), **kw
        )
        if hasattr(stream, "fit_slots"):  # the loader of issue 24: auto slots, refused if they do not fit
            stream.fit_slots(args.slots if args.slots == "auto" else int(args.slots), args.workers)
        total = sum(stream.lengths.values())
        loader = ResumableLoader(stream, args.workers)
        tic = time.perf_counter()
        rows = [next(loader) for _ in range(args.rows)]
        wall = time.perf_counter() - tic
    samples = sum(r["num_samples"] for r in rows)
    tokens = sum(int(r["input_ids"].numel()) for r in rows)
    repeats = sum(r["num_samples"] - len(set(r["sample_keys"])) for r in rows)
    worst = max(rows, key=lambda r: r["num_samples"] - len(set(r["sample_keys"])))
    seen = Counter(k for r in rows for k in r["sample_keys"])
    print(
        f"{len(shards)} shards, {total} records; slots {loader.num_slots}; {len(rows)} rows of {args.max_tokens} "
        f"tokens read in {wall:.0f} s"
    )
    print(
        f"  samples {samples}, distinct records {len(seen)} ({samples / total:.2f} of one pass over the data)"
    )
    print(
        f"  repeats of a record already in the same row: {repeats} of {samples} samples"
        f" (worst row: {worst['num_samples']} samples, {len(set(worst['sample_keys']))} distinct)"
    )
    print(f"  records seen more than once in these rows: {sum(1 for n in seen.values() if n > 1)}")
    print(
        f"  packing fill: {tokens / (len(rows) * args.max_tokens):.2%} of {len(rows)} rows x {args.max_tokens}"
    )
    if args.ranks:
        merge = processor.image_processor.merge_size**2
        ratios = []
        for step in range(len(rows) // args.ranks):
            patches = [r["visual_tokens"] * merge for r in rows[step * args.ranks : (step + 1) * args.ranks]]
            ratios.append(max(patches) / max(1e-9, sum(patches) / len(patches)))
        ratios.sort()
        print(
            f"  ViT patches per rank per step over {args.ranks} ranks x 1 row, {len(ratios)} steps: max/mean "
            f"median {ratios[len(ratios) // 2]:.2f}, mean {sum(ratios) / len(ratios):.2f}, worst {ratios[-1]:.2f}"
        )
    if "sample_epochs" in rows[0]:
        epochs = Counter(e for r in rows for e in r["sample_epochs"])
        print(f"  samples per epoch (0 = the first pass): {dict(sorted(epochs.items()))}")


if __name__ == "__main__":
    main()
