"""The CP plan: token→rank sharding, per-(rank, ring step) BlockMasks and the ring schedule, built once per batch.

``plan = flexdist.cp.plan(doc_ids, group, balance=..., strategy=...)`` is computed identically on every rank
from the global ``doc_ids`` (no communication except an optional consistency check), shared by every layer
and by backward. It holds only this rank's masks: its query shard against each visiting K/V shard
(``plan.masks[j]`` for the shard of rank j, None where the mask is empty, so the ring skips that step), and
for ``strategy="allgather"`` its query shard against the whole sequence, with the keys in plan order (the
order an all-gather of the shards delivers them in, so they are never reordered).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import BlockMask

from flexdist.kernels import DocumentMaskMod
from flexdist.kernels.block_sparse import block_mask_from_tables, dense_blocks
from flexdist.masks.block_mask import block_tables

from . import balance as bal

STRATEGIES = ("ring", "allgather", "direct", "ulysses")
_CHECKED_GROUPS: set[int] = set()


def _resolve_group(group: Any) -> tuple[Any, int, int]:
    """(process group or None, world size, rank). Accepts a ProcessGroup, a 1-D DeviceMesh or None."""
    if group is not None and hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise ValueError(f"group must be a 1-D DeviceMesh, got a mesh with ndim={group.ndim}")
        group = group.get_group()
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return None, 1, 0
    if group is None:
        group = dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def _comm_device(group: Any) -> torch.device:
    """Device collectives on this group need (CUDA for NCCL, CPU otherwise)."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(doc_ids: torch.Tensor, params: tuple) -> int:
    """A 62-bit hash of doc_ids and the plan parameters (identical inputs → identical value on every rank)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((tuple(doc_ids.shape), *params)).encode())
    h.update(doc_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 2


def check_consistent(doc_ids: torch.Tensor, group: Any, params: tuple) -> None:
    """All-reduce min/max of a hash of ``doc_ids`` (and plan arguments); raise on *every* rank if they differ.

    Both reductions are collectives every rank enters, so a mismatch fails everywhere instead of hanging a
    ring later.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    fp = _fingerprint(doc_ids, params)
    dev = _comm_device(group)
    t = torch.tensor([fp, -fp], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    lo, hi = -int(t[1]), int(t[0])
    if lo != hi:
        raise ValueError(
            f"doc_ids (or plan arguments) differ between the ranks of the CP group: rank "
            f"{dist.get_rank(group)} has fingerprint {fp:#x}, group min {lo:#x}, max {hi:#x}. Every rank "
            "must pass the same global doc_ids [B, S] and the same plan arguments."
        )


@dataclass
class Plan:
    """Everything one rank needs for CP attention on one batch (see module docstring).

    Attributes:
        group, world_size, rank: the CP process group (None when not distributed) and this rank in it.
        balance, strategy: the resolved sharding and the exchange strategy.
        perm: ``[S]`` global token index at each plan position; rank r holds ``perm[r*L:(r+1)*L]``.
        global_positions: ``[L]`` global indices of this rank's tokens (ascending).
        positions: ``[B, L]`` positions inside their document of this rank's tokens (for RoPE).
        masks: per kv rank j, this rank's BlockMask (local q shard vs shard j), or None when empty.
        work: ``[N, N]`` int visited blocks of every (q rank, kv rank) pair (all ranks, for stats/schedule).
        t_last: ``[N]`` last ring step at which shard j is still needed (the ring stops forwarding it after).
        stats: predicted cost, per-rank work max/mean, skipped steps, K/V tokens moved vs the mask's minimum
            (see `plan_stats`), and host wall times ``mask_build_s`` (this rank's BlockMasks) and
            ``plan_time_s`` (the whole ``plan`` call). All but the times are identical on every rank (they
            derive from the global work matrix), so a logger on rank 0 needs no collective.
    """

    group: Any
    world_size: int
    rank: int
    balance: str
    strategy: str
    causal: bool
    window: int | None
    block_size: int
    doc_ids: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    global_positions: torch.Tensor
    positions: torch.Tensor
    masks: list[BlockMask | None]
    work: np.ndarray
    t_last: np.ndarray
    stats: dict = field(default_factory=dict)
    kernel_backend: str = "auto"
    full_mask: BlockMask | None = None
    debug: bool = False
    direct_send: list = field(default_factory=list)  # strategy="direct": per step t, local tokens sent to r+t
    direct_recv: list = field(default_factory=list)  # per step t, shard (r-t)'s local tokens received
    kv_sets: list = field(default_factory=list)  # per kv rank j, global indices of the keys masks[j] covers
    _device_cache: dict = field(default_factory=dict, repr=False)
    ring_group: int = 1  # strategy="ring": ring steps per kernel call (see `plan`)
    # ring_group > 1: per group of steps, (mask over the concatenated keys of the steps with work, those steps,
    # their global key indices)
    group_masks: list = field(default_factory=list)
    head_chunks: int | tuple[int, ...] = 1  # strategy="allgather": K/V heads per pipelined chunk (see `plan`)
    bwd_head_chunks: int | tuple[int, ...] = 1  # the backward's chunks (`plan`'s None resolved: head_chunks)
    local_first: bool = False  # strategy="allgather": chunk 0 attends to the own shard during its gather
    remote_mask: BlockMask | None = None  # local_first: full_mask without this rank's own key blocks
    timing: bool = False  # record CUDA events around the ring's waits (see comm_wait_seconds)
    _wait_events: list = field(default_factory=list, repr=False)

    def record_wait(self, works: list, device: torch.device) -> None:
        """Wait for posted P2P work on the current stream; with ``timing`` on CUDA, time the stall.

        ``work.wait()`` makes the compute stream wait for the communication; two CUDA events around it
        measure how long the stream was held up (the *exposed* communication, not the overlapped part).
        """
        if not works:
            return
        if self.timing and device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for w in works:
                w.wait()
            b.record()
            self._wait_events.append((a, b))
        else:
            for w in works:
                w.wait()

    def comm_wait_seconds(self, reset: bool = True) -> float:
        """Exposed communication wait of the attention calls since the last reset, in seconds.

        Synchronises on the last recorded event. 0.0 when ``timing`` is off or not on CUDA (gloo's waits
        block the host instead, and are part of the step time).
        """
        if not self._wait_events:
            return 0.0
        self._wait_events[-1][1].synchronize()
        total = sum(a.elapsed_time(b) for a, b in self._wait_events) / 1e3
        if reset:
            self._wait_events.clear()
        return total

    @property
    def batch_size(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    @property
    def local_len(self) -> int:
        return self.seq_len // self.world_size

    def shard_indices(self, rank: int) -> torch.Tensor:
        L = self.local_len
        return self.perm[rank * L : (rank + 1) * L]

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of a global tensor (size S along ``dim``), in local token order."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"plan.shard: x has size {x.shape[dim]} along dim {dim}, expected the global S={self.seq_len}"
            )
        return x.index_select(dim, self.global_positions.to(x.device))

    def unshard(self, x_local: torch.Tensor, dim: int) -> torch.Tensor:
        """The global tensor (original token order) from every rank's local part (an all-gather; no autograd)."""
        L = self.local_len
        if x_local.shape[dim] != L:
            raise ValueError(
                f"plan.unshard: x_local has size {x_local.shape[dim]} along dim {dim}, expected the local L={L}"
            )
        if self.world_size == 1:
            return x_local.index_select(dim, self.inv_perm.to(x_local.device))
        x = x_local.movedim(dim, 0).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        full = torch.cat(parts, 0).index_select(0, self.inv_perm.to(x.device))
        return full.movedim(0, dim)

    def comm_bytes(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
        """K/V bytes the forward moves per rank-step summed over the group: ring, all-gather, the mask's minimum."""
        per_token = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8 * self.batch_size
        return {
            "ring": self.stats["kv_tokens_moved_ring"] * per_token,
            "allgather": self.stats["kv_tokens_moved_allgather"] * per_token,
            "min": self.stats["kv_tokens_min"] * per_token,
        }

    def masks_on(self, device: torch.device) -> tuple[list[BlockMask | None], BlockMask | None]:
        """The plan's masks moved to ``device`` (cached), so one plan serves CPU- or GPU-built doc_ids."""
        device = torch.device(device)
        src = self.doc_ids.device
        if device == src or (device.type == src.type and device.index is None):
            return self.masks, self.full_mask
        key = str(device)
        if key not in self._device_cache:
            ms = [None if m is None else _mask_to(m, device) for m in self.masks]
            fm = None if self.full_mask is None else _mask_to(self.full_mask, device)
            self._device_cache[key] = (ms, fm)
        return self._device_cache[key]

    def remote_mask_on(self, device: torch.device) -> BlockMask | None:
        """``remote_mask`` moved to ``device`` (cached), as `masks_on`."""
        device = torch.device(device)
        src = self.doc_ids.device
        if self.remote_mask is None or device == src or (device.type == src.type and device.index is None):
            return self.remote_mask
        key = ("remote", str(device))
        if key not in self._device_cache:
            self._device_cache[key] = _mask_to(self.remote_mask, device)
        return self._device_cache[key]

    def group_masks_on(self, device: torch.device) -> list[tuple]:
        """``group_masks`` moved to ``device`` (cached), as `masks_on`."""
        device = torch.device(device)
        src = self.doc_ids.device
        if device == src or (device.type == src.type and device.index is None):
            return self.group_masks
        key = ("groups", str(device))
        if key not in self._device_cache:
            self._device_cache[key] = [
                (None if m is None else _mask_to(m, device), steps, None if idx is None else idx.to(device))
                for m, steps, idx in self.group_masks
            ]
        return self._device_cache[key]

    def index_on(self, device: torch.device, rank: int) -> torch.Tensor:
        key = ("idx", str(device), rank)
        if key not in self._device_cache:
            self._device_cache[key] = self.shard_indices(rank).to(device)
        return self._device_cache[key]

    def perm_on(self, device: torch.device) -> torch.Tensor:
        """``perm`` on ``device`` (cached): the global index of each key of the all-gathered K/V."""
        key = ("perm", str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self.perm.to(device)
        return self._device_cache[key]

    def kv_index_on(self, device: torch.device, j: int) -> torch.Tensor:
        """Global indices of the keys of kv rank j that masks[j] covers (all of shard j except for "direct")."""
        key = ("kvidx", str(device), j)
        if key not in self._device_cache:
            src = self.kv_sets[j] if self.kv_sets else self.shard_indices(j)
            self._device_cache[key] = src.to(device)
        return self._device_cache[key]

    def direct_on(self, device: torch.device) -> tuple[list, list]:
        key = ("direct", str(device))
        if key not in self._device_cache:
            mv = lambda xs: [None if x is None else x.to(device) for x in xs]
            self._device_cache[key] = (mv(self.direct_send), mv(self.direct_recv))
        return self._device_cache[key]


def _mask_to(m: BlockMask, device: torch.device) -> BlockMask:
    """BlockMask.to(device), also moving a DocumentMaskMod's per-token tensors (BlockMask.to cannot see them)."""
    out = m.to(device)
    mm = m.mask_mod
    if isinstance(mm, DocumentMaskMod):
        out.mask_mod = DocumentMaskMod(
            mm.q_doc.to(device),
            mm.kv_doc.to(device),
            mm.q_pos.to(device),
            mm.kv_pos.to(device),
            causal=mm.causal,
            window=mm.window,
            kv_in_prefix=None if mm.kv_in_prefix is None else mm.kv_in_prefix.to(device),
        )
    return out


def _mask_from_blocks(nonempty: torch.Tensor, full: torch.Tensor, mask_mod, Lq: int, Lk: int, bs: int):
    """BlockMask from block occupancy ``[B, Qb, Kb]`` (partial = nonempty and not full)."""
    tables = block_tables(torch.stack([nonempty & ~full, full]))
    return block_mask_from_tables(*tables, block_size=(bs, bs), mask_mod=mask_mod, seq_lengths=(Lq, Lk))


def drop_key_blocks(mask: BlockMask, first: int, last: int) -> BlockMask | None:
    """``mask`` without its key blocks ``first:last`` (None if nothing is left): the all-gather's mask of the
    keys other ranks hold, for the local-keys-first forward. The rest of the mask, mask_mod included, is
    unchanged, so the two parts' results merge by LSE into exactly the whole mask's."""
    Lq, Lk = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE
    if bq != bk:
        raise ValueError(f"drop_key_blocks needs square blocks, got {mask.BLOCK_SIZE}")
    nkv = -(-Lk // bk)
    # [B, Qb, Kb] occupancy of the head-independent (head dim 1) partial and full block lists
    part = dense_blocks(mask.kv_num_blocks[:, 0], mask.kv_indices[:, 0], nkv)
    full = (
        dense_blocks(mask.full_kv_num_blocks[:, 0], mask.full_kv_indices[:, 0], nkv)
        if mask.full_kv_num_blocks is not None
        else torch.zeros_like(part)
    )
    part[..., first:last] = False
    full[..., first:last] = False
    if not (part.any() or full.any()):
        return None
    return _mask_from_blocks(part | full, full, mask.mask_mod, Lq, Lk, bq)


def build_pair_masks(
    doc_ids: torch.Tensor,
    q_index: torch.Tensor,
    kv_indices: list[torch.Tensor],
    *,
    causal: bool,
    window: int | None,
    block_size: int,
    prefix_lengths: int | None = None,
    builder: str = "masks",
    lo_hi: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[BlockMask | None, int, int]]:
    """BlockMasks of one query token set against several key token sets, straight from document ids.

    The one place per-step masks are built (never an L×L tensor). ``builder="masks"`` uses
    `flexdist.masks.document_block_mask` (per-block run/position ranges; supports prefix-LM);
    ``builder="intervals"`` uses this package's per-token visibility intervals (`balance.pair_blocks`, needs
    ascending key positions). Both give a `DocumentMaskMod` over global positions, so the kernel evaluates
    partial blocks natively. Returns ``(mask or None if empty, partial blocks, full blocks)`` per key set.
    """
    B = doc_ids.shape[0]
    qi = q_index.to(doc_ids.device)
    out = []
    if builder == "masks":
        from flexdist.masks import document_block_mask

        for kv in kv_indices:
            bm = document_block_mask(
                doc_ids,
                q_positions=qi,
                kv_positions=kv.to(doc_ids.device),
                causal=causal,
                window=window,
                prefix_lengths=prefix_lengths,
                block_size=block_size,
                validate=False,
            )
            n_part = int(bm.kv_num_blocks.sum())
            n_full = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
            out.append((bm if n_part + n_full else None, n_part, n_full))
        return out
    if builder != "intervals":
        raise ValueError(f"builder must be 'masks' or 'intervals', got {builder!r}")
    if prefix_lengths is not None:
        raise ValueError("builder='intervals' does not support prefix_lengths; use builder='masks'")
    lo, hi = lo_hi if lo_hi is not None else bal.visible_intervals(doc_ids, causal, window)
    qlo, qhi = lo[:, qi], hi[:, qi]
    q_doc = doc_ids[:, qi]
    q_pos = qi.expand(B, -1)
    for kv in kv_indices:
        kv = kv.to(doc_ids.device)
        nonempty, full = bal.pair_blocks(qlo, qhi, kv, block_size)
        n_part = int((nonempty & ~full).sum())
        n_full = int(full.sum())
        if n_part + n_full == 0:
            out.append((None, 0, 0))
            continue
        mm = DocumentMaskMod(q_doc, doc_ids[:, kv], q_pos, kv.expand(B, -1), causal=causal, window=window)
        out.append(
            (_mask_from_blocks(nonempty, full, mm, qi.numel(), kv.numel(), block_size), n_part, n_full)
        )
    return out


def _needed_tokens(
    lo: torch.Tensor, hi: torch.Tensor, q_index: torch.Tensor, kv_index: torch.Tensor, bs: int
) -> torch.Tensor | None:
    """Local indices (ascending, whole blocks) of the tokens of ``kv_index`` that queries ``q_index`` attend to."""
    ne, _ = bal.pair_blocks(lo[:, q_index], hi[:, q_index], kv_index, bs)
    blocks = torch.nonzero(ne.any(1).any(0)).flatten()
    if blocks.numel() == 0:
        return None
    tok = (blocks[:, None] * bs + torch.arange(bs)).flatten()
    return tok[tok < kv_index.numel()]


def _pair_work_tokens(
    perm: torch.Tensor, N: int, lo: torch.Tensor, hi: torch.Tensor, bs: int, partial_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``[N, N]`` visited-block work of every (q rank, kv rank) pair for any layout, and the number of
    distinct K/V blocks of shard j that rank r needs (the communication minimum)."""
    L = perm.numel() // N
    W = np.zeros((N, N))
    need = np.zeros((N, N), dtype=np.int64)
    shards = [perm[r * L : (r + 1) * L] for r in range(N)]
    for r in range(N):
        qlo, qhi = lo[:, shards[r]], hi[:, shards[r]]
        for j in range(N):
            ne, fu = bal.pair_blocks(qlo, qhi, shards[j], bs)
            W[r, j] = float(fu.sum()) + partial_weight * float((ne & ~fu).sum())
            need[r, j] = int(ne.any(1).any(0).sum())
    return W, need


def _layout(
    balance: str,
    doc_ids: torch.Tensor,
    N: int,
    bs: int,
    causal: bool,
    window: int | None,
    cost: bal.CostModel,
    prefix: int | None = None,
    G: np.ndarray | None = None,
    nz: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, dict]:
    S = doc_ids.shape[1]
    if balance == "contiguous":
        return bal.contiguous_perm(S, N), {}
    if balance == "zigzag":
        return bal.zigzag_perm(S, N), {}
    if balance == "document":
        if S % (N * bs):
            raise ValueError(
                f"balance='document' assigns whole blocks: S={S} must be divisible by N*block_size="
                f"{N}*{bs}={N * bs} (S % {N * bs} = {S % (N * bs)}); pass a smaller block_size or pad S"
            )
        G = (
            G
            if G is not None
            else bal.global_block_work(doc_ids, bs, causal, window, cost.partial_weight, prefix)
        )
        assign, info = bal.plan_document(G, N, cost, nz=nz)
        return bal.blocks_to_perm(assign, N, bs), info
    raise ValueError(f"balance must be one of {(*bal.BALANCES, 'auto')}, got {balance!r}")


def check_head_chunks(head_chunks: Any, name: str = "head_chunks") -> int | tuple[int, ...]:
    """``head_chunks`` as an int >= 1 or a tuple of positive ints (checked against the head count later);
    ``name`` is the argument the error messages name."""
    if isinstance(head_chunks, bool) or not isinstance(head_chunks, (int, tuple, list)):
        raise ValueError(f"{name} must be a positive int or a sequence of them, got {head_chunks!r}")
    if isinstance(head_chunks, int):
        if head_chunks < 1:
            raise ValueError(f"{name} must be >= 1, got {head_chunks}")
        return head_chunks
    sizes = tuple(head_chunks)
    if not sizes or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in sizes):
        raise ValueError(f"{name} must list positive ints (K/V heads per chunk), got {head_chunks!r}")
    return sizes if len(sizes) > 1 else 1


def chunk_sizes(
    head_chunks: int | tuple[int, ...], num_kv_heads: int, name: str = "head_chunks"
) -> list[int]:
    """K/V heads of each pipelined chunk: an int n splits ``num_kv_heads`` into n near-equal chunks with the
    larger ones last (the first chunk's gather is the exposed one); a tuple is taken as given."""
    if isinstance(head_chunks, int):
        if head_chunks > num_kv_heads:
            raise ValueError(f"{name}={head_chunks} is more chunks than the {num_kv_heads} key/value heads")
        base, extra = divmod(num_kv_heads, head_chunks)
        return [base + (i >= head_chunks - extra) for i in range(head_chunks)]
    if sum(head_chunks) != num_kv_heads:
        raise ValueError(
            f"{name}={head_chunks} sums to {sum(head_chunks)}, not the {num_kv_heads} key/value heads"
        )
    return list(head_chunks)


def plan(
    doc_ids: torch.Tensor,
    group: Any = None,
    *,
    balance: str = "auto",
    strategy: str = "ring",
    causal: bool = True,
    window: int | None = None,
    block_size: int = 128,
    prefix_lengths: int | None = None,
    kernel_backend: str = "auto",
    mask_builder: str = "masks",
    comm_weight: float = 1.0,
    tile_overhead: float = 0.0,
    ring_group: int = 1,
    head_chunks: int | tuple[int, ...] | list[int] = 1,
    local_first: bool = False,
    bwd_head_chunks: int | tuple[int, ...] | list[int] | None = None,
    check: bool | None = None,
    debug: bool | None = None,
    objective: str | None = None,
) -> Plan:
    """Plan context-parallel attention for one global batch of packed documents.

    Args:
        doc_ids: ``[B, S]`` integer document ids (negative = padding), identical on every rank of ``group``.
            A document is one contiguous run of equal ids.
        group: the CP ProcessGroup, a 1-D DeviceMesh, or None (default group; a single process when
            torch.distributed is not initialised).
        balance: "contiguous", "zigzag", "document" or "auto" (lowest predicted time of the feasible ones).
            The time predicted (what "document" minimises and "auto" compares) is set by ``objective``: the
            ring's per-step critical path, or (the default with "allgather") the largest per-rank total
            work, partial blocks weighted ``balance.ALLGATHER_PARTIAL_WEIGHT`` (measured: they cost more).
        strategy: "ring" (P2P ring, overlapped, empty steps skipped, a shard stops after its last consumer),
            "allgather" (gather K/V, one call) or "direct" (each step t a shift-by-t P2P exchange of exactly
            the K/V blocks the receiver's mask needs — the mask's minimum volume — and dK/dV sent straight
            back to the owner), or "ulysses" (all-to-all to head shards of the whole sequence and back;
            needs heads divisible by N; balanced whatever the sharding).
        causal, window: the document mask (same document, causal, sliding window of W tokens).
        prefix_lengths: prefix-LM: each document's first P tokens are visible to all its queries (int P).
        block_size: the BlockMask block (and the document planner's unit of assignment).
        kernel_backend: passed to ``flexdist.kernels`` ("auto", "triton", "gluon" or "reference").
        mask_builder: "masks" (`flexdist.masks.document_block_mask`) or "intervals" (see `build_pair_masks`).
        comm_weight: time to move one K/V block relative to computing one block (see `balance.CostModel`).
        tile_overhead: cost of each (query block, ring step) with any work, in blocks (see
            `balance.CostModel`; H100 measurements suggest ≈2; 0 keeps the block-count-only model).
        ring_group: with ``strategy="ring"``, run the forward and dQ kernels once per group of this many ring
            steps, over the concatenated keys of the group's shards (K/V still hop one step at a time; dK/dV
            still travel per step). Fewer, larger calls: each query tile loads Q and merges its output once
            per group instead of once per step. Holds up to ``ring_group + 1`` visiting shards (plus a
            concatenated copy) instead of two. 1 (default) is the plain ring. Experimental: exact on CPU
            and under NCCL; on 2 GPUs at 32k tokens each, g = 2 took 12.46 / 36.34 ms against the plain
            ring's 13.41 / 36.80 (``bench/results/2026-11-26-s6/call4``). Only one of a group's g hops
            overlaps a kernel call.
        head_chunks: with ``strategy="allgather"``, gather K/V and run the kernels in this many chunks of
            key/value heads (an int: near-equal chunks, the larger ones last; a sequence: the chunk sizes,
            summing to the K/V head count), pipelined: chunk c+1's all-gather runs while chunk c's kernels
            do, and in backward chunk c's dK/dV reduce-scatter runs while its dQ kernel and the next chunks
            do. Only the first chunk's gather is exposed. 1 (default) is the unpipelined all-gather (what
            torch's CP does). Score mods must be head-independent or one of the built-in ones.
        local_first: with ``strategy="allgather"``, the first chunk's heads first attend to the rank's own
            K/V shard while that chunk's gather runs (into an fp32 running result); the chunk's call over the
            gathered keys then covers the other ranks' keys only and merges by LSE, writing the output. That
            hides the first gather, the one transfer the pipeline otherwise exposes, at the cost of one more
            call and an fp32 round trip of the first chunk's output. Needs the shard length ``S / N`` to be a
            multiple of ``block_size`` (the own keys are then whole key blocks of the gathered sequence).
            The backward is unchanged. Measured (``head_chunks=2``, 8-rank simulation): it lifts the forward
            from 0.80–0.83 to 0.86–0.89 efficiency (``bench/results/2026-11-26-s8``); with the per-rank-totals
            planner 0.85–0.92 over seven runs (s9, s10); with the one-copy K/V pack and GPU-time rounds
            0.87–0.88 on an H100 and 0.90 on an H200 (0.90 / 0.92 against the bracketing baselines, s11).
            On 4 real GPUs it is about even (s9: slower; s11: 6.12 against 6.20 ms, and 0.7% faster training
            steps at cp = 4); at 8k tokens per GPU slower, since the gather it hides is small there (s12,
            host ahead: +6% forward on 2 GPUs, +3% on 4; the training config enables it from 48k remote
            tokens per rank, ``train.config.LOCAL_FIRST_MIN_REMOTE_TOKENS``).
        bwd_head_chunks: with ``strategy="allgather"``, the backward's chunks, as ``head_chunks`` (None: the
            same as ``head_chunks``). The forward and backward pipelines are separate (the backward gathers
            K/V again), so each can take its own split: the backward's first gather is exposed (it has no
            ``local_first``), and a small first chunk shortens it. Measured (``bench/results/2026-11-26-s16``):
            ``(1, 7)`` of 8 K/V heads ran the 8-rank simulation's backward 1.6–3.2% faster than
            ``head_chunks=2``; on 2 real H100s 3.5% slower at 16k tokens per GPU and 1.2% faster at 32k, with
            7% more peak memory (the larger chunk's buffers). Hence not the default.
        check: all-reduce a hash of doc_ids to catch ranks passing different batches (default: on the
            first plan of each group, and always in debug mode).
        debug: check on every call (default: environment FLEXDIST_CP_DEBUG=1).
        objective: what the "document" planner minimises and "auto" compares: "ring" (the ring's per-step
            critical path, partial blocks weighted 1) or "totals" (the largest per-rank total work, partial
            blocks weighted ``balance.ALLGATHER_PARTIAL_WEIGHT``). Default (None): "totals" for
            ``strategy="allgather"``, where ranks do not step together, "ring" otherwise. At N = 8 in the
            simulation "totals" lowered the slowest rank's excess over the mean from 1.4–2.1% to 0.4–1.1%
            (forward) and from 3.4–3.9% to 1.2–2.1% (backward) (``bench/results/2026-11-26-s9/call3``).
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be a [B, S] tensor, got {getattr(doc_ids, 'shape', type(doc_ids))}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise TypeError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(ring_group, int) or ring_group < 1:
        raise ValueError(f"ring_group must be a positive int, got {ring_group!r}")
    if ring_group > 1 and strategy != "ring":
        raise ValueError(f"ring_group={ring_group} needs strategy='ring', got strategy={strategy!r}")
    head_chunks = check_head_chunks(head_chunks)
    if head_chunks != 1 and strategy != "allgather":
        raise ValueError(f"head_chunks={head_chunks} needs strategy='allgather', got strategy={strategy!r}")
    bwd_head_chunks = (
        head_chunks if bwd_head_chunks is None else check_head_chunks(bwd_head_chunks, "bwd_head_chunks")
    )
    if bwd_head_chunks != 1 and strategy != "allgather":
        raise ValueError(
            f"bwd_head_chunks={bwd_head_chunks} needs strategy='allgather', got strategy={strategy!r}"
        )
    if not isinstance(local_first, bool):
        raise ValueError(f"local_first must be a bool, got {local_first!r}")
    if local_first and strategy != "allgather":
        raise ValueError(f"local_first=True needs strategy='allgather', got strategy={strategy!r}")
    if objective is None:
        objective = "totals" if strategy == "allgather" else "ring"
    if objective not in ("ring", "totals"):
        raise ValueError(f"objective must be 'ring', 'totals' or None, got {objective!r}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if prefix_lengths is not None and (not isinstance(prefix_lengths, int) or prefix_lengths < 0):
        raise ValueError(f"prefix_lengths must be a non-negative int or None, got {prefix_lengths!r}")
    t_start = time.perf_counter()
    grp, N, rank = _resolve_group(group)
    S = doc_ids.shape[1]
    if S % N:
        raise ValueError(f"sequence length S={S} is not divisible by the CP world size N={N}")
    if local_first and (S // N) % block_size:
        raise ValueError(
            f"local_first=True needs the shard length S/N={S}/{N}={S // N} to be a multiple of "
            f"block_size={block_size} (the rank's own keys must be whole key blocks)"
        )
    if debug is None:
        debug = os.environ.get("FLEXDIST_CP_DEBUG", "0") not in ("", "0")
    if check is None:
        check = debug or (grp is not None and id(grp) not in _CHECKED_GROUPS)
    if check and grp is not None:
        check_consistent(
            doc_ids,
            grp,
            (
                balance,
                strategy,
                causal,
                window,
                block_size,
                prefix_lengths,
                ring_group,
                head_chunks,
                local_first,
                bwd_head_chunks,
                # the planner's inputs: ranks that weigh the work differently compute different layouts
                objective,
                comm_weight,
                tile_overhead,
            ),
        )
        _CHECKED_GROUPS.add(id(grp))

    gather = objective == "totals"
    cost = bal.CostModel(
        comm_weight=comm_weight,
        direct=strategy == "direct",
        tile_overhead=tile_overhead,
        gather=gather,
        partial_weight=bal.ALLGATHER_PARTIAL_WEIGHT if gather else 1.0,
    )
    doc_cpu = doc_ids.detach().cpu().long()
    lo, hi = bal.visible_intervals(doc_cpu, causal, window, prefix_lengths)
    L = S // N
    # global block work (used by the planner, and for the exact pair work of block-aligned layouts)
    G = None
    if S % (N * block_size) == 0 and balance in ("auto", "document"):
        # sparse first (its non-zeros are shared by every layout scored against G), then the dense array
        # the planner's local search reads rows and columns of
        nb, nz = bal.block_work_from_intervals(lo, hi, block_size, cost.partial_weight)
        G = bal.dense_block_work(nb, nz)
    else:
        nz = None

    def pair_work(perm: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        assign = bal.block_assignment(perm, N, block_size) if G is not None else None
        if assign is not None:
            return bal.pair_work_from_blocks(G, assign, N, nz)
        return _pair_work_tokens(perm, N, lo, hi, block_size, cost.partial_weight)

    if balance == "auto":
        cands = []
        for name in bal.BALANCES:
            try:
                perm, info = _layout(
                    name, doc_cpu, N, block_size, causal, window, cost, prefix_lengths, G, nz
                )
            except ValueError:
                continue
            W, need = pair_work(perm)
            cands.append((bal.predicted_time(W, -(-L // block_size), cost), name, perm, info, W, need))
        if not cands:
            raise ValueError(
                f"no balance can split S={S} over N={N} ranks (contiguous needs S % N == 0, zigzag S % 2N == 0, "
                f"document S % (N*block_size) == 0 with block_size={block_size})"
            )
        _, resolved, perm, info, W, need = min(cands, key=lambda c: (c[0], c[1] != "contiguous"))
        info = dict(info, auto_candidates={c[1]: c[0] for c in cands})
    else:
        perm, info = _layout(balance, doc_cpu, N, block_size, causal, window, cost, prefix_lengths, G, nz)
        resolved = balance
        W, need = pair_work(perm)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(S)

    dev = doc_ids.device
    doc_dev = doc_ids.long()
    lo_d, hi_d = lo.to(dev), hi.to(dev)
    shards = [perm[r * L : (r + 1) * L] for r in range(N)]
    mine = shards[rank]
    mkw = dict(
        causal=causal,
        window=window,
        block_size=block_size,
        prefix_lengths=prefix_lengths,
        builder=mask_builder,
        lo_hi=(lo_d, hi_d),
    )
    direct_send: list[torch.Tensor | None] = [None] * N
    direct_recv: list[torch.Tensor | None] = [None] * N
    kv_sets = shards
    if strategy == "direct":
        # exactly the K/V blocks each pair needs: what I receive from j (compacted, ascending) and send to r
        kv_sets = list(shards)
        for t in range(1, N):
            j, r_to = (rank - t) % N, (rank + t) % N
            direct_recv[t] = _needed_tokens(lo, hi, mine, shards[j], block_size) if W[rank, j] > 0 else None
            if direct_recv[t] is not None:
                kv_sets[j] = shards[j][direct_recv[t]]
            direct_send[t] = (
                _needed_tokens(lo, hi, shards[r_to], mine, block_size) if W[r_to, rank] > 0 else None
            )
    t_masks = time.perf_counter()
    if strategy != "direct" and mask_builder == "masks" and L % block_size == 0:
        # this rank's row of the plan's masks in a fixed number of launches (one host sync for all counts)
        from flexdist.masks import rank_step_block_masks

        rows = rank_step_block_masks(
            doc_dev,
            torch.stack(shards).to(dev),
            causal=causal,
            window=window,
            prefix_lengths=prefix_lengths,
            block_size=block_size,
            validate=False,
            q_ranks=[rank],
        )
        masks = [None if rows.is_empty(rank, j) else rows.get(rank, j) for j in range(N)]
    else:  # direct (uneven compacted key sets), the "intervals" builder, or shards of partial blocks
        masks = [m for m, _, _ in build_pair_masks(doc_dev, mine, kv_sets, **mkw)]
    for j in range(N):
        # Both emptiness tests are proofs: W is exact per token (a superset for prefix+window), the block
        # classifier only calls a pair empty when nothing is visible (it may keep partial blocks that hold
        # nothing when blocks straddle non-consecutive positions). Skip the step if either says empty.
        if W[rank, j] == 0:
            masks[j] = None
    full_mask = remote_mask = None
    if strategy == "allgather":  # keys in plan order: as the all-gather delivers them (no reorder)
        ((full_mask, _, _),) = build_pair_masks(doc_dev, mine, [perm], **mkw)
        if local_first and N > 1 and full_mask is not None:
            nb = L // block_size  # the own keys: block columns rank·nb … (rank+1)·nb of the gathered sequence
            remote_mask = drop_key_blocks(full_mask, rank * nb, (rank + 1) * nb)
    elif strategy == "ulysses":  # every rank attends the whole sequence (its heads) in global order
        ((full_mask, _, _),) = build_pair_masks(doc_dev, torch.arange(S), [torch.arange(S)], **mkw)
    t_last = bal.last_needed_step(W)
    group_masks: list = []
    if strategy == "ring" and ring_group > 1:
        for p0 in range(0, N, ring_group):
            steps = [t for t in range(p0, min(p0 + ring_group, N)) if masks[(rank - t) % N] is not None]
            if not steps:
                group_masks.append((None, steps, None))
                continue
            kv = torch.cat([shards[(rank - t) % N] for t in steps])
            ((gm, _, _),) = build_pair_masks(doc_dev, mine, [kv], **dict(mkw, builder="masks"))
            group_masks.append((gm, steps, kv.to(dev)))
    mask_build_s = time.perf_counter() - t_masks
    if strategy == "direct":
        t_last = np.zeros(N, dtype=np.int64)  # unused: nothing travels round a ring
    pos = bal.positions_in_document(doc_cpu)[:, mine].to(dev)
    p = Plan(
        group=grp,
        world_size=N,
        rank=rank,
        balance=resolved,
        strategy=strategy,
        causal=causal,
        window=window,
        block_size=block_size,
        doc_ids=doc_dev,
        perm=perm,
        inv_perm=inv,
        global_positions=mine.to(dev),
        positions=pos,
        masks=masks,
        work=W,
        t_last=t_last,
        kernel_backend=kernel_backend,
        full_mask=full_mask,
        debug=debug,
        direct_send=[None if x is None else x.to(dev) for x in direct_send],
        direct_recv=[None if x is None else x.to(dev) for x in direct_recv],
        kv_sets=[x.to(dev) for x in kv_sets],
        ring_group=ring_group,
        group_masks=group_masks,
        head_chunks=head_chunks,
        bwd_head_chunks=bwd_head_chunks,
        local_first=local_first and N > 1,
        remote_mask=remote_mask,
    )
    p.stats = plan_stats(W, need, bal.last_needed_step(W), L, block_size, cost, info, strategy)
    # host wall time of this rank's BlockMask construction and of the whole plan (layout search included);
    # on CUDA the mask build launches kernels asynchronously, so this is what the host spent, not the GPU
    p.stats["mask_build_s"] = mask_build_s
    p.stats["plan_time_s"] = time.perf_counter() - t_start
    return p


def plan_stats(
    W: np.ndarray,
    need: np.ndarray,
    t_last: np.ndarray,
    L: int,
    bs: int,
    cost: bal.CostModel,
    info: dict,
    strategy: str,
) -> dict:
    """Per-rank work balance, ring critical path, skipped steps and K/V tokens moved vs the mask's minimum."""
    N = W.shape[0]
    per_rank = W.sum(1)
    total = float(W.sum())
    sm = bal.step_matrix(W)
    crit = float(sm.max(axis=1).sum())
    nonempty_offdiag = int(((W > 0) & ~np.eye(N, dtype=bool)).sum())
    ring_moves = int(sum(int((t_last >= t).sum()) for t in range(1, N)))  # shard transfers, forward
    return {
        "world_size": N,
        "total_work_blocks": total,
        "work_max": float(per_rank.max()),
        "work_mean": float(per_rank.mean()),
        "work_max_over_mean": float(per_rank.max() / per_rank.mean()) if total else 1.0,
        "critical_path_blocks": crit,
        "critical_path_over_ideal": crit / (total / N) if total else 1.0,
        "predicted_time_blocks": bal.predicted_time(W, -(-L // bs), cost),
        "steps_skipped_compute": int(N * (N - 1) - nonempty_offdiag),
        "ring_shard_transfers": ring_moves,
        "ring_shard_transfers_full": N * (N - 1),
        "kv_tokens_moved_ring": ring_moves * L,
        "kv_tokens_moved_allgather": N * (N - 1) * L,
        "kv_tokens_min": int((need * (1 - np.eye(N, dtype=np.int64))).sum()) * bs,
        "kv_tokens_moved_direct": int((need * (1 - np.eye(N, dtype=np.int64))).sum()) * bs,
        "strategy": strategy,
        # what predicted_time_blocks is: the ring's critical path or the largest per-rank total ("totals");
        # W's partial blocks carry the same weight (`balance.ALLGATHER_PARTIAL_WEIGHT` with "totals")
        "objective": "totals" if cost.gather else "ring",
        "planner": info,
    }
