"""Triton forward kernel of block-sparse flex attention (and the helpers the backward shares).

One program per (query tile, batch·head). It walks the query block's *partial* kv blocks (mask evaluated
per element: in-kernel document mask, or a bit tile) and then its *full* kv blocks (no mask evaluation);
empty blocks are never visited. Each sparse block is walked in ``KBS // BLOCK_N`` sub-tiles inside one
flattened loop (so software pipelining sees a single loop). Softmax runs in the exp2 domain with
``scale·log2(e)`` folded into one multiply; a row whose running max is still −inf is clamped so no NaN
appears; the stored LSE is natural-log fp32 (−inf for a row that sees nothing, whose output is 0).
GQA reads kv head ``hq // groups`` (K/V are never expanded). Query tiles are launched longest-first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from .block_sparse import MASK_BITS, MASK_DOC, KernelMask, kernel_mask
from .score_mods import ALiBi, RelativeBias, SoftCap
from .tuned_launch import launch_tuned
from .validation import AttnShape, check_index_map, check_kernel_inputs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

SCORE_NONE, SCORE_SOFTCAP, SCORE_ALIBI, SCORE_RELBIAS = 0, 1, 2, 3


@triton.jit
def _tanh(x):
    # tanh from exp2 (libdevice is not available under the interpreter); saturates to ±1 without NaN
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST computes in fp32 (the CPU interpreter's bf16 dot is wrong in triton 3.9)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _fp32_scalars(softcap, scale, qk_scale):
    """The kernels' float scalars as fp32. torch.compile launches user-defined kernels with Python floats
    typed fp64 (inductor, torch 2.11), which would turn the fp32 accumulators fp64 (a no-op in eager)."""
    return tl.cast(softcap, tl.float32), tl.cast(scale, tl.float32), tl.cast(qk_scale, tl.float32)


@triton.jit
def _launch_coords(NB, BH, HG, SUBS: tl.constexpr):
    """(slot, batch·head) of this program in the 1-D grid of ``NB · SUBS`` slots × ``BH`` heads.

    Heads are walked in groups of ``HG``; inside a group the slot varies slowest, so the group's tiles start
    in block-work order (longest first) across all its heads. ``HG = 1`` runs one head after the other (its
    K/V stay in L2); a larger group trades that locality for a short tail: with one head at a time the last
    head's longest tiles only start in the last wave.
    """
    pid = tl.program_id(0)
    per_group = HG * (NB * SUBS)
    g = pid // per_group
    r = pid - g * per_group
    hg = tl.minimum(HG, BH - g * HG)  # the last group may hold fewer heads
    return r // hg, g * HG + r % hg


@triton.jit
def _launch_coords_lead(NB, BH, HG, LEAD, SUBS: tl.constexpr):
    """``_launch_coords`` with the ``LEAD`` most-work blocks of every head launched first, all heads together
    (block-work order, then head), and the other blocks in head groups of ``HG`` as before (``LEAD = 0``: the
    same coordinates as ``_launch_coords``).

    With head groups, a group's longest rows start only when the group does: in a CP rank's call, whose rows
    are as long as on one GPU but whose heads hold 1/N of the tiles, the last group's longest rows (e.g. a
    tile ending a 16k-token document and straddling into the next, all 128 of its blocks partial) then end
    after every other program (``launch_lead``).
    """
    pid = tl.program_id(0)
    n_lead = LEAD * SUBS * BH
    p = tl.maximum(pid - n_lead, 0)  # position among the grouped programs
    rest = (NB - LEAD) * SUBS
    per_group = tl.maximum(HG * rest, 1)
    g = p // per_group
    r = p - g * per_group
    hg = tl.maximum(tl.minimum(HG, BH - g * HG), 1)  # the last group may hold fewer heads
    lead = pid < n_lead
    return tl.where(lead, pid // BH, LEAD * SUBS + r // hg), tl.where(lead, pid % BH, g * HG + r % hg)


@triton.jit
def _score_mod(s, hq, qg, kg, SLOPES, TABLE, table_stride, L, softcap, SCORE_KIND: tl.constexpr):
    """Natural-units score (already × scale) -> modded score. qg [M], kg [N] are global positions."""
    if SCORE_KIND == 1:
        s = softcap * _tanh(s / softcap)
    elif SCORE_KIND == 2:
        slope = tl.load(SLOPES + hq)
        s = s + slope * (kg[None, :] - qg[:, None]).to(tl.float32)
    elif SCORE_KIND == 3:
        rel = qg[:, None] - kg[None, :]
        rel = tl.minimum(tl.maximum(rel, -L + 1), L - 1) + (L - 1)
        s = s + tl.load(TABLE + hq * table_stride + rel)
    return s


@triton.jit
def _doc_visible(
    qd, qp, kd, kp, kpre, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr
):
    """DocumentMaskMod semantics: same document and causal / window / prefix visibility.

    Padding ids were remapped on the host (queries -1, keys -2) so equality alone excludes padding.
    """
    same = qd[:, None] == kd[None, :]
    rel = qp[:, None] - kp[None, :]
    if CAUSAL:
        vis = rel >= 0
        if HAS_WINDOW:
            vis = vis & (rel < window)
    elif HAS_WINDOW:
        vis = (rel < window) & (rel > -window)
    else:
        vis = rel == rel
    if HAS_PREFIX:
        vis = vis | (kpre[None, :] != 0)
    return same & vis


@triton.jit
def _bits_visible(BITS, pid, rows_in_blk, cols_in_blk, QBS: tl.constexpr, WORDS: tl.constexpr):
    """Bit tile of one partial block: bit (r, c) of word [pid, r, c // 32]."""
    base = BITS + pid.to(tl.int64) * (QBS * WORDS)
    w = tl.load(base + rows_in_blk[:, None] * WORDS + (cols_in_blk[None, :] // 32))
    return ((w >> (cols_in_blk[None, :] % 32)) & 1) != 0


@triton.jit
def _kv_tile(IDX, it, KBS: tl.constexpr, BLOCK_N: tl.constexpr, SUBS: tl.constexpr):
    """(block slot j, sub-tile, first key row, key offsets) of step ``it`` of the flattened walk over the
    sparse kv blocks."""
    j = it // SUBS
    sub = it % SUBS
    kb = tl.load(IDX + j)
    row0 = kb * KBS + sub * BLOCK_N
    return j, sub, row0, row0 + tl.arange(0, BLOCK_N)


@triton.jit
def _kv_rows(P, offs_n, stride, Skv, offs_c, EVEN_N: tl.constexpr):
    """Rows ``offs_n`` of a K or V slice; rows past Skv read as 0 (their scores are set to -inf)."""
    if EVEN_N:
        return tl.load(P + offs_n[:, None] * stride + offs_c[None, :])
    else:
        return tl.load(P + offs_n[:, None] * stride + offs_c[None, :], mask=offs_n[:, None] < Skv, other=0.0)


@triton.jit
def _mask_scores(
    s, offs_n, j, sub, qd, qp, offs_m, qb, PID, Skv, BITS, KVDOC, KVPOS, KVPRE, window,
    BLOCK_N: tl.constexpr, QBS: tl.constexpr, WORDS: tl.constexpr, IS_PARTIAL: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr,
    EVEN_N: tl.constexpr,
):  # fmt: skip
    """Scores ``s [BLOCK_M, BLOCK_N]`` of query-major tiles (forward, dQ) with what the mask hides set to
    −inf: a partial block's document mask or bit tile (slot ``j``, sub-tile ``sub``), and keys past Skv."""
    if IS_PARTIAL:
        if MASK_KIND == 1:
            kd = tl.load(KVDOC + offs_n, mask=offs_n < Skv, other=-2)
            kp = tl.load(KVPOS + offs_n, mask=offs_n < Skv, other=0)
            if HAS_PREFIX:
                kpre = tl.load(KVPRE + offs_n, mask=offs_n < Skv, other=0)
            else:
                kpre = kp
            vis = _doc_visible(qd, qp, kd, kp, kpre, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
            s = tl.where(vis, s, float("-inf"))
        elif MASK_KIND == 2:
            pid = tl.load(PID + j)
            vis = _bits_visible(
                BITS, pid, offs_m - qb * QBS, sub * BLOCK_N + tl.arange(0, BLOCK_N), QBS, WORDS
            )
            s = tl.where(vis, s, float("-inf"))
    if not EVEN_N:
        s = tl.where(offs_n[None, :] < Skv, s, float("-inf"))
    return s


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    qk,
    v,
    offs_n,
    j,
    sub,
    qd,
    qp,
    qg,
    offs_m,
    qb,
    hq,
    PID,
    Skv,
    BITS,
    KVDOC,
    KVPOS,
    KVPRE,
    KVIDX,
    SLOPES,
    TABLE,
    table_stride,
    L,
    softcap,
    window,
    scale,
    qk_scale,
    BLOCK_N: tl.constexpr,
    QBS: tl.constexpr,
    WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SCORE_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_KVIDX: tl.constexpr,
    EVEN_N: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FMA: tl.constexpr,
):
    """Online-softmax update of one kv sub-tile from its raw scores ``qk`` (score mod, mask, P·V).

    Shared by the plain and the pipelined kv loops, so both accumulate the same math in the same order."""
    if SCORE_KIND == 0:
        if FMA:
            s = qk  # scaled below, fused into the exponent's subtraction
        else:
            s = qk * qk_scale
    else:
        if HAS_KVIDX:
            kg = tl.load(KVIDX + offs_n, mask=offs_n < Skv, other=0)
        else:
            kg = offs_n
        s = (
            _score_mod(qk * scale, hq, qg, kg, SLOPES, TABLE, table_stride, L, softcap, SCORE_KIND)
            * 1.4426950408889634
        )
    s = _mask_scores(
        s, offs_n, j, sub, qd, qp, offs_m, qb, PID, Skv, BITS, KVDOC, KVPOS, KVPRE, window, BLOCK_N, QBS,
        WORDS, IS_PARTIAL, MASK_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, EVEN_N,
    )  # fmt: skip
    # FMA: the tutorial's form, the max of the raw scores times the (positive) scale, then one FMA per
    # element (s·scale − m) instead of a multiply and a subtract
    if FMA and SCORE_KIND == 0:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if FMA and SCORE_KIND == 0:
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    qd,
    qp,
    qg,
    offs_m,
    qb,
    hq,
    num,
    IDX,
    PID,
    Kb,
    Vb,
    KD,
    VD,
    skn,
    svn,
    Skv,
    BITS,
    KVDOC,
    KVPOS,
    KVPRE,
    KVIDX,
    SLOPES,
    TABLE,
    table_stride,
    L,
    softcap,
    window,
    scale,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    QBS: tl.constexpr,
    KBS: tl.constexpr,
    WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SCORE_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_KVIDX: tl.constexpr,
    EVEN_N: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FMA: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
    PIPE: tl.constexpr,
):
    SUBS: tl.constexpr = KBS // BLOCK_N
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    n = num * SUBS
    if PIPE:
        # QK^T one sub-tile ahead (after FlashAttention-3's intra-warpgroup overlap): the scores of step
        # it+1 are issued before step it's softmax and P·V and reach the next step only through the loop's
        # yield, so an asynchronous wgmma could run under the softmax. (Triton 3.6 / 3.9's wgmma pass still
        # waits on it at once: it keeps a dot in flight only if its previous result is read after a wait(0)
        # or by another dot; slower on an H100, see triton_forward's docstring.) Peeled (first QK^T before the loop, last update
        # after it) so no GEMM or load falls past the last sub-tile.
        tl.static_assert(not TMA, "PIPE loads K / V with tl.load (the host rejects tma with pipe_qk)")
        if n > 0:
            _, _, _, offs_n = _kv_tile(IDX, 0, KBS, BLOCK_N, SUBS)
            qk = _dot(q, tl.trans(_kv_rows(Kb, offs_n, skn, Skv, offs_d, EVEN_N)), PREC, UPCAST)
            for it in tl.range(0, n - 1):
                _, _, _, offs_next = _kv_tile(IDX, it + 1, KBS, BLOCK_N, SUBS)
                k = _kv_rows(Kb, offs_next, skn, Skv, offs_d, EVEN_N)
                qk_next = _dot(q, tl.trans(k), PREC, UPCAST)
                # this step's block index is loaded again rather than carried from the previous step, so
                # V's address does not hang on a loop-carried value (V pipelines like K)
                j, sub, _, offs_n = _kv_tile(IDX, it, KBS, BLOCK_N, SUBS)
                v = _kv_rows(Vb, offs_n, svn, Skv, offs_dv, EVEN_N)
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, qk, v, offs_n, j, sub, qd, qp, qg, offs_m, qb, hq, PID, Skv, BITS,
                    KVDOC, KVPOS, KVPRE, KVIDX, SLOPES, TABLE, table_stride, L, softcap, window, scale,
                    qk_scale, BLOCK_N, QBS, WORDS, IS_PARTIAL, MASK_KIND, SCORE_KIND, CAUSAL, HAS_WINDOW,
                    HAS_PREFIX, HAS_KVIDX, EVEN_N, PREC, UPCAST, FMA,
                )  # fmt: skip
                qk = qk_next
            j, sub, _, offs_n = _kv_tile(IDX, n - 1, KBS, BLOCK_N, SUBS)
            v = _kv_rows(Vb, offs_n, svn, Skv, offs_dv, EVEN_N)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, qk, v, offs_n, j, sub, qd, qp, qg, offs_m, qb, hq, PID, Skv, BITS,
                KVDOC, KVPOS, KVPRE, KVIDX, SLOPES, TABLE, table_stride, L, softcap, window, scale,
                qk_scale, BLOCK_N, QBS, WORDS, IS_PARTIAL, MASK_KIND, SCORE_KIND, CAUSAL, HAS_WINDOW,
                HAS_PREFIX, HAS_KVIDX, EVEN_N, PREC, UPCAST, FMA,
            )  # fmt: skip
    else:
        # (tl.range without warp_specialize emits the same loop as range: the attribute is only set when true)
        for it in tl.range(0, n, warp_specialize=WS):
            j, sub, row0, offs_n = _kv_tile(IDX, it, KBS, BLOCK_N, SUBS)
            if TMA:
                # rows past Skv come back zero-filled; their scores are still set to -inf (not EVEN_N)
                k = KD.load([row0, 0])
                v = VD.load([row0, 0])
            else:
                k = _kv_rows(Kb, offs_n, skn, Skv, offs_d, EVEN_N)
                v = _kv_rows(Vb, offs_n, svn, Skv, offs_dv, EVEN_N)
            qk = _dot(q, tl.trans(k), PREC, UPCAST)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, qk, v, offs_n, j, sub, qd, qp, qg, offs_m, qb, hq, PID, Skv, BITS,
                KVDOC, KVPOS, KVPRE, KVIDX, SLOPES, TABLE, table_stride, L, softcap, window, scale,
                qk_scale, BLOCK_N, QBS, WORDS, IS_PARTIAL, MASK_KIND, SCORE_KIND, CAUSAL, HAS_WINDOW,
                HAS_PREFIX, HAS_KVIDX, EVEN_N, PREC, UPCAST, FMA,
            )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    som,
    OP,
    sopb,
    soph,
    sopm,
    KV_NUM,
    KV_IDX,
    FULL_NUM,
    FULL_IDX,
    KV_PID,
    snb,
    snh,
    sib,
    sih,
    siq,
    ORDER,
    sor_b,
    sor_h,
    BITS,
    QDOC,
    KVDOC,
    QPOS,
    KVPOS,
    KVPRE,
    sdq,
    sdk,
    window,
    QIDX,
    KVIDX,
    SLOPES,
    TABLE,
    table_stride,
    L,
    softcap,
    Hq,
    G,
    Sq,
    Skv,
    scale,
    qk_scale,
    NB,
    BH,
    HG,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    QBS: tl.constexpr,
    KBS: tl.constexpr,
    WORDS: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SCORE_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_QIDX: tl.constexpr,
    HAS_KVIDX: tl.constexpr,
    HAS_FULL: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    ACCUM: tl.constexpr,
    FMA: tl.constexpr,
    ACC_TO_OUT: tl.constexpr = False,
    TMA: tl.constexpr = False,
    WS: tl.constexpr = False,
    PIPE: tl.constexpr = False,
):
    softcap, scale, qk_scale = _fp32_scalars(softcap, scale, qk_scale)
    SUBS_M: tl.constexpr = QBS // BLOCK_M
    slot, bh = _launch_coords(NB, BH, HG, SUBS_M)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    b64 = b.to(tl.int64)
    qb = tl.load(ORDER + b * sor_b + hq * sor_h + slot // SUBS_M)
    start_m = qb * QBS + (slot % SUBS_M) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q_ptrs = Q + b64 * sqb + hq.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    if EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    Kb = K + b64 * skb + hk.to(tl.int64) * skh
    Vb = V + b64 * svb + hk.to(tl.int64) * svh
    if TMA:
        # Built once per program, outside the loops: a descriptor made inside the loop is rebuilt every
        # iteration and keeps the loop from being pipelined. The host checked the TMA alignment rules
        # (16-byte base and row strides).
        KD = tl.make_tensor_descriptor(Kb, shape=[Skv, D], strides=[skn, 1], block_shape=[BLOCK_N, D])
        VD = tl.make_tensor_descriptor(Vb, shape=[Skv, DV], strides=[svn, 1], block_shape=[BLOCK_N, DV])
    else:
        KD = Kb  # not read
        VD = Vb
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
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    num_off = b * snb + hq * snh + qb
    idx_off = b64 * sib + hq * sih + qb * siq
    num = tl.load(KV_NUM + num_off)
    n_visited = num
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, qd, qp, qg, offs_m, qb, hq, num, KV_IDX + idx_off, KV_PID + idx_off,
        Kb, Vb, KD, VD, skn, svn, Skv, BITS, KVDOC, KVPOS, KVPRE, KVIDX, SLOPES, TABLE, table_stride, L,
        softcap, window, scale, qk_scale, BLOCK_M, BLOCK_N, D, DV, QBS, KBS, WORDS, True, MASK_KIND,
        SCORE_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, HAS_KVIDX, EVEN_N, PREC, UPCAST, FMA, TMA, WS, PIPE,
    )  # fmt: skip
    if HAS_FULL:
        num = tl.load(FULL_NUM + num_off)
        n_visited += num
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, qd, qp, qg, offs_m, qb, hq, num, FULL_IDX + idx_off, KV_PID + idx_off,
            Kb, Vb, KD, VD, skn, svn, Skv, BITS, KVDOC, KVPOS, KVPRE, KVIDX, SLOPES, TABLE, table_stride, L,
            softcap, window, scale, qk_scale, BLOCK_M, BLOCK_N, D, DV, QBS, KBS, WORDS, False, MASK_KIND,
            SCORE_KIND, CAUSAL, HAS_WINDOW, HAS_PREFIX, HAS_KVIDX, EVEN_N, PREC, UPCAST, FMA, TMA, WS, PIPE,
        )  # fmt: skip
    o_ptrs = O + b64 * sob + hq.to(tl.int64) * soh + offs_m[:, None] * som + offs_dv[None, :]
    lse_ptrs = LSE + bh.to(tl.int64) * Sq + offs_m
    if ACCUM:
        # Merge with the running result of earlier calls (ring attention's steps), in the same pass: no
        # separate merge kernel re-reading the whole accumulator every step. The running output is read
        # through OP: O itself (merge in place, fp32; a tile that visited no block leaves it untouched, on a
        # sparse ring step most tiles) or, with ACC_TO_OUT, an fp32 buffer whose merged result every tile
        # stores into O in O's dtype (the last merge of a row written straight as the output). LSE is
        # read and written in place either way.
        visit = n_visited > 0
        if ACC_TO_OUT:
            visit = n_visited >= 0
        if visit:
            op_ptrs = OP + b64 * sopb + hq.to(tl.int64) * soph + offs_m[:, None] * sopm + offs_dv[None, :]
            if EVEN_M:
                prev_lse = tl.load(lse_ptrs)
                prev = tl.load(op_ptrs)
            else:
                prev_lse = tl.load(lse_ptrs, mask=offs_m < Sq, other=float("-inf"))
                prev = tl.load(op_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
            p2 = prev_lse * 1.4426950408889634  # log2 domain, like m_i
            mx = tl.maximum(p2, m_i)
            mx = tl.where(mx == float("-inf"), 0.0, mx)  # both sides empty: weights 0, no -inf - -inf
            w_prev = tl.exp2(p2 - mx)
            w_new = tl.exp2(m_i - mx)
            den = w_prev + l_i * w_new
            den_safe = tl.where(den == 0.0, 1.0, den)
            out = (prev * w_prev[:, None] + acc * w_new[:, None]) / den_safe[:, None]
            lse = tl.where(den == 0.0, float("-inf"), (mx + tl.log2(den_safe)) * 0.6931471805599453)
            if EVEN_M:
                tl.store(o_ptrs, out.to(O.dtype.element_ty))
                tl.store(lse_ptrs, lse)
            else:
                tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Sq)
                tl.store(lse_ptrs, lse, mask=offs_m < Sq)
    else:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        if EVEN_M:
            tl.store(o_ptrs, out.to(O.dtype.element_ty))
            tl.store(lse_ptrs, lse)
        else:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Sq)
            tl.store(lse_ptrs, lse, mask=offs_m < Sq)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """Everything both passes need: checked shapes, strides, metadata and mod tensors."""

    shape: AttnShape
    km: KernelMask
    scale: float
    score_kind: int
    slopes: torch.Tensor
    table: torch.Tensor
    table_stride: int
    L: int
    softcap: float
    qidx: torch.Tensor
    kvidx: torch.Tensor
    has_qidx: bool
    has_kvidx: bool
    even_m: bool
    even_n: bool
    prec: str
    upcast: bool
    dummy: torch.Tensor
    dummy_i: torch.Tensor  # int32 twin of ``dummy`` (document / bit-tile / partial-id pointers)


_PLACEHOLDERS: dict = {}


def placeholder(device: torch.device, dtype: torch.dtype, cached: bool = True) -> torch.Tensor:
    """A 1-element tensor for pointer arguments a specialisation never reads (no per-call fill).

    ``cached=True`` (eager launches) reuses one per (device, dtype). Inside a traced op (the ``triton_op`` of
    kernels/ops.py) the tensor is allocated per call instead: a module-level cache would keep the tracer's
    FakeTensor and hand it to later eager calls."""
    if not cached:
        return torch.empty(1, dtype=dtype, device=device)
    key = (str(device), dtype)
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def kernels_are_compiled() -> bool:
    """True when the kernels are Triton JIT functions (not ``TRITON_INTERPRET=1``'s interpreted ones).

    Only JIT functions can be captured by ``torch.library.wrap_triton`` into a traced graph (torch 2.11 rejects
    interpreted ones; later versions hand them back uncaptured, which cannot run on FakeTensors)."""
    return isinstance(_fwd_kernel, JITFunction)


def _pow2_divisor(n: int, cap: int) -> int:
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


def pick_tile(block: int, preferred: int, what: str) -> int:
    """Largest power-of-two tile <= preferred that divides the BlockMask block size (>= 16 for tl.dot)."""
    t = _pow2_divisor(block, preferred)
    if t < 16:
        raise ValueError(
            f"BlockMask {what} block size {block} must be a multiple of 16 for the Triton kernel "
            f"(tiles of 16..{preferred} must divide it)"
        )
    return t


def fwd_config(D: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) before fitting to the BlockMask block sizes."""
    if not on_gpu:
        return 64, 64, 4, 1
    if D <= 64:
        return 128, 128, 4, 3
    return 128, 128, 8, 3  # H100 sweep at 32k: best for causal, within 8% of the best for doc masks


# Autotuning (GPU only) over a short list of configs measured on H100; used when the BlockMask blocks are
# multiples of 128 (every listed tile divides them) and the problem is large enough to amortise tuning.
AUTOTUNE_MIN_PAIRS = (1 << 24) + 1  # Sq·Skv above 4096²: tuning (≈15 compiles per mask kind) must pay off
TUNE_KEY = ["Sq", "Skv", "D", "DV", "QBS", "KBS", "MASK_KIND", "SCORE_KIND", "HAS_FULL", "G"]
FWD_TUNE = [
    (128, 128, 8, 3),  # best at 32k causal on H100
    (128, 64, 4, 3),  # best at 32k document masks on H100
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (128, 128, 4, 3),
    (128, 64, 4, 4),
    (64, 128, 4, 3),
    # the two leading tiles again with the FMA softmax (max of raw scores × scale, one FMA per element): not
    # yet timed on a GPU, so the autotuner decides per shape instead of a changed default
    (128, 128, 8, 3, True),
    (128, 64, 4, 3, True),
]


def tune_configs(cfgs, extra: str | None = None) -> list:
    """``triton.Config`` per ``(BLOCK_M, BLOCK_N, warps, stages[, flag])``; the optional fifth entry sets the
    boolean constexpr named ``extra`` (False where absent)."""
    out = []
    for c in cfgs:
        kw = {"BLOCK_M": c[0], "BLOCK_N": c[1]}
        if extra is not None:
            kw[extra] = bool(c[4]) if len(c) > 4 else False
        out.append(triton.Config(kw, num_warps=c[2], num_stages=c[3]))
    return out


# L2 bytes the heads of one launch group may stream between them (H100 / H200: 50 MB of L2)
HEAD_GROUP_L2_BYTES = 32 << 20


def launch_head_group(sh: AttnShape, element_size: int, kv_programs: bool) -> int:
    """Heads per launch group (``_launch_coords``): as many as fit their streamed operand in
    ``HEAD_GROUP_L2_BYTES`` together, at least one. Query-tile programs (forward, dQ) stream the whole key
    range's K and V, shared by the ``groups`` query heads of a kv head; key-tile programs (dK/dV,
    ``kv_programs``) stream the whole query range's Q and dO of their GQA group. Shape-only, so it is known
    without reading the mask (no device sync, traceable).
    """
    if kv_programs:
        per_head, n_heads = sh.Sq * (sh.D + sh.Dv) * element_size * sh.groups, sh.B * sh.Hkv
    else:
        per_head, n_heads = sh.Skv * (sh.D + sh.Dv) * element_size // sh.groups, sh.B * sh.Hq
    return max(1, min(n_heads, HEAD_GROUP_L2_BYTES // max(1, per_head)))


# The SMs the lead blocks of a backward launch are sized for, where there is no CUDA device (the interpreter).
DEFAULT_SMS = 132
# The share of the SMs the lead blocks fill (``launch_lead``; 0: no lead, the plain head groups).
LEAD_SM_FRACTION = 0.5
# Lead blocks only for calls with at least this many keys per query (a CP rank's all-gather call: N).
LEAD_MIN_KV_PER_Q = 2


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_lead(
    sh: AttnShape, head_group: int, n_blocks: int, kv_programs: bool, device: torch.device
) -> int:
    """Blocks of every head the dQ (or, ``kv_programs``, dK/dV) kernel launches ahead of its head groups
    (``_launch_coords_lead``): enough of each head's most-work blocks to fill ``LEAD_SM_FRACTION`` of the
    SMs, so every head's longest rows start in the first wave; 0 when one group holds every head (the order
    is then longest-first across all heads already) or the call has fewer than ``LEAD_MIN_KV_PER_Q`` keys
    per query. Shape-only (no mask read, traceable).

    Why: a CP rank's all-gather call has 1/N of the query tiles with rows as long as on one GPU, so with the
    L2-sized groups (``launch_head_group``) its last group's longest rows ran on after every other program.
    In the 8-rank simulation (bench/results/2026-11-26-s16, call 3) the lead took the slowest rank's dQ from
    1.08-1.10x the mean to 1.02-1.04x and the whole backward 0.7-2.0% faster. On one GPU (keys = queries)
    it made dQ 4-8% slower (the lead rows of every head stream their K/V at once, against the groups' L2
    reuse) and had no tail to remove, hence the key-per-query floor. All heads in one group instead (s15,
    ``--head-group all``) lost more to L2 misses than it won.
    """
    n_heads = sh.B * (sh.Hkv if kv_programs else sh.Hq)
    if head_group >= n_heads or LEAD_SM_FRACTION <= 0 or sh.Skv < LEAD_MIN_KV_PER_Q * sh.Sq:
        return 0
    sms = _sm_count(device.index or 0) if device.type == "cuda" else DEFAULT_SMS
    return min(n_blocks, math.ceil(sms * LEAD_SM_FRACTION / n_heads))


def check_head_group(head_group: int | None) -> None:
    if head_group is not None and (not isinstance(head_group, int) or head_group < 1):
        raise ValueError(f"head_group must be a positive int or None, got {head_group!r}")


def use_autotune(q: torch.Tensor, km: KernelMask, Sq: int, Skv: int) -> bool:
    return q.is_cuda and km.QBS % 128 == 0 and km.KBS % 128 == 0 and Sq * Skv >= AUTOTUNE_MIN_PAIRS


_fwd_kernel_tuned = triton.autotune(configs=tune_configs(FWD_TUNE, "FMA"), key=TUNE_KEY)(_fwd_kernel)
# Tuning runs the kernel on the call's own arguments, once per config and benchmark repeat. A merging call
# (ACCUM) would fold its result into the running output / LSE that many times, so its tuner restores them
# after each run. (Eager only: torch.compile captures the plain tuner, and inductor benchmarks user kernels on copies of
# the arguments they mutate.)
_fwd_kernel_tuned_accum = triton.autotune(
    configs=tune_configs(FWD_TUNE, "FMA"), key=TUNE_KEY, restore_value=["O", "LSE"]
)(_fwd_kernel)


def tuned_choices() -> dict:
    """The configs the autotuners picked so far (for benchmark reports)."""
    from . import triton_bwd

    out = {}
    for name, tuner in (
        ("fwd", _fwd_kernel_tuned),
        ("dkdv", triton_bwd._dkdv_kernel_tuned),
        ("dq", triton_bwd._dq_kernel_tuned),
        ("fwd_accum", _fwd_kernel_tuned_accum),
        ("dkdv_accum", triton_bwd._dkdv_kernel_tuned_accum),
        ("dq_accum", triton_bwd._dq_kernel_tuned_accum),
    ):
        out[name] = {str(k[:10]): str(v) for k, v in getattr(tuner, "cache", {}).items()}
    return out


def prepare(
    q,
    k,
    v,
    block_mask,
    score_mod,
    scale,
    enable_gqa,
    q_global_idx,
    kv_global_idx,
    dense_block: int = 128,
    traceable: bool = False,
) -> Launch:
    shape = check_kernel_inputs(q, k, v, enable_gqa, score_mod)
    if traceable:
        # Traced with dynamic shapes, the sizes are SymInts; the launch needs them concrete anyway (grids,
        # EVEN_M/EVEN_N constexprs, tile choice), and the mask metadata cache hashes them. int() specialises
        # the compiled graph on them (a guard), as dynamic=False would.
        shape = AttnShape(*(int(x) for x in astuple(shape)))
    check_index_map("q_global_idx", q_global_idx, shape.Sq, q.device)
    check_index_map("kv_global_idx", kv_global_idx, shape.Skv, q.device)
    if traceable and block_mask is None:
        # the dense metadata is cached per shape at module level: no place for a tracer's tensors
        raise ValueError("traceable=True needs a block_mask (the traced op always passes one)")
    dev = q.device
    km = kernel_mask(block_mask, shape, dev, dense_block=dense_block)
    scale = shape.D**-0.5 if scale is None else float(scale)
    dummy = placeholder(dev, torch.float32, cached=not traceable)
    slopes = table = dummy
    table_stride, L, softcap, kind = 0, 1, 1.0, SCORE_NONE
    if isinstance(score_mod, SoftCap):
        kind, softcap = SCORE_SOFTCAP, float(score_mod.cap)
    elif isinstance(score_mod, ALiBi):
        kind = SCORE_ALIBI
        slopes = score_mod.slopes.detach().to(device=dev, dtype=torch.float32).contiguous()
    elif isinstance(score_mod, RelativeBias):
        kind = SCORE_RELBIAS
        table = score_mod.table.detach().to(device=dev, dtype=torch.float32).contiguous()
        table_stride, L = table.shape[1], score_mod.max_distance
    if kind == SCORE_NONE:
        # the kernels read global token indices only inside score mods: without one the maps are not
        # converted or passed (a CP ring step would pay two int32 copies per call for nothing)
        q_global_idx = kv_global_idx = None
    qidx = q_global_idx.to(device=dev, dtype=torch.int32).contiguous() if q_global_idx is not None else dummy
    kvidx = (
        kv_global_idx.to(device=dev, dtype=torch.int32).contiguous() if kv_global_idx is not None else dummy
    )
    even_m = shape.Sq % km.QBS == 0 and km.Qb * km.QBS == shape.Sq
    even_n = shape.Skv % km.KBS == 0 and km.KVb * km.KBS == shape.Skv
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return Launch(
        shape, km, scale, kind, slopes, table, table_stride, L, softcap, qidx, kvidx,
        q_global_idx is not None, kv_global_idx is not None, even_m, even_n, prec,
        q.device.type == "cpu" and q.dtype == torch.bfloat16, dummy,
        placeholder(dev, torch.int32, cached=not traceable),
    )  # fmt: skip


def check_accumulators(
    out_acc, lse_acc, sh: AttnShape, device: torch.device, dtype: torch.dtype = torch.float32
) -> None:
    """Running-result buffers of ``out_acc=`` / ``lse_acc=``: both given, fp32 (fp64 for the reference on
    fp64 inputs), this call's shapes, unit-stride rows."""
    if out_acc is None or lse_acc is None:
        raise ValueError("out_acc and lse_acc must be given together (the running output and its LSE)")
    for name, t, want in (
        ("out_acc", out_acc, (sh.B, sh.Hq, sh.Sq, sh.Dv)),
        ("lse_acc", lse_acc, (sh.B, sh.Hq, sh.Sq)),
    ):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(
                f"{name} must be {str(dtype).replace('torch.', '')} (the merge precision), got {t.dtype}"
            )
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if out_acc.stride(-1) != 1 or not lse_acc.is_contiguous():
        raise ValueError("out_acc needs a unit last-dim stride and lse_acc must be contiguous")


def check_tma_operand(name: str, t: torch.Tensor, row: int) -> None:
    """TMA's rules for K / V read through device-side tensor descriptors (``config``'s tma flag): the base
    of each program's ``[Skv, row]`` slice (``data_ptr + b·stride_b + h·stride_h``) 16-byte aligned, every
    stride but the unit last one a multiple of 16 bytes, and a row of at least 16 bytes. The flag is an
    explicit request, so a tensor that breaks them is an error rather than a silent fallback."""
    es = t.element_size()
    problems = []
    if t.data_ptr() % 16:
        problems.append(f"data_ptr {t.data_ptr():#x} is {t.data_ptr() % 16} bytes past a 16-byte boundary")
    # a size-1 batch or head dim is never stepped, so its stride does not reach an address
    for dim, what in ((0, "batch"), (1, "head"), (2, "row")):
        if (t.shape[dim] > 1 or dim == 2) and (t.stride(dim) * es) % 16:
            problems.append(f"{what} stride {t.stride(dim)} × {es} B is not a multiple of 16 bytes")
    if row * es < 16:
        problems.append(f"a row of {row} × {es} B is under 16 bytes")
    if problems:
        raise ValueError(
            f"config asks for TMA loads, but {name} (shape {tuple(t.shape)}, strides {tuple(t.stride())}, "
            f"{t.dtype}) breaks TMA's alignment rules: {'; '.join(problems)}. Pass a contiguous, 16-byte "
            "aligned tensor, or a config without tma."
        )


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Device-side descriptors are written into global scratch memory that Triton asks the launcher for.
    # The kernel runs on the current CUDA device, so the scratch is allocated there (the caching allocator
    # aligns far beyond the 128 bytes descriptors need).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def check_out(out: torch.Tensor, sh: AttnShape, device: torch.device) -> None:
    """The ``out=`` write target: this call's output shape ``[B, Hq, Sq, Dv]``, a floating dtype, q's device
    and a unit last-dim stride; its other strides are free (a head slice ``big[:, h0:h1]`` of a larger
    tensor is written in place)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    want = (sh.B, sh.Hq, sh.Sq, sh.Dv)
    if tuple(out.shape) != want:
        raise ValueError(f"out must have shape {want} ([B, Hq, Sq, Dv]), got {tuple(out.shape)}")
    if not out.dtype.is_floating_point:
        raise ValueError(f"out must have a floating dtype, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but q is on {device}")
    if out.stride(-1) != 1:
        raise ValueError(f"out needs a unit last-dim stride, got strides {out.stride()}")


def forward_buffers(
    q: torch.Tensor,
    sh: AttnShape,
    out: torch.Tensor | None,
    out_acc: torch.Tensor | None,
    lse_acc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool]:
    """The forward kernels' write targets, checked: ``(out, lse, prev, accum, acc_to_out)``. ``prev`` is the
    running output an accumulating call merges with (``out_acc``; not read otherwise); with ``out_acc`` and
    no ``out`` the merge goes back into ``out_acc``, with both into ``out`` (``triton_forward``'s contract)."""
    accum = out_acc is not None or lse_acc is not None
    to_out = accum and out is not None
    if accum:
        check_accumulators(out_acc, lse_acc, sh, q.device)
        if to_out:
            check_out(out, sh, q.device)
        else:
            out = out_acc
        return out, lse_acc, out_acc, True, to_out
    # (non-accumulate epilogue: every program stores its whole tile through out's strides, zeros for rows
    # that see nothing, and the launch order covers every query block in use: no pre-fill needed)
    if out is None:
        out = torch.empty(sh.B, sh.Hq, sh.Sq, sh.Dv, dtype=q.dtype, device=q.device)
    else:
        check_out(out, sh, q.device)
    lse = torch.empty(sh.B, sh.Hq, sh.Sq, dtype=torch.float32, device=q.device)
    return out, lse, out, False, False


def meta_args(km: KernelMask, transposed: bool, dummy_i: torch.Tensor):
    """(NUM, IDX, FULL_NUM, FULL_IDX, PID, num strides (b, h), idx strides (b, h, row))."""
    if transposed:
        num, idx, fnum, fidx, pid = km.q_num, km.q_idx, km.full_q_num, km.full_q_idx, km.q_pid
    else:
        num, idx, fnum, fidx, pid = km.kv_num, km.kv_idx, km.full_kv_num, km.full_kv_idx, km.kv_pid
    snb = num.stride(0) if km.Bm > 1 else 0
    snh = num.stride(1) if km.Hm > 1 else 0
    sib = idx.stride(0) if km.Bm > 1 else 0
    sih = idx.stride(1) if km.Hm > 1 else 0
    siq = idx.stride(2)
    order = km.kv_order if transposed else km.q_order
    sor_b = order.stride(0) if km.Bm > 1 else 0
    sor_h = order.stride(1) if km.Hm > 1 else 0
    return (
        num,
        idx,
        fnum if fnum is not None else num,
        fidx if fidx is not None else idx,
        pid if pid is not None else dummy_i,
        snb,
        snh,
        sib,
        sih,
        siq,
        order,
        sor_b,
        sor_h,
    )


def doc_args(km: KernelMask, dummy_i: torch.Tensor):
    if km.mask_kind != MASK_DOC:
        return (dummy_i, dummy_i, dummy_i, dummy_i, dummy_i, 0, 0, 0), (False, False, False)
    d = km.doc
    pre = d["kv_pre"] if d["kv_pre"] is not None else dummy_i
    return (
        (d["q_doc"], d["kv_doc"], d["q_pos"], d["kv_pos"], pre, d["stride_b"], d["stride_bk"], d["window"]),
        (d["causal"], d["window"] > 0, d["kv_pre"] is not None),
    )


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask=None,
    score_mod=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_global_idx: torch.Tensor | None = None,
    kv_global_idx: torch.Tensor | None = None,
    config: tuple | None = None,
    out_acc: torch.Tensor | None = None,
    lse_acc: torch.Tensor | None = None,
    traceable: bool = False,
    head_group: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward: ``(out [B,Hq,Sq,Dv] q.dtype, lse [B,Hq,Sq] fp32 natural log)``.

    With ``out_acc`` / ``lse_acc`` (fp32, the running result of earlier calls over other keys; start from
    zeros / −inf), this call's result is merged into them in place by LSE, and they are returned.
    ``out``: write target instead of a new tensor (``[B,Hq,Sq,Dv]``, any float dtype, unit last-dim stride,
    other strides free, e.g. a head slice of a larger tensor); the kernel stores every row of it (0 for a
    row that sees nothing), from its fp32 accumulator straight in ``out``'s dtype, and returns it with a new
    ``lse``. With ``out_acc`` / ``lse_acc`` as well, the merged result goes to ``out`` instead of back into
    ``out_acc`` (which is only read; ``lse_acc`` is updated in place) and ``(out, lse_acc)`` is returned: the
    last merge of a running result written straight as the output, with no fp32 → ``out`` dtype pass.
    It must not overlap q, k, v or ``out_acc``.
    ``config``: ``(BLOCK_M, BLOCK_N, warps, stages[, fma_softmax[, tma[, warp_specialize[, pipe_qk]]]])``
    instead of the defaults / the autotuner (which never uses the last three). ``tma``: K and V tiles are
    loaded through device-side TMA descriptors (k and v must then meet TMA's alignment rules, see
    ``check_tma_operand``; on CUDA a Triton allocator for the descriptors' scratch memory is installed at
    the launch).
    ``warp_specialize``: Triton's automatic warp specialization of the kv loop; only with ``tma``. On
    triton 3.6 / H200 (``bench/results/2026-11-26-s10/call1``) it fails to compile at 4 warps and leaves the
    loop unspecialized at 8; TMA alone gains 2–3% at 8 warps with 128 × 128 tiles and loses at 4 warps.
    ``pipe_qk``: the kv loop computes the next sub-tile's QK^T before this one's softmax and P·V (after
    FlashAttention-3's intra-warpgroup overlap: on Hopper the asynchronous wgmma of the next scores could run
    under the softmax); same math and accumulation order as the plain loop. Not with ``tma`` (nor so with
    ``warp_specialize``). Slower on triton 3.6 / H100 (``bench/results/2026-11-26-s12/call1``, 32k, FMA
    softmax): 128 × 64 tiles at 4 warps 2.12 → 3.53 ms (document, mean 4k) and 12.2 → 23.2 ms (causal);
    128 × 128 at 8 warps 2.21 → 2.37 ms (document) and out of shared memory (causal). Triton's wgmma pass
    waits on the early QK^T right after issuing it (it keeps a dot in flight only when the previous result
    is read by another dot or after a wait), so nothing overlaps; kept opt-in for a Triton that does.
    ``traceable``: launch through ``torch.library.wrap_triton`` with per-call placeholders (the body of a
    ``torch.library.triton_op``, traced with FakeTensors under torch.compile); needs compiled (JIT) kernels.
    ``head_group``: heads per launch group (see ``launch_head_group``; None: its choice).
    """
    if traceable and not kernels_are_compiled():
        raise ValueError("traceable=True needs compiled Triton kernels, not TRITON_INTERPRET=1's interpreter")
    check_head_group(head_group)
    on_gpu = q.is_cuda
    cfg = config or fwd_config(q.shape[-1], on_gpu)
    tma = len(cfg) > 5 and bool(cfg[5])
    ws = len(cfg) > 6 and bool(cfg[6])
    if ws and not tma:
        # Hopper's automatic warp specialization partitions around asynchronous (TMA) loads
        raise ValueError(f"config {tuple(cfg)}: warp_specialize (7th entry) needs tma (6th entry) set too")
    pipe = len(cfg) > 7 and bool(cfg[7])
    if pipe and tma:
        # the pipelined loop loads K / V with tl.load; it has not been written for descriptor loads
        raise ValueError(
            f"config {tuple(cfg)}: pipe_qk (8th entry) cannot be combined with tma (6th entry); "
            "drop one of them"
        )
    lp = prepare(
        q, k, v, block_mask, score_mod, scale, enable_gqa, q_global_idx, kv_global_idx,
        dense_block=128 if on_gpu else 64, traceable=traceable,
    )  # fmt: skip
    sh, km = lp.shape, lp.km
    BM = pick_tile(km.QBS, cfg[0], "query")
    BN = pick_tile(km.KBS, cfg[1], "kv")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if tma:
        check_tma_operand("k", k, sh.D)
        check_tma_operand("v", v, sh.Dv)
        if on_gpu:
            # set at every such launch: Triton keeps the allocator in a context variable, which a thread
            # started later (an autograd or CP worker) does not inherit (inductor's launcher does the same)
            triton.set_allocator(_tma_scratch)
    out, lse, prev, accum, to_out = forward_buffers(q, sh, out, out_acc, lse_acc)
    dummy_i = lp.dummy_i
    n_qb = triton.cdiv(sh.Sq, km.QBS)  # query blocks in use (the BlockMask may list more)
    meta = meta_args(km, False, dummy_i)
    docs, (causal, has_w, has_pre) = doc_args(km, dummy_i)
    bits = km.bits if km.mask_kind == MASK_BITS else dummy_i
    args = (
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        prev, prev.stride(0), prev.stride(1), prev.stride(2),
        *meta, bits, *docs,
        lp.qidx, lp.kvidx, lp.slopes, lp.table, lp.table_stride, lp.L, lp.softcap,
        sh.Hq, sh.groups, sh.Sq, sh.Skv, lp.scale, lp.scale * LOG2E,
        n_qb, sh.B * sh.Hq, head_group or launch_head_group(sh, k.element_size(), kv_programs=False),
    )  # fmt: skip
    consts = dict(
        D=sh.D, DV=sh.Dv, QBS=km.QBS, KBS=km.KBS, WORDS=km.words,
        MASK_KIND=km.mask_kind, SCORE_KIND=lp.score_kind, CAUSAL=causal, HAS_WINDOW=has_w,
        HAS_PREFIX=has_pre, HAS_QIDX=lp.has_qidx, HAS_KVIDX=lp.has_kvidx, HAS_FULL=km.has_full,
        PREC=lp.prec, UPCAST=lp.upcast, ACCUM=accum, ACC_TO_OUT=to_out,
    )  # fmt: skip
    # the FMA softmax scales the row max after taking it, which needs a positive scale
    if config is None and lp.scale > 0 and use_autotune(q, km, sh.Sq, sh.Skv):
        # every tuned tile divides the 128-multiple blocks, so EVEN_* only depends on the blocks
        grid = lambda meta: (n_qb * (km.QBS // meta["BLOCK_M"]) * sh.B * sh.Hq,)
        # (``wrap_triton(<module-level kernel name>)`` spelled out at each launch: torch.library.triton_op finds
        # the kernels of an op by reading its source for exactly this form, to key compile caches on them)
        if traceable:
            tuned = wrap_triton(_fwd_kernel_tuned)
            tuned[grid](*args, EVEN_M=lp.even_m, EVEN_N=lp.even_n, TMA=False, WS=False, PIPE=False, **consts)
        else:  # a tuned key launches with its config directly (tuned_launch.py: the autotuner's run is slow)
            tuned = _fwd_kernel_tuned_accum if accum else _fwd_kernel_tuned
            launch_tuned(
                tuned, grid, *args, EVEN_M=lp.even_m, EVEN_N=lp.even_n, TMA=False, WS=False, PIPE=False,
                **consts,
            )  # fmt: skip
    else:
        grid = (n_qb * (km.QBS // BM) * sh.B * sh.Hq,)
        kernel = wrap_triton(_fwd_kernel) if traceable else _fwd_kernel
        kernel[grid](
            *args, BLOCK_M=BM, BLOCK_N=BN, EVEN_M=lp.even_m and sh.Sq % BM == 0,
            EVEN_N=lp.even_n and sh.Skv % BN == 0, num_warps=cfg[2], num_stages=cfg[3],
            FMA=len(cfg) > 4 and bool(cfg[4]) and lp.scale > 0, TMA=tma, WS=ws, PIPE=pipe, **consts,
        )  # fmt: skip
    return out, lse
