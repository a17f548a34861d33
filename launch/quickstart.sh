#!/usr/bin/env bash
# The main job, from a fresh clone: sets up ./.venv and runs the default training run on the corpus that
# ships with Python (CPU: 2 gloo ranks, cp=2, tiny model; GPU: every visible GPU over NCCL).
# Extra arguments are Hydra overrides, e.g. `bash launch/quickstart.sh trainer.steps=50`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup_env.sh
VENV="${FLEXDIST_VENV:-$root/.venv}"
export PATH="$VENV/bin:$PATH"
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  exec bash launch/torchrun_single_node.sh "$@"
else
  exec bash launch/cpu_gloo.sh "$@"
fi
