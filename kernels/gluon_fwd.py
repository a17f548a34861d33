"""Hopper (sm_90) forward kernel written in Gluon: warp-specialised, the next scores under the softmax.

Same contract as ``triton_fwd._fwd_kernel`` for the cases it covers (one program per 128-row query tile and
batch·head, the BlockMask's partial kv blocks and then its full ones, exp2 softmax with the scale folded in,
natural-log fp32 LSE, −inf LSE and a zero output for a row that sees nothing, GQA through ``hq // groups``,
longest query tiles first, the running-result merge of CP's ``out_acc`` / ``lse_acc``). What Triton's own
pipeliner cannot be asked for (s10 warp specialisation, s12 ``pipe_qk``), Gluon states explicitly, after
FlashAttention-3: a producer warp issues every TMA copy (Q once, then K_t and V_t into double buffers
guarded by ready / empty mbarriers); two consumer warpgroups of 64 rows each run decoupled, so one's softmax
can run under the other's GEMMs. Each consumer issues ``S_t = Q·K_tᵀ`` and ``O += P_{t-1}·V_{t-1}`` as
asynchronous wgmma, waits for ``S_t`` only, runs the mask and softmax while ``P_{t-1}·V_{t-1}`` is still on
the tensor cores, then waits for it and rescales ``O``.

(The same loop in one 8-warp partition, without the specialisation, ran slower than the Triton kernel: Gluon
inserts CTA barriers at every shared-memory hazard it cannot rule out, which keeps the two warpgroups in
lockstep; s13 calls 2–4. It was removed after those measurements.)

Covered (``gluon_forward_unsupported`` names why not otherwise): CUDA capability 9.x, fp16 / bf16, head dims
``D == Dv`` in {64, 128}, no score mod, the no-op and document masks (causal, window, prefix), BlockMask
blocks that are multiples of 128, TMA-aligned operands. Gluon runs only on the GPU (there is no interpreter
for it); CI compiles the kernels for sm_90a without one (tests/test_gluon_fwd.py). The helpers here are
shared with the backward kernels of gluon_bwd.py.
"""

from __future__ import annotations

import re

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .block_sparse import MASK_DOC, MASK_NONE
from .triton_fwd import (
    LOG2E,
    SCORE_NONE,
    _tma_scratch,
    check_head_group,
    doc_args,
    forward_buffers,
    launch_head_group,
    meta_args,
    prepare,
)

# TMA copy into shared memory signalling an mbarrier: ``async_copy_global_to_shared`` in triton 3.6 (the GPU
# machines), renamed ``async_load`` by 3.9 (CI), which rejects the old name
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_M = 128  # query rows per program: two consumer warpgroups × 64
BLOCK_N = 128  # kv rows per step

# Registers per thread: the kernels launch with WS_MAXNREG (12 warps: two consumer warpgroups and the producer
# warp's group, 168 × 384 threads fit the 64k register file); the consumer worker asks for CONSUMER_REGS and
# the producer for 24, and the default (consumer) partition gets what is left.
WS_MAXNREG = 168
CONSUMER_REGS = 240


@gluon.jit
def _gl_launch_coords(NB, BH, HG, SUBS: gl.constexpr):
    """``triton_fwd._launch_coords``: (slot, batch·head) of this program, heads walked in groups of HG."""
    pid = gl.program_id(0)
    per_group = HG * (NB * SUBS)
    grp = pid // per_group
    r = pid - grp * per_group
    hg = gl.minimum(HG, BH - grp * HG)
    return r // hg, grp * HG + r % hg


@gluon.jit
def _gl_launch_coords_lead(NB, BH, HG, LEAD, SUBS: gl.constexpr):
    """``triton_fwd._launch_coords_lead``: the LEAD most-work blocks of every head first, then head groups."""
    pid = gl.program_id(0)
    n_lead = LEAD * SUBS * BH
    p = gl.maximum(pid - n_lead, 0)
    rest = (NB - LEAD) * SUBS
    per_group = gl.maximum(HG * rest, 1)
    grp = p // per_group
    r = p - grp * per_group
    hg = gl.maximum(gl.minimum(HG, BH - grp * HG), 1)
    lead = pid < n_lead
    return gl.where(lead, pid // BH, LEAD * SUBS + r // hg), gl.where(lead, pid % BH, grp * HG + r % hg)


@gluon.jit
def _gl_block_lists(
    NUM, IDX, FULL_NUM, FULL_IDX, num_off, idx_off, SUBS: gl.constexpr, HAS_FULL: gl.constexpr
):
    """(partial block count, steps, partial list, full list) of one block row of the BlockMask tables."""
    n_part = gl.load(NUM + num_off)
    n_blocks = n_part
    if HAS_FULL:
        n_blocks += gl.load(FULL_NUM + num_off)
    return n_part, n_blocks * SUBS, IDX + idx_off, FULL_IDX + idx_off


@gluon.jit
def _gl_step_row0(IDX, FULL_IDX, t, n_part, BS: gl.constexpr, STEP: gl.constexpr, SUBS: gl.constexpr):
    """First row of step ``t`` of the walk over the partial blocks and then the full ones (blocks of BS rows,
    SUBS steps of STEP rows each)."""
    j = t // SUBS
    ptr = gl.where(j < n_part, IDX + j, FULL_IDX + (j - n_part))
    return gl.load(ptr) * BS + (t % SUBS) * STEP


@gluon.jit
def _gl_pipeline_barriers():
    """mbarriers of a producer / two-consumer pipeline: one for the operands copied once, then ready (count
    1, the copy's bytes) and empty (count 2, both consumers release) for each of two buffers of two operands."""
    once = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    a_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    a_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    b_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(once, count=1)
    for i in gl.static_range(2):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(b_ready.index(i), count=1)
        mbarrier.init(a_empty.index(i), count=2)
        mbarrier.init(b_empty.index(i), count=2)
    return once, a_ready, a_empty, b_ready, b_empty


@gluon.jit
def _gl_doc_visible(qd, qp, kd, kp, kpre, window, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                    HAS_PREFIX: gl.constexpr):  # fmt: skip
    """``triton_fwd._doc_visible`` for Gluon tensors (same rules: same document, then causal / window /
    prefix visibility; padding ids were remapped on the host so equality alone excludes padding)."""
    same = gl.expand_dims(qd, 1) == gl.expand_dims(kd, 0)
    rel = gl.expand_dims(qp, 1) - gl.expand_dims(kp, 0)
    if CAUSAL:
        vis = rel >= 0
        if HAS_WINDOW:
            vis = vis & (rel < window)
    elif HAS_WINDOW:
        vis = (rel < window) & (rel > -window)
    else:
        vis = rel == rel
    if HAS_PREFIX:
        vis = vis | (gl.expand_dims(kpre, 0) != 0)
    return same & vis


@gluon.jit
def _gl_query_docs(QDOC, QPOS, offs_m, Sq, MASK_KIND: gl.constexpr):
    """Document ids and positions of query rows ``offs_m`` (the rows themselves where no document mask)."""
    if MASK_KIND == 1:
        qd = gl.load(QDOC + offs_m, mask=offs_m < Sq, other=-1)
        qp = gl.load(QPOS + offs_m, mask=offs_m < Sq, other=0)
    else:
        qd = offs_m  # not read
        qp = offs_m
    return qd, qp


@gluon.jit
def _gl_mask_scores(
    s, offs_n, partial, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, MASK_KIND: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_PREFIX: gl.constexpr, EVEN_N: gl.constexpr,
):  # fmt: skip
    """Query-major scores ``s`` with what the mask hides set to −inf: a partial block's document mask (keys
    ``offs_n``), and keys past Skv (``triton_fwd._mask_scores`` for the masks the Gluon kernels take)."""
    if MASK_KIND == 1:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if partial:
            if EVEN_N:  # unmasked: the addresses stay one base plus constants, not a predicate per column
                kd = gl.load(KVDOC + offs_n)
                kp = gl.load(KVPOS + offs_n)
                kpre = kp
                if HAS_PREFIX:
                    kpre = gl.load(KVPRE + offs_n)
            else:
                kd = gl.load(KVDOC + offs_n, mask=offs_n < Skv, other=-2)
                kp = gl.load(KVPOS + offs_n, mask=offs_n < Skv, other=0)
                kpre = kp
                if HAS_PREFIX:
                    kpre = gl.load(KVPRE + offs_n, mask=offs_n < Skv, other=0)
            vis = _gl_doc_visible(qd, qp, kd, kp, kpre, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
            s = gl.where(vis, s, float("-inf"))
    if not EVEN_N:
        s = gl.where(gl.expand_dims(offs_n < Skv, 0), s, float("-inf"))
    return s


@gluon.jit
def _gl_softmax_step(
    s, m_i, l_i, row0, partial, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, qk_scale, COL_S: gl.constexpr,
    BLOCK_N: gl.constexpr, MASK_KIND: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
    HAS_PREFIX: gl.constexpr, EVEN_N: gl.constexpr,
):  # fmt: skip
    """Mask and online softmax of one tile of raw scores: ``(P unnormalised, rescale of the old
    accumulator, new row max, new row sum)``, log2 domain."""
    offs_n = row0 + gl.arange(0, BLOCK_N, layout=COL_S)
    s = _gl_mask_scores(
        s, offs_n, partial, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX,
        EVEN_N,
    )  # fmt: skip
    # the max of the raw scores times the (positive) scale, then one FMA per element
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no -inf - -inf
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_safe, 1))
    alpha = gl.exp2(m_i - m_safe)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _ws_producer(descs, bars, bufs, ptrs, ints, WG: gl.constexpr, CONSTS: gl.constexpr):
    """The load warp: Q (both halves) once, then K_t and V_t of every step into buffer t % 2, each copy
    after both consumers released the buffer (its empty barrier) and signalling its ready barrier."""
    q_desc, k_desc, v_desc = descs
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    q_smem, k_smem, v_smem = bufs
    KVI, FULLI = ptrs[2], ptrs[3]
    start_m, n_part, n = ints[0], ints[1], ints[2]
    KBS: gl.constexpr = CONSTS[0]
    BLOCK_N: gl.constexpr = CONSTS[1]
    SUBS: gl.constexpr = KBS // BLOCK_N
    HALF: gl.constexpr = CONSTS[2]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [start_m, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [start_m + HALF, 0], q_bar, q_smem.index(1))
    for t in range(0, n):
        st = t % 2
        ph = (t // 2) & 1
        row0 = _gl_step_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
        mbarrier.wait(k_empty.index(st), ph ^ 1)  # (a fresh barrier counts as released: phase 1 is complete)
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        _tma_load(k_desc, [row0, 0], k_ready.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), ph ^ 1)
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        _tma_load(v_desc, [row0, 0], v_ready.index(st), v_smem.index(st))


@gluon.jit
def _ws_consumer(descs, bars, bufs, ptrs, ints, WG: gl.constexpr, CONSTS: gl.constexpr):
    """One consumer warpgroup: query rows ``start_m + WG·64 ..`` of the tile, the overlapped loop (S_t
    waited for alone, P_{t-1}·V_{t-1} under its softmax), then its rows of O and LSE."""
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    q_smem, k_smem, v_smem = bufs
    Ob, LSEb, KVI, FULLI, QDOCb, KVDOC, QPOSb, KVPOS, KVPRE, OPb = ptrs
    start_m, n_part, n, Sq, Skv, window, qk_scale, som, sopm = ints
    KBS: gl.constexpr = CONSTS[0]
    BLOCK_N: gl.constexpr = CONSTS[1]
    HALF: gl.constexpr = CONSTS[2]
    DV: gl.constexpr = CONSTS[3]
    MASK_KIND: gl.constexpr = CONSTS[4]
    CAUSAL: gl.constexpr = CONSTS[5]
    HAS_WINDOW: gl.constexpr = CONSTS[6]
    HAS_PREFIX: gl.constexpr = CONSTS[7]
    EVEN_M: gl.constexpr = CONSTS[8]
    EVEN_N: gl.constexpr = CONSTS[9]
    S_LAYOUT: gl.constexpr = CONSTS[10]
    O_LAYOUT: gl.constexpr = CONSTS[11]
    P_LAYOUT: gl.constexpr = CONSTS[12]
    ACCUM: gl.constexpr = CONSTS[13]
    ACC_TO_OUT: gl.constexpr = CONSTS[14]
    SUBS: gl.constexpr = KBS // BLOCK_N
    dtype: gl.constexpr = k_smem.dtype
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    qk_scale = qk_scale.to(gl.float32)
    q_tile = q_smem.index(WG)
    offs_m = start_m + WG * HALF + gl.arange(0, HALF, layout=ROW_S)
    qd, qp = _gl_query_docs(QDOCb, QPOSb, offs_m, Sq, MASK_KIND)
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=ROW_S)
    l_i = gl.zeros([HALF], gl.float32, layout=ROW_S)
    acc = gl.zeros([HALF, DV], gl.float32, layout=O_LAYOUT)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=S_LAYOUT)
    p = gl.zeros([HALF, BLOCK_N], dtype, layout=P_LAYOUT)
    mbarrier.wait(q_bar, 0)
    if n > 0:
        row0 = _gl_step_row0(KVI, FULLI, 0, n_part, KBS, BLOCK_N, SUBS)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(0), count=1)
        p_f, alpha, m_i, l_i = _gl_softmax_step(
            s, m_i, l_i, row0, n_part > 0, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, qk_scale, COL_S,
            BLOCK_N, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_N,
        )  # fmt: skip
        p = gl.convert_layout(p_f.to(dtype), P_LAYOUT)
    for t in range(1, n):
        st = t % 2
        sp = (t - 1) % 2
        row0 = _gl_step_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
        mbarrier.wait(k_ready.index(st), (t // 2) & 1)
        s_tok = warpgroup_mma(q_tile, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(sp), ((t - 1) // 2) & 1)
        o_tok = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(st), count=1)
        p_f, alpha, m_i, l_i = _gl_softmax_step(
            s, m_i, l_i, row0, t // SUBS < n_part, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, qk_scale, COL_S,
            BLOCK_N, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_N,
        )  # fmt: skip
        acc, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(sp), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
        p = gl.convert_layout(p_f.to(dtype), P_LAYOUT)
    if n > 0:
        sp = (n - 1) % 2
        mbarrier.wait(v_ready.index(sp), ((n - 1) // 2) & 1)
        o_tok = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
        acc, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(sp), count=1)

    o_rows = start_m + WG * HALF + gl.arange(0, HALF, layout=ROW_O)
    o_cols = gl.arange(0, DV, layout=gl.SliceLayout(0, O_LAYOUT))
    o_ptrs = Ob + gl.expand_dims(o_rows, 1) * som + gl.expand_dims(o_cols, 0)
    row_ok = gl.expand_dims(o_rows < Sq, 1) & gl.expand_dims(o_cols >= 0, 0)
    if ACCUM:
        # merge with the running result of earlier calls (triton_fwd._fwd_kernel's ACCUM epilogue): read
        # through OPb (O itself, fp32, merged in place, where a tile that visited nothing is left untouched;
        # or, ACC_TO_OUT, an fp32 buffer whose merge every tile stores into O in O's dtype)
        if ACC_TO_OUT or n > 0:
            op_ptrs = OPb + gl.expand_dims(o_rows, 1) * sopm + gl.expand_dims(o_cols, 0)
            if EVEN_M:
                prev_lse = gl.load(LSEb + offs_m)
                prev = gl.load(op_ptrs)
            else:
                prev_lse = gl.load(LSEb + offs_m, mask=offs_m < Sq, other=float("-inf"))
                prev = gl.load(op_ptrs, mask=row_ok, other=0.0)
            p2 = prev_lse * 1.4426950408889634  # log2 domain, like m_i
            mx = gl.maximum(p2, m_i)
            mx = gl.where(mx == float("-inf"), 0.0, mx)  # both sides empty: weights 0, no -inf - -inf
            w_prev = gl.exp2(p2 - mx)
            w_new = gl.exp2(m_i - mx)
            den = w_prev + l_i * w_new
            den_safe = gl.where(den == 0.0, 1.0, den)
            wp = gl.expand_dims(gl.convert_layout(w_prev / den_safe, ROW_O), 1)
            wn = gl.expand_dims(gl.convert_layout(w_new / den_safe, ROW_O), 1)
            out = (prev * wp + acc * wn).to(Ob.dtype.element_ty)
            lse = gl.where(den == 0.0, float("-inf"), (mx + gl.log2(den_safe)) * 0.6931471805599453)
            if EVEN_M:
                gl.store(o_ptrs, out)
                gl.store(LSEb + offs_m, lse)
            else:
                gl.store(o_ptrs, out, mask=row_ok)
                gl.store(LSEb + offs_m, lse, mask=offs_m < Sq)
    else:
        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        out = (acc / gl.expand_dims(gl.convert_layout(l_safe, ROW_O), 1)).to(Ob.dtype.element_ty)
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        if EVEN_M:
            gl.store(o_ptrs, out)
            gl.store(LSEb + offs_m, lse)
        else:
            gl.store(o_ptrs, out, mask=row_ok)
            gl.store(LSEb + offs_m, lse, mask=offs_m < Sq)


@gluon.jit
def _gl_fwd_ws_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    OP, sopb, soph, sopm,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, snb, snh, sib, sih, siq,
    ORDER, sor_b, sor_h,
    QDOC, KVDOC, QPOS, KVPOS, KVPRE, sdq, sdk, window,
    Hq, G, Sq, Skv, qk_scale, NB, BH, HG,
    D: gl.constexpr, DV: gl.constexpr, QBS: gl.constexpr, KBS: gl.constexpr,
    MASK_KIND: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_PREFIX: gl.constexpr,
    HAS_FULL: gl.constexpr, EVEN_M: gl.constexpr, EVEN_N: gl.constexpr,
    S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr,
    QK_SMEM: gl.constexpr, V_SMEM: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ACCUM: gl.constexpr = False, ACC_TO_OUT: gl.constexpr = False,
):  # fmt: skip
    SUBS_M: gl.constexpr = QBS // BLOCK_M
    SUBS: gl.constexpr = KBS // BLOCK_N
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = Q.dtype.element_ty
    slot, bh = _gl_launch_coords(NB, BH, HG, SUBS_M)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    b64 = b.to(gl.int64)
    qb = gl.load(ORDER + b * sor_b + hq * sor_h + slot // SUBS_M)
    start_m = qb * QBS + (slot % SUBS_M) * BLOCK_M
    n_part, n, KVI, FULLI = _gl_block_lists(
        KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, b * snb + hq * snh + qb, b64 * sib + hq * sih + qb * siq, SUBS,
        HAS_FULL,
    )  # fmt: skip

    # descriptors of this program's [S, D] slices: rows past the end come back zero
    Qb = Q + b64 * sqb + hq.to(gl.int64) * sqh
    Kb = K + b64 * skb + hk.to(gl.int64) * skh
    Vb = V + b64 * svb + hk.to(gl.int64) * svh
    q_desc = tma.make_tensor_descriptor(Qb, [Sq, D], [sqm, 1], [HALF, D], QK_SMEM)
    k_desc = tma.make_tensor_descriptor(Kb, [Skv, D], [skn, 1], [BLOCK_N, D], QK_SMEM)
    v_desc = tma.make_tensor_descriptor(Vb, [Skv, DV], [svn, 1], [BLOCK_N, DV], V_SMEM)

    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], QK_SMEM)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], QK_SMEM)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, DV], V_SMEM)
    bars = _gl_pipeline_barriers()  # (Q, K ready / empty, V ready / empty)

    if MASK_KIND == 1:
        KVDOC = KVDOC + b64 * sdk
        KVPOS = KVPOS + b64 * sdk
        if HAS_PREFIX:
            KVPRE = KVPRE + b64 * sdk
    descs = (q_desc, k_desc, v_desc)
    bufs = (q_smem, k_smem, v_smem)
    ptrs = (
        O + b64 * sob + hq.to(gl.int64) * soh, LSE + bh.to(gl.int64) * Sq, KVI, FULLI,
        QDOC + b64 * sdq, KVDOC, QPOS + b64 * sdq, KVPOS, KVPRE, OP + b64 * sopb + hq.to(gl.int64) * soph,
    )  # fmt: skip
    ints = (start_m, n_part, n, Sq, Skv, window, qk_scale, som, sopm)
    CONSTS: gl.constexpr = (
        KBS, BLOCK_N, HALF, DV, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_M, EVEN_N, S_LAYOUT, O_LAYOUT,
        P_LAYOUT, ACCUM, ACC_TO_OUT,
    )  # fmt: skip
    gl.warp_specialize(
        [
            (_ws_consumer, (descs, bars, bufs, ptrs, ints, 0, CONSTS)),
            (_ws_consumer, (descs, bars, bufs, ptrs, ints, 1, CONSTS)),
            (_ws_producer, (descs, bars, bufs, ptrs, ints, 1, CONSTS)),
        ],
        [4, 1],
        [CONSUMER_REGS, 24],
    )


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


def ws_kernel_layouts(D: int, Dv: int) -> dict:
    """Constexpr layouts of the kernel (Gluon takes them as arguments): each consumer's 64-row tiles."""
    s_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, Dv, 16])
    return dict(
        S_LAYOUT=s_layout,
        O_LAYOUT=o_layout,
        P_LAYOUT=gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2),
        QK_SMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        V_SMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )


def _tma_problem(name: str, t: torch.Tensor) -> str | None:
    """TMA's rules for a ``[B, H, S, D]`` operand read through per-(b, h) descriptors: 16-byte aligned base
    and row / head / batch strides, unit last-dim stride."""
    es = t.element_size()
    if t.stride(-1) != 1:
        return f"{name} has last-dim stride {t.stride(-1)} (TMA needs 1)"
    if t.data_ptr() % 16:
        return f"{name}.data_ptr() is not 16-byte aligned (TMA)"
    for dim, what in ((0, "batch"), (1, "head"), (2, "row")):
        if (t.shape[dim] > 1 or dim == 2) and (t.stride(dim) * es) % 16:
            return f"{name}'s {what} stride {t.stride(dim)} × {es} B is not a multiple of 16 bytes (TMA)"
    return None


def gluon_forward_unsupported(q, k, v, block_mask, score_mod, scale, out=None) -> str | None:
    """Why the Gluon kernel cannot run this call, or None when it can. Cheap (dtypes, shapes, strides, the
    mask kind, then the device): ``flex_attention_forward`` asks it on every call to pick the kernel."""
    from .block_sparse import _is_noop
    from .document_mask import DocumentMaskMod

    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: it takes fp16 or bf16, all alike"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be [B, H, S, D]"
    D, Dv = q.shape[-1], v.shape[-1]
    if Dv != D or D not in (64, 128):
        return f"head dims D={D}, Dv={Dv}: it takes D == Dv in (64, 128)"
    if score_mod is not None:
        return f"score_mod {type(score_mod).__name__}: it has no score mods"
    if scale is not None and float(scale) <= 0:
        return f"scale {scale}: it folds a positive scale into the row max"
    if out is not None and out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"out dtype {out.dtype}: it stores fp16, bf16 or fp32"
    if block_mask is not None:
        qbs, kbs = block_mask.BLOCK_SIZE
        if qbs % BLOCK_M or kbs % BLOCK_N:
            return f"BlockMask blocks ({qbs}, {kbs}): it needs multiples of {BLOCK_M}"
        mm = block_mask.mask_mod
        if not isinstance(mm, DocumentMaskMod) and not _is_noop(mm):
            name = getattr(mm, "__name__", type(mm).__name__)
            return f"mask_mod {name}: it evaluates only the document mask (and no mask) in partial blocks"
    for name, t in (("q", q), ("k", k), ("v", v)):
        why = _tma_problem(name, t)
        if why is not None:
            return why
    if not q.is_cuda:
        return f"q is on {q.device}: it runs on a CUDA GPU only"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return f"compute capability {major}.{minor}: it is written for Hopper (9.x)"
    return None


def gluon_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    out_acc: torch.Tensor | None = None,
    lse_acc: torch.Tensor | None = None,
    head_group: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward on Hopper through the Gluon kernel: ``(out [B,Hq,Sq,Dv], lse [B,Hq,Sq] fp32)``,
    the contract of ``triton_fwd.triton_forward`` (``out_acc`` / ``lse_acc`` running-result merge, ``out``
    write target in fp16, bf16 or fp32). Raises ``ValueError`` naming the reason for a call it does not
    cover (``gluon_forward_unsupported``)."""
    why = gluon_forward_unsupported(q, k, v, block_mask, None, scale, out)
    if why is not None:
        raise ValueError(f"gluon_forward cannot run this call: {why}")
    return launch_forward(q, k, v, block_mask, scale, enable_gqa, out_acc, lse_acc, head_group, out)


def launch_forward(q, k, v, block_mask, scale, enable_gqa, out_acc, lse_acc, head_group, out):
    """``gluon_forward`` for a call ``gluon_forward_unsupported`` already accepted (``flex_attention_forward``
    asks it first to choose the kernel)."""
    check_head_group(head_group)
    lp = prepare(q, k, v, block_mask, None, scale, enable_gqa, None, None, dense_block=128)
    sh, km = lp.shape, lp.km
    assert lp.score_kind == SCORE_NONE and km.mask_kind in (MASK_NONE, MASK_DOC)
    out, lse, prev, accum, to_out = forward_buffers(q, sh, out, out_acc, lse_acc)
    n_qb = triton.cdiv(sh.Sq, km.QBS)
    (num, idx, fnum, fidx, _pid, snb, snh, sib, sih, siq, order, sor_b, sor_h) = meta_args(
        km, False, lp.dummy_i
    )
    docs, (causal, has_w, has_pre) = doc_args(km, lp.dummy_i)
    hg = head_group or launch_head_group(sh, k.element_size(), kv_programs=False)
    # device-side descriptors live in global scratch the launcher asks this allocator for (set at every
    # launch: Triton keeps it in a context variable a later thread does not inherit)
    triton.set_allocator(_tma_scratch)
    _gl_fwd_ws_kernel[(n_qb * (km.QBS // BLOCK_M) * sh.B * sh.Hq,)](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        prev, prev.stride(0), prev.stride(1), prev.stride(2),
        num, idx, fnum, fidx, snb, snh, sib, sih, siq, order, sor_b, sor_h,
        *docs, sh.Hq, sh.groups, sh.Sq, sh.Skv, lp.scale * LOG2E, n_qb, sh.B * sh.Hq, hg,
        D=sh.D, DV=sh.Dv, QBS=km.QBS, KBS=km.KBS, MASK_KIND=km.mask_kind, CAUSAL=causal, HAS_WINDOW=has_w,
        HAS_PREFIX=has_pre, HAS_FULL=km.has_full, EVEN_M=lp.even_m, EVEN_N=lp.even_n, ACCUM=accum,
        ACC_TO_OUT=to_out, CONSUMER_REGS=CONSUMER_REGS, num_warps=4, maxnreg=WS_MAXNREG,
        **ws_kernel_layouts(sh.D, sh.Dv),
    )  # fmt: skip
    return out, lse


# Arguments of the Gluon kernels by name, for ahead-of-time compiles: the fp32 tensors, the int32 block tables
# and document tables, the fp32 scalars, and the strides the JIT would specialise as 16-byte multiples
_FP32_PTRS = {"LSE", "DELTA", "OP"}
_I32_PTRS = {"KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "Q_NUM", "Q_IDX", "FULLQ_NUM", "FULLQ_IDX", "ORDER"}
_I32_PTRS |= {"QDOC", "KVDOC", "QPOS", "KVPOS", "KVPRE"}
_FP32_SCALARS = {"scale", "qk_scale"}
_TENSOR_STRIDE = re.compile(r"^s(q|k|v|o|op|do|dq|dk|dv)[bhmn]$")


def compile_sm90(fn, consts: dict, data_ptrs: dict):
    """Compile one specialisation of a Gluon kernel for sm_90a without a GPU (``triton.compile`` with an
    explicit target): how CI checks that the kernels still build on the installed Triton, and how to read
    their PTX (``.asm["ptx"]``). ``data_ptrs``: the type of each q / k / v-like pointer (e.g. ``{"Q":
    "*bf16"}``); pointers and tensor strides are taken as 16-byte multiples, as the JIT specialises them."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in data_ptrs:
            sig[name] = data_ptrs[name]
        elif name in _FP32_PTRS or name in _I32_PTRS:
            sig[name] = "*fp32" if name in _FP32_PTRS else "*i32"
        else:
            sig[name] = "fp32" if name in _FP32_SCALARS else "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if sig[n].startswith("*") or _TENSOR_STRIDE.match(n)
    }
    src = GluonASTSource(fn, sig, consts, attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": WS_MAXNREG}
    )


def compile_for_sm90(
    D: int = 128,
    dtype: str = "bf16",
    mask_kind: int = MASK_DOC,
    causal: bool = True,
    has_window: bool = False,
    has_prefix: bool = False,
    has_full: bool = True,
    even_m: bool = True,
    even_n: bool = True,
    accum: bool = False,
    acc_to_out: bool = False,
    out_dtype: str | None = None,
):
    """``compile_sm90`` of the forward kernel at these constexprs."""
    consts = dict(
        D=D, DV=D, QBS=128, KBS=128, MASK_KIND=mask_kind, CAUSAL=causal, HAS_WINDOW=has_window,
        HAS_PREFIX=has_prefix, HAS_FULL=has_full, EVEN_M=even_m, EVEN_N=even_n, CONSUMER_REGS=CONSUMER_REGS,
        ACCUM=accum, ACC_TO_OUT=acc_to_out, **ws_kernel_layouts(D, D),
    )  # fmt: skip
    out_t = out_dtype or ("fp32" if accum and not acc_to_out else dtype)
    ptrs = dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", O=f"*{out_t}")
    return compile_sm90(_gl_fwd_ws_kernel, consts, ptrs)
