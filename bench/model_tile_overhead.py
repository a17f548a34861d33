"""CPU model: does planning with `CostModel.tile_overhead` shorten the ring for the bench_cp_sim pack?

Plans the N=8 × 8k document-causal pack of `bench_cp_sim.py` (seed 0) with tile_overhead 0, 2 and 3 and
prices every layout with per-step costs calibrated on the H100 simulation
(`bench/results/h100x2-2026-11-25-s3/call3/cp_sim_h100.json`): a block costs its single-call time (1.2 µs
forward, 3.9 µs backward for 64 heads) and every (query tile, step) with work adds 4 µs forward / 7 µs
backward (per-step calls ran 1.84× / 1.45× the single call's time per block at ~4 blocks per tile).
A prediction, not a measurement:

    python bench/model_tile_overhead.py > bench/results/planner_tile_overhead_cpu.txt
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_planner import make_pack

from flexdist.cp import balance as bal

N, L, BS = 8, 8192, 128
FWD_BLOCK_US, FWD_TILE_US, BWD_BLOCK_US, BWD_TILE_US = 1.2, 4.0, 3.9, 7.0


def main() -> None:
    doc = make_pack(N * L, 4096, "mixture", 0)
    G = bal.global_block_work(doc, BS, True, None)
    comm_weight = (8 / 64) * (400e12 / 450e9) / BS  # as bench_cp_sim: GQA 64:8, 400 TFLOP/s, 450 GB/s
    print(f"N={N} tokens/rank={L} block={BS} blocks={G.shape[0]}")
    for tau in (0.0, 2.0, 3.0):
        assign, info = bal.plan_document(G, N, bal.CostModel(comm_weight=comm_weight, tile_overhead=tau))
        _, _, W = bal._aggregate(G, assign, N)
        A = bal.active_tiles(G, assign, N)
        fwd = bal.step_matrix(W * FWD_BLOCK_US + A * FWD_TILE_US).max(axis=1).sum() / 1e3
        bwd = bal.step_matrix(W * BWD_BLOCK_US + A * BWD_TILE_US).max(axis=1).sum() / 1e3
        print(
            f"tile_overhead={tau:g}: seed {info['seed']}, work max/mean {W.sum(1).max() / W.sum(1).mean():.3f}, "
            f"critical path {bal.step_matrix(W).max(1).sum() / (W.sum() / N):.3f}x total/N, "
            f"active tiles {int(A.sum())} (query blocks {len(assign)}), local work {np.trace(W) / W.sum():.2f}, "
            f"model ring fwd {fwd:.2f} ms bwd {bwd:.2f} ms"
        )


if __name__ == "__main__":
    main()
