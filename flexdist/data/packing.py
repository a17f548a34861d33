"""Packing documents into fixed-length windows with per-token document ids, positions and labels.

The corpus (documents in some order, each ending with EOD) is read as one stream and cut into windows of
``seq_len`` tokens. Inside a window every contiguous piece of a document is a *segment*:

- ``doc_ids``: 0, 1, 2, … one id per segment, so a document cut by a window boundary continues in the next
  window under a new id (it cannot attend across the boundary anyway: the previous window is gone);
- ``positions``: restart at 0 in every segment (RoPE positions within the document piece);
- ``labels``: the next token of the same segment; the last token of every segment gets ``IGNORE_INDEX``
  (so no label ever crosses a document, nor a window boundary).

Only whole windows are produced (the tail of an epoch that does not fill one is dropped), so no padding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

IGNORE_INDEX = -100


def pack_segments(segments: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One window from its segments (1-D token arrays, in order): tokens, labels, doc_ids, positions."""
    lengths = np.array([len(s) for s in segments], dtype=np.int64)
    if (lengths <= 0).any():
        raise ValueError(f"segments must be non-empty, got lengths {lengths.tolist()}")
    tokens = np.concatenate(segments).astype(np.int64)
    n = len(tokens)
    doc_ids = np.repeat(np.arange(len(segments), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[np.cumsum(lengths) - 1] = IGNORE_INDEX  # last token of each segment predicts nothing
    return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids, "positions": positions}


class EpochLayout:
    """The stream of one epoch: document order, cumulative offsets, and the segments of window ``w``."""

    def __init__(self, doc_lengths: np.ndarray, order: np.ndarray, seq_len: int) -> None:
        self.order = order
        self.seq_len = seq_len
        lens = doc_lengths[order]
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.num_windows = int(self.offsets[-1] // seq_len)

    def window(self, w: int, tokens: Callable[[int], np.ndarray]) -> dict[str, np.ndarray]:
        """Window ``w`` of this epoch; ``tokens(doc_index)`` reads one document."""
        if not 0 <= w < self.num_windows:
            raise IndexError(f"window {w} out of range [0, {self.num_windows})")
        start, end = w * self.seq_len, (w + 1) * self.seq_len
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        segments = []
        while i < len(self.order) and self.offsets[i] < end:
            doc = tokens(int(self.order[i]))
            lo = max(start - int(self.offsets[i]), 0)
            hi = min(end - int(self.offsets[i]), len(doc))
            segments.append(doc[lo:hi])
            i += 1
        return pack_segments(segments)
