"""Merging partial attention results by their log-sum-exp, in fp32, NaN-free for rows that see nothing."""

from __future__ import annotations

import torch


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
    sees nothing in every step keeps output 0 and LSE −inf.
    """
    dt = _acc_dtype(out.dtype)
    o = out.to(dt)
    l = lse.to(dt)
    if out_acc is None:
        # a row that saw nothing has out 0 from the kernel; force exact zeros anyway
        return torch.where(torch.isneginf(l)[..., None], torch.zeros_like(o), o), l.clone()
    m = torch.maximum(lse_acc, l)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.exp(lse_acc - m)
    wb = torch.exp(l - m)
    s = wa + wb
    new_lse = m + torch.log(s)  # -inf where both are empty
    safe = torch.where(s > 0, s, torch.ones_like(s))
    out_acc = out_acc * (wa / safe)[..., None] + o * (wb / safe)[..., None]
    return out_acc, new_lse


def merge_all(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a list of partial results (used by the simulation benchmark and the merge tests)."""
    o, l = None, None
    for oi, li in zip(outs, lses, strict=True):
        o, l = merge_into(o, l, oi, li)
    return o, l
