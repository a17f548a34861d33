"""Packed-document data: packing invariants, sources, determinism, dp sharding and loader resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flexdist.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DocumentSource,
    JsonlSource,
    PackedLoader,
    StdlibSource,
    TextFolderSource,
    TokenFileSource,
    pack_segments,
)


class ListSource(DocumentSource):
    """Documents given as arrays; each gets EOD appended, ids are 1000 * doc + position (traceable)."""

    def __init__(self, lengths: list[int], eod: int = 7) -> None:
        self.eod_id, self.vocab_size = eod, 10**9
        self.docs = []
        for d, n in enumerate(lengths):
            body = 1000 * (d + 1) + np.arange(n - 1, dtype=np.int64) + 10
            self.docs.append(np.concatenate([body, [eod]]))
        self.doc_lengths = np.array(lengths, dtype=np.int64)

    def tokens(self, i: int) -> np.ndarray:
        return self.docs[i]


def check_window(w: dict[str, torch.Tensor | np.ndarray]) -> None:
    """The invariants every packed window must satisfy."""
    tok, lab = np.asarray(w["tokens"]), np.asarray(w["labels"])
    doc, pos = np.asarray(w["doc_ids"]), np.asarray(w["positions"])
    S = len(tok)
    # doc ids are 0, 1, 2, ... in order, each a contiguous run
    assert doc[0] == 0 and np.all(np.diff(doc) >= 0) and np.all(np.diff(doc) <= 1)
    # positions restart at 0 at every new id and count up inside it
    starts = np.r_[True, doc[1:] != doc[:-1]]
    assert np.all(pos[starts] == 0)
    assert np.all(pos[~starts] == pos[np.flatnonzero(~starts) - 1] + 1)
    # labels: next token of the same document piece, else ignored — never across documents
    for i in range(S):
        if i + 1 < S and doc[i + 1] == doc[i]:
            assert lab[i] == tok[i + 1]
        else:
            assert lab[i] == IGNORE_INDEX


def test_pack_segments_basic() -> None:
    w = pack_segments([np.array([1, 2, 3]), np.array([4, 5]), np.array([6])])
    assert w["tokens"].tolist() == [1, 2, 3, 4, 5, 6]
    assert w["doc_ids"].tolist() == [0, 0, 0, 1, 1, 2]
    assert w["positions"].tolist() == [0, 1, 2, 0, 1, 0]
    assert w["labels"].tolist() == [2, 3, -100, 5, -100, -100]
    with pytest.raises(ValueError, match="non-empty"):
        pack_segments([np.array([1]), np.array([], dtype=np.int64)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_windows_cover_the_stream_and_cut_documents_get_new_ids(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 90, size=60).tolist()
    src = ListSource(lengths)
    S = 64
    loader = PackedLoader(src, seq_len=S, micro_batch=1, shuffle=False)
    n_windows = sum(lengths) // S
    stream = np.concatenate(src.docs)
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    for w in range(n_windows):
        batch = loader.next_batch()
        assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (1, S) for k in batch}
        row = {k: v[0].numpy() for k, v in batch.items()}
        check_window(row)
        # the windows are exactly consecutive slices of the document stream
        np.testing.assert_array_equal(row["tokens"], stream[w * S : (w + 1) * S])
        # segments are exactly the document pieces of this slice
        np.testing.assert_array_equal(
            np.r_[True, row["doc_ids"][1:] != row["doc_ids"][:-1]],
            np.r_[True, doc_of[w * S + 1 : (w + 1) * S] != doc_of[w * S : (w + 1) * S - 1]],
        )
        if w > 0 and doc_of[w * S] == doc_of[w * S - 1]:
            # a document cut by the boundary continues under a new id (0), from position 0
            assert row["doc_ids"][0] == 0 and row["positions"][0] == 0
    assert loader.epoch == 0
    loader.next_batch()  # the tail that does not fill a window is dropped: a new epoch starts
    assert (loader.epoch, loader.cursor) == (1, 1)


def test_eod_is_predicted_and_never_a_cross_document_label() -> None:
    src = ListSource([5, 4, 30])
    batch = PackedLoader(src, seq_len=32, micro_batch=1, shuffle=False).next_batch()
    tok, lab = batch["tokens"][0], batch["labels"][0]
    assert (
        lab[3].item() == 7 and lab[4].item() == IGNORE_INDEX
    )  # last byte predicts EOD; EOD predicts nothing
    assert tok[5].item() == 2010 and lab[8].item() == IGNORE_INDEX


def test_loader_is_deterministic_and_seeded() -> None:
    src = ListSource(np.random.default_rng(0).integers(1, 50, size=200).tolist())
    a = PackedLoader(src, seq_len=32, micro_batch=2, seed=3)
    b = PackedLoader(src, seq_len=32, micro_batch=2, seed=3)
    c = PackedLoader(src, seq_len=32, micro_batch=2, seed=4)
    xa, xb, xc = (torch.cat([ld.next_batch()["tokens"] for _ in range(5)]) for ld in (a, b, c))
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


def test_dp_shards_are_disjoint_and_cover_the_global_batch() -> None:
    src = ListSource(np.random.default_rng(1).integers(1, 50, size=300).tolist())
    kw = dict(seq_len=32, seed=5)
    single = PackedLoader(src, micro_batch=6, **kw)
    ranks = [PackedLoader(src, micro_batch=2, dp_rank=r, dp_size=3, **kw) for r in range(3)]
    for _ in range(4):
        whole = single.next_batch()["tokens"]
        parts = [ld.next_batch()["tokens"] for ld in ranks]
        assert torch.equal(torch.cat(parts), whole)  # rank r holds rows [2r, 2r+2) of the global batch
        rows = {tuple(r.tolist()) for p in parts for r in p}
        assert len(rows) == 6  # disjoint


def test_loader_resume_reproduces_the_stream_across_epochs() -> None:
    src = ListSource(np.random.default_rng(2).integers(1, 40, size=40).tolist())
    a = PackedLoader(src, seq_len=32, micro_batch=2, dp_rank=1, dp_size=2, seed=9)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # plain data: survives any serialisation
    b = PackedLoader(src, seq_len=32, micro_batch=2, dp_rank=1, dp_size=2, seed=9)
    b.load_state_dict(state)
    for _ in range(12):  # long enough to wrap into later epochs
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.epoch >= 1
    with pytest.raises(ValueError, match="seq_len=32 but this run has seq_len=16"):
        PackedLoader(src, seq_len=16, micro_batch=1, seed=9).load_state_dict(state)


def test_loader_rejects_bad_arguments() -> None:
    src = ListSource([10, 10])
    with pytest.raises(ValueError, match="corpus too small"):
        PackedLoader(src, seq_len=16, micro_batch=2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PackedLoader(src, seq_len=4, micro_batch=1, dp_rank=2, dp_size=2)


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "déjà vu — 数据 \n\t"
    ids = tok.encode(text)
    assert ids[-1] == tok.eod_id and len(ids) == len(text.encode()) + 1
    assert tok.decode(ids) == text
    assert tok.vocab_size == 258 and tok.pad_id == 257


def test_stdlib_source_is_the_sorted_stdlib() -> None:
    src = StdlibSource(max_docs=20)
    rel = [p.relative_to(src.root).as_posix() for p in src.paths]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any("site-packages" in r for r in rel)
    for i in (0, 7, 19):
        t = src.tokens(i)
        assert t[-1] == src.eod_id and len(t) == src.doc_lengths[i]
        assert bytes(t[:-1].astype(np.uint8)) == src.paths[i].read_bytes()


def test_text_folder_and_jsonl_sources(tmp_path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "skip.md").write_text("not matched")
    src = TextFolderSource(tmp_path, "*.txt")
    assert [p.name for p in src.paths] == ["a.txt", "b.txt"]  # sorted, empty file dropped
    assert ByteTokenizer().decode(src.tokens(0)) == "first doc"
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"text": "x", "id": 2}) + "\n")
    js = JsonlSource(jl)
    assert js.doc_lengths.tolist() == [7, 2]
    assert ByteTokenizer().decode(js.tokens(0)) == "héllo"
    jl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'"):
        JsonlSource(jl)
    with pytest.raises(ValueError, match="is not a directory"):
        TextFolderSource(tmp_path / "nope")


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_file_source_splits_at_eod(tmp_path, suffix: str) -> None:
    arr = np.array([5, 6, 0, 7, 0, 0, 8, 9, 10], dtype=np.uint16)  # eod = 0; trailing doc has no EOD
    path = tmp_path / f"tok{suffix}"
    if suffix == ".npy":
        np.save(path, arr)
    else:
        arr.tofile(path)
    src = TokenFileSource(path, eod_id=0, vocab_size=11)
    assert [src.tokens(i).tolist() for i in range(len(src))] == [[5, 6, 0], [7, 0], [0], [8, 9, 10]]
    with pytest.raises(ValueError, match=r"token id 10 >= data\.vocab_size=10"):
        TokenFileSource(path, eod_id=0, vocab_size=10)


def test_shuffled_epoch_visits_every_window_exactly_once() -> None:
    lengths = np.random.default_rng(3).integers(1, 70, size=80).tolist()
    src = ListSource(lengths)
    loader = PackedLoader(src, seq_len=16, micro_batch=1, seed=7, shuffle=True)
    layout = loader._epoch_layout()
    stream = np.concatenate([src.docs[i] for i in layout.order])
    expected = {tuple(stream[w * 16 : (w + 1) * 16]) for w in range(layout.num_windows)}
    seen = [tuple(loader.next_batch()["tokens"][0].tolist()) for _ in range(layout.num_windows)]
    assert set(seen) == expected and len(seen) == len(expected)  # a permutation of the epoch's windows
    in_order = [tuple(stream[w * 16 : (w + 1) * 16]) for w in range(layout.num_windows)]
    assert seen != in_order  # and not the stream order
    assert loader.epoch == 0
