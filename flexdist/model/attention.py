"""The attention callables the model is run with, built once per batch and shared by every layer.

- :class:`LocalDocumentAttention` (cp = 1): the flexdist kernel with a document-causal BlockMask built from
  the batch's ``doc_ids``.
- :class:`ContextParallelDocumentAttention` (cp > 1): ``flexdist.cp.attention`` with the batch's CP plan
  (sharding permutation + per-ring-step BlockMasks), so each rank only holds its shard of the sequence.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from flexdist import kernels


def make_document_block_mask(doc_ids: torch.Tensor, *, block_size: int = 128):
    """Document-causal BlockMask of a packed batch ``doc_ids [B, S]`` (negative id = padding).

    Uses ``flexdist.document_block_mask`` (built analytically from the ids, no S×S evaluation) when that is
    available, else torch's ``create_block_mask`` over :class:`flexdist.kernels.DocumentMaskMod` — the same
    mask, which the kernel also recognises and evaluates natively in partial blocks.
    """
    import flexdist

    builder = getattr(flexdist, "document_block_mask", None)
    if builder is not None:
        return builder(doc_ids, causal=True, block_size=block_size)
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = doc_ids.shape
    pos = torch.arange(S, device=doc_ids.device).expand(B, S)
    mod = kernels.DocumentMaskMod(doc_ids, doc_ids, pos, pos, causal=True)
    return create_block_mask(mod, B, None, S, S, device=doc_ids.device, BLOCK_SIZE=block_size)


class LocalDocumentAttention:
    """``attention(q, k, v)`` on one device: the kernel with the batch's document BlockMask (GQA native)."""

    def __init__(self, doc_ids: torch.Tensor, *, backend: str = "auto", block_size: int = 128) -> None:
        self.block_mask = make_document_block_mask(doc_ids, block_size=block_size)
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernels.flex_attention(
            q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1], backend=self.backend
        )


def _cp_module() -> Any:
    cp = importlib.import_module("flexdist.cp")
    missing = [name for name in ("plan", "attention") if not hasattr(cp, name)]
    if missing:
        raise NotImplementedError(
            f"parallel.cp > 1 needs flexdist.cp.{' and flexdist.cp.'.join(missing)}, which this checkout does not "
            "have yet (the context-parallel layer has not landed); run with parallel.cp=1"
        )
    return cp


class ContextParallelDocumentAttention:
    """``attention(q, k, v)`` on a rank's shard of the sequence, through ``flexdist.cp.attention``.

    ``plan`` comes from :func:`make_cp_plan` (one per batch). K/V heads are expanded to the query heads when
    the CP op does not take GQA itself.
    """

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self._cp = _cp_module()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._cp.attention(q, k, v, self.plan)


def make_cp_plan(
    doc_ids: torch.Tensor,
    group: Any,
    *,
    balance: str = "auto",
    strategy: str = "ring",
    block_size: int = 128,
) -> Any:
    """The batch's context-parallel plan over process ``group`` (document-causal)."""
    cp = _cp_module()
    return cp.plan(doc_ids, group, balance=balance, strategy=strategy, causal=True, block_size=block_size)
