"""Context-parallel attention as PyTorch custom ops, so ``torch.compile(fullgraph=True)`` sees one opaque op.

Why: dynamo cannot trace the ring (``torch.distributed`` point-to-point calls, per-step Python control flow over
the plan's masks), and a plan is a Python object that changes with every batch — as an argument of a compiled
region it would be specialised on and recompile each step. So the op takes only tensors and fixed scalars:

- ``flexdist::cp_attention_fwd(q, k, v, plan_handle, scale, backend) -> (out, lse)``
- ``flexdist::cp_attention_bwd(q, k, v, out, lse, dout, dlse, plan_handle, scale, backend) -> (dq, dk, dv)``

``plan_handle`` is a 0-d int64 CPU *tensor* naming a live plan in a small registry (:func:`register_plan`):
data, not a constant, so a new plan (a new document layout) reuses the compiled graph. The implementations
look the plan up and run the eager code: :func:`flexdist.cp.attention` for the forward (bit for bit), and
for the backward the same delta and the same ring / direct / all-gather exchange and kernels as its autograd
function (the dense reference's backward needs no autograd without a score mod, so it runs inside the op).
Both ops have fake (meta) implementations; ``register_autograd`` wires the forward to the backward op, with
gradients into q, k, v from both ``out`` and ``lse``.

The registry holds *weak* references: it never keeps a plan alive, so it is bounded by the plans the caller
holds. A handle is never reused; looking up a handle whose plan was freed raises an error naming it. In eager
mode the op's autograd node holds the plan until backward has run; compiled code reaches it only by handle, so
there the caller keeps the plan alive until backward (the training loop holds each step's plans anyway).

Supported: strategies "ring", "direct" and "allgather" without a score mod. Ulysses (composed of
differentiable all-to-alls) and score mods (Python callables, possibly with learnable tensors) stay on the
eager path, :func:`flexdist.cp.attention`.

Public entry points: :func:`cp_attention` (always the op) and :func:`register_plan` (call it outside compiled
code; :class:`flexdist.cp.ContextParallelAttention.set_plan` and ``flexdist.model.make_cp_plan`` do).
"""

from __future__ import annotations

import importlib
import itertools
import threading
import weakref
from typing import Any

import torch

from .merge import _acc_dtype

# the module (``flexdist.cp.attention`` as an attribute is the function of that name, which shadows it)
_eager = importlib.import_module("flexdist.cp.attention")

__all__ = ["OP_STRATEGIES", "cp_attention", "lookup_plan", "op_supported", "register_plan"]

#: strategies the custom op runs (ulysses is a composition of autograd functions, see module docstring)
OP_STRATEGIES = ("ring", "direct", "allgather")

# the plan's handle tensor is kept on the plan instance under this attribute, so compiled code reaches it with
# one attribute read (a tensor input of the graph, guarded on dtype/shape only, never on its value)
_HANDLE_ATTR = "_flexdist_cp_op_handle"

_lock = threading.Lock()
_counter = itertools.count(1)  # handles are never reused, so a stale handle can never name another plan
_plans: dict[int, weakref.ref] = {}


def _forget(handle: int) -> None:
    _plans.pop(handle, None)


def register_plan(plan: Any) -> torch.Tensor:
    """The plan's handle: a 0-d int64 CPU tensor naming ``plan`` in the op's registry (registered once).

    Call it outside compiled code (it is idempotent and cheap); compiled code reads the handle registered here.
    The registry keeps only a weak reference, so the plan is freed as usual once the caller drops it.
    """
    h = getattr(plan, _HANDLE_ATTR, None)
    if h is not None:
        ref = _plans.get(int(h))
        if ref is not None and ref() is plan:
            return h
    with _lock:
        n = next(_counter)
        # the callback drops the entry when the plan is garbage collected: the registry stays bounded
        _plans[n] = weakref.ref(plan, lambda _ref, n=n: _forget(n))
    h = torch.tensor(n, dtype=torch.int64)
    setattr(plan, _HANDLE_ATTR, h)
    return h


def lookup_plan(handle: torch.Tensor) -> Any:
    """The live plan a handle names; a clear error if it was never registered or has been freed."""
    if not isinstance(handle, torch.Tensor) or handle.dim() != 0 or handle.dtype != torch.int64:
        raise TypeError(f"plan_handle must be a 0-d int64 tensor from register_plan, got {handle!r}")
    n = int(handle)
    ref = _plans.get(n)
    plan = ref() if ref is not None else None
    if plan is None:
        raise RuntimeError(
            f"flexdist::cp_attention: plan handle {n} is stale (its plan was garbage collected, or it was "
            f"never registered; {len(_plans)} plans are registered now). Keep the plan alive until backward has run, "
            "and register it with flexdist.cp.ops.register_plan(plan) outside compiled code."
        )
    return plan


def op_supported(plan: Any, score_mod: Any = None) -> bool:
    """Whether the custom op can run this call (see module docstring); otherwise use the eager path."""
    return score_mod is None and plan.strategy in OP_STRATEGIES


def _check_supported(plan: Any) -> None:
    if plan.strategy not in OP_STRATEGIES:
        raise ValueError(
            f"the CP custom op supports strategies {OP_STRATEGIES}, got plan.strategy={plan.strategy!r}; "
            "use flexdist.cp.attention (eager) for it"
        )


@torch.library.custom_op("flexdist::cp_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan_handle: torch.Tensor,
    scale: float | None,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = lookup_plan(plan_handle)
    _check_supported(plan)
    # below the autograd key nothing records anyway; no_grad also keeps the eager autograd.Function from
    # building a graph node for inputs that require grad
    with torch.no_grad():
        out, lse = _eager.attention(q, k, v, plan, None, scale, True, kernel_backend=backend)
    # fresh, contiguous outputs: the fake implementation promises exactly that layout
    return out.contiguous(), lse.contiguous()


@_fwd.register_fake
def _fwd_fake(q, k, v, plan_handle, scale, backend):
    B, Hq, L, _ = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    lse = q.new_empty((B, Hq, L), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("flexdist::cp_attention_bwd", mutates_args=())
def _bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    plan_handle: torch.Tensor,
    scale: float | None,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = lookup_plan(plan_handle)
    _check_supported(plan)
    backend = backend or plan.kernel_backend
    # the eager backward (the dense reference's is autograd-free without a score mod, so it runs here too)
    dq, dk, dv = _eager.attention_backward(q, k, v, out, lse, dout, dlse, plan, None, scale, backend)
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    if dk.untyped_storage().data_ptr() == dv.untyped_storage().data_ptr():
        # dK and dV can be views of one exchange buffer; op outputs must not alias each other
        dv = dv.clone()
    return dq, dk, dv


@_bwd.register_fake
def _bwd_fake(q, k, v, out, lse, dout, dlse, plan_handle, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, plan_handle, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, plan_handle)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, plan_handle = ctx.saved_tensors
    dq, dk, dv = _bwd(q, k, v, out, lse, dout, dlse, plan_handle, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Any,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    kernel_backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`flexdist.cp.attention` (no score mod; ring, direct or allgather) through the custom op.

    Same arguments and results as the eager function, but it compiles under ``torch.compile(fullgraph=True)``
    as one op and a new plan (same shapes) reuses the compiled graph. In eager mode the plan is registered on
    the fly; inside compiled code it must have been registered before (:func:`register_plan`, which
    ``ContextParallelAttention.set_plan`` and ``flexdist.model.make_cp_plan`` call), because registering is
    Python bookkeeping a graph cannot hold.
    """
    if torch.compiler.is_compiling():
        handle = getattr(plan, _HANDLE_ATTR, None)
        if handle is None:
            raise RuntimeError(
                "flexdist.cp.ops.cp_attention: the plan was not registered before compilation; call "
                "flexdist.cp.ops.register_plan(plan) (or ContextParallelAttention.set_plan(plan)) outside the "
                "compiled region"
            )
    else:
        _check_supported(plan)
        handle = register_plan(plan)
    if scale is not None:
        scale = float(scale)
    out, lse = _fwd(q, k, v, handle, scale, kernel_backend)
    if not torch.compiler.is_compiling() and out.grad_fn is not None:
        # eager: the autograd node keeps the plan alive until backward has run (the registry only holds it
        # weakly); compiled graphs reach it by handle, so there the caller holds it (the trainer does)
        out.grad_fn.metadata["flexdist_cp_plan"] = plan
    return (out, lse) if return_lse else out
