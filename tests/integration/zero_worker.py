"""Run by torchrun from tests: a few training steps under ZeRO, then each rank dumps its view of the run.

usage: torchrun --nproc_per_node 2 zero_worker.py OUT_DIR STEPS RUNS override [override ...]
RUNS is JSON, {name: {"overrides": [...], "resume_at": N or null}}: the runs, one after another in the same
processes (start-up, imports and the process group are paid once per launch, not per run), each with the common
overrides, then its own, then `trainer.run_name=<name>`. For each run, each rank writes OUT_DIR/<name>/rank_R.pt =
{"losses": [...], "params": {name: full fp32 tensor}, "initial": {...}, "compiled": [module names that
model.compile compiled], ...}.

With `resume_at` N the run also commits a checkpoint at step N, and after its STEPS steps a second session in the
same processes resumes that checkpoint (`trainer.resume=must`) and trains to STEPS again: its losses and final
parameters are saved as "resumed_losses" / "resumed_params" (exact resume: 0->STEPS == 0->N->STEPS).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hydra import compose, initialize_config_dir  # noqa: E402

from mmrope.distributed.compile import compiled_modules  # noqa: E402
from mmrope.train.config import register_configs, validate  # noqa: E402
from mmrope.train.run import build_session  # noqa: E402


def full_params(module: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    if stage == 3:  # partitioned: gather the full tensors on every rank to compare them
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}
    return {n: p.detach().float().clone() for n, p in params.items()}


def seam_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a packed row (a collated batch) through the training seam: the installed encoding, DIPE inputs,
    packing as cu_seqlens."""
    from mmrope.model.install import seam_kwargs

    static = batch.get("static_position_ids")
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            pixel_values_videos=batch.get("pixel_values_videos"),
            video_grid_thw=batch.get("video_grid_thw"),
            use_cache=False,
            **seam_kwargs(
                cu_seqlens=batch["cu_seqlens"],
                static_position_ids=static,
                visual_mask_BL=batch.get("visual_mask") if static is not None else None,
            ),
        ).last_hidden_state
        return model.lm_head(hidden)


def probe_logits(s) -> dict:
    """The trained model's fp32 logits on one more packed row, through the training seam (installed encoding,
    DIPE inputs, packing as cu_seqlens; adapters unmerged), and that row as the model's inputs."""
    from data.pixels import to_device

    # Every rank forwards rank 0's row: under ZeRO-3 the ranks must run the same modules (gathers in lockstep).
    row = [next(s.trainer.rows)]
    torch.distributed.broadcast_object_list(row, src=0)
    batch = to_device(row[0], s.dist.device)
    vlm = s.engine.module.vlm
    vlm.eval()
    logits = seam_logits(vlm, batch).float()
    vlm.train()
    keep = (
        "input_ids",
        "position_ids",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
    )
    keep += ("cu_seqlens", "static_position_ids", "visual_mask")
    return {
        "probe_batch": {k: batch[k].cpu() for k in keep if batch.get(k) is not None},
        "probe_logits": logits.cpu(),
    }


def compose_cfg(overrides: list[str]):
    register_configs()
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"
    ):
        return validate(compose("train", overrides=overrides))


def run(out_dir: Path, steps: int, overrides: list[str], resume_at: int | None) -> None:
    cfg = compose_cfg(overrides)
    s = build_session(cfg)
    module = s.engine.module.vlm
    initial = full_params(module, cfg.deepspeed.stage)
    losses, media = [], []
    for _ in range(steps):
        losses.append(s.trainer.train_step()[0])
        s.trainer.step += 1
        rows = s.trainer._step_composition["rows"]  # what this rank's rows held: ranks may differ
        media.append(sorted({k for r in rows for k in ("pixel_values", "pixel_values_videos") if k in r}))
        if s.trainer.step == resume_at:
            s.trainer.save()
    params = full_params(module, cfg.deepspeed.stage)
    probe = probe_logits(s) if resume_at is not None else {}
    dtypes = sorted({str(p.dtype) for p in module.parameters()})  # what the engine trains in (bf16 proxy)
    out = {
        "losses": losses,
        "media": media,
        "params": params,
        "initial": initial,
        "dtypes": dtypes,
        "compiled": compiled_modules(module),
        "trainable": sorted(n for n, p in module.named_parameters() if p.requires_grad),
        **probe,
    }
    s.metrics.close()
    if resume_at is not None:  # a fresh session in the same processes continues the step-N checkpoint
        resumed = build_session(
            compose_cfg(
                [o for o in overrides if not o.startswith("trainer.resume=")] + ["trainer.resume=must"]
            )
        )
        assert resumed.start_step == resume_at, resumed.start_step
        out["resumed_losses"] = []
        for _ in range(steps - resume_at):
            out["resumed_losses"].append(resumed.trainer.train_step()[0])
            resumed.trainer.step += 1
        out["resumed_params"] = full_params(resumed.engine.module.vlm, cfg.deepspeed.stage)
        resumed.trainer.save()  # step STEPS of the resumed run: what the export tests export
        out["checkpoint_bytes"] = sum(
            f.stat().st_size for f in (resumed.ckpt.dir / f"step_{resume_at}").rglob("*") if f.is_file()
        )
        resumed.metrics.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, out_dir / f"rank_{s.dist.rank}.pt")


def main() -> None:
    out_dir, steps, runs, common = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
    for name, spec in runs.items():
        overrides = [*common, *spec["overrides"], f"trainer.run_name={name}"]
        run(out_dir / name, steps, overrides, spec["resume_at"])


if __name__ == "__main__":
    main()
