#!/usr/bin/env bash
# Install this project from a wheelhouse built by launch/build_wheelhouse.sh, without network.
# Usage: launch/install_offline.sh [WHEELHOUSE] [extra pip args...]   (default: wheelhouse/)
# torch (and triton) must already be installed in the active environment. Installs exactly the
# wheelhouse's wheels (a --minimal one relies on what the image has), then reports `pip check`.
set -euo pipefail
WHEELHOUSE=${1:-wheelhouse}; shift || true
[[ -d $WHEELHOUSE ]] || { echo "wheelhouse not found: $WHEELHOUSE" >&2; exit 1; }
python -c "import torch" 2>/dev/null || { echo "install torch first (not in the wheelhouse)" >&2; exit 1; }
python -m pip install --no-index --no-deps "$@" "$WHEELHOUSE"/*.whl
python -m pip check || echo "warning: unmet dependencies above (matplotlib only matters for W&B mask images)" >&2
python -c "import deepspeed, hydra, omegaconf, wandb, trainer.data; print('offline install OK')"
