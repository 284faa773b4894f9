"""Benchmark (not a test): chunked linear cross-entropy vs the plain full-logits path on CPU.

For each size and path a fresh subprocess builds the inputs, runs forward+backward a few times and reports the
median time and its peak resident memory above the baseline taken after the inputs exist (ru_maxrss, so what
the OS really gave the process, allocator caching included).

    python tests/perf/bench_loss.py                       # default sizes, bf16, 25% supervised
    python tests/perf/bench_loss.py --sizes 4096,1024,151936 --dtype float32 --supervised 1.0
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# N,D,V. The full path at 2048 x 151936 in bf16 peaks ~4 GB above its inputs; keep it laptop-sized.
DEFAULT_SIZES = "1024,512,32768;2048,512,65536;2048,256,151936"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_child(path: str, num_tokens: int, dim: int, vocab: int, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from mmrope.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden_ND = torch.randn(num_tokens, dim, dtype=dtype, requires_grad=True)
    weight_VD = (torch.randn(vocab, dim) * 0.02).to(dtype).requires_grad_()
    labels_N = torch.full((num_tokens,), -100)
    num_supervised = int(round(args.supervised * num_tokens))
    labels_N[torch.randperm(num_tokens)[:num_supervised]] = torch.randint(0, vocab, (num_supervised,))
    # Gradients exist in both paths; allocate them up front so the delta is working memory only.
    hidden_ND.grad = torch.zeros_like(hidden_ND)
    weight_VD.grad = torch.zeros_like(weight_VD)
    baseline = _rss_bytes()

    def step():
        if path == "chunked":
            loss = linear_cross_entropy(hidden_ND, weight_VD, labels_N, chunk_size=args.chunk_size)
        else:
            logits_NV = F.linear(hidden_ND, weight_VD)
            loss = F.cross_entropy(logits_NV.float(), labels_N, reduction="sum") / max(num_supervised, 1)
        loss.backward()

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": statistics.median(times), "peak_extra_bytes": max(peak - baseline, 0)}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="';'-separated N,D,V triples")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--supervised", type=float, default=0.25, help="fraction of tokens with a label")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("PATH", "N", "D", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        path, *dims = args.child
        print(json.dumps(run_child(path, *map(int, dims), args)))
        return

    print(f"dtype={args.dtype} supervised={args.supervised:.0%} chunk_size={args.chunk_size}")
    header = f"{'N':>6} {'D':>5} {'V':>7} | {'path':>8} {'time s':>8} {'peak extra MB':>14}"
    print(header + " | full logits fp32 MB")
    for triple in args.sizes.split(";"):
        num_tokens, dim, vocab = map(int, triple.split(","))
        for path in ("chunked", "full"):
            cmd = [sys.executable, __file__, "--child", path, str(num_tokens), str(dim), str(vocab)]
            cmd += ["--dtype", args.dtype, "--supervised", str(args.supervised)]
            cmd += ["--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            full_mb = num_tokens * vocab * 4 / 2**20
            print(
                f"{num_tokens:>6} {dim:>5} {vocab:>7} | {path:>8} {result['seconds']:>8.3f} "
                f"{result['peak_extra_bytes'] / 2**20:>14.0f} | {full_mb:.0f}"
            )


if __name__ == "__main__":
    main()
