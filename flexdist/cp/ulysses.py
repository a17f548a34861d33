"""Ulysses (head-parallel) CP attention: all-to-all from sequence shards to head shards and back.

Rank r trades its ``[B, H, S/N, D]`` sequence shard for ``[B, H/N, S, D]`` — heads ``[r·H/N, (r+1)·H/N)`` of
the whole sequence — attends with the single global mask (every rank does the same amount of work whatever
the sharding), and trades the output back. Composed of differentiable all-to-alls, a reorder into global
token order, and one single-device attention call with LSE, so autograd runs the exact reverse. Needs Hq and
Hkv divisible by N; score mods with per-head parameters are sliced to the rank's heads (built-in SoftCap,
ALiBi, RelativeBias; gradients of a RelativeBias table flow back through the slice).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .head_slice import slice_score_mod
from .merge import _acc_dtype


def _a2a(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over dim 0 (equal splits)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous (empty_like keeps x's strides)
    dist.all_to_all_single(out, x, group=group)
    return out


def _heads_to_seq(x: torch.Tensor, group, N: int) -> torch.Tensor:
    B, H, L, D = x.shape
    parts = x.reshape(B, N, H // N, L, D).permute(1, 0, 2, 3, 4)  # [dest, B, h, L, D]
    got = _a2a(parts, group)  # [src, B, h, L, D]
    return got.permute(1, 2, 0, 3, 4).reshape(B, H // N, N * L, D)  # plan order


def _seq_to_heads(y: torch.Tensor, group, N: int) -> torch.Tensor:
    B, h, S, D = y.shape
    L = S // N
    parts = y.reshape(B, h, N, L, D).permute(2, 0, 1, 3, 4)  # [dest rank = seq shard, B, h, L, D]
    got = _a2a(parts, group)  # [src = head group, B, h, L, D]
    return got.permute(1, 0, 2, 3, 4).reshape(B, N * h, L, D)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, N):
        ctx.group, ctx.N = group, N
        return _heads_to_seq(x, group, N)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group, ctx.N), None, None


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, N):
        ctx.group, ctx.N = group, N
        return _seq_to_heads(y, group, N)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group, ctx.N), None, None


class _LocalAttention(torch.autograd.Function):
    """One single-device kernel call (forward and backward) returning out and LSE, both differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, mask, score_mod, scale, fns, *params):
        fwd, _, extra = fns
        kw = dict(score_mod=score_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **extra)
        out, lse = fwd(q, k, v, mask, **kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.score_mod, ctx.scale, ctx.fns, ctx.n = mask, score_mod, scale, fns, len(params)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        _, bwd, extra = ctx.fns
        if dout is None:
            dout = torch.zeros_like(out)
        acc = _acc_dtype(q.dtype)
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse).to(acc)
        sm = ctx.score_mod
        params = tuple(sm.tensors()) if sm is not None and hasattr(sm, "tensors") else ()
        grads = [torch.zeros_like(p) for p in params] if any(p.requires_grad for p in params) else None
        kw = dict(score_mod=sm, scale=ctx.scale, enable_gqa=q.shape[1] != k.shape[1], delta=delta, **extra)
        if grads is not None:
            kw["score_mod_grads"] = grads
        dq, dk, dv = bwd(q, k, v, out, dout, lse, ctx.mask, **kw)
        pg = tuple(grads) if grads is not None else (None,) * ctx.n
        return (dq, dk, dv, None, None, None, None, *pg)


def ulysses_attention(q, k, v, plan, score_mod, scale, fns: tuple[Callable, Callable, dict]):
    N, r = plan.world_size, plan.rank
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % N or Hkv % N:
        raise ValueError(
            f"strategy='ulysses' needs query and key/value heads divisible by the CP world size: Hq={Hq}, "
            f"Hkv={Hkv}, N={N}"
        )
    dev = q.device
    _, full_mask = plan.masks_on(dev)
    sm = slice_score_mod(score_mod, r * Hq // N, (r + 1) * Hq // N, "ulysses")
    inv, perm = plan.inv_perm.to(dev), plan.perm.to(dev)
    if N > 1:
        qh, kh, vh = (_HeadsToSeq.apply(t, plan.group, N) for t in (q, k, v))
    else:
        qh, kh, vh = q, k, v
    qh, kh, vh = (t.index_select(2, inv) for t in (qh, kh, vh))  # global token order
    params = tuple(sm.tensors()) if sm is not None and hasattr(sm, "tensors") else ()
    out_h, lse_h = _LocalAttention.apply(qh, kh, vh, full_mask, sm, scale, fns, *params)
    out_h = out_h.index_select(2, perm)
    lse_h = lse_h.index_select(2, perm)
    if N == 1:
        return out_h, lse_h
    out = _SeqToHeads.apply(out_h, plan.group, N)
    lse = _SeqToHeads.apply(lse_h.unsqueeze(-1), plan.group, N).squeeze(-1)
    return out, lse
