#!/usr/bin/env bash
# Training on CPU with gloo: NPROC ranks (default 2) on this machine, context parallel over all of them
# (parallel=cp parallel.cp=NPROC; later overrides win, e.g. `parallel.cp=1` for pure data parallelism).
# The run directory is computed once here and shared by every rank (FLEXDIST_RUN_DIR, default runs/<time>).
# Usage: bash launch/cpu_gloo.sh [hydra overrides...]      e.g. NPROC=4 bash launch/cpu_gloo.sh trainer.steps=50
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
VENV="${FLEXDIST_VENV:-$root/.venv}"
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY="${PYTHON:-python3}"; fi
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export FLEXDIST_RUN_DIR="${FLEXDIST_RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}"
echo "run dir: $FLEXDIST_RUN_DIR ($NPROC gloo ranks)"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m train \
  trainer.device=cpu parallel=cp "parallel.cp=$NPROC" "$@"
