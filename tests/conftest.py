"""pytest setup: CPU by default; Triton kernels run under the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined (Triton reads it when the
decorator runs), so it is arranged here, at conftest import, before test modules import flexdist.kernels.
Tests marked ``gpu`` are skipped cleanly without CUDA.
"""

from __future__ import annotations

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """The device kernel tests run on: CUDA where present, else the CPU (Triton interpreter)."""
    return "cuda" if _cuda_available() else "cpu"
