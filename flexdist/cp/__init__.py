"""flexdist.cp — context-parallel attention for document-packed sequences.

- `plan(doc_ids, group, balance=..., strategy=...)`: sharding (contiguous / zigzag / document-aware),
  per-(rank, ring step) BlockMasks and the ring schedule, built once per batch;
- `attention(q, k, v, plan)`: differentiable ring (or all-gather) attention on local shards;
- `ContextParallelAttention`: the same as an ``nn.Module``.
"""

from .attention import attention
from .merge import merge_all, merge_into
from .module import ContextParallelAttention
from .plan import Plan, build_pair_masks, plan

__all__ = [
    "ContextParallelAttention",
    "Plan",
    "attention",
    "build_pair_masks",
    "merge_all",
    "merge_into",
    "plan",
]
