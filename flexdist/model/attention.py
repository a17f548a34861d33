"""The attention callables the model is run with, built once per batch and shared by every layer.

- :class:`LocalDocumentAttention` (cp = 1): the flexdist kernel with a document-causal BlockMask built from
  the batch's ``doc_ids``.
- :class:`ContextParallelDocumentAttention` (cp > 1): ``flexdist.cp.attention`` with the batch's CP plan
  (sharding permutation + per-ring-step BlockMasks), so each rank only holds its shard of the sequence.

Both take an optional :class:`AttentionTimer` that adds up the time of their forward calls (the trainer logs it
per step as ``attn_fwd_s``).

Both compile: inside ``torch.compile`` (e.g. a whole transformer block with ``fullgraph=True``) they run the
custom ops — ``flexdist::document_attention_*`` (:func:`flexdist.kernels.document_attention`) and
``flexdist::cp_attention_*`` (:mod:`flexdist.cp.ops`) — whose mask / plan inputs are tensors, so a new batch
(new document layout) reuses the compiled graph. Eager calls run the eager functions unchanged. The timer is
skipped inside compiled code (host timing there would break the graph).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from flexdist import kernels


def make_document_block_mask(doc_ids: torch.Tensor, *, block_size: int = 128):
    """Document-causal BlockMask of a packed batch ``doc_ids [B, S]`` (negative id = padding).

    Built analytically from the ids by ``flexdist.masks.document_block_mask`` (no S×S evaluation); its
    ``mask_mod`` is a :class:`flexdist.kernels.DocumentMaskMod`, evaluated natively by the kernel.
    """
    from flexdist.masks import document_block_mask

    return document_block_mask(doc_ids, causal=True, block_size=block_size)


class AttentionTimer:
    """Wall time of the attention forward calls of one training step (all layers and micro-batches).

    The attention callables below take ``timer=`` and time every call: on CUDA with a pair of CUDA events per
    call (no synchronisation in the loop; :meth:`total_s` waits for the last event), elsewhere with
    ``time.perf_counter`` (CPU execution is synchronous). Forward only: under ``activation_checkpointing=full``
    the recomputed forward in backward is counted too, which is what that mode costs. Under context
    parallelism a call includes the ring's communication waits.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._host_s = 0.0
        self._events: list[tuple[Any, Any]] = []

    def run(self, fn: Any, q: torch.Tensor, *args: Any) -> Any:
        """``fn(q, *args)``, timed."""
        self.calls += 1
        if q.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(q, *args)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn(q, *args)
        self._host_s += time.perf_counter() - t0
        return out

    def total_s(self) -> float:
        """Seconds spent in the timed calls so far."""
        total = self._host_s
        for start, end in self._events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        return total


class LocalDocumentAttention:
    """``attention(q, k, v)`` on one device: the kernel with the batch's document BlockMask (GQA native)."""

    def __init__(
        self,
        doc_ids: torch.Tensor,
        *,
        backend: str = "auto",
        block_size: int = 128,
        timer: AttentionTimer | None = None,
        opaque_op: bool = False,
    ) -> None:
        self.block_mask = make_document_block_mask(doc_ids, block_size=block_size)
        self.backend = backend
        self.timer = timer
        self.opaque_op = opaque_op  # compiled: the opaque custom op instead of the triton_op (benchmarks)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.timer is not None and not torch.compiler.is_compiling():
            return self.timer.run(self._attend, q, k, v)
        return self._attend(q, k, v)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the custom op: the BlockMask's tensors are graph inputs
            return kernels.document_attention(
                q,
                k,
                v,
                self.block_mask,
                enable_gqa=q.shape[1] != k.shape[1],
                backend=self.backend,
                opaque=self.opaque_op,
            )
        return kernels.flex_attention(
            q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1], backend=self.backend
        )


class ContextParallelDocumentAttention:
    """``attention(q, k, v)`` on a rank's shard of the sequence: ``flexdist.ContextParallelAttention`` with the
    batch's plan (from :func:`make_cp_plan`, one per batch, shared by every layer and by backward). GQA is
    handled by the CP op (K/V travel at ``Hkv`` heads)."""

    def __init__(self, plan: Any, *, backend: str | None = None, timer: AttentionTimer | None = None) -> None:
        from flexdist.cp import ContextParallelAttention

        self.plan = plan
        self.op = ContextParallelAttention(kernel_backend=backend)
        self.op.set_plan(plan)  # registers it for the compiled path (flexdist.cp.ops), outside compiled code
        self.timer = timer

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.timer is not None and not torch.compiler.is_compiling():
            return self.timer.run(self.op, q, k, v, self.plan)
        return self.op(q, k, v, self.plan)


def make_cp_plan(
    doc_ids: torch.Tensor,
    group: Any,
    *,
    balance: str = "auto",
    strategy: str = "ring",
    block_size: int = 128,
    backend: str = "auto",
    ring_group: int = 1,
    head_chunks: int = 1,
    local_first: bool = False,
    bwd_head_chunks: int | tuple[int, ...] | None = None,
) -> Any:
    """The batch's document-causal context-parallel plan over process ``group`` (``flexdist.cp.plan``).

    Use ``plan.shard(x, 1)`` for this rank's tokens / labels of ``[B, S]`` tensors and ``plan.positions``
    (``[B, S / cp]``, positions within documents) for RoPE. The plan is registered for the compiled CP op
    (:func:`flexdist.cp.ops.register_plan`; weakly, it is freed as usual).
    """
    from flexdist import cp
    from flexdist.cp.ops import op_supported, register_plan

    plan = cp.plan(
        doc_ids,
        group,
        balance=balance,
        strategy=strategy,
        causal=True,
        block_size=block_size,
        kernel_backend=backend,
        ring_group=ring_group,
        head_chunks=head_chunks,
        local_first=local_first,
        bwd_head_chunks=bwd_head_chunks,
    )
    if op_supported(plan):
        register_plan(plan)
    return plan
