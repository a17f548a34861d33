"""Document-masked flex attention as PyTorch ops: ``torch.compile(fullgraph=True)`` traces them without graph
breaks, and on CUDA inductor sees the Triton kernels themselves.

Why ops: dynamo cannot trace the BlockMask-driven Python dispatch of :func:`flex_attention_forward`, and a
document layout that changes every step must not change the compiled graph. So the op's inputs are *only*
tensors and scalars: the BlockMask's block tables and the :class:`DocumentMaskMod`'s per-token tensors are
ordinary tensor inputs (document structure is data, not shape), and the scalars (block sizes, lengths,
causal, window, scale, GQA flag, backend) are fixed per model. Inside, the BlockMask is rebuilt with the
public ``BlockMask`` API and the kernel entry points are called as in eager mode.

Ops (namespace ``flexdist``):
- ``flexdist::document_attention_fwd(q, k, v, <mask tensors>, <scalars>) -> (out, lse)``
- ``flexdist::document_attention_bwd(q, k, v, out, dout, lse, dlse, <mask tensors>, <scalars>) -> (dq, dk, dv)``

Design (issue #8). Both are ``torch.library.triton_op`` ops. A ``triton_op`` body may only run torch ops and
Triton kernels launched through ``torch.library.wrap_triton``; torch runs it as the op's eager kernel, as its
fake (meta) implementation, and, under torch.compile, *decomposes* the op into it while AOTAutograd
functionalizes the graph, so each launch becomes a ``triton_kernel_wrapper_functional`` node that inductor
compiles as a user-defined Triton kernel (no opaque fallback call). The body has two branches:

- **compiled Triton kernels on CUDA** (:func:`_compiled_triton`): the mask metadata is computed with torch
  ops, outputs are allocated with torch ops, and every kernel (forward; delta, dK/dV, dQ) is launched with
  ``wrap_triton(kernel)[grid](...)`` (``triton_forward`` / ``triton_backward`` with ``traceable=True``:
  placeholders are allocated per call instead of a module cache, which would keep a tracer's FakeTensor;
  the ``triton.autotune`` kernels are captured as they are, inductor autotunes their configs). Nothing reads
  tensor data on the host.
- **anything else** — the dense reference backend, or the Triton *interpreter* (``TRITON_INTERPRET=1``, the
  CPU tests): the body calls an opaque ``torch.library.custom_op``, ``flexdist::document_attention_fwd_opaque``
  / ``_bwd_opaque`` (the same schemas), whose implementation is the eager entry point. Why: interpreted
  kernels are not ``triton.jit`` functions, so ``wrap_triton`` cannot capture them (torch 2.11 raises, later
  versions hand them back uncaptured, and they cannot run on FakeTensors); the reference reads the mask
  densely and is kept out of compiled graphs as before. An opaque op is one a triton_op body may call.

The forward has ``register_autograd`` wiring it to the backward op; gradients flow into q, k, v from both
``out`` and ``lse``. The backward op itself is not differentiable (no double backward). Score mods are not
taken (the op is for plain document-masked attention). Public entry point: :func:`document_attention`.
"""

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse import block_mask_from_tables
from .document_mask import DocumentMaskMod
from .flex import flex_attention_backward, flex_attention_forward, resolve_backend

# Imported by name (not lazily): triton_op reads the op body's source and follows the functions it calls *by
# name* to find the ``wrap_triton(kernel)`` launches, so the kernels' sources key torch's compile caches.
from .triton_bwd import triton_backward
from .triton_fwd import kernels_are_compiled, triton_forward

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
_N_MASK = len(_BM_TABLES) + len(_DOC_TENSORS)  # 13 mask tensors after q, k, v


def _rebuild(tail: tuple) -> BlockMask:
    """The BlockMask (with its DocumentMaskMod) the op's arguments after its q/k/v (and out, dout, lse, dlse)
    describe: the mask tensors, then the block sizes, lengths, causal and window. Public torch API only."""
    tables, doc = tail[: len(_BM_TABLES)], tail[len(_BM_TABLES) : _N_MASK]
    q_block_size, kv_block_size, q_len, kv_len, causal, window = tail[_N_MASK : _N_MASK + 6]
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


def _compiled_triton(q: torch.Tensor, backend: str) -> bool:
    """The op body launches the Triton kernels itself, through ``wrap_triton`` (see the module docstring).

    CUDA tensors, the Triton backend, and JIT-compiled kernels (not ``TRITON_INTERPRET=1``'s interpreted ones,
    which wrap_triton cannot capture). Everything else goes through the opaque op."""
    return q.is_cuda and kernels_are_compiled() and resolve_backend(backend, q) == "triton"


# --- opaque ops: the eager entry points, hidden from the compiler (reference backend, Triton interpreter) ---


@torch.library.custom_op("flexdist::document_attention_fwd_opaque", mutates_args=())
def _fwd_opaque(
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
    args = tuple(locals().values())  # first: exactly the op's arguments, in schema order
    bm = _rebuild(args[3:])
    out, lse = flex_attention_forward(q, k, v, bm, None, scale, enable_gqa, backend=backend)
    # fresh, contiguous outputs: the fake implementation promises exactly that layout
    return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


@_fwd_opaque.register_fake
def _fwd_fake(q, k, v, *rest):
    B, Hq, Sq, _ = q.shape
    out = q.new_empty((B, Hq, Sq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Sq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("flexdist::document_attention_bwd_opaque", mutates_args=())
def _bwd_opaque(
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
    args = tuple(locals().values())  # first: exactly the op's arguments, in schema order
    bm = _rebuild(args[7:])
    out, dout = out.contiguous(), dout.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    # (the reference backend's backward is autograd-free without a score mod, so it runs inside the op too)
    dq, dk, dv = flex_attention_backward(
        q, k, v, out, dout, lse, bm, None, scale, enable_gqa, dlse=dlse, backend=resolve_backend(backend, q)
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_opaque.register_fake
def _bwd_fake(q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --- the public ops: triton_ops (their bodies are also their fake implementations) ---


@torch.library.triton_op("flexdist::document_attention_fwd", mutates_args=())
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
    args = tuple(locals().values())  # first: exactly the op's arguments, in schema order
    if not _compiled_triton(q, backend):
        return _fwd_opaque(*args)
    bm = _rebuild(args[3:])
    # out and lse come fresh from torch.empty (contiguous; lse fp32: the kernel takes no float64)
    return triton_forward(q, k, v, bm, None, scale, enable_gqa, traceable=True)


@torch.library.triton_op("flexdist::document_attention_bwd", mutates_args=())
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
    args = tuple(locals().values())  # first: exactly the op's arguments, in schema order
    if not _compiled_triton(q, backend):
        return _bwd_opaque(*args)
    bm = _rebuild(args[7:])
    out, dout = out.contiguous(), dout.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    # dq, dk, dv come fresh from torch.empty in the input dtypes, contiguous (what the opaque op returns)
    return triton_backward(q, k, v, out, dout, lse, bm, None, scale, enable_gqa, dlse=dlse, traceable=True)


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


def _make_backward(bwd_op):
    """The autograd formula of a forward op: its backward op on the saved inputs, outputs and mask."""

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *mask = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = bwd_op(q, k, v, out, dout, lse, dlse, *mask, *ctx.scalars)
        return (dq, dk, dv) + (None,) * (_N_MASK + len(_SCALARS))

    return backward


_fwd.register_autograd(_make_backward(_bwd), setup_context=_setup_context)
# the opaque pair is also usable on its own (``document_attention(..., opaque=True)``)
_fwd_opaque.register_autograd(_make_backward(_bwd_opaque), setup_context=_setup_context)


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
    opaque: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Document-masked attention through the ``flexdist::document_attention_*`` custom ops.

    ``opaque=True`` calls the ``*_opaque`` custom ops directly, so that even on CUDA the compiler sees one
    opaque op instead of the Triton kernels (what flexdist did before the ``triton_op``s): kept to compare
    the two under torch.compile (``bench/bench_train.py --attention flexdist_opaque``) and as a way around a
    torch version whose user-defined-Triton-kernel support fails on these kernels.

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
    op = _fwd_opaque if opaque else _fwd
    out, lse = op(
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
