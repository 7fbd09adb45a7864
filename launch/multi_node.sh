#!/usr/bin/env bash
# Several nodes through the deepspeed launcher (pdsh/ssh) and a hostfile; run on the first node.
# Usage: HOSTFILE=hostfile launch/multi_node.sh [hydra overrides...]
# hostfile lines: "<host> slots=<gpus>", e.g. "node1 slots=8". Every node needs the same venv and
# repository path and passwordless ssh. Environment variables to forward go in ./.deepspeed_env.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
[[ -f $HOSTFILE ]] || { echo "hostfile not found: $HOSTFILE" >&2; exit 1; }
export PBS_RUN_ID=${PBS_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
# deepspeed forwards only listed variables to remote nodes: make sure the run id travels.
grep -qs '^PBS_RUN_ID=' .deepspeed_env && sed -i "s/^PBS_RUN_ID=.*/PBS_RUN_ID=$PBS_RUN_ID/" .deepspeed_env \
    || echo "PBS_RUN_ID=$PBS_RUN_ID" >> .deepspeed_env
# Long contexts fragment the CUDA caching allocator: let segments grow (forwarded like the id).
grep -qs '^PYTORCH_CUDA_ALLOC_CONF=' .deepspeed_env \
    || echo "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}" >> .deepspeed_env
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module trainer.train "$@"
