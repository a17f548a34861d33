#!/usr/bin/env bash
# Creates ./.venv (Python >= 3.11) and installs flexdist with its test and benchmark extras, editable.
# Sourced by the quick-start scripts; safe to run again (reinstalls only when pyproject.toml changed).
#
# Which torch gets installed:
#   - no NVIDIA GPU visible (no working `nvidia-smi`): the CPU build, torch==2.13.0 (PyTorch's CPU wheel index
#     is added as an extra index so a plain Linux machine does not pull the multi-GB CUDA build);
#   - a GPU: torch==2.13.0 from the default index (the CUDA build).
#   Override with FLEXDIST_TORCH_SPEC (e.g. 'torch==2.11.0') and FLEXDIST_TORCH_INDEX (a wheel index URL,
#   e.g. https://download.pytorch.org/whl/cu130), or set FLEXDIST_SKIP_TORCH=1 to keep the torch you have
#   (then the venv is created with --system-site-packages).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
VENV="${FLEXDIST_VENV:-$root/.venv}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "flexdist needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${FLEXDIST_SKIP_TORCH:-0}" = 1 ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp="$VENV/.flexdist-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-${FLEXDIST_TORCH_SPEC:-}-${FLEXDIST_TORCH_INDEX:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0 2>/dev/null || return 0
fi
"${pip[@]}" install -U "pip>=23" "setuptools>=70" wheel 2>&1 | grep -v '^WARNING: Location' || true

if [ "${FLEXDIST_SKIP_TORCH:-0}" != 1 ]; then
  spec="${FLEXDIST_TORCH_SPEC:-torch==2.13.0}"
  if [ -n "${FLEXDIST_TORCH_INDEX:-}" ]; then
    "${pip[@]}" install "$spec" --index-url "$FLEXDIST_TORCH_INDEX"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "$spec"
  else
    # CPU build: '2.13.0+cpu' sorts above '2.13.0', so the CPU wheel wins whenever an index offers it.
    "${pip[@]}" install "$spec" --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 20 \
      2>&1 | grep -v -E '^WARNING: (Location|Retrying)' || true
  fi
  "$VENV/bin/python" -c 'import torch' || { echo "torch failed to install" >&2; exit 1; }
fi
"${pip[@]}" install -e ".[test,bench]" 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c 'import flexdist.kernels, hydra, pytest' || { echo "flexdist failed to install" >&2; exit 1; }
echo "$want" > "$stamp"
