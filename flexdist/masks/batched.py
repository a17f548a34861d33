"""All N×N (query rank, key rank) BlockMasks of a context-parallel plan in one vectorised pass.

Under ring attention rank ``r`` attends its query shard to every rank ``j``'s K/V shard in turn; each pair
needs its own BlockMask (rank ``r``'s global query positions against rank ``j``'s global key positions). The
block statistics of all ranks are computed once (``[N, B, L/bs]``), every (q-block, kv-block) pair of every
(r, j) is classified in one broadcast ``[N, N, B, L/bs, L/bs]`` pass and ordered into ``kv_indices`` /
``q_indices`` tables in one more; the per-pair ``BlockMask`` objects are then cheap views, made on demand.
The planner can cost and skip steps from the ``[N, N]`` count tensors without building any mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexdist.kernels.block_sparse import block_mask_from_tables
from flexdist.kernels.document_mask import DocumentMaskMod

from . import triton_build
from .block_mask import (
    _Checks,
    block_tables,
    check_block_size,
    check_positions,
    check_prefix,
    check_window,
    classify_blocks,
    gather_side,
    prefix_flags,
    raise_bad_positions,
    use_triton,
)
from .documents import check_doc_ids, document_run_index

__all__ = ["RankStepMasks", "rank_step_block_masks"]


_MASK_MOD_FIELDS = ("q_doc", "kv_doc", "q_pos", "kv_pos", "causal", "window", "kv_in_prefix")


@functools.cache
def _plain_mask_mod() -> bool:
    """DocumentMaskMod is a dataclass with exactly the fields `RankStepMasks` fills, and no __slots__."""
    fields = tuple(f.name for f in dataclasses.fields(DocumentMaskMod))
    return fields == _MASK_MOD_FIELDS and "__slots__" not in vars(DocumentMaskMod)


@dataclass(eq=False)
class RankStepMasks:
    """BlockMasks of every (query rank ``r``, key rank ``j``) pair of one CP plan, plus their costs.

    ``masks.get(r, j)``, ``masks[r, j]`` or ``masks[r][j]``: the BlockMask of rank r's queries against rank
    j's keys (built on first access from precomputed tables, then cached); ``masks.ring_step(r, s)`` is the
    one rank r needs at ring step s (keys of rank ``(r - s) mod N``). Only the rows listed in ``q_ranks``
    have masks (all by default). Count tensors are ``[N, N]`` int64 on the device for *every* pair, summed
    over the batch: ``partial_blocks``, ``full_blocks`` and ``max_unmasked_pairs`` (an upper bound on visible
    (q, kv) pairs: exact for full blocks, a whole block for each partial block).
    """

    num_ranks: int
    block_size: tuple[int, int]
    shard_len: int
    partial_blocks: torch.Tensor
    full_blocks: torch.Tensor
    max_unmasked_pairs: torch.Tensor
    q_ranks: tuple[int, ...]
    # [len(q_ranks), N, B, 1, ...] tables and [N, B, L] per-token tensors the BlockMasks are views of
    _tables: tuple[torch.Tensor, ...] = field(repr=False)
    _run: torch.Tensor = field(repr=False)
    _pos: torch.Tensor = field(repr=False)
    _prefix: torch.Tensor | None = field(repr=False)
    _causal: bool = field(repr=False)
    _window: int | None = field(repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _counts_cpu: torch.Tensor | None = field(default=None, repr=False)
    _views: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._row = {r: i for i, r in enumerate(self.q_ranks)}

    def _check_pair(self, r: int, j: int) -> tuple[int, int]:
        N = self.num_ranks
        for name, v in (("q_rank", r), ("kv_rank", j)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < N:
                raise IndexError(f"{name} must be an int in [0, {N}), got {v!r}")
        return r, j

    def _split(self) -> tuple:
        """Per-pair views of the tables (``[i * N + j]`` for the i-th q rank) and per-rank views of the token
        tensors, made once with one ``unbind`` per tensor: the views are most of the cost of N² BlockMasks,
        and ``unbind`` under no_grad is the cheapest way to make them."""
        if self._views is None:
            R, N = len(self.q_ranks), self.num_ranks
            with torch.no_grad():
                per_table = [t.reshape(R * N, *t.shape[2:]).unbind(0) for t in self._tables]
                pre = (None,) * N if self._prefix is None else self._prefix.unbind(0)
                run, pos = self._run.unbind(0), self._pos.unbind(0)
            # Every pair's mask_mod holds views of the same [N, B, L] tensors, so checking one (the
            # constructor validates shapes and dtypes) checks them all; the others skip the per-object checks
            # (a fifth of the cost of N² masks) when DocumentMaskMod is still a plain dataclass whose
            # constructor only stores its fields.
            proto = DocumentMaskMod(
                run[0], run[0], pos[0], pos[0], causal=self._causal, window=self._window, kv_in_prefix=pre[0]
            )
            plain = _plain_mask_mod() and set(vars(proto)) == set(_MASK_MOD_FIELDS)
            self._views = (list(zip(*per_table, strict=True)), run, pos, pre, plain)
        return self._views

    def _make(self, r: int, j: int) -> BlockMask:
        pairs, run, pos, pre, plain = self._split()
        fields = {
            "q_doc": run[r],
            "kv_doc": run[j],
            "q_pos": pos[r],
            "kv_pos": pos[j],
            "causal": self._causal,
            "window": self._window,
            "kv_in_prefix": pre[j],
        }
        if plain:
            mask_mod = object.__new__(DocumentMaskMod)
            mask_mod.__dict__.update(fields)
        else:
            mask_mod = DocumentMaskMod(**fields)
        bm = block_mask_from_tables(
            *pairs[self._row[r] * self.num_ranks + j],
            block_size=self.block_size,
            mask_mod=mask_mod,
            seq_lengths=(self.shard_len, self.shard_len),
        )
        self._cache[(r, j)] = bm
        return bm

    def get(self, r: int, j: int) -> BlockMask:
        """BlockMask of rank ``r``'s queries (global positions ``positions[r]``) against rank ``j``'s keys."""
        bm = self._cache.get((r, j))
        if bm is None:
            r, j = self._check_pair(r, j)
            if r not in self._row:
                raise KeyError(f"masks were built for q_ranks={self.q_ranks} only, not q_rank {r}")
            bm = self._make(r, j)
        return bm

    def ring_step(self, r: int, s: int) -> BlockMask:
        """The mask rank ``r`` uses at ring step ``s`` (0 = its own keys), when K/V travel r -> r + 1."""
        return self.get(r, (r - s) % self.num_ranks)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            return self.get(*key)
        r, _ = self._check_pair(key, 0)
        return [self.get(r, j) for j in range(self.num_ranks)]

    def all_masks(self) -> list[list[BlockMask]]:
        """Every BlockMask of the built rows, ``[i][kv_rank]`` for the i-th of ``q_ranks``."""
        cache, N = self._cache, self.num_ranks
        return [
            [self._make(r, j) if (r, j) not in cache else cache[(r, j)] for j in range(N)]
            for r in self.q_ranks
        ]

    def counts_cpu(self) -> torch.Tensor:
        """int64 ``[3, N, N]`` (partial, full, max_unmasked_pairs) on the CPU (one host sync, then cached)."""
        if self._counts_cpu is None:
            self._counts_cpu = torch.stack(
                [self.partial_blocks, self.full_blocks, self.max_unmasked_pairs]
            ).cpu()
        return self._counts_cpu

    def is_empty(self, r: int, j: int) -> bool:
        """True when rank r's queries see none of rank j's keys: the ring step can be skipped entirely."""
        r, j = self._check_pair(r, j)
        c = self.counts_cpu()
        return int(c[0, r, j]) == 0 and int(c[1, r, j]) == 0


def rank_step_block_masks(
    doc_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    prefix_lengths: int | torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
    validate: bool = True,
    q_ranks: Sequence[int] | None = None,
    backend: str = "auto",
) -> RankStepMasks:
    """All (query rank, key rank) document BlockMasks of a CP plan, classified in one pass on the device.

    Args:
        doc_ids: ``[B, S]`` document ids of the global packed batch (see `document_block_mask`).
        positions: ``[N, B, L]`` or ``[N, L]`` global positions of the tokens each of the N ranks holds, in the
            order the rank holds them; every rank holds the same number L of tokens, a multiple of the block
            size (a shard's last block must be a whole block so that blocks never straddle shards).
        causal, window, prefix_lengths: as in `document_block_mask`.
        block_size: int or ``(q_block, kv_block)``; each must divide L.
        validate: range-check positions / prefix tables (one host synchronisation).
        q_ranks: build masks only for these query ranks' rows (e.g. ``[my_rank]``: a CP rank needs only its
            own queries' masks); block counts are still computed for all N×N pairs. Default: every rank.
        backend: as in `document_block_mask`: "auto" runs the whole plan in a fixed number of launches on
            CUDA (two Triton kernels, two torch ops for the run indices, one sum for the counts, whatever N).

    Returns:
        `RankStepMasks`; ``masks.get(r, j)`` equals ``document_block_mask(doc_ids, q_positions=positions[r],
        kv_positions=positions[j], ...)``.
    """
    doc_ids = check_doc_ids(doc_ids)
    q_bs, kv_bs = check_block_size(block_size)
    window = check_window(window)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    B, S = doc_ids.shape
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a [N, B, L] or [N, L] tensor, got {type(positions).__name__}")
    if positions.dim() not in (2, 3):
        raise ValueError(
            f"positions must be [N, B, L] or [N, L] (one row per rank), got {tuple(positions.shape)}"
        )
    N = positions.shape[0]
    if N < 1:
        raise ValueError("positions must hold at least one rank")
    fast = use_triton(backend, doc_ids.device)
    checks = _Checks() if validate else None
    # the Triton path flags bad positions in its first kernel instead (no extra reductions)
    pos = check_positions(positions, "positions", (N,), B, S, doc_ids.device, None if fast else checks)
    L = pos.shape[-1]
    for name, bs in (("q block", q_bs), ("kv block", kv_bs)):
        if L % bs != 0:
            raise ValueError(
                f"block_size ({name} {bs}) must divide the shard length L={L} of every rank "
                f"(positions shape {tuple(positions.shape)}); pick a block size dividing {L} or pad the shards"
            )
    if q_ranks is None:
        rows = tuple(range(N))
    else:
        rows = tuple(q_ranks)
        bad = [r for r in rows if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < N]
        if bad or len(set(rows)) != len(rows) or not rows:
            raise ValueError(f"q_ranks must be distinct ints in [0, {N}), got {q_ranks!r}")
    prefix_table = check_prefix(doc_ids, prefix_lengths, checks)
    if checks is not None:
        checks.raise_if_bad()
    prefix = prefix_flags(doc_ids, prefix_table)

    if fast:
        changes = triton_build.change_counts(doc_ids)
        kv = triton_build.block_side(doc_ids, changes, pos, prefix, kv_bs)
        q = kv if q_bs == kv_bs else triton_build.block_side(doc_ids, changes, pos, None, q_bs)
        kv_num, kv_idx, q_num, q_idx = triton_build.block_tables(q, kv, causal, window, rows)
        counts = kv_num.sum(dim=(-3, -2, -1), dtype=torch.int64)  # [2, N, N] over B and q blocks
        if validate:
            raise_bad_positions([("positions", pos, kv.bad)], S)
        if len(rows) != N:  # kv_num covers every q rank (for the counts); the tables only `rows`
            kv_num = kv_num.index_select(1, torch.tensor(rows).to(kv_num.device, non_blocking=True))
        tables = (kv_num[0], kv_idx[0], kv_num[1], kv_idx[1], q_num[0], q_idx[0], q_num[1], q_idx[1])
        run, tok_pos, kv_prefix = kv.run, kv.pos, kv.prefix
    else:
        side = gather_side(document_run_index(doc_ids), prefix, pos, want_prefix=True)
        classes = classify_blocks(side, side, q_bs, kv_bs, causal, window)  # [2, N, N, B, nq, nkv]
        counts = classes.sum(dim=(-3, -2, -1), dtype=torch.int64)  # [2, N, N] over B, q and kv blocks
        if len(rows) != N:
            classes = classes[:, list(rows)]
        tables = block_tables(classes)  # [len(rows), N, B, 1, ...]
        run, tok_pos, kv_prefix = side.run, side.pos, side.prefix
    partial_count, full_count = counts[0], counts[1]
    return RankStepMasks(
        num_ranks=N,
        block_size=(q_bs, kv_bs),
        shard_len=L,
        partial_blocks=partial_count,
        full_blocks=full_count,
        max_unmasked_pairs=counts.sum(0) * (q_bs * kv_bs),
        q_ranks=rows,
        _tables=tables,
        _run=run,
        _pos=tok_pos,
        _prefix=kv_prefix,
        _causal=causal,
        _window=window,
    )
