"""Triton backward of block-sparse flex attention: deterministic, no atomics, GQA without expanding K/V.

- ``_delta_kernel``: ``delta = rowsum(dO · O) − dLSE`` (fp32, O(B·H·S)), unless the caller passes delta.
- ``_dkdv_kernel``: one program per (kv tile, batch·kv head). K and V stay in registers; it loops over the
  query heads sharing the kv head and, per head, over the *transposed* block lists (``q_num`` / ``q_idx``
  partial, then full), accumulating dK and dV in registers; one store at the end.
- ``_dq_kernel``: one program per (query tile, batch·q head) walking the same lists as the forward. With a
  learnable :class:`RelativeBias` it also reduces dScore per (head, distance bucket) into a per-program row,
  summed afterwards in a fixed order (deterministic).

``lse`` is the *global* natural-log LSE; a row with ``lse = −inf`` saw nothing and gets zero gradients
(its LSE is mapped to +inf so every probability is exactly 0, never NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .block_sparse import MASK_BITS
from .triton_fwd import (
    LOG2E,
    SCORE_RELBIAS,
    TUNE_KEY,
    _dot,
    _fp32_scalars,
    _launch_coords_lead,
    _mask_scores,
    _score_mod,
    _tanh,
    check_head_group,
    doc_args,
    kernels_are_compiled,
    launch_head_group,
    launch_lead,
    meta_args,
    pick_tile,
    prepare,
    tune_configs,
    use_autotune,
)
from .tuned_launch import launch_tuned


@triton.jit
def _delta_kernel(
    O,
    DO,
    DLSE,
    DELTA,
    sob,
    soh,
    som,
    sdb,
    sdh,
    sdm,
    Hq,
    Sq,
    BLOCK_M: tl.constexpr,
    DV: tl.constexpr,
    DVP: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DVP)  # DV padded to a power of two; the padding columns load as 0
    if DVP == DV:
        msk = offs_m[:, None] < Sq
    else:
        msk = (offs_m[:, None] < Sq) & (offs_d[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        dl = tl.load(DLSE + bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=0.0)
        delta = delta - dl
    tl.store(DELTA + bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _load_rows(LSEb, DELTAb, offs_m, Sq):
    lse = tl.load(LSEb + offs_m, mask=offs_m < Sq, other=float("inf"))
    # rows that see nothing (lse = -inf) -> +inf so exp2(s - lse) is exactly 0 for every s
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTAb + offs_m, mask=offs_m < Sq, other=0.0)
    return lse2, delta


@triton.jit
def _score_mod_t(sT, hq, qg, kg, SLOPES, TABLE, table_stride, L, softcap, SCORE_KIND: tl.constexpr):
    """_score_mod on a transposed tile sT [N, M] (kv along rows)."""
    if SCORE_KIND == 1:
        sT = softcap * _tanh(sT / softcap)
    elif SCORE_KIND == 2:
        slope = tl.load(SLOPES + hq)
        sT = sT + slope * (kg[:, None] - qg[None, :]).to(tl.float32)
    elif SCORE_KIND == 3:
        rel = qg[None, :] - kg[:, None]
        rel = tl.minimum(tl.maximum(rel, -L + 1), L - 1) + (L - 1)
        sT = sT + tl.load(TABLE + hq * table_stride + rel)
    return sT


@triton.jit
def _doc_visible_t(
    qd, qp, kd, kp, kpre, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr
):
    """_doc_visible transposed: [N, M]."""
    same = kd[:, None] == qd[None, :]  # padding: queries -1, keys -2 (host remap)
    rel = qp[None, :] - kp[:, None]
    if CAUSAL:
        vis = rel >= 0
        if HAS_WINDOW:
            vis = vis & (rel < window)
    elif HAS_WINDOW:
        vis = (rel < window) & (rel > -window)
    else:
        vis = rel == rel
    if HAS_PREFIX:
        vis = vis | (kpre[:, None] != 0)
    return same & vis


@triton.jit
def _bits_visible_t(BITS, pid, rows_in_blk, cols_in_blk, QBS: tl.constexpr, WORDS: tl.constexpr):
    """_bits_visible transposed: [N, M] (cols_in_blk along rows)."""
    base = BITS + pid.to(tl.int64) * (QBS * WORDS)
    w = tl.load(base + rows_in_blk[None, :] * WORDS + (cols_in_blk[:, None] // 32))
    return ((w >> (cols_in_blk[:, None] % 32)) & 1) != 0


@triton.jit
def _store_tile(ptrs, val, offs_rows, n_rows, EVEN: tl.constexpr, ADD: tl.constexpr):
    """Store an fp32 tile (rows ``offs_rows`` < ``n_rows``) in the buffer's dtype, or add it to what is there."""
    if EVEN:
        if ADD:
            val += tl.load(ptrs).to(tl.float32)
        tl.store(ptrs, val.to(ptrs.dtype.element_ty))
    else:
        rmask = offs_rows[:, None] < n_rows
        if ADD:
            val += tl.load(ptrs, mask=rmask, other=0.0).to(tl.float32)
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=rmask)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, kd, kp, kpre, kg, offs_n, kb, hq, num, IDX, PID,
    Qb_, DOb, LSEb, DELTAb, sqm, sdom, Sq, Skv,
    BITS, QDOC, QPOS, QIDX, SLOPES, TABLE, table_stride, L, softcap, window, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    QBS: tl.constexpr, KBS: tl.constexpr, WORDS: tl.constexpr, IS_PARTIAL: tl.constexpr,
    MASK_KIND: tl.constexpr, SCORE_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_QIDX: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Transposed formulation (kv along rows): only loaded operands are transposed, never computed tiles.
    SUBS: tl.constexpr = QBS // BLOCK_M
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    ar_m = tl.arange(0, BLOCK_M)
    for it in range(0, num * SUBS):
        j = it // SUBS
        sub = it % SUBS
        qb = tl.load(IDX + j)
        offs_m = qb * QBS + sub * BLOCK_M + ar_m
        if EVEN_M:
            qT = tl.load(Qb_ + offs_m[None, :] * sqm + offs_d[:, None])
            do = tl.load(DOb + offs_m[:, None] * sdom + offs_dv[None, :])
        else:
            qT = tl.load(Qb_ + offs_m[None, :] * sqm + offs_d[:, None], mask=offs_m[None, :] < Sq, other=0.0)
            do = tl.load(
                DOb + offs_m[:, None] * sdom + offs_dv[None, :], mask=offs_m[:, None] < Sq, other=0.0
            )
        lse2, delta = _load_rows(LSEb, DELTAb, offs_m, Sq)
        qkT = _dot(k, qT, PREC, UPCAST)
        if SCORE_KIND == 0:
            sT = qkT * qk_scale
        else:
            if HAS_QIDX:
                qg = tl.load(QIDX + offs_m, mask=offs_m < Sq, other=0)
            else:
                qg = offs_m
            sT = _score_mod_t(qkT * scale, hq, qg, kg, SLOPES, TABLE, table_stride, L, softcap, SCORE_KIND)
            if SCORE_KIND == 1:
                tT = sT / softcap
            sT = sT * 1.4426950408889634
        if IS_PARTIAL:
            if MASK_KIND == 1:
                qd = tl.load(QDOC + offs_m, mask=offs_m < Sq, other=-1)
                qp = tl.load(QPOS + offs_m, mask=offs_m < Sq, other=0)
                vis = _doc_visible_t(qd, qp, kd, kp, kpre, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
                sT = tl.where(vis, sT, float("-inf"))
            elif MASK_KIND == 2:
                pid = tl.load(PID + j)
                vis = _bits_visible_t(BITS, pid, sub * BLOCK_M + ar_m, offs_n - kb * KBS, QBS, WORDS)
                sT = tl.where(vis, sT, float("-inf"))
        if not EVEN_N:
            sT = tl.where(offs_n[:, None] < Skv, sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])
        dv += _dot(pT.to(do.dtype), do, PREC, UPCAST)
        dpT = _dot(v, tl.trans(do), PREC, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        if SCORE_KIND == 1:
            dsT = dsT * (1.0 - tT * tT)
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX, Q_PID, snb, snh, sib, sih, sik, ORDER, sor_b, sor_h,
    BITS, QDOC, KVDOC, QPOS, KVPOS, KVPRE, sdq, sdk, window,
    QIDX, KVIDX, SLOPES, TABLE, table_stride, L, softcap,
    Hq, Hkv, G, Sq, Skv, scale, qk_scale, NB, BH, HG, LEAD,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    QBS: tl.constexpr, KBS: tl.constexpr, WORDS: tl.constexpr, MASK_KIND: tl.constexpr,
    SCORE_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_QIDX: tl.constexpr, HAS_KVIDX: tl.constexpr, HAS_FULL: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ACCUM: tl.constexpr,
):  # fmt: skip
    softcap, scale, qk_scale = _fp32_scalars(softcap, scale, qk_scale)
    SUBS_N: tl.constexpr = KBS // BLOCK_N
    slot, bh = _launch_coords_lead(NB, BH, HG, LEAD, SUBS_N)
    b = bh // Hkv
    hk = bh % Hkv
    b64 = b.to(tl.int64)
    # launch order: kv blocks with the most work first (order of the group's first query head)
    kb = tl.load(ORDER + b * sor_b + (hk * G) * sor_h + slot // SUBS_N)
    start_n = kb * KBS + (slot % SUBS_N) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    k_ptrs = K + b64 * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b64 * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svn + offs_dv[None, :]
    if EVEN_N:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < Skv, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Skv, other=0.0)
    if MASK_KIND == 1:
        kd = tl.load(KVDOC + b64 * sdk + offs_n, mask=offs_n < Skv, other=-2)
        kp = tl.load(KVPOS + b64 * sdk + offs_n, mask=offs_n < Skv, other=0)
        if HAS_PREFIX:
            kpre = tl.load(KVPRE + b64 * sdk + offs_n, mask=offs_n < Skv, other=0)
        else:
            kpre = kp
        QDOC = QDOC + b64 * sdq
        QPOS = QPOS + b64 * sdq
    else:
        kd = offs_n
        kp = offs_n
        kpre = offs_n
    if HAS_KVIDX:
        kg = tl.load(KVIDX + offs_n, mask=offs_n < Skv, other=0)
    else:
        kg = offs_n
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    n_visited = tl.zeros([], dtype=tl.int32)
    for g in range(0, G):
        hq = hk * G + g
        hq64 = hq.to(tl.int64)
        Qb_ = Q + b64 * sqb + hq64 * sqh
        DOb = DO + b64 * sdob + hq64 * sdoh
        LSEb = LSE + (b64 * Hq + hq64) * Sq
        DELTAb = DELTA + (b64 * Hq + hq64) * Sq
        num_off = b * snb + hq * snh + kb
        idx_off = b64 * sib + hq * sih + kb * sik
        num = tl.load(Q_NUM + num_off)
        n_visited += num
        dk, dv = _dkdv_inner(
            dk, dv, k, v, kd, kp, kpre, kg, offs_n, kb, hq, num, Q_IDX + idx_off, Q_PID + idx_off,
            Qb_, DOb, LSEb, DELTAb, sqm, sdom, Sq, Skv,
            BITS, QDOC, QPOS, QIDX, SLOPES, TABLE, table_stride, L, softcap, window, scale, qk_scale,
            BLOCK_M, BLOCK_N, D, DV, QBS, KBS, WORDS, True, MASK_KIND, SCORE_KIND, CAUSAL, HAS_WINDOW,
            HAS_PREFIX, HAS_QIDX, EVEN_M, EVEN_N, PREC, UPCAST,
        )  # fmt: skip
        if HAS_FULL:
            num = tl.load(FULLQ_NUM + num_off)
            n_visited += num
            dk, dv = _dkdv_inner(
                dk, dv, k, v, kd, kp, kpre, kg, offs_n, kb, hq, num, FULLQ_IDX + idx_off, Q_PID + idx_off,
                Qb_, DOb, LSEb, DELTAb, sqm, sdom, Sq, Skv,
                BITS, QDOC, QPOS, QIDX, SLOPES, TABLE, table_stride, L, softcap, window, scale, qk_scale,
                BLOCK_M, BLOCK_N, D, DV, QBS, KBS, WORDS, False, MASK_KIND, SCORE_KIND, CAUSAL, HAS_WINDOW,
                HAS_PREFIX, HAS_QIDX, EVEN_M, EVEN_N, PREC, UPCAST,
            )  # fmt: skip
    dk = dk * scale
    dk_ptrs = DK + b64 * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :]
    dv_ptrs = DV_ + b64 * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :]
    if ACCUM:
        # add into the caller's buffers (ring attention's travelling dK/dV); each tile is owned by one
        # program, so no atomics; a tile with no block this call is not touched at all
        if n_visited > 0:
            _store_tile(dk_ptrs, dk, offs_n, Skv, EVEN_N, True)
            _store_tile(dv_ptrs, dv, offs_n, Skv, EVEN_N, True)
    else:
        _store_tile(dk_ptrs, dk, offs_n, Skv, EVEN_N, False)
        _store_tile(dv_ptrs, dv, offs_n, Skv, EVEN_N, False)


@triton.jit
def _dq_inner(
    dq, tgrad, q, do, lse2, delta, qd, qp, qg, offs_m, qb, hq, num, IDX, PID,
    Kb, Vb, skn, svn, Skv, BITS, KVDOC, KVPOS, KVPRE, KVIDX,
    SLOPES, TABLE, table_stride, L, softcap, window, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    QBS: tl.constexpr, KBS: tl.constexpr, WORDS: tl.constexpr, IS_PARTIAL: tl.constexpr,
    MASK_KIND: tl.constexpr, SCORE_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_KVIDX: tl.constexpr, EVEN_N: tl.constexpr, TABLE_GRAD: tl.constexpr,
    WP: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    SUBS: tl.constexpr = KBS // BLOCK_N
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    ar_n = tl.arange(0, BLOCK_N)
    ar_w = tl.arange(0, WP)
    for it in range(0, num * SUBS):
        j = it // SUBS
        sub = it % SUBS
        kb = tl.load(IDX + j)
        offs_n = kb * KBS + sub * BLOCK_N + ar_n
        if EVEN_N:
            k = tl.load(Kb + offs_n[:, None] * skn + offs_d[None, :])
            v = tl.load(Vb + offs_n[:, None] * svn + offs_dv[None, :])
        else:
            k = tl.load(Kb + offs_n[:, None] * skn + offs_d[None, :], mask=offs_n[:, None] < Skv, other=0.0)
            v = tl.load(Vb + offs_n[:, None] * svn + offs_dv[None, :], mask=offs_n[:, None] < Skv, other=0.0)
        qk = _dot(q, tl.trans(k), PREC, UPCAST)
        if SCORE_KIND == 0:
            s = qk * qk_scale
        else:
            if HAS_KVIDX:
                kg = tl.load(KVIDX + offs_n, mask=offs_n < Skv, other=0)
            else:
                kg = offs_n
            s = _score_mod(qk * scale, hq, qg, kg, SLOPES, TABLE, table_stride, L, softcap, SCORE_KIND)
            if SCORE_KIND == 1:
                t = s / softcap
            s = s * 1.4426950408889634
        s = _mask_scores(
            s, offs_n, j, sub, qd, qp, offs_m, qb, PID, Skv, BITS, KVDOC, KVPOS, KVPRE, window, BLOCK_N, QBS,
            WORDS, IS_PARTIAL, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_N,
        )  # fmt: skip
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        if TABLE_GRAD:
            # dTable[h, bucket] += sum of dScore over the tile's pairs in that bucket; the loop only spans the
            # buckets present in this tile (far tiles collapse onto one clamped bucket)
            rel = qg[:, None] - kg[None, :]
            bucket = tl.minimum(tl.maximum(rel, -L + 1), L - 1) + (L - 1)
            live = ds != 0.0
            lo = tl.min(tl.where(live, bucket, WP))
            hi = tl.max(tl.where(live, bucket, -1))
            for w in range(lo, hi + 1):
                part = tl.sum(tl.sum(tl.where(bucket == w, ds, 0.0), 1), 0)
                tgrad += tl.where(ar_w == w, part, 0.0)
        if SCORE_KIND == 1:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    return dq, tgrad


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, TGRAD,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, KV_PID, snb, snh, sib, sih, siq, ORDER, sor_b, sor_h,
    BITS, QDOC, KVDOC, QPOS, KVPOS, KVPRE, sdq, sdk, window,
    QIDX, KVIDX, SLOPES, TABLE, table_stride, L, softcap,
    Hq, G, Sq, Skv, scale, qk_scale, NB, BH, HG, LEAD,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    QBS: tl.constexpr, KBS: tl.constexpr, WORDS: tl.constexpr, MASK_KIND: tl.constexpr,
    SCORE_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_QIDX: tl.constexpr, HAS_KVIDX: tl.constexpr, HAS_FULL: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, TABLE_GRAD: tl.constexpr, WP: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ACCUM: tl.constexpr,
):  # fmt: skip
    softcap, scale, qk_scale = _fp32_scalars(softcap, scale, qk_scale)
    SUBS_M: tl.constexpr = QBS // BLOCK_M
    slot, bh = _launch_coords_lead(NB, BH, HG, LEAD, SUBS_M)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    b64 = b.to(tl.int64)
    hq64 = hq.to(tl.int64)
    qb = tl.load(ORDER + b * sor_b + hq * sor_h + slot // SUBS_M)
    start_m = qb * QBS + (slot % SUBS_M) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q_ptrs = Q + b64 * sqb + hq64 * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    do_ptrs = DO + b64 * sdob + hq64 * sdoh + offs_m[:, None] * sdom + offs_dv[None, :]
    if EVEN_M:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
        do = tl.load(do_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    lse2, delta = _load_rows(LSE + bh.to(tl.int64) * Sq, DELTA + bh.to(tl.int64) * Sq, offs_m, Sq)
    Kb = K + b64 * skb + hk.to(tl.int64) * skh
    Vb = V + b64 * svb + hk.to(tl.int64) * svh
    if MASK_KIND == 1:
        qd = tl.load(QDOC + b64 * sdq + offs_m, mask=offs_m < Sq, other=-1)
        qp = tl.load(QPOS + b64 * sdq + offs_m, mask=offs_m < Sq, other=0)
        KVDOC = KVDOC + b64 * sdk
        KVPOS = KVPOS + b64 * sdk
        if HAS_PREFIX:
            KVPRE = KVPRE + b64 * sdk
    else:
        qd = offs_m
        qp = offs_m
    if HAS_QIDX:
        qg = tl.load(QIDX + offs_m, mask=offs_m < Sq, other=0)
    else:
        qg = offs_m
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    tgrad = tl.zeros([WP], dtype=tl.float32)
    num_off = b * snb + hq * snh + qb
    idx_off = b64 * sib + hq * sih + qb * siq
    num = tl.load(KV_NUM + num_off)
    n_visited = num
    dq, tgrad = _dq_inner(
        dq, tgrad, q, do, lse2, delta, qd, qp, qg, offs_m, qb, hq, num, KV_IDX + idx_off, KV_PID + idx_off,
        Kb, Vb, skn, svn, Skv, BITS, KVDOC, KVPOS, KVPRE, KVIDX,
        SLOPES, TABLE, table_stride, L, softcap, window, scale, qk_scale,
        BLOCK_M, BLOCK_N, D, DV, QBS, KBS, WORDS, True, MASK_KIND, SCORE_KIND, CAUSAL, HAS_WINDOW,
        HAS_PREFIX, HAS_KVIDX, EVEN_N, TABLE_GRAD, WP, PREC, UPCAST,
    )  # fmt: skip
    if HAS_FULL:
        num = tl.load(FULL_NUM + num_off)
        n_visited += num
        dq, tgrad = _dq_inner(
            dq, tgrad, q, do, lse2, delta, qd, qp, qg, offs_m, qb, hq, num, FULL_IDX + idx_off,
            KV_PID + idx_off, Kb, Vb, skn, svn, Skv, BITS, KVDOC, KVPOS, KVPRE, KVIDX,
            SLOPES, TABLE, table_stride, L, softcap, window, scale, qk_scale,
            BLOCK_M, BLOCK_N, D, DV, QBS, KBS, WORDS, False, MASK_KIND, SCORE_KIND, CAUSAL, HAS_WINDOW,
            HAS_PREFIX, HAS_KVIDX, EVEN_N, TABLE_GRAD, WP, PREC, UPCAST,
        )  # fmt: skip
    dq = dq * scale
    dq_ptrs = DQ + b64 * sdqb + hq64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :]
    if ACCUM:  # add into the caller's buffer; untouched when this call visited no block
        if n_visited > 0:
            _store_tile(dq_ptrs, dq, offs_m, Sq, EVEN_M, True)
    else:
        _store_tile(dq_ptrs, dq, offs_m, Sq, EVEN_M, False)
    if TABLE_GRAD:
        # one private row per program: [B, Hq, n_tiles, WP]; summed on the host in a fixed order
        row = (bh.to(tl.int64) * (NB * SUBS_M) + slot) * WP
        tl.store(TGRAD + row + tl.arange(0, WP), tgrad)


def triton_delta(
    out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None, *, traceable: bool = False
) -> torch.Tensor:
    """``delta = rowsum(dO · O) − dLSE`` in fp32, ``[B, H, S]``, in one pass over ``out`` and ``dout``.

    The backward's per-row constant; context parallelism computes it once from the merged output and hands
    it to every step (torch's ``(dO.float() * O.float()).sum(-1)`` would write two fp32 copies of both).
    """
    if out.shape != dout.shape or out.dim() != 4:
        raise ValueError(
            f"out and dout must both be [B, H, S, D], got {tuple(out.shape)} and {tuple(dout.shape)}"
        )
    if out.device != dout.device:
        raise ValueError(f"out is on {out.device} but dout is on {dout.device}")
    B, H, S, Dv = out.shape
    if dlse is not None and tuple(dlse.shape) != (B, H, S):
        raise ValueError(f"dlse must have shape {(B, H, S)}, got {tuple(dlse.shape)}")
    out_c = out if out.stride(-1) == 1 else out.contiguous()
    dout_c = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = torch.empty(B, H, S, dtype=torch.float32, device=out.device)
    dl = dlse.to(torch.float32).contiguous() if dlse is not None else delta
    BMd = 64
    delta_kernel = wrap_triton(_delta_kernel) if traceable else _delta_kernel
    delta_kernel[(triton.cdiv(S, BMd), B * H)](
        out_c, dout_c, dl, delta,
        out_c.stride(0), out_c.stride(1), out_c.stride(2), dout_c.stride(0), dout_c.stride(1), dout_c.stride(2),
        H, S, BLOCK_M=BMd, DV=Dv, DVP=triton.next_power_of_2(Dv), HAS_DLSE=dlse is not None,
    )  # fmt: skip
    return delta


def bwd_config(D: int, on_gpu: bool) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """((M1, N1, warps, stages) for dK/dV, (M2, N2, warps, stages) for dQ) before fitting to the BlockMask."""
    if not on_gpu:
        return (64, 64, 4, 1), (64, 64, 4, 1)
    return (64, 64, 4, 3), (64, 64, 4, 3)  # H100 sweep at 32k (causal and document masks, D=128)


# (BLOCK_M, BLOCK_N, warps, stages); (64, 64, 4, 3) won both passes at 32k on H100
DKDV_TUNE = [
    (64, 64, 4, 3),
    (64, 128, 8, 3),
    (32, 128, 4, 3),
    (64, 128, 4, 3),
    (32, 64, 4, 3),
    (64, 64, 4, 4),
]
DQ_TUNE = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3)]
_dkdv_kernel_tuned = triton.autotune(configs=tune_configs(DKDV_TUNE), key=TUNE_KEY)(_dkdv_kernel)
_dq_kernel_tuned = triton.autotune(configs=tune_configs(DQ_TUNE), key=TUNE_KEY)(_dq_kernel)
# Adding calls (ACCUM) tune with their buffers restored after each run (see triton_fwd._fwd_kernel_tuned_accum)
_dkdv_kernel_tuned_accum = triton.autotune(
    configs=tune_configs(DKDV_TUNE), key=TUNE_KEY, restore_value=["DK", "DV_"]
)(_dkdv_kernel)
_dq_kernel_tuned_accum = triton.autotune(configs=tune_configs(DQ_TUNE), key=TUNE_KEY, restore_value=["DQ"])(
    _dq_kernel
)


# The RelativeBias table gradient keeps one register row of the (padded) table width per program.
MAX_TABLE_GRAD_WIDTH = 4096


def triton_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    block_mask=None,
    score_mod=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    delta: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
    q_global_idx: torch.Tensor | None = None,
    kv_global_idx: torch.Tensor | None = None,
    score_mod_grads: list[torch.Tensor] | None = None,
    config=None,
    dq_out: torch.Tensor | None = None,
    dk_out: torch.Tensor | None = None,
    dv_out: torch.Tensor | None = None,
    which: str = "all",
    traceable: bool = False,
    head_group: int | None = None,
    accumulate: bool = True,
    gluon_dq: bool = False,
    gluon_dkdv: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Block-sparse backward given the global ``lse``: ``(dq, dk, dv)`` in the input dtypes.

    ``which``: ``"all"``, or ``"dq"`` / ``"dkdv"`` to run only that kernel (the other results are None; pass
    ``delta`` so it is not recomputed) — ring attention runs dQ while the travelling dK/dV buffer is in flight.
    ``dq_out`` / ``dk_out`` / ``dv_out`` (any float dtype, fp32 for ring accumulation; dK and dV together):
    the gradients are added into them inside the kernels (tiles with no block are not touched) and returned.
    ``accumulate=False``: those buffers are overwritten instead (the kernels' ACCUM=False path: every tile
    stored, zeros where there is no block), in the buffer's dtype from the fp32 accumulators, through the
    buffer's strides (unit last-dim stride; e.g. head slices of one tensor, or fp32 dK/dV views of a
    token-major reduce-scatter buffer): no zero-fill, copy or dtype-conversion pass for the caller.
    ``traceable``: launch through ``torch.library.wrap_triton`` with per-call placeholders (the body of a
    ``torch.library.triton_op``, traced with FakeTensors under torch.compile); needs compiled (JIT) kernels.
    ``head_group``: heads per launch group of the dK/dV and dQ kernels (``triton_fwd.launch_head_group``; None:
    its choice).
    ``gluon_dq``: run the dQ pass through the warp-specialised Gluon kernel (kernels/gluon_bwd.py) where it
    covers the call (``gluon_backward_unsupported``; never when ``traceable``), else the Triton dQ kernel
    (``flex_attention_backward`` asks for it on its default backend: 10-18% faster on an H100,
    bench/results/2026-11-26-s13/call8).
    ``gluon_dkdv``: the same for the dK/dV pass (``gluon_bwd.gluon_dkdv``), which ``flex_attention_backward``'s
    default backend also asks for (bench/results/2026-11-26-s14).
    """
    if traceable and not kernels_are_compiled():
        raise ValueError("traceable=True needs compiled Triton kernels, not TRITON_INTERPRET=1's interpreter")
    check_head_group(head_group)
    if not isinstance(accumulate, bool):
        raise ValueError(f"accumulate must be a bool, got {accumulate!r}")
    on_gpu = q.is_cuda
    lp = prepare(
        q, k, v, block_mask, score_mod, scale, enable_gqa, q_global_idx, kv_global_idx,
        dense_block=128 if on_gpu else 64, traceable=traceable,
    )  # fmt: skip
    sh, km = lp.shape, lp.km
    for name, t, want in (
        ("out", out, (sh.B, sh.Hq, sh.Sq, sh.Dv)),
        ("dout", dout, (sh.B, sh.Hq, sh.Sq, sh.Dv)),
        ("lse", lse, (sh.B, sh.Hq, sh.Sq)),
    ):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    (c1, c2) = config or bwd_config(sh.D, on_gpu)
    M1, N1 = pick_tile(km.QBS, c1[0], "query"), pick_tile(km.KBS, c1[1], "kv")
    M2, N2 = pick_tile(km.QBS, c2[0], "query"), pick_tile(km.KBS, c2[1], "kv")
    q, k, v, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, dout))
    lse = lse.to(torch.float32).contiguous()
    dev = q.device
    if delta is None:
        delta = triton_delta(out, dout, dlse, traceable=traceable)
    else:
        delta = delta.to(device=dev, dtype=torch.float32).contiguous()
        if tuple(delta.shape) != (sh.B, sh.Hq, sh.Sq):
            raise ValueError(f"delta must have shape {(sh.B, sh.Hq, sh.Sq)}, got {tuple(delta.shape)}")
    if which not in ("all", "dq", "dkdv"):
        raise ValueError(f"which must be 'all', 'dq' or 'dkdv', got {which!r}")
    run_dq, run_dkdv = which in ("all", "dq"), which in ("all", "dkdv")
    if (dk_out is None) != (dv_out is None):
        raise ValueError("dk_out and dv_out must be given together")
    _, (causal, has_w, has_pre) = doc_args(km, lp.dummy_i)
    common = dict(
        D=sh.D, DV=sh.Dv, QBS=km.QBS, KBS=km.KBS, WORDS=km.words, MASK_KIND=km.mask_kind,
        SCORE_KIND=lp.score_kind, CAUSAL=causal, HAS_WINDOW=has_w, HAS_PREFIX=has_pre,
        HAS_QIDX=lp.has_qidx, HAS_KVIDX=lp.has_kvidx, HAS_FULL=km.has_full, PREC=lp.prec,
        UPCAST=lp.upcast,
    )  # fmt: skip

    for name, t, want in (
        ("dq_out", dq_out, (sh.B, sh.Hq, sh.Sq, sh.D)),
        ("dk_out", dk_out, (sh.B, sh.Hkv, sh.Skv, sh.D)),
        ("dv_out", dv_out, (sh.B, sh.Hkv, sh.Skv, sh.Dv)),
    ):
        if t is not None:
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
            if t.device != dev or not t.dtype.is_floating_point or t.stride(-1) != 1:
                raise ValueError(
                    f"{name} must be a floating tensor on {dev} with unit last-dim stride, got "
                    f"{t.dtype} on {t.device} with strides {t.stride()}"
                )
    dq = dk = dv = None
    use_gluon = (gluon_dq or gluon_dkdv) and not traceable and config is None
    if use_gluon:
        from . import gluon_bwd

        use_gluon = (
            gluon_bwd.gluon_backward_unsupported(
                q, k, v, dout, block_mask, score_mod, scale, dq_out=dq_out, dk_out=dk_out, dv_out=dv_out
            )
            is None
        )
    if run_dkdv and gluon_dkdv and use_gluon:
        if dk_out is not None:
            dk, dv = dk_out, dv_out
        else:
            dk = torch.empty(sh.B, sh.Hkv, sh.Skv, sh.D, dtype=k.dtype, device=dev)
            dv = torch.empty(sh.B, sh.Hkv, sh.Skv, sh.Dv, dtype=v.dtype, device=dev)
        gluon_bwd.launch_dkdv(
            q, k, v, dout, lse, delta, dk, dv, dk_out is not None and accumulate, lp, head_group
        )  # fmt: skip
        run_dkdv = False
    if run_dkdv:
        dk, dv = _dkdv(
            q, k, v, dout, lse, delta, dk_out, dv_out, lp, km, sh, c1, M1, N1, config, common, traceable,
            head_group, accumulate,
        )  # fmt: skip
    if run_dq and gluon_dq and use_gluon:
        dq = (
            dq_out if dq_out is not None else torch.empty(sh.B, sh.Hq, sh.Sq, sh.D, dtype=q.dtype, device=dev)
        )
        gluon_bwd.launch_dq(q, k, v, dout, lse, delta, dq, dq_out is not None and accumulate, lp, head_group)
        run_dq = False
    if run_dq:
        dq = _dq(q, k, v, dout, lse, delta, dq_out, lp, km, sh, c2, M2, N2, config, common, score_mod,
                 score_mod_grads, traceable, head_group, accumulate)  # fmt: skip
    return dq, dk, dv


def _dkdv(
    q, k, v, dout, lse, delta, dk_out, dv_out, lp, km, sh, c1, M1, N1, config, common, traceable, head_group,
    accumulate,
):  # fmt: skip
    """Launch the dK/dV kernel (into new tensors, or adding into / overwriting dk_out / dv_out)."""
    dev = q.device
    dummy_i = lp.dummy_i
    docs, _ = doc_args(km, dummy_i)
    bits = km.bits if km.mask_kind == MASK_BITS else dummy_i
    mods = (lp.qidx, lp.kvidx, lp.slopes, lp.table, lp.table_stride, lp.L, lp.softcap)
    accum = dk_out is not None and accumulate
    if dk_out is not None:
        dk, dv = dk_out, dv_out
    else:
        dk = torch.empty(sh.B, sh.Hkv, sh.Skv, sh.D, dtype=k.dtype, device=dev)
        dv = torch.empty(sh.B, sh.Hkv, sh.Skv, sh.Dv, dtype=v.dtype, device=dev)
    tuned = config is None and use_autotune(q, km, sh.Sq, sh.Skv)
    n_kb = triton.cdiv(sh.Skv, km.KBS)  # kv blocks in use
    hg = head_group or launch_head_group(sh, q.element_size(), kv_programs=True)
    args = (
        q, k, v, dout, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *meta_args(km, True, dummy_i), bits, *docs, *mods,
        sh.Hq, sh.Hkv, sh.groups, sh.Sq, sh.Skv, lp.scale, lp.scale * LOG2E,
        n_kb, sh.B * sh.Hkv, hg, launch_lead(sh, hg, n_kb, True, dev),
    )  # fmt: skip
    if tuned:
        grid = lambda meta: (n_kb * (km.KBS // meta["BLOCK_N"]) * sh.B * sh.Hkv,)
        # (``wrap_triton(<module-level kernel name>)`` spelled out: see triton_fwd.triton_forward)
        if traceable:
            kernel = wrap_triton(_dkdv_kernel_tuned)
            kernel[grid](*args, EVEN_M=lp.even_m, EVEN_N=lp.even_n, ACCUM=accum, **common)
        else:  # a tuned key launches with its config directly (tuned_launch.py)
            kernel = _dkdv_kernel_tuned_accum if accum else _dkdv_kernel_tuned
            launch_tuned(kernel, grid, *args, EVEN_M=lp.even_m, EVEN_N=lp.even_n, ACCUM=accum, **common)
    else:
        kernel = wrap_triton(_dkdv_kernel) if traceable else _dkdv_kernel
        kernel[(n_kb * (km.KBS // N1) * sh.B * sh.Hkv,)](
            *args, BLOCK_M=M1, BLOCK_N=N1, EVEN_M=lp.even_m and sh.Sq % M1 == 0,
            EVEN_N=lp.even_n and sh.Skv % N1 == 0, num_warps=c1[2], num_stages=c1[3], ACCUM=accum, **common,
        )  # fmt: skip
    return dk, dv


def _dq(
    q, k, v, dout, lse, delta, dq_out, lp, km, sh, c2, M2, N2, config, common, score_mod, score_mod_grads,
    traceable, head_group, accumulate,
):  # fmt: skip
    """Launch the dQ kernel (into a new tensor, or adding into / overwriting dq_out); also the RelativeBias
    table gradient."""
    dev = q.device
    dummy_i = lp.dummy_i
    docs, _ = doc_args(km, dummy_i)
    bits = km.bits if km.mask_kind == MASK_BITS else dummy_i
    mods = (lp.qidx, lp.kvidx, lp.slopes, lp.table, lp.table_stride, lp.L, lp.softcap)
    tuned = config is None and use_autotune(q, km, sh.Sq, sh.Skv)
    n_qb = triton.cdiv(sh.Sq, km.QBS)
    accum = dq_out is not None and accumulate

    table_grad = (
        lp.score_kind == SCORE_RELBIAS and score_mod_grads is not None and score_mod.table.requires_grad
    )
    WP = 1
    n_m = n_qb * (km.QBS // M2)  # launch slots (a slot past Sq computes nothing visible)
    tg = lp.dummy
    if table_grad:
        W = lp.table.shape[1]
        WP = triton.next_power_of_2(W)
        if WP > MAX_TABLE_GRAD_WIDTH:
            raise ValueError(
                f"RelativeBias.table width {W} is too large for the in-kernel table gradient "
                f"(at most {MAX_TABLE_GRAD_WIDTH}); use backend='reference'"
            )
        tg = torch.zeros(sh.B, sh.Hq, n_m, WP, dtype=torch.float32, device=dev)
    dq = dq_out if dq_out is not None else torch.empty_like(q, memory_format=torch.contiguous_format)
    hg = head_group or launch_head_group(sh, k.element_size(), kv_programs=False)
    args = (
        q, k, v, dout, lse, delta, dq, tg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *meta_args(km, False, dummy_i), bits, *docs, *mods,
        sh.Hq, sh.groups, sh.Sq, sh.Skv, lp.scale, lp.scale * LOG2E,
        n_qb, sh.B * sh.Hq, hg, launch_lead(sh, hg, n_qb, False, dev),
    )  # fmt: skip
    if tuned and not table_grad:  # the table-gradient scratch is sized for the fixed tile
        grid = lambda meta: (n_qb * (km.QBS // meta["BLOCK_M"]) * sh.B * sh.Hq,)
        kw = dict(EVEN_M=lp.even_m, EVEN_N=lp.even_n, TABLE_GRAD=False, WP=1, ACCUM=accum, **common)
        if traceable:
            kernel = wrap_triton(_dq_kernel_tuned)
            kernel[grid](*args, **kw)
        else:  # a tuned key launches with its config directly (tuned_launch.py)
            kernel = _dq_kernel_tuned_accum if accum else _dq_kernel_tuned
            launch_tuned(kernel, grid, *args, **kw)
    else:
        kernel = wrap_triton(_dq_kernel) if traceable else _dq_kernel
        kernel[(n_m * sh.B * sh.Hq,)](
            *args, BLOCK_M=M2, BLOCK_N=N2, EVEN_M=lp.even_m and sh.Sq % M2 == 0,
            EVEN_N=lp.even_n and sh.Skv % N2 == 0, TABLE_GRAD=table_grad, WP=WP,
            num_warps=c2[2], num_stages=c2[3], ACCUM=accum, **common,
        )  # fmt: skip
    if table_grad:
        g = tg.sum(dim=(0, 2))[:, : lp.table.shape[1]]
        score_mod_grads[0].add_(g.to(score_mod_grads[0].dtype))
    return dq
