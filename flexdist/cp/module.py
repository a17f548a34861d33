"""`ContextParallelAttention`: the CP attention op as an ``nn.Module`` for models."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import attention


class ContextParallelAttention(nn.Module):
    """Attention over a context-parallel sharded sequence (no parameters; projections live in the model).

    The plan changes with every batch (it depends on the documents), so it is passed per call:
    ``out = cpa(q, k, v, plan)``. Alternatively call ``cpa.set_plan(plan)`` once per batch (e.g. from the
    training loop, before the forward of a model whose attention layers share one module) and omit it:
    ``cpa(q, k, v)``. ``score_mod`` and ``scale`` are fixed at construction; score mods see global indices.
    """

    def __init__(
        self, score_mod: Callable | None = None, scale: float | None = None, kernel_backend: str | None = None
    ):
        super().__init__()
        self.score_mod = score_mod
        self.scale = scale
        self.kernel_backend = kernel_backend
        self._plan = None

    def set_plan(self, plan) -> None:
        """Use ``plan`` for calls that do not pass one (set it once per batch)."""
        self._plan = plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan=None, return_lse: bool = False):
        plan = plan if plan is not None else self._plan
        if plan is None:
            raise ValueError(
                "ContextParallelAttention needs a plan: pass forward(q, k, v, plan) or set_plan(plan)"
            )
        return attention(
            q, k, v, plan, self.score_mod, self.scale, return_lse, kernel_backend=self.kernel_backend
        )
