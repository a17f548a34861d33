"""Shared harness for tests that spawn their own process groups: a private rendezvous, and ranks that must finish.

``run_ranks(target, world, *args)`` starts ``target(rank, world, init_method, results, *args)`` in ``world``
spawned processes; each rank calls ``init_group(backend, rank, world, init_method)`` and puts
``(rank, "ok" | "error", info)`` on ``results``. The rendezvous is a file in a fresh temporary directory
(``file://``), not a TCP port, so concurrent tests (pytest-xdist) can never collide on a port. It fails
(never hangs) when a rank reports an error, dies, or the ranks do not all finish within ``timeout`` seconds;
it returns the ranks' infos.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch.multiprocessing as mp


def init_group(backend: str, rank: int, world: int, init_method: str, timeout_s: float = 60.0) -> None:
    """``dist.init_process_group`` on the harness's rendezvous (call in each spawned rank)."""
    import torch.distributed as dist

    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def run_ranks(
    target: Callable, world: int, *args, timeout: float = 150.0, env: dict[str, str] | None = None
) -> dict[int, object]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.TemporaryDirectory(prefix="flexdist-rdzv-")
    init_method = f"file://{os.path.join(tmp.name, 'store')}"
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})  # spawned children inherit the environment at start
    try:
        procs = [
            ctx.Process(target=target, args=(r, world, init_method, results, *args), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    got: dict[int, tuple[str, object]] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"world={world}: timed out after {timeout}s; finished ranks {sorted(got)}"
                )
            try:
                rank, status, info = results.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (0, None)]
                if dead:
                    codes = [procs[r].exitcode for r in dead]
                    raise AssertionError(f"world={world}: ranks {dead} died (exit codes {codes})") from None
                continue
            got[rank] = (status, info)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        tmp.cleanup()
    errors = [f"rank {r}:\n{info}" for r, (status, info) in sorted(got.items()) if status != "ok"]
    assert not errors, "\n".join(errors)
    return {r: info for r, (_, info) in got.items()}
