"""Run by torchrun from tests/integration/test_families.py: for each (family, ZeRO stage), a few training steps on
2 ranks and a committed checkpoint; each rank dumps its view of every run.

usage: torchrun --nproc_per_node 2 family_worker.py OUT_DIR STEPS FAMILY:STAGE:ROPE[,...] override ...
Writes OUT_DIR/<family>-z<stage>/rank_R.pt = {"losses", "media", "param_sums" (float64 sum per parameter),
"step_dir"} and, on rank 0, "params" (the full fp32 tensors after training) and "initial" (before).
One process group serves every run: several engines in one interpreter save the start-up of each.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hydra import compose, initialize_config_dir  # noqa: E402

from mmrope.train.config import register_configs, validate  # noqa: E402
from mmrope.train.run import build_session  # noqa: E402
from tests.integration.zero_worker import full_params  # noqa: E402


def main() -> None:
    out_dir, steps, runs, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    register_configs()
    for run in runs.split(","):
        family, stage, rope = run.split(":")
        name = f"{family}-z{stage}"
        with initialize_config_dir(
            config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"
        ):
            cfg = validate(
                compose(
                    "train",
                    overrides=[
                        *overrides,
                        f"model.family={family}",
                        f"rope={rope}",
                        f"deepspeed=zero{stage}",
                        f"trainer.run_name={name}",
                        f"trainer.max_steps={steps}",
                    ],
                )
            )
        s = build_session(cfg)
        module = s.engine.module.vlm
        initial = full_params(module, cfg.deepspeed.stage)
        losses, media, samples = [], [], []
        for _ in range(steps):
            losses.append(s.trainer.train_step()[0])
            s.trainer.step += 1
            rows = s.trainer._step_composition["rows"]
            media.append(sorted({k for r in rows for k in ("pixel_values", "pixel_values_videos") if k in r}))
            samples.append(max(r["cu_seqlens"].numel() - 1 for r in rows))  # packed samples in a row
        step_dir = s.trainer.save()
        params = full_params(module, cfg.deepspeed.stage)
        dump = {
            "losses": losses,
            "media": media,
            "samples_per_row": samples,
            "param_sums": {n: float(p.double().sum()) for n, p in params.items()},
            "step_dir": str(step_dir),
        }
        if s.dist.rank == 0:
            dump |= {"params": params, "initial": initial}
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        torch.save(dump, out_dir / name / f"rank_{s.dist.rank}.pt")
        s.metrics.close()


if __name__ == "__main__":
    main()
