"""CP attention on CUDA with NCCL: the exactness cases of test_cp.py with the Triton kernel, world sizes 2..ngpu.

Skipped (with the reason) without at least 2 CUDA GPUs. Each world size is one spawned NCCL process group
(one GPU per rank) running every case of ``test_cp.cases()`` in fp32 at two sizes against the fp64 dense
reference on the full sequence, plus the bad-input checks. Environment for the workers: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (no NVLink multicast). Choose world sizes with FLEXDIST_CP_NCCL_WORLDS
(e.g. ``2,4``; default all of 2..ngpu), the dtype with FLEXDIST_CP_NCCL_DTYPE (float32 or bfloat16), the
BlockMask block sizes with FLEXDIST_CP_NCCL_BS (default ``32,64``) and a range of cases with
FLEXDIST_CP_NCCL_CASES (e.g. ``0-23`` or ``36,38,47-50``; each case compiles new kernel variants on a cold cache):

    python -m pytest tests/test_cp_nccl.py -q
"""

from __future__ import annotations

import os

import pytest
import torch
from test_cp import spawn_world

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _ngpu() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _worlds() -> list[int]:
    env = os.environ.get("FLEXDIST_CP_NCCL_WORLDS")
    if env:
        return [int(w) for w in env.split(",") if w.strip()]
    return list(range(2, 9))


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", _worlds())
def test_cp_exact_nccl(world: int) -> None:
    n = _ngpu()
    if n < 2:
        pytest.skip(f"needs >= 2 CUDA GPUs for NCCL context parallelism, found {n}")
    if world > n:
        pytest.skip(f"world size {world} needs {world} GPUs, found {n}")
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dtype = os.environ.get("FLEXDIST_CP_NCCL_DTYPE", "float32")
    spawn_world(
        world,
        backend="nccl",
        device_kind="cuda",
        kernel_backend="auto",
        dtype_name=dtype,
        timeout=840.0,
        env=NCCL_ENV,
        min_cases=1 if os.environ.get("FLEXDIST_CP_NCCL_CASES") else 11,
    )
