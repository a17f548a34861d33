"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout under ``<run_dir>/checkpoints/``::

    step_00000300/            a complete checkpoint (only ever created by a rename)
        .metadata, __0_0.distcp, …   DCP shards: model + optimizer state (sharded FSDP2 DTensors)
        trainer_state.pt      step, scheduler, data-loader state (rank 0)
        rng_rank{r}.pt        each rank's torch RNG state
        COMPLETE              written last, before the rename
    step_00000400.tmp/        a save in progress (or a crash mid-save): never loaded, removed by the next save

A save writes everything into ``step_N.tmp``, waits on a barrier until every rank has finished writing, then
rank 0 writes ``COMPLETE`` and renames the directory to ``step_N`` (an atomic ``rename`` on POSIX), and prunes
all but the newest ``keep_last``. A crash at any point leaves either the previous checkpoints untouched or a
``.tmp`` directory that :func:`latest_checkpoint` ignores. Checkpoints need a file system shared by all
ranks (multi-node: a network file system).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_RE = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)``, oldest first (``.tmp`` and marker-less directories skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final ``step_N`` path."""
    rank = dist.get_rank()
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # leftovers of a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    dist.barrier()  # every rank has finished writing into tmp
    if rank == 0:
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # re-saving a step (e.g. final save right after an interval save)
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Collective: load model + optimizer (resharded to the current mesh) and this rank's RNG; returns the
    trainer state (step, scheduler, data loader) saved by rank 0."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: keep the seeded RNG
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return torch.load(path / "trainer_state.pt", weights_only=True)
