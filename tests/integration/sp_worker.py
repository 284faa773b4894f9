"""Run by torchrun from the sequence-parallel tests (one launch for all of them: process start-up and
DeepSpeed's import are paid once).

Parity: for each encoding and ZeRO stage, the same packed rows through (a) a plain model on this process alone
(no SP, no DeepSpeed) and (b) the DeepSpeed engine with trainer.sequence_parallel_size=N (N = the launched ranks),
each rank encoding its share of the rows' images and videos (mmrope.distributed.vision_split).
Resume: a real training session under SP (build_session, ZeRO-2, activation checkpointing) run 4 steps with a
checkpoint at step 2, and a second run resumed from that checkpoint.

usage: torchrun --nproc_per_node N sp_worker.py OUT_DIR STAGES CASES RESUME_CASE -- override [override ...]
STAGES like `2,3` (stage 3 runs with activation checkpointing); CASES comma-separated: a rope name, `+dipe` for
DIPE on top, `:mode` for GRAPE's grape_mode, `@family` for another model family (e.g. `grape:axis`,
`mrope+dipe`, `mrope_i@qwen3_vl`); RESUME_CASE one case or `none`.
Each rank writes OUT_DIR/rank_R.pt = {"parity": {(stage, case): {"ref_loss", "sp_loss", "ref_grads",
"sp_grads", "media", "text_only_samples", "row_lens", "row_patches", "vit_patches"}}, "resume": {"full": ...,
"resumed": ..., "vit_patches": ...}, "seconds": {case: s}}; `vit_patches` lists the patches of each vision tower
call of this rank (a dummy call, for an empty share, encodes 1 x 2 x 2 = 4).
"""

import itertools
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hydra import compose, initialize_config_dir  # noqa: E402

from data.loader import PackedRowStream  # noqa: E402
from data.pixels import to_device  # noqa: E402
from mmrope.distributed.objective import SequenceParallelObjective  # noqa: E402
from mmrope.distributed.recompute import apply_activation_checkpointing  # noqa: E402
from mmrope.distributed.sequence_parallel import apply_sequence_parallel  # noqa: E402
from mmrope.encodings import build as build_encoding  # noqa: E402
from mmrope.model.build import build_model  # noqa: E402
from mmrope.model.freeze import apply_freeze  # noqa: E402
from mmrope.model.install import install  # noqa: E402
from mmrope.model.objective import SFTObjective, num_supervised  # noqa: E402
from mmrope.train.config import register_configs, validate  # noqa: E402
from mmrope.train.engine import build_engine, init_distributed, init_sequence_parallel  # noqa: E402
from mmrope.train.run import make_processor, make_sample_processor, shard_urls  # noqa: E402

NUM_ROWS = 2  # rows per step (gradient accumulation over them): together an image, a video, text-only samples


# MHRoPE gives whole KV heads to t/h/w: a tiny model with 4 of them (head_dim 64), split 2 + 2 over the ranks.
MHROPE_MODEL = [
    "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=4",
    "rope.hparams.num_key_value_heads=4",
    "rope.hparams.mrope_section=[1,1,1]",
]


def case_overrides(case: str) -> list[str]:
    case, _, family = case.partition("@")
    name, _, mode = case.replace("+dipe", "").partition(":")
    out = [f"rope={name}", f"rope.dipe={'true' if '+dipe' in case else 'false'}"]
    out += [f"model.family={family}"] if family else []
    return (
        out
        + ([f"rope.hparams.grape_mode={mode}"] if mode else [])
        + (MHROPE_MODEL if name == "mhrope" else [])
    )


def text_only_samples(row: dict) -> int:
    bounds = row["cu_seqlens"].tolist()
    visual_L = row["visual_mask"][0]
    return sum(int(not visual_L[a:b].any()) for a, b in zip(bounds[:-1], bounds[1:]))


def rows_for(cfg, processor, encoding) -> list[dict]:
    """NUM_ROWS rows of the synthetic stream that hold images, a video and text-only samples between them (the
    same rows on every process: a stream of one rank)."""
    stream = PackedRowStream(
        shard_urls(cfg, d),
        make_sample_processor(cfg, processor, encoding),
        max_tokens=cfg.data.max_tokens,
        seed=cfg.data.seed,
        num_slots=1,
    )
    video = other = None
    for row in itertools.islice(iter(stream), 24):  # read only as far as needed
        if video is None and "pixel_values_videos" in row:
            video = row
        elif other is None and "pixel_values" in row and text_only_samples(row):
            other = row
        if video is not None and other is not None:
            return [video, other]
    raise RuntimeError(
        "the synthetic stream no longer has a video row and a row with text-only samples early"
    )


def grads(module: torch.nn.Module, engine_grads: bool) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p) if engine_grads else p.grad  # ZeRO: a collective, every rank calls it
            out[n] = g.detach().float().clone() if g is not None else None
    return out


def count_vit_patches(visual: torch.nn.Module) -> list[int]:
    """Patches of every call of the vision tower from now on (its input is one row of pixels per patch)."""
    calls: list[int] = []
    visual.register_forward_pre_hook(lambda module, args: calls.append(int(args[0].shape[0])))
    return calls


def run_case(case: str, stages: list[int], overrides: list[str], sp) -> dict:
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"
    ):
        cfg = validate(compose("train", overrides=overrides + case_overrides(case)))
    processor = make_processor(cfg, d)
    encoding = build_encoding(cfg.rope.name, **cfg.rope.hparams)
    raw = rows_for(cfg, processor, encoding)
    rows = [to_device(r, d.device) for r in raw]
    num_global = sum(num_supervised(r) for r in rows)

    def model(checkpointing: bool):
        m = build_model(
            cfg.model, vocab_size=len(processor.tokenizer), special_ids=processor.special_ids, seed=0
        )
        apply_freeze(m, cfg.model.freeze)
        apply_activation_checkpointing(m, "all" if checkpointing else "none")
        return m

    # (a) the reference: the whole rows on one process, no sequence parallelism.
    ref = model(checkpointing=False)
    install(ref, encoding, attn_backend=cfg.model.attn_backend, dipe=cfg.rope.dipe)
    ref_obj = SFTObjective(ref)
    ref_loss = 0.0
    for row in rows:
        loss = ref_obj(row, num_global_tokens=num_global)
        loss.backward()
        ref_loss += float(loss.detach())
    common = {
        "ref_loss": ref_loss,
        "ref_grads": grads(ref, engine_grads=False),
        "media": sorted({k for r in rows for k in ("pixel_values", "pixel_values_videos") if k in r}),
        "text_only_samples": sum(text_only_samples(r) for r in raw),
        "row_lens": [int(r["input_ids"].shape[1]) for r in rows],
        # per row, the patches of each image then each video: what the vision split shares out
        "row_patches": [
            [int(n) for k in ("image_grid_thw", "video_grid_thw") if k in r for n in r[k].prod(-1).tolist()]
            for r in rows
        ],
    }

    # (b) the same rows, split over the SP group, under the DeepSpeed engine as the trainer drives it.
    out = {}
    for stage in stages:
        cfg.deepspeed.stage = stage
        vlm = model(checkpointing=stage == 3)
        install(vlm, encoding, attn_backend=cfg.model.attn_backend, dipe=cfg.rope.dipe)
        apply_sequence_parallel(vlm, sp)
        obj = SequenceParallelObjective(vlm, sp)
        engine, _, _ = build_engine(obj, cfg, d.world_size)
        vit_patches = count_vit_patches(vlm.model.visual)
        sp_loss = torch.zeros((), dtype=torch.float64)
        for i, row in enumerate(rows):
            loss = engine(row, num_global_tokens=num_global)
            engine.backward(loss * d.world_size, scale_wrt_gas=False)
            sp_loss += loss.detach().double()
            if i < len(rows) - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro step
        dist.all_reduce(sp_loss)  # each rank holds its slice's share of the loss
        out[(stage, case)] = {
            **common,
            "sp_loss": float(sp_loss),
            "sp_grads": grads(vlm, engine_grads=True),
            "vit_patches": vit_patches,
        }
        engine.destroy()
    return out


def resume_runs(case: str, overrides: list[str], out_dir: Path) -> dict:
    """An uninterrupted SP run of 4 steps (checkpoint at 2) and a run resumed from that checkpoint."""
    from tests.integration.elastic_worker import run_steps

    runs = out_dir / "runs"
    vit_patches: list[int] = []  # every vision tower call of this rank, both runs (a global hook: the session
    # builds its model inside run_steps)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: vit_patches.append(int(args[0].shape[0])) if hasattr(m, "merger") else None
    )
    extra = ["deepspeed=zero2", "model.activation_checkpointing=all", "trainer.max_steps=4"]
    extra += ["trainer.optim.lr=1e-3", "data.num_slots=2"]
    full = run_steps([*overrides, *extra, *case_overrides(case), "trainer.run_name=full"], 4, [2])
    if d.rank == 0:  # the resumed run's folder holds step 2 of the full run only
        ckpts = runs / "resumed" / "checkpoints"
        ckpts.mkdir(parents=True)
        shutil.copytree(runs / "full" / "checkpoints" / "step_2", ckpts / "step_2")
        (ckpts / "latest").write_text("step_2")
    dist.barrier()
    resumed = run_steps(
        [*overrides, *extra, *case_overrides(case), "trainer.run_name=resumed", "trainer.resume=must"], 2, []
    )
    handle.remove()
    return {"full": full, "resumed": resumed, "vit_patches": vit_patches}


def main() -> None:
    global d
    sep = sys.argv.index("--")
    out_dir, stages, cases, resume_case = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    register_configs()
    d = init_distributed()
    overrides = sys.argv[sep + 1 :] + [
        f"trainer.output_dir={out_dir / 'runs'}",
        f"trainer.sequence_parallel_size={d.world_size}",
    ]
    overrides += [f"trainer.global_batch_size={NUM_ROWS}", "trainer.precision=fp32"]
    sp = init_sequence_parallel(d, d.world_size)
    results: dict = {"parity": {}}
    for case in cases.split(","):
        tic = time.perf_counter()
        results["parity"].update(run_case(case, [int(s) for s in stages.split(",")], overrides, sp))
        results.setdefault("seconds", {})[case] = time.perf_counter() - tic
    if resume_case != "none":
        tic = time.perf_counter()
        results["resume"] = resume_runs(resume_case, overrides, out_dir)
        results["seconds"]["resume"] = time.perf_counter() - tic
    torch.save(results, out_dir / f"rank_{d.rank}.pt")


d = None

if __name__ == "__main__":
    main()
