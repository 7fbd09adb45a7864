#!/usr/bin/env bash
# Install this project from a wheelhouse built by launch/build_wheelhouse.sh, without network.
# Usage: launch/install_offline.sh [WHEELHOUSE] [extra pip args...]   (default: wheelhouse/)
# torch (and triton) must already be installed in the active environment.
set -euo pipefail
WHEELHOUSE=${1:-wheelhouse}; shift || true
[[ -d $WHEELHOUSE ]] || { echo "wheelhouse not found: $WHEELHOUSE" >&2; exit 1; }
python -c "import torch" 2>/dev/null || { echo "install torch first (not in the wheelhouse)" >&2; exit 1; }
DS_BUILD_OPS=0 python -m pip install --no-index --find-links "$WHEELHOUSE" "$@" pbs-finetune
python -c "import deepspeed, hydra, omegaconf, wandb, trainer; print('offline install OK')"
