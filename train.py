"""mmrope training entry point.

    python train.py                                   # the embedded default: tiny Qwen2.5-VL, synthetic shards, CPU
    python train.py rope=vanilla trainer.max_steps=20 deepspeed=zero3
    python train.py experiment=paper_qwen25vl_7b model.vision_path=/m/Qwen2.5-VL-7B model.llm_path=/m/Qwen2.5-7B
    torchrun --nproc_per_node 8 train.py ...           # see launch/ for multi-GPU, multi-node and SLURM

Compose (Hydra: configs/train.yaml + groups) -> validate (typed schema, errors name the key) -> run.
"""

from __future__ import annotations

import os
import sys

import hydra
import torch
from omegaconf import DictConfig

from mmrope.train.config import register_configs, validate
from mmrope.train.rundir import release

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(dict_cfg: DictConfig) -> float | None:
    # The run's record (.hydra/*.yaml, train.log) is written only once the invocation is accepted, so a refused one
    # leaves an existing run as it was (mmrope/train/rundir.py).
    try:
        cfg = validate(dict_cfg)  # every semantic check runs here, before any model or data is touched

        from mmrope.train.run import run  # heavy imports only once the config is known to be good

        result = run(cfg, record=dict_cfg)  # checks the run folder against trainer.resume, then claims it
    except BaseException:
        release()  # a refused new run leaves no empty folder behind
        raise
    return result.last_loss  # Hydra sweepers (e.g. Optuna) can optimise this


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Name DeepSpeed's accelerator before anything imports it: left to detect one, it warns on every run
    # ("Setting accelerator to CPU ... unable to detect it") on a CPU machine.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    sys.exit(main())
