"""flexdist.cp — context-parallel attention for document-packed sequences.

- `plan(doc_ids, group, balance=..., strategy=...)`: sharding (contiguous / zigzag / document-aware: the ring's
  per-step critical path balanced, or each rank's total work with ``strategy="allgather"``),
  per-(rank, ring step) BlockMasks and the ring schedule, built once per batch;
- `attention(q, k, v, plan)`: differentiable ring / all-gather / direct / Ulysses attention on local shards
  (``strategy="allgather", head_chunks=2``, the all-gather pipelined over chunks of K/V heads, measured
  fastest; ``local_first=True`` also hides the first chunk's gather behind the rank's own keys, a gain at
  8 ranks and a loss at 2 and 4: see the README's Measured section);
- `ContextParallelAttention`: the same as an ``nn.Module``; inside ``torch.compile`` it runs the custom op
  ``flexdist::cp_attention_*`` (`flexdist.cp.ops`: `cp_attention`, `register_plan`), so a block holding it
  compiles with ``fullgraph=True`` and a new plan per batch does not recompile.

Typical use inside a training step (every rank of the CP group runs the same code)::

    plan = flexdist.cp.plan(doc_ids, cp_group, balance="auto", strategy="ring")   # doc_ids: global [B, S]
    tokens = plan.shard(tokens, dim=1)                 # this rank's S/N tokens
    rope_pos = plan.positions                          # positions inside documents, [B, S/N]
    ...
    out = flexdist.cp.attention(q, k, v, plan)         # q/k/v: [B, H, S/N, D] local shards
    loss = ... / global_valid_tokens                   # normalise by the global count of valid tokens

``plan.stats`` holds the predicted ring time, per-rank work max/mean, skipped steps and K/V volume.
"""

from .attention import attention
from .merge import merge_all, merge_into
from .module import ContextParallelAttention
from .ops import cp_attention, register_plan
from .plan import Plan, build_pair_masks, plan

__all__ = [
    "ContextParallelAttention",
    "Plan",
    "attention",
    "build_pair_masks",
    "cp_attention",
    "merge_all",
    "merge_into",
    "plan",
    "register_plan",
]
