"""flexdist — context-parallel FlexAttention for long, document-packed sequences.

- ``flexdist.kernels``: the Triton block-sparse attention kernel (forward + backward) and its dense reference.
- document BlockMasks built analytically from document ids, for any token→rank sharding;
- ``flexdist.cp``: sharding planners, the ring exchange of K/V, and the context-parallel attention op;
- the Llama-style model and packed-document data used by the training entry point (``python -m train``).

This package knows nothing of Hydra or wandb; only ``train/`` does. Importing it has no side effects.
"""

__version__ = "0.1.0"

from flexdist.cp import ContextParallelAttention
from flexdist.masks import (
    cu_seqlens_to_doc_ids,
    doc_ids_to_cu_seqlens,
    doc_ids_to_lengths,
    document_block_mask,
    lengths_to_doc_ids,
    positions_in_document,
)

__all__ = [
    "ContextParallelAttention",
    "__version__",
    "cu_seqlens_to_doc_ids",
    "doc_ids_to_cu_seqlens",
    "doc_ids_to_lengths",
    "document_block_mask",
    "lengths_to_doc_ids",
    "positions_in_document",
]
