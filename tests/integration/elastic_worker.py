"""Run by the elastic-resume test (under torchrun, or imported for one in-process rank): train a few steps,
commit checkpoints at given steps, and dump what every step saw.

usage: torchrun --nproc_per_node N elastic_worker.py OUT_DIR STEPS SAVE_AT override [override ...]
                                                     [--then OUT_DIR STEPS SAVE_AT override ...]
(`--then`: one more run after the first, in the same processes: start-up and imports are paid once per launch)
Each rank writes OUT_DIR/rank_R.pt = {"start": first step, "steps": [{"step", "loss", "rows": {global row:
sample keys}, "epochs": {global row: each sample's epoch}}], "params": {name: tensor}} (rows of this rank only;
the test merges the ranks).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hydra import compose, initialize_config_dir  # noqa: E402

from mmrope.train.config import register_configs, validate  # noqa: E402
from mmrope.train.run import build_session  # noqa: E402


def run_steps(overrides: list[str], steps: int, save_at: list[int]) -> dict:
    register_configs()
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"
    ):
        cfg = validate(compose("train", overrides=overrides))
    s = build_session(cfg)
    out = {"start": s.start_step, "steps": [], "rank": s.dist.rank, "world_size": s.dist.world_size}
    for _ in range(steps):
        loss, _ = s.trainer.train_step()
        s.trainer.step += 1
        rows = s.trainer._step_composition["rows"]
        out["steps"].append(
            {
                "step": s.trainer.step,
                "loss": loss,
                "rows": {r["global_row"]: r["sample_keys"] for r in rows},
                "epochs": {r["global_row"]: r["sample_epochs"] for r in rows},
            }
        )
        if s.trainer.step in save_at:
            s.trainer.save()
    out["params"] = {
        n: p.detach().clone() for n, p in s.engine.module.vlm.named_parameters() if p.requires_grad
    }
    s.metrics.close()
    return out


def main() -> None:
    jobs: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            jobs.append([])
        else:
            jobs[-1].append(arg)
    for job in jobs:
        out_dir, steps, save_at, overrides = Path(job[0]), int(job[1]), job[2], job[3:]
        result = run_steps(overrides, steps, [int(x) for x in save_at.split(",") if x])
        torch.save(result, out_dir / f"rank_{result['rank']}.pt")


if __name__ == "__main__":
    main()
