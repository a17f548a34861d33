"""Document BlockMasks built analytically: classify block pairs from per-block ranges, never from the S×S mask.

torch's ``create_block_mask`` evaluates ``mask_mod`` on every (q, kv) element and then sums blocks: O(S²)
work and, eagerly, O(S²) memory (DESIGN.md: 13 ms for one 32k document mask on an H100, out of memory at
128k). A document mask has structure we can use instead. For each block of ``block_size`` tokens we take,
over its non-padding tokens, the range of document *run indices* and the range of global positions (plus, for
prefix-LM, the same ranges restricted to prefix / non-prefix keys). A (q-block, kv-block) pair is then

- **empty** when the run ranges are disjoint, or no position difference in range can be visible and no prefix
  key of a shared document exists — provably nothing is visible;
- **full** when every token of both blocks is a valid (in range, non-padding) token of one single document run
  and every position difference in range is visible — provably everything is visible;
- **partial** otherwise (the kernel evaluates the element-wise `DocumentMaskMod` there).

That is always correct, whatever the token order inside blocks; when every block holds consecutive global
positions (contiguous shards, zigzag chunks, any permutation of whole blocks) it is also exact — the same
empty / partial / full classification ``create_block_mask`` finds element by element (tests check both).

Work is O(S) for the per-block ranges plus O(B · (Lq/bs) · (Lkv/bs)) for the pair tests and the ordering
into ``kv_indices``, all in a fixed number of vectorised torch ops on the input's device; the only host
synchronisation is the optional range check of user-given positions / prefix tables (``validate=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from flexdist.kernels.block_sparse import block_mask_from_tables
from flexdist.kernels.document_mask import DocumentMaskMod

from . import triton_build
from .documents import MAX_TOKENS, check_doc_ids, document_run_index, positions_in_document

__all__ = ["document_block_mask"]

_BIG = 1 << 29  # sentinel for "no token" in min/max stats; differences of two stay inside int32


# ----------------------------------------------------------------------------------------------- arguments


def check_block_size(block_size: object) -> tuple[int, int]:
    """``block_size``: an int (square blocks) or ``(q_block, kv_block)``, each >= 1."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        sizes = (block_size, block_size)
    elif (
        isinstance(block_size, tuple | list)
        and len(block_size) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in block_size)
    ):
        sizes = (int(block_size[0]), int(block_size[1]))
    else:
        raise TypeError(
            f"block_size must be an int or a (q_block, kv_block) pair of ints, got {block_size!r}"
        )
    if min(sizes) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    return sizes


def check_window(window: object) -> int | None:
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool):
        raise TypeError(f"window must be an int number of tokens or None, got {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1 token (the query's own token counts), got {window}")
    return window


class _Checks:
    """Data-dependent argument checks gathered into one host synchronisation (or none when empty)."""

    def __init__(self) -> None:
        self.bad: list[torch.Tensor] = []
        self.messages: list = []

    def add(self, bad: torch.Tensor, message) -> None:
        self.bad.append(bad.reshape(()))
        self.messages.append(message)

    def raise_if_bad(self) -> None:
        if not self.bad:
            return
        flags = torch.stack(self.bad).cpu().tolist()
        for flag, message in zip(flags, self.messages, strict=True):
            if flag:
                raise ValueError(message())


def check_prefix(
    doc_ids: torch.Tensor, prefix_lengths: object, checks: _Checks | None
) -> int | torch.Tensor | None:
    """Validate ``prefix_lengths`` (prefix-LM): None, an int P shared by every document, or a per-document
    table indexed by document **id**, 1-D ``[num_ids]`` (shared by all rows) or 2-D ``[B, num_ids]``: a
    document with id ``d`` in row ``b`` has prefix length ``table[b, d]`` (two runs with the same id share
    it). Returns the int or the ``[B, num_ids]`` table; data-dependent checks go into ``checks``."""
    if prefix_lengths is None:
        return None
    B = doc_ids.shape[0]
    if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        if prefix_lengths < 0:
            raise ValueError(f"prefix_lengths must be >= 0, got {prefix_lengths}")
        return prefix_lengths
    if not isinstance(prefix_lengths, torch.Tensor):
        raise TypeError(
            f"prefix_lengths must be an int, a tensor indexed by document id, or None; got "
            f"{type(prefix_lengths).__name__}"
        )
    t = prefix_lengths
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"prefix_lengths must be an integer tensor, got dtype {t.dtype}")
    if t.device != doc_ids.device:
        raise ValueError(f"prefix_lengths is on {t.device} but doc_ids is on {doc_ids.device}")
    if t.dim() == 1:
        t = t.expand(B, -1)
    if t.dim() != 2 or t.shape[0] != B or t.shape[1] < 1:
        raise ValueError(
            f"prefix_lengths as a tensor must be [num_ids] or [B={B}, num_ids] indexed by document id, got "
            f"shape {tuple(prefix_lengths.shape)}"
        )
    n_ids = t.shape[1]
    if checks is not None:
        checks.add(
            doc_ids.max() >= n_ids,
            lambda: f"prefix_lengths has {n_ids} entries per row but doc_ids holds id {int(doc_ids.max())}",
        )
        checks.add(t.min() < 0, lambda: f"prefix_lengths must be >= 0, got minimum {int(t.min())}")
    return t


def prefix_flags(doc_ids: torch.Tensor, prefix: int | torch.Tensor | None) -> torch.Tensor | None:
    """bool ``[B, S]``: the token is among its document's first P tokens (see `check_prefix`), or None."""
    if prefix is None:
        return None
    pid = positions_in_document(doc_ids)
    if isinstance(prefix, int):
        p_tok = prefix
    else:
        p_tok = prefix.gather(1, doc_ids.clamp(min=0).long())
    return (pid < p_tok) & (doc_ids >= 0)


def check_positions(
    positions: object,
    name: str,
    lead_shape: tuple[int, ...],
    B: int,
    S: int,
    device: torch.device,
    checks: _Checks | None,
) -> torch.Tensor:
    """int64 ``[*lead_shape, B, L]`` global positions; accepts the batch dim omitted (broadcast over B)."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of global token positions, got {type(positions).__name__}"
        )
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {positions.dtype}")
    if positions.device != device:
        raise ValueError(f"{name} is on {positions.device} but doc_ids is on {device}")
    nl = len(lead_shape)
    shape = tuple(positions.shape)
    lead_txt = "".join(f"{d}, " for d in lead_shape)
    if positions.dim() == nl + 1 and shape[:nl] == lead_shape:
        positions = positions.unsqueeze(nl).expand(*lead_shape, B, shape[-1])
    elif not (positions.dim() == nl + 2 and shape[:nl] == lead_shape and shape[nl] == B):
        raise ValueError(f"{name} must be [{lead_txt}B={B}, L] or [{lead_txt}L], got shape {shape}")
    if positions.shape[-1] < 1:
        raise ValueError(f"{name} must hold at least one token, got shape {shape}")
    if checks is not None:
        checks.add(
            (positions.min() < 0) | (positions.max() >= S), lambda: positions_message(name, positions, S)
        )
    return positions


def positions_message(name: str, positions: torch.Tensor, S: int) -> str:
    return (
        f"{name} must lie in [0, S={S}) (indices into doc_ids' sequence dim), got values in "
        f"[{int(positions.min())}, {int(positions.max())}]"
    )


def use_triton(backend: object, device: torch.device) -> bool:
    """``backend``: "auto" (the Triton kernels for CUDA tensors, torch ops elsewhere; the environment variable
    ``FLEXDIST_MASK_BACKEND=torch``, read per call, makes "auto" use torch ops everywhere — a switch for
    ruling the kernels out), "triton" (on CPU tensors this needs ``TRITON_INTERPRET=1``: tests) or "torch"."""
    if backend == "auto":
        if os.environ.get("FLEXDIST_MASK_BACKEND", "auto") == "torch":
            return False
        return device.type == "cuda" and triton_build.available()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_build.available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 (the Triton interpreter); "
                "use backend='auto' or 'torch'"
            )
        return True
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def raise_bad_positions(checked: list[tuple[str, torch.Tensor, torch.Tensor]], S: int) -> None:
    """Triton path: ``(name, positions, per-block bad flags)``; one host synchronisation for all of them."""
    if not checked:
        return
    flags = torch.stack([bad.any() for _, _, bad in checked]).tolist()
    for flag, (name, positions, _) in zip(flags, checked, strict=True):
        if flag:
            raise ValueError(positions_message(name, positions, S))


# ----------------------------------------------------------------------------------------------- block work


@dataclass
class _Side:
    """Per-token tables of one side (queries or keys), ``[G, B, L]``, G = number of groups (ranks)."""

    run: torch.Tensor  # int32, -1 = padding
    pos: torch.Tensor  # int32 global positions
    prefix: torch.Tensor | None  # bool, key in its document's prefix (kv side only)


def gather_side(
    run: torch.Tensor, prefix: torch.Tensor | None, positions: torch.Tensor | None, want_prefix: bool
) -> _Side:
    """Gather the per-token tables of the tokens at ``positions [G, B, L]`` (None: all S tokens, G = 1)."""
    B, S = run.shape
    if positions is None:
        pos = torch.arange(S, device=run.device, dtype=torch.int32).expand(1, B, S).contiguous()
        return _Side(run[None], pos, prefix[None] if (want_prefix and prefix is not None) else None)
    G = positions.shape[0]
    positions = positions.long()
    r = run.unsqueeze(0).expand(G, B, S).gather(-1, positions)
    p = None
    if want_prefix and prefix is not None:
        p = prefix.unsqueeze(0).expand(G, B, S).gather(-1, positions)
    return _Side(r, positions.to(torch.int32).contiguous(), p)


def _block_stats(side: _Side, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranges over each block of ``bs`` tokens: (mins ``[K, G, B, nb]``, maxs ``[K, G, B, nb]``, key
    ``[G, B, nb]``), all int32.

    Rows of mins / maxs: 0 = run index and 1 = position of the non-padding tokens; with prefix flags also
    2 = position of non-prefix keys and 3 = run index of prefix keys. A block without such tokens gets +BIG /
    -BIG. ``key`` is the block's run index if all its tokens are valid and in one run, else -2. Tokens past
    the end of a partial-size last block count as padding (so that block is never full, like torch's).
    """
    run, pos, pre = side.run, side.pos, side.prefix
    L = run.shape[-1]
    nb = -(-L // bs)
    if nb * bs != L:
        extra = nb * bs - L
        run = F.pad(run, (0, extra), value=-1)
        pos = F.pad(pos, (0, extra), value=0)
        if pre is not None:
            pre = F.pad(pre, (0, extra), value=False)
    valid = run >= 0
    if pre is None:
        vals, ok = torch.stack([run, pos]), valid  # ok broadcasts over the stacked quantities
    else:
        non_pre = valid & ~pre
        vals, ok = torch.stack([run, pos, pos, run]), torch.stack([valid, valid, non_pre, pre])
    shape = (vals.shape[0], *run.shape[:-1], nb, bs)
    mins = torch.where(ok, vals, _BIG).view(shape).amin(-1)
    maxs = torch.where(ok, vals, -_BIG).view(shape).amax(-1)
    single = (mins[0] == maxs[0]) & valid.view(shape[1:]).all(-1)
    return mins, maxs, torch.where(single, mins[0], -2)


def classify_blocks(
    q: _Side,
    kv: _Side,
    q_bs: int,
    kv_bs: int,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """bool ``[2, Gq, Gkv, B, nq, nkv]``: (partial, full) for every q group against every kv group.

    Every pair-sized op is a single comparison or logical op between per-block values (window shifts are
    applied to the small per-block tensors first), so the pair work is about a dozen bool-producing kernels.
    """
    q_mins, q_maxs, q_key = _block_stats(q, q_bs)
    if kv is q and kv_bs == q_bs:
        k_mins, k_maxs, k_key = q_mins, q_maxs, q_key
    else:
        k_mins, k_maxs, k_key = _block_stats(kv, kv_bs)
    W = None if window is None else min(window, MAX_TOKENS)  # |q_pos - kv_pos| < MAX_TOKENS always
    # q stats broadcast as [Gq, 1, B, nq, 1] and kv stats as [1, Gkv, B, 1, nkv]; shifts on the small tensors
    q_lo = q_mins.unsqueeze(2).unsqueeze(-1)
    q_hi = q_maxs.unsqueeze(2).unsqueeze(-1)
    k_lo = k_mins.unsqueeze(1).unsqueeze(-2)
    k_hi = k_maxs.unsqueeze(1).unsqueeze(-2)
    q_rmin, q_pmin = q_lo[0], q_lo[1]
    q_rmax, q_pmax = q_hi[0], q_hi[1]
    k_rmin, k_pmin = k_lo[0], k_lo[1]
    k_rmax, k_pmax = k_hi[0], k_hi[1]
    prefix = k_lo.shape[0] == 4
    k_np_pmin, k_np_pmax = (k_lo[2], k_hi[2]) if prefix else (k_pmin, k_pmax)

    # maybe visible: a shared run, and some position difference in range visible (or a shared prefix key)
    maybe = (q_rmin <= k_rmax) & (k_rmin <= q_rmax)
    if causal:
        vis = q_pmax >= k_pmin  # some kv_pos <= q_pos
        if W is not None:
            vis &= (q_pmin - W) < k_pmax  # some q_pos - kv_pos < W
    elif W is not None:
        vis = ((q_pmax + W) > k_pmin) & ((q_pmin - W) < k_pmax)
    else:
        vis = None
    if vis is not None:
        if prefix:
            vis |= (q_rmin <= k_hi[3]) & (k_lo[3] <= q_rmax)
        maybe &= vis
    # provably all visible: one run, every token valid, every (non-prefix key) difference visible
    out = torch.empty((2, *maybe.shape), dtype=torch.bool, device=maybe.device)
    full = out[1]
    q_key = q_key.unsqueeze(1).unsqueeze(-1)
    torch.eq(q_key, k_key.unsqueeze(0).unsqueeze(-2), out=full)
    full &= q_key >= 0
    if causal:
        full &= q_pmin >= k_np_pmax
        if W is not None:
            full &= (q_pmax - W) < k_np_pmin
    elif W is not None:
        full &= ((q_pmin + W) > k_np_pmax) & ((q_pmax - W) < k_np_pmin)
    torch.ne(maybe, full, out=out[0])  # full implies maybe, so this is maybe & ~full
    return out


def ordered_indices(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (num ``[..., R]``, indices ``[..., R, C]``) of the True columns of each row, first, in order.

    Same result as torch's stable descending argsort of the 0/1 block mask (active columns ascending, then
    inactive ones ascending), but O(R·C) with a cumulative sum and one scatter instead of a sort.
    """
    C = active.shape[-1]
    cs = torch.cumsum(active, dim=-1, dtype=torch.int32)
    num = cs[..., -1:]
    ar = torch.arange(C, device=active.device, dtype=torch.int32)
    slot = torch.where(active, cs - 1, (num + ar) - cs)  # active: rank among active; else after all active
    idx = torch.empty(active.shape, dtype=torch.int32, device=active.device)
    idx.scatter_(-1, slot.long(), ar.expand(active.shape))
    return num.squeeze(-1).contiguous(), idx  # contiguous, like torch's own tables


def block_tables(classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """kv-major and q-major (num, indices) tables from ``classes`` = (partial, full) ``[2, ..., nq, nkv]``,
    with a head dim of 1 inserted before the block dims: returns (kv_num, kv_idx, full_num, full_idx, q_num,
    q_idx, fq_num, fq_idx), each shaped ``[..., 1, n(, m)]``."""
    both = classes.unsqueeze(-3)  # [2, ..., 1, nq, nkv]
    kv_num, kv_idx = ordered_indices(both)
    q_num, q_idx = ordered_indices(both.transpose(-1, -2))
    return kv_num[0], kv_idx[0], kv_num[1], kv_idx[1], q_num[0], q_idx[0], q_num[1], q_idx[1]


# ----------------------------------------------------------------------------------------------- public API


def document_block_mask(
    doc_ids: torch.Tensor,
    *,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
    prefix_lengths: int | torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
    validate: bool = True,
    backend: str = "auto",
) -> BlockMask:
    """The BlockMask of a document mask, built from document ids without evaluating the S×S mask.

    Args:
        doc_ids: ``[B, S]`` integer ids of the packed sequence; equal ids = same document, negative = padding,
            a document is a maximal run of equal ids (ids need not be sorted).
        q_positions / kv_positions: ``[B, L]`` or ``[L]`` (broadcast over B) global positions — indices into
            ``doc_ids``' sequence dim — of the query / key tokens this attention call holds, in the order it
            holds them (e.g. a CP rank's shard, any permutation). Default: all S tokens in order.
        causal: keys after the query (in global position) are invisible.
        window: sliding-window width in tokens, the query's own included (``0 <= q - kv < window`` when causal,
            ``|q - kv| < window`` otherwise), or None.
        prefix_lengths: prefix-LM. An int P (each document's first P tokens are visible to all its queries), or
            a per-document table indexed by document id, ``[num_ids]`` or ``[B, num_ids]``.
        block_size: block size of the BlockMask, int or ``(q_block, kv_block)``. Lengths need not be
            multiples; the last block is then partial-size (and never marked full, like torch).
        validate: check that positions lie in ``[0, S)`` and prefix tables cover the ids; this costs one host
            synchronisation (none without positions and prefix tables). Pass False in a hot loop once inputs
            are known good.
        backend: "auto" (default): on CUDA tensors two Triton kernels and two torch ops build everything
            (`triton_build`; mask building is launch-bound), elsewhere vectorised torch ops. "torch" or
            "triton" force one (both give identical tables; "triton" on CPU tensors needs
            ``TRITON_INTERPRET=1``).

    Returns:
        A ``torch.nn.attention.flex_attention.BlockMask`` with ``B`` batch rows, one head, ``seq_lengths =
        (Lq, Lkv)`` and ``mask_mod`` a `DocumentMaskMod` over the gathered run indices (padding -1) and global
        positions, so flexdist's kernel evaluates it natively and torch's ``flex_attention`` accepts it.
    """
    doc_ids = check_doc_ids(doc_ids)
    q_bs, kv_bs = check_block_size(block_size)
    window = check_window(window)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    B, S = doc_ids.shape
    dev = doc_ids.device
    fast = use_triton(backend, dev)
    checks = _Checks() if validate else None
    pos_checks = None if fast else checks  # the Triton path flags bad positions in its first kernel
    qp = None
    if q_positions is not None:
        qp = check_positions(q_positions, "q_positions", (), B, S, dev, pos_checks)[None]
    kvp = None
    if kv_positions is not None:
        kvp = check_positions(kv_positions, "kv_positions", (), B, S, dev, pos_checks)[None]
    prefix_table = check_prefix(doc_ids, prefix_lengths, checks)
    if checks is not None:
        checks.raise_if_bad()
    prefix = prefix_flags(doc_ids, prefix_table)
    if fast:
        return _document_block_mask_triton(doc_ids, qp, kvp, prefix, q_bs, kv_bs, causal, window, validate)
    run = document_run_index(doc_ids)

    q_side = gather_side(run, prefix, qp, want_prefix=False)
    kv_side = (
        q_side if (kvp is None and qp is None and prefix is None) else gather_side(run, prefix, kvp, True)
    )
    classes = classify_blocks(q_side, kv_side, q_bs, kv_bs, causal, window)
    tables = block_tables(classes[:, 0, 0])
    mask_mod = DocumentMaskMod(
        q_doc=q_side.run[0],
        kv_doc=kv_side.run[0],
        q_pos=q_side.pos[0],
        kv_pos=kv_side.pos[0],
        causal=causal,
        window=window,
        kv_in_prefix=None if kv_side.prefix is None else kv_side.prefix[0],
    )
    Lq, Lkv = q_side.run.shape[-1], kv_side.run.shape[-1]
    return block_mask_from_tables(*tables, block_size=(q_bs, kv_bs), mask_mod=mask_mod, seq_lengths=(Lq, Lkv))


def _document_block_mask_triton(
    doc_ids: torch.Tensor,
    qp: torch.Tensor | None,
    kvp: torch.Tensor | None,
    prefix: torch.Tensor | None,
    q_bs: int,
    kv_bs: int,
    causal: bool,
    window: int | None,
    validate: bool,
) -> BlockMask:
    """`document_block_mask` in four launches (see `triton_build`); identical tables to the torch path."""
    B, S = doc_ids.shape
    changes = triton_build.change_counts(doc_ids)
    kv = triton_build.block_side(doc_ids, changes, kvp, prefix, kv_bs)
    # the whole sequence on both sides: one set of stats serves both (queries ignore the prefix rows)
    share = qp is None and kvp is None and q_bs == kv_bs
    q = kv if share else triton_build.block_side(doc_ids, changes, qp, None, q_bs)
    kv_num, kv_idx, q_num, q_idx = triton_build.block_tables(q, kv, causal, window)
    if validate:
        checked = [
            (n, p, s.bad) for n, p, s in (("q_positions", qp, q), ("kv_positions", kvp, kv)) if p is not None
        ]
        raise_bad_positions(checked, S)
    nq, nkv = q.nb, kv.nb
    part, full = kv_num.view(2, B, 1, nq).unbind(0)
    part_idx, full_idx = kv_idx.view(2, B, 1, nq, nkv).unbind(0)
    q_part, q_full = q_num.view(2, B, 1, nkv).unbind(0)
    q_part_idx, q_full_idx = q_idx.view(2, B, 1, nkv, nq).unbind(0)
    mask_mod = DocumentMaskMod(
        q_doc=q.run[0],
        kv_doc=kv.run[0],
        q_pos=q.pos[0],
        kv_pos=kv.pos[0],
        causal=causal,
        window=window,
        kv_in_prefix=None if kv.prefix is None else kv.prefix[0],
    )
    return block_mask_from_tables(
        part,
        part_idx,
        full,
        full_idx,
        q_part,
        q_part_idx,
        q_full,
        q_full_idx,
        block_size=(q_bs, kv_bs),
        mask_mod=mask_mod,
        seq_lengths=(q.run.shape[-1], kv.run.shape[-1]),
    )
