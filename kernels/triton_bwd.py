"""Triton backward kernel (interim: not yet implemented)."""

from __future__ import annotations


def triton_backward(*args, **kwargs):
    raise NotImplementedError("the Triton backward kernel is not implemented yet: use backend='reference'")
