"""Benchmark: Ulysses sequence parallelism on CPU, step time and peak memory per rank, SP=2 vs no SP.

Not a test. `python tests/perf/bench_sequence_parallel.py` runs, for each row length, one process without SP and
then 2 ranks (gloo, `torch.distributed.run`) with `sequence_parallel_size=2`, each timing forward + backward of
the SFT objective (tiny Qwen2.5-VL decoder widened to 4 layers, 4 heads / 2 KV heads, head_dim 64, fp32; mrope;
text rows packed from 1024-token samples) after one warm-up step, and reporting the growth of the process's peak
RSS from before the first step (torch's CPU allocator is not instrumented, `ru_maxrss` is). Then it prints the
all-to-all volume per decoder layer that Ulysses moves for a Qwen2.5-VL-7B shape at 64K and 128K: COMPUTED from the shapes,
not measured (one CPU box cannot show an interconnect; one GPU cannot run SP > 1).

Every process runs one thread (OMP_NUM_THREADS=1): the process without SP uses one core, the SP group one core
per rank, and the figures are per rank. On CPU the all-to-all is a memory copy through gloo; on GPUs it crosses
NVLink, which the computed volume below sizes.

`--vision` measures the vision step alone instead (issue 23, `mmrope.distributed.vision_split`): per rank, the vision
tower's time (inside its forward), the whole vision step's time (tower + the all-gather + the connector's backward
from a loss on the gathered features) and the peak RSS growth, for SP=1 and for SP=2 and 4 with every rank running
the whole row (`split_vision=False`, before) and with each rank encoding its share (after). Qwen2.5-VL's tiny
ViT widened to hidden 256 (4 heads, MLP 1024, 4 blocks), a row of 16 images of 12 x 12 to 36 x 36 patches.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SAMPLE_TOKENS = 1024
VOCAB = 512
SPECIAL = {
    "image_token_id": VOCAB - 4,
    "video_token_id": VOCAB - 3,
    "vision_start_token_id": VOCAB - 2,
    "vision_end_token_id": VOCAB - 1,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def packed_row(num_tokens: int, seed: int = 0) -> dict:
    """Text samples of SAMPLE_TOKENS tokens (the last one shorter), positions restarting at 0 in each."""
    g = torch.Generator().manual_seed(seed)
    ids_BL = torch.randint(2, VOCAB - 4, (1, num_tokens), generator=g)
    lengths = [min(SAMPLE_TOKENS, num_tokens - s) for s in range(0, num_tokens, SAMPLE_TOKENS)]
    pos_L = torch.cat([torch.arange(n) for n in lengths])
    return {
        "input_ids": ids_BL,
        "labels": ids_BL.clone(),
        "position_ids": pos_L.view(1, 1, -1).expand(3, 1, -1).contiguous(),
        "cu_seqlens": torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32),
    }


def sp_objective(model, sp, **kwargs):
    """The objective the trainer builds: Ulysses on the attention layers and the SP objective, or single-device."""
    from mmrope.distributed.objective import SequenceParallelObjective
    from mmrope.distributed.sequence_parallel import apply_sequence_parallel
    from mmrope.model.objective import SFTObjective

    if sp is None:
        return SFTObjective(model)
    apply_sequence_parallel(model, sp)
    return SequenceParallelObjective(model, sp, **kwargs)


def run_rank(num_tokens: int, steps: int, sp_size: int) -> dict:
    """Time `steps` forward + backward steps (after one warm-up) on this process; peak RSS growth during them."""
    from mmrope.encodings import build as build_encoding
    from mmrope.model.build import build_model
    from mmrope.model.config import ModelConfig, TinyModelConfig
    from mmrope.model.install import install

    sp = None
    if sp_size > 1:
        from mmrope.train.engine import init_distributed, init_sequence_parallel

        sp = init_sequence_parallel(init_distributed(), sp_size)
    cfg = ModelConfig(tiny=TinyModelConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    model = build_model(cfg, vocab_size=VOCAB, special_ids=SPECIAL, seed=0)
    install(model, build_encoding("mrope", mrope_section=[8, 12, 12]))
    objective = sp_objective(model, sp)
    row = packed_row(num_tokens)

    def step() -> None:
        loss = objective(row)
        loss.backward()
        model.zero_grad(set_to_none=True)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model and row built, nothing run yet
    step()  # warm-up: allocator pools, lazy inits (its peak counts: it is a step like the others)
    times = []
    for _ in range(steps):
        if sp is not None:
            torch.distributed.barrier()  # ranks start together: the step time includes waiting for the slower
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tokens": num_tokens,
        "sp": sp_size,
        "rank": sp.rank if sp is not None else 0,
        "step_s": sorted(times)[len(times) // 2],
        "peak_rss_growth_mib": (rss_after - rss_before) / 1024,  # ru_maxrss is in KiB on Linux
        "peak_rss_mib": rss_after / 1024,
    }


VISION_SIDES = [12, 16, 20, 24, 28, 32, 36, 24, 16, 20, 28, 12, 32, 36, 20, 24]  # patches per image side


def vision_row() -> dict:
    """A row's images (pixels, grids) as the processor writes them; the vision step reads nothing else."""
    grids = torch.tensor([[1, s, s] for s in VISION_SIDES])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    return {"input_ids": torch.zeros(1, 1, dtype=torch.long), "pixel_values": pixels, "image_grid_thw": grids}


def run_vision_rank(steps: int, sp_size: int, split: bool) -> dict:
    """Time `steps` vision steps (after one warm-up): the objective's media encoding, then the backward of a loss
    on the gathered features (the connector's gradient); the tower's own time via forward hooks."""
    from mmrope.encodings import build as build_encoding
    from mmrope.model.build import build_model
    from mmrope.model.config import ModelConfig, TinyModelConfig
    from mmrope.model.freeze import apply_freeze
    from mmrope.model.install import install

    sp = None
    if sp_size > 1:
        from mmrope.train.engine import init_distributed, init_sequence_parallel

        sp = init_sequence_parallel(init_distributed(), sp_size)
    tiny = TinyModelConfig(
        num_attention_heads=4,
        vision_hidden_size=256,
        vision_num_heads=4,
        vision_intermediate_size=1024,
        vision_depth=4,
    )
    cfg = ModelConfig(tiny=tiny)
    model = build_model(cfg, vocab_size=VOCAB, special_ids=SPECIAL, seed=0)
    apply_freeze(model, cfg.freeze)  # the ViT frozen, the connector trained
    install(model, build_encoding("mrope", mrope_section=[8, 12, 12]), attn_backend="auto")
    objective = sp_objective(model, sp, split_vision=split)
    row = vision_row()
    vit_s, patches = [], []  # the tower's calls in a step: -start, end; the patches of each

    def tower_starts(module, args) -> None:
        vit_s.append(-time.perf_counter())
        patches.append(int(args[0].shape[0]))

    model.model.visual.register_forward_pre_hook(tower_starts)
    model.model.visual.register_forward_hook(lambda m, a, o: vit_s.append(time.perf_counter()))

    def step() -> float:
        vit_s.clear()
        patches.clear()
        media, zero = objective._encode_media(row)
        loss = zero + sum(f.float().square().mean() for f in media["image"].pooler_output)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(vit_s)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    times, vit_times = [], []
    for _ in range(steps):
        if sp is not None:
            torch.distributed.barrier()
        tic = time.perf_counter()
        vit_times.append(step())
        times.append(time.perf_counter() - tic)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "sp": sp_size,
        "split": split,
        "rank": sp.rank if sp is not None else 0,
        "patches": sum(patches),  # this rank's share (a rank with none encodes a 4-patch dummy)
        "vit_s": sorted(vit_times)[len(vit_times) // 2],
        "step_s": sorted(times)[len(times) // 2],
        "peak_rss_growth_mib": (rss_after - rss_before) / 1024,
    }


def all_to_all_bytes(
    num_tokens: int,
    sp: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype_bytes: int = 2,
    dipe: bool = False,
) -> int:
    """Bytes ONE rank sends per decoder layer in ONE forward: q, k, v (KV heads repeated to N when fewer) and the
    attention output (DIPE: also the static queries), each `L/N x heads x head_dim`, of which (N-1)/N leave the rank.
    Backward moves the same again (the gradients); recomputation (activation checkpointing) adds one forward."""
    kv = max(num_kv_heads, sp)
    heads = num_heads * (3 if dipe else 2) + 2 * kv
    return num_tokens // sp * heads * head_dim * dtype_bytes * (sp - 1) // sp


def qwen25vl_7b_volumes() -> list[dict]:
    """Qwen2.5-VL-7B's decoder: 28 layers, 28 query heads, 4 KV heads, head_dim 128, bf16. N must divide 28 and
    4 must divide N or N divide 4: N in {2, 4}."""
    out = []
    for num_tokens in (65536, 131072):
        for sp in (2, 4):
            for dipe in (False, True):
                per_layer = all_to_all_bytes(
                    num_tokens, sp, num_heads=28, num_kv_heads=4, head_dim=128, dipe=dipe
                )
                out.append(
                    {
                        "tokens": num_tokens,
                        "sp": sp,
                        "dipe": dipe,
                        "per_layer_fwd_mib": per_layer / 2**20,
                        # forward + recomputed forward + backward, 28 layers
                        "per_step_gib": per_layer * 3 * 28 / 2**30,
                    }
                )
    return out


# Qwen2.5-VL-7B: the decoder (Qwen2.5-7B) and the ViT, for the memory arithmetic below.
LLM_PARAMS, VIT_PARAMS = 7.62e9, 0.68e9
HIDDEN, INTERMEDIATE, LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 3584, 18944, 28, 28, 4, 128
VIT_HIDDEN, VIT_INTERMEDIATE = 1280, 3420
LOSS_CHUNK, VOCAB_7B = 4096, 152064


def memory_per_rank_gb(num_tokens: int, sp: int, *, zero_stage: int, num_gpus: int = 8) -> dict[str, float]:
    """COMPUTED lower bound of one rank's memory (GB = 1e9 B) for Qwen2.5-VL-7B training as `experiment=long_128k`
    sets it up: bf16 weights, fp32 master weights and AdamW moments (16 B per trainable parameter), ViT frozen
    (2 B), ZeRO over all `num_gpus` ranks, every decoder layer recomputed. Fragmentation, communication buffers and
    framework workspace come on top."""
    local = num_tokens // sp
    trainable = LLM_PARAMS * 16
    if zero_stage == 3:
        states = (trainable + VIT_PARAMS * 2) / num_gpus
    else:  # ZeRO-2: full bf16 weights on every rank, gradients and optimizer states partitioned
        states = (LLM_PARAMS + VIT_PARAMS) * 2 + LLM_PARAMS * 14 / num_gpus
    checkpoints = LAYERS * local * HIDDEN * 2  # each layer's input, this rank's slice
    # one layer recomputed and differentiated: MLP gate, up, act, product over this rank's slice, plus q/k/v/o
    # (whole row after the all-to-all with H/N heads: the same size) and the all-to-all's in/out buffers
    layer = local * (4 * INTERMEDIATE + 3 * (2 * NUM_HEADS + 2 * max(NUM_KV_HEADS, sp)) * HEAD_DIM) * 2
    embeddings = (
        2 * num_tokens * HIDDEN * 2
    )  # merged embeddings of the WHOLE row and their gradient, every rank
    # the frozen ViT (no graph) on this rank's share of the row's images (mmrope.distributed.vision_split; balanced
    # shares of whole images: 1/N of the patches up to one image)
    vit = num_tokens * 4 // sp * (VIT_HIDDEN * 2 + VIT_INTERMEDIATE) * 2
    loss = LOSS_CHUNK * VOCAB_7B * 4  # one chunk of fp32 logits
    parts = {"model states": states, "layer checkpoints": checkpoints, "one layer": layer}
    parts |= {"row embeddings": embeddings, "ViT (transient)": vit, "loss chunk": loss}
    return {k: v / 1e9 for k, v in parts.items()} | {"total": sum(parts.values()) / 1e9}


def launch(num_tokens: int, steps: int, sp: int, worker: str = "--rank-worker", *extra: str) -> list[dict]:
    # One thread per rank, with or without SP: a shared 2-core box oversubscribed by OpenMP threads measures the
    # contention, not the step.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [__file__, worker, str(num_tokens), str(steps), str(sp), *extra]
    if sp > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(sp),
            "--standalone",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    # ranks print at the same time: their lines may interleave, the flat JSON objects stay whole
    return [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        num_tokens, steps, sp = (int(x) for x in sys.argv[2:5])
        print("RESULT " + json.dumps(run_rank(num_tokens, steps, sp)), flush=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--vision-worker":
        _, steps, sp, split = (int(x) for x in sys.argv[2:6])
        print("RESULT " + json.dumps(run_vision_rank(steps, sp, bool(split))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--vision", action="store_true", help="the vision step alone: the split vs every rank"
    )
    args = parser.parse_args()
    if args.vision:
        vision_main(args.steps)
        return

    print("CPU, fp32, tiny Qwen2.5-VL decoder (4 layers, hidden 256, 4 heads / 2 KV heads), mrope, text rows")
    print(
        f"{'tokens':>7} {'SP':>3} {'rank':>4} {'step s':>8} {'peak RSS growth MiB':>20} {'peak RSS MiB':>13}"
    )
    for num_tokens in args.tokens:
        for sp in (1, 2):
            for r in sorted(launch(num_tokens, args.steps, sp), key=lambda r: r["rank"]):
                print(
                    f"{r['tokens']:>7} {r['sp']:>3} {r['rank']:>4} {r['step_s']:>8.3f} "
                    f"{r['peak_rss_growth_mib']:>20.1f} {r['peak_rss_mib']:>13.1f}"
                )
    print()
    print(
        "Ulysses all-to-all volume, Qwen2.5-VL-7B decoder (28 layers, 28 heads, 4 KV heads, head_dim 128, bf16):"
    )
    print("COMPUTED from the shapes, not measured. Bytes one rank sends.")
    print(
        f"{'tokens':>7} {'SP':>3} {'DIPE':>5} {'per layer fwd MiB':>18} {'per step GiB (fwd+recompute+bwd)':>34}"
    )
    for v in qwen25vl_7b_volumes():
        print(
            f"{v['tokens']:>7} {v['sp']:>3} {str(v['dipe']):>5} {v['per_layer_fwd_mib']:>18.1f} "
            f"{v['per_step_gib']:>34.2f}"
        )
    print()
    print(
        "Memory per rank, Qwen2.5-VL-7B on 8 GPUs, every layer recomputed: COMPUTED lower bound (GB), not measured"
    )
    names = list(memory_per_rank_gb(65536, 1, zero_stage=3))
    print(f"{'tokens':>7} {'ZeRO':>4} {'SP':>3} " + " ".join(f"{n:>17}" for n in names))
    for num_tokens in (65536, 131072):
        for stage in (2, 3):
            for sp in (1, 2, 4):
                m = memory_per_rank_gb(num_tokens, sp, zero_stage=stage)
                print(f"{num_tokens:>7} {stage:>4} {sp:>3} " + " ".join(f"{m[n]:>17.1f}" for n in names))


def vision_main(steps: int) -> None:
    grids = vision_row()["image_grid_thw"]
    print(
        f"CPU, fp32, one thread per rank; Qwen2.5-VL tiny ViT widened (hidden 256, 4 heads, MLP 1024, 4 blocks), "
        f"frozen, connector trained; a row of {len(grids)} images, {int(grids.prod(-1).sum())} patches"
    )
    print(
        f"{'SP':>3} {'split':>6} {'rank':>4} {'patches':>8} {'ViT s':>7} {'step s':>7} {'peak RSS growth MiB':>20}"
    )
    for sp, split in ((1, False), (2, False), (2, True), (4, False), (4, True)):
        for r in sorted(launch(0, steps, sp, "--vision-worker", str(int(split))), key=lambda r: r["rank"]):
            print(
                f"{r['sp']:>3} {str(r['split']):>6} {r['rank']:>4} {r['patches']:>8} {r['vit_s']:>7.3f} "
                f"{r['step_s']:>7.3f} {r['peak_rss_growth_mib']:>20.1f}"
            )


if __name__ == "__main__":
    main()
