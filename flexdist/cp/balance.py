"""Token→rank sharding planners and the block-level work model they optimise.

A *layout* is a permutation ``perm`` of the ``S`` global token indices: rank ``r`` holds the tokens
``perm[r*L:(r+1)*L]`` (``L = S / N``), always in ascending global order inside a rank (so the visible keys of
a query are a contiguous run of a shard's local indices, which the mask builder relies on).

Work model. A document mask restricted to contiguous documents (maximal runs of one id) gives every query
token one contiguous interval of visible global key positions. From those intervals we count, for a query
token set and a key token set, the (query block, key block) pairs the kernel visits: *full* (mask not
evaluated) and *partial* (mask evaluated). The work of ring step ``t`` on rank ``r`` is the number of visited
blocks of ``(q shard r, kv shard (r - t) mod N)``; the ring is synchronised per step, so the predicted time is
``sum_t max_r max(work(r, t), transfer(t + 1))`` (transfers for the next step overlap the current compute).

Planners (``balance=``):
- ``contiguous``: rank r holds tokens [r·L, (r+1)·L).
- ``zigzag``: head-tail, 2N chunks, rank r holds chunks r and 2N−1−r (the classic causal balancer).
- ``document``: whole blocks of ``block_size`` tokens are assigned to ranks (equal counts, no padding,
  documents of any length) to minimise the predicted ring time: the best of a family of seed layouts
  (chunks dealt cyclically or snake-wise, from contiguous to block striping: see `_seed_layouts`) refined
  by a deterministic swap search on the critical steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BALANCES = ("contiguous", "zigzag", "document")


# ----------------------------------------------------------------------------------------------------------
# per-token visibility intervals
# ----------------------------------------------------------------------------------------------------------
def document_runs(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) global position of each token's document run, ``[B, S]`` each.

    Raises if a non-negative id occurs in two separate runs: the planners and the fast mask builder treat a
    document as one contiguous run of tokens (how packing produces them).
    """
    B, S = doc_ids.shape
    d = doc_ids.long()
    change = torch.ones(B, S, dtype=torch.bool, device=d.device)
    change[:, 1:] = d[:, 1:] != d[:, :-1]
    pos = torch.arange(S, device=d.device).expand(B, S)
    start = torch.where(change, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end_marker = torch.ones(B, S, dtype=torch.bool, device=d.device)
    end_marker[:, :-1] = change[:, 1:]
    end_pos = torch.where(end_marker, pos + 1, torch.full_like(pos, S))
    end = end_pos.flip(1).cummin(dim=1).values.flip(1)
    # contiguity check: number of runs with id >= 0 must equal number of distinct ids >= 0 (per batch row)
    for b in range(B):
        ids = d[b][change[b]]
        ids = ids[ids >= 0]
        if ids.numel() != torch.unique(ids).numel():
            uniq, counts = torch.unique(ids, return_counts=True)
            bad = uniq[counts > 1][:5].tolist()
            raise ValueError(
                f"doc_ids[{b}] has documents split into several runs (ids {bad}); a document must be one "
                "contiguous run of tokens (relabel repeated ids)"
            )
    return start, end


def visible_intervals(
    doc_ids: torch.Tensor, causal: bool = True, window: int | None = None, prefix: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive interval ``[lo, hi]`` of global key positions each token may attend to, ``[B, S]`` each.

    Padding tokens (negative id) get ``lo = 1, hi = 0`` (empty). Matches `DocumentMaskMod` semantics for
    contiguous documents: same document and (causal) ``kv <= q``, (window W) ``q - kv < W``. With a prefix-LM
    prefix of P tokens the interval is the hull of the prefix and the causal range (exact without a window,
    a superset with one — the work model then over-counts, which is safe for step skipping).
    """
    B, S = doc_ids.shape
    start, end = document_runs(doc_ids)
    p = torch.arange(S, device=doc_ids.device).expand(B, S)
    lo = start.clone()
    hi = p.clone() if causal else end - 1
    if window is not None:
        lo = torch.maximum(lo, p - window + 1)
        if not causal:
            hi = torch.minimum(hi, p + window - 1)
    if prefix:
        lo = start.clone()
        hi = torch.maximum(hi, torch.minimum(start + prefix - 1, end - 1))
    pad = doc_ids < 0
    lo = torch.where(pad, torch.ones_like(lo), lo)
    hi = torch.where(pad, torch.zeros_like(hi), hi)
    return lo, hi


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (0 at a document's first token; 0 for padding)."""
    start, _ = document_runs(doc_ids)
    p = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(start)
    return torch.where(doc_ids < 0, torch.zeros_like(p), p - start)


def pair_blocks(
    lo: torch.Tensor, hi: torch.Tensor, kv_pos: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visited blocks of one (query tokens, key tokens) pair.

    lo, hi: ``[B, Lq]`` visibility intervals of the query tokens (global positions).
    kv_pos: ``[Lk]`` ascending global positions of the key tokens.
    Returns ``(nonempty, full)`` bool ``[B, Qb, Kb]`` (``Qb = ceil(Lq/bs)``, ``Kb = ceil(Lk/bs)``).
    Cost O(Lq log Lk + Qb·Kb): never an Lq×Lk tensor.
    """
    B, Lq = lo.shape
    Lk = kv_pos.shape[0]
    bs = block_size
    Qb, Kb = -(-Lq // bs), -(-Lk // bs)
    kv = kv_pos.to(lo.device).long().contiguous()
    a = torch.searchsorted(kv, lo.contiguous())
    b = torch.searchsorted(kv, hi.contiguous(), right=True)
    valid = a < b
    qblk = (torch.arange(Lq, device=lo.device) // bs).expand(B, Lq)
    diff = torch.zeros(B, Qb, Kb + 1, dtype=torch.int32, device=lo.device)
    first = torch.where(valid, a // bs, torch.full_like(a, Kb))
    last1 = torch.where(valid, (b - 1) // bs + 1, torch.full_like(b, Kb))
    flat = diff.view(B, -1)
    one = torch.ones(B, Lq, dtype=torch.int32, device=lo.device)
    flat.scatter_add_(1, qblk * (Kb + 1) + first, one)
    flat.scatter_add_(1, qblk * (Kb + 1) + last1, -one)
    nonempty = diff.cumsum(-1)[..., :Kb] > 0
    # full: every query token of the block sees every key of the block
    big = torch.iinfo(torch.long).max // 4
    a_eff = torch.where(valid, a, torch.full_like(a, big))
    b_eff = torch.where(valid, b, torch.full_like(b, -1))
    pad = Qb * bs - Lq
    if pad:
        a_eff = torch.cat([a_eff, torch.full((B, pad), -1, dtype=a.dtype, device=a.device)], 1)
        b_eff = torch.cat([b_eff, torch.full((B, pad), big, dtype=b.dtype, device=b.device)], 1)
    amax = a_eff.view(B, Qb, bs).amax(-1)
    bmin = b_eff.view(B, Qb, bs).amin(-1)
    kstart = torch.arange(Kb, device=lo.device) * bs
    kend = torch.clamp(kstart + bs, max=Lk)
    full = (amax[..., None] <= kstart) & (bmin[..., None] >= kend)
    return nonempty, full & nonempty


# ----------------------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------------------
def contiguous_perm(S: int, N: int) -> torch.Tensor:
    if S % N:
        raise ValueError(f"balance='contiguous' needs S divisible by the world size: S={S}, N={N}")
    return torch.arange(S)


def zigzag_perm(S: int, N: int) -> torch.Tensor:
    if S % (2 * N):
        raise ValueError(f"balance='zigzag' needs S divisible by 2*N: S={S}, N={N}, 2*N={2 * N}")
    C = S // (2 * N)
    parts = []
    for r in range(N):
        parts.append(torch.arange(r * C, (r + 1) * C))
        parts.append(torch.arange((2 * N - 1 - r) * C, (2 * N - r) * C))
    return torch.cat(parts)


def blocks_to_perm(assign: np.ndarray, N: int, block_size: int) -> torch.Tensor:
    """Block→rank assignment (equal counts) to a token permutation, blocks ascending inside each rank."""
    order = np.argsort(assign * len(assign) + np.arange(len(assign)), kind="stable")
    tok = torch.from_numpy(order).long()[:, None] * block_size + torch.arange(block_size)
    return tok.reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# cost model
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Predicted ring time in units of one visited (block_size × block_size) block's kernel time.

    comm_weight: time to move one K/V block of ``block_size`` tokens between neighbours, in the same unit.
    For bf16, ``4·Hq·D·bs²`` FLOPs per block at F FLOP/s and ``2·2·Hkv·D·bs`` bytes at W B/s it is
    ``(Hkv/Hq)·(F/W)/bs`` — e.g. 0.87 for GQA 8:1 at bs=128, F=400 TFLOP/s, W=450 GB/s; 6.9 for MHA.
    """

    comm_weight: float = 1.0
    partial_weight: float = 1.0
    direct: bool = False  # strategy="direct": only needed K/V blocks move (≤ min(work, shard) blocks a step)
    # Cost of each (query block, ring step) pair that has any work, in block units: the kernel loads the
    # query tile and merges its fp32 output (backward: dQ) once per step it works in, whatever the number
    # of blocks. On H100 (bench_cp_sim, N=8, 8k tokens/rank, ~4 blocks per tile per step) per-step calls
    # ran 1.85× (fwd) / 1.45× (bwd) the single-call time per block: ≈3.4 / ≈1.8 blocks per active tile.
    # 0 ignores it (then spreading a rank's work over every step looks as good as keeping it local).
    tile_overhead: float = 0.0
    # strategy="allgather": every rank runs its queries against the whole gathered sequence, with no ring
    # steps and the same transfers whatever the layout, so the time to balance is each rank's total work
    # (the row sums of W); `predicted_time` is then the largest of them.
    gather: bool = False


# Partial blocks cost more than full ones in a rank's all-gather calls: fitting per-rank kernel times to
# (full, partial) block counts (bench/fit_partial_weight.py on the head_chunks=2 rows of bench_cp_sim, N = 4
# and 8, 8k tokens per rank, H200: bench/results/2026-11-26-s8 calls 2-4, -s9 calls 1, 3, 4) gave
# 1.05-1.60 for forward + backward together, 1.3-1.6 in the s9 runs; dQ alone 1.3-2.3.
# 11/8 is exact in binary: every cost stays exact in float64, so every rank computes the same plan.
ALLGATHER_PARTIAL_WEIGHT = 1.375


def step_matrix(work: np.ndarray) -> np.ndarray:
    """``[t, r] = work[r, (r - t) mod N]``: the work of rank r at ring step t."""
    N = work.shape[0]
    r = np.arange(N)
    t = np.arange(N)[:, None]
    return work[r[None, :], (r[None, :] - t) % N]


def last_needed_step(work: np.ndarray) -> np.ndarray:
    """``t_last[j]``: the last ring step at which a rank needs shard j (it travels j→j+1→…); 0 if only home."""
    N = work.shape[0]
    t = np.arange(N)[:, None]
    j = np.arange(N)[None, :]
    need = work[(j + t) % N, j] > 0  # [t, j]
    need[0, :] = True
    return (np.where(need, t, 0)).max(axis=0)


def active_tiles(G: np.ndarray, assign: np.ndarray, N: int) -> np.ndarray:
    """``[N, N]``: how many of rank r's query blocks have any work against shard j (tiles active at a step)."""
    R, _, _ = _aggregate(G, assign, N)
    return _active_from_rows(R, assign, N)


def _active_from_rows(R: np.ndarray, assign: np.ndarray, N: int) -> np.ndarray:
    nb = len(assign)
    keys = np.repeat(assign, N) * N + np.tile(np.arange(N), nb)
    return np.bincount(keys, weights=(R > 0).reshape(-1), minlength=N * N).reshape(N, N)


def predicted_time(
    work: np.ndarray, shard_blocks: int, cost: CostModel, active: np.ndarray | None = None
) -> float:
    """Critical path of the ring with per-step synchronisation and next-step transfers overlapped
    (``cost.gather``: the largest per-rank total work instead).

    ``active`` (from `active_tiles`) adds ``cost.tile_overhead`` per query block working at a step.
    """
    N = work.shape[0]
    eff = work if active is None or cost.tile_overhead == 0 else work + cost.tile_overhead * active
    if cost.gather:
        return float(eff.sum(axis=1).max())
    steps = step_matrix(eff)
    sm = steps.max(axis=1).astype(np.float64)
    if cost.direct:
        # direct exchange of needed blocks only: rank r gets at most min(work(r, t), shard) blocks at step t
        need = np.minimum(steps, shard_blocks).max(axis=1) * cost.comm_weight
        comm = np.zeros(N)
        comm[:-1] = need[1:]  # the transfer for step t+1 overlaps step t
        return float(np.maximum(sm, comm).sum())
    # the transfer for step t+1 overlaps step t; some shard still travels while t+1 <= max_j t_last[j]
    comm = np.where(np.arange(N) < last_needed_step(work).max(), cost.comm_weight * shard_blocks, 0.0)
    return float(np.maximum(sm, comm).sum())


# ----------------------------------------------------------------------------------------------------------
# document-aware planner
# ----------------------------------------------------------------------------------------------------------
def global_block_work(
    doc_ids: torch.Tensor,
    block_size: int,
    causal: bool,
    window: int | None,
    partial_weight: float = 1.0,
    prefix: int | None = None,
) -> np.ndarray:
    """``[nb, nb]`` work of every (global q block, global kv block), summed over the batch (float64)."""
    nb, nz = global_block_work_sparse(doc_ids, block_size, causal, window, partial_weight, prefix)
    return dense_block_work(nb, nz)


def dense_block_work(nb: int, nz: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The ``[nb, nb]`` array of a sparse block work (zeros elsewhere; untouched pages cost no memory)."""
    G = np.zeros((nb, nb))
    rows, cols, vals = nz
    G[rows, cols] = vals
    return G


def global_block_work_sparse(
    doc_ids: torch.Tensor,
    block_size: int,
    causal: bool,
    window: int | None,
    partial_weight: float = 1.0,
    prefix: int | None = None,
) -> tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(nb, (rows, cols, vals))``: the non-zeros of :func:`global_block_work` in row-major order (what
    ``nonzeros`` of the dense array gives), in O(S log S + nnz) instead of O(nb²).

    Why: a document mask's block grid is nearly block-diagonal, and the planner runs on the host every step;
    the dense grid is 67M entries at 1M tokens. Same values as the dense construction of :func:`pair_blocks`
    with all keys (counts of full and partial blocks summed over the batch, then ``full + w·partial``).
    """
    lo, hi = visible_intervals(doc_ids, causal, window, prefix)
    return block_work_from_intervals(lo, hi, block_size, partial_weight)


def block_work_from_intervals(
    lo: torch.Tensor, hi: torch.Tensor, block_size: int, partial_weight: float = 1.0
) -> tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`global_block_work_sparse` from the tokens' visible key intervals (``visible_intervals``)."""
    B, S = lo.shape
    bs = block_size
    nb = -(-S // bs)
    keys_all, full_all = [], []
    for b in range(B):
        keys, full = _row_block_pairs(lo[b].cpu().numpy(), hi[b].cpu().numpy(), S, bs, nb)
        keys_all.append(keys)
        full_all.append(full)
    keys = np.concatenate(keys_all)
    full = np.concatenate(full_all)
    if B == 1:  # already unique and sorted
        uniq, fc = keys, full.astype(np.float64)
        pc = 1.0 - fc
    else:
        uniq, inv = np.unique(keys, return_inverse=True)
        fc = np.bincount(inv, weights=full, minlength=len(uniq))
        pc = np.bincount(inv, weights=~full, minlength=len(uniq))
    vals = fc + partial_weight * pc
    keep = vals != 0
    uniq, vals = uniq[keep], vals[keep]
    return nb, (uniq // nb, uniq % nb, vals)


def _row_block_pairs(
    lo: np.ndarray, hi: np.ndarray, S: int, bs: int, nb: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys ``qb·nb + kb`` of the non-empty (query block, key block) pairs of one sequence whose token t
    sees keys ``[lo[t], hi[t]]`` (empty when lo > hi), and whether each pair is full (every query token of the
    block sees every key of the block)."""
    t = np.arange(S)
    qb = t // bs
    valid = lo <= hi
    first = lo // bs
    last1 = hi // bs + 1
    # union over a block's tokens of their key-block ranges [first, last1): a sweep over +1 / -1 events per
    # query block; the coverage count returns to zero at each block's end, so segments never cross blocks
    ev = np.concatenate([qb[valid] * (nb + 1) + first[valid], qb[valid] * (nb + 1) + last1[valid]])
    dv = np.concatenate([np.ones(int(valid.sum()), np.int64), -np.ones(int(valid.sum()), np.int64)])
    if ev.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    order = np.argsort(ev, kind="stable")
    ev, dv = ev[order], dv[order]
    ukey, start = np.unique(ev, return_index=True)
    cover = np.cumsum(np.add.reduceat(dv, start))
    seg = np.nonzero(cover[:-1] > 0)[0]
    s_key, e_key = ukey[seg], ukey[seg + 1]  # [s, e) in the combined qb·(nb+1) + kb space, one query block
    seg_qb = s_key // (nb + 1)
    lengths = e_key - s_key
    rep_qb = np.repeat(seg_qb, lengths)
    offs = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kb = np.repeat(s_key - seg_qb * (nb + 1), lengths) + offs
    keys = rep_qb * nb + kb
    # full: kb inside [ceil(max lo / bs), ...) with its last key below every token's hi (the last key block
    # may be short: it ends at S); a block with any token that sees nothing has no full pairs
    big = np.iinfo(np.int64).max // 4
    a_eff = np.where(valid, lo, big)
    b_eff = np.where(valid, hi + 1, -1)
    pad = nb * bs - S
    if pad:  # tokens past the end of the sequence do not constrain the last query block
        a_eff = np.concatenate([a_eff, np.full(pad, -1)])
        b_eff = np.concatenate([b_eff, np.full(pad, big)])
    amax = a_eff.reshape(nb, bs).max(axis=1)
    bmin = b_eff.reshape(nb, bs).min(axis=1)
    f0 = -(-amax // bs)
    f1 = np.where(bmin >= S, nb, bmin // bs)
    full = (kb >= f0[rep_qb]) & (kb < f1[rep_qb])
    return keys, full


def block_assignment(perm: torch.Tensor, N: int, block_size: int) -> np.ndarray | None:
    """The block→rank assignment of a layout whose local blocks are whole aligned global blocks, else None."""
    S = perm.numel()
    if S % (N * block_size):
        return None
    blocks = perm.view(-1, block_size)
    first = blocks[:, 0]
    if not (first % block_size == 0).all() or not (blocks - first[:, None] == torch.arange(block_size)).all():
        return None
    assign = np.empty(S // block_size, dtype=np.int64)
    assign[(first // block_size).numpy()] = np.repeat(np.arange(N), S // block_size // N)
    return assign


def pair_work_from_blocks(
    G: np.ndarray, assign: np.ndarray, N: int, nz: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``[N, N]`` pair work and distinct K/V blocks of shard j needed by rank r, from the global block work.

    ``nz``: ``nonzeros(G)`` if the caller has it (a plan scores several layouts against one G)."""
    nz = nz if nz is not None else nonzeros(G)
    _, C, W = _aggregate(G, assign, N, nz)
    needed = C > 0  # [N, nb]: rank r attends to kv block c
    nb = len(assign)
    need = np.bincount(
        np.repeat(np.arange(N), nb) * N + np.tile(assign, N), weights=needed.reshape(-1), minlength=N * N
    ).reshape(N, N)
    return W, need.astype(np.int64)


def _aggregate(
    G: np.ndarray, assign: np.ndarray, N: int, nz: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row aggregates R[x, k] = Σ_{c∈k} G[x, c], column aggregates C[k, x], pair work W = A^T G A.

    Computed over G's non-zeros (``nz = (rows, cols, vals)``; document masks are block-diagonal-ish, so
    O(nnz) instead of O(nb²·N)); exact (integer-valued float64 sums)."""
    nb = len(assign)
    rows, cols, vals = nz if nz is not None else nonzeros(G)
    ar, ac = assign[rows], assign[cols]
    R = np.bincount(rows * N + ac, weights=vals, minlength=nb * N).reshape(nb, N)
    C = np.bincount(ar * nb + cols, weights=vals, minlength=N * nb).reshape(N, nb)
    W = np.bincount(ar * N + ac, weights=vals, minlength=N * N).reshape(N, N)
    return R, C, W


def nonzeros(G: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, values)`` of G's non-zero entries (row-major order): what the aggregates iterate over."""
    rows, cols = np.nonzero(G)
    return rows, cols, G[rows, cols]


def _packed_seed(
    G: np.ndarray, N: int, nz: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Documents kept whole where possible: runs of blocks linked by attention, packed onto ranks.

    Runs are cut where at most two blocks of work cross a block boundary (document edges), then placed
    largest work first on the least loaded
    rank with room for the whole run; a run larger than any rank's room is split into contiguous pieces.
    Local work needs no transfer and keeps each query tile active in few ring steps.
    """
    nb = G.shape[0]
    per = nb // N
    # work crossing each block boundary i|i+1 (either direction); a cut costing at most two blocks of work
    # is a document edge (or a short document's), not the inside of a long one
    # from the non-zeros in O(nnz) (a dense prefix sum of G is O(nb²)): an entry (r, c) with r > c crosses
    # the boundaries c .. r-1 ("below": rows > i attending to columns <= i), one with c > r the boundaries
    # r .. c-1 ("above", non-causal masks); difference arrays, summed in one pass (integer-valued: exact)
    rows, cols, vals = nz if nz is not None else nonzeros(G)
    lower, upper = rows > cols, cols > rows
    below = np.cumsum(
        np.bincount(cols[lower], vals[lower], minlength=nb + 1)
        - np.bincount(rows[lower], vals[lower], minlength=nb + 1)
    )[: nb - 1]
    above = np.cumsum(
        np.bincount(rows[upper], vals[upper], minlength=nb + 1)
        - np.bincount(cols[upper], vals[upper], minlength=nb + 1)
    )[: nb - 1]
    link = (below + above) > 2.0
    starts = np.concatenate([[0], np.nonzero(~link)[0] + 1])
    ends = np.concatenate([starts[1:], [nb]])
    row_work = np.bincount(rows, weights=vals, minlength=nb)
    csum = np.concatenate([[0.0], np.cumsum(row_work)])
    order = sorted(range(len(starts)), key=lambda i: (-(csum[ends[i]] - csum[starts[i]]), starts[i]))
    load = np.zeros(N)
    room = np.full(N, per)
    assign = np.empty(nb, dtype=np.int64)
    for i in order:
        s, e = int(starts[i]), int(ends[i])
        while s < e:
            fits = np.nonzero(room >= e - s)[0]
            if len(fits):
                r = int(fits[np.argmin(load[fits])])
                take = e - s
            else:  # split: the rank with the most room takes the next piece
                r = int(np.argmax(room))
                take = int(room[r])
            assign[s : s + take] = r
            room[r] -= take
            load[r] += csum[s + take] - csum[s]
            s += take
    return assign


def _seed_layouts(nb: int, N: int) -> dict[str, np.ndarray]:
    """Candidate block→rank layouts spanning locality (few K/V transfers) to spreading (even work).

    The sequence of blocks is cut into ``k·N`` equal chunks (k a power of two dividing nb/N) dealt to ranks
    in passes: ``cyclic{k}`` deals every pass in ring order (chunk c → rank c mod N), so a document crossing
    a chunk boundary only needs the previous rank's shard, one ring step back (k=1 is contiguous, k=nb/N is
    round-robin striping of blocks); ``snake{k}`` alternates the direction each pass (k=2 is the classic
    zigzag/head-tail), which balances causal work better but needs shards from far round the ring.
    """
    per = nb // N
    seeds: dict[str, np.ndarray] = {}
    ci_all = np.arange(nb)
    k = 1
    while k <= per:
        if per % k == 0:
            ci = ci_all // (per // k)  # chunk index, per//k blocks per chunk
            fwd = ci % N
            seeds[f"cyclic{k}"] = fwd
            if k > 1:
                seeds[f"snake{k}"] = np.where((ci // N) % 2 == 0, fwd, N - 1 - fwd)
        k *= 2
    seeds.setdefault(f"cyclic{per}", ci_all % N)  # striping, also when nb/N is not a power of two
    return seeds


def plan_document(
    G: np.ndarray,
    N: int,
    cost: CostModel,
    iters: int = 4000,
    seed: int = 0,
    patience: int = 300,
    nz: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict]:
    """Assign the ``nb`` global blocks to N ranks (nb/N each) minimising `predicted_time`.

    Deterministic for a given G (integer-valued costs, exact in float64; seeded generator; iteration-count
    based stopping), so every rank computes the same plan without communicating.
    """
    nb = G.shape[0]
    per = nb // N
    nz = nz if nz is not None else nonzeros(G)
    tau = cost.tile_overhead
    best_name, best_assign, best_cost = None, None, np.inf
    info: dict = {"seeds": {}}
    seeds = _seed_layouts(nb, N)
    if nb % N == 0 and N > 1:
        seeds["packed"] = _packed_seed(G, N, nz)
    for name, a in seeds.items():
        R0, _, W = _aggregate(G, a, N, nz)
        c = predicted_time(W, per, cost, _active_from_rows(R0, a, N) if tau else None)
        info["seeds"][name] = c
        if c < best_cost - 1e-9:
            best_name, best_assign, best_cost = name, a.copy(), c
    info["seed"] = best_name
    if N == 1:
        info["cost"] = best_cost
        return best_assign, info
    assign = best_assign
    R, C, W = _aggregate(G, assign, N, nz)
    A = _active_from_rows(R, assign, N) if tau else np.zeros((N, N))
    col_nz = None
    if tau:  # the query blocks attending to each key block, from the non-zeros (column scans are O(nb²))
        by_col = np.argsort(nz[1], kind="stable")
        col_nz = np.split(nz[0][by_col], np.cumsum(np.bincount(nz[1], minlength=nb))[:-1])
    rng = np.random.default_rng(seed)
    members = [list(np.nonzero(assign == k)[0]) for k in range(N)]
    cur = best_cost
    accepted = 0
    # lower bound: all work evenly spread, every query block with work active in one step only
    ideal = (float(W.sum()) + tau * float((R.sum(axis=1) > 0).sum())) / N
    stale = 0
    ar = np.arange(N)
    for _ in range(iters):
        if stale >= patience or cur <= ideal * 1.002:
            break  # deterministic stop: no improvement for `patience` tries, or at the lower bound
        stale += 1
        if cost.gather:  # the rank with the most work gives away one of its query blocks
            src = int(np.argmax((W + tau * A).sum(axis=1)))
        else:
            sm = step_matrix(W + tau * A)
            t = int(np.argmax(sm.max(axis=1)))
            p = int(np.argmax(sm[t]))  # critical rank at the critical step
            jp = (p - t) % N
            # move a block out of rank p (as query) or out of kv shard jp, swap with a random other rank's
            src = p if rng.random() < 0.5 else jp
        q = int(rng.integers(N - 1))
        q = q + 1 if q >= src else q
        x = members[src][int(rng.integers(per))]
        y = members[q][int(rng.integers(per))]
        V = np.zeros((N, 2))
        V[q, 0], V[src, 0] = 1.0, -1.0
        V[src, 1], V[q, 1] = 1.0, -1.0
        UGA = R[[x, y], :]  # 2×N
        AGU = C[:, [x, y]]  # N×2
        UGU = G[np.ix_([x, y], [x, y])]
        dW = V @ UGA + AGU @ V.T + V @ UGU @ V.T
        W2 = W + dW
        A2 = A
        if tau:
            # active tiles change only for query blocks that attend to x or y, and for x and y themselves
            zs = np.union1d(np.union1d(col_nz[x], col_nz[y]), [x, y])
            old_r = assign[zs]
            new_r = np.where(zs == x, q, np.where(zs == y, src, old_r))
            Rn = R[zs].copy()
            Rn[:, q] += G[zs, x] - G[zs, y]
            Rn[:, src] += G[zs, y] - G[zs, x]
            dA = np.bincount(
                (new_r[:, None] * N + ar).reshape(-1), weights=(Rn > 0).reshape(-1), minlength=N * N
            ) - np.bincount(
                (old_r[:, None] * N + ar).reshape(-1), weights=(R[zs] > 0).reshape(-1), minlength=N * N
            )
            A2 = A + dA.reshape(N, N)
        c2 = predicted_time(W2, per, cost, A2 if tau else None)
        better = c2 < cur - 1e-9
        if cost.gather and not better and c2 <= cur + 1e-9:
            # the largest total unchanged (ties at the top): accept a swap that evens the totals out, so the
            # next swap can lower the top one (sum of squares, exact for the binary-exact block weights)
            sq2 = float(np.square((W2 + tau * A2).sum(axis=1)).sum())
            better = sq2 < float(np.square((W + tau * A).sum(axis=1)).sum()) - 1e-9
        if better:
            cur, W, A = c2, W2, A2
            accepted += 1
            stale = 0
            # update aggregates for the new assignment
            R[:, q] += G[:, x] - G[:, y]
            R[:, src] += G[:, y] - G[:, x]
            C[q, :] += G[x, :] - G[y, :]
            C[src, :] += G[y, :] - G[x, :]
            assign[x], assign[y] = q, src
            members[src][members[src].index(x)] = y
            members[q][members[q].index(y)] = x
    info["cost"] = cur
    info["swaps_accepted"] = accepted
    return assign, info
