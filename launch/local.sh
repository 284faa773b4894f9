#!/usr/bin/env bash
# One node, several GPUs (or CPU processes with gloo): one rank per GPU.
#   launch/local.sh 8 experiment=paper_qwen25vl_7b model.vision_path=/m/Qwen2.5-VL-7B model.llm_path=/m/Qwen2.5-7B
#   launch/local.sh 2 trainer.max_steps=20      # the tiny default on 2 CPU processes
set -euo pipefail
NPROC=${1:?usage: launch/local.sh NUM_PROCS [hydra overrides...]}; shift
cd "$(dirname "$0")/.."
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py "$@"
