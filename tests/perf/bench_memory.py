"""Benchmark (computed, not measured): per-GPU memory of Qwen2.5-VL-7B training at 32K tokens per row, for full
training, ZeRO offload, LoRA and QLoRA, on 1, 2 and 8 GPUs.

    python tests/perf/bench_memory.py                   # the table (also run by `make bench`)
    python tests/perf/bench_memory.py --tokens 16384 --rank 64

COMPUTED from the shapes (mmrope.train.flops.LLMShape/ViTShape of the 7B config), a lower bound: allocator
fragmentation, communication buckets and framework workspace come on top (a few GB). The conventions:

- model states per parameter: trained in bf16 with fp32 master weights and AdamW moments = 2 (weight) + 2 (grad)
  + 4 + 4 + 4 (master, m, v) = 16 B; frozen in bf16 = 2 B; frozen in NF4 (QLoRA) = 0.5 B + its double-quantised
  absmax (8 bits per 64 weights, quantised again per 256: ~0.127 bits) per weight of a quantised linear layer.
- `full`: the paper recipe (connector + LLM trained, ViT frozen), ZeRO-2 (bf16 weights whole on every GPU,
  gradients and optimizer states split) or ZeRO-3 (everything split over the GPUs).
- `offload`: `deepspeed=zero3_offload`: optimizer states AND parameters in CPU memory (pinned); the GPU holds the
  layers being gathered (about 2 decoder layers with prefetch) and the activations. Their CPU RAM is listed.
- `lora`: `adapter=lora` with its defaults (r=16 on the LLM's q/k/v/o and gate/up/down and the connector), ZeRO-2:
  the bf16 base whole on every GPU, 16 B per adapter parameter (split over the GPUs).
- `qlora`: the same adapters over an NF4 base (every linear layer of the LLM, ViT and connector; embeddings and
  lm_head stay bf16).
- activations, every LLM layer recomputed (the shipped 7B recipe): each layer's input kept (L x hidden, bf16), one
  layer's working set during its recomputation + backward (q/k/v/o and the SwiGLU intermediates), the merged
  embeddings and their gradient, one chunk of fp32 logits of the chunked loss, and the frozen ViT's transient
  activations (no graph). Adapters add r-wide activations (negligible); the frozen LLM still back-propagates its
  input gradient, so LoRA saves model states, not activations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mmrope.train.flops import LLMShape, ViTShape  # noqa: E402

# Qwen2.5-VL-7B (config.json of the release): Qwen2.5-7B decoder, 32-block ViT with a SwiGLU MLP.
LLM_7B = LLMShape(
    num_layers=28, hidden=3584, intermediate=18944, num_heads=28, num_kv_heads=4, head_dim=128, vocab=152064
)
VIT_7B = ViTShape(
    depth=32, hidden=1280, intermediate=3420, num_heads=16, patch_size=14, temporal_patch_size=2, in_channels=3,
    spatial_merge_size=2, out_hidden=3584, gated_mlp=True,
)  # fmt: skip
LOSS_CHUNK = 4096  # loss.chunk_size
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits + double-quantised absmax
GB = 1e9


def linear_shapes(llm: LLMShape, vit: ViTShape) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of every linear layer, by adapter role (mmrope/model/families.py `adapter_roles`)."""
    q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    h, i = llm.hidden, llm.intermediate
    c = vit.hidden * vit.spatial_merge_size**2
    vit_mlp = [(vit.hidden, vit.intermediate)] * 2 + [(vit.intermediate, vit.hidden)]
    return {
        "llm.attention": [(h, q), (h, kv), (h, kv), (q, h)] * llm.num_layers,
        "llm.mlp": [(h, i), (h, i), (i, h)] * llm.num_layers,
        "connector": [(c, c), (c, vit.out_hidden)],
        "vision.attention": [(vit.hidden, 3 * vit.hidden), (vit.hidden, vit.hidden)] * vit.depth,
        "vision.mlp": (vit_mlp if vit.gated_mlp else vit_mlp[1:]) * vit.depth,
    }


def param_counts(llm: LLMShape, vit: ViTShape) -> dict[str, float]:
    linears = linear_shapes(llm, vit)
    count = {role: sum(a * b for a, b in shapes) for role, shapes in linears.items()}
    patch = vit.in_channels * vit.temporal_patch_size * vit.patch_size**2 * vit.hidden
    return {
        "llm_linear": count["llm.attention"] + count["llm.mlp"],
        "embeddings": 2 * llm.vocab * llm.hidden,  # input embeddings + untied lm_head (7B)
        "vit_linear": count["vision.attention"] + count["vision.mlp"] + patch,
        "connector": count["connector"],
    }


def lora_params(llm: LLMShape, vit: ViTShape, rank: int, targets: list[str]) -> int:
    """A (r x in) + B (out x r) per adapted linear layer."""
    linears = linear_shapes(llm, vit)
    return sum(rank * (a + b) for role in targets for a, b in linears[role])


def activations_gb(llm: LLMShape, vit: ViTShape, tokens: int) -> float:
    checkpoints = llm.num_layers * tokens * llm.hidden * 2
    q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    layer = tokens * (4 * llm.intermediate + 3 * (2 * q + 2 * kv)) * 2
    embeddings = 2 * tokens * llm.hidden * 2
    merge = vit.spatial_merge_size**2
    vit_transient = tokens * merge * (vit.hidden * 2 + vit.intermediate) * 2  # one frozen block, no graph
    loss = LOSS_CHUNK * llm.vocab * 4
    return (checkpoints + layer + embeddings + vit_transient + loss) / GB


def memory(method: str, num_gpus: int, tokens: int, rank: int = 16) -> dict[str, float]:
    """GB per GPU: model states, activations, total; and the CPU RAM offload needs (whole node)."""
    p = param_counts(LLM_7B, VIT_7B)
    trained = p["llm_linear"] + p["embeddings"] + p["connector"]
    total = trained + p["vit_linear"]
    cpu = 0.0
    if method == "full_zero2":
        states = total * 2 + trained * 14 / num_gpus
    elif method == "full_zero3":
        states = (trained * 16 + p["vit_linear"] * 2) / num_gpus
    elif method == "offload":
        per_layer = p["llm_linear"] / LLM_7B.num_layers
        states = 2 * per_layer * 2 + p["embeddings"] * 2 / num_gpus  # 2 gathered layers, bf16
        cpu = trained * 16 + p["vit_linear"] * 2
    elif method in ("lora", "qlora"):
        adapters = lora_params(LLM_7B, VIT_7B, rank, ["llm.attention", "llm.mlp", "connector"])
        base_linear = p["llm_linear"] + p["vit_linear"] + p["connector"]
        base = base_linear * (NF4_BYTES if method == "qlora" else 2) + p["embeddings"] * 2
        states = base + adapters * 2 + adapters * 14 / num_gpus
    else:
        raise ValueError(f"method {method!r}")
    acts = activations_gb(LLM_7B, VIT_7B, tokens)
    return {"states": states / GB, "activations": acts, "total": states / GB + acts, "cpu": cpu / GB}


METHODS = {
    "full_zero2": "full, ZeRO-2",
    "full_zero3": "full, ZeRO-3",
    "offload": "ZeRO-3 + offload",
    "lora": "LoRA r=16, ZeRO-2",
    "qlora": "QLoRA r=16, ZeRO-2",
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per packed row (one row per GPU)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    args = ap.parse_args(argv)
    p = param_counts(LLM_7B, VIT_7B)
    adapters = lora_params(LLM_7B, VIT_7B, args.rank, ["llm.attention", "llm.mlp", "connector"])
    print(
        f"Qwen2.5-VL-7B at {args.tokens} tokens per GPU, every LLM layer recomputed: COMPUTED per-GPU memory (GB), "
        f"a lower bound, not measured. Parameters: LLM linear {p['llm_linear'] / 1e9:.2f} B, embeddings + "
        f"lm_head {p['embeddings'] / 1e9:.2f} B, ViT {p['vit_linear'] / 1e9:.2f} B; LoRA r={args.rank} adapters "
        f"{adapters / 1e6:.1f} M"
    )
    print("| method | GPUs | model states | activations | total per GPU | CPU RAM (node) |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, label in METHODS.items():
        for num_gpus in (1, 2, 8):
            m = memory(method, num_gpus, args.tokens, args.rank)
            cpu = f"{m['cpu']:.0f}" if m["cpu"] else "-"
            print(
                f"| {label} | {num_gpus} | {m['states']:.1f} | {m['activations']:.1f} | {m['total']:.1f} | {cpu} |"
            )


if __name__ == "__main__":
    main()
