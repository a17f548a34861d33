"""Built-in score mods with known gradients (the FlexAttention blog's examples).

Each is a callable with torch's score_mod signature ``(score, b, h, q_idx, kv_idx) -> score`` so torch's
``flex_attention`` and the dense reference accept it unchanged; the Triton kernel recognises the class and
applies it (and its derivative) natively. ``score`` is already multiplied by the softmax scale, as in torch.

Under context parallelism ``q_idx`` / ``kv_idx`` are *global* token indices (the kernel entry points take
the local→global index maps), so position-dependent mods such as ALiBi mean the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class SoftCap:
    """Tanh soft-capping (Gemma 2, Grok): ``cap · tanh(score / cap)``."""

    cap: float

    def __post_init__(self) -> None:
        if not self.cap > 0:
            raise ValueError(f"SoftCap.cap must be > 0, got {self.cap}")

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()


@dataclass(eq=False)
class ALiBi:
    """ALiBi: ``score + slopes[h] · (kv_idx − q_idx)`` (a linear penalty on distance, one slope per head)."""

    slopes: torch.Tensor  # [Hq], fp32

    def __post_init__(self) -> None:
        if self.slopes.dim() != 1:
            raise ValueError(f"ALiBi.slopes must be [H], got shape {tuple(self.slopes.shape)}")

    @staticmethod
    def default_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The geometric slopes of the ALiBi paper: 2^(-8(i+1)/H)."""
        i = torch.arange(num_heads, device=device, dtype=torch.float32)
        return torch.exp2(-8.0 * (i + 1) / num_heads)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.slopes[h] * (kv_idx - q_idx)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()


@dataclass(eq=False)
class RelativeBias:
    """Learned relative-position bias: ``score + table[h, clamp(q_idx − kv_idx, −L+1, L−1) + L − 1]``.

    ``table`` is ``[H, 2L − 1]`` and may require grad: its gradient is the sum of dScore over every
    (q, kv) pair at each (head, distance). Distances beyond ±(L−1) share the end buckets, as T5 does.
    """

    table: torch.Tensor  # [H, 2L-1]

    def __post_init__(self) -> None:
        if self.table.dim() != 2 or self.table.shape[1] % 2 != 1:
            raise ValueError(
                f"RelativeBias.table must be [H, 2L-1] (odd width), got {tuple(self.table.shape)}"
            )

    @property
    def max_distance(self) -> int:
        return (self.table.shape[1] + 1) // 2

    def __call__(self, score, b, h, q_idx, kv_idx):
        L = self.max_distance
        rel = torch.clamp(q_idx - kv_idx, -L + 1, L - 1) + (L - 1)
        return score + self.table[h, rel]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.table,)
