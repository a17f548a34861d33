"""CPU list-scheduling model of one CP rank's backward calls (s16): why a rank's dQ / dK/dV ran long.

The 8-rank simulation's layout (bench_cp_sim defaults: 8k tokens per rank, mixture mean 4k, seed 0, the
all-gather planner). Each program costs its full blocks + WP x its partial blocks; the kernels order a head's
programs by 5 x partial + 4 x full (block_sparse._work_order); programs run on 132 SMs, greedy in launch
order. Prints each rank's makespan for the head-group rule (dQ: 32 query heads of a chunk in groups of 8;
dK/dV: 4 K/V heads one at a time), all heads in one group, and LEAD blocks of every head first.

    python bench/results/2026-11-26-s16/model/lead_model.py > bench/results/2026-11-26-s16/model/lead_model.txt
"""

import heapq
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

from bench_cp_sim import layout
from bench_planner import make_pack

from flexdist.cp import balance as bal

N, L, BS, SLOTS, WP = 8, 8192, 128, 132, 1.5
doc = make_pack(N * L, 4096, "mixture", 0)
comm = (8 / 64) * (400e12 / 450e9) / BS
perm = layout("document", doc, N, BS, bal.CostModel(comm_weight=comm, gather=True,
              partial_weight=bal.ALLGATHER_PARTIAL_WEIGHT))  # fmt: skip
d, pos = doc[0], bal.positions_in_document(doc)[0]
kd, kp = d.view(-1, BS), pos.view(-1, BS)


def counts(toks):
    """[q tiles, kv blocks] visible-element counts of one rank's queries against every key."""
    qd, qp = d[toks].view(-1, BS), pos[toks].view(-1, BS)
    out = []
    for t in range(qd.shape[0]):
        vis = (qd[t][None, :, None] == kd[:, None, :]) & (kp[:, None, :] <= qp[t][None, :, None])
        out.append((vis & (qd[t][None, :, None] >= 0)).flatten(1).sum(1).numpy())
    return np.stack(out)


def makespan(work):
    h = [0.0] * SLOTS
    for w in work:
        heapq.heappush(h, heapq.heappop(h) + w)
    return max(h)


def schedule(full, part, heads, group, lead):
    order = np.argsort(-(5 * part + 4 * full), kind="stable")
    w = [full[i] + WP * part[i] for i in order if full[i] + part[i] > 0]
    work = [x for x in w[:lead] for _ in range(heads)]
    work += [x for g0 in range(0, heads, group) for x in w[lead:] for _ in range(min(group, heads - g0))]
    return makespan(work), sum(w) * heads / SLOTS


C = [counts(perm[r * L : (r + 1) * L]) for r in range(N)]
for name, axis, heads, group, mult in (("dQ", 1, 32, 8, 1), ("dK/dV", 0, 4, 1, 8)):
    print(f"{name}: {heads} heads, groups of {group}; makespan / (work / SMs) per rank, and max / mean")
    for label, g, lead in (("rule", group, 0), ("all heads", heads, 0), ("lead 3", group, 3),
                           ("lead 17", group, 17)):  # fmt: skip
        spans, ideals = [], []
        for r in range(N):
            full = mult * (C[r] == BS * BS).sum(axis)
            part = mult * ((C[r] > 0) & (C[r] < BS * BS)).sum(axis)
            m, ideal = schedule(full, part, heads, g, lead)
            spans.append(m)
            ideals.append(ideal)
        s = np.array(spans)
        print(f"  {label:10} " + " ".join(f"{x / i:.3f}" for x, i in zip(spans, ideals))
              + f"  | max/mean {s.max() / s.mean():.3f}")  # fmt: skip
