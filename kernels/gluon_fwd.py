"""Hopper (sm_90) forward kernels written in Gluon: asynchronous wgmma with the next scores under the softmax.

Same contract as ``triton_fwd._fwd_kernel`` for the cases they cover (one program per 128-row query tile and
batch·head, the BlockMask's partial kv blocks and then its full ones, exp2 softmax with the scale folded in,
natural-log fp32 LSE, −inf LSE and a zero output for a row that sees nothing, GQA through ``hq // groups``,
longest query tiles first). What Triton's own pipeliner cannot be asked for (s10 warp specialisation, s12
``pipe_qk``), Gluon states explicitly, after FlashAttention-3:

- ``_gl_fwd_ws_kernel`` (the one ``flex_attention_forward`` runs): a producer warp issues every TMA copy (Q
  once, then K_t and V_t into double buffers guarded by ready / empty mbarriers); two consumer warpgroups of
  64 rows each run decoupled, so one's softmax can run under the other's GEMMs. Each consumer issues
  ``S_t = Q·K_tᵀ`` and ``O += P_{t-1}·V_{t-1}`` as asynchronous wgmma, waits for ``S_t`` only, runs the mask
  and softmax while ``P_{t-1}·V_{t-1}`` is still on the tensor cores, then waits for it and rescales ``O``.
  Its epilogue also merges into a running result (CP's ``out_acc`` / ``lse_acc``, ``out=``).
- ``_gl_fwd_kernel`` (``schedule="plain"``): the same loop in one 8-warp partition with TMA or ``cp.async``
  copies one step ahead and a CTA barrier per step. Slower than the Triton kernel (s13 calls 2–4): Gluon
  inserts further CTA barriers at every shared-memory hazard it cannot rule out, which keeps the two
  warpgroups in lockstep. Kept to measure what the specialisation buys.

Covered (``gluon_forward_unsupported`` names why not otherwise): CUDA capability 9.x, fp16 / bf16, head dims
``D == Dv`` in {64, 128}, no score mod, the no-op and document masks (causal, window, prefix), BlockMask
blocks that are multiples of 128, TMA-aligned operands. Gluon runs only on the GPU (there is no interpreter
for it); CI compiles the kernels for sm_90a without one (tests/test_gluon_fwd.py).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .block_sparse import MASK_DOC, MASK_NONE
from .triton_fwd import (
    LOG2E,
    SCORE_NONE,
    _tma_scratch,
    check_accumulators,
    check_head_group,
    check_out,
    doc_args,
    launch_head_group,
    meta_args,
    prepare,
)

# cp.async of a pointer tensor into shared memory: ``async_copy_global_to_shared`` in triton 3.6 (the GPU
# machines), renamed ``async_load`` by 3.9 (CI), which rejects the old name
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

# TMA copy into shared memory signalling an mbarrier: ``async_copy_global_to_shared`` in 3.6, ``async_load`` in 3.9
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

# CTA barrier: ``thread_barrier`` in triton 3.6, ``barrier`` in 3.9
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

BLOCK_M = 128  # two warpgroups × 64 rows
BLOCK_N = 128
NUM_WARPS = 8


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
def _gl_kv_row0(KV_IDX, FULL_IDX, t, n_part, KBS: gl.constexpr, BLOCK_N: gl.constexpr, SUBS: gl.constexpr):
    """First key row of step ``t`` of the walk over the partial blocks and then the full ones."""
    j = t // SUBS
    ptr = gl.where(j < n_part, KV_IDX + j, FULL_IDX + (j - n_part))
    return gl.load(ptr) * KBS + (t % SUBS) * BLOCK_N


@gluon.jit
def _gl_copy_tile(dst, base, row0, stride, Skv, LOAD: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr,
                  EVEN_N: gl.constexpr):  # fmt: skip
    """cp.async of rows ``row0 ..`` of a K or V slice into ``dst``; rows past Skv are zero-filled."""
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, LOAD))
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, LOAD))
    ptrs = base + gl.expand_dims(rows, 1) * stride + gl.expand_dims(cols, 0)
    if EVEN_N:
        _cp_async(dst, ptrs)
    else:
        ok = gl.expand_dims(rows < Skv, 1) & gl.expand_dims(cols >= 0, 0)
        _cp_async(dst, ptrs, mask=ok)


@gluon.jit
def _gl_load_tile(src, bufs, bars, stage, bar0, row0, stride, Skv, LOAD: gl.constexpr, ROWS: gl.constexpr,
                  COLS: gl.constexpr, EVEN_N: gl.constexpr, TMA: gl.constexpr):  # fmt: skip
    """Rows ``row0 ..`` of a K or V slice into buffer ``stage`` of ``bufs``: a TMA copy that signals barrier
    ``bar0 + stage`` (``src`` a descriptor), or a cp.async (``src`` the slice's base pointer)."""
    if TMA:
        bar = bars.index(bar0 + stage)
        mbarrier.expect(bar, src.block_type.nbytes)
        _tma_load(src, [row0, 0], bar, bufs.index(stage))
    else:
        _gl_copy_tile(bufs.index(stage), src, row0, stride, Skv, LOAD, ROWS, COLS, EVEN_N)


@gluon.jit
def _gl_landed():
    """Every thread's finished cp.async made visible to the wgmma (async proxy) of every warp."""
    async_copy.wait_group(0)
    fence_async_shared()
    _cta_barrier()


@gluon.jit
def _gl_softmax_step(
    s, m_i, l_i, row0, partial, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, qk_scale, COL_S: gl.constexpr,
    BLOCK_N: gl.constexpr, MASK_KIND: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
    HAS_PREFIX: gl.constexpr, EVEN_N: gl.constexpr,
):  # fmt: skip
    """Mask (a partial block's document mask, keys past Skv) and online softmax of one tile of raw scores:
    ``(P unnormalised, rescale of the old accumulator, new row max, new row sum)``, log2 domain."""
    offs_n = row0 + gl.arange(0, BLOCK_N, layout=COL_S)
    if MASK_KIND == 1:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if partial:
            kd = gl.load(KVDOC + offs_n, mask=offs_n < Skv, other=-2)
            kp = gl.load(KVPOS + offs_n, mask=offs_n < Skv, other=0)
            if HAS_PREFIX:
                kpre = gl.load(KVPRE + offs_n, mask=offs_n < Skv, other=0)
            else:
                kpre = kp
            vis = _gl_doc_visible(qd, qp, kd, kp, kpre, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
            s = gl.where(vis, s, float("-inf"))
    if not EVEN_N:
        s = gl.where(gl.expand_dims(offs_n < Skv, 0), s, float("-inf"))
    # the max of the raw scores times the (positive) scale, then one FMA per element
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no -inf - -inf
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_safe, 1))
    alpha = gl.exp2(m_i - m_safe)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _gl_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, snb, snh, sib, sih, siq,
    ORDER, sor_b, sor_h,
    QDOC, KVDOC, QPOS, KVPOS, KVPRE, sdq, sdk, window,
    Hq, G, Sq, Skv, qk_scale, NB, BH, HG,
    D: gl.constexpr, DV: gl.constexpr, QBS: gl.constexpr, KBS: gl.constexpr,
    MASK_KIND: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_PREFIX: gl.constexpr,
    HAS_FULL: gl.constexpr, EVEN_M: gl.constexpr, EVEN_N: gl.constexpr,
    S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr,
    QK_LOAD: gl.constexpr, V_LOAD: gl.constexpr, QK_SMEM: gl.constexpr, V_SMEM: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, TMA: gl.constexpr,
):  # fmt: skip
    SUBS_M: gl.constexpr = QBS // BLOCK_M
    SUBS: gl.constexpr = KBS // BLOCK_N
    dtype: gl.constexpr = Q.dtype.element_ty
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    qk_scale = qk_scale.to(gl.float32)  # (a Python float may arrive as fp64 under inductor)

    # launch coordinates: triton_fwd._launch_coords (head groups of HG, the slot varying slowest in a group)
    pid = gl.program_id(0)
    per_group = HG * (NB * SUBS_M)
    grp = pid // per_group
    r = pid - grp * per_group
    hg = gl.minimum(HG, BH - grp * HG)
    slot = r // hg
    bh = grp * HG + r % hg
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    b64 = b.to(gl.int64)
    qb = gl.load(ORDER + b * sor_b + hq * sor_h + slot // SUBS_M)
    start_m = qb * QBS + (slot % SUBS_M) * BLOCK_M
    Kb = K + b64 * skb + hk.to(gl.int64) * skh
    Vb = V + b64 * svb + hk.to(gl.int64) * svh

    num_off = b * snb + hq * snh + qb
    idx_off = b64 * sib + hq * sih + qb * siq
    n_part = gl.load(KV_NUM + num_off)
    n_blocks = n_part
    if HAS_FULL:
        n_blocks += gl.load(FULL_NUM + num_off)
    n = n_blocks * SUBS
    KVI = KV_IDX + idx_off
    FULLI = FULL_IDX + idx_off

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], QK_SMEM)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], QK_SMEM)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, DV], V_SMEM)
    if TMA:
        # descriptors of this program's [S, D] slices (rows past the end come back zero); the host checked
        # TMA's alignment rules. Barriers: 0 Q, 1-2 the K buffers, 3-4 the V buffers.
        qbase = Q + b64 * sqb + hq.to(gl.int64) * sqh
        q_desc = tma.make_tensor_descriptor(qbase, [Sq, D], [sqm, 1], [BLOCK_M, D], QK_SMEM)
        k_src = tma.make_tensor_descriptor(Kb, [Skv, D], [skn, 1], [BLOCK_N, D], QK_SMEM)
        v_src = tma.make_tensor_descriptor(Vb, [Skv, DV], [svn, 1], [BLOCK_N, DV], V_SMEM)
        bars = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(5):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        _cta_barrier()
        mbarrier.expect(bars.index(0), q_desc.block_type.nbytes)
        _tma_load(q_desc, [start_m, 0], bars.index(0), q_smem)
    else:
        k_src = Kb
        v_src = Vb
        bars = q_smem  # not used
        q_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, QK_LOAD))
        q_cols = gl.arange(0, D, layout=gl.SliceLayout(0, QK_LOAD))
        q_ptrs = (
            Q
            + b64 * sqb
            + hq.to(gl.int64) * sqh
            + gl.expand_dims(q_rows, 1) * sqm
            + gl.expand_dims(q_cols, 0)
        )
        if EVEN_M:
            _cp_async(q_smem, q_ptrs)
        else:
            q_ok = gl.expand_dims(q_rows < Sq, 1) & gl.expand_dims(q_cols >= 0, 0)
            _cp_async(q_smem, q_ptrs, mask=q_ok)
    if n > 0:
        row0 = _gl_kv_row0(KVI, FULLI, 0, n_part, KBS, BLOCK_N, SUBS)
        _gl_load_tile(k_src, k_smem, bars, 0, 1, row0, skn, Skv, QK_LOAD, BLOCK_N, D, EVEN_N, TMA)
    if not TMA:
        async_copy.commit_group()

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=ROW_S)
    if MASK_KIND == 1:
        qd = gl.load(QDOC + b64 * sdq + offs_m, mask=offs_m < Sq, other=-1)
        qp = gl.load(QPOS + b64 * sdq + offs_m, mask=offs_m < Sq, other=0)
        KVDOC = KVDOC + b64 * sdk
        KVPOS = KVPOS + b64 * sdk
        if HAS_PREFIX:
            KVPRE = KVPRE + b64 * sdk
    else:
        qd = offs_m  # not read
        qp = offs_m

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=ROW_S)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_S)
    acc = gl.zeros([BLOCK_M, DV], gl.float32, layout=O_LAYOUT)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT)
    p = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=P_LAYOUT)
    if n > 0:
        # step 0: S_0 alone (no P·V before it); the K_1 and V_0 buffers have never been read
        row0 = _gl_kv_row0(KVI, FULLI, 0, n_part, KBS, BLOCK_N, SUBS)
        if TMA:
            mbarrier.wait(bars.index(0), 0)
        else:
            _gl_landed()
        if n > 1:
            row_next = _gl_kv_row0(KVI, FULLI, 1, n_part, KBS, BLOCK_N, SUBS)
            _gl_load_tile(k_src, k_smem, bars, 1, 1, row_next, skn, Skv, QK_LOAD, BLOCK_N, D, EVEN_N, TMA)
        _gl_load_tile(v_src, v_smem, bars, 0, 3, row0, svn, Skv, V_LOAD, BLOCK_N, DV, EVEN_N, TMA)
        if TMA:
            mbarrier.wait(bars.index(1), 0)
        else:
            async_copy.commit_group()
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        p_f, alpha, m_i, l_i = _gl_softmax_step(
            s, m_i, l_i, row0, n_part > 0, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, qk_scale, COL_S,
            BLOCK_N, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_N,
        )  # fmt: skip
        p = gl.convert_layout(p_f.to(dtype), P_LAYOUT)
    for t in range(1, n):
        row0 = _gl_kv_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
        # Both warpgroups are past step t-1's waits, so no wgmma still reads the buffers the copies below
        # overwrite (K_{t-1}'s and V_{t-2}'s). cp.async: K_t and V_{t-1} (copied at step t-1) landed too.
        if TMA:
            _cta_barrier()
        else:
            _gl_landed()
        if t + 1 < n:
            row_next = _gl_kv_row0(KVI, FULLI, t + 1, n_part, KBS, BLOCK_N, SUBS)
            _gl_load_tile(
                k_src, k_smem, bars, (t + 1) % 2, 1, row_next, skn, Skv, QK_LOAD, BLOCK_N, D, EVEN_N, TMA
            )  # fmt: skip
        _gl_load_tile(v_src, v_smem, bars, t % 2, 3, row0, svn, Skv, V_LOAD, BLOCK_N, DV, EVEN_N, TMA)
        if TMA:
            mbarrier.wait(bars.index(1 + t % 2), (t // 2) & 1)
        else:
            async_copy.commit_group()
        s_tok = warpgroup_mma(
            q_smem, k_smem.index(t % 2).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        if TMA:
            mbarrier.wait(bars.index(3 + (t - 1) % 2), ((t - 1) // 2) & 1)
        o_tok = warpgroup_mma(p, v_smem.index((t - 1) % 2), acc, is_async=True)
        # S_t is back (wgmma groups retire in order); P_{t-1}·V_{t-1} may still run under this softmax
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        p_f, alpha, m_i, l_i = _gl_softmax_step(
            s, m_i, l_i, row0, t // SUBS < n_part, qd, qp, KVDOC, KVPOS, KVPRE, Skv, window, qk_scale, COL_S,
            BLOCK_N, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_N,
        )  # fmt: skip
        acc, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
        p = gl.convert_layout(p_f.to(dtype), P_LAYOUT)
    if n > 0:
        if TMA:
            mbarrier.wait(bars.index(3 + (n - 1) % 2), ((n - 1) // 2) & 1)
        else:
            _gl_landed()  # V_{n-1}
        o_tok = warpgroup_mma(p, v_smem.index((n - 1) % 2), acc, is_async=True)
        acc, p = warpgroup_mma_wait(0, deps=(o_tok, p))
    if TMA:
        mbarrier.wait(bars.index(0), 0)  # (n == 0: the Q copy)
    else:
        async_copy.wait_group(0)

    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, ROW_O), 1)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    out = gl.convert_layout(out.to(dtype), V_LOAD)
    o_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, V_LOAD))
    o_cols = gl.arange(0, DV, layout=gl.SliceLayout(0, V_LOAD))
    o_ptrs = (
        O + b64 * sob + hq.to(gl.int64) * soh + gl.expand_dims(o_rows, 1) * som + gl.expand_dims(o_cols, 0)
    )
    lse_ptrs = LSE + bh.to(gl.int64) * Sq + offs_m
    if EVEN_M:
        gl.store(o_ptrs, out)
        gl.store(lse_ptrs, lse)
    else:
        gl.store(o_ptrs, out, mask=gl.expand_dims(o_rows < Sq, 1) & gl.expand_dims(o_cols >= 0, 0))
        gl.store(lse_ptrs, lse, mask=offs_m < Sq)


# ----------------------------------------------------------------------------------------------------------
# Warp-specialised variant (FlashAttention-3's layout): a producer warp issues every TMA copy into K / V
# double buffers guarded by ready / empty mbarriers; two consumer warpgroups (64 query rows each) run the
# same overlapped loop as above, each at its own pace: no CTA barrier couples them, so one warpgroup's
# softmax can run under the other's GEMMs.
# ----------------------------------------------------------------------------------------------------------


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
        row0 = _gl_kv_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
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
    if MASK_KIND == 1:
        qd = gl.load(QDOCb + offs_m, mask=offs_m < Sq, other=-1)
        qp = gl.load(QPOSb + offs_m, mask=offs_m < Sq, other=0)
    else:
        qd = offs_m  # not read
        qp = offs_m
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=ROW_S)
    l_i = gl.zeros([HALF], gl.float32, layout=ROW_S)
    acc = gl.zeros([HALF, DV], gl.float32, layout=O_LAYOUT)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=S_LAYOUT)
    p = gl.zeros([HALF, BLOCK_N], dtype, layout=P_LAYOUT)
    mbarrier.wait(q_bar, 0)
    if n > 0:
        row0 = _gl_kv_row0(KVI, FULLI, 0, n_part, KBS, BLOCK_N, SUBS)
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
        row0 = _gl_kv_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
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
    pid = gl.program_id(0)
    per_group = HG * (NB * SUBS_M)
    grp = pid // per_group
    r = pid - grp * per_group
    hg = gl.minimum(HG, BH - grp * HG)
    slot = r // hg
    bh = grp * HG + r % hg
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    b64 = b.to(gl.int64)
    qb = gl.load(ORDER + b * sor_b + hq * sor_h + slot // SUBS_M)
    start_m = qb * QBS + (slot % SUBS_M) * BLOCK_M
    num_off = b * snb + hq * snh + qb
    idx_off = b64 * sib + hq * sih + qb * siq
    n_part = gl.load(KV_NUM + num_off)
    n_blocks = n_part
    if HAS_FULL:
        n_blocks += gl.load(FULL_NUM + num_off)
    n = n_blocks * SUBS

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
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a buffer
        mbarrier.init(v_empty.index(i), count=2)

    if MASK_KIND == 1:
        KVDOC = KVDOC + b64 * sdk
        KVPOS = KVPOS + b64 * sdk
        if HAS_PREFIX:
            KVPRE = KVPRE + b64 * sdk
    descs = (q_desc, k_desc, v_desc)
    bars = (q_bar, k_ready, k_empty, v_ready, v_empty)
    bufs = (q_smem, k_smem, v_smem)
    ptrs = (
        O + b64 * sob + hq.to(gl.int64) * soh, LSE + bh.to(gl.int64) * Sq, KV_IDX + idx_off, FULL_IDX + idx_off,
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


def _load_layout(cols: int) -> gl.BlockedLayout:
    """16-byte vectors along a row, a warp spanning ``cols`` columns (coalesced rows for cp.async)."""
    tpw_n = min(32, cols // 8)
    return gl.BlockedLayout([1, 8], [32 // tpw_n, tpw_n], [NUM_WARPS, 1], [1, 0])


def kernel_layouts(D: int, Dv: int) -> dict:
    """The constexpr layouts of one specialisation (Gluon takes them as kernel arguments)."""
    s_layout = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, Dv, 16]
    )
    return dict(
        S_LAYOUT=s_layout,
        O_LAYOUT=o_layout,
        P_LAYOUT=gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2),
        QK_LOAD=_load_layout(D),
        V_LOAD=_load_layout(Dv),
        QK_SMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        V_SMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )


def ws_kernel_layouts(D: int, Dv: int) -> dict:
    """Constexpr layouts of the warp-specialised kernel: each consumer warpgroup's own 64-row tiles."""
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


# Registers per thread: the kernel launches with WS_MAXNREG (12 warps: two consumer warpgroups and the producer
# warp's group, 168 × 384 threads fit the 64k register file); the consumer worker asks for CONSUMER_REGS and
# the producer for 24, and the default (consumer) partition gets what is left.
WS_MAXNREG = 168
CONSUMER_REGS = 240


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


def gluon_forward_unsupported(
    q, k, v, block_mask, score_mod, scale, out_acc=None, out=None, schedule: str = "ws"
) -> str | None:
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
    if out_acc is not None and schedule != "ws":
        return "out_acc: only the warp-specialised schedule merges into a running result"
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
    schedule: str = "ws",
    tma: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward on Hopper through the Gluon kernel: ``(out [B,Hq,Sq,Dv], lse [B,Hq,Sq] fp32)``,
    the contract of ``triton_fwd.triton_forward`` (``out_acc`` / ``lse_acc`` running-result merge, ``out``
    write target in fp16, bf16 or fp32). Raises ``ValueError`` naming the reason for a call it does not
    cover (``gluon_forward_unsupported``).
    ``schedule``: ``"ws"`` the warp-specialised kernel (a TMA producer warp, two consumer warpgroups that
    run decoupled); ``"plain"`` one 8-warp partition with a CTA barrier per step (slower: kept to measure
    what the specialisation buys, bench/results/2026-11-26-s13).
    ``tma`` (plain only): Q, K and V tiles through TMA with mbarriers; False: ``cp.async``."""
    if schedule not in ("ws", "plain"):
        raise ValueError(f"schedule must be 'ws' or 'plain', got {schedule!r}")
    why = gluon_forward_unsupported(q, k, v, block_mask, None, scale, out_acc, out, schedule)
    if why is not None:
        raise ValueError(f"gluon_forward cannot run this call: {why}")
    check_head_group(head_group)
    lp = prepare(q, k, v, block_mask, None, scale, enable_gqa, None, None, dense_block=128)
    sh, km = lp.shape, lp.km
    assert lp.score_kind == SCORE_NONE and km.mask_kind in (MASK_NONE, MASK_DOC)
    accum = out_acc is not None or lse_acc is not None
    to_out = accum and out is not None
    if accum:
        check_accumulators(out_acc, lse_acc, sh, q.device)
        if to_out:
            check_out(out, sh, q.device)
        else:
            out = out_acc
        lse, prev = lse_acc, out_acc
    else:
        if out is None:
            out = torch.empty(sh.B, sh.Hq, sh.Sq, sh.Dv, dtype=q.dtype, device=q.device)
        else:
            check_out(out, sh, q.device)
        lse = torch.empty(sh.B, sh.Hq, sh.Sq, dtype=torch.float32, device=q.device)
        prev = out  # not read without ACCUM
    n_qb = triton.cdiv(sh.Sq, km.QBS)
    (num, idx, fnum, fidx, _pid, snb, snh, sib, sih, siq, order, sor_b, sor_h) = meta_args(
        km, False, lp.dummy_i
    )
    docs, (causal, has_w, has_pre) = doc_args(km, lp.dummy_i)
    hg = head_group or launch_head_group(sh, k.element_size(), kv_programs=False)
    grid = (n_qb * (km.QBS // BLOCK_M) * sh.B * sh.Hq,)
    if tma or schedule == "ws":
        # device-side descriptors live in global scratch the launcher asks this allocator for (set at every
        # launch: Triton keeps it in a context variable a later thread does not inherit)
        triton.set_allocator(_tma_scratch)
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
    )  # fmt: skip
    rest = (
        num, idx, fnum, fidx, snb, snh, sib, sih, siq, order, sor_b, sor_h,
        *docs, sh.Hq, sh.groups, sh.Sq, sh.Skv, lp.scale * LOG2E, n_qb, sh.B * sh.Hq, hg,
    )  # fmt: skip
    consts = dict(
        D=sh.D, DV=sh.Dv, QBS=km.QBS, KBS=km.KBS, MASK_KIND=km.mask_kind, CAUSAL=causal, HAS_WINDOW=has_w,
        HAS_PREFIX=has_pre, HAS_FULL=km.has_full, EVEN_M=lp.even_m, EVEN_N=lp.even_n,
    )  # fmt: skip
    if schedule == "ws":
        _gl_fwd_ws_kernel[grid](
            q, k, v, out, lse, *strides, prev, prev.stride(0), prev.stride(1), prev.stride(2), *rest,
            **consts, ACCUM=accum, ACC_TO_OUT=to_out, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
            maxnreg=WS_MAXNREG, **ws_kernel_layouts(sh.D, sh.Dv),
        )  # fmt: skip
    else:
        _gl_fwd_kernel[grid](
            q, k, v, out, lse, *strides, *rest, **consts, TMA=bool(tma), num_warps=NUM_WARPS,
            **kernel_layouts(sh.D, sh.Dv),
        )  # fmt: skip
    return out, lse


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
    tma: bool = True,
    ws: bool = False,
    accum: bool = False,
    acc_to_out: bool = False,
    out_dtype: str | None = None,
):
    """Compile one specialisation of the kernel for sm_90a without a GPU (``triton.compile`` with an explicit
    target): how CI checks that it still builds on the installed Triton, and how to read its PTX
    (``.asm["ptx"]``). Pointers and strides are taken as 16-byte multiples, as the JIT specialises them for
    the usual shapes."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _gl_fwd_ws_kernel if ws else _gl_fwd_kernel
    consts = dict(
        D=D, DV=D, QBS=128, KBS=128, MASK_KIND=mask_kind, CAUSAL=causal, HAS_WINDOW=has_window,
        HAS_PREFIX=has_prefix, HAS_FULL=has_full, EVEN_M=even_m, EVEN_N=even_n,
    )  # fmt: skip
    if ws:
        consts.update(
            CONSUMER_REGS=CONSUMER_REGS, ACCUM=accum, ACC_TO_OUT=acc_to_out, **ws_kernel_layouts(D, D)
        )
        options = {"num_warps": 4, "maxnreg": WS_MAXNREG}
    else:
        consts.update(TMA=tma, **kernel_layouts(D, D))
        options = {"num_warps": NUM_WARPS}
    ptrs = dict.fromkeys(("Q", "K", "V"), f"*{dtype}")
    ptrs.update(O=f"*{out_dtype or ('fp32' if accum and not acc_to_out else dtype)}", OP="*fp32")
    ptrs.update(dict.fromkeys(("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "ORDER"), "*i32"))
    ptrs.update(dict.fromkeys(("QDOC", "KVDOC", "QPOS", "KVPOS", "KVPRE"), "*i32"), LSE="*fp32")
    aligned = {"sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "som"}
    aligned |= {"sopb", "soph", "sopm"}
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in consts else ptrs.get(name, "fp32" if name == "qk_scale" else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ptrs or n in aligned}
    src = GluonASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
