"""Shared harness for tests that spawn their own process groups: a free port, and ranks that must finish.

``run_ranks(target, world, *args)`` starts ``target(rank, world, port, results, *args)`` in ``world`` spawned
processes; each rank puts ``(rank, "ok" | "error", info)`` on ``results``. It fails (never hangs) when a rank
reports an error, dies, or the ranks do not all finish within ``timeout`` seconds; it returns the ranks' infos.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    target: Callable, world: int, *args, timeout: float = 150.0, env: dict[str, str] | None = None
) -> dict[int, object]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})  # spawned children inherit the environment at start
    try:
        procs = [
            ctx.Process(target=target, args=(r, world, port, results, *args), daemon=True)
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
    errors = [f"rank {r}:\n{info}" for r, (status, info) in sorted(got.items()) if status != "ok"]
    assert not errors, "\n".join(errors)
    return {r: info for r, (_, info) in got.items()}
