"""Byte-level tokenizer: the 256 byte values plus an end-of-document and a padding id.

Nothing to download, exact round trip for any text (UTF-8 bytes), and every machine already has a corpus
for it. Ids 0..255 are the bytes, ``eod_id`` (256) ends every document, ``pad_id`` (257) is never a label.
"""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens; ``vocab_size`` = 258 (256 bytes + EOD + pad)."""

    eod_id: int = 256
    pad_id: int = 257
    vocab_size: int = 258

    def encode(self, text: str | bytes, *, add_eod: bool = True) -> np.ndarray:
        """Token ids (``uint16``) of ``text``; ``add_eod`` appends the end-of-document id."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        if add_eod:
            ids = np.concatenate([ids, np.array([self.eod_id], dtype=np.uint16)])
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids``; special ids are dropped, invalid UTF-8 is replaced (never raises)."""
        arr = np.asarray(ids).astype(np.int64).ravel()
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
