"""Hopper (sm_90) dQ kernel of the backward, written in Gluon, warp-specialised like kernels/gluon_fwd.py.

Same contract as ``triton_bwd._dq_kernel`` for the cases the Gluon forward covers (no score mod, the no-op
and document masks, fp16 / bf16, ``D == Dv`` in {64, 128}): per query tile, over the BlockMask's partial and
then full kv blocks, ``S = Q·Kᵀ``, ``P = exp2(S·scale·log2e − LSE·log2e)`` (0 for a row with LSE −inf),
``dP = dO·Vᵀ``, ``dS = P·(dP − Δ)`` and ``dQ += dS·K``, then ``dQ·scale`` stored, added into ``dq_out``, or
overwriting it. Deterministic: every dQ tile belongs to one program.

Schedule: a producer warp copies Q and dO (both halves of the 128-row tile) once and then K_t, V_t into
double buffers (ready / empty mbarriers); two consumer warpgroups own 64 query rows each. A consumer issues
``S_t`` and ``dP_t`` as asynchronous wgmma behind the still running ``dQ += dS_{t-1}·K_{t-1}``, waits for
``dQ`` and ``S_t`` together (K_{t-1} is then released), runs the exponentials while ``dP_t`` finishes, and
issues ``dS_t·K_t`` to run under the next step's waits.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
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
    _gl_doc_visible,
    _gl_kv_row0,
    _tma_load,
    _tma_problem,
    gluon_forward_unsupported,
)
from .triton_fwd import LOG2E, SCORE_NONE, _tma_scratch, doc_args, launch_head_group, meta_args, prepare

DQ_BLOCK_N = 64  # kv rows per step: S, dP (32 registers each), dQ (64) and dS fit a consumer's 240


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
        row0 = _gl_kv_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
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
    if MASK_KIND == 1:
        qd = gl.load(QDOCb + offs_m, mask=offs_m < Sq, other=-1)
        qp = gl.load(QPOSb + offs_m, mask=offs_m < Sq, other=0)
    else:
        qd = offs_m  # not read
        qp = offs_m
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=S_LAYOUT)
    dq_tok = warpgroup_mma_init(gl.zeros([HALF, D], gl.float32, layout=DQ_LAYOUT))
    ds = gl.zeros([HALF, BLOCK_N], dtype, layout=DS_LAYOUT)
    mbarrier.wait(q_bar, 0)
    for t in range(0, n):
        st = t % 2
        ph = (t // 2) & 1
        row0 = _gl_kv_row0(KVI, FULLI, t, n_part, KBS, BLOCK_N, SUBS)
        mbarrier.wait(k_ready.index(st), ph)
        s_tok = warpgroup_mma(q_tile, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(st), ph)
        dp_tok = warpgroup_mma(
            do_tile, v_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        # dS_{t-1}·K_{t-1} and S_t are back (wgmma groups retire in order); dP_t may still run
        dq, s, ds = warpgroup_mma_wait(1, deps=(dq_tok, s_tok, ds))
        if t > 0:
            mbarrier.arrive(k_empty.index((t - 1) % 2), count=1)
        offs_n = row0 + gl.arange(0, BLOCK_N, layout=COL_S)
        if MASK_KIND == 1:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if t // SUBS < n_part:
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
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
        dp = warpgroup_mma_wait(0, deps=(dp_tok,))
        mbarrier.arrive(v_empty.index(st), count=1)
        ds = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(dtype), DS_LAYOUT)
        dq_tok = warpgroup_mma(ds, k_smem.index(st), dq, is_async=True)
    dq, ds = warpgroup_mma_wait(0, deps=(dq_tok, ds))
    if n > 0:
        mbarrier.arrive(k_empty.index((n - 1) % 2), count=1)

    dq = dq * scale
    rows = start_m + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, DQ_LAYOUT))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, DQ_LAYOUT))
    ptrs_dq = DQb + gl.expand_dims(rows, 1) * sdqm + gl.expand_dims(cols, 0)
    row_ok = gl.expand_dims(rows < Sq, 1) & gl.expand_dims(cols >= 0, 0)
    if ACCUM:  # add into the caller's buffer; untouched when this call visited no block
        if n > 0:
            if EVEN_M:
                gl.store(ptrs_dq, (dq + gl.load(ptrs_dq).to(gl.float32)).to(DQb.dtype.element_ty))
            else:
                prev = gl.load(ptrs_dq, mask=row_ok, other=0.0).to(gl.float32)
                gl.store(ptrs_dq, (dq + prev).to(DQb.dtype.element_ty), mask=row_ok)
    else:
        if EVEN_M:
            gl.store(ptrs_dq, dq.to(DQb.dtype.element_ty))
        else:
            gl.store(ptrs_dq, dq.to(DQb.dtype.element_ty), mask=row_ok)


@gluon.jit
def _gl_dq_ws_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, snb, snh, sib, sih, siq, ORDER, sor_b, sor_h,
    QDOC, KVDOC, QPOS, KVPOS, KVPRE, sdq, sdk, window,
    Hq, G, Sq, Skv, scale, qk_scale, NB, BH, HG,
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
    # launch coordinates: triton_fwd._launch_coords
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
    hq64 = hq.to(gl.int64)
    qb = gl.load(ORDER + b * sor_b + hq * sor_h + slot // SUBS_M)
    start_m = qb * QBS + (slot % SUBS_M) * BLOCK_M
    num_off = b * snb + hq * snh + qb
    idx_off = b64 * sib + hq * sih + qb * siq
    n_part = gl.load(KV_NUM + num_off)
    n_blocks = n_part
    if HAS_FULL:
        n_blocks += gl.load(FULL_NUM + num_off)
    n = n_blocks * SUBS

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
    descs = (q_desc, do_desc, k_desc, v_desc)
    bars = (q_bar, k_ready, k_empty, v_ready, v_empty)
    bufs = (q_smem, do_smem, k_smem, v_smem)
    row = bh.to(gl.int64) * Sq
    ptrs = (
        DQ + b64 * sdqb + hq64 * sdqh, LSE + row, DELTA + row, KV_IDX + idx_off, FULL_IDX + idx_off,
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


def gluon_dq_unsupported(q, k, v, dout, block_mask, score_mod, scale, dq_out=None) -> str | None:
    """Why the Gluon dQ kernel cannot run this call, or None (the forward's rules, plus dO's TMA alignment
    and the dq_out dtype)."""
    if dout.dtype != q.dtype:
        return f"dout dtype {dout.dtype} differs from q's {q.dtype}"
    if dq_out is not None and dq_out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dq_out dtype {dq_out.dtype}: it stores fp16, bf16 or fp32"
    why = _tma_problem("dout", dout)
    if why is not None:
        return why
    return gluon_forward_unsupported(q, k, v, block_mask, score_mod, scale)


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
    the reason for a call it does not cover (``gluon_dq_unsupported``)."""
    why = gluon_dq_unsupported(q, k, v, dout, block_mask, None, scale, dq_out)
    if why is not None:
        raise ValueError(f"gluon_dq cannot run this call: {why}")
    if block_n not in (64, 128):
        raise ValueError(f"block_n must be 64 or 128, got {block_n}")
    lp = prepare(q, k, v, block_mask, None, scale, enable_gqa, None, None, dense_block=128)
    sh, km = lp.shape, lp.km
    assert lp.score_kind == SCORE_NONE and km.mask_kind in (MASK_NONE, MASK_DOC)
    for name, t in (("lse", lse), ("delta", delta)):
        if tuple(t.shape) != (sh.B, sh.Hq, sh.Sq) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous fp32 [B, Hq, Sq] = {(sh.B, sh.Hq, sh.Sq)} tensor, got "
                f"{t.dtype} {tuple(t.shape)}"
            )
    if dq_out is not None:
        want = (sh.B, sh.Hq, sh.Sq, sh.D)
        if tuple(dq_out.shape) != want or dq_out.device != q.device or dq_out.stride(-1) != 1:
            raise ValueError(
                f"dq_out must be {want} on {q.device} with unit last-dim stride, got {tuple(dq_out.shape)} "
                f"on {dq_out.device} with strides {dq_out.stride()}"
            )
        dq = dq_out
    else:
        dq = torch.empty(sh.B, sh.Hq, sh.Sq, sh.D, dtype=q.dtype, device=q.device)
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
        D=sh.D, DV=sh.Dv, QBS=km.QBS, KBS=km.KBS, MASK_KIND=km.mask_kind, CAUSAL=causal, HAS_WINDOW=has_w,
        HAS_PREFIX=has_pre, HAS_FULL=km.has_full, EVEN_M=lp.even_m, EVEN_N=lp.even_n,
        ACCUM=dq_out is not None and accumulate, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
        maxnreg=WS_MAXNREG, **dq_kernel_layouts(sh.D, block_n),
    )  # fmt: skip
    return dq


def compile_dq_for_sm90(D: int = 128, dtype: str = "bf16", block_n: int = DQ_BLOCK_N, **flags):
    """Compile one specialisation of the dQ kernel for sm_90a without a GPU (see
    ``gluon_fwd.compile_for_sm90``); ``flags``: mask_kind, causal, has_window, has_prefix, has_full, even_m,
    even_n, accum."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    f = dict(mask_kind=MASK_DOC, causal=True, has_window=False, has_prefix=False, has_full=True, even_m=True)
    f.update(even_n=True, accum=False)
    f.update(flags)
    fn = _gl_dq_ws_kernel
    consts = dict(
        D=D, DV=D, QBS=128, KBS=128, MASK_KIND=f["mask_kind"], CAUSAL=f["causal"],
        HAS_WINDOW=f["has_window"], HAS_PREFIX=f["has_prefix"], HAS_FULL=f["has_full"], EVEN_M=f["even_m"],
        EVEN_N=f["even_n"], ACCUM=f["accum"], CONSUMER_REGS=CONSUMER_REGS, **dq_kernel_layouts(D, block_n),
    )  # fmt: skip
    ptrs = dict.fromkeys(("Q", "K", "V", "DO", "DQ"), f"*{dtype}")
    ptrs.update(dict.fromkeys(("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "ORDER"), "*i32"))
    ptrs.update(
        dict.fromkeys(("QDOC", "KVDOC", "QPOS", "KVPOS", "KVPRE"), "*i32"), LSE="*fp32", DELTA="*fp32"
    )
    aligned = {"sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sdob", "sdoh", "sdom"}
    aligned |= {"sdqb", "sdqh", "sdqm"}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = ptrs.get(name, "fp32" if name in ("scale", "qk_scale") else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ptrs or n in aligned}
    src = GluonASTSource(fn, sig, consts, attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": WS_MAXNREG}
    )
