#!/usr/bin/env bash
# Training on CPU with gloo: NPROC ranks (default 2) on this machine, context parallel over all of them.
# Usage: bash launch/cpu_gloo.sh [hydra overrides...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "$NPROC" -m train "$@"
