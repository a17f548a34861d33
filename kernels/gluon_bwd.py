"""Hopper (sm_90) backward kernels, dQ and dK/dV, written in Gluon, warp-specialised like kernels/gluon_fwd.py.

Same contract as ``triton_bwd._dq_kernel`` for the cases the Gluon forward covers (no score mod, the no-op
and document masks, fp16 / bf16, ``D == Dv`` in {64, 128}): per query tile, over the BlockMask's partial and
then full kv blocks, ``S = Q·Kᵀ``, ``P = exp2(S·scale·log2e − LSE·log2e)`` (0 for a row with LSE −inf),
``dP = dO·Vᵀ``, ``dS = P·(dP − Δ)`` and ``dQ += dS·K``, then ``dQ·scale`` stored, added into ``dq_out``, or
overwriting it. Deterministic: every dQ tile belongs to one program.

Schedule: a producer warp copies Q and dO (both halves of the 128-row tile) once and then K_t, V_t into
double buffers (ready / empty mbarriers); two consumer warpgroups own 64 query rows each. A consumer issues
``S_t`` and ``dP_t`` as asynchronous wgmma, waits for ``S_t`` alone, runs the exponentials while ``dP_t``
finishes, then issues ``dS_t·K_t`` and waits for it before the next step. (Kept in flight across the step,
with its dS operand and accumulator held, it left ptxas short of registers at the 168 a thread of this
12-warp launch may use, and ptxas then serialised every wgmma, warning C7512: s13 call 6 against call 8.)

The dK/dV kernel (``gluon_dkdv``) has the same layout with the roles swapped: K and V of the program's 128 kv
rows are copied once, Q_t and dO_t of every 64-row query step (every query head of the kv head's group) into
double buffers, and each consumer warpgroup holds dK and dV of 64 kv rows. P and dS go through shared memory
(see ``_dkdv_consumer``). ``flex_attention_backward``'s default backend runs both kernels where they cover the
call: on an H100 the backward of the 64k pack is 10-12% faster than with the Triton kernels (s14 calls 2, 6).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from .block_sparse import MASK_DOC, MASK_NONE
from .gluon_fwd import (
    BLOCK_M,
    CONSUMER_REGS,
    WS_MAXNREG,
    _gl_block_lists,
    _gl_doc_visible,
    _gl_launch_coords_lead,
    _gl_mask_scores,
    _gl_pipeline_barriers,
    _gl_query_docs,
    _gl_step_row0,
    _tma_load,
    _tma_problem,
    compile_sm90,
    gluon_forward_unsupported,
)
from .triton_fwd import (
    LOG2E,
    SCORE_NONE,
    _tma_scratch,
    doc_args,
    launch_head_group,
    launch_lead,
    meta_args,
    prepare,
)

DQ_BLOCK_N = 64  # kv rows per step: S, dP (32 registers each), dQ (64) and dS fit a consumer's 240

DKDV_BLOCK_M = 64  # query rows per dK/dV step

# a barrier over the calling partition's warps: ``thread_barrier`` in triton 3.6, ``barrier`` in 3.9
_gl_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _gl_store_grad(g, BASE, row0, stride, n_rows, visited, ROWS: gl.constexpr, D: gl.constexpr,
                   LAYOUT: gl.constexpr, EVEN: gl.constexpr, ACCUM: gl.constexpr):  # fmt: skip
    """Store a finished fp32 gradient tile ``g`` (rows ``row0 ..`` of ``n_rows``, row stride ``stride``) in
    BASE's dtype; ACCUM: add it into BASE instead, left untouched when the walk ``visited`` no block."""
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, LAYOUT))
    ptrs = BASE + gl.expand_dims(rows, 1) * stride + gl.expand_dims(cols, 0)
    row_ok = gl.expand_dims(rows < n_rows, 1) & gl.expand_dims(cols >= 0, 0)
    if ACCUM:
        if visited:
            if EVEN:
                gl.store(ptrs, (g + gl.load(ptrs).to(gl.float32)).to(BASE.dtype.element_ty))
            else:
                prev = gl.load(ptrs, mask=row_ok, other=0.0).to(gl.float32)
                gl.store(ptrs, (g + prev).to(BASE.dtype.element_ty), mask=row_ok)
    else:
        if EVEN:
            gl.store(ptrs, g.to(BASE.dtype.element_ty))
        else:
            gl.store(ptrs, g.to(BASE.dtype.element_ty), mask=row_ok)


@gluon.jit
def _dq_producer(descs, bars, bufs, ptrs, ints, WG: gl.constexpr, CONSTS: gl.constexpr):
    """The load warp: Q and dO (both halves) once, then K_t and V_t of every step into buffer t % 2."""
    q_desc, do_desc, k_desc, v_desc = descs
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    q_smem, do_smem, k_smem, v_smem = bufs
    KVI, FULLI = ptrs[3], ptrs[4]
    start_m, n_part, n = ints[0], ints[1], ints[2]
    KBS: gl.constexpr = CONSTS[0]
    BLOCK_N: gl.constexpr = CONSTS[1]
    HALF: gl.constexpr = CONSTS[2]
    SUBS: gl.constexpr = KBS // BLOCK_N
    mbarrier.expect(q_bar, 2 * (q_desc.block_type.nbytes + do_desc.block_type.nbytes))
    for h in gl.static_range(2):
        _tma_load(q_desc, [start_m + h * HALF, 0], q_bar, q_smem.index(h))
        _tma_load(do_desc, [start_m + h * HALF, 0], q_bar, do_smem.index(h))
    for t in range(0, n):
        st = t % 2
        ph = (t // 2) & 1
        row0 = _gl_step_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
        mbarrier.wait(k_empty.index(st), ph ^ 1)
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        _tma_load(k_desc, [row0, 0], k_ready.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), ph ^ 1)
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        _tma_load(v_desc, [row0, 0], v_ready.index(st), v_smem.index(st))


@gluon.jit
def _dq_consumer(descs, bars, bufs, ptrs, ints, WG: gl.constexpr, CONSTS: gl.constexpr):
    """One consumer warpgroup: dQ of query rows ``start_m + WG·64 ..``."""
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    q_smem, do_smem, k_smem, v_smem = bufs
    DQb, LSEb, DELTAb, KVI, FULLI, QDOCb, KVDOC, QPOSb, KVPOS, KVPRE = ptrs
    start_m, n_part, n, Sq, Skv, window, qk_scale, scale, sdqm = ints
    KBS: gl.constexpr = CONSTS[0]
    BLOCK_N: gl.constexpr = CONSTS[1]
    HALF: gl.constexpr = CONSTS[2]
    D: gl.constexpr = CONSTS[3]
    MASK_KIND: gl.constexpr = CONSTS[4]
    CAUSAL: gl.constexpr = CONSTS[5]
    HAS_WINDOW: gl.constexpr = CONSTS[6]
    HAS_PREFIX: gl.constexpr = CONSTS[7]
    EVEN_M: gl.constexpr = CONSTS[8]
    EVEN_N: gl.constexpr = CONSTS[9]
    S_LAYOUT: gl.constexpr = CONSTS[10]
    DQ_LAYOUT: gl.constexpr = CONSTS[11]
    DS_LAYOUT: gl.constexpr = CONSTS[12]
    ACCUM: gl.constexpr = CONSTS[13]
    SUBS: gl.constexpr = KBS // BLOCK_N
    dtype: gl.constexpr = k_smem.dtype
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
    qk_scale = qk_scale.to(gl.float32)
    scale = scale.to(gl.float32)
    q_tile = q_smem.index(WG)
    do_tile = do_smem.index(WG)
    offs_m = start_m + WG * HALF + gl.arange(0, HALF, layout=ROW_S)
    lse = gl.load(LSEb + offs_m, mask=offs_m < Sq, other=float("inf"))
    # rows that see nothing (LSE −inf) -> +inf, so exp2(s − lse2) is exactly 0 for every s
    lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = gl.load(DELTAb + offs_m, mask=offs_m < Sq, other=0.0)
    qd, qp = _gl_query_docs(QDOCb, QPOSb, offs_m, Sq, MASK_KIND)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=S_LAYOUT)
    # (the loop carries dQ as a wgmma accumulator token and waits on it twice, at the step's end and again,
    # already complete, beside S_t: the code measured in s13 call 8)
    dq_tok = warpgroup_mma_init(gl.zeros([HALF, D], gl.float32, layout=DQ_LAYOUT))
    ds = gl.zeros([HALF, BLOCK_N], dtype, layout=DS_LAYOUT)
    mbarrier.wait(q_bar, 0)
    for t in range(0, n):
        st = t % 2
        ph = (t // 2) & 1
        row0 = _gl_step_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
        mbarrier.wait(k_ready.index(st), ph)
        s_tok = warpgroup_mma(q_tile, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(st), ph)
        dp_tok = warpgroup_mma(
            do_tile, v_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        # S_t is back; dP_t may still run
        dq, s, ds = warpgroup_mma_wait(1, deps=(dq_tok, s_tok, ds))
        if t > 0:  # K_{t-1}'s last reader, dS_{t-1}·K_{t-1}, was waited for in step t-1
            mbarrier.arrive(k_empty.index((t - 1) % 2), count=1)
        offs_n = row0 + gl.arange(0, BLOCK_N, layout=COL_S)
        s = _gl_mask_scores(
            s, offs_n, t // SUBS < n_part, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, MASK_KIND, CAUSAL,
            HAS_WINDOW, HAS_PREFIX, EVEN_N,
        )  # fmt: skip
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
        dp = warpgroup_mma_wait(0, deps=(dp_tok,))
        mbarrier.arrive(v_empty.index(st), count=1)
        ds = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(dtype), DS_LAYOUT)
        dq_tok = warpgroup_mma(ds, k_smem.index(st), dq, is_async=True)
        dq, ds = warpgroup_mma_wait(0, deps=(dq_tok, ds))
        dq_tok = warpgroup_mma_init(dq)
    dq, ds = warpgroup_mma_wait(0, deps=(dq_tok, ds))
    if n > 0:
        mbarrier.arrive(k_empty.index((n - 1) % 2), count=1)

    _gl_store_grad(dq * scale, DQb, start_m + WG * HALF, sdqm, Sq, n > 0, HALF, D, DQ_LAYOUT, EVEN_M, ACCUM)


@gluon.jit
def _gl_dq_ws_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, snb, snh, sib, sih, siq, ORDER, sor_b, sor_h,
    QDOC, KVDOC, QPOS, KVPOS, KVPRE, sdq, sdk, window,
    Hq, G, Sq, Skv, scale, qk_scale, NB, BH, HG, LEAD,
    D: gl.constexpr, DV: gl.constexpr, QBS: gl.constexpr, KBS: gl.constexpr,
    MASK_KIND: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_PREFIX: gl.constexpr,
    HAS_FULL: gl.constexpr, EVEN_M: gl.constexpr, EVEN_N: gl.constexpr, ACCUM: gl.constexpr,
    S_LAYOUT: gl.constexpr, DQ_LAYOUT: gl.constexpr, DS_LAYOUT: gl.constexpr, SMEM: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):  # fmt: skip
    SUBS_M: gl.constexpr = QBS // BLOCK_M
    SUBS: gl.constexpr = KBS // BLOCK_N
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = Q.dtype.element_ty
    slot, bh = _gl_launch_coords_lead(NB, BH, HG, LEAD, SUBS_M)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    b64 = b.to(gl.int64)
    hq64 = hq.to(gl.int64)
    qb = gl.load(ORDER + b * sor_b + hq * sor_h + slot // SUBS_M)
    start_m = qb * QBS + (slot % SUBS_M) * BLOCK_M
    n_part, n, KVI, FULLI = _gl_block_lists(
        KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, b * snb + hq * snh + qb, b64 * sib + hq * sih + qb * siq, SUBS,
        HAS_FULL,
    )  # fmt: skip

    q_desc = tma.make_tensor_descriptor(Q + b64 * sqb + hq64 * sqh, [Sq, D], [sqm, 1], [HALF, D], SMEM)
    do_desc = tma.make_tensor_descriptor(DO + b64 * sdob + hq64 * sdoh, [Sq, DV], [sdom, 1], [HALF, DV], SMEM)
    k_desc = tma.make_tensor_descriptor(
        K + b64 * skb + hk.to(gl.int64) * skh, [Skv, D], [skn, 1], [BLOCK_N, D], SMEM
    )
    v_desc = tma.make_tensor_descriptor(
        V + b64 * svb + hk.to(gl.int64) * svh, [Skv, DV], [svn, 1], [BLOCK_N, DV], SMEM
    )
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], SMEM)
    do_smem = gl.allocate_shared_memory(dtype, [2, HALF, DV], SMEM)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], SMEM)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, DV], SMEM)
    bars = _gl_pipeline_barriers()  # (Q and dO, K ready / empty, V ready / empty)

    if MASK_KIND == 1:
        KVDOC = KVDOC + b64 * sdk
        KVPOS = KVPOS + b64 * sdk
        if HAS_PREFIX:
            KVPRE = KVPRE + b64 * sdk
    descs = (q_desc, do_desc, k_desc, v_desc)
    bufs = (q_smem, do_smem, k_smem, v_smem)
    row = bh.to(gl.int64) * Sq
    ptrs = (
        DQ + b64 * sdqb + hq64 * sdqh, LSE + row, DELTA + row, KVI, FULLI,
        QDOC + b64 * sdq, KVDOC, QPOS + b64 * sdq, KVPOS, KVPRE,
    )  # fmt: skip
    ints = (start_m, n_part, n, Sq, Skv, window, qk_scale, scale, sdqm)
    CONSTS: gl.constexpr = (
        KBS, BLOCK_N, HALF, D, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_M, EVEN_N, S_LAYOUT, DQ_LAYOUT,
        DS_LAYOUT, ACCUM,
    )  # fmt: skip
    gl.warp_specialize(
        [
            (_dq_consumer, (descs, bars, bufs, ptrs, ints, 0, CONSTS)),
            (_dq_consumer, (descs, bars, bufs, ptrs, ints, 1, CONSTS)),
            (_dq_producer, (descs, bars, bufs, ptrs, ints, 1, CONSTS)),
        ],
        [4, 1],
        [CONSUMER_REGS, 24],
    )


# ----------------------------------------------------------------------------------------------------------
# dK / dV: one program per 128 kv rows (two consumer warpgroups of 64) and kv head; it walks, for every query
# head of its GQA group, the transposed block lists (query blocks of this kv block, partial then full) in
# 64-row query steps. The producer copies K and V (both halves) once, then Q_t and dO_t into double buffers.
# ----------------------------------------------------------------------------------------------------------


@gluon.jit
def _dkdv_lists(NUMS, hq, ints, SUBS: gl.constexpr, HAS_FULL: gl.constexpr):
    """``_gl_block_lists`` of query head ``hq`` for this program's kv block (the transposed tables)."""
    Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX = NUMS
    kb, b, snb, snh, sib, sih, sik = ints
    return _gl_block_lists(
        Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX, b * snb + hq * snh + kb, b.to(gl.int64) * sib + hq * sih + kb * sik,
        SUBS, HAS_FULL,
    )  # fmt: skip


@gluon.jit
def _dkdv_producer(descs, bars, bufs, ptrs, ints, WG: gl.constexpr, CONSTS: gl.constexpr):
    """The load warp: K and V (both halves) once, then Q_t and dO_t of every step into buffer c % 2
    (through descriptors of each query head's [Sq, D] slice, made as the walk reaches the head)."""
    k_desc, v_desc = descs
    kv_bar, q_ready, q_empty, do_ready, _ = bars
    k_smem, v_smem, q_smem, do_smem = bufs[:4]
    NUMS, Qb, DOb = ptrs[0], ptrs[10], ptrs[11]
    start_n, G, hk, kb, b, snb, snh, sib, sih, sik = ints[:10]
    Sq, sqh, sqm, sdoh, sdom = ints[10], ints[17], ints[18], ints[19], ints[20]
    QBS: gl.constexpr = CONSTS[0]
    BLOCK_M: gl.constexpr = CONSTS[1]
    HALF: gl.constexpr = CONSTS[2]
    HAS_FULL: gl.constexpr = CONSTS[3]
    D: gl.constexpr = CONSTS[4]
    SMEM: gl.constexpr = CONSTS[14]
    SUBS: gl.constexpr = QBS // BLOCK_M
    mbarrier.expect(kv_bar, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for h in gl.static_range(2):
        _tma_load(k_desc, [start_n + h * HALF, 0], kv_bar, k_smem.index(h))
        _tma_load(v_desc, [start_n + h * HALF, 0], kv_bar, v_smem.index(h))
    c = 0
    for g in range(0, G):
        hq = hk * G + g
        n_part, n, QI, FQI = _dkdv_lists(NUMS, hq, (kb, b, snb, snh, sib, sih, sik), SUBS, HAS_FULL)
        hq64 = hq.to(gl.int64)
        q_desc = tma.make_tensor_descriptor(Qb + hq64 * sqh, [Sq, D], [sqm, 1], [BLOCK_M, D], SMEM)
        do_desc = tma.make_tensor_descriptor(DOb + hq64 * sdoh, [Sq, D], [sdom, 1], [BLOCK_M, D], SMEM)
        for t in range(0, n):
            st = c % 2
            ph = (c // 2) & 1
            row0 = _gl_step_row0(QI, FQI, t, n_part, QBS, BLOCK_M, SUBS)
            # (the consumers release Q and dO of a step together, on q_empty: one arrive a step, not two)
            mbarrier.wait(q_empty.index(st), ph ^ 1)
            mbarrier.expect(q_ready.index(st), q_desc.block_type.nbytes)
            _tma_load(q_desc, [row0, 0], q_ready.index(st), q_smem.index(st))
            mbarrier.expect(do_ready.index(st), do_desc.block_type.nbytes)
            _tma_load(do_desc, [row0, 0], do_ready.index(st), do_smem.index(st))
            c += 1


@gluon.jit
def _dkdv_probs(s, partial, qd, qp, lse2, kv_docs, offs_n, Skv, window, qk_scale, WG: gl.constexpr,
                CONSTS: gl.constexpr):  # fmt: skip
    """P of a query-major score tile: a partial block's document mask (this warpgroup's kv documents read
    back from shared memory), kv rows past Skv, then ``exp2(S·scale·log2e − LSE·log2e)``."""
    MASK_KIND: gl.constexpr = CONSTS[5]
    CAUSAL: gl.constexpr = CONSTS[6]
    HAS_WINDOW: gl.constexpr = CONSTS[7]
    HAS_PREFIX: gl.constexpr = CONSTS[8]
    EVEN_N: gl.constexpr = CONSTS[10]
    S_LAYOUT: gl.constexpr = CONSTS[11]
    COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
    if MASK_KIND == 1:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if partial:
            kd = kv_docs.index(3 * WG).load(COL_S)
            kp = kv_docs.index(3 * WG + 1).load(COL_S)
            kpre = kp
            if HAS_PREFIX:
                kpre = kv_docs.index(3 * WG + 2).load(COL_S)
            vis = _gl_doc_visible(qd, qp, kd, kp, kpre, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
            s = gl.where(vis, s, float("-inf"))
    if not EVEN_N:
        s = gl.where(gl.expand_dims(offs_n < Skv, 0), s, float("-inf"))
    return gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))


@gluon.jit
def _dkdv_consumer(descs, bars, bufs, ptrs, ints, WG: gl.constexpr, CONSTS: gl.constexpr):
    """One consumer warpgroup: dK and dV of kv rows ``start_n + WG·64 ..``, over query steps of 64 rows.

    ``S = Q_t·Kᵀ`` comes back as a [query, kv] tile, so a query's LSE, Δ and document are two registers a
    thread (a kv-major Sᵀ tile holds 16 of each; with Pᵀ and dSᵀ kept in registers for the dV / dK GEMMs,
    that schedule spilled at 64-row steps and ran 32-row ones, 5-15% slower than this one: s14 call 1).
    P_t goes to this warpgroup's shared buffer, then ``dP_t = dO_t·Vᵀ`` and ``dV += P_tᵀ·dO_t`` are issued
    together (dP issued beside S_t, under the exponentials, was 1-3% slower: more registers live under the
    mask); dS_t goes to shared memory after dP_t is back, and ``dK += dS_tᵀ·Q_t`` reads it transposed."""
    kv_bar, q_ready, q_empty, do_ready, _ = bars  # (dO is released with Q, on q_empty)
    k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, kv_docs = bufs
    NUMS, DKb, DVb, LSEb, DELTAb, QDOC, QPOS, KVDOC, KVPOS, KVPRE = ptrs[:10]
    start_n, G, hk, kb, b, snb, snh, sib, sih, sik, Sq, Skv, window, qk_scale, scale, sdkn, sdvn = ints[:17]
    QBS: gl.constexpr = CONSTS[0]
    BLOCK_M: gl.constexpr = CONSTS[1]
    HALF: gl.constexpr = CONSTS[2]
    HAS_FULL: gl.constexpr = CONSTS[3]
    D: gl.constexpr = CONSTS[4]
    MASK_KIND: gl.constexpr = CONSTS[5]
    HAS_PREFIX: gl.constexpr = CONSTS[8]
    EVEN_N: gl.constexpr = CONSTS[10]
    S_LAYOUT: gl.constexpr = CONSTS[11]
    ACC_LAYOUT: gl.constexpr = CONSTS[12]
    ACCUM: gl.constexpr = CONSTS[13]
    SUBS: gl.constexpr = QBS // BLOCK_M
    dtype: gl.constexpr = k_smem.dtype
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)  # query rows
    COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)  # kv columns
    qk_scale = qk_scale.to(gl.float32)
    scale = scale.to(gl.float32)
    kT = k_smem.index(WG).permute((1, 0))
    vT = v_smem.index(WG).permute((1, 0))
    p_buf = p_smem.index(WG)
    ds_buf = ds_smem.index(WG)
    offs_n = start_n + WG * HALF + gl.arange(0, HALF, layout=COL_S)
    if MASK_KIND == 1:
        # this warpgroup's kv documents, positions and prefix flags, parked in shared memory: kept in registers
        # (or their 48 addresses, which LLVM hoists out of the loop) they made ptxas spill
        kv_docs.index(3 * WG).store(gl.load(KVDOC + offs_n, mask=offs_n < Skv, other=-2))
        kv_docs.index(3 * WG + 1).store(gl.load(KVPOS + offs_n, mask=offs_n < Skv, other=0))
        if HAS_PREFIX:
            kv_docs.index(3 * WG + 2).store(gl.load(KVPRE + offs_n, mask=offs_n < Skv, other=0))
        _gl_barrier()
    ar_m = gl.arange(0, BLOCK_M, layout=ROW_S)
    s_zero = gl.zeros([BLOCK_M, HALF], gl.float32, layout=S_LAYOUT)
    dk = gl.zeros([HALF, D], gl.float32, layout=ACC_LAYOUT)
    dv = gl.zeros([HALF, D], gl.float32, layout=ACC_LAYOUT)
    mbarrier.wait(kv_bar, 0)
    c = 0
    for g in range(0, G):
        hq = hk * G + g
        n_part, n, QI, FQI = _dkdv_lists(NUMS, hq, (kb, b, snb, snh, sib, sih, sik), SUBS, HAS_FULL)
        LSEh = LSEb + hq.to(gl.int64) * Sq
        DELTAh = DELTAb + hq.to(gl.int64) * Sq
        row0 = 0
        for t in range(0, n):
            st = c % 2
            ph = (c // 2) & 1
            if t == 0:  # (later steps' rows were read a step ahead, off the path to this step's loads)
                row0 = _gl_step_row0(QI, FQI, 0, n_part, QBS, BLOCK_M, SUBS)
            offs_m = row0 + ar_m
            lse = gl.load(LSEh + offs_m, mask=offs_m < Sq, other=float("inf"))
            qd, qp = _gl_query_docs(QDOC, QPOS, offs_m, Sq, MASK_KIND)
            if t + 1 < n:
                row0 = _gl_step_row0(QI, FQI, t + 1, n_part, QBS, BLOCK_M, SUBS)
            mbarrier.wait(q_ready.index(st), ph)
            q_t = q_smem.index(st)
            s_tok = warpgroup_mma(q_t, kT, s_zero, use_acc=False, is_async=True)
            # rows that see nothing (LSE −inf) and rows past Sq (+inf) -> P exactly 0
            lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            p = _dkdv_probs(
                s, t // SUBS < n_part, qd, qp, lse2, kv_docs, offs_n, Skv, window, qk_scale, WG, CONSTS
            )
            p_buf.store(p.to(dtype))
            fence_async_shared()
            _gl_barrier()  # every thread's part of P is in shared memory before the wgmma reads it
            mbarrier.wait(do_ready.index(st), ph)
            do_t = do_smem.index(st)
            dp_tok = warpgroup_mma(do_t, vT, s_zero, use_acc=False, is_async=True)
            dv_tok = warpgroup_mma(p_buf.permute((1, 0)), do_t, dv, is_async=True)
            delta = gl.load(DELTAh + offs_m, mask=offs_m < Sq, other=0.0)
            dp = warpgroup_mma_wait(1, deps=(dp_tok,))  # dP_t is back; dV_t may still run
            ds_buf.store((p * (dp - gl.expand_dims(delta, 1))).to(dtype))
            fence_async_shared()
            _gl_barrier()
            dk_tok = warpgroup_mma(ds_buf.permute((1, 0)), q_t, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
            # Q_t, dO_t and this warpgroup's P / dS buffers are free again
            mbarrier.arrive(q_empty.index(st), count=1)
            c += 1

    row0 = start_n + WG * HALF
    _gl_store_grad(dk * scale, DKb, row0, sdkn, Skv, c > 0, HALF, D, ACC_LAYOUT, EVEN_N, ACCUM)
    _gl_store_grad(dv, DVb, row0, sdvn, Skv, c > 0, HALF, D, ACC_LAYOUT, EVEN_N, ACCUM)


@gluon.jit
def _gl_dkdv_ws_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX, snb, snh, sib, sih, sik, ORDER, sor_b, sor_h,
    QDOC, KVDOC, QPOS, KVPOS, KVPRE, sdq, sdk, window,
    Hq, Hkv, G, Sq, Skv, scale, qk_scale, NB, BH, HG, LEAD,
    D: gl.constexpr, DV: gl.constexpr, QBS: gl.constexpr, KBS: gl.constexpr,
    MASK_KIND: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_PREFIX: gl.constexpr,
    HAS_FULL: gl.constexpr, EVEN_M: gl.constexpr, EVEN_N: gl.constexpr, ACCUM: gl.constexpr,
    S_LAYOUT: gl.constexpr, ACC_LAYOUT: gl.constexpr, SMEM: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr = 24,
):  # fmt: skip
    SUBS_N: gl.constexpr = KBS // BLOCK_N
    HALF: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = Q.dtype.element_ty
    slot, bh = _gl_launch_coords_lead(NB, BH, HG, LEAD, SUBS_N)  # over (kv tile, batch·kv head)
    b = bh // Hkv
    hk = bh % Hkv
    b64 = b.to(gl.int64)
    hk64 = hk.to(gl.int64)
    # launch order: kv blocks with the most work first (order of the group's first query head)
    kb = gl.load(ORDER + b * sor_b + (hk * G) * sor_h + slot // SUBS_N)
    start_n = kb * KBS + (slot % SUBS_N) * BLOCK_N

    k_desc = tma.make_tensor_descriptor(K + b64 * skb + hk64 * skh, [Skv, D], [skn, 1], [HALF, D], SMEM)
    v_desc = tma.make_tensor_descriptor(V + b64 * svb + hk64 * svh, [Skv, DV], [svn, 1], [HALF, DV], SMEM)
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], SMEM)
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF, DV], SMEM)
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], SMEM)
    do_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, DV], SMEM)
    # each consumer's P and dS tiles, and its kv documents, positions and prefix flags
    p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HALF], SMEM)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HALF], SMEM)
    kv_docs = gl.allocate_shared_memory(gl.int32, [6, HALF], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # (K and V, Q ready / empty, dO ready; dO's empty barrier goes unused: the consumers release Q and dO
    # together on Q's)
    bars = _gl_pipeline_barriers()

    if MASK_KIND == 1:
        QDOC = QDOC + b64 * sdq
        QPOS = QPOS + b64 * sdq
        KVDOC = KVDOC + b64 * sdk
        KVPOS = KVPOS + b64 * sdk
        if HAS_PREFIX:
            KVPRE = KVPRE + b64 * sdk
    descs = (k_desc, v_desc)
    bufs = (k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, kv_docs)
    rows = b64 * Hq * Sq
    ptrs = (
        (Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX), DK + b64 * sdkb + hk64 * sdkh, DV_ + b64 * sdvb + hk64 * sdvh,
        LSE + rows, DELTA + rows, QDOC, QPOS, KVDOC, KVPOS, KVPRE, Q + b64 * sqb, DO + b64 * sdob,
    )  # fmt: skip
    ints = (
        start_n, G, hk, kb, b, snb, snh, sib, sih, sik, Sq, Skv, window, qk_scale, scale, sdkn, sdvn,
        sqh, sqm, sdoh, sdom,
    )  # fmt: skip
    CONSTS: gl.constexpr = (
        QBS, BLOCK_M, HALF, HAS_FULL, D, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_M, EVEN_N, S_LAYOUT,
        ACC_LAYOUT, ACCUM, SMEM,
    )  # fmt: skip
    gl.warp_specialize(
        [
            (_dkdv_consumer, (descs, bars, bufs, ptrs, ints, 0, CONSTS)),
            (_dkdv_consumer, (descs, bars, bufs, ptrs, ints, 1, CONSTS)),
            (_dkdv_producer, (descs, bars, bufs, ptrs, ints, 1, CONSTS)),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )


def dkdv_kernel_layouts(D: int) -> dict:
    """Constexpr layouts of the dK/dV kernel: each consumer warpgroup's 64 kv rows, DKDV_BLOCK_M-row
    query steps."""
    half = BLOCK_M // 2
    acc_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    return dict(
        # S, dP: [DKDV_BLOCK_M queries, 64 kv]
        S_LAYOUT=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, half, 16]),
        ACC_LAYOUT=acc_layout,
        SMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        BLOCK_M=DKDV_BLOCK_M,
        BLOCK_N=BLOCK_M,  # 128 kv rows per program
    )


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


def dq_kernel_layouts(D: int, block_n: int = DQ_BLOCK_N) -> dict:
    """Constexpr layouts of the dQ kernel (each consumer warpgroup's 64-row tiles)."""
    s_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16])
    dq_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    return dict(
        S_LAYOUT=s_layout,
        DQ_LAYOUT=dq_layout,
        DS_LAYOUT=gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2),
        SMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
    )


def gluon_backward_unsupported(q, k, v, dout, block_mask, score_mod, scale, **outs) -> str | None:
    """Why the Gluon backward kernels cannot run this call, or None: the forward's rules, plus dO's dtype
    and TMA alignment and the dtypes of the given output buffers (``dq_out=`` / ``dk_out=`` / ``dv_out=``)."""
    if dout.dtype != q.dtype:
        return f"dout dtype {dout.dtype} differs from q's {q.dtype}"
    for name, t in outs.items():
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"{name} dtype {t.dtype}: it stores fp16, bf16 or fp32"
    why = _tma_problem("dout", dout)
    if why is not None:
        return why
    return gluon_forward_unsupported(q, k, v, block_mask, score_mod, scale)


def _checked(fn: str, q, k, v, dout, lse, delta, block_mask, scale, enable_gqa, **outs):
    """The checks and launch parameters shared by ``gluon_dq`` and ``gluon_dkdv``."""
    why = gluon_backward_unsupported(q, k, v, dout, block_mask, None, scale, **outs)
    if why is not None:
        raise ValueError(f"{fn} cannot run this call: {why}")
    lp = prepare(q, k, v, block_mask, None, scale, enable_gqa, None, None, dense_block=128)
    sh = lp.shape
    for name, t in (("lse", lse), ("delta", delta)):
        if tuple(t.shape) != (sh.B, sh.Hq, sh.Sq) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous fp32 [B, Hq, Sq] = {(sh.B, sh.Hq, sh.Sq)} tensor, got "
                f"{t.dtype} {tuple(t.shape)}"
            )
    for name, t in outs.items():
        want = (sh.B, sh.Hq, sh.Sq, sh.D) if name == "dq_out" else (sh.B, sh.Hkv, sh.Skv, sh.D)
        if t is not None and (tuple(t.shape) != want or t.device != q.device or t.stride(-1) != 1):
            raise ValueError(
                f"{name} must be {want} on {q.device} with unit last-dim stride, got {tuple(t.shape)} "
                f"on {t.device} with strides {t.stride()}"
            )
    return lp


def launch_dq(q, k, v, dout, lse, delta, dq, accum: bool, lp, head_group=None, block_n: int = DQ_BLOCK_N):
    """Launch the dQ kernel into ``dq`` (added into when ``accum``) for checked inputs: ``lp`` is
    ``triton_fwd.prepare``'s result for this call (``triton_backward`` passes its own)."""
    sh, km = lp.shape, lp.km
    assert lp.score_kind == SCORE_NONE and km.mask_kind in (MASK_NONE, MASK_DOC)
    n_qb = triton.cdiv(sh.Sq, km.QBS)
    (num, idx, fnum, fidx, _pid, snb, snh, sib, sih, siq, order, sor_b, sor_h) = meta_args(
        km, False, lp.dummy_i
    )
    docs, (causal, has_w, has_pre) = doc_args(km, lp.dummy_i)
    hg = head_group or launch_head_group(sh, k.element_size(), kv_programs=False)
    triton.set_allocator(_tma_scratch)  # the device-side descriptors' global scratch (see gluon_forward)
    _gl_dq_ws_kernel[(n_qb * (km.QBS // BLOCK_M) * sh.B * sh.Hq,)](
        q, k, v, dout, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        num, idx, fnum, fidx, snb, snh, sib, sih, siq, order, sor_b, sor_h,
        *docs, sh.Hq, sh.groups, sh.Sq, sh.Skv, lp.scale, lp.scale * LOG2E, n_qb, sh.B * sh.Hq, hg,
        launch_lead(sh, hg, n_qb, False, q.device),
        D=sh.D, DV=sh.Dv, QBS=km.QBS, KBS=km.KBS, MASK_KIND=km.mask_kind, CAUSAL=causal, HAS_WINDOW=has_w,
        HAS_PREFIX=has_pre, HAS_FULL=km.has_full, EVEN_M=lp.even_m, EVEN_N=lp.even_n, ACCUM=accum,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4, maxnreg=WS_MAXNREG, **dq_kernel_layouts(sh.D, block_n),
    )  # fmt: skip
    return dq


def launch_dkdv(q, k, v, dout, lse, delta, dk, dv, accum: bool, lp, head_group=None):
    """Launch the dK/dV kernel into ``dk`` / ``dv`` (added into when ``accum``) for checked inputs (see
    ``launch_dq``)."""
    sh, km = lp.shape, lp.km
    assert lp.score_kind == SCORE_NONE and km.mask_kind in (MASK_NONE, MASK_DOC)
    n_kb = triton.cdiv(sh.Skv, km.KBS)
    (num, idx, fnum, fidx, _pid, snb, snh, sib, sih, sik, order, sor_b, sor_h) = meta_args(
        km, True, lp.dummy_i
    )
    docs, (causal, has_w, has_pre) = doc_args(km, lp.dummy_i)
    hg = head_group or launch_head_group(sh, q.element_size(), kv_programs=True)
    triton.set_allocator(_tma_scratch)
    _gl_dkdv_ws_kernel[(n_kb * (km.KBS // BLOCK_M) * sh.B * sh.Hkv,)](
        q, k, v, dout, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        num, idx, fnum, fidx, snb, snh, sib, sih, sik, order, sor_b, sor_h,
        *docs, sh.Hq, sh.Hkv, sh.groups, sh.Sq, sh.Skv, lp.scale, lp.scale * LOG2E, n_kb, sh.B * sh.Hkv, hg,
        launch_lead(sh, hg, n_kb, True, q.device),
        D=sh.D, DV=sh.Dv, QBS=km.QBS, KBS=km.KBS, MASK_KIND=km.mask_kind, CAUSAL=causal, HAS_WINDOW=has_w,
        HAS_PREFIX=has_pre, HAS_FULL=km.has_full, EVEN_M=lp.even_m, EVEN_N=lp.even_n, ACCUM=accum,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4, maxnreg=WS_MAXNREG, **dkdv_kernel_layouts(sh.D),
    )  # fmt: skip
    return dk, dv


def gluon_dq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dq_out: torch.Tensor | None = None,
    accumulate: bool = True,
    head_group: int | None = None,
    block_n: int = DQ_BLOCK_N,
) -> torch.Tensor:
    """dQ through the Gluon kernel, given the global natural-log ``lse`` and ``delta = rowsum(dO·O) − dLSE``
    (fp32, ``[B, Hq, Sq]``): a new tensor in q's dtype, or added into / (``accumulate=False``) written over
    ``dq_out`` (fp16, bf16 or fp32, unit last-dim stride), which is returned. Raises ``ValueError`` naming
    the reason for a call it does not cover (``gluon_backward_unsupported``)."""
    lp = _checked("gluon_dq", q, k, v, dout, lse, delta, block_mask, scale, enable_gqa, dq_out=dq_out)
    if block_n not in (64, 128):
        raise ValueError(f"block_n must be 64 or 128, got {block_n}")
    sh = lp.shape
    dq = (
        dq_out
        if dq_out is not None
        else torch.empty(sh.B, sh.Hq, sh.Sq, sh.D, dtype=q.dtype, device=q.device)
    )
    return launch_dq(
        q, k, v, dout, lse, delta, dq, dq_out is not None and accumulate, lp, head_group, block_n
    )


def gluon_dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dk_out: torch.Tensor | None = None,
    dv_out: torch.Tensor | None = None,
    accumulate: bool = True,
    head_group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dK, dV) through the Gluon kernel (``gluon_dq``'s inputs): new tensors in k's / v's dtype, or added
    into / (``accumulate=False``) written over ``dk_out`` / ``dv_out`` (given together; fp16, bf16 or fp32,
    unit last-dim stride), which are returned. Raises ``ValueError`` naming the reason for a call it does not
    cover (``gluon_backward_unsupported``)."""
    if (dk_out is None) != (dv_out is None):
        raise ValueError("dk_out and dv_out must be given together")
    lp = _checked(
        "gluon_dkdv", q, k, v, dout, lse, delta, block_mask, scale, enable_gqa, dk_out=dk_out, dv_out=dv_out
    )
    sh = lp.shape
    if dk_out is not None:
        dk, dv = dk_out, dv_out
    else:
        dk = torch.empty(sh.B, sh.Hkv, sh.Skv, sh.D, dtype=k.dtype, device=q.device)
        dv = torch.empty(sh.B, sh.Hkv, sh.Skv, sh.Dv, dtype=v.dtype, device=q.device)
    accum = dk_out is not None and accumulate
    return launch_dkdv(q, k, v, dout, lse, delta, dk, dv, accum, lp, head_group)


# the constexpr flags of the backward kernels an ahead-of-time compile may set, and their defaults
_BWD_FLAGS = dict(
    mask_kind=MASK_DOC, causal=True, has_window=False, has_prefix=False, has_full=True, even_m=True,
    even_n=True, accum=False,
)  # fmt: skip


def _bwd_consts(D: int, flags: dict) -> dict:
    f = {**_BWD_FLAGS, **flags}
    return dict(
        D=D, DV=D, QBS=128, KBS=128, MASK_KIND=f["mask_kind"], CAUSAL=f["causal"], HAS_WINDOW=f["has_window"],
        HAS_PREFIX=f["has_prefix"], HAS_FULL=f["has_full"], EVEN_M=f["even_m"], EVEN_N=f["even_n"],
        ACCUM=f["accum"],
    )  # fmt: skip


def compile_dq_for_sm90(D: int = 128, dtype: str = "bf16", block_n: int = DQ_BLOCK_N, **flags):
    """``gluon_fwd.compile_sm90`` of the dQ kernel; ``flags``: those of ``_BWD_FLAGS``."""
    consts = dict(_bwd_consts(D, flags), CONSUMER_REGS=CONSUMER_REGS, **dq_kernel_layouts(D, block_n))
    return compile_sm90(_gl_dq_ws_kernel, consts, dict.fromkeys(("Q", "K", "V", "DO", "DQ"), f"*{dtype}"))


def compile_dkdv_for_sm90(
    D: int = 128, dtype: str = "bf16", consumer_regs: int = CONSUMER_REGS, producer_regs: int = 24, **flags,
):  # fmt: skip
    """``gluon_fwd.compile_sm90`` of the dK/dV kernel (register budgets settable to study its spills)."""
    consts = dict(
        _bwd_consts(D, flags), CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
        **dkdv_kernel_layouts(D),
    )  # fmt: skip
    ptrs = dict.fromkeys(("Q", "K", "V", "DO", "DK", "DV_"), f"*{dtype}")
    return compile_sm90(_gl_dkdv_ws_kernel, consts, ptrs)
