"""The N×N (query rank, key rank) builder equals the single-mask builder for every pair, and its costs are right."""

from __future__ import annotations

import random

import pytest
import torch
from test_masks import naive_dense, random_doc_ids, truth_mask_mod, zigzag_positions
from torch.nn.attention.flex_attention import create_block_mask

from flexdist.kernels.reference import dense_mask
from flexdist.kernels.validation import AttnShape
from flexdist.masks import RankStepMasks, document_block_mask, rank_step_block_masks

BM_FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


def contiguous_positions(S: int, N: int) -> torch.Tensor:
    return torch.arange(S).view(N, S // N)


@pytest.mark.parametrize(
    "N, layout, causal, window, prefix",
    [
        (4, "contiguous", True, None, None),
        (4, "zigzag", True, None, None),
        (3, "zigzag", True, 40, None),
        (2, "zigzag", False, None, None),
        (3, "contiguous", True, None, 6),
        (4, "random_blocks", False, 30, 2),
    ],
)
def test_batched_equals_single(N, layout, causal, window, prefix):
    rng = random.Random(N * 31 + len(layout))
    B, bs = 2, 16
    S = 2 * N * 48  # shards of 96 tokens: 6 blocks
    doc = random_doc_ids(rng, B, S, "reused")
    if layout == "contiguous":
        pos = contiguous_positions(S, N)
    elif layout == "zigzag":
        pos = zigzag_positions(S, N, B)
    else:  # each rank holds random whole blocks, different per batch row
        pos = torch.stack(
            [torch.randperm(S // bs, generator=torch.Generator().manual_seed(b)) for b in range(B)], dim=1
        )  # [S/bs, B]
        pos = (pos[:, :, None] * bs + torch.arange(bs)).permute(1, 0, 2).reshape(B, N, S // N).transpose(0, 1)
    masks = rank_step_block_masks(
        doc, pos, causal=causal, window=window, prefix_lengths=prefix, block_size=bs
    )
    assert isinstance(masks, RankStepMasks) and masks.num_ranks == N
    counts = masks.counts_cpu()
    n_empty = 0
    for r in range(N):
        for j in range(N):
            single = document_block_mask(
                doc,
                q_positions=pos[r],
                kv_positions=pos[j],
                causal=causal,
                window=window,
                prefix_lengths=prefix,
                block_size=bs,
            )
            got = masks.get(r, j)
            assert got is masks[r, j] and got is masks[r][j]
            for name in BM_FIELDS:
                assert torch.equal(getattr(got, name), getattr(single, name)), (r, j, name)
            assert got.BLOCK_SIZE == single.BLOCK_SIZE and tuple(got.seq_lengths) == tuple(single.seq_lengths)
            for name in ("q_doc", "kv_doc", "q_pos", "kv_pos"):
                assert torch.equal(getattr(got.mask_mod, name), getattr(single.mask_mod, name))
            # costs: counts of blocks, and the bound really bounds the visible pairs
            qpb = pos[r].expand(B, -1) if pos.dim() == 2 else pos[r]
            kpb = pos[j].expand(B, -1) if pos.dim() == 2 else pos[j]
            truth = naive_dense(doc, qpb, kpb, causal, window, prefix)
            assert int(counts[0, r, j]) == int(single.kv_num_blocks.sum())
            assert int(counts[1, r, j]) == int(single.full_kv_num_blocks.sum())
            assert int(truth.sum()) <= int(counts[2, r, j])
            assert int(counts[2, r, j]) >= int(counts[1, r, j]) * bs * bs
            assert masks.is_empty(r, j) == (not truth.any())
            n_empty += masks.is_empty(r, j)
            shape = AttnShape(B, 1, 1, truth.shape[1], truth.shape[2], 8, 8)
            assert torch.equal(dense_mask(got, shape, torch.device("cpu"))[:, 0], truth)
    assert len(masks.all_masks()) == N and all(len(row) == N for row in masks.all_masks())
    if causal and prefix is None and layout == "contiguous":
        assert n_empty >= N * (N - 1) // 2  # at least the upper triangle of ring steps is skippable


def test_batched_classification_matches_create_block_mask():
    """Per pair, the batched tables equal create_block_mask's built from the truth (exact for whole blocks)."""
    rng = random.Random(2)
    N, B, bs = 3, 1, 32
    S = 2 * N * 64
    doc = random_doc_ids(rng, B, S, "shuffled")
    pos = zigzag_positions(S, N, B)
    masks = rank_step_block_masks(doc, pos, window=100, block_size=bs)
    for r in range(N):
        for j in range(N):
            truth = naive_dense(doc, pos[r], pos[j], True, 100, None)
            ref = create_block_mask(
                truth_mask_mod(truth), B, None, S // N, S // N, device="cpu", BLOCK_SIZE=bs
            )
            for name in BM_FIELDS:
                assert torch.equal(getattr(masks.get(r, j), name), getattr(ref, name)), (r, j, name)


def test_q_ranks_subset_and_ring_steps():
    """A rank may build only its own row; counts still cover every pair; ring_step(r, s) = get(r, r - s)."""
    rng = random.Random(5)
    N, B, bs = 4, 1, 16
    S = 2 * N * 32
    doc = random_doc_ids(rng, B, S, "sorted")
    pos = zigzag_positions(S, N, B)
    full = rank_step_block_masks(doc, pos, block_size=bs, window=70)
    mine = rank_step_block_masks(doc, pos, block_size=bs, window=70, q_ranks=[2])
    assert torch.equal(full.counts_cpu(), mine.counts_cpu())
    for j in range(N):
        for name in BM_FIELDS:
            assert torch.equal(getattr(mine.get(2, j), name), getattr(full.get(2, j), name))
    for s in range(N):
        assert mine.ring_step(2, s) is mine.get(2, (2 - s) % N)
    assert len(mine.all_masks()) == 1
    with pytest.raises(KeyError, match="q_ranks"):
        mine.get(0, 1)
    with pytest.raises(ValueError, match="q_ranks"):
        rank_step_block_masks(doc, pos, block_size=bs, q_ranks=[4])
    with pytest.raises(ValueError, match="q_ranks"):
        rank_step_block_masks(doc, pos, block_size=bs, q_ranks=[1, 1])


def test_batched_bad_inputs():
    doc = torch.zeros(2, 256, dtype=torch.long)
    pos = torch.arange(256).view(4, 64)
    with pytest.raises(ValueError, match=r"block_size \(q block 128\) must divide the shard length L=64"):
        rank_step_block_masks(doc, pos, block_size=128)
    with pytest.raises(ValueError, match=r"block_size \(kv block 48\)"):
        rank_step_block_masks(doc, pos, block_size=(32, 48))
    with pytest.raises(ValueError, match="positions must be"):
        rank_step_block_masks(doc, pos[0])
    with pytest.raises(ValueError, match="positions must be"):
        rank_step_block_masks(doc, torch.zeros(4, 3, 64, dtype=torch.long))  # batch 3 != 2
    with pytest.raises(ValueError, match=r"positions must lie in \[0, S=256\)"):
        rank_step_block_masks(doc, pos + 1, block_size=32)
    with pytest.raises(TypeError, match="integer"):
        rank_step_block_masks(doc, pos.float())
    with pytest.raises(TypeError, match="integer"):
        rank_step_block_masks(doc.double(), pos)
    masks = rank_step_block_masks(doc, pos, block_size=32)
    with pytest.raises(IndexError, match="kv_rank"):
        masks.get(0, 4)
    with pytest.raises(IndexError, match="q_rank"):
        masks[-1]
