"""flexdist.model — a Llama-style decoder for packed documents and the attention callables it runs with.

The model takes ``(tokens, positions, attention)``; ``attention`` is built once per batch from the batch's
document ids: :class:`LocalDocumentAttention` (one device) or :class:`ContextParallelDocumentAttention`
(a rank's shard under context parallelism).
"""

from .attention import (
    AttentionTimer,
    ContextParallelDocumentAttention,
    LocalDocumentAttention,
    make_cp_plan,
    make_document_block_mask,
)
from .llama import (
    CHECKPOINTING_MODES,
    GQAttention,
    Llama,
    LlamaConfig,
    RMSNorm,
    SwiGLU,
    TransformerBlock,
    apply_rope,
    checkpointing_mode,
    compile_model,
    document_causal_pairs,
    flops_per_token,
    rope_cos_sin,
)

__all__ = [
    "CHECKPOINTING_MODES",
    "AttentionTimer",
    "ContextParallelDocumentAttention",
    "GQAttention",
    "Llama",
    "LlamaConfig",
    "LocalDocumentAttention",
    "RMSNorm",
    "SwiGLU",
    "TransformerBlock",
    "apply_rope",
    "checkpointing_mode",
    "compile_model",
    "document_causal_pairs",
    "flops_per_token",
    "make_cp_plan",
    "make_document_block_mask",
    "rope_cos_sin",
]
