"""Differentiable context-parallel attention over a `Plan` (ring or all-gather), exact vs one device.

``flexdist.cp.attention(q, k, v, plan)`` takes this rank's local shards ``[B, H, S/N, D]`` (in the plan's
local token order, i.e. ``plan.shard(x, dim=2)``) and returns the local output (and the global LSE when
``return_lse=True``). Forward merges per-step partial results by LSE in fp32; backward computes
``delta = rowsum(dO·O) − dLSE`` once from the final output and hands every step's kernel the *global* LSE and
delta, so per-step gradients sum to the single-device gradients. ``score_mod`` sees global token indices.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from .allgather import allgather_backward, allgather_forward
from .direct import direct_backward, direct_forward
from .merge import _acc_dtype
from .ring import ring_backward, ring_forward

BACKENDS = ("auto", "triton", "gluon", "reference")


@cache
def _kernel_fns(backend: str) -> tuple[Callable, Callable, dict]:
    """Forward / backward kernel entry points and the ``backend`` keyword (auto, triton or the reference)."""
    from flexdist import kernels as K

    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {backend!r}")
    return K.flex_attention_forward, K.flex_attention_backward, {"backend": backend}


def _score_params(score_mod) -> tuple[torch.Tensor, ...]:
    if score_mod is not None and hasattr(score_mod, "tensors"):
        return tuple(score_mod.tensors())
    return ()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a local shard [B, H, S/N, D], got shape {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    B, L = plan.batch_size, plan.local_len
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] != B or t.shape[2] != L:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the plan's local shard is [B={B}, H, L={L}, D] "
                f"(S={plan.seq_len} over N={plan.world_size} ranks); shard global tensors with plan.shard(x, 2)"
            )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, H, S]")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims differ: q has D={q.shape[-1]}, k has D={k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for GQA")
    if q.device.type == "cuda" and plan.world_size > 1 and plan.group is not None:
        import torch.distributed as dist

        if dist.get_backend(plan.group) != "nccl":
            raise ValueError(
                f"q is on {q.device} but the CP group's backend is {dist.get_backend(plan.group)}"
            )


class _CPAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, score_mod, scale, backend, *params):
        fwd, _, extra = _kernel_fns(backend)
        masks, full_mask = plan.masks_on(q.device)
        kw = dict(score_mod=score_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **extra)
        if plan.strategy == "ring":
            out, lse = ring_forward(q, k, v, plan, masks, fwd, kw)
        elif plan.strategy == "direct":
            out, lse = direct_forward(q, k, v, plan, masks, fwd, kw)
        else:
            out, lse = allgather_forward(q, k, v, plan, full_mask, fwd, kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.score_mod, ctx.scale, ctx.backend = plan, score_mod, scale, backend
        ctx.n_params = len(params)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        params = _score_params(ctx.score_mod)
        grads = [torch.zeros_like(p) for p in params] if any(p.requires_grad for p in params) else None
        dq, dk, dv = attention_backward(
            q, k, v, out, lse, dout, dlse, ctx.plan, ctx.score_mod, ctx.scale, ctx.backend, grads
        )
        pg = tuple(grads) if grads is not None else (None,) * ctx.n_params
        return (dq, dk, dv, None, None, None, None, *pg)


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    plan,
    score_mod=None,
    scale: float | None = None,
    backend: str = "auto",
    score_mod_grads: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `attention` for this rank's shards, given its output and global LSE (and their grads).

    ``delta = rowsum(dO·O) − dLSE`` is computed once from the final output and handed, with the global LSE,
    to every exchange step's kernel, so the per-step gradients sum to the single-device ones. Learnable
    score-mod tensors get this rank's partial gradients added into ``score_mod_grads``.
    """
    _, bwd, extra = _kernel_fns(backend)
    masks, full_mask = plan.masks_on(q.device)
    if dout is None:
        dout = torch.zeros_like(out)
    acc = _acc_dtype(q.dtype)
    if dlse is not None:  # rows that saw nothing (lse = -inf) get no dLSE: their gradients are exactly 0
        dlse = torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse)
    if acc == torch.float32 and out.is_cuda:
        # one fused pass (torch's expression below writes fp32 copies of out and dout first: 2.8 ms of a
        # 39 ms ring backward at 32k tokens per GPU, Hq = 64)
        from flexdist.kernels.triton_bwd import triton_delta

        delta = triton_delta(out, dout, dlse)
    else:
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(acc)
    kw = dict(score_mod=score_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **extra)
    if score_mod_grads is not None:
        kw["score_mod_grads"] = score_mod_grads
    if plan.strategy == "ring":
        return ring_backward(q, k, v, out, dout, lse, delta, plan, masks, bwd, kw)
    if plan.strategy == "direct":
        return direct_backward(q, k, v, out, dout, lse, delta, plan, masks, bwd, kw)
    return allgather_backward(q, k, v, out, dout, lse, delta, plan, full_mask, bwd, kw)


def _check_across_ranks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> None:
    """Debug mode: every rank must call with the same head counts, head dims and dtype (else the ring's
    messages would not match and NCCL would hang). Two all-reduces; raises on every rank."""
    import torch.distributed as dist

    if plan.group is None or plan.world_size == 1:
        return
    from .plan import _comm_device

    codes = [
        q.shape[1],
        k.shape[1],
        q.shape[3],
        v.shape[3],
        {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}.get(q.dtype, 0),
    ]
    t = torch.tensor(codes + [-c for c in codes], dtype=torch.int64, device=_comm_device(plan.group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=plan.group)
    hi, lo = t[: len(codes)].tolist(), [-x for x in t[len(codes) :].tolist()]
    if hi != lo:
        raise ValueError(
            f"CP attention inputs differ between ranks: (Hq, Hkv, D, Dv, dtype code) on rank {plan.rank} is "
            f"{tuple(codes)}, group min {tuple(lo)}, max {tuple(hi)}"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    score_mod: Callable | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    kernel_backend: str | None = None,
):
    """Context-parallel attention of this rank's query shard against the whole (sharded) sequence.

    Args:
        q: ``[B, Hq, L, D]`` local queries (``L = S / N``, plan order: ``plan.shard(x, 2)``).
        k, v: ``[B, Hkv, L, D]`` local keys/values; GQA when Hq is a multiple of Hkv (sent at Hkv heads).
        plan: a `Plan` from `flexdist.cp.plan` for this batch.
        score_mod: a torch-style score mod; it sees *global* token indices. Learnable tensors exposed by a
            ``tensors()`` method (flexdist's built-in mods) receive this rank's partial gradient.
        scale: softmax scale (default ``D ** -0.5``).
        return_lse: also return the global natural-log LSE ``[B, Hq, L]`` (fp32), differentiable.
        kernel_backend: override ``plan.kernel_backend`` ("auto", "triton", "gluon", "reference").
    Returns: the local output ``[B, Hq, L, Dv]`` in q's dtype (and the LSE).
    """
    _check_inputs(q, k, v, plan)
    if plan.debug:
        _check_across_ranks(q, k, v, plan)
    backend = kernel_backend or plan.kernel_backend
    if plan.strategy == "ulysses":
        from .ulysses import ulysses_attention

        out, lse = ulysses_attention(q, k, v, plan, score_mod, scale, _kernel_fns(backend))
        return (out, lse) if return_lse else out
    params = _score_params(score_mod)
    out, lse = _CPAttention.apply(q, k, v, plan, score_mod, scale, backend, *params)
    return (out, lse) if return_lse else out
