"""The all-gather's K/V pack and its dK/dV unpack: one Triton copy each way, with the torch copies beside it.

``pack(k, v, h0, h1)`` writes heads ``h0:h1`` of ``k`` ``[B, Hkv, L, D]`` and ``v`` ``[B, Hkv, L, Dv]`` (any
strides, last dim contiguous) token-major into one ``[B, L, hc, D + Dv]`` buffer: the all-gather's input, so
one collective moves K and V and the gathered buffer is the whole sequence in plan order (see allgather.py).
``unpack(buf, dk, dv, h0)`` is the reverse for the backward: the reduce-scatter's fp32 ``[B, L, hc, D + Dv]``
into the head slices ``dk[:, h0:h0 + hc]``, ``dv[:, h0:h0 + hc]``, cast to their dtype.

Why a kernel: with torch the pack is an ``empty`` and two strided ``copy_`` s (the unpack two more), each a
separate launch of TensorIterator's general strided copy. In ``bench_cp_sim`` at N = 8 (H100, s10 call 4)
the packs of ``head_chunks=2`` took 0.13 ms of a 2.8 ms forward, about 16 µs of memory traffic at copy
bandwidth. One launch that moves ``[BLOCK_L, D]`` tiles of both tensors per program does the same work.

The kernel runs where the attention kernels' ``backend="auto"`` runs Triton (``resolve_backend``): on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the CPU tests); elsewhere the torch copies (``pack_torch`` /
``unpack_torch``, the reference). ``use_triton`` forces either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdist.kernels import resolve_backend

BLOCK_L = 64  # tokens per program: [64, 128] bf16 tiles, 16 KiB of K and of V in flight per program


@triton.jit
def _kv_pack_kernel(
    K,
    V,
    BUF,
    L,
    hc,
    h0,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sbb,
    sbl,
    sbh,
    D: tl.constexpr,
    DV: tl.constexpr,
    D_P2: tl.constexpr,
    DV_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    UNPACK: tl.constexpr,
):
    """One program: ``BLOCK`` tokens of one (batch, head) between K/V ``[B, H, L, D]`` and ``[B, L, hc, E]``."""
    pid_l = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // hc).to(tl.int64)
    h = (bh % hc).to(tl.int64)
    offs_l = (pid_l * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rows = offs_l[:, None] < L
    offs_d = tl.arange(0, D_P2)
    offs_dv = tl.arange(0, DV_P2)
    kp = K + b * skb + (h0 + h) * skh + offs_l[:, None] * skl + offs_d[None, :]
    vp = V + b * svb + (h0 + h) * svh + offs_l[:, None] * svl + offs_dv[None, :]
    bp = BUF + b * sbb + offs_l[:, None] * sbl + h * sbh
    mk = rows & (offs_d[None, :] < D)
    mv = rows & (offs_dv[None, :] < DV)
    if UNPACK:
        tl.store(kp, tl.load(bp + offs_d[None, :], mask=mk).to(K.dtype.element_ty), mask=mk)
        tl.store(vp, tl.load(bp + D + offs_dv[None, :], mask=mv).to(V.dtype.element_ty), mask=mv)
    else:
        tl.store(bp + offs_d[None, :], tl.load(kp, mask=mk).to(BUF.dtype.element_ty), mask=mk)
        tl.store(bp + D + offs_dv[None, :], tl.load(vp, mask=mv).to(BUF.dtype.element_ty), mask=mv)


def _launch(k: torch.Tensor, v: torch.Tensor, buf: torch.Tensor, h0: int, unpack: bool) -> None:
    B, L, hc, _ = buf.shape
    D, Dv = k.shape[-1], v.shape[-1]
    grid = (triton.cdiv(L, BLOCK_L), B * hc)
    _kv_pack_kernel[grid](
        k, v, buf, L, hc, h0,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        buf.stride(0), buf.stride(1), buf.stride(2),
        D=D, DV=Dv, D_P2=triton.next_power_of_2(D), DV_P2=triton.next_power_of_2(Dv), BLOCK=BLOCK_L,
        UNPACK=unpack,
    )  # fmt: skip


def _kernel_ok(use_triton: bool | None, *ts: torch.Tensor) -> bool:
    """Whether the kernel runs: asked for (default: where ``backend="auto"`` runs Triton), last dims contiguous."""
    if use_triton is None:
        use_triton = all(resolve_backend("auto", t) == "triton" for t in ts)
    return use_triton and all(t.stride(-1) == 1 for t in ts)


def _new_buffer(k: torch.Tensor, v: torch.Tensor, h0: int, h1: int) -> torch.Tensor:
    B, _, L, D = k.shape
    return torch.empty(B, L, h1 - h0, D + v.shape[-1], dtype=k.dtype, device=k.device)


def pack_torch(k: torch.Tensor, v: torch.Tensor, h0: int, h1: int) -> torch.Tensor:
    """Reference pack: ``[B, L, hc, D + Dv]`` from two strided copies."""
    buf, D = _new_buffer(k, v, h0, h1), k.shape[-1]
    buf[..., :D].copy_(k[:, h0:h1].transpose(1, 2))
    buf[..., D:].copy_(v[:, h0:h1].transpose(1, 2))
    return buf


def pack(k: torch.Tensor, v: torch.Tensor, h0: int, h1: int, use_triton: bool | None = None) -> torch.Tensor:
    """K|V of heads ``h0:h1``, token-major ``[B, L, hc, D + Dv]`` in k's dtype (the all-gather's input)."""
    if not _kernel_ok(use_triton, k, v):
        return pack_torch(k, v, h0, h1)
    buf = _new_buffer(k, v, h0, h1)
    _launch(k, v, buf, h0, unpack=False)
    return buf


def unpack_torch(buf: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, h0: int) -> None:
    """Reference unpack: ``dk[:, h0:h0+hc]``, ``dv[:, h0:h0+hc]`` = the buffer's halves (cast)."""
    D, hc = dk.shape[-1], buf.shape[2]
    dk[:, h0 : h0 + hc] = buf[..., :D].transpose(1, 2)
    dv[:, h0 : h0 + hc] = buf[..., D:].transpose(1, 2)


def unpack(
    buf: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, h0: int, use_triton: bool | None = None
) -> None:
    """Write ``buf`` ``[B, L, hc, D + Dv]`` into heads ``h0:h0+hc`` of ``dk`` / ``dv``, cast to their dtype."""
    if buf.shape[-1] != dk.shape[-1] + dv.shape[-1] or buf.shape[2] > dk.shape[1] - h0:
        raise ValueError(
            f"unpack: buf {tuple(buf.shape)} does not hold heads {h0}:{h0 + buf.shape[2]} of dk "
            f"{tuple(dk.shape)} / dv {tuple(dv.shape)}"
        )
    if not _kernel_ok(use_triton, buf, dk, dv):
        unpack_torch(buf, dk, dv, h0)
        return
    _launch(dk, dv, buf, h0, unpack=True)
