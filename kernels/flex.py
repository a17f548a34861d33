"""Public entry points of the flex-attention kernel: backend dispatch and the autograd Function.

``backend="auto"`` picks the Triton kernels when ``q`` is on CUDA, or on the CPU when the environment has
``TRITON_INTERPRET=1`` (read at call time, so tests can switch it); otherwise the dense reference. On a
Hopper GPU the forward then runs the warp-specialised Gluon kernel (kernels/gluon_fwd.py) wherever it covers
the call (fp16 / bf16, D = Dv in {64, 128}, no score mod, the document or no-op mask, 128-multiple blocks,
TMA-aligned operands; not while torch.compile traces) and the Triton kernel otherwise; in the backward the
dQ and dK/dV passes run the Gluon kernels (kernels/gluon_bwd.py) under the same conditions
(bench/results/2026-11-26-s14/call6: dQ 10-14% and dK/dV 0-6% faster than Triton's on an H100).
``"triton"`` forces the Triton kernels (the forward too), ``"gluon"`` the Gluon forward (an error naming the
reason where it cannot run), ``"reference"`` the dense reference.

Score mods: ``None``, :class:`SoftCap`, :class:`ALiBi` and :class:`RelativeBias` run natively in the Triton
kernel (with their gradients). Any other Python ``score_mod`` cannot be compiled into the kernel: the call
falls back to the dense reference with a ``UserWarning`` (it materialises S×S scores, so it is only usable
at small sizes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .reference import flex_attention_reference, merge_by_lse, reference_backward, reference_forward
from .score_mods import ALiBi, RelativeBias, SoftCap
from .validation import check_qkv

ScoreMod = Callable[..., torch.Tensor]

_BACKENDS = ("auto", "triton", "gluon", "reference")


def _native_score_mod(score_mod) -> bool:
    return score_mod is None or isinstance(score_mod, SoftCap | ALiBi | RelativeBias)


def resolve_backend(backend: str, q: torch.Tensor, score_mod=None) -> str:
    """``"triton"`` (the kernels: Triton, and Gluon for the forward where it applies) or ``"reference"``
    for this call (see module docstring)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "gluon":
        if not q.is_cuda:
            raise ValueError(f"backend='gluon' needs a CUDA tensor; q is on {q.device}")
        backend = "triton"
    if backend == "auto":
        use_triton = q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
        # the kernel has no float64 path: gradient checks in float64 take the reference
        backend = "triton" if use_triton and q.dtype != torch.float64 else "reference"
    if backend == "triton" and not _native_score_mod(score_mod):
        warnings.warn(
            f"score_mod {type(score_mod).__name__} is not a built-in (SoftCap, ALiBi, RelativeBias): "
            "falling back to the dense reference, which materialises S×S scores",
            UserWarning,
            stacklevel=3,
        )
        backend = "reference"
    if backend == "triton" and not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            f"backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1 in the environment; q is on {q.device}"
        )
    return backend


def _add_into(buf: torch.Tensor | None, g: torch.Tensor, name: str, accumulate: bool = True) -> torch.Tensor:
    if buf is None:
        return g
    if buf.shape != g.shape:
        raise ValueError(f"{name} has shape {tuple(buf.shape)}, expected {tuple(g.shape)}")
    if accumulate:
        buf.add_(g.to(buf.dtype))
    else:
        buf.copy_(g)
    return buf


def flex_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_global_idx: torch.Tensor | None = None,
    kv_global_idx: torch.Tensor | None = None,
    backend: str = "auto",
    out_acc: torch.Tensor | None = None,
    lse_acc: torch.Tensor | None = None,
    head_group: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention call: ``(out [B,Hq,Sq,Dv] in q.dtype, lse [B,Hq,Sq] fp32 natural log)``.

    ``q_global_idx`` / ``kv_global_idx`` map local rows to the global positions score mods see (CP).
    ``out_acc`` / ``lse_acc``: fp32 running result of earlier calls over *other* keys (start from zeros and
    −inf); this call's result is merged into them in place by LSE and they are returned (ring attention:
    the Triton kernel merges in its epilogue and leaves tiles that see no key this call untouched).
    ``out``: write target for the output instead of a new tensor, returned as the first result (``lse`` is
    still new): shape ``[B,Hq,Sq,Dv]``, any float dtype, on q's device, unit last-dim stride, other strides
    free — context parallelism calls the kernel per chunk of heads and has each result land in its head
    slice ``big[:, h0:h1]`` of one tensor, with no copy afterwards. Every element is overwritten (rows that
    see nothing get 0), so it needs no zero-fill. The Triton kernel stores its fp32 accumulator straight in
    ``out``'s dtype; the reference copies its ``q.dtype`` result in. Must not overlap q, k or v.
    ``out`` with ``out_acc`` / ``lse_acc``: the merged result is written to ``out`` (in its dtype) instead of
    back into ``out_acc``, which is only read; ``lse_acc`` is updated in place; ``(out, lse_acc)`` is
    returned. Every row of ``out`` is written, rows this call sees nothing of get ``out_acc``'s. For the last
    of several merges (context parallelism's local-keys-first forward): no fp32 → output dtype pass after.
    ``out`` must not overlap ``out_acc`` either.
    ``head_group``: the Triton kernel's launch grouping of heads (``triton_fwd.launch_head_group``; None:
    its rule); it changes the order programs start in, never the result, and the reference ignores it.
    """
    from .triton_fwd import check_head_group, check_out

    check_head_group(head_group)
    if resolve_backend(backend, q, score_mod) == "reference":
        if out is not None:
            check_out(out, check_qkv(q, k, v, enable_gqa), q.device)
        res, lse = reference_forward(
            q,
            k,
            v,
            block_mask,
            score_mod,
            scale,
            enable_gqa,
            q_global_idx=q_global_idx,
            kv_global_idx=kv_global_idx,
        )
        if out_acc is None and lse_acc is None:
            if out is not None:
                out.copy_(res)
                return out, lse
            return res, lse
        from .triton_fwd import check_accumulators

        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        check_accumulators(out_acc, lse_acc, check_qkv(q, k, v, enable_gqa), q.device, acc_dtype)
        merged, new_lse = merge_by_lse(out_acc, lse_acc, res, lse)
        lse_acc.copy_(new_lse)
        if out is not None:
            out.copy_(merged)
            return out, lse_acc
        out_acc.copy_(merged)
        return out_acc, lse_acc
    if backend in ("auto", "gluon") and not torch.compiler.is_compiling():
        from .gluon_fwd import gluon_forward_unsupported, launch_forward

        why = gluon_forward_unsupported(q, k, v, block_mask, score_mod, scale, out)
        if why is None:
            return launch_forward(q, k, v, block_mask, scale, enable_gqa, out_acc, lse_acc, head_group, out)
        if backend == "gluon":
            raise ValueError(f"backend='gluon' cannot run this forward: {why}")
    from .triton_fwd import triton_forward

    return triton_forward(
        q,
        k,
        v,
        block_mask,
        score_mod,
        scale,
        enable_gqa,
        q_global_idx=q_global_idx,
        kv_global_idx=kv_global_idx,
        out_acc=out_acc,
        lse_acc=lse_acc,
        head_group=head_group,
        out=out,
    )


def flex_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    block_mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    delta: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
    q_global_idx: torch.Tensor | None = None,
    kv_global_idx: torch.Tensor | None = None,
    score_mod_grads: list[torch.Tensor] | None = None,
    backend: str = "auto",
    dq_out: torch.Tensor | None = None,
    dk_out: torch.Tensor | None = None,
    dv_out: torch.Tensor | None = None,
    which: str = "all",
    head_group: int | None = None,
    accumulate: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of one attention call given the *global* (merged) ``lse`` and ``out``.

    ``delta = rowsum(dout · out) − dlse`` unless given. Learnable score-mod tensors get their gradients
    *added* into ``score_mod_grads``. If ``dq_out`` and / or ``dk_out`` with ``dv_out`` (those two together)
    are given, the gradients are added into them and those buffers are returned (ring attention accumulates
    dQ, and dK/dV as they travel); the Triton kernels add in place, touching only tiles this call has work
    for.
    ``accumulate=False``: the given buffers are *overwritten* instead (every element, zeros where this call
    has no work: no zero-fill needed), in the buffer's own dtype, unit last-dim stride, other strides free —
    context parallelism's per-head-chunk calls write dQ into head slices of one tensor, and dK/dV in fp32
    straight into the reduce-scatter buffer (no zero-fill, no dtype conversion pass). The Triton kernels
    store their fp32 accumulators directly; the reference copies its input-dtype result in.
    ``which="dq"`` / ``"dkdv"`` computes only dq or only (dk, dv) (the others are returned as None).
    ``head_group``: as in ``flex_attention_forward`` (the dK/dV and dQ kernels' launch grouping).
    """
    from .triton_fwd import check_head_group

    check_head_group(head_group)
    if not isinstance(accumulate, bool):
        raise ValueError(f"accumulate must be a bool, got {accumulate!r}")
    kw = dict(
        delta=delta,
        dlse=dlse,
        q_global_idx=q_global_idx,
        kv_global_idx=kv_global_idx,
        score_mod_grads=score_mod_grads,
    )
    if which not in ("all", "dq", "dkdv"):
        raise ValueError(f"which must be 'all', 'dq' or 'dkdv', got {which!r}")
    if (dk_out is None) != (dv_out is None):
        raise ValueError("dk_out and dv_out must be given together")
    if resolve_backend(backend, q, score_mod) == "reference":
        if which == "dkdv":  # score-mod tensor gradients belong to the dQ part (as in the Triton kernels)
            kw["score_mod_grads"] = None
        dq, dk, dv = reference_backward(
            q, k, v, out, dout, lse, block_mask, score_mod, scale, enable_gqa, **kw
        )
        want_q, want_kv = which in ("all", "dq"), which in ("all", "dkdv")
        return (
            _add_into(dq_out, dq, "dq_out", accumulate) if want_q else None,
            _add_into(dk_out, dk, "dk_out", accumulate) if want_kv else None,
            _add_into(dv_out, dv, "dv_out", accumulate) if want_kv else None,
        )
    from .triton_bwd import triton_backward

    # the Gluon dQ and dK/dV kernels where they cover the call (triton_backward checks), never under compile
    gluon = backend in ("auto", "gluon") and not torch.compiler.is_compiling()
    return triton_backward(
        q, k, v, out, dout, lse, block_mask, score_mod, scale, enable_gqa,
        dq_out=dq_out, dk_out=dk_out, dv_out=dv_out, which=which, head_group=head_group,
        accumulate=accumulate, gluon_dq=gluon, gluon_dkdv=gluon, **kw,
    )  # fmt: skip


class _FlexFunction(torch.autograd.Function):
    """Triton forward/backward; extra inputs are the score mod's learnable tensors (RelativeBias table)."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, score_mod, scale, enable_gqa, backend, *mod_tensors):
        # backend: "auto" (the Gluon kernels where they apply), "triton" or "gluon"
        out, lse = flex_attention_forward(q, k, v, block_mask, score_mod, scale, enable_gqa, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask, ctx.score_mod, ctx.scale, ctx.enable_gqa = block_mask, score_mod, scale, enable_gqa
        ctx.n_mod = len(mod_tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = None
        if ctx.n_mod and any(ctx.needs_input_grad[8:]):
            grads = [torch.zeros_like(t, dtype=torch.float32) for t in ctx.score_mod.tensors()]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = flex_attention_backward(
            q,
            k,
            v,
            out,
            dout.contiguous(),
            lse,
            ctx.block_mask,
            ctx.score_mod,
            ctx.scale,
            ctx.enable_gqa,
            dlse=dlse,
            score_mod_grads=grads,
            backend="triton",
        )
        mod_grads = (
            [g.to(t.dtype) for g, t in zip(grads, ctx.score_mod.tensors(), strict=True)]
            if grads is not None
            else [None] * ctx.n_mod
        )
        return dq, dk, dv, None, None, None, None, None, *mod_grads


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: ScoreMod | None = None,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    *,
    backend: str = "auto",
):
    """Drop-in for ``torch.nn.attention.flex_attention.flex_attention`` (layout ``[B, H, S, D]``).

    Differentiable w.r.t. q, k, v, the learnable score-mod tensors and through the returned LSE.
    """
    if resolve_backend(backend, q, score_mod) == "reference":
        return flex_attention_reference(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse)
    mod_tensors = tuple(score_mod.tensors()) if score_mod is not None else ()
    kernel = backend if backend in ("auto", "gluon") else "triton"
    out, lse = _FlexFunction.apply(q, k, v, block_mask, score_mod, scale, enable_gqa, kernel, *mod_tensors)
    return (out, lse) if return_lse else out
