"""`ContextParallelAttention`: the CP attention op as an ``nn.Module`` for models."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import attention
from .ops import OP_STRATEGIES, cp_attention, op_supported, register_plan


class ContextParallelAttention(nn.Module):
    """Attention over a context-parallel sharded sequence (no parameters; projections live in the model).

    The plan changes with every batch (it depends on the documents), so it is passed per call:
    ``out = cpa(q, k, v, plan)``. Alternatively call ``cpa.set_plan(plan)`` once per batch (e.g. from the
    training loop, before the forward of a model whose attention layers share one module) and omit it:
    ``cpa(q, k, v)``. ``score_mod`` and ``scale`` are fixed at construction; score mods see global indices.

    ``torch.compile(fullgraph=True)``: inside compiled code the module runs the ``flexdist::cp_attention_*``
    custom ops (:mod:`flexdist.cp.ops`), so a block holding it compiles without graph breaks and a new plan
    does not recompile. The plan must be registered outside the compiled region first:
    ``set_plan(plan)`` does it, or ``flexdist.cp.ops.register_plan(plan)`` when passing plans per call
    (``flexdist.model.make_cp_plan`` registers the plans it builds). The op covers strategies "ring",
    "direct" and "allgather" without a score mod. ``use_op``: None (default) = the op only while compiling
    (eager calls run :func:`flexdist.cp.attention` unchanged), True = always (eager too), False = never.
    """

    def __init__(
        self,
        score_mod: Callable | None = None,
        scale: float | None = None,
        kernel_backend: str | None = None,
        use_op: bool | None = None,
    ):
        super().__init__()
        self.score_mod = score_mod
        self.scale = scale
        self.kernel_backend = kernel_backend
        self.use_op = use_op
        self._plan = None

    def set_plan(self, plan) -> None:
        """Use ``plan`` for calls that do not pass one (set it once per batch, outside compiled code)."""
        if op_supported(plan, self.score_mod):
            register_plan(plan)  # so compiled calls can name it by handle
        self._plan = plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan=None, return_lse: bool = False):
        plan = plan if plan is not None else self._plan
        if plan is None:
            raise ValueError(
                "ContextParallelAttention needs a plan: pass forward(q, k, v, plan) or set_plan(plan)"
            )
        use_op = torch.compiler.is_compiling() if self.use_op is None else self.use_op
        if use_op:
            if self.score_mod is not None or plan.strategy not in OP_STRATEGIES:
                raise ValueError(
                    "ContextParallelAttention: the compiled / custom-op path supports strategies "
                    f"{OP_STRATEGIES} without a score_mod, got strategy={plan.strategy!r}, score_mod="
                    f"{type(self.score_mod).__name__ if self.score_mod is not None else None}; run it eagerly"
                )
            return cp_attention(q, k, v, plan, self.scale, return_lse, kernel_backend=self.kernel_backend)
        return attention(
            q, k, v, plan, self.score_mod, self.scale, return_lse, kernel_backend=self.kernel_backend
        )
