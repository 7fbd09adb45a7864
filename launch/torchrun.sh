#!/usr/bin/env bash
# torchrun on one node (or several with NNODES/NODE_RANK/MASTER_ADDR set on each node).
# Usage: NPROC=8 launch/torchrun.sh [hydra overrides...]
#   multi-node: NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 PBS_RUN_ID=myrun launch/torchrun.sh ...
#   (give every node the same PBS_RUN_ID)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)}
(( NPROC > 0 )) || NPROC=1  # no GPU: one CPU rank
export PBS_RUN_ID=${PBS_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Long contexts fragment the CUDA caching allocator: let segments grow instead.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec torchrun --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m trainer.train "$@"
