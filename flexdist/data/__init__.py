"""flexdist.data — byte tokenizer, document sources and the packed, dp-sharded, resumable loader.

Batches are dicts of ``[micro_batch, seq_len]`` int64 tensors: ``tokens``, ``labels`` (``IGNORE_INDEX`` on the
last token of every document piece), ``doc_ids`` (0, 1, … per window) and ``positions`` (restarting at 0 in
each document piece). See ``packing.py`` for the exact rules.
"""

from .loader import PackedLoader
from .packing import IGNORE_INDEX, EpochLayout, pack_segments
from .sources import DocumentSource, JsonlSource, StdlibSource, TextFolderSource, TokenFileSource
from .tokenizer import ByteTokenizer

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "DocumentSource",
    "EpochLayout",
    "JsonlSource",
    "PackedLoader",
    "StdlibSource",
    "TextFolderSource",
    "TokenFileSource",
    "pack_segments",
]
