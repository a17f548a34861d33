#!/usr/bin/env bash
# Training on one node over NCCL with every visible GPU (or NPROC of them).
# Usage: bash launch/torchrun_single_node.sh [hydra overrides...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec torchrun --standalone --nproc-per-node "$NPROC" -m train "$@"
