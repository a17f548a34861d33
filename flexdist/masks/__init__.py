"""flexdist.masks — document BlockMasks built from document ids, for one device or every CP (rank, step) pair.

- converters between ``doc_ids [B, S]`` and per-row document lengths / ``cu_seqlens``, document run indices
  and positions within documents (`documents`);
- `document_block_mask`: one BlockMask from document ids and the global positions an attention call holds;
- `rank_step_block_masks`: all N×N (query rank, key rank) BlockMasks of a context-parallel plan at once.

Both build on CUDA with two Triton kernels plus two torch ops (`triton_build`: a constant number of launches
whatever S and N, since building masks is launch-bound) and elsewhere with vectorised torch ops
(``backend="torch"``); the two give identical tables.
"""

from .batched import RankStepMasks, rank_step_block_masks
from .block_mask import document_block_mask
from .documents import (
    cu_seqlens_to_doc_ids,
    doc_ids_to_cu_seqlens,
    doc_ids_to_lengths,
    document_run_index,
    lengths_to_doc_ids,
    positions_in_document,
)

__all__ = [
    "RankStepMasks",
    "cu_seqlens_to_doc_ids",
    "doc_ids_to_cu_seqlens",
    "doc_ids_to_lengths",
    "document_block_mask",
    "document_run_index",
    "lengths_to_doc_ids",
    "positions_in_document",
    "rank_step_block_masks",
]
