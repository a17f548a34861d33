"""The document-mask builder as two Triton kernels: per-block ranges, then every block table at once.

Building a mask is host-bound on a GPU (a few hundred kilobytes of tables, dozens of tiny kernels), so the
cost is the number of launches. The torch path (`block_mask`) needs about fifty; this one needs four for a
whole-sequence mask and seven for all N×N pairs of a CP plan (three small ops turn the counts into the
plan's ``[N, N]`` costs) — independent of N, B and S:

1. ``ne`` + ``cumsum`` over ``doc_ids`` (torch): the number of id changes before each token, whose value
   at a token is its document *run index* (a scan; torch's is a single efficient kernel);
2. `_stats_kernel`, one program per tile of whole blocks of one group (rank) and batch row: gathers the
   blocks' tokens (run index, global position, prefix flag) into the per-token tensors the mask_mod needs
   and reduces them to the same per-block ranges as the torch path (`block_mask._block_stats`), plus a
   count of positions outside ``[0, S)`` (read only when validating);
3. `_tables_kernel`, one program per (q group, kv group, batch row) and tile of q blocks (kv-major tables)
   or of kv blocks (q-major tables): classifies the tile's rows of block pairs with exactly the tests of
   `block_mask.classify_blocks` and writes the counts and the ordered index lists, with the same order as
   torch's stable argsort (listed blocks ascending, then the others ascending), so every table equals the
   torch path's bit for bit.

The kernels use plain loads, stores, reductions and ``tl.cumsum`` only, so they run on CUDA and under
``TRITON_INTERPRET=1`` on the CPU (the tests compare them with the torch path and with ``create_block_mask``).
"""

from __future__ import annotations

import contextlib

import torch

try:  # Triton is a dependency, but keep the CPU (torch) path importable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

# Same sentinel as block_mask._BIG: "no token" in min / max ranges, every difference of two stays in int32.
_BIG = 1 << 29
# Rows of the stats tensor: run range, position range, "one valid run" key, then (with prefix-LM) the
# position range of non-prefix keys and the run range of prefix keys, then the bad-position flag.
_N_STATS, _N_STATS_PREFIX = 5, 9
# Tile sizes (elements per program and loop iteration, bounding registers): a stats program reduces
# _STATS_TILE tokens (whole blocks), a tables program classifies _TABLE_TILE (row, column) block pairs at a
# time, rows longer than _MAX_CHUNK columns in several iterations. Larger tiles also mean fewer programs,
# which is what the Triton interpreter (CPU tests) pays for.
_STATS_TILE = 1024
_TABLE_TILE = 2048
_MAX_CHUNK = 1024


def available() -> bool:
    """Triton is importable (on CPU tensors it then also needs ``TRITON_INTERPRET=1``)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _stats_kernel(
        DOC,
        stride_db,
        stride_ds,
        CS,
        stride_cb,
        POS,
        stride_pg,
        stride_pb,
        stride_pt,
        PRE,
        stride_eb,
        stride_es,
        RUN_OUT,
        POS_OUT,
        PRE_OUT,
        STATS,
        S,
        L,
        nb,
        n_tiles,
        B,
        stat_stride,
        BS: tl.constexpr,
        BS_P2: tl.constexpr,
        NBLK: tl.constexpr,
        HAS_POS: tl.constexpr,
        HAS_PRE: tl.constexpr,
        BIG: tl.constexpr,
    ):
        """One program: NBLK blocks of BS tokens of one (group, row); tile [NBLK, BS_P2]."""
        pid = tl.program_id(0).to(tl.int64)
        gb = pid // n_tiles  # group * B + row
        blk = (pid % n_tiles) * NBLK + tl.arange(0, NBLK)  # [NBLK] block indices
        b = gb % B
        g = gb // B
        lane = tl.arange(0, BS_P2)
        t = blk[:, None] * BS + lane[None, :]  # token slots within the group's L tokens
        inb = (lane[None, :] < BS) & (t < L) & (blk[:, None] < nb)
        if HAS_POS:
            p = tl.load(POS + g * stride_pg + b * stride_pb + t * stride_pt, mask=inb, other=0).to(tl.int64)
        else:
            p = t
        bad = inb & ((p < 0) | (p >= S))
        p = tl.minimum(tl.maximum(p, 0), S - 1)  # out-of-range positions (validate=False) never fault
        d = tl.load(DOC + b * stride_db + p * stride_ds, mask=inb, other=-1)
        valid = inb & (d >= 0)
        r = tl.load(CS + b * stride_cb + p - 1, mask=valid & (p > 0), other=0)  # run index (token 0: run 0)
        r = tl.where(valid, r, -1)
        p32 = p.to(tl.int32)
        out = gb * L + t
        tl.store(RUN_OUT + out, r, mask=inb)
        tl.store(POS_OUT + out, p32, mask=inb)
        bmask = blk < nb
        base = STATS + gb * nb + blk
        rmin = tl.min(tl.where(valid, r, BIG), 1)
        rmax = tl.max(tl.where(valid, r, -BIG), 1)
        tl.store(base, rmin, mask=bmask)
        tl.store(base + stat_stride, rmax, mask=bmask)
        tl.store(base + 2 * stat_stride, tl.min(tl.where(valid, p32, BIG), 1), mask=bmask)
        tl.store(base + 3 * stat_stride, tl.max(tl.where(valid, p32, -BIG), 1), mask=bmask)
        # the block is one run only if all BS slots hold valid tokens of it (a short last block never is)
        one_run = (tl.sum(valid.to(tl.int32), 1) == BS) & (rmin == rmax)
        tl.store(base + 4 * stat_stride, tl.where(one_run, rmin, -2), mask=bmask)
        n_bad = tl.sum(bad.to(tl.int32), 1)
        if HAS_PRE:
            pre = (tl.load(PRE + b * stride_eb + p * stride_es, mask=inb, other=0) != 0) & valid
            tl.store(PRE_OUT + out, pre.to(tl.int8), mask=inb)
            non_pre = valid & (pre == 0)
            tl.store(base + 5 * stat_stride, tl.min(tl.where(non_pre, p32, BIG), 1), mask=bmask)
            tl.store(base + 6 * stat_stride, tl.max(tl.where(non_pre, p32, -BIG), 1), mask=bmask)
            tl.store(base + 7 * stat_stride, tl.min(tl.where(pre, r, BIG), 1), mask=bmask)
            tl.store(base + 8 * stat_stride, tl.max(tl.where(pre, r, -BIG), 1), mask=bmask)
            tl.store(base + 9 * stat_stride, n_bad, mask=bmask)
        else:
            tl.store(base + 5 * stat_stride, n_bad, mask=bmask)

    @triton.jit
    def _classes(
        QST,
        q_stride,
        q_off,
        q_mask,
        KST,
        k_stride,
        k_off,
        k_mask,
        W,
        CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_PREFIX: tl.constexpr,
        BIG: tl.constexpr,
    ):
        """(partial, full) as int32 0/1 for q blocks at ``q_off`` against kv blocks at ``k_off`` (broadcast
        to one tile): the tests of `block_mask.classify_blocks`, term for term. Masked lanes read as blocks
        without tokens, which are never listed."""
        q_rmin = tl.load(QST + q_off, mask=q_mask, other=BIG)
        q_rmax = tl.load(QST + q_stride + q_off, mask=q_mask, other=-BIG)
        q_pmin = tl.load(QST + 2 * q_stride + q_off, mask=q_mask, other=BIG)
        q_pmax = tl.load(QST + 3 * q_stride + q_off, mask=q_mask, other=-BIG)
        q_key = tl.load(QST + 4 * q_stride + q_off, mask=q_mask, other=-2)
        k_rmin = tl.load(KST + k_off, mask=k_mask, other=BIG)
        k_rmax = tl.load(KST + k_stride + k_off, mask=k_mask, other=-BIG)
        k_pmin = tl.load(KST + 2 * k_stride + k_off, mask=k_mask, other=BIG)
        k_pmax = tl.load(KST + 3 * k_stride + k_off, mask=k_mask, other=-BIG)
        k_key = tl.load(KST + 4 * k_stride + k_off, mask=k_mask, other=-2)
        if HAS_PREFIX:
            # position range of the non-prefix keys (what "full" must see) and run range of prefix keys
            k_np_pmin = tl.load(KST + 5 * k_stride + k_off, mask=k_mask, other=BIG)
            k_np_pmax = tl.load(KST + 6 * k_stride + k_off, mask=k_mask, other=-BIG)
            k_pre_rmin = tl.load(KST + 7 * k_stride + k_off, mask=k_mask, other=BIG)
            k_pre_rmax = tl.load(KST + 8 * k_stride + k_off, mask=k_mask, other=-BIG)
        else:
            k_np_pmin = k_pmin
            k_np_pmax = k_pmax
        # maybe visible: a shared run and some visible position difference (or a shared prefix key)
        maybe = (q_rmin <= k_rmax) & (k_rmin <= q_rmax)
        # provably all visible: one run, every token valid, every (non-prefix key) difference visible
        full = (q_key == k_key) & (q_key >= 0)
        if CAUSAL:
            vis = q_pmax >= k_pmin
            if HAS_WINDOW:
                vis = vis & ((q_pmin - W) < k_pmax)
            if HAS_PREFIX:
                vis = vis | ((q_rmin <= k_pre_rmax) & (k_pre_rmin <= q_rmax))
            maybe = maybe & vis
            full = full & (q_pmin >= k_np_pmax)
            if HAS_WINDOW:
                full = full & ((q_pmax - W) < k_np_pmin)
        elif HAS_WINDOW:
            vis = ((q_pmax + W) > k_pmin) & ((q_pmin - W) < k_pmax)
            if HAS_PREFIX:
                vis = vis | ((q_rmin <= k_pre_rmax) & (k_pre_rmin <= q_rmax))
            maybe = maybe & vis
            full = full & ((q_pmin + W) > k_np_pmax) & ((q_pmax - W) < k_np_pmin)
        full_i = full.to(tl.int32)
        return maybe.to(tl.int32) * (1 - full_i), full_i

    @triton.jit
    def _write_lists(
        QST,
        q_stride,
        q_off,
        q_mask,
        KST,
        k_stride,
        k_off,
        k_mask,
        W,
        rows,
        rmask,
        n_cols,
        NUM,
        num_half,
        num_off,
        IDX,
        idx_half,
        idx_off,
        WRITE_IDX,
        ROWS: tl.constexpr,
        CHUNK: tl.constexpr,
        TRANSPOSED: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_PREFIX: tl.constexpr,
        BIG: tl.constexpr,
    ):
        """For ROWS rows (q blocks, or kv blocks when TRANSPOSED) against all n_cols columns: the partial
        and full counts (always) and, if WRITE_IDX, the index lists — listed columns first, ascending, then
        the others ascending, like torch's stable argsort. Two passes over column chunks: counts, then
        slots (an unlisted column goes after all listed ones)."""
        cols = tl.arange(0, CHUNK)
        n_part = tl.zeros([ROWS], dtype=tl.int32)
        n_full = tl.zeros([ROWS], dtype=tl.int32)
        for c0 in range(0, n_cols, CHUNK):
            c = c0 + cols
            cm = (c < n_cols)[None, :]
            if TRANSPOSED:
                part, full = _classes(
                    QST, q_stride, q_off + c[None, :], cm, KST, k_stride, k_off, k_mask, W, CAUSAL,
                    HAS_WINDOW, HAS_PREFIX, BIG,
                )  # fmt: skip
            else:
                part, full = _classes(
                    QST, q_stride, q_off, q_mask, KST, k_stride, k_off + c[None, :], cm, W, CAUSAL,
                    HAS_WINDOW, HAS_PREFIX, BIG,
                )  # fmt: skip
            n_part += tl.sum(part, 1)
            n_full += tl.sum(full, 1)
        tl.store(NUM + num_off + rows, n_part, mask=rmask)
        tl.store(NUM + num_half + num_off + rows, n_full, mask=rmask)
        if WRITE_IDX:
            row_ptr = IDX + (idx_off + rows[:, None]) * n_cols
            seen_part = tl.zeros([ROWS], dtype=tl.int32)
            seen_full = tl.zeros([ROWS], dtype=tl.int32)
            for c0 in range(0, n_cols, CHUNK):
                c = c0 + cols
                cm = (c < n_cols)[None, :]
                if TRANSPOSED:
                    part, full = _classes(
                        QST, q_stride, q_off + c[None, :], cm, KST, k_stride, k_off, k_mask, W, CAUSAL,
                        HAS_WINDOW, HAS_PREFIX, BIG,
                    )  # fmt: skip
                else:
                    part, full = _classes(
                        QST, q_stride, q_off, q_mask, KST, k_stride, k_off + c[None, :], cm, W, CAUSAL,
                        HAS_WINDOW, HAS_PREFIX, BIG,
                    )  # fmt: skip
                cc = c[None, :]
                m = rmask[:, None] & cm
                cs = seen_part[:, None] + tl.cumsum(part, 1)
                slot = tl.where(part != 0, cs - 1, n_part[:, None] + cc - cs)
                tl.store(row_ptr + slot, cc + 0 * slot, mask=m)
                cs = seen_full[:, None] + tl.cumsum(full, 1)
                slot = tl.where(full != 0, cs - 1, n_full[:, None] + cc - cs)
                tl.store(row_ptr + idx_half + slot, cc + 0 * slot, mask=m)
                seen_part += tl.sum(part, 1)
                seen_full += tl.sum(full, 1)

    @triton.jit
    def _tables_kernel(
        QST,
        q_stride,
        KST,
        k_stride,
        SLOT,
        KV_NUM,
        KV_IDX,
        Q_NUM,
        Q_IDX,
        kvn_half,
        kvi_half,
        qn_half,
        qi_half,
        Gkv,
        B,
        nq,
        nkv,
        q_tiles,
        k_tiles,
        W,
        ROWS: tl.constexpr,
        CHUNK: tl.constexpr,
        HAS_SLOTS: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_PREFIX: tl.constexpr,
        BIG: tl.constexpr,
    ):
        """Programs per (q group, kv group, row): q_tiles tiles of ROWS q blocks (kv-major tables; counts
        for every q group), then k_tiles tiles of ROWS kv blocks (q-major tables, selected q groups only)."""
        pid = tl.program_id(0).to(tl.int64)
        per_pair = q_tiles + k_tiles
        pair = pid // per_pair  # (q group, kv group, row), row-major
        tile = pid % per_pair
        b = pair % B
        gk = (pair // B) % Gkv
        gq = pair // (B * Gkv)
        if HAS_SLOTS:
            slot = tl.load(SLOT + gq).to(tl.int64)  # index among the q groups with tables, -1 = counts only
        else:
            slot = gq
        out_pair = (slot * Gkv + gk) * B + b
        lanes = tl.arange(0, ROWS)
        if tile < q_tiles:
            rows = tile * ROWS + lanes
            rmask = rows < nq
            _write_lists(
                QST, q_stride, (gq * B + b) * nq + rows[:, None], rmask[:, None], KST, k_stride,
                (gk * B + b) * nkv, True, W, rows, rmask, nkv, KV_NUM, kvn_half, pair * nq, KV_IDX, kvi_half,
                out_pair * nq, slot >= 0, ROWS, CHUNK, False, CAUSAL, HAS_WINDOW, HAS_PREFIX, BIG,
            )  # fmt: skip
        elif slot >= 0:
            rows = (tile - q_tiles) * ROWS + lanes
            rmask = rows < nkv
            _write_lists(
                QST, q_stride, (gq * B + b) * nq, True, KST, k_stride, (gk * B + b) * nkv + rows[:, None],
                rmask[:, None], W, rows, rmask, nq, Q_NUM, qn_half, out_pair * nkv, Q_IDX, qi_half,
                out_pair * nkv, True, ROWS, CHUNK, True, CAUSAL, HAS_WINDOW, HAS_PREFIX, BIG,
            )  # fmt: skip


def _device_of(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (multi-GPU processes)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _pow2(n: int) -> int:
    """Smallest power of two >= n (triton.next_power_of_2 costs microseconds per call in some versions)."""
    return 1 << max(0, n - 1).bit_length()


def change_counts(doc_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, max(S - 1, 1)]``: entry ``s`` = id changes among tokens ``0..s+1`` (token ``s + 1``'s run
    index). Two launches; with S = 1 a dummy the kernels never read (they treat token 0 as run 0)."""
    if doc_ids.shape[1] == 1:
        return torch.zeros(doc_ids.shape[0], 1, dtype=torch.int32, device=doc_ids.device)
    return torch.cumsum(doc_ids[:, 1:] != doc_ids[:, :-1], dim=1, dtype=torch.int32)


class Side:
    """One side (queries or keys) of the attention call(s): per-token tensors ``[G, B, L]`` and per-block
    stats ``[K, G, B, nb]`` (int32), plus the bad-position flags ``[G, B, nb]``."""

    __slots__ = ("bad", "block", "nb", "pos", "prefix", "run", "stats")

    def __init__(self, run, pos, prefix, stats, bad, block: int) -> None:
        self.run, self.pos, self.prefix, self.stats, self.bad = run, pos, prefix, stats, bad
        self.block = block
        self.nb = stats.shape[-1]


def block_side(
    doc_ids: torch.Tensor,
    changes: torch.Tensor,
    positions: torch.Tensor | None,
    prefix: torch.Tensor | None,
    block: int,
) -> Side:
    """Gather tokens at ``positions [G, B, L]`` (any integer dtype and strides; None = all S tokens, G = 1)
    and reduce them per block of ``block`` tokens, in one launch."""
    B, S = doc_ids.shape
    dev = doc_ids.device
    if positions is None:
        G, L = 1, S
        pos_arg, strides = doc_ids, (0, 0, 0)  # unused (HAS_POS=False)
    else:
        G, L = positions.shape[0], positions.shape[-1]
        pos_arg, strides = positions, tuple(positions.stride())
    nb = -(-L // block)
    k = _N_STATS_PREFIX if prefix is not None else _N_STATS
    stats = torch.empty(k + 1, G, B, nb, dtype=torch.int32, device=dev)
    run = torch.empty(G, B, L, dtype=torch.int32, device=dev)
    pos = torch.empty(G, B, L, dtype=torch.int32, device=dev)
    pre_out = torch.empty(G, B, L, dtype=torch.int8, device=dev) if prefix is not None else run
    pre_in = prefix.view(torch.uint8) if prefix is not None else doc_ids
    bs_p2 = _pow2(block)
    nblk = min(max(1, _STATS_TILE // bs_p2), _pow2(nb))
    n_tiles = -(-nb // nblk)
    with _device_of(dev):
        _stats_kernel[(G * B * n_tiles,)](
            doc_ids,
            doc_ids.stride(0),
            doc_ids.stride(1),
            changes,
            changes.stride(0),
            pos_arg,
            *strides,
            pre_in,
            pre_in.stride(0),
            pre_in.stride(1),
            run,
            pos,
            pre_out,
            stats,
            S,
            L,
            nb,
            n_tiles,
            B,
            G * B * nb,
            BS=block,
            BS_P2=bs_p2,
            NBLK=nblk,
            HAS_POS=positions is not None,
            HAS_PRE=prefix is not None,
            BIG=_BIG,
        )
    pre = pre_out.view(torch.bool) if prefix is not None else None
    return Side(run, pos, pre, stats[:k], stats[k], block)


def block_tables(
    q: Side,
    kv: Side,
    causal: bool,
    window: int | None,
    q_rows: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Every (q group, kv group) pair's tables in one launch.

    Returns ``(kv_num_all, kv_idx, q_num, q_idx)`` with a leading (partial, full) dim of 2 and a head dim of
    1: ``kv_num_all [2, Gq, Gkv, B, 1, nq]`` for every q group (the pair counts are its sums), and for the q
    groups in ``q_rows`` (default all, in order) ``kv_idx [2, R, Gkv, B, 1, nq, nkv]``, ``q_num [2, R, Gkv,
    B, 1, nkv]``, ``q_idx [2, R, Gkv, B, 1, nkv, nq]``.
    """
    Gq, B, nq = q.stats.shape[1:]
    Gkv, nkv = kv.stats.shape[1], kv.nb
    dev = q.stats.device
    has_prefix = kv.stats.shape[0] == _N_STATS_PREFIX
    if q_rows is None or q_rows == tuple(range(Gq)):
        R, slots = Gq, q.stats  # unused (HAS_SLOTS=False)
    else:
        R = len(q_rows)
        lut = [-1] * Gq
        for i, r in enumerate(q_rows):
            lut[r] = i
        slots = torch.tensor(lut, dtype=torch.int32).to(dev, non_blocking=True)
    kv_num = torch.empty(2, Gq, Gkv, B, 1, nq, dtype=torch.int32, device=dev)
    kv_idx = torch.empty(2, R, Gkv, B, 1, nq, nkv, dtype=torch.int32, device=dev)
    q_num = torch.empty(2, R, Gkv, B, 1, nkv, dtype=torch.int32, device=dev)
    q_idx = torch.empty(2, R, Gkv, B, 1, nkv, nq, dtype=torch.int32, device=dev)
    chunk = min(_MAX_CHUNK, _pow2(max(nq, nkv)))
    rows = min(max(1, _TABLE_TILE // chunk), _pow2(max(nq, nkv)))
    q_tiles, k_tiles = -(-nq // rows), -(-nkv // rows)
    with _device_of(dev):
        _tables_kernel[(Gq * Gkv * B * (q_tiles + k_tiles),)](
            q.stats,
            q.stats.stride(0),
            kv.stats,
            kv.stats.stride(0),
            slots,
            kv_num,
            kv_idx,
            q_num,
            q_idx,
            kv_num.stride(0),
            kv_idx.stride(0),
            q_num.stride(0),
            q_idx.stride(0),
            Gkv,
            B,
            nq,
            nkv,
            q_tiles,
            k_tiles,
            0 if window is None else window,
            ROWS=rows,
            CHUNK=chunk,
            HAS_SLOTS=slots is not q.stats,
            CAUSAL=causal,
            HAS_WINDOW=window is not None,
            HAS_PREFIX=has_prefix,
            BIG=_BIG,
        )
    return kv_num, kv_idx, q_num, q_idx
