#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up ./.venv, checks lint and formatting, runs pytest.
# CPU by default (Triton kernels under TRITON_INTERPRET=1, distributed tests on gloo); on a machine with a
# GPU the tests marked `gpu` run too. Extra arguments go to pytest, e.g. `bash launch/test.sh -k ring`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup_env.sh
VENV="${FLEXDIST_VENV:-$root/.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
workers="${FLEXDIST_TEST_WORKERS:-$(nproc)}"
exec "$VENV/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
