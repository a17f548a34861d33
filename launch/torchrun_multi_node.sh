#!/usr/bin/env bash
# Multi-node training: run this same command on every node (c10d rendezvous on MASTER_ADDR:MASTER_PORT;
# torchrun assigns node ranks, so NODE_RANK is not needed). Checkpoints need a file system shared by all nodes.
#
#   NNODES=4 MASTER_ADDR=node0 bash launch/torchrun_multi_node.sh model=8b parallel=cp parallel.cp=8 trainer=long
#
# Environment: NNODES (required), MASTER_ADDR (required), MASTER_PORT (29500), NPROC (GPUs per node, default
# all visible), RDZV_ID (a job id shared by all nodes, default "flexdist"), FLEXDIST_RUN_DIR (default
# runs/<RDZV_ID>: the same path on every node, computed without talking to the other nodes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
VENV="${FLEXDIST_VENV:-$root/.venv}"
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY="${PYTHON:-python3}"; fi
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of the first node}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-flexdist}"
NPROC="${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export FLEXDIST_RUN_DIR="${FLEXDIST_RUN_DIR:-runs/$RDZV_ID}"
echo "run dir: $FLEXDIST_RUN_DIR ($NNODES nodes × $NPROC ranks, rendezvous $MASTER_ADDR:$MASTER_PORT id $RDZV_ID)"
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  -m train "$@"
