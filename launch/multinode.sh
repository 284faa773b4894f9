#!/usr/bin/env bash
# Several nodes with torchrun, configured from the environment. Run the same command on every node:
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 launch/multinode.sh experiment=paper_qwen25vl_7b ...   # on node0
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 launch/multinode.sh experiment=paper_qwen25vl_7b ...   # on node1
# NPROC_PER_NODE (default: number of visible GPUs) ranks per node; MASTER_PORT defaults to 29500.
# Every node must see the same repository, data and output directory (a shared filesystem).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node (0 .. NNODES-1)}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[ "$NPROC_PER_NODE" -gt 0 ] || { echo "no GPU visible: set NPROC_PER_NODE" >&2; exit 2; }
cd "$(dirname "$0")/.."
exec .venv/bin/python -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  train.py "$@"
