"""Merging partial attention results by their log-sum-exp, in fp32, NaN-free for rows that see nothing.

The ring and direct strategies merge inside the kernel (``flex_attention_forward(..., out_acc=, lse_acc=)``,
the same formula in the epilogue); these torch helpers merge separately computed partial results (tests,
simulations, callers with their own partial outputs).
"""

from __future__ import annotations

import torch

from flexdist.kernels.reference import merge_by_lse


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_into(
    out_acc: torch.Tensor | None,
    lse_acc: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one partial ``(out [B,H,S,D], lse [B,H,S])`` into the running fp32 ``(out_acc, lse_acc)``.

    ``lse_new = m + log(exp(lse_acc - m) + exp(lse - m))`` with ``m`` the row max (0 where both are −inf, so
    no ``-inf - -inf``); each part is weighted by ``exp(lse_i - lse_new)``, 0 for a −inf part. A row that
    sees nothing in every step keeps output 0 and LSE −inf. The first call allocates the accumulator; the
    returned tensors are the new state (never aliases of ``out`` / ``lse``).
    """
    dt = _acc_dtype(out.dtype)
    if out_acc is None:
        l = lse.to(dt)
        o = out.to(dt)
        # a row that saw nothing has out 0 from the kernel; force exact zeros anyway
        o = torch.where(torch.isneginf(l)[..., None], torch.zeros_like(o), o)  # a new tensor
        return o.contiguous(), l.clone(memory_format=torch.contiguous_format)  # never alias the input
    return merge_by_lse(out_acc, lse_acc, out, lse.to(dt))


def merge_all(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a list of partial results in order."""
    o, l = None, None
    for oi, li in zip(outs, lses, strict=True):
        o, l = merge_into(o, l, oi, li)
    return o, l
