#!/usr/bin/env bash
# Training on one node over NCCL with every visible GPU (or NPROC of them); data parallel by default,
# context parallel with e.g. `parallel=cp parallel.cp=8 trainer.seq_len=65536`.
# The run directory is computed once here and shared by every rank (FLEXDIST_RUN_DIR, default runs/<time>).
# Usage: bash launch/torchrun_single_node.sh [hydra overrides...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
VENV="${FLEXDIST_VENV:-$root/.venv}"
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY="${PYTHON:-python3}"; fi
NPROC="${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
# NVLink SHARP / symmetric-memory multicast off: not available on every machine, and NCCL falls back badly.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export FLEXDIST_RUN_DIR="${FLEXDIST_RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}"
echo "run dir: $FLEXDIST_RUN_DIR ($NPROC ranks)"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m train "$@"
