"""Document BlockMasks: converters, element-exact masks and tight block classification vs torch.

Ground truth is independent of flexdist.masks: documents and positions-in-document are recomputed here with
plain Python loops over runs of equal ids, the dense mask follows DESIGN.md's semantics literally, and torch's
``create_block_mask`` classifies blocks element by element from that truth.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flexdist.kernels.document_mask import DocumentMaskMod
from flexdist.kernels.reference import dense_mask
from flexdist.kernels.validation import AttnShape
from flexdist.masks import (
    cu_seqlens_to_doc_ids,
    doc_ids_to_cu_seqlens,
    doc_ids_to_lengths,
    document_block_mask,
    document_run_index,
    lengths_to_doc_ids,
    positions_in_document,
)
from flexdist.masks.block_mask import ordered_indices

# ------------------------------------------------------------------------------------------ backends

# The builders have two implementations with identical results: torch ops (CPU default) and two Triton
# kernels (CUDA default). The Triton one runs on CUDA where there is a GPU, else on the CPU under the Triton
# interpreter (conftest sets TRITON_INTERPRET=1 then); results are compared on the CPU. The interpreter is
# slow, so the long truth tests below take the backend as an argument with torch as default and
# test_masks_triton.py calls them (fewer cases) for Triton, next to its bit-for-bit comparison of the two.
BACKENDS = ["torch", "triton"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mask_to_cpu(bm):
    """BlockMask.to("cpu"), also moving the DocumentMaskMod's per-token tensors (BlockMask.to can't see them)."""
    out = bm.to("cpu")
    mm = bm.mask_mod
    out.mask_mod = DocumentMaskMod(
        mm.q_doc.cpu(),
        mm.kv_doc.cpu(),
        mm.q_pos.cpu(),
        mm.kv_pos.cpu(),
        causal=mm.causal,
        window=mm.window,
        kv_in_prefix=None if mm.kv_in_prefix is None else mm.kv_in_prefix.cpu(),
    )
    return out


def _on(device: str, kw: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def build_mask(doc_ids: torch.Tensor, backend: str = "torch", **kw):
    """`document_block_mask` with the given backend, inputs on that backend's device, result on the CPU."""
    if backend == "torch":
        return document_block_mask(doc_ids, backend="torch", **kw)
    bm = document_block_mask(doc_ids.to(TRITON_DEVICE), backend="triton", **_on(TRITON_DEVICE, kw))
    return mask_to_cpu(bm)


# ------------------------------------------------------------------------------------------ ground truth


def naive_runs(doc_ids: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Per token: document number (-1 padding) and position in document, by walking each row."""
    runs, pids = [], []
    for row in doc_ids.tolist():
        run, pid, cur, prev, start = [], [], -1, None, 0
        for s, d in enumerate(row):
            if s == 0 or d != prev:
                cur += 1
                start = s
            prev = d
            run.append(cur if d >= 0 else -1)
            pid.append(s - start if d >= 0 else 0)
        runs.append(run)
        pids.append(pid)
    return runs, pids


def naive_dense(doc_ids, q_pos, kv_pos, causal=True, window=None, prefix=None) -> torch.Tensor:
    """bool [B, Lq, Lkv] straight from the semantics in DESIGN.md."""
    B, _ = doc_ids.shape
    runs, pids = naive_runs(doc_ids)
    run = torch.tensor(runs)
    pid = torch.tensor(pids)
    bi = torch.arange(B)[:, None]
    qr, kr = run[bi, q_pos][:, :, None], run[bi, kv_pos][:, None, :]
    d = q_pos[:, :, None] - kv_pos[:, None, :]
    same = (qr == kr) & (qr >= 0)
    if causal:
        vis = d >= 0
        if window is not None:
            vis &= d < window
    elif window is not None:
        vis = d.abs() < window
    else:
        vis = torch.ones_like(same)
    if prefix is not None:
        if isinstance(prefix, int):
            p_tok = torch.full_like(pid, prefix)
        else:
            table = prefix.expand(B, -1) if prefix.dim() == 1 else prefix
            p_tok = table.gather(1, doc_ids.clamp(min=0))
        vis = vis | (pid < p_tok)[bi, kv_pos][:, None, :]
    return same & vis


def truth_mask_mod(dense: torch.Tensor):
    return lambda b, h, q, k: dense[b, q, k]


# ------------------------------------------------------------------------------------------ layouts


def random_doc_ids(rng: random.Random, B: int, S: int, ids: str = "sorted") -> torch.Tensor:
    """Rows of documents of mixed lengths (1 token .. longer than S/2), padding runs inside and at the end.

    ids: "sorted" (0, 1, 2, ...), "shuffled" (distinct, random order), "reused" (a small pool, so equal ids
    occur in different, non-adjacent documents; adjacent equal ids simply merge into one document).
    """
    out = torch.empty(B, S, dtype=torch.long)
    for b in range(B):
        row: list[int] = []
        n = 0
        while len(row) < S:
            kind = rng.random()
            if kind < 0.1:
                row += [-rng.randint(1, 3)] * rng.randint(1, 9)  # padding run
                continue
            if kind < 0.3:
                length = 1
            elif kind < 0.55:
                length = rng.randint(2, 12)
            elif kind < 0.9:
                length = rng.randint(13, max(14, S // 4))
            else:
                length = rng.randint(max(1, S // 2), S)
            row += [n] * length
            n += 1
        if rng.random() < 0.5:
            tail = rng.randint(1, max(1, S // 8))
            row[S - tail :] = [-1] * tail
        row = row[:S]
        if ids != "sorted":
            labels = list(range(n))
            rng.shuffle(labels)
            if ids == "reused":
                labels = [x % 4 for x in labels]
            row = [labels[x] if x >= 0 else x for x in row]
        out[b] = torch.tensor(row)
    return out


def zigzag_positions(S: int, N: int, B: int = 1) -> torch.Tensor:
    """[N, B, S/N]: rank r holds chunks r and 2N-1-r of 2N equal chunks (the usual causal balancing)."""
    c = S // (2 * N)
    chunks = torch.arange(S).view(2 * N, c)
    pos = torch.stack([torch.cat([chunks[r], chunks[2 * N - 1 - r]]) for r in range(N)])
    return pos[:, None, :].expand(N, B, 2 * c).contiguous()


def block_permuted_positions(rng: random.Random, S: int, bs: int) -> torch.Tensor:
    """All S positions with whole blocks of bs shuffled (a short last block, if any, stays last)."""
    nb = S // bs
    order = list(range(nb))
    rng.shuffle(order)
    parts = [torch.arange(i * bs, (i + 1) * bs) for i in order]
    if S % bs:
        parts.append(torch.arange(nb * bs, S))
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------ comparison


def block_classes(bm, nq: int, nk: int) -> torch.Tensor:
    """int [B, nq, nk]: 0 empty, 1 partial, 2 full, read from the kv-major tables of a BlockMask."""
    B = bm.kv_num_blocks.shape[0]
    out = torch.zeros(B, nq, nk, dtype=torch.long)
    for cls, num, idx in (
        (1, bm.kv_num_blocks, bm.kv_indices),
        (2, bm.full_kv_num_blocks, bm.full_kv_indices),
    ):
        for b in range(B):
            for i in range(nq):
                cols = idx[b, 0, i, : int(num[b, 0, i])].long()
                assert int((out[b, i, cols] != 0).sum()) == 0, "a block is listed twice"
                out[b, i, cols] = cls
    return out


def check_against_truth(bm, doc_ids, q_pos, kv_pos, bs, causal, window, prefix, exact_blocks: bool) -> None:
    B = doc_ids.shape[0]
    Lq, Lkv = q_pos.shape[-1], kv_pos.shape[-1]
    truth = naive_dense(doc_ids, q_pos, kv_pos, causal, window, prefix)
    shape = AttnShape(B, 1, 1, Lq, Lkv, 8, 8)
    ours = dense_mask(bm, shape, torch.device("cpu"))[:, 0]
    assert torch.equal(ours, truth), f"{int((ours != truth).sum())} elements differ from the truth"
    # the mask_mod alone (as the kernel evaluates it in partial blocks) is exact everywhere
    b = torch.arange(B).view(-1, 1, 1, 1)
    elem = bm.mask_mod(b, 0, torch.arange(Lq).view(1, 1, -1, 1), torch.arange(Lkv).view(1, 1, 1, -1))
    assert torch.equal(elem[:, 0], truth)
    ref = create_block_mask(truth_mask_mod(truth), B, None, Lq, Lkv, device="cpu", BLOCK_SIZE=bs)
    assert torch.equal(dense_mask(ref, shape, torch.device("cpu"))[:, 0], truth)
    nq, nk = -(-Lq // bs), -(-Lkv // bs)
    mine, theirs = block_classes(bm, nq, nk), block_classes(ref, nq, nk)
    # never wrong: a block we call full is full, a block we call empty is empty
    assert not ((mine == 2) & (theirs != 2)).any(), "block marked full is not fully visible"
    assert not ((mine == 0) & (theirs != 0)).any(), "block marked empty has visible elements"
    if exact_blocks:
        assert torch.equal(mine, theirs), "classification less tight than create_block_mask"
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(bm, name), getattr(ref, name)), name
        for name in ("q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(bm, name), getattr(ref, name)), name
    # the q-major tables (used by backward) are the transpose of the kv-major ones
    for num, idx, cls in ((bm.q_num_blocks, bm.q_indices, 1), (bm.full_q_num_blocks, bm.full_q_indices, 2)):
        tr = torch.zeros(B, nk, nq, dtype=torch.bool)
        for bb in range(B):
            for j in range(nk):
                tr[bb, j, idx[bb, 0, j, : int(num[bb, 0, j])].long()] = True
        assert torch.equal(tr, (mine == cls).transpose(1, 2))
    assert tuple(bm.seq_lengths) == (Lq, Lkv)


CONFIGS = [
    dict(causal=True, window=None, prefix=None),
    dict(causal=True, window=37, prefix=None),
    dict(causal=False, window=None, prefix=None),
    dict(causal=False, window=50, prefix=None),
    dict(causal=True, window=None, prefix=9),
    dict(causal=True, window=20, prefix=5),
    dict(causal=False, window=16, prefix=3),
    dict(causal=True, window=None, prefix="table"),
]


def _prefix_arg(prefix, doc_ids, rng):
    if prefix != "table":
        return prefix
    n_ids = int(doc_ids.max()) + 1
    return torch.tensor([rng.randint(0, 40) for _ in range(n_ids)])


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("ids", ["sorted", "shuffled", "reused"])
def test_full_mask_matches_truth(cfg, ids, backend="torch"):
    c = CONFIGS[cfg]
    rng = random.Random(100 * cfg + len(ids))
    for S, bs, B in ((300, 32, 2), (256, 64, 1), (97, 16, 3)):  # lengths not multiples of the block too
        doc = random_doc_ids(rng, B, S, ids)
        prefix = _prefix_arg(c["prefix"], doc, rng)
        bm = build_mask(
            doc, backend, causal=c["causal"], window=c["window"], prefix_lengths=prefix, block_size=bs
        )
        pos = torch.arange(S).expand(B, S)
        check_against_truth(bm, doc, pos, pos, bs, c["causal"], c["window"], prefix, exact_blocks=True)


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_rank_shards_match_truth(cfg, backend="torch"):
    """q / kv positions of CP ranks: contiguous shards at unaligned offsets, zigzag chunks, block
    permutations (all exact), and arbitrary token permutations (correct, classification may be looser)."""
    c = CONFIGS[cfg]
    rng = random.Random(7 + cfg)
    S, bs, B = 384, 32, 2
    doc = random_doc_ids(rng, B, S, "shuffled")
    prefix = _prefix_arg(c["prefix"], doc, rng)
    zz = zigzag_positions(S, 3, B)  # 3 ranks (odd), chunk 64
    cases = [
        (torch.arange(40, 200), torch.arange(0, 136), True),  # contiguous, offsets not block-aligned
        (zz[2], zz[0], True),
        (zz[1, 0], zz[1, 0], True),  # 1-D positions broadcast over B
        (block_permuted_positions(rng, S, bs), block_permuted_positions(rng, S, bs)[:200], True),
        (torch.randperm(S, generator=torch.Generator().manual_seed(cfg))[:150], torch.arange(S), False),
    ]
    for qp, kp, exact in cases:
        bm = build_mask(
            doc,
            backend,
            q_positions=qp,
            kv_positions=kp,
            causal=c["causal"],
            window=c["window"],
            prefix_lengths=prefix,
            block_size=bs,
        )
        qpb = qp.expand(B, -1) if qp.dim() == 1 else qp
        kpb = kp.expand(B, -1) if kp.dim() == 1 else kp
        check_against_truth(bm, doc, qpb, kpb, bs, c["causal"], c["window"], prefix, exact_blocks=exact)


@pytest.mark.parametrize("seed", range(4))
def test_random_layouts_fuzz(seed, backend="torch", iterations=60):
    """Many small random cases: random sizes, block sizes, configs, prefix ints / per-document tables, and
    position sets (whole sequence, unaligned contiguous slices, block permutations: exact; random tokens with
    repeats: correct only)."""
    rng = random.Random(1000 + seed)
    for it in range(iterations):
        B, S, bs = rng.randint(1, 2), rng.randint(1, 160), rng.choice([4, 8, 16, 32])
        doc = random_doc_ids(rng, B, S, rng.choice(["sorted", "shuffled", "reused"]))
        causal = rng.random() < 0.6
        window = rng.choice([None, None, rng.randint(1, 60)])
        pk = rng.random()
        if pk < 0.4:
            prefix = None
        elif pk < 0.7:
            prefix = rng.randint(0, 20)
        else:
            prefix = torch.tensor([rng.randint(0, 20) for _ in range(int(doc.max().clamp(min=0)) + 1)])
        mode = rng.random()
        if mode < 0.25:
            qp, kp = torch.arange(S), torch.arange(S)
        elif mode < 0.6:
            a, c = rng.randint(0, S - 1), rng.randint(0, S - 1)
            qp, kp = torch.arange(a, rng.randint(a + 1, S)), torch.arange(c, rng.randint(c + 1, S))
        elif mode < 0.85:
            qp, kp = block_permuted_positions(rng, S, bs), block_permuted_positions(rng, S, bs)
        else:
            g = torch.Generator().manual_seed(seed * 1000 + it)
            qp = torch.randint(0, S, (rng.randint(1, 100),), generator=g)
            kp = torch.randint(0, S, (rng.randint(1, 100),), generator=g)
        bm = build_mask(
            doc,
            backend,
            q_positions=qp,
            kv_positions=kp,
            causal=causal,
            window=window,
            prefix_lengths=prefix,
            block_size=bs,
        )
        qpb, kpb = qp.expand(B, -1), kp.expand(B, -1)
        check_against_truth(bm, doc, qpb, kpb, bs, causal, window, prefix, exact_blocks=mode < 0.85)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_layouts(backend):
    """All padding, one token, one document longer than everything, a block of only padding, B > 1."""
    cases = [
        torch.full((1, 70), -1),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(2, 200, dtype=torch.long),
        torch.tensor([[5] * 40 + [-1] * 40 + [5] * 40 + [2] * 8]),  # equal ids across padding: two documents
        torch.tensor([[3, 3, 1, 1, 3, 3] * 20]),  # "reused" ids, documents of 2 tokens
    ]
    for doc in cases:
        for causal, window, prefix in ((True, None, None), (False, None, None), (True, 5, 3)):
            bm = build_mask(doc, backend, causal=causal, window=window, prefix_lengths=prefix, block_size=16)
            B, S = doc.shape
            pos = torch.arange(S).expand(B, S)
            check_against_truth(bm, doc, pos, pos, 16, causal, window, prefix, exact_blocks=True)


def test_non_square_block_size(backend="torch"):
    rng = random.Random(3)
    doc = random_doc_ids(rng, 2, 200, "sorted")
    bm = build_mask(doc, backend, block_size=(32, 16), window=40)
    truth = naive_dense(doc, torch.arange(200).expand(2, 200), torch.arange(200).expand(2, 200), True, 40)
    ref = create_block_mask(truth_mask_mod(truth), 2, None, 200, 200, device="cpu", BLOCK_SIZE=(32, 16))
    for name in ("kv_num_blocks", "full_kv_num_blocks", "kv_indices", "full_kv_indices", "q_num_blocks"):
        assert torch.equal(getattr(bm, name), getattr(ref, name)), name
    assert bm.BLOCK_SIZE == (32, 16)


def test_flex_attention_same_output_with_our_mask():
    """torch's own flex_attention (CPU eager) gives the same output with our BlockMask as with
    create_block_mask's, on a CP-like shard (zigzag queries against another rank's keys) and the full mask."""
    torch.manual_seed(0)
    rng = random.Random(11)
    B, H, S, D, bs = 2, 2, 256, 16, 32
    doc = random_doc_ids(rng, B, S, "reused")
    zz = zigzag_positions(S, 2, B)
    for qp, kp in ((None, None), (zz[1], zz[0]), (zz[0], zz[0])):
        kw = {} if qp is None else dict(q_positions=qp, kv_positions=kp)
        bm = document_block_mask(doc, window=90, prefix_lengths=4, block_size=bs, **kw)
        Lq, Lkv = bm.seq_lengths
        q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lkv, D), torch.randn(B, H, Lkv, D)
        ref = create_block_mask(bm.mask_mod, B, None, Lq, Lkv, device="cpu", BLOCK_SIZE=bs)
        out = flex_attention(q, k, v, block_mask=bm)
        out_ref = flex_attention(q, k, v, block_mask=ref)
        torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-6, equal_nan=True)
        # and against dense fp32 softmax attention with the truth mask, on rows that see something
        qpb = torch.arange(S).expand(B, S) if qp is None else qp
        kpb = torch.arange(S).expand(B, S) if kp is None else kp
        truth = naive_dense(doc, qpb, kpb, True, 90, 4)[:, None]
        s = (q @ k.transpose(-1, -2) * D**-0.5).masked_fill(~truth, float("-inf"))
        rows = truth.any(-1)
        dense = torch.softmax(s, -1).nan_to_num(0.0) @ v
        torch.testing.assert_close(
            out[rows.expand(B, H, Lq)], dense[rows.expand(B, H, Lq)], atol=1e-5, rtol=1e-5
        )


# ------------------------------------------------------------------------------------------ converters


def test_run_index_and_positions_in_document():
    rng = random.Random(5)
    for ids in ("sorted", "shuffled", "reused"):
        doc = random_doc_ids(rng, 3, 150, ids)
        runs, pids = naive_runs(doc)
        run = document_run_index(doc)
        assert run.dtype == torch.int32
        # same document <=> same run index (values may differ from the naive numbering)
        naive = torch.tensor(runs)
        same_ours = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0)
        same_naive = (naive[:, :, None] == naive[:, None, :]) & (naive[:, :, None] >= 0)
        assert torch.equal(same_ours, same_naive)
        assert torch.equal((run < 0), (doc < 0))
        assert torch.equal(positions_in_document(doc), torch.tensor(pids))
    assert positions_in_document(torch.tensor([[4, 4, 4, 2, -1, -1, 2, 2]])).tolist() == [
        [0, 1, 2, 0, 0, 0, 0, 1]
    ]


def test_lengths_and_cu_seqlens_round_trip():
    doc = lengths_to_doc_ids([[3, 0, 1, 4], [5]], 10)
    assert doc.tolist() == [
        [0, 0, 0, 2, 3, 3, 3, 3, -1, -1],
        [0, 0, 0, 0, 0, -1, -1, -1, -1, -1],
    ]
    assert [x.tolist() for x in doc_ids_to_lengths(doc)] == [[3, 1, 4], [5]]
    assert [x.tolist() for x in doc_ids_to_cu_seqlens(doc)] == [[0, 3, 4, 8], [0, 5]]
    assert torch.equal(cu_seqlens_to_doc_ids(torch.tensor([0, 3, 3, 4, 8]), 10)[0], doc[0])
    assert torch.equal(cu_seqlens_to_doc_ids([[0, 3, 3, 4, 8], [0, 5]], 10), doc)
    # 2-D lengths tensor (zeros pad the list of documents), default seq_len = longest row
    d2 = lengths_to_doc_ids(torch.tensor([[2, 2, 0], [1, 0, 0]]))
    assert d2.tolist() == [[0, 0, 1, 1], [0, -1, -1, -1]]
    rng = random.Random(9)
    for _ in range(5):
        doc = random_doc_ids(rng, 2, 120, "shuffled")
        # padding in the middle splits documents; cu_seqlens index the non-padding tokens
        for b, (lengths, cu) in enumerate(
            zip(doc_ids_to_lengths(doc), doc_ids_to_cu_seqlens(doc), strict=True)
        ):
            assert int(lengths.sum()) == int((doc[b] >= 0).sum())
            assert torch.equal(cu[1:].long(), torch.cumsum(lengths, 0))
            runs, _ = naive_runs(doc[b : b + 1])
            assert lengths.numel() == len({r for r in runs[0] if r >= 0})
        lengths = doc_ids_to_lengths(doc)
        back = lengths_to_doc_ids(lengths, 200)
        for b in range(2):  # same documents, padding moved to the end
            assert torch.equal(doc_ids_to_lengths(back[b : b + 1])[0], lengths[b])


def test_ordered_indices_equals_stable_argsort():
    g = torch.Generator().manual_seed(0)
    active = torch.rand(3, 5, 17, 23, generator=g) < 0.3
    num, idx = ordered_indices(active)
    ref = torch.argsort(active.to(torch.int32), dim=-1, descending=True, stable=True)
    assert torch.equal(idx.long(), ref) and torch.equal(num.long(), active.sum(-1))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    doc = torch.zeros(2, 64, dtype=torch.long)

    def mk(doc_ids, **kw):
        return build_mask(doc_ids, backend, **kw)

    with pytest.raises(TypeError, match="integer"):
        mk(doc.float())
    with pytest.raises(TypeError, match="integer"):
        mk(doc.bool())
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        mk(doc[0])
    with pytest.raises(ValueError, match="q_positions"):
        mk(doc, q_positions=torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"q_positions must lie in \[0, S=64\)"):
        mk(doc, q_positions=torch.arange(60, 70))
    with pytest.raises(ValueError, match="kv_positions must lie"):
        mk(doc, kv_positions=torch.tensor([-1, 0, 1]))
    with pytest.raises(TypeError, match="kv_positions must be an integer"):
        mk(doc, kv_positions=torch.arange(4.0))
    with pytest.raises(ValueError, match="window must be >= 1"):
        mk(doc, window=0)
    with pytest.raises(TypeError, match="block_size"):
        mk(doc, block_size=1.5)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        mk(doc, block_size=0)
    with pytest.raises(ValueError, match="prefix_lengths must be >= 0"):
        mk(doc, prefix_lengths=-1)
    with pytest.raises(ValueError, match="holds id 3"):
        mk(doc + 3, prefix_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prefix_lengths"):
        mk(doc, prefix_lengths=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_len"):
        lengths_to_doc_ids([[5, 6]], 10)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        lengths_to_doc_ids([[5, -1]], 10)
    with pytest.raises(ValueError, match="start with 0"):
        cu_seqlens_to_doc_ids([1, 3])
    with pytest.raises(ValueError, match="non-decreasing"):
        cu_seqlens_to_doc_ids([0, 3, 2])
    with pytest.raises(TypeError, match="integer"):
        positions_in_document(torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------ consumers


def test_flexdist_kernel_accepts_our_mask(device):
    """flexdist's own kernel (Triton on CUDA; the interpreter on CPU) evaluates our DocumentMaskMod natively in
    partial blocks and gives the dense reference's result for a CP-like shard pair with window and prefix."""
    from flexdist.kernels import flex_attention_forward, reference_forward

    torch.manual_seed(1)
    rng = random.Random(4)
    B, H, S, D, bs = 1, 2, 256, 32, 64
    doc = random_doc_ids(rng, B, S, "reused").to(device)
    zz = zigzag_positions(S, 2, B).to(device)
    bm = document_block_mask(
        doc, q_positions=zz[1], kv_positions=zz[0], window=100, prefix_lengths=3, block_size=bs
    )
    q, k, v = (torch.randn(B, H, S // 2, D, device=device) for _ in range(3))
    out, lse = flex_attention_forward(q, k, v, bm, backend="triton")
    out_ref, lse_ref = reference_forward(q, k, v, bm)
    tol = 2e-4  # fp32 (the kernel tests' tolerance; the GPU's dot products may round differently)
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, lse_ref, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))


@pytest.mark.gpu
def test_cuda_builds_the_same_masks():
    """The CUDA default (Triton kernels) gives the CPU torch path's tables and token tensors, bit for bit."""
    from flexdist.masks import rank_step_block_masks

    rng = random.Random(8)
    doc = random_doc_ids(rng, 2, 1024, "shuffled")
    pos = zigzag_positions(1024, 4, 2)
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    names += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    cases = (
        dict(),
        dict(window=100, prefix_lengths=7),
        dict(causal=False, window=33),
        dict(block_size=(64, 32)),
    )
    for kw in cases:
        kw = {"block_size": 64, **kw}
        cpu = document_block_mask(doc, **kw)
        gpu = document_block_mask(doc.cuda(), **kw)
        for name in names:
            assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
        for name in ("q_doc", "kv_doc", "q_pos", "kv_pos"):
            assert torch.equal(getattr(gpu.mask_mod, name).cpu(), getattr(cpu.mask_mod, name)), name
        for q_ranks in (None, [3, 1]):
            m_cpu = rank_step_block_masks(doc, pos, q_ranks=q_ranks, **kw)
            m_gpu = rank_step_block_masks(doc.cuda(), pos.cuda(), q_ranks=q_ranks, **kw)
            assert torch.equal(m_cpu.counts_cpu(), m_gpu.counts_cpu())
            for r in m_cpu.q_ranks:
                for j in range(4):
                    for name in names:
                        assert torch.equal(
                            getattr(m_gpu.get(r, j), name).cpu(), getattr(m_cpu.get(r, j), name)
                        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_are_contiguous_int32(backend):
    """Kernels (torch's compiled template, flexdist's) read the tables by their shapes: keep them dense."""
    doc = random_doc_ids(random.Random(0), 2, 200, "sorted")
    qp = torch.arange(200, dtype=torch.int32).view(50, 4).t()[:2]  # [B=2, 50], strides (1, 4)
    assert not qp.is_contiguous()
    bm = build_mask(doc, backend, q_positions=qp, block_size=32)
    tables = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    tables += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    for name in tables:
        t = getattr(bm, name)
        assert t.is_contiguous() and t.dtype == torch.int32, name
    for name in ("q_doc", "kv_doc", "q_pos", "kv_pos"):
        assert getattr(bm.mask_mod, name).is_contiguous(), name
    check_against_truth(bm, doc, qp.long(), torch.arange(200).expand(2, 200), 32, True, None, None, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_prefix_table_and_small_int_ids(backend):
    """prefix_lengths as a [B, num_ids] table (row-specific prefix per id); int32 / int16 doc ids."""
    rng = random.Random(21)
    doc = random_doc_ids(rng, 2, 180, "reused")  # ids 0..3, reused across documents
    table = torch.tensor([[0, 5, 30, 2], [7, 0, 1, 50]])
    pos = torch.arange(180).expand(2, 180)
    for dtype in (torch.int64, torch.int32, torch.int16):
        bm = build_mask(doc.to(dtype), backend, prefix_lengths=table, window=25, block_size=16)
        check_against_truth(bm, doc, pos, pos, 16, True, 25, table, exact_blocks=True)
