"""The all-gather strategy's layout copies: K|V into the token-major gather layout, fp32 dK|dV back out.

``strategy="allgather"`` gathers each chunk of K/V heads as one token-major buffer ``[B, L, hc, D + Dv]`` (see
`flexdist.cp.allgather`), so the gathered sequence is a strided view with no reorder. Getting there from the
model's head-major ``[B, H, L, D]`` K and V is a transposing copy, and so is the way back for the reduced
fp32 dK/dV. ``Tensor.copy_`` does them with per-element index math and 2-byte accesses: on an H200 the pack
of one 4-head chunk at 8k tokens (16 MiB of K and V) took 0.033 ms, about 1 TB/s, and with local_first at
N = 8 the packs were 0.065 ms of a 2.77 ms forward (``bench/results/2026-11-26-s8/call3``). These Triton
kernels move whole head rows (``D`` contiguous elements) per program, one launch for K and V together.

On CUDA (or on CPU under ``TRITON_INTERPRET=1``, how the tests check them against the torch path) with
power-of-two head dims the kernels run; elsewhere the same copies go through torch.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is a dependency, but keep the CPU (torch) path importable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

# Tokens per program: 64 rows of D = 128 bf16 is 16 KiB of K and 16 KiB of V in flight per program.
_BLOCK_L = 64


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def use_kernels(*tensors: torch.Tensor, backend: str = "auto") -> bool:
    """Whether the Triton copies apply: Triton importable, CUDA tensors (or CPU under the interpreter),
    head dims powers of two >= 16 (``tl.arange`` sizes), unit last-dim strides, one dtype for K and V.
    ``backend``: "auto" (those conditions), "torch" (never: the benchmarks' baseline) or "triton" (an error
    naming the failed condition instead of the fallback)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return False
    why = _why_not(tensors)
    if why and backend == "triton":
        raise ValueError(f"kv_pack backend='triton' cannot run here: {why}")
    return not why


def _why_not(tensors: tuple[torch.Tensor, ...]) -> str:
    if triton is None:
        return "triton is not importable"
    dev = tensors[0].device
    if dev.type != "cuda" and not (dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"tensors on {dev} (CUDA, or CPU with TRITON_INTERPRET=1)"
    dims = [t.shape[-1] for t in tensors]
    if not all(_pow2(d) for d in dims):
        return f"head dims {dims} must be powers of two >= 16"
    if any(t.stride(-1) != 1 for t in tensors):
        return f"last-dim strides {[t.stride(-1) for t in tensors]} must be 1"
    if len({t.dtype for t in tensors}) > 1:
        return f"dtypes {[t.dtype for t in tensors]} differ"
    return ""


if triton is not None:

    @triton.jit
    def _pack_kernel(
        K, V, OUT, L, H0,
        skb, skh, skl, svb, svh, svl, sob, sol, soh,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        # one program: BLOCK_L tokens of one (batch, chunk head); OUT[b, l, h, :D] = K[b, H0 + h, l], then V
        pid_l, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        ok = rows[:, None] < L
        dk, dv = tl.arange(0, D), tl.arange(0, DV)
        hk = (H0 + h).to(tl.int64)
        b64, r64 = b.to(tl.int64), rows.to(tl.int64)[:, None]
        o = OUT + b64 * sob + h.to(tl.int64) * soh + r64 * sol
        k = tl.load(K + b64 * skb + hk * skh + r64 * skl + dk[None, :], mask=ok)
        tl.store(o + dk[None, :], k, mask=ok)
        v = tl.load(V + b64 * svb + hk * svh + r64 * svl + dv[None, :], mask=ok)
        tl.store(o + D + dv[None, :], v, mask=ok)

    @triton.jit
    def _unpack_kernel(
        SRC, DK, DV_, L, H0,
        ssb, ssl, ssh, skb, skh, skl, svb, svh, svl,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        # the reverse, with the cast to dK / dV's dtype: DK[b, H0 + h, l] = SRC[b, l, h, :D], DV_ from the rest
        pid_l, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        ok = rows[:, None] < L
        dk, dv = tl.arange(0, D), tl.arange(0, DV)
        hk = (H0 + h).to(tl.int64)
        b64, r64 = b.to(tl.int64), rows.to(tl.int64)[:, None]
        s = SRC + b64 * ssb + h.to(tl.int64) * ssh + r64 * ssl
        x = tl.load(s + dk[None, :], mask=ok)
        tl.store(DK + b64 * skb + hk * skh + r64 * skl + dk[None, :], x.to(DK.dtype.element_ty), mask=ok)
        y = tl.load(s + D + dv[None, :], mask=ok)
        tl.store(DV_ + b64 * svb + hk * svh + r64 * svl + dv[None, :], y.to(DV_.dtype.element_ty), mask=ok)


def pack_kv(k: torch.Tensor, v: torch.Tensor, h0: int, h1: int, backend: str = "auto") -> torch.Tensor:
    """K|V of heads ``h0:h1`` token-major, ``[B, L, h1 - h0, D + Dv]`` (a new contiguous tensor).

    ``k`` / ``v``: ``[B, Hkv, L, D]`` / ``[B, Hkv, L, Dv]``. ``backend``: see `use_kernels`.
    """
    B, Hkv, L, D = k.shape
    Dv = v.shape[-1]
    if not 0 <= h0 < h1 <= Hkv:
        raise ValueError(f"pack_kv heads h0={h0}, h1={h1} must satisfy 0 <= h0 < h1 <= Hkv={Hkv}")
    buf = torch.empty(B, L, h1 - h0, D + Dv, dtype=k.dtype, device=k.device)
    if use_kernels(k, v, backend=backend):
        grid = (triton.cdiv(L, _BLOCK_L), h1 - h0, B)
        _pack_kernel[grid](
            k, v, buf, L, h0,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            buf.stride(0), buf.stride(1), buf.stride(2),
            D=D, DV=Dv, BLOCK_L=_BLOCK_L,
        )  # fmt: skip
        return buf
    buf[..., :D].copy_(k[:, h0:h1].transpose(1, 2))
    buf[..., D:].copy_(v[:, h0:h1].transpose(1, 2))
    return buf


def unpack_dkv(src: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, h0: int, backend: str = "auto") -> None:
    """Write ``src`` (``[B, L, hc, D + Dv]``, e.g. this rank's reduced fp32 dK|dV of one chunk) into heads
    ``h0:h0 + hc`` of ``dk`` / ``dv`` (``[B, Hkv, L, D]`` / ``[..., Dv]``), cast to their dtype."""
    B, L, hc, E = src.shape
    D, Dv = dk.shape[-1], dv.shape[-1]
    if D + Dv != E or h0 + hc > dk.shape[1] or dk.shape[2] != L:
        raise ValueError(
            f"unpack_dkv: src {tuple(src.shape)} does not fit heads {h0}:{h0 + hc} of dk {tuple(dk.shape)} "
            f"and dv {tuple(dv.shape)}"
        )
    if use_kernels(dk, dv, backend=backend):
        src = src if src.stride(-1) == 1 else src.contiguous()
        grid = (triton.cdiv(L, _BLOCK_L), hc, B)
        _unpack_kernel[grid](
            src, dk, dv, L, h0,
            src.stride(0), src.stride(1), src.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            D=D, DV=Dv, BLOCK_L=_BLOCK_L,
        )  # fmt: skip
        return
    dk[:, h0 : h0 + hc] = src[..., :D].transpose(1, 2)
    dv[:, h0 : h0 + hc] = src[..., D:].transpose(1, 2)
