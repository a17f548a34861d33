"""Benchmark: host (CPU) time of the CP planner — the part of ``flexdist.cp.plan(balance="auto")`` that runs
on the host every training step before any attention can start.

For document-packed windows (exponential document lengths, mean 4k, plus 50 tokens) it times, single-threaded,
the planner's CPU phases exactly as ``plan`` runs them: the global block-work grid ``G``, each balance's
layout (contiguous, zigzag, the document planner's search) and each layout's pair work. The BlockMask build
that follows is not included (on CUDA it is a fixed handful of kernels, ~1 ms; ``bench_masks.py``).

Each row prints a fingerprint of the three layouts and their pair work, so two versions of the planner can
be checked to produce the same plans (run it with ``PYTHONPATH`` pointing at another checkout).

    python bench/bench_plan_time.py --out bench/results/plan_time_cpu.json
    python bench/bench_plan_time.py --quick                      # CI smoke: small sizes
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import platform
import sys
import time

import numpy as np
import torch


def packed_doc_ids(S: int, mean: int, seed: int) -> torch.Tensor:
    """``[1, S]`` document ids of exponential lengths (mean ``mean`` + 50 tokens)."""
    g = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    while sum(lens) < S:
        lens.append(int(torch.empty(1).exponential_(1 / mean, generator=g).item()) + 50)
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:S][None]


def plan_cpu(ids: torch.Tensor, N: int, block_size: int) -> tuple[dict[str, float], str]:
    """Phase times (s) of the planner's CPU part and a fingerprint of its layouts and pair work."""
    from flexdist.cp import balance as bal

    pl = sys.modules[importlib.import_module("flexdist.cp.plan").__name__]
    cost = bal.CostModel()
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    extra = ()
    if hasattr(bal, "global_block_work_sparse"):  # as `plan` does it: sparse non-zeros, then the dense array
        nb, nz = bal.global_block_work_sparse(ids, block_size, True, None, cost.partial_weight, None)
        t["block_work"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        G, extra = bal.dense_block_work(nb, nz), (nz,)
        t["dense"] = time.perf_counter() - t0
    else:  # older planners: the dense grid, and (some) its non-zeros once per plan
        G = bal.global_block_work(ids, block_size, True, None, cost.partial_weight, None)
        t["block_work"] = time.perf_counter() - t0
        if hasattr(bal, "nonzeros"):
            t0 = time.perf_counter()
            extra = (bal.nonzeros(G),)
            t["nonzeros"] = time.perf_counter() - t0
    h = hashlib.sha1()
    for name in bal.BALANCES:
        t0 = time.perf_counter()
        perm, _ = pl._layout(name, ids, N, block_size, True, None, cost, None, G, *extra)
        t[f"layout_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        W, need = bal.pair_work_from_blocks(G, bal.block_assignment(perm, N, block_size), N, *extra)
        t[f"pair_work_{name}"] = time.perf_counter() - t0
        h.update(perm.numpy().tobytes() + np.ascontiguousarray(W).tobytes() + need.tobytes())
    t["total"] = sum(t.values())
    return t, h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[131072, 524288], help="tokens per window")
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 8], help="CP world sizes")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per row (the fastest is reported)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 reps (CI smoke)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.ns, args.reps, args.block_size = [4096], [2, 4], 2, 64
    torch.set_num_threads(1)  # the trainer's planner runs on one host thread
    import flexdist.cp.balance as bal

    rows = []
    print(f"planner: {bal.__file__}  torch {torch.__version__}  {platform.processor() or platform.machine()}")
    for S in args.sizes:
        ids = packed_doc_ids(S, 4000, seed=0)
        for N in args.ns:
            plan_cpu(ids, N, args.block_size)  # warm-up
            runs = [plan_cpu(ids, N, args.block_size) for _ in range(args.reps)]
            best = min(runs, key=lambda r: r[0]["total"])[0]
            prints = {fp for _, fp in runs}
            assert len(prints) == 1, f"the planner is not deterministic: {prints}"
            row = {"S": S, "N": N, "block_size": args.block_size, "fingerprint": prints.pop(), **best}
            rows.append(row)
            phases = "  ".join(f"{k} {1e3 * v:.1f}" for k, v in best.items() if k != "total")
            print(f"S={S:8d} N={N:3d}: {1e3 * best['total']:8.1f} ms  [{row['fingerprint']}]  {phases}")
    if args.out:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "planner": bal.__file__}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
