"""How much of a CP rank's kernel call is tail: list-scheduling model of the forward grid (CPU, no GPU).

Each program of the forward kernel is one (query tile, head) and costs its number of visible key blocks.
The GPU runs ``--slots`` programs at a time (H100 / H200: 132 SMs × 2 CTAs of the 4-warp tile) and starts them
longest-first (the launch order with all heads in one group, the best case). The makespan of that greedy
schedule against the perfectly divided work (total / slots) is the fraction of the call the SMs can be
busy; 1.0 means no tail. Printed for the whole sequence on one GPU and for every rank's call of the
all-gather strategy (its query shard against every key) under the document planner: with long documents
one query tile's row can be a large share of a rank's work, so the tail that is negligible on one GPU
grows as the work is divided by N, while the longest row does not shrink.

    python bench/model_tail.py --tokens-per-rank 8192 --ns 2 8 --out bench/results/model_tail_cpu.txt
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cp_sim import layout
from bench_planner import make_pack

from flexdist.cp import balance as bal


def row_blocks(
    doc: torch.Tensor, q_tokens: torch.Tensor, bs: int, kv_blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """Visible key blocks of each query tile (``bs`` consecutive entries of ``q_tokens``), document-causal;
    with ``kv_blocks`` (global block indices of one key shard) only those blocks count (one ring step)."""
    lo, hi = bal.visible_intervals(doc, True, None)
    lo, hi = lo[0, q_tokens], hi[0, q_tokens]  # each token sees keys [lo, hi)
    n = q_tokens.numel() // bs
    lo_t = lo[: n * bs].view(n, bs).min(1).values // bs
    hi_t = (hi[: n * bs].view(n, bs).max(1).values + bs - 1) // bs
    # a tile's tokens are one or a few documents: the union of their ranges, in blocks (an upper bound when
    # a tile spans documents with a gap between their ranges; exact inside one document)
    if kv_blocks is None:
        return hi_t - lo_t
    owned = torch.zeros(doc.shape[1] // bs + 1, dtype=torch.long)
    owned[kv_blocks + 1] = 1
    c = owned.cumsum(0)  # c[i] = owned blocks among 0..i-1
    return c[hi_t] - c[lo_t]


def makespan(work: list[int], slots: int) -> float:
    """Greedy list scheduling in the given launch order on ``slots`` identical workers."""
    heap = [0.0] * slots
    for w in work:
        t = heapq.heappop(heap)
        heapq.heappush(heap, t + w)
    return max(heap)


def busy_fraction(tile_work: torch.Tensor, heads: int, slots: int, group: int) -> tuple[float, int, float]:
    """Busy fraction of the launch order the kernels use: heads in groups of ``group``, each group's tiles
    longest-first across its heads (``group = heads``: globally longest-first; 1: one head after another)."""
    tiles = sorted((int(w) for w in tile_work.tolist()), reverse=True)
    work = []
    for g0 in range(0, heads, group):
        work += [w for w in tiles for _ in range(min(group, heads - g0))]
    total = sum(work)
    return total / slots / makespan(work, slots), max(work), total / slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-rank", type=int, default=8192)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--mean-doc", type=int, default=4096)
    ap.add_argument("--dist", default="mixture", choices=["exp", "mixture"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--slots", type=int, default=264, help="programs in flight (132 SMs x 2 CTAs)")
    ap.add_argument("--head-groups", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--ring", action="store_true", help="also every (rank, step) call of the plain ring")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bs, H = args.block_size, args.heads
    lines = [
        f"forward grid tail model: {H} heads, {bs}-token tiles, {args.slots} programs in flight, longest first",
        f"{'N':>3} {'seed':>4} {'call':>12} {'busy':>6} {'longest row':>11} {'work/slot':>9}",
    ]
    lines[1] = (
        f"{'N':>3} {'seed':>4} {'group':>5} {'call':>12} {'busy':>6} {'longest row':>11} {'work/slot':>9}"
    )
    for N in args.ns:
        for seed in args.seeds:
            S = N * args.tokens_per_rank
            doc = make_pack(S, args.mean_doc, args.dist, seed)
            perm = layout("document", doc, N, bs, bal.CostModel())
            L = args.tokens_per_rank
            rows = [("one GPU", row_blocks(doc, torch.arange(S), bs))]
            rows += [(f"rank {r}", row_blocks(doc, perm[r * L : (r + 1) * L], bs)) for r in range(N)]
            for hg in args.head_groups:
                worst = 1.0
                for name, tw in rows:
                    f, mx, per = busy_fraction(tw, H, args.slots, hg)
                    if name != "one GPU":
                        worst = min(worst, f)
                    lines.append(f"{N:>3} {seed:>4} {hg:>5} {name:>12} {f:6.3f} {mx:11d} {per:9.1f}")
                lines.append(f"{N:>3} {seed:>4} {hg:>5} {'worst rank':>12} {worst:6.3f}")
            if args.ring:
                # plain ring: rank r's queries against shard (r - t) mod N at step t; per step the slowest rank
                # sets the pace, so report the work-weighted busy fraction of the per-step maxima
                shard_blocks = [perm[j * L : (j + 1) * L : bs] // bs for j in range(N)]
                for hg in args.head_groups:
                    ideal = actual = 0.0
                    for t in range(N):
                        spans, ideals = [], []
                        for r in range(N):
                            tw = row_blocks(doc, perm[r * L : (r + 1) * L], bs, shard_blocks[(r - t) % N])
                            if int(tw.sum()) == 0:
                                continue
                            f, _, per = busy_fraction(tw, H, args.slots, hg)
                            spans.append(per / f)
                            ideals.append(per)
                        if spans:
                            actual += max(spans)
                            ideal += sum(ideals) / N
                    lines.append(f"{N:>3} {seed:>4} {hg:>5} {'ring steps':>12} {ideal / actual:6.3f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
