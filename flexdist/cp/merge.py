"""Merging partial attention results by their log-sum-exp, in fp32, NaN-free for rows that see nothing.

On CUDA the merge is one fused Triton kernel, in place on the fp32 accumulator (one read of the accumulator
and the partial output, one write), instead of a chain of eager elementwise ops over ``[B, H, L, D]`` — under
ring attention the merge runs once per non-empty step, so its memory traffic is on the critical path.
Elsewhere (CPU) it is plain torch; both compute exactly the same formula.
"""

from __future__ import annotations

import os

import torch

from flexdist.kernels.reference import merge_by_lse

try:  # Triton is a dependency, but keep the CPU path importable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if triton is not None:

    @triton.jit
    def _merge_kernel(ACC, LACC, O, LNEW, n_rows, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        la = tl.load(LACC + rows, mask=rmask, other=float("-inf"))
        lb = tl.load(LNEW + rows, mask=rmask, other=float("-inf")).to(tl.float32)
        m = tl.maximum(la, lb)
        m = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(la - m)
        wb = tl.exp(lb - m)
        s = wa + wb
        safe = tl.where(s > 0, s, 1.0)
        new_l = tl.where(s > 0, m + tl.log(safe), float("-inf"))
        ca = wa / safe
        cb = wb / safe
        cols = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            msk = rmask[:, None] & (c[None, :] < D)
            offs = rows[:, None] * D + c[None, :]
            a = tl.load(ACC + offs, mask=msk, other=0.0)
            o = tl.load(O + offs, mask=msk, other=0.0).to(tl.float32)
            tl.store(ACC + offs, a * ca[:, None] + o * cb[:, None], mask=msk)
        tl.store(LACC + rows, new_l, mask=rmask)


def _use_triton(out_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> bool:
    if triton is None or out_acc.dtype != torch.float32:
        return False
    on_gpu = out_acc.is_cuda or os.environ.get("FLEXDIST_MERGE_TRITON_CPU") == "1"
    return on_gpu and out.is_contiguous() and lse.is_contiguous() and out_acc.is_contiguous()


def _merge_torch(out_acc, lse_acc, o, l):
    return merge_by_lse(out_acc, lse_acc, o, l)


def merge_into(
    out_acc: torch.Tensor | None,
    lse_acc: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one partial ``(out [B,H,S,D], lse [B,H,S])`` into the running fp32 ``(out_acc, lse_acc)``.

    ``lse_new = m + log(exp(lse_acc - m) + exp(lse - m))`` with ``m`` the row max (0 where both are −inf, so
    no ``-inf - -inf``); each part is weighted by ``exp(lse_i - lse_new)``, 0 for a −inf part. A row that
    sees nothing in every step keeps output 0 and LSE −inf. The first call allocates the accumulator; later
    calls may update it in place (callers must treat the returned tensors as the new state).
    """
    dt = _acc_dtype(out.dtype)
    if out_acc is None:
        l = lse.to(dt)
        o = out.to(dt)
        # a row that saw nothing has out 0 from the kernel; force exact zeros anyway
        o = torch.where(torch.isneginf(l)[..., None], torch.zeros_like(o), o)  # a new tensor
        return o.contiguous(), l.clone(memory_format=torch.contiguous_format)  # never alias the input
    if _use_triton(out_acc, out, lse):
        n_rows = lse_acc.numel()
        D = out_acc.shape[-1]
        ROWS = 16
        BLOCK_D = min(128, triton.next_power_of_2(D))
        _merge_kernel[(triton.cdiv(n_rows, ROWS),)](
            out_acc, lse_acc, out, lse.float().contiguous(), n_rows, D, ROWS=ROWS, BLOCK_D=BLOCK_D
        )
        return out_acc, lse_acc
    return _merge_torch(out_acc, lse_acc, out, lse.to(dt))


def merge_all(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a list of partial results (used by the simulation benchmark and the merge tests)."""
    o, l = None, None
    for oi, li in zip(outs, lses, strict=True):
        o, l = merge_into(o, l, oi, li)
    return o, l
