"""The Triton mask builder (`flexdist.masks.triton_build`, the CUDA default) equals the torch one bit for bit.

Every table (kv- and q-major, partial and full, the unused tail of each index row included), every per-token
tensor of the DocumentMaskMod and the CP plan's pair counts must be identical between ``backend="triton"``
and ``backend="torch"`` — the torch path is checked element by element against ``create_block_mask`` in
test_masks.py. A smaller set of those truth checks also runs on the Triton path directly. The Triton path
runs on CUDA where there is a GPU, else under the Triton interpreter (slow: cases are kept small).
"""

from __future__ import annotations

import random

import pytest
import test_masks as tm
import torch
from test_masks import (
    CONFIGS,
    TRITON_DEVICE,
    _on,
    _prefix_arg,
    block_permuted_positions,
    build_mask,
    mask_to_cpu,
    random_doc_ids,
    zigzag_positions,
)

from flexdist.masks import document_block_mask, rank_step_block_masks, triton_build
from flexdist.masks.block_mask import use_triton

TABLES = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)
TOKENS = ("q_doc", "kv_doc", "q_pos", "kv_pos", "kv_in_prefix")


def assert_same_mask(a, b, what) -> None:
    for name in TABLES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int32 and x.is_contiguous() and y.is_contiguous(), (what, name)
        assert torch.equal(x, y), (what, name)
    assert a.BLOCK_SIZE == b.BLOCK_SIZE and tuple(a.seq_lengths) == tuple(b.seq_lengths), what
    for name in TOKENS:
        x, y = getattr(a.mask_mod, name), getattr(b.mask_mod, name)
        assert (x is None) == (y is None), (what, name)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), (what, name)
    assert (a.mask_mod.causal, a.mask_mod.window) == (b.mask_mod.causal, b.mask_mod.window), what


def random_case(rng: random.Random, g: torch.Generator, max_len: int = 160) -> tuple[torch.Tensor, dict]:
    """doc ids and keyword arguments of one random `document_block_mask` call."""
    B, S = rng.randint(1, 3), rng.randint(1, max_len)
    bs = rng.choice([4, 8, 12, 16, 32, 64, (16, 8), (8, 32), (12, 20)])
    doc = random_doc_ids(rng, B, S, rng.choice(["sorted", "shuffled", "reused"]))
    kw: dict = dict(
        block_size=bs, causal=rng.random() < 0.6, window=rng.choice([None, None, rng.randint(1, 70)])
    )
    pk = rng.random()
    if pk < 0.3:
        kw["prefix_lengths"] = rng.randint(0, 20)
    elif pk < 0.45:
        kw["prefix_lengths"] = _prefix_arg("table", doc, rng)
    mode = rng.random()
    if mode < 0.25:
        return doc, kw
    if mode < 0.5:
        a, c = rng.randint(0, S - 1), rng.randint(0, S - 1)
        kw["q_positions"] = torch.arange(a, rng.randint(a + 1, S))
        kw["kv_positions"] = torch.arange(c, rng.randint(c + 1, S))
    elif mode < 0.7:
        q_bs = bs if isinstance(bs, int) else bs[0]
        kw["q_positions"] = block_permuted_positions(rng, S, q_bs)
        kw["kv_positions"] = torch.randperm(S, generator=g)[: rng.randint(1, S)].expand(B, -1)
    elif mode < 0.85:
        kw["q_positions"] = torch.randint(0, S, (B, rng.randint(1, 90)), generator=g)  # repeats allowed
    else:
        kw["kv_positions"] = torch.randint(0, S, (rng.randint(1, 90),), generator=g, dtype=torch.int32)
    return doc, kw


@pytest.mark.parametrize("seed", range(3))
def test_single_mask_equals_torch_path(seed):
    rng = random.Random(500 + seed)
    g = torch.Generator().manual_seed(seed)
    for it in range(10):
        doc, kw = random_case(rng, g)
        ours = build_mask(doc, "triton", **kw)
        ref = build_mask(doc, "torch", **kw)
        assert_same_mask(ours, ref, (seed, it, tuple(doc.shape), kw))


def test_small_tiles_loop_over_chunks(monkeypatch):
    """Rows longer than one chunk (two passes over several chunks, carried counts), several row tiles per
    program grid and several blocks per stats program: shrink the tiles so small cases exercise them."""
    monkeypatch.setattr(triton_build, "_MAX_CHUNK", 4)
    monkeypatch.setattr(triton_build, "_TABLE_TILE", 8)
    monkeypatch.setattr(triton_build, "_STATS_TILE", 16)
    rng = random.Random(77)
    g = torch.Generator().manual_seed(77)
    for it in range(3):
        doc, kw = random_case(rng, g, max_len=48)
        assert_same_mask(build_mask(doc, "triton", **kw), build_mask(doc, "torch", **kw), (it, kw))
    pos = zigzag_positions(48, 2, 1)
    doc = random_doc_ids(rng, 1, 48, "reused")
    for kw in (dict(block_size=4, window=50, prefix_lengths=3), dict(block_size=(8, 4), causal=False)):
        ours = rank_step_block_masks(doc.to(TRITON_DEVICE), pos.to(TRITON_DEVICE), backend="triton", **kw)
        ref = rank_step_block_masks(doc, pos, backend="torch", **kw)
        assert torch.equal(ours.counts_cpu(), ref.counts_cpu())
        for r in range(2):
            for j in range(2):
                assert_same_mask(mask_to_cpu(ours.get(r, j)), ref.get(r, j), (kw, r, j))


def _plan_positions(layout: str, S: int, N: int, B: int, bs: int) -> torch.Tensor:
    if layout == "contiguous":
        return torch.arange(S).view(N, S // N)
    if layout == "zigzag":
        return zigzag_positions(S, N, B)
    perm = torch.stack(
        [torch.randperm(S // bs, generator=torch.Generator().manual_seed(b)) for b in range(B)], 1
    )
    return (perm[:, :, None] * bs + torch.arange(bs)).permute(1, 0, 2).reshape(B, N, S // N).transpose(0, 1)


@pytest.mark.parametrize(
    "N, layout, kw, q_ranks",
    [
        (1, "contiguous", dict(block_size=16), None),
        (4, "contiguous", dict(block_size=16), None),
        (3, "zigzag", dict(block_size=16, window=40), [2]),
        (2, "zigzag", dict(block_size=(16, 32), causal=False), None),
        (3, "contiguous", dict(block_size=16, prefix_lengths=6), [2, 0]),
        (4, "random_blocks", dict(block_size=16, causal=False, window=30, prefix_lengths=2), [1, 3]),
    ],
)
def test_plan_equals_torch_path(N, layout, kw, q_ranks):
    """All N×N masks of a plan, their counts, the token tensors and a q_ranks subset: identical tables."""
    rng = random.Random(N * 7 + len(layout))
    B = 2
    S = 2 * N * 64
    doc = random_doc_ids(rng, B, S, "reused")
    pos = _plan_positions(layout, S, N, B, 32)
    dev = TRITON_DEVICE
    ours = rank_step_block_masks(doc.to(dev), pos.to(dev), backend="triton", q_ranks=q_ranks, **_on(dev, kw))
    ref = rank_step_block_masks(doc, pos, backend="torch", q_ranks=q_ranks, **kw)
    assert ours.q_ranks == ref.q_ranks
    assert torch.equal(ours.counts_cpu(), ref.counts_cpu())
    for name in ("partial_blocks", "full_blocks", "max_unmasked_pairs"):
        assert getattr(ours, name).dtype == getattr(ref, name).dtype == torch.int64
    rows = ours.all_masks()
    assert len(rows) == len(ref.q_ranks) and all(len(row) == N for row in rows)
    for i, r in enumerate(ref.q_ranks):
        for j in range(N):
            assert rows[i][j] is ours.get(r, j)
            assert_same_mask(mask_to_cpu(ours.get(r, j)), ref.get(r, j), (r, j))
            single = document_block_mask(doc, q_positions=pos[r], kv_positions=pos[j], backend="torch", **kw)
            assert_same_mask(ref.get(r, j), single, ("single", r, j))


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_truth_on_triton_path(cfg):
    """The element-by-element checks of test_masks.py, on the Triton path (fewer cases: interpreter)."""
    tm.test_full_mask_matches_truth(cfg, ["sorted", "shuffled", "reused"][cfg % 3], backend="triton")
    if cfg in (0, 3, 5, 7):  # causal; non-causal window; window + prefix; per-document prefix table
        tm.test_rank_shards_match_truth(cfg, backend="triton")


def test_fuzz_and_non_square_on_triton_path():
    tm.test_random_layouts_fuzz(1, backend="triton", iterations=12)
    tm.test_non_square_block_size(backend="triton")


def test_positions_out_of_range_flagged_or_clamped():
    """validate=True: out-of-range positions raise the torch path's message (flagged by the stats kernel);
    validate=False: documented as the caller's responsibility, and must not read out of bounds."""
    doc = random_doc_ids(random.Random(3), 2, 64, "sorted").to(TRITON_DEVICE)
    bad = torch.tensor([0, 5, 64, 3], device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"kv_positions must lie in \[0, S=64\) .*, got values in \[0, 64\]"):
        document_block_mask(doc, kv_positions=bad, backend="triton")
    with pytest.raises(ValueError, match=r"q_positions must lie in \[0, S=64\) .*, got values in \[-2, 1\]"):
        document_block_mask(doc, q_positions=bad.clamp(max=3) - 2, backend="triton")
    with pytest.raises(ValueError, match=r"positions must lie in \[0, S=64\)"):
        rank_step_block_masks(
            doc, torch.arange(1, 65, device=TRITON_DEVICE).view(2, 32), block_size=16, backend="triton"
        )
    bm = document_block_mask(doc, kv_positions=bad, backend="triton", validate=False, block_size=4)
    assert bm.kv_num_blocks.shape == (2, 1, 16)


def test_backend_argument(monkeypatch):
    assert use_triton("torch", torch.device("cpu")) is False
    assert use_triton("auto", torch.device("cpu")) is False
    assert use_triton("auto", torch.device("cuda")) is triton_build.available()
    monkeypatch.setenv("FLEXDIST_MASK_BACKEND", "torch")  # the escape hatch: "auto" never picks the kernels
    assert use_triton("auto", torch.device("cuda")) is False
    assert use_triton("triton", torch.device("cuda")) is triton_build.available()
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
        document_block_mask(torch.zeros(1, 8, dtype=torch.long), backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        rank_step_block_masks(
            torch.zeros(1, 8, dtype=torch.long), torch.arange(8).view(2, 4), block_size=4, backend=""
        )


def test_strided_doc_ids_and_positions():
    """doc_ids and positions with any strides (a transposed layout, a stepped slice) give the same tables."""
    rng = random.Random(12)
    doc = random_doc_ids(rng, 3, 150, "reused").t().contiguous().t()  # strides (1, 3)
    assert doc.stride() == (1, 3)
    qp = torch.arange(300)[::2]  # stride 2
    for kw in (dict(block_size=16, prefix_lengths=4, window=30), dict(block_size=8, q_positions=qp[:75])):
        assert_same_mask(build_mask(doc, "triton", **kw), build_mask(doc.contiguous(), "torch", **kw), kw)


@pytest.mark.parametrize("S", [1, 2, 129])
def test_tiny_and_odd_lengths(S):
    """S = 1 (no id changes to count), a single token block, a 1-token tail block."""
    doc = torch.tensor([[0] * (S - S // 3) + [-1] * (S // 3)])
    for kw in (
        dict(block_size=1),
        dict(block_size=128, window=3),
        dict(block_size=(2, 64), prefix_lengths=1),
    ):
        assert_same_mask(build_mask(doc, "triton", **kw), build_mask(doc, "torch", **kw), (S, kw))
