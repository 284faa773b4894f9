"""Benchmark (not a test): items/s of the lmms-eval plugin's model side (`mmrope.eval.chat.ChatModel`) on CPU.

Two tiny exports (hidden 128, one head, untied random head, so answers run to `max_new_tokens`), `rope=mrope` and
`rope=videorope rope.dipe=true`, answer the local shapes tasks (`mmrope.eval.local_tasks`: 8 multiple-choice and
8 short-answer items, one of them a video, one with two images) with the tasks' generation settings, at batch
size 1 and 4. One warm-up pass first; times are the median of `--repeats` passes. lmms-eval's own start-up
(~8 s of imports and task loading per invocation) is not included: see tests/perf/RESULTS.md.

    python tests/perf/bench_lmms_plugin.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def one_pass(chat, items: list, batch_size: int) -> float:
    """Seconds to answer every item, batched per task as lmms-eval does (one batch = one generation setting)."""
    tic = time.perf_counter()
    for max_new in (8, 16):
        group = [it for it in items if it[1]["max_new_tokens"] == max_new]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            chat.generate([c for c, _ in chunk], **chunk[0][1])
    return time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from data.processor import build_tiny_processor
    from data.synthetic import corpus
    from mmrope.eval.chat import ChatModel, gen_settings
    from mmrope.eval.local_tasks import doc_to_text, doc_to_visual, write_local_tasks
    from tests.integration.test_benchmarks import _export_untied

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench_lmms_"))
    processor = build_tiny_processor(work / "proc", corpus(), min_pixels=56 * 56, max_pixels=140 * 140)
    tasks = write_local_tasks(work / "tasks", num_items=8)
    items = []
    for task, max_new in (("mmrope_shapes_mc", 8), ("mmrope_shapes_qa", 16)):
        for line in (tasks / f"{task}.jsonl").read_text().splitlines():
            doc = json.loads(line)
            parts = [
                {"type": "video" if isinstance(v, str) else "image", "url": v} for v in doc_to_visual(doc)
            ]
            conv = [{"role": "user", "content": [*parts, {"type": "text", "text": doc_to_text(doc)}]}]
            items.append((conv, gen_settings({"max_new_tokens": max_new, "temperature": 0, "until": ["\n"]})))
    print(f"{len(items)} items; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| export | batch size | items/s | s per pass |")
    print("| --- | ---: | ---: | ---: |")
    for name, encoding, dipe in (("mrope", "mrope", False), ("videorope_dipe", "videorope", True)):
        chat = ChatModel(_export_untied(work / name, processor, encoding, dipe, seed=0))
        for batch_size in (1, 4):
            one_pass(chat, items, batch_size)  # warm-up
            seconds = statistics.median(one_pass(chat, items, batch_size) for _ in range(args.repeats))
            print(f"| {name} | {batch_size} | {len(items) / seconds:.2f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
