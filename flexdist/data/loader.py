"""Deterministic, dp-sharded, resumable loader of packed windows.

Every rank builds the same epoch layout (document order, then the order windows are visited in: permutations
seeded by ``(seed, epoch)``), so the global sequence of windows is a pure function of the corpus, ``seq_len`` and
``seed``. A global cursor walks
it: each :meth:`PackedLoader.next_batch` call consumes ``dp_size * micro_batch`` consecutive windows, of which
dp rank ``r`` takes the ``r``-th block of ``micro_batch`` — disjoint across dp ranks, identical across the cp
ranks of one dp group (context parallelism splits a sequence, it does not get its own). The state is just
``(epoch, cursor)``, so resuming reproduces the exact stream, and the state is the same on every rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .packing import EpochLayout
from .sources import DocumentSource


class PackedLoader:
    """Packed windows ``[micro_batch, seq_len]`` for one dp rank: tokens, labels, doc_ids, positions."""

    def __init__(
        self,
        source: DocumentSource,
        *,
        seq_len: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.source = source
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._layout: EpochLayout | None = None
        need = dp_size * micro_batch
        have = self._epoch_layout().num_windows
        if have < need:
            raise ValueError(
                f"corpus too small: {int(source.doc_lengths.sum())} tokens make {have} windows of seq_len="
                f"{seq_len}, but one step needs dp_size*micro_batch = {dp_size}*{micro_batch} = {need}"
            )

    def _epoch_layout(self) -> EpochLayout:
        if self._layout is None or self._layout_epoch != self.epoch:
            n = len(self.source)
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._layout = EpochLayout(self.source.doc_lengths, order, self.seq_len)
            # windows are visited in a shuffled order too: consecutive windows of one long document would
            # otherwise land in consecutive steps (correlated batches, a noisy loss curve)
            w = self._layout.num_windows
            self._window_order = rng.permutation(w) if self.shuffle else np.arange(w)
            self._layout_epoch = self.epoch
        return self._layout

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch; advances the global cursor by ``dp_size * micro_batch`` windows."""
        layout = self._epoch_layout()
        step = self.dp_size * self.micro_batch
        if self.cursor + step > layout.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            layout = self._epoch_layout()
        first = self.cursor + self.dp_rank * self.micro_batch
        rows = [
            layout.window(int(self._window_order[first + j]), self.source.tokens)
            for j in range(self.micro_batch)
        ]
        self.cursor += step
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the global stream stands (identical on every rank) plus what it depends on."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "num_docs": len(self.source),
            "num_tokens": int(self.source.doc_lengths.sum()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream; refuses a state made for another corpus, seq_len, seed or shuffle setting."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "shuffle", "num_docs", "num_tokens"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"data-loader state was saved with {key}={state[key]!r} but this run has {key}={mine[key]!r}"
                )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
