"""One optimizer step at 32K tokens: mmrope's path against transformers' default path, same model, same samples.

    python tests/perf/gpu_bench_step.py                                   # GPU: Qwen2.5-VL-7B shapes, 32768 tokens
    python tests/perf/gpu_bench_step.py --preset tiny --device cpu --tokens 2048 --steps 1   # smoke test anywhere

Both paths train the same randomly initialised Qwen2.5-VL-shaped model (ViT frozen; connector + LLM trained;
bf16 weights and AdamW states on GPU, activation checkpointing on every LLM layer) on the same LLaVA-like
samples (text, one image of 64-576 visual tokens, question, supervised answer):
- mmrope: the samples packed into ONE row of <= --tokens tokens (cu_seqlens), encoding installed through the
  seam with `attn_backend="auto"` (torch's varlen FlashAttention on CUDA: no attention across samples, no
  padding, nothing compiled), chunked linear cross-entropy on supervised tokens only;
- baseline (the usual recipe): micro batches of --micro samples padded to their longest, transformers' stock
  SDPA attention with a padding mask, full-vocabulary logits and transformers' loss, accumulated over the same
  samples (each micro batch weighted by its share of supervised tokens, so both optimise the same loss).
Reported per path: step time, real tokens/s, MFU (model FLOPs of the real tokens, mmrope.train.flops
convention, against --peak-tflops), peak memory, and the first step's loss. The optimizer runs with lr=0 (same
work, weights unchanged), so both paths see identical weights and their losses must agree (loss_abs_diff).

LLM MFU: the frozen ViT's forward on the step's images is timed on its own; `llm_mfu` is the LLM's FLOPs
(decoder, attention, LM head on supervised tokens, connector) over the step time minus that ViT time. With
`--layers N` the decoder has N layers instead of the preset's (to fit a time budget): every figure is then for
that N-layer model, which is said in the output (`num_layers`).

Variants of mmrope's path (`--variants`, LLM MFU per variant; `best` is the highest): `all` recomputes every
decoder layer (the shipped default), `first_n=N` only the first N (the others keep their activations: less
recompute, more memory), `every_k=K` every K-th; `+compile` adds `model.compile` (mmrope/distributed/compile.py: fused
RMSNorms and SwiGLU products), `+liger` uses `loss.backend=liger` (Liger's fused linear cross-entropy). They run
in the given order on one model (compiled variants last: compiling is not undone); a variant that fails (out of
memory, a compile error) is recorded and the next one still runs. `--profile` adds a kernel-time breakdown
(matmul / attention / elementwise / compiled / optimizer / copies ...) of one step of the first and the last variant.

DIPE vs MRoPE (`--dipe-lengths`, default 8K/16K/32K on CUDA): the same installed model trains one packed row of
each length with DIPE switched on and off in its attention layers (dynamic + anchored static positions, as the
data path computes them); reported: step time and peak memory per length and their DIPE / MRoPE ratios.
Needs only torch, transformers and this repository (no DeepSpeed): the optimizer is torch AdamW on the bf16
parameters, identical for both paths; its time is included in the step.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mmrope.distributed.compile import compile_decoder  # noqa: E402
from mmrope.distributed.recompute import apply_activation_checkpointing  # noqa: E402
from mmrope.encodings import TokenIds, anchored_positions, build  # noqa: E402
from mmrope.model.install import install  # noqa: E402
from mmrope.model.objective import SFTObjective  # noqa: E402
from mmrope.train.flops import shapes_from_hf_config, step_flops  # noqa: E402

PRESETS = {
    "qwen25vl_7b": {
        "text": dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
        ),
        "vision": dict(
            depth=32,
            hidden_size=1280,
            num_heads=16,
            intermediate_size=3420,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    },
    "tiny": {
        "text": dict(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=512,
            vocab_size=1024,
        ),
        "vision": dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=256,
            fullatt_block_indexes=[1],
        ),
    },
}


def make_model(preset: str, device: torch.device, dtype: torch.dtype, num_layers: int | None = None):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    p = PRESETS[preset]
    if num_layers:
        p = {**p, "text": {**p["text"], "num_hidden_layers": num_layers}}
    vocab = p["text"]["vocab_size"]
    ids = dict(
        image_token_id=vocab - 5,
        video_token_id=vocab - 4,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 2,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            **p["text"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "max_position_embeddings": 32768,
            "pad_token_id": vocab - 1,
            "bos_token_id": None,
            "eos_token_id": vocab - 6,
        },
        vision_config={
            **p["vision"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
        },
        tie_word_embeddings=False,
        **ids,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    for name, param in model.named_parameters():  # paper recipe: ViT frozen, connector + LLM trained
        param.requires_grad_(".merger." in name or ".visual." not in f".{name}")
    tokens = TokenIds(**ids)
    return model, tokens


def make_samples(budget: int, tokens: TokenIds, vocab: int, seed: int = 0) -> list[dict]:
    """LLaVA-like samples whose total length fills `budget` tokens (lengths 150-1100, images 64-576 tokens)."""
    rng = random.Random(seed)
    samples, used = [], 0
    while True:
        gh, gw = 2 * rng.randint(8, 24), 2 * rng.randint(8, 24)  # patches: 16..48 per side
        n_img = gh * gw // 4
        prefix, question, answer = rng.randint(10, 60), rng.randint(8, 40), rng.randint(16, 300)
        n = prefix + 1 + n_img + 1 + question + answer
        if used + n > budget:
            break
        text = lambda k: [rng.randrange(0, vocab - 8) for _ in range(k)]  # noqa: E731
        ids = (
            text(prefix)
            + [tokens.vision_start_token_id]
            + [tokens.image_token_id] * n_img
            + [tokens.vision_end_token_id]
            + text(question)
            + text(answer)
        )
        labels = [-100] * (n - answer) + ids[n - answer :]
        samples.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "grid": torch.tensor([[1, gh, gw]]),
            }
        )
        used += n
    return samples


def pixels_for(grid: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)


def mmrope_row(samples, encoding, tokens, device, dtype, *, dipe: bool = False) -> dict:
    ids = torch.cat([s["input_ids"] for s in samples])
    cu_seqlens = torch.tensor([0] + [len(s["input_ids"]) for s in samples]).cumsum(0).to(torch.int32)
    grid = torch.cat([s["grid"] for s in samples])
    pos_3L = torch.cat(
        [
            encoding.position_ids(
                s["input_ids"][None], tokens=tokens, image_grid_thw=s["grid"], layout="qwen2_5"
            )[0][:, 0]
            for s in samples
        ],
        dim=-1,
    )
    row = {
        "input_ids": ids[None].to(device),
        "labels": torch.cat([s["labels"] for s in samples])[None].to(device),
        "position_ids": pos_3L[:, None].to(device),
        "cu_seqlens": cu_seqlens.to(device),
        "image_grid_thw": grid.to(device),
        "pixel_values": pixels_for(grid, 0).to(device, dtype),
    }
    if dipe:  # as data/packing.py: anchored static positions per sample, visual = image placeholders
        visual_1L = (ids == tokens.image_token_id)[None]
        static_3BL = anchored_positions(pos_3L[:, None], visual_1L, cu_seqlens=cu_seqlens)
        row["static_position_ids"] = static_3BL.to(device)
        row["visual_mask"] = visual_1L.to(device)
    return row


def set_dipe(model, on: bool) -> None:
    """Switch DIPE on/off in every installed attention layer (same weights, same kernels; bench only)."""
    for layer in model.model.language_model.layers:
        layer.self_attn.dipe = on


def baseline_batches(samples, tokens, micro, pad_id, device, dtype) -> list[dict]:
    batches, offset = [], 0
    for i in range(0, len(samples), micro):
        chunk = samples[i : i + micro]
        width = max(len(s["input_ids"]) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, s in enumerate(chunk):  # right padding, as the usual collator does
            n = len(s["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = s["input_ids"], s["labels"], 1
        grid = torch.cat([s["grid"] for s in chunk])
        # Same pixels as the packed row: the slice of the row's pixel tensor that belongs to these images.
        num_patches = int(grid.prod(-1).sum())
        batches.append(
            {
                "input_ids": ids.to(device),
                "labels": labels.to(device),
                "attention_mask": mask.to(device),
                "mm_token_type_ids": (ids == tokens.image_token_id).int().to(device),
                "image_grid_thw": grid.to(device),
                "patch_offset": offset,
                "num_patches": num_patches,
            }
        )
        offset += num_patches
    return batches


def timed_steps(step_fn, steps: int, device: torch.device) -> tuple[float, float, float]:
    """(first loss, mean seconds per step after one warm-up, peak memory GiB). `steps=0` times the warm-up step
    itself (a smoke run: every path runs once, its time includes first-call costs)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    first = step_fn()
    times = []
    if not steps:  # the warm-up step is the one timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return first, sum(times) / len(times), peak


def path_figures(
    loss: float, secs: float, peak: float, num_real: int, flops: float, peak_tflops: float
) -> dict:
    return {
        "first_loss": loss,
        "step_s": secs,
        "tokens_per_s": num_real / secs,
        "mfu": flops / secs / (peak_tflops * 1e12),
        "peak_mem_gib": peak,
    }


def time_vit_forward(model, row: dict, steps: int, device: torch.device) -> float:
    """Mean seconds of the frozen ViT's forward (no grad) on the row's images: the part of a step that is not LLM."""

    def vit() -> float:
        with torch.no_grad():
            model.model.get_image_features(row["pixel_values"], row["image_grid_thw"], return_dict=True)
        return 0.0

    return timed_steps(vit, steps, device)[1]


MODIFIERS = ("compile", "liger")


def parse_variant(spec: str) -> tuple[str, int, set[str]]:
    """`all` | `none` | `first_n=N` | `every_k=K`, then `+compile` and/or `+liger` -> (recompute mode, N or K,
    modifiers)."""
    parts = spec.split("+")
    modifiers = set(parts[1:])
    if not modifiers <= set(MODIFIERS):
        raise ValueError(f"--variants: unknown modifier in {spec!r} (+compile, +liger)")
    mode, _, num = parts[0].partition("=")
    if mode not in ("all", "none", "first_n", "every_k") or (mode in ("first_n", "every_k")) != bool(num):
        raise ValueError(
            f"--variants: {spec!r} is not all | none | first_n=N | every_k=K [+compile] [+liger]"
        )
    return mode, int(num or 0), modifiers


def apply_variant(model, objective: SFTObjective, spec: str, compile_backend: str = "inductor") -> None:
    mode, num, modifiers = parse_variant(spec)
    apply_activation_checkpointing(
        model, mode, every=num if mode == "every_k" else 1, layers=num if mode == "first_n" else 0
    )
    if "compile" in modifiers:
        compile_decoder(model, backend=compile_backend)
    objective.loss_backend = "liger" if "liger" in modifiers else "chunked"  # loss.backend


KERNEL_CATEGORIES = (  # first match wins; CUDA kernel names on GPU, aten op names on CPU
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("compiled (inductor)", ("triton_", "cpp_fused", "graph_", "compiledfunction")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "fused_adam")),
    ("communication", ("nccl", "all_reduce", "allgather", "reduce_scatter")),
    ("copy / cast / fill", ("copy", "memcpy", "memset", "fill", "cast", "aten::to", "cat", "index")),
    (
        "norm / softmax / reduction",
        ("reduce", "norm", "softmax", "mean", "sum", "cross_entropy", "logsumexp"),
    ),
    (
        "elementwise",
        ("elementwise", "vectorized", "unrolled", "aten::mul", "aten::add", "silu", "sigmoid", "rsqrt"),
    ),
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def profile_step(step_fn, device: torch.device, wall_s: float) -> dict:
    """One profiled step: device time per kernel category (ms, share), the top kernels, and the busy fraction
    (kernel time / the step's unprofiled wall time: well below 1 means launch or host overhead)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step_fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if cuda and e.device_type == DeviceType.CUDA:
            rows.append((e.key, e.self_device_time_total / 1e3, e.count))
        elif not cuda and e.key.startswith("aten::"):  # CPU: leaf aten ops' own time
            rows.append((e.key, e.self_cpu_time_total / 1e3, e.count))
    total = sum(ms for _, ms, _ in rows) or 1e-9
    cats: dict[str, float] = {}
    for name, ms, _ in rows:
        cats[categorize(name)] = cats.get(categorize(name), 0.0) + ms
    top = sorted(rows, key=lambda r: -r[1])[:15]
    return {
        "unit": "ms of CUDA kernel time" if cuda else "ms of CPU time in aten ops",
        "total_ms": total,
        "busy_fraction": total / 1e3 / wall_s if wall_s else None,
        "categories": {
            k: {"ms": v, "share": v / total} for k, v in sorted(cats.items(), key=lambda kv: -kv[1])
        },
        "top": [{"name": n[:120], "ms": ms, "calls": c, "category": categorize(n)} for n, ms, c in top],
    }


def _error(e: BaseException) -> str:
    kind = "OOM" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
    return f"{kind}: {(str(e).splitlines() or [''])[0][:300]}"


def save(results: dict, path: Path | None) -> None:
    """Write what has been measured so far (the GPU check caps this script's time; partial figures still count)."""
    if path:
        path.write_text(json.dumps(results, indent=1))


def dipe_scan(
    model, encoding, tokens: TokenIds, opt, args, device: torch.device, dtype, results: dict
) -> None:
    """Step time and peak memory, DIPE on vs off, for one packed row of each length in `args.dipe_lengths`."""
    objective = SFTObjective(model)
    vocab = model.config.text_config.vocab_size
    out = results["dipe_vs_mrope"]
    for length in args.dipe_lengths:
        samples = make_samples(length, tokens, vocab, seed=length)
        row = mmrope_row(samples, encoding, tokens, device, dtype, dipe=True)
        num_sup = sum(int((s["labels"] != -100).sum()) - 1 for s in samples)
        entry = {"tokens": int(row["input_ids"].shape[1]), "samples": len(samples)}
        for name, dipe in (("mrope", False), ("dipe", True)):
            set_dipe(model, dipe)

            def step(row=row, num_sup=num_sup) -> float:
                loss = objective(row, num_global_tokens=num_sup)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(loss.detach())

            try:
                loss, secs, peak = timed_steps(step, args.steps, device)
                entry[name] = {"first_loss": loss, "step_s": secs, "peak_mem_gib": peak}
            except torch.OutOfMemoryError as e:
                entry[name] = {"error": f"OOM: {str(e).splitlines()[0]}"}
        set_dipe(model, False)
        if "step_s" in entry["mrope"] and "step_s" in entry["dipe"]:
            entry["step_time_ratio"] = entry["dipe"]["step_s"] / entry["mrope"]["step_s"]
            if device.type == "cuda":
                entry["peak_mem_ratio"] = entry["dipe"]["peak_mem_gib"] / entry["mrope"]["peak_mem_gib"]
        out.append(entry)
        save(results, args.out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen25vl_7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--micro", type=int, default=4, help="baseline samples per padded micro batch")
    ap.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps per path (after one warm-up step); 0: time the warm-up step (smoke runs)",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="per-device dense bf16 peak (H100/H200 SXM)"
    )
    ap.add_argument(
        "--baseline-steps", type=int, default=None, help="timed steps of the usual recipe (default: --steps)"
    )
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument(
        "--dipe-lengths",
        type=int,
        nargs="*",
        default=None,
        help="row lengths of the DIPE vs MRoPE comparison (default 8192 16384 32768 on CUDA, none on CPU)",
    )
    ap.add_argument("--skip-baseline", action="store_true", help="only mmrope's path (and the DIPE scan)")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="mmrope path variants, in order: all | none | first_n=N | every_k=K, +compile, +liger "
        "(default on CUDA: all all+compile first_n=20+compile first_n=20+compile+liger; on CPU: all)",
    )
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the +compile variants (a smoke run on CPU: aot_eager, no code generation)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="kernel-time breakdown of the first and last variant"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.dipe_lengths is None:
        args.dipe_lengths = [8192, 16384, 32768] if device.type == "cuda" else []
    if args.variants is None:
        args.variants = (
            ["all", "all+compile", "first_n=20+compile", "first_n=20+compile+liger"]
            if device.type == "cuda"
            else ["all"]
        )
    compiled_seen = False
    for spec in args.variants:  # validate all before the (long) runs; compiling cannot be undone on the model
        compiled = "compile" in parse_variant(spec)[2]
        if compiled_seen and not compiled:
            raise ValueError(
                f"--variants: {spec!r} comes after a +compile variant; put compiled variants last"
            )
        compiled_seen |= compiled
    model, tokens = make_model(args.preset, device, dtype, args.layers)
    vocab = model.config.text_config.vocab_size
    samples = make_samples(args.tokens, tokens, vocab)
    num_real = sum(len(s["input_ids"]) for s in samples)
    num_sup = sum(
        int((s["labels"] != -100).sum()) - 1 for s in samples
    )  # last label of a sample predicts nothing
    llm, vit = shapes_from_hf_config(model.config)
    grid_all = torch.cat([s["grid"] for s in samples])
    flops_parts = step_flops(llm, vit, [len(s["input_ids"]) for s in samples], num_sup, grid_all)
    flops = flops_parts["total"]
    pixels_all = pixels_for(grid_all, 0).to(device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    # -- baseline: stock model, padded micro batches, full logits --------------------------------------------
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # lr=0: AdamW does all its work (same step time) but the weights stay put, so both paths are measured on
    # identical weights and their losses must agree.
    opt = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.98), weight_decay=0.05, fused=device.type == "cuda")
    batches = baseline_batches(
        samples, tokens, args.micro, model.config.text_config.pad_token_id, device, dtype
    )
    num_padded = sum(b["input_ids"].numel() for b in batches)

    def baseline_step() -> float:
        total = 0.0
        for b in batches:
            sup = int((b["labels"][:, 1:] != -100).sum())
            pv = pixels_all[b["patch_offset"] : b["patch_offset"] + b["num_patches"]]
            out = model(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                pixel_values=pv,
                image_grid_thw=b["image_grid_thw"],
                mm_token_type_ids=b["mm_token_type_ids"],
                labels=b["labels"],
                use_cache=False,
            )
            loss = out.loss * (
                sup / num_sup
            )  # HF averages per micro batch: reweight to the step's token mean
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    import transformers

    results = {
        "preset": args.preset,
        "num_layers": model.config.text_config.num_hidden_layers,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak_tflops": args.peak_tflops,
        "samples": len(samples),
        "real_tokens": num_real,
        "supervised_tokens": num_sup,
        "baseline_padded_tokens": num_padded,
        "model_tflops_per_step": flops / 1e12,
        "compile_backend": args.compile_backend,
    }
    if args.skip_baseline:
        results["baseline"] = {"error": "skipped (--skip-baseline)"}
    else:
        try:
            loss, secs, peak = timed_steps(baseline_step, args.baseline_steps or args.steps, device)
            results["baseline"] = path_figures(loss, secs, peak, num_real, flops, args.peak_tflops)
        except torch.OutOfMemoryError as e:
            results["baseline"] = {"error": f"OOM: {str(e).splitlines()[0]}"}
    save(results, args.out)
    del opt
    model.gradient_checkpointing_disable()
    # gradient_checkpointing_enable hooked every input embedding (the ViT's patch embedding too) to output
    # tensors that require grad, which makes the frozen ViT keep its activations; its disable does not remove
    # the hooks. mmrope's own recompute never installs them.
    model.disable_input_require_grads()
    for p in params:
        p.grad = None

    # -- mmrope: packed row, installed encoding, varlen attention (auto), chunked loss --------------------------
    encoding = build("mrope")
    install(model, encoding, attn_backend="auto")
    objective = SFTObjective(model)
    row = mmrope_row(samples, encoding, tokens, device, dtype)
    row["pixel_values"] = pixels_all
    opt = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.98), weight_decay=0.05, fused=device.type == "cuda")

    def mmrope_step() -> float:
        loss = objective(row, num_global_tokens=num_sup)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    vit_s = time_vit_forward(model, row, args.steps, device)
    llm_flops = flops - flops_parts["vit"]
    results["flops_split"] = {k: v / flops for k, v in flops_parts.items() if k != "total"}
    results["variants"], results["profile"] = {}, {}
    for i, spec in enumerate(args.variants):
        try:
            apply_variant(model, objective, spec, args.compile_backend)
            loss, secs, peak = timed_steps(mmrope_step, args.steps, device)
        except (
            Exception
        ) as e:  # out of memory, or a compile failure: recorded, and the next variant still runs
            results["variants"][spec] = {"error": _error(e)}
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save(results, args.out)
            continue
        fig = path_figures(loss, secs, peak, num_real, flops, args.peak_tflops)
        fig.update(
            vit_forward_s=vit_s, llm_mfu=llm_flops / max(secs - vit_s, 1e-9) / (args.peak_tflops * 1e12)
        )
        results["variants"][spec] = fig
        if i == 0:  # the shipped default: the figures compared with the usual recipe
            results["mmrope"] = {**fig, "variant": spec}
        if args.profile and i in (0, len(args.variants) - 1):
            try:
                results["profile"][spec] = profile_step(mmrope_step, device, secs)
            except Exception as e:  # the profiler (CUPTI) must not cost the figures that follow
                results["profile"][spec] = {"error": _error(e)}
        save(results, args.out)
    measured = {k: v for k, v in results["variants"].items() if "llm_mfu" in v}
    if measured:
        best = max(measured, key=lambda k: measured[k]["llm_mfu"])
        results["best"] = {"variant": best, **measured[best]}
    if "step_s" in results["baseline"] and "mmrope" in results:
        results["loss_abs_diff"] = abs(results["mmrope"]["first_loss"] - results["baseline"]["first_loss"])
        results["speedup_tokens_per_s"] = (
            results["mmrope"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        )
    save(results, args.out)
    if args.dipe_lengths:  # every layer recomputed (the default), compiled if a variant compiled the model
        apply_activation_checkpointing(model, "all")
        results["dipe_scan_model"] = "all" + ("+compile" if compiled_seen else "")
        results["dipe_vs_mrope"] = []  # filled length by length, saved after each (a time cap keeps what ran)
        dipe_scan(model, encoding, tokens, opt, args, device, dtype, results)
    print(json.dumps(results, indent=1))
    save(results, args.out)
    return results


if __name__ == "__main__":
    main()
