"""Documents in a packed batch: ``doc_ids`` ⇄ lengths / ``cu_seqlens``, run indices, positions in document.

The representation every flexdist mask starts from is ``doc_ids [B, S]``, one integer per token:

- equal ids mark tokens of the same document; ids need not be sorted or consecutive values;
- a **document is a maximal run of equal ids**: ``[7, 7, 3, 3, 7]`` holds three documents (the two runs of
  id 7 are different documents, because attention inside a packed row never crosses a document start);
- a negative id is padding: it belongs to no document, attends to nothing and is attended by nothing.

Internally documents are numbered by their *run index* (how many id changes precede the token in its row), so
unsorted or repeated ids can never make two different documents look alike. All functions here are vectorised
torch (O(B·S) work on the input's device); only the converters that return per-row Python lists of variable
length synchronise with the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "cu_seqlens_to_doc_ids",
    "doc_ids_to_cu_seqlens",
    "doc_ids_to_lengths",
    "document_run_index",
    "lengths_to_doc_ids",
    "positions_in_document",
]

# Positions, run indices and their sentinels are int32 on the device; sentinels of ±2^29 keep every difference
# of two of them inside int32, so sequences are limited to 2^28 tokens.
MAX_TOKENS = 1 << 28


def check_doc_ids(doc_ids: object, name: str = "doc_ids") -> torch.Tensor:
    """``doc_ids`` must be an integer tensor ``[B, S]`` with ``B, S >= 1`` (bool and floats are rejected)."""
    if not isinstance(doc_ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of integer document ids, got {type(doc_ids).__name__}"
        )
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (document ids), got dtype {doc_ids.dtype}")
    if doc_ids.dim() != 2:
        raise ValueError(
            f"{name} must be [B, S] (batch, packed sequence), got shape {tuple(doc_ids.shape)}; "
            f"use {name}[None] for a single row"
        )
    B, S = doc_ids.shape
    if B < 1 or S < 1:
        raise ValueError(f"{name} must have B >= 1 rows and S >= 1 tokens, got shape {(B, S)}")
    if S >= MAX_TOKENS:
        raise ValueError(f"{name} has S={S} tokens; at most {MAX_TOKENS - 1} are supported")
    return doc_ids


def _run_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B, S]``: True where a token starts a new run of equal ids (always at s = 0)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_run_index(doc_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, S]``: the index of the token's run of equal ids within its row, or -1 for padding.

    Two tokens are in the same document exactly when they have the same (non-negative) run index. Runs of
    padding are counted too, so run indices of a row are increasing but may skip values.
    """
    doc_ids = check_doc_ids(doc_ids)
    changes = torch.cumsum(doc_ids[:, 1:] != doc_ids[:, :-1], dim=1, dtype=torch.int32)
    return F.pad(changes, (1, 0), value=0).masked_fill_(doc_ids < 0, -1)


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, S]``: each token's position within its document, restarting at 0 at every document start.

    This is the position RoPE should see for packed documents, and what prefix-LM compares against the
    prefix length. Padding tokens get 0. Vectorised, O(S) per row (a running maximum of run start indices).
    """
    doc_ids = check_doc_ids(doc_ids)
    S = doc_ids.shape[1]
    ar = torch.arange(S, device=doc_ids.device)
    start_idx = torch.where(_run_starts(doc_ids), ar, torch.zeros_like(ar))
    start = torch.cummax(start_idx, dim=1).values
    pos = ar - start
    return torch.where(doc_ids < 0, torch.zeros_like(pos), pos)


def doc_ids_to_lengths(doc_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per batch row, an int64 tensor of its documents' lengths in order (padding belongs to none).

    ``lengths_to_doc_ids(doc_ids_to_lengths(x), S)`` equals ``x`` up to renumbering of ids whenever padding
    only occurs at the end of rows. Synchronises with the host (row lengths are data-dependent).
    """
    doc_ids = check_doc_ids(doc_ids)
    starts = _run_starts(doc_ids) & (doc_ids >= 0)
    run = torch.cumsum(starts, dim=1) - 1  # document number of each non-padding token
    out = []
    for b in range(doc_ids.shape[0]):
        keep = doc_ids[b] >= 0
        n_docs = int(starts[b].sum())
        lengths = torch.zeros(n_docs, dtype=torch.int64, device=doc_ids.device)
        lengths.index_add_(0, run[b][keep], torch.ones_like(run[b][keep]))
        out.append(lengths)
    return out


def doc_ids_to_cu_seqlens(doc_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per batch row, int32 ``cu_seqlens = [0, l0, l0+l1, ...]`` of its documents (FlashAttention varlen style).

    As in varlen attention the offsets index the row's *non-padding* tokens (``row[row >= 0]``); with padding
    only at the end of the row they are also offsets into the row itself.
    """
    out = []
    for lengths in doc_ids_to_lengths(doc_ids):
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0)
        out.append(cu)
    return out


def _as_length_rows(lengths: object, name: str) -> list[torch.Tensor]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}")
        if lengths.dim() == 1:
            return [lengths]
        if lengths.dim() == 2:
            return list(lengths)
        raise ValueError(f"{name} must be 1-D (one row) or 2-D [B, n], got shape {tuple(lengths.shape)}")
    if isinstance(lengths, Sequence) and not isinstance(lengths, str):
        if len(lengths) == 0:
            raise ValueError(f"{name} is empty: give at least one batch row")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
            return [torch.tensor(lengths, dtype=torch.int64)]
        rows = []
        for i, row in enumerate(lengths):
            if isinstance(row, torch.Tensor):
                t = row
            elif isinstance(row, Sequence) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in row
            ):
                t = torch.tensor(list(row), dtype=torch.int64)  # also an empty row: no documents
            else:
                raise TypeError(f"{name}[{i}] must be a 1-D sequence of integers, got {row!r}")
            if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(
                    f"{name}[{i}] must be a 1-D sequence of integers, got {t.dtype} {tuple(t.shape)}"
                )
            rows.append(t)
        return rows
    raise TypeError(
        f"{name} must be a tensor or a sequence of per-row sequences, got {type(lengths).__name__}"
    )


def lengths_to_doc_ids(
    lengths: torch.Tensor | Sequence, seq_len: int | None = None, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 ``doc_ids [B, seq_len]`` from per-row document lengths; ids count 0, 1, ... per row, rest is -1.

    ``lengths``: a 1-D sequence/tensor (one row), a 2-D tensor ``[B, n]`` or a list of per-row sequences.
    Zero-length documents are allowed (they produce no tokens; the following documents keep their index, so
    ids may skip values). Tokens after the last document are padding (-1). ``seq_len`` defaults to the
    longest row's total; a row longer than ``seq_len`` is an error.
    """
    rows = _as_length_rows(lengths, "lengths")
    dev = torch.device(device) if device is not None else rows[0].device
    n = max(int(r.numel()) for r in rows)
    L = torch.zeros(len(rows), n, dtype=torch.int64, device=dev)
    for b, r in enumerate(rows):
        L[b, : r.numel()] = r.to(device=dev, dtype=torch.int64)
    if n and bool((L < 0).any()):
        bad = [r.tolist() for r in rows if r.numel() and int(r.min()) < 0]
        raise ValueError(f"lengths must be >= 0, got rows {bad}")
    ends = torch.cumsum(L, dim=1)
    totals = ends[:, -1] if n else torch.zeros(len(rows), dtype=torch.int64, device=dev)
    total_max = int(totals.max())
    if seq_len is None:
        seq_len = total_max
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 token, got {seq_len}")
    if total_max > seq_len:
        raise ValueError(f"documents of a row total {total_max} tokens but seq_len={seq_len}")
    ar = torch.arange(seq_len, device=dev).expand(len(rows), seq_len).contiguous()
    ids = torch.searchsorted(ends, ar, right=True)  # first document whose end lies after the token
    return torch.where(ar < totals[:, None], ids, torch.full_like(ids, -1))


def cu_seqlens_to_doc_ids(
    cu_seqlens: torch.Tensor | Sequence,
    seq_len: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int64 ``doc_ids [B, seq_len]`` from per-row ``cu_seqlens`` (``[0, l0, l0+l1, ...]``; equal neighbours =
    empty documents). Accepts one row (1-D), a 2-D tensor ``[B, n+1]`` or a list of rows; see
    `lengths_to_doc_ids` for padding and ``seq_len``."""
    rows = _as_length_rows(cu_seqlens, "cu_seqlens")
    lengths = []
    for i, r in enumerate(rows):
        if r.numel() < 1 or int(r[0]) != 0:
            raise ValueError(f"cu_seqlens[{i}] must start with 0, got {r.tolist()}")
        d = torch.diff(r.to(torch.int64))
        if bool((d < 0).any()):
            raise ValueError(f"cu_seqlens[{i}] must be non-decreasing, got {r.tolist()}")
        lengths.append(d)
    return lengths_to_doc_ids(lengths, seq_len, device=device if device is not None else rows[0].device)
