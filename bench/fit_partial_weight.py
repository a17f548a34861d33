"""Fit per-rank all-gather kernel times to (full, partial) block counts: where ALLGATHER_PARTIAL_WEIGHT comes from.

Reads ``bench_cp_sim.py`` JSONs (CPU only), rebuilds each ``allgather/hc<c>`` row's layout from the run's
arguments, counts every rank's full and partial (query block, key block) pairs, and least-squares fits
``time_r = a·full_r + b·partial_r`` for the forward, dK/dV, dQ and their sum; ``b / a`` is the weight a
partial block should carry in the planner's per-rank totals (`flexdist.cp.balance.ALLGATHER_PARTIAL_WEIGHT`):

    python bench/fit_partial_weight.py bench/results/2026-11-26-s8/call*/cp_sim_h200.json \\
        bench/results/2026-11-26-s9/call*/cp_sim*_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cp_sim import layout
from bench_planner import make_pack

from flexdist.cp import balance as bal
from flexdist.cp.plan import _pair_work_tokens


def _cost(balance: str, a: dict) -> bal.CostModel:
    """The planner cost the run used for this balance (as bench_cp_sim.simulate builds it)."""
    comm = (a["hkv"] / a["hq"]) * (a["tflops_model"] * 1e12 / (a["link_gbs"] * 1e9)) / a["block_size"]
    if balance == "document@gather":
        return bal.CostModel(comm_weight=comm, gather=True, partial_weight=bal.ALLGATHER_PARTIAL_WEIGHT)
    return bal.CostModel(comm_weight=comm)


def fit(path: str) -> list[dict]:
    with open(path) as f:
        d = json.load(f)
    a = d["meta"]["args"]
    out = []
    for r in d["rows"]:
        if not r["strategy"].startswith("allgather/hc") or r["strategy"].endswith("+lf"):
            continue
        N, L, bs = r["N"], r["tokens_per_rank"], a["block_size"]
        doc = make_pack(N * L, a["mean_doc"], a["dist"], a["seed"])
        perm = layout(r["balance"].split("@")[0], doc, N, bs, _cost(r["balance"], a))
        lo, hi = bal.visible_intervals(doc, True, None)
        full = _pair_work_tokens(perm, N, lo, hi, bs, 0.0)[0].sum(1)
        part = _pair_work_tokens(perm, N, lo, hi, bs, 1.0)[0].sum(1) - full
        A = np.stack([full, part], 1)
        fwd = np.array(r["chunk_fwd_ms"]).sum(0)
        dkdv = np.array(r["chunk_dkdv_ms"]).sum(0)
        dq = np.array(r["chunk_dq_ms"]).sum(0)
        row = dict(file=path, balance=r["balance"], strategy=r["strategy"])
        for name, t in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq), ("all", fwd + dkdv + dq)):
            c, *_ = np.linalg.lstsq(A, t, rcond=None)
            row[f"w_{name}"] = float(c[1] / c[0])
            row[f"max_over_mean_{name}"] = float(t.max() / t.mean())
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    for path in args.files:
        for r in fit(path):
            print(
                f"{r['file']}  {r['balance']:15} {r['strategy']:14} partial weight fwd {r['w_fwd']:.2f} "
                f"dkdv {r['w_dkdv']:.2f} dq {r['w_dq']:.2f} all {r['w_all']:.2f} | slowest rank / mean "
                f"fwd {r['max_over_mean_fwd']:.3f} all {r['max_over_mean_all']:.3f}"
            )


if __name__ == "__main__":
    main()
