#!/usr/bin/env bash
# One node, N GPUs (N CPU ranks without GPUs) through the deepspeed launcher.
# Usage: NUM_GPUS=8 launch/single_node.sh [hydra overrides...]
#   e.g. NUM_GPUS=8 launch/single_node.sh model.path=/ckpt/llama-3.1-8b deepspeed=zero3 data.seq_len=32768
# All ranks share one run folder through PBS_RUN_ID (set it to resume into a known id).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)}
(( NUM_GPUS > 0 )) || NUM_GPUS=1  # no GPU: one CPU rank
export PBS_RUN_ID=${PBS_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Long contexts fragment the CUDA caching allocator: let segments grow instead.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module trainer.train "$@"
