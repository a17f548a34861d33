"""flexdist.kernels — the Triton block-sparse flex-attention kernel and its dense reference.

This folder is installed as ``flexdist.kernels`` (pyproject ``package-dir``), never as a top-level
``kernels`` package. It knows nothing of distributed code.

Public API (semantics of ``torch.nn.attention.flex_attention``; layout ``[B, H, S, D]``):
- ``flex_attention(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False)``
- ``flex_attention_forward(q, k, v, block_mask=None, score_mod=None, scale=None, enable_gqa=False, *,
  q_global_idx=None, kv_global_idx=None, backend="auto", out_acc=None, lse_acc=None, head_group=None,
  out=None) -> (out, lse)``; ``out_acc`` / ``lse_acc``: a running fp32 result merged into in place, or,
  with ``out`` too, merged into ``out`` (``out_acc`` only read)
- ``flex_attention_backward(q, k, v, out, dout, lse, block_mask=None, score_mod=None, scale=None,
  enable_gqa=False, *, delta=None, dlse=None, q_global_idx=None, kv_global_idx=None, score_mod_grads=None,
  backend="auto", dq_out=None, dk_out=None, dv_out=None, which="all", head_group=None, accumulate=True)
  -> (dq, dk, dv)`` where ``lse`` is the global (merged) natural-log LSE; ``*_out`` are added into
  (``accumulate=True``) or overwritten (``accumulate=False``).
- ``backend="auto"``: the kernels on CUDA (or on CPU with ``TRITON_INTERPRET=1``), else the reference; on
  Hopper the forward and the dQ and dK/dV passes run the Gluon kernels (``gluon_fwd.py``, ``gluon_bwd.py``) where they
  cover the call; ``"triton"`` / ``"gluon"`` / ``"reference"`` force one. Built-in score mods (SoftCap, ALiBi, RelativeBias) run in the
  kernel; another Python score_mod falls back to the reference with a warning. See kernels/README.md.
- the dense references ``reference_forward``, ``reference_backward``, ``flex_attention_reference``.
"""

from .document_mask import DocumentMaskMod
from .flex import flex_attention, flex_attention_backward, flex_attention_forward, resolve_backend
from .ops import document_attention
from .reference import flex_attention_reference, reference_backward, reference_forward
from .score_mods import ALiBi, RelativeBias, SoftCap

__all__ = [
    "ALiBi",
    "DocumentMaskMod",
    "RelativeBias",
    "SoftCap",
    "document_attention",
    "flex_attention",
    "flex_attention_backward",
    "flex_attention_forward",
    "flex_attention_reference",
    "reference_backward",
    "reference_forward",
    "resolve_backend",
]
