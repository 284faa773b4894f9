#!/usr/bin/env bash
# Several nodes with the `deepspeed` launcher (ssh/pdsh to every host of a hostfile), started from one node:
#   launch/deepspeed.sh launch/hostfile experiment=paper_qwen25vl_7b model.vision_path=... model.llm_path=...
# The hostfile lists one host per line with its GPU count (see launch/hostfile.example). The hosts must
# reach each other by passwordless ssh and share the repository, data and output directory.
set -euo pipefail
HOSTFILE=${1:?usage: launch/deepspeed.sh HOSTFILE [hydra overrides...]}; shift
HOSTFILE=$(realpath "$HOSTFILE")
MASTER_PORT=${MASTER_PORT:-29500}
cd "$(dirname "$0")/.."
# --no_local_rank: Hydra parses the arguments, so no `--local_rank=N` is appended (LOCAL_RANK is in the env).
exec .venv/bin/deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --no_local_rank train.py "$@"
