"""Document-masked flex attention as PyTorch custom ops, so ``torch.compile(fullgraph=True)`` sees one opaque op.

Why: dynamo cannot trace into the Triton launch / the BlockMask-driven Python dispatch of
:func:`flex_attention_forward` without graph breaks, and a document layout that changes every step must not
change the compiled graph. So the op's inputs are *only* tensors and scalars: the BlockMask's block tables
and the :class:`DocumentMaskMod`'s per-token tensors are ordinary tensor inputs (document structure is data,
not shape), and the scalars (block sizes, lengths, causal, window, scale, GQA flag, backend) are fixed per
model. Inside the real implementation the BlockMask is rebuilt with the public ``BlockMask.from_kv_blocks``
and the kernel entry points are called as in eager mode.

Ops (namespace ``flexdist``):
- ``flexdist::document_attention_fwd(q, k, v, <mask tensors>, <scalars>) -> (out, lse)``
- ``flexdist::document_attention_bwd(q, k, v, out, dout, lse, dlse, <mask tensors>, <scalars>) -> (dq, dk, dv)``

Both have fake (meta) implementations; the forward has ``register_autograd`` wiring it to the backward op,
gradients flow into q, k, v from both ``out`` and ``lse``. The backward op itself is not differentiable
(no double backward). Score mods are not taken (the op is for plain document-masked attention). The
Triton kernels run inside the op's real implementation, so inductor treats the op as an opaque fallback
kernel (no ``triton_op`` / ``wrap_triton`` fusion yet). Public entry point: :func:`document_attention`.
"""

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse import block_mask_from_tables
from .document_mask import DocumentMaskMod
from .flex import flex_attention_backward, flex_attention_forward, resolve_backend

__all__ = ["document_attention"]

# Mask inputs, in op-argument order: the BlockMask tables (None where the mask has none), then the
# DocumentMaskMod tensors. Kept in one place so the wrapper, autograd and backward agree.
_BM_TABLES = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)
_DOC_TENSORS = ("q_doc", "kv_doc", "q_pos", "kv_pos", "kv_in_prefix")


def _rebuild(
    tables: tuple[torch.Tensor | None, ...],
    doc: tuple[torch.Tensor | None, ...],
    q_block_size: int,
    kv_block_size: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    window: int,
) -> BlockMask:
    """The BlockMask (with its DocumentMaskMod) the op's tensor inputs describe, via public torch API only."""
    q_doc, kv_doc, q_pos, kv_pos, kv_in_prefix = doc
    mask_mod = DocumentMaskMod(
        q_doc=q_doc,
        kv_doc=kv_doc,
        q_pos=q_pos,
        kv_pos=kv_pos,
        causal=causal,
        window=None if window < 0 else window,
        kv_in_prefix=kv_in_prefix,
    )
    return block_mask_from_tables(
        *tables,
        block_size=(q_block_size, kv_block_size),
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE is fp32, except float64 inputs (gradient checks on the reference) keep float64, like the reference."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("flexdist::document_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    q_num_blocks: torch.Tensor | None,
    q_indices: torch.Tensor | None,
    full_q_num_blocks: torch.Tensor | None,
    full_q_indices: torch.Tensor | None,
    q_doc: torch.Tensor,
    kv_doc: torch.Tensor,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    kv_in_prefix: torch.Tensor | None,
    q_block_size: int,
    kv_block_size: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    window: int,
    scale: float | None,
    enable_gqa: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    bm = _rebuild(
        (
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num_blocks,
            q_indices,
            full_q_num_blocks,
            full_q_indices,
        ),
        (q_doc, kv_doc, q_pos, kv_pos, kv_in_prefix),
        q_block_size,
        kv_block_size,
        q_len,
        kv_len,
        causal,
        window,
    )
    out, lse = flex_attention_forward(q, k, v, bm, None, scale, enable_gqa, backend=backend)
    # fresh, contiguous outputs: the fake implementation promises exactly that layout
    return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


@_fwd.register_fake
def _fwd_fake(q, k, v, *rest):
    B, Hq, Sq, _ = q.shape
    out = q.new_empty((B, Hq, Sq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Sq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("flexdist::document_attention_bwd", mutates_args=())
def _bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    q_num_blocks: torch.Tensor | None,
    q_indices: torch.Tensor | None,
    full_q_num_blocks: torch.Tensor | None,
    full_q_indices: torch.Tensor | None,
    q_doc: torch.Tensor,
    kv_doc: torch.Tensor,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    kv_in_prefix: torch.Tensor | None,
    q_block_size: int,
    kv_block_size: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    window: int,
    scale: float | None,
    enable_gqa: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bm = _rebuild(
        (
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num_blocks,
            q_indices,
            full_q_num_blocks,
            full_q_indices,
        ),
        (q_doc, kv_doc, q_pos, kv_pos, kv_in_prefix),
        q_block_size,
        kv_block_size,
        q_len,
        kv_len,
        causal,
        window,
    )
    out, dout = out.contiguous(), dout.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    # (the reference backend's backward is autograd-free without a score mod, so it runs inside the op too)
    dq, dk, dv = flex_attention_backward(
        q, k, v, out, dout, lse, bm, None, scale, enable_gqa, dlse=dlse, backend=resolve_backend(backend, q)
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd.register_fake
def _bwd_fake(q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_N_MASK = len(_BM_TABLES) + len(_DOC_TENSORS)  # 13 mask tensors after q, k, v
_SCALARS = (
    "q_block_size",
    "kv_block_size",
    "q_len",
    "kv_len",
    "causal",
    "window",
    "scale",
    "enable_gqa",
    "backend",
)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs[:3]
    mask = inputs[3 : 3 + _N_MASK]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *mask)
    ctx.scalars = tuple(inputs[3 + _N_MASK :])


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd(q, k, v, out, dout, lse, dlse, *mask, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (_N_MASK + len(_SCALARS))


_fwd.register_autograd(_backward, setup_context=_setup_context)


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Document-masked attention through the ``flexdist::document_attention_*`` custom ops.

    Same result as ``flexdist.kernels.flex_attention(q, k, v, block_mask=block_mask, ...)`` but compiles
    under ``torch.compile(fullgraph=True)`` as one op, and a new document layout (same shapes) reuses the
    compiled graph. ``block_mask`` must carry a :class:`DocumentMaskMod` (``flexdist.masks.document_block_mask``
    builds one); any other mask_mod is a Python callable the op cannot take — use ``flex_attention`` for it.

    Returns ``out`` ``[B, Hq, Sq, Dv]`` (and the fp32 natural-log ``lse`` ``[B, Hq, Sq]`` if ``return_lse``);
    differentiable w.r.t. q, k, v through both.
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a torch BlockMask, got {type(block_mask).__name__}")
    mm = block_mask.mask_mod
    if not isinstance(mm, DocumentMaskMod):
        raise TypeError(
            "document_attention needs block_mask.mask_mod to be a flexdist DocumentMaskMod "
            f"(e.g. from flexdist.masks.document_block_mask), got {type(mm).__name__}; "
            "use flexdist.kernels.flex_attention for other mask_mods"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, S, D], got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    q_bs, kv_bs = (int(x) for x in block_mask.BLOCK_SIZE)
    q_len, kv_len = q.shape[2], k.shape[2]
    seq = block_mask.seq_lengths
    if seq is not None and (int(seq[0]), int(seq[1])) != (q_len, kv_len):
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN)={tuple(seq)} but q/k have ({q_len}, {kv_len})"
        )
    tables = tuple(getattr(block_mask, name) for name in _BM_TABLES)
    doc = tuple(getattr(mm, name) for name in _DOC_TENSORS)
    if scale is not None:
        if not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")
        scale = float(scale)
    out, lse = _fwd(
        q,
        k,
        v,
        *tables,
        *doc,
        q_bs,
        kv_bs,
        q_len,
        kv_len,
        bool(mm.causal),
        -1 if mm.window is None else int(mm.window),
        scale,
        bool(enable_gqa),
        backend,
    )
    return (out, lse) if return_lse else out
