"""The document mask as data: a mask_mod that carries per-token document ids and global positions.

The kernel recognises a `DocumentMaskMod` on a BlockMask and evaluates it natively inside partial blocks
from the per-token tensors (no bit tiles, no Python mask_mod). Any other mask_mod takes the general path.
Calling it like a torch mask_mod gives exactly the same answer, so torch's `flex_attention`,
`create_block_mask` and the dense reference accept it too.

All tensors are in the *local* index space of the attention call: row `i` of `q_doc` describes query
token `i` of the tensor handed to the kernel. Under context parallelism a rank's query shard and a visiting
K/V shard hold tokens from anywhere in the packed sequence; `q_pos` / `kv_pos` are their *global* positions
in the packed sequence, so `q_pos - kv_pos` is the distance inside a document.

Semantics (DESIGN.md): same document (equal id, id >= 0) and
  causal:               kv_pos <= q_pos
  sliding window W:     0 <= q_pos - kv_pos < W   (causal)  or  |q_pos - kv_pos| < W  (non-causal)
  prefix-LM:            a key flagged in `kv_in_prefix` is visible to every query of its document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class DocumentMaskMod:
    """Document-causal / window / prefix-LM mask over per-token document ids and global positions.

    q_doc: ``[B, Sq]`` integer document id of each query token (negative = padding).
    kv_doc: ``[B, Skv]`` document id of each key token.
    q_pos: ``[B, Sq]`` global position of each query token in the packed sequence.
    kv_pos: ``[B, Skv]`` global position of each key token.
    causal: keys after the query (in global position) are invisible.
    window: sliding-window width in tokens (the query's own token included), or None.
    kv_in_prefix: ``[B, Skv]`` bool, keys among their document's first P tokens (prefix-LM), or None.
    """

    q_doc: torch.Tensor
    kv_doc: torch.Tensor
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    causal: bool = True
    window: int | None = None
    kv_in_prefix: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("q_doc", "kv_doc", "q_pos", "kv_pos"):
            t = getattr(self, name)
            if t.dim() != 2:
                raise ValueError(f"DocumentMaskMod.{name} must be [B, S], got shape {tuple(t.shape)}")
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"DocumentMaskMod.{name} must be an integer tensor, got {t.dtype}")
        if self.q_doc.shape != self.q_pos.shape:
            raise ValueError(
                f"q_doc {tuple(self.q_doc.shape)} and q_pos {tuple(self.q_pos.shape)} must have the same shape"
            )
        if self.kv_doc.shape != self.kv_pos.shape:
            raise ValueError(
                f"kv_doc {tuple(self.kv_doc.shape)} and kv_pos {tuple(self.kv_pos.shape)} must have the same shape"
            )
        if self.q_doc.shape[0] != self.kv_doc.shape[0]:
            raise ValueError(f"q_doc batch {self.q_doc.shape[0]} != kv_doc batch {self.kv_doc.shape[0]}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 token, got {self.window}")
        if self.kv_in_prefix is not None and self.kv_in_prefix.shape != self.kv_doc.shape:
            raise ValueError(
                f"kv_in_prefix {tuple(self.kv_in_prefix.shape)} must match kv_doc {tuple(self.kv_doc.shape)}"
            )

    def __call__(
        self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        qd = self.q_doc[b, q_idx]
        kd = self.kv_doc[b, kv_idx]
        rel = self.q_pos[b, q_idx] - self.kv_pos[b, kv_idx]
        same = (qd == kd) & (qd >= 0)
        if self.causal:
            visible = rel >= 0
            if self.window is not None:
                visible = visible & (rel < self.window)
        elif self.window is not None:
            visible = (rel < self.window) & (rel > -self.window)
        else:
            visible = rel == rel  # all True, kept as a tensor so vmap sees a tensor op
        if self.kv_in_prefix is not None:
            visible = visible | self.kv_in_prefix[b, kv_idx]
        return same & visible

    def dense(self) -> torch.Tensor:
        """The element mask ``[B, Sq, Skv]`` (tests and the reference only: O(S²) memory)."""
        qd, kd = self.q_doc[:, :, None], self.kv_doc[:, None, :]
        rel = self.q_pos[:, :, None] - self.kv_pos[:, None, :]
        same = (qd == kd) & (qd >= 0)
        if self.causal:
            visible = rel >= 0
            if self.window is not None:
                visible &= rel < self.window
        elif self.window is not None:
            visible = (rel < self.window) & (rel > -self.window)
        else:
            visible = torch.ones_like(same)
        if self.kv_in_prefix is not None:
            visible = visible | self.kv_in_prefix[:, None, :]
        return same & visible
