"""Triton forward kernel (interim: not yet implemented)."""

from __future__ import annotations


def triton_forward(*args, **kwargs):
    raise NotImplementedError("the Triton forward kernel is not implemented yet: use backend='reference'")
