"""Benchmark: time and peak memory of DIPE attention backends (fwd + bwd) on packed multimodal rows.

Not a test. `python tests/perf/bench_attention.py` picks the device:

* CPU (default lengths 512/1024/2048, H=8, H_kv=2, D=64, fp32): every (variant, length) runs in a fresh
  subprocess and reports the growth of the process's peak RSS during one fwd+bwd (torch's CPU allocator is
  not instrumented, `ru_maxrss` is). Shows eager's O(L^2) growth vs routed/two_pass.
* CUDA (default lengths 8K/16K/32K, Qwen2.5-3B-shaped heads H=16, H_kv=2, D=128, bf16): in-process, peak
  `torch.cuda.max_memory_allocated` above the inputs and the median time of a few fwd+bwd iterations after a
  warm-up (FlexAttention compiles on first use). Before timing, `--check` (default on CUDA) compares every
  variant to the eager reference at L=1024 in fp32, outputs and q_dyn/q_sta/k/v gradients.

A row packs `--num-samples` samples; each is `text(64) VS image VE text(rest)` with the image taking half of
the sample, so intra and inter pairs, sample boundaries and empty inter sets (text before the image) all occur.
Baselines `mrope-*` are plain packed causal attention with q_dyn only (what the model costs without DIPE).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# name -> (kind, backend, inner_backend); availability is checked per device.
VARIANTS: dict[str, tuple[str, str, str]] = {
    "mrope-sdpa": ("packed", "sdpa", ""),
    "mrope-sdpa_varlen": ("packed", "sdpa_varlen", ""),
    "mrope-varlen": ("packed", "varlen", ""),
    "mrope-flex": ("packed", "flex", ""),
    "mrope-flash": ("packed", "flash", ""),
    "dipe-eager": ("dipe", "eager", ""),
    "dipe-routed-sdpa": ("dipe", "routed", "sdpa"),
    "dipe-routed-sdpa_varlen": ("dipe", "routed", "sdpa_varlen"),
    "dipe-routed-varlen": ("dipe", "routed", "varlen"),
    "dipe-routed-flex": ("dipe", "routed", "flex"),
    "dipe-routed-flash": ("dipe", "routed", "flash"),
    "dipe-two_pass": ("dipe", "two_pass", ""),
}
CUDA_ONLY = {
    "mrope-varlen",
    "mrope-flex",
    "mrope-flash",
    "dipe-routed-varlen",
    "dipe-routed-flex",
    "dipe-routed-flash",
}
FLASH = {"mrope-flash", "dipe-routed-flash"}
HALF_ONLY = {
    "mrope-varlen",
    "dipe-routed-varlen",
    "mrope-flash",
    "dipe-routed-flash",
}  # FlashAttention kernels


def make_layout(seq_len: int, num_samples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(visual_1L bool, doc_ids_1L)` for one packed row of `num_samples` text/image/text samples."""
    visual = torch.zeros(1, seq_len, dtype=torch.bool)
    doc_ids = torch.zeros(1, seq_len, dtype=torch.long)
    bounds = torch.linspace(0, seq_len, num_samples + 1).long().tolist()
    for sample, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc_ids[0, start:end] = sample
        image_start = start + min(65, (end - start) // 4)  # 64 text tokens + vision_start
        visual[0, image_start : image_start + (end - start) // 2] = True
    return visual.to(device), doc_ids.to(device)


def make_inputs(
    seq_len: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, seed: int = 0
):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    q_dyn = randn(1, args.heads, seq_len, args.head_dim)
    q_sta = randn(1, args.heads, seq_len, args.head_dim)
    k = randn(1, args.kv_heads, seq_len, args.head_dim)
    v = randn(1, args.kv_heads, seq_len, args.head_dim)
    visual, doc_ids = make_layout(seq_len, args.num_samples, device)
    return (q_dyn, q_sta, k, v), visual, doc_ids


def make_fn(variant: str, visual: torch.Tensor, doc_ids: torch.Tensor, scale: float) -> Callable:
    # imported here: on CPU the parent only starts workers, and mmrope.attention costs ~1.5 s to import
    from mmrope.attention import dipe_attention, packed_attention

    kind, backend, inner = VARIANTS[variant]
    if kind == "packed":
        return lambda q_dyn, q_sta, k, v: packed_attention(
            q_dyn, k, v, doc_ids_BL=doc_ids, scale=scale, backend=backend
        )
    return lambda q_dyn, q_sta, k, v: dipe_attention(
        q_dyn,
        q_sta,
        k,
        v,
        visual_BL=visual,
        doc_ids_BL=doc_ids,
        scale=scale,
        backend=backend,
        inner_backend=inner,
    )


def fwd_bwd(fn: Callable, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    out.float().square().mean().backward()
    return out


# ---------------------------------------------------------------------------------------------------------------
# CPU: one subprocess per measurement


def cpu_worker(variant: str, seq_len: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tensors, visual, doc_ids = make_inputs(seq_len, args, torch.device("cpu"), torch.float32)
    fn = make_fn(variant, visual, doc_ids, args.head_dim**-0.5)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fwd_bwd(fn, tensors)
    seconds = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024  # ru_maxrss is in KiB
    print(json.dumps({"variant": variant, "seq_len": seq_len, "seconds": seconds, "peak_mb": peak_mb}))


def run_cpu(args: argparse.Namespace) -> None:
    variants = [v for v in args.variants if v not in CUDA_ONLY]
    print(
        f"CPU fwd+bwd, fp32, B=1, H={args.heads}, H_kv={args.kv_heads}, D={args.head_dim}, "
        f"{args.num_samples} samples/row, {args.threads} threads; peak = growth of max RSS during the call"
    )
    print(f"{'variant':<26}{'L':>7}{'time s':>10}{'peak MB':>10}")

    def measure(seq_len: int, variant: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--lengths",
            str(seq_len),
            "--heads",
            str(args.heads),
            "--kv-heads",
            str(args.kv_heads),
            "--head-dim",
            str(args.head_dim),
            "--num-samples",
            str(args.num_samples),
            "--threads",
            str(args.threads),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())

    # --jobs > 1: measurements overlap, each still in its own process (its peak RSS is its own), their times
    # share the cores (for smoke runs: the GPU check's dry run)
    cases = [(seq_len, variant) for seq_len in args.lengths for variant in variants]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for (seq_len, variant), proc in zip(cases, pool.map(lambda c: measure(*c), cases)):
            if proc.returncode != 0:
                print(f"{variant:<26}{seq_len:>7}  failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{variant:<26}{seq_len:>7}{res['seconds']:>10.3f}{res['peak_mb']:>10.1f}")


# ---------------------------------------------------------------------------------------------------------------
# CUDA


def available_cuda_variants(requested: list[str]) -> list[str]:
    try:
        import flash_attn  # noqa: F401

        has_flash = True
    except ImportError:
        has_flash = False
    return [v for v in requested if has_flash or v not in FLASH]


def cuda_check(args: argparse.Namespace, variants: list[str]) -> None:
    """fp32 exactness of every DIPE variant vs the eager reference (outputs and all four gradients)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seq_len = 1024
    device = torch.device("cuda")
    tensors, visual, doc_ids = make_inputs(seq_len, args, device, torch.float32, seed=1)
    scale = args.head_dim**-0.5
    ref_out = fwd_bwd(make_fn("dipe-eager", visual, doc_ids, scale), tensors).detach()
    ref_grads = [t.grad.clone() for t in tensors]
    print(f"check vs dipe-eager, fp32, L={seq_len} (max |diff|: out, dq_dyn, dq_sta, dk, dv)")
    for variant in variants:
        if not variant.startswith("dipe-") or variant == "dipe-eager" or variant in HALF_ONLY:
            continue  # FlashAttention kernels run in bf16/fp16 only: the GPU tests check them at bf16 tolerance
        try:
            out = fwd_bwd(make_fn(variant, visual, doc_ids, scale), tensors).detach()
            diffs = [(out - ref_out).abs().max().item()]
            diffs += [(t.grad - g).abs().max().item() for t, g in zip(tensors, ref_grads)]
            status = "ok" if max(diffs) < 1e-4 else "MISMATCH"
            print(f"  {variant:<26}" + " ".join(f"{d:.2e}" for d in diffs) + f"  {status}")
        except Exception as err:  # report and continue: the benchmark should cover what works
            print(f"  {variant:<26}error: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    torch.backends.cuda.matmul.allow_tf32 = True


def run_cuda(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    variants = available_cuda_variants(args.variants)
    if args.check:
        cuda_check(args, variants)
    print(
        f"CUDA ({torch.cuda.get_device_name()}) fwd+bwd, bf16, B=1, H={args.heads}, H_kv={args.kv_heads}, "
        f"D={args.head_dim}, {args.num_samples} samples/row; peak = max allocated above the inputs"
    )
    print(f"{'variant':<26}{'L':>7}{'ms':>10}{'peak GB':>10}")
    for seq_len in args.lengths:
        for variant in variants:
            tensors, visual, doc_ids = make_inputs(seq_len, args, device, dtype)
            fn = make_fn(variant, visual, doc_ids, args.head_dim**-0.5)
            try:
                fwd_bwd(fn, tensors)  # warm-up / compile
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                times_ms = []
                for _ in range(args.repeats):
                    start_evt, end_evt = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    start_evt.record()
                    fwd_bwd(fn, tensors)
                    end_evt.record()
                    torch.cuda.synchronize()
                    times_ms.append(start_evt.elapsed_time(end_evt))
                peak_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
                print(f"{variant:<26}{seq_len:>7}{statistics.median(times_ms):>10.2f}{peak_gb:>10.2f}")
            except torch.cuda.OutOfMemoryError:
                print(f"{variant:<26}{seq_len:>7}{'OOM':>10}{'OOM':>10}")
            except Exception as err:
                print(
                    f"{variant:<26}{seq_len:>7}  error: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
                )
            del tensors, fn
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--jobs", type=int, default=1, help="CPU: measurements run at once (times then share the cores)"
    )
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    args.heads = args.heads or (16 if use_cuda else 8)
    args.head_dim = args.head_dim or (128 if use_cuda else 64)
    args.lengths = args.lengths or ([8192, 16384, 32768] if use_cuda else [512, 1024, 2048])
    if args.worker is not None:
        cpu_worker(args.worker, args.lengths[0], args)
    elif use_cuda:
        run_cuda(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
