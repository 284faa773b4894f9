"""Run by torchrun from tests: a few training steps under ZeRO, then each rank dumps its view of the run.

usage: torchrun --nproc_per_node 2 zero_worker.py OUT_DIR STEPS override [override ...]
Each rank writes OUT_DIR/rank_R.pt = {"losses": [...], "params": {name: full fp32 tensor}, "initial": {...},
"compiled": [module names that model.compile compiled], ...}.
"""

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


def main() -> None:
    out_dir, steps, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    register_configs()
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"
    ):
        cfg = validate(compose("train", overrides=overrides))
    s = build_session(cfg)
    module = s.engine.module.vlm
    initial = full_params(module, cfg.deepspeed.stage)
    losses, media = [], []
    for _ in range(steps):
        losses.append(s.trainer.train_step()[0])
        rows = s.trainer._step_composition["rows"]  # what this rank's rows held: ranks may differ
        media.append(sorted({k for r in rows for k in ("pixel_values", "pixel_values_videos") if k in r}))
    params = full_params(module, cfg.deepspeed.stage)
    dtypes = sorted({str(p.dtype) for p in module.parameters()})  # what the engine trains in (bf16 proxy)
    torch.save(
        {
            "losses": losses,
            "media": media,
            "params": params,
            "initial": initial,
            "dtypes": dtypes,
            "compiled": compiled_modules(module),
        },
        out_dir / f"rank_{s.dist.rank}.pt",
    )


if __name__ == "__main__":
    main()
