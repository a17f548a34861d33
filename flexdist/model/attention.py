"""The attention callables the model is run with, built once per batch and shared by every layer.

- :class:`LocalDocumentAttention` (cp = 1): the flexdist kernel with a document-causal BlockMask built from
  the batch's ``doc_ids``.
- :class:`ContextParallelDocumentAttention` (cp > 1): ``flexdist.cp.attention`` with the batch's CP plan
  (sharding permutation + per-ring-step BlockMasks), so each rank only holds its shard of the sequence.
"""

from __future__ import annotations

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


class LocalDocumentAttention:
    """``attention(q, k, v)`` on one device: the kernel with the batch's document BlockMask (GQA native)."""

    def __init__(self, doc_ids: torch.Tensor, *, backend: str = "auto", block_size: int = 128) -> None:
        self.block_mask = make_document_block_mask(doc_ids, block_size=block_size)
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernels.flex_attention(
            q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1], backend=self.backend
        )


class ContextParallelDocumentAttention:
    """``attention(q, k, v)`` on a rank's shard of the sequence: ``flexdist.ContextParallelAttention`` with the
    batch's plan (from :func:`make_cp_plan`, one per batch, shared by every layer and by backward). GQA is
    handled by the CP op (K/V travel at ``Hkv`` heads)."""

    def __init__(self, plan: Any, *, backend: str | None = None) -> None:
        from flexdist.cp import ContextParallelAttention

        self.plan = plan
        self.op = ContextParallelAttention(kernel_backend=backend)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.op(q, k, v, self.plan)


def make_cp_plan(
    doc_ids: torch.Tensor,
    group: Any,
    *,
    balance: str = "auto",
    strategy: str = "ring",
    block_size: int = 128,
    backend: str = "auto",
) -> Any:
    """The batch's document-causal context-parallel plan over process ``group`` (``flexdist.cp.plan``).

    Use ``plan.shard(x, 1)`` for this rank's tokens / labels of ``[B, S]`` tensors and ``plan.positions``
    (``[B, S / cp]``, positions within documents) for RoPE.
    """
    from flexdist import cp

    return cp.plan(
        doc_ids,
        group,
        balance=balance,
        strategy=strategy,
        causal=True,
        block_size=block_size,
        kernel_backend=backend,
    )
