"""The planner's sparse block work (``balance.global_block_work_sparse``) equals the dense construction from
``balance.pair_blocks`` (every query token against every key, O(nb²)) on random layouts: documents, padding,
windows, prefixes, non-causal masks, ragged lengths, batches of two and partial weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexdist.cp import balance as bal


def _dense(ids: torch.Tensor, bs: int, causal: bool, window, pw: float, prefix) -> np.ndarray:
    lo, hi = bal.visible_intervals(ids, causal, window, prefix)
    nonempty, full = bal.pair_blocks(lo, hi, torch.arange(ids.shape[1]), bs)
    fc = full.sum(0, dtype=torch.int32).double()
    pc = (nonempty & ~full).sum(0, dtype=torch.int32).double()
    return (fc + pw * pc).numpy()


def _layout(rng: np.random.Generator, B: int, S: int, bs: int, pad: bool) -> torch.Tensor:
    rows = []
    for _ in range(B):
        lens: list[int] = []
        while sum(lens) < S:
            lens.append(int(rng.integers(1, 6 * bs)))
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:S]
        if pad:
            ids[S - int(rng.integers(0, S // 3 + 1)) :] = -1
        rows.append(ids)
    return torch.stack(rows)


@pytest.mark.parametrize("seed", range(8))
def test_sparse_block_work_equals_dense(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for trial in range(25):
        bs = int(rng.choice([16, 32, 64]))
        S = int(rng.integers(bs // 2, 30 * bs))  # ragged: not a multiple of the block size
        B = 2 if trial % 3 == 0 else 1
        ids = _layout(rng, B, S, bs, pad=trial % 4 == 0)
        causal = trial % 5 != 0
        window = int(rng.integers(1, 3 * bs)) if trial % 3 == 1 else None
        prefix = int(rng.integers(1, 2 * bs)) if trial % 7 == 2 else None
        pw = [1.0, 0.5, 0.3, 0.0][trial % 4]
        want = _dense(ids, bs, causal, window, pw, prefix)
        nb, (rows, cols, vals) = bal.global_block_work_sparse(ids, bs, causal, window, pw, prefix)
        r, c = np.nonzero(want)
        what = f"trial {trial}: B={B} S={S} bs={bs} causal={causal} window={window} prefix={prefix} w={pw}"
        assert nb == want.shape[0], what
        assert np.array_equal(rows, r) and np.array_equal(cols, c), what  # same pairs, row-major order
        assert np.array_equal(vals, want[r, c]), what
        assert np.array_equal(bal.global_block_work(ids, bs, causal, window, pw, prefix), want), what


def test_sparse_block_work_all_padding() -> None:
    nb, (rows, cols, vals) = bal.global_block_work_sparse(torch.full((1, 100), -1), 32, True, None)
    assert nb == 4 and rows.size == cols.size == vals.size == 0
