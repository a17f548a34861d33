"""A score mod restricted to a range of query heads (for strategies that run the kernels on some heads only).

The kernels index per-head score-mod parameters by the head's position *in the call*, so a call on heads
``h0:h1`` needs the parameters of those heads: built-in mods are sliced (views, so gradients of a
RelativeBias table land in the right rows); anything else is rejected rather than silently misindexed.
"""

from __future__ import annotations

from flexdist.kernels import ALiBi, RelativeBias, SoftCap


def slice_score_mod(score_mod, h0: int, h1: int, strategy: str, leaf: bool = False):
    """``score_mod`` for query heads ``h0:h1`` (None and head-independent mods unchanged).

    ``leaf``: a RelativeBias table slice that is a detached leaf keeping the table's ``requires_grad``, for
    backward passes that collect its gradient by hand (``score_mod_grads``): grad mode is off there, so a
    plain slice would not require grad and the kernels would skip its gradient.
    """
    if score_mod is None or isinstance(score_mod, SoftCap):
        return score_mod
    if isinstance(score_mod, ALiBi):
        return ALiBi(score_mod.slopes[h0:h1])
    if isinstance(score_mod, RelativeBias):
        t = score_mod.table
        return RelativeBias(t[h0:h1].detach().requires_grad_(t.requires_grad) if leaf else t[h0:h1])
    raise ValueError(
        f"strategy={strategy!r} runs the kernels on a subset of heads and can only slice the built-in score "
        f"mods (SoftCap, ALiBi, RelativeBias); got {type(score_mod).__name__} — use strategy='ring' or "
        f"'direct' (or head_chunks=1 with 'allgather')"
    )
