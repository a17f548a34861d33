"""Document sources: an indexable list of documents, each a 1-D array of token ids ending with EOD.

A source only has to say how many documents it has, how long each is (EOD included) and give one document's
tokens on demand. Packing, shuffling and sharding live in ``packing.py`` / ``loader.py`` and are the same for
every source. Empty documents are dropped at indexing time (an EOD alone teaches nothing).

- :class:`StdlibSource`: the default corpus — the Python standard library's own ``.py`` files, one document
  per file, sorted paths. Real text with natural long-tailed lengths, present on every machine.
- :class:`TextFolderSource`: every file matching a glob under a folder, one document per file.
- :class:`JsonlSource`: one document per line of a JSONL file (a ``text`` field by default).
- :class:`TokenFileSource`: pre-tokenised ``.npy`` or raw ``.bin`` token ids; documents end with an EOD id.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np

from .tokenizer import ByteTokenizer


class DocumentSource:
    """Base class: ``len(source)`` documents; ``doc_lengths`` int64 array (EOD included); ``tokens(i)``."""

    vocab_size: int
    eod_id: int
    doc_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def tokens(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class _ByteFilesSource(DocumentSource):
    """Files read lazily as raw bytes + EOD (byte tokenizer: a file's token count is its size + 1)."""

    def __init__(self, paths: list[Path]) -> None:
        tok = ByteTokenizer()
        self.vocab_size, self.eod_id = tok.vocab_size, tok.eod_id
        sizes = [(p, p.stat().st_size) for p in paths]
        self.paths = [p for p, s in sizes if s > 0]
        self.doc_lengths = np.array([s + 1 for _, s in sizes if s > 0], dtype=np.int64)
        if len(self.paths) == 0:
            raise ValueError(f"{type(self).__name__}: no non-empty files found")

    def tokens(self, i: int) -> np.ndarray:
        data = self.paths[i].read_bytes()
        if len(data) + 1 != self.doc_lengths[i]:
            raise RuntimeError(
                f"{self.paths[i]} changed size while training ({len(data)} bytes, indexed "
                f"{self.doc_lengths[i] - 1}); the packing would no longer be deterministic"
            )
        out = np.empty(len(data) + 1, dtype=np.uint16)
        out[:-1] = np.frombuffer(data, dtype=np.uint8)
        out[-1] = self.eod_id
        return out


class StdlibSource(_ByteFilesSource):
    """The Python standard library's ``.py`` files (``sysconfig.get_paths()["stdlib"]``), sorted paths.

    ``site-packages`` and ``__pycache__`` are skipped so the corpus is the same on every machine with the same
    Python version, whatever is installed. ``max_docs`` keeps the first N files (tests).
    """

    def __init__(self, max_docs: int | None = None) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        paths: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
            )
            paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
        paths.sort(key=lambda p: p.relative_to(root).as_posix())
        if max_docs is not None:
            paths = paths[:max_docs]
        self.root = root
        super().__init__(paths)


class TextFolderSource(_ByteFilesSource):
    """Every file under ``path`` matching ``pattern`` (a ``Path.glob`` pattern), sorted, one doc per file."""

    def __init__(
        self, path: str | os.PathLike, pattern: str = "**/*.txt", max_docs: int | None = None
    ) -> None:
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"data.path={str(path)!r} is not a directory")
        paths = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.as_posix())
        if not paths:
            raise ValueError(f"no file under data.path={str(path)!r} matches data.pattern={pattern!r}")
        if max_docs is not None:
            paths = paths[:max_docs]
        super().__init__(paths)


class JsonlSource(DocumentSource):
    """One document per non-empty line of a JSONL file: the UTF-8 bytes of ``record[text_field]`` + EOD."""

    def __init__(
        self, path: str | os.PathLike, text_field: str = "text", max_docs: int | None = None
    ) -> None:
        tok = ByteTokenizer()
        self.vocab_size, self.eod_id = tok.vocab_size, tok.eod_id
        docs: list[np.ndarray] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if text_field not in rec:
                    raise ValueError(
                        f"{path}:{lineno}: record has no field {text_field!r} (keys: {sorted(rec)})"
                    )
                text = rec[text_field]
                if not isinstance(text, str):
                    raise TypeError(
                        f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not str"
                    )
                if text:
                    docs.append(tok.encode(text))
                if max_docs is not None and len(docs) >= max_docs:
                    break
        if not docs:
            raise ValueError(f"{path}: no non-empty {text_field!r} records")
        self.docs = docs
        self.doc_lengths = np.array([len(d) for d in docs], dtype=np.int64)

    def tokens(self, i: int) -> np.ndarray:
        return self.docs[i]


class TokenFileSource(DocumentSource):
    """Pre-tokenised ids: a ``.npy`` array or a raw ``.bin`` of ``dtype``, memory-mapped.

    Documents are the runs ending with ``eod_id`` (EOD included); trailing tokens without a final EOD form the
    last document. Every id must be < ``vocab_size`` (checked on the EOD scan's pass, with the offending value).
    """

    def __init__(
        self, path: str | os.PathLike, *, eod_id: int, vocab_size: int, dtype: str = "uint16"
    ) -> None:
        path = Path(path)
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
        elif path.suffix == ".bin":
            arr = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        else:
            raise ValueError(f"data.path={str(path)!r}: token files must end in .npy or .bin")
        if arr.ndim != 1:
            raise ValueError(f"{path}: token array must be 1-D, got shape {arr.shape}")
        if not 0 <= eod_id < vocab_size:
            raise ValueError(f"data.eod_token={eod_id} must be in [0, data.vocab_size={vocab_size})")
        if len(arr) and int(arr.max()) >= vocab_size:
            raise ValueError(f"{path}: token id {int(arr.max())} >= data.vocab_size={vocab_size}")
        ends = np.flatnonzero(np.asarray(arr) == eod_id) + 1
        if len(ends) == 0 or ends[-1] != len(arr):
            ends = np.append(ends, len(arr))
        starts = np.concatenate([[0], ends[:-1]])
        keep = ends > starts
        self.arr, self.starts, self.ends = arr, starts[keep], ends[keep]
        self.doc_lengths = (self.ends - self.starts).astype(np.int64)
        self.vocab_size, self.eod_id = vocab_size, eod_id
        if len(self.doc_lengths) == 0:
            raise ValueError(f"{path}: no tokens")

    def tokens(self, i: int) -> np.ndarray:
        return np.asarray(self.arr[self.starts[i] : self.ends[i]])
