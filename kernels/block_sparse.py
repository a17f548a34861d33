"""BlockMask -> kernel metadata: block lists in both directions, and how partial blocks see the mask.

The kernel walks, per query block, the *partial* kv blocks (``kv_num_blocks`` / ``kv_indices``: the mask is
evaluated per element) and then the *full* ones (``full_kv_*``: no mask evaluation); the dK/dV pass walks
the transposed lists (``q_num_blocks`` / ``q_indices`` / ``full_q_*``). Empty blocks are in no list.

Inside partial blocks the mask is seen in one of three ways (``mask_kind``):

- ``MASK_NONE`` (0): the mask_mod is torch's ``noop_mask`` — partial blocks are fully visible;
- ``MASK_DOC`` (1): the mask_mod is a :class:`DocumentMaskMod` — evaluated in the kernel from per-token
  document ids and global positions (the path context parallelism uses);
- ``MASK_BITS`` (2): any other torch mask_mod — evaluated *once per BlockMask*, vectorised over the partial
  blocks' index grids only (``[num_partial, QBS, KBS]``, never S×S), packed one bit per element into int32
  words, and read by the kernel as a tile. The result is cached on the BlockMask (weak dict), so the
  backward and later layers reuse it.

With ``B``/``H`` broadcast in the BlockMask (size 1), the general mask_mod is evaluated at ``b=0`` / ``h=0``,
which is what the dense reference does.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask

from .document_mask import DocumentMaskMod
from .validation import AttnShape, check_block_mask


@functools.cache
def _from_kv_blocks_takes_compute_q_blocks() -> bool:
    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


@functools.cache
def _init_takes_tables() -> bool:
    """BlockMask's constructor takes all eight tables by these names and needs nothing else (torch >= 2.6)."""
    params = inspect.signature(BlockMask.__init__).parameters
    names = {"self", "seq_lengths", "BLOCK_SIZE", "mask_mod"} | {
        f"{full}{side}_{kind}"
        for full in ("", "full_")
        for side in ("kv", "q")
        for kind in ("num_blocks", "indices")
    }
    others_optional = all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for n, p in params.items()
        if n not in names
    )
    return names <= params.keys() and others_optional


def block_mask_from_tables(
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_num: torch.Tensor | None,
    full_idx: torch.Tensor | None,
    q_num: torch.Tensor | None = None,
    q_idx: torch.Tensor | None = None,
    full_q_num: torch.Tensor | None = None,
    full_q_idx: torch.Tensor | None = None,
    *,
    block_size: tuple[int, int],
    mask_mod,
    seq_lengths: tuple[int, int],
) -> BlockMask:
    """A BlockMask from its block tables via the public ``BlockMask.from_kv_blocks``.

    When the caller already has the q-major tables (the dK/dV pass walks them), they are used as they are and
    torch is told not to rebuild them (its rebuild is a dense round trip and a sort): with all eight tables
    the BlockMask constructor is called directly, else ``from_kv_blocks(compute_q_blocks=False)`` where this
    torch version has it; on older versions torch computes them and ours (identical values) replace them.
    """
    have_q = q_num is not None and q_idx is not None
    if (
        have_q
        and mask_mod is not None
        and (full_num is None) == (full_q_num is None)
        and _init_takes_tables()
    ):
        # every table known: the constructor itself (from_kv_blocks adds only argument handling, which is a
        # good part of the cost when a CP plan makes N² masks)
        return BlockMask(
            seq_lengths=seq_lengths,
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=full_num,
            full_kv_indices=full_idx,
            q_num_blocks=q_num,
            q_indices=q_idx,
            full_q_num_blocks=full_q_num,
            full_q_indices=full_q_idx,
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
        )
    kwargs = {"BLOCK_SIZE": block_size, "mask_mod": mask_mod, "seq_lengths": seq_lengths}
    if have_q and _from_kv_blocks_takes_compute_q_blocks():
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, compute_q_blocks=False, **kwargs)
    else:
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)
    if have_q:
        bm.q_num_blocks, bm.q_indices = q_num, q_idx
        if full_q_num is not None and full_q_idx is not None:
            bm.full_q_num_blocks, bm.full_q_indices = full_q_num, full_q_idx
    return bm


MASK_NONE, MASK_DOC, MASK_BITS = 0, 1, 2

# Elements of a [chunk, QBS, KBS] grid evaluated at once when building bit tiles (bounds temporary memory).
_GRID_CHUNK_ELEMS = 1 << 24

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DENSE_CACHE: dict = {}


@dataclass
class KernelMask:
    """Everything the kernels need about the mask, as contiguous int32 tensors on q's device."""

    QBS: int
    KBS: int
    Bm: int
    Hm: int
    Qb: int
    KVb: int
    kv_num: torch.Tensor  # [Bm, Hm, Qb]   partial blocks per query block
    kv_idx: torch.Tensor  # [Bm, Hm, Qb, KVb]
    full_kv_num: torch.Tensor | None
    full_kv_idx: torch.Tensor | None
    q_num: torch.Tensor  # [Bm, Hm, KVb]  transposed (dK/dV pass)
    q_idx: torch.Tensor  # [Bm, Hm, KVb, Qb]
    full_q_num: torch.Tensor | None
    full_q_idx: torch.Tensor | None
    mask_kind: int = MASK_NONE
    bits: torch.Tensor | None = None  # [P, QBS, WORDS] int32
    words: int = 1
    kv_pid: torch.Tensor | None = None  # [Bm, Hm, Qb, KVb] partial id of kv_idx entries
    q_pid: torch.Tensor | None = None  # [Bm, Hm, KVb, Qb] partial id of q_idx entries
    doc: dict = field(default_factory=dict)  # MASK_DOC tensors (int32) and flags
    q_order: torch.Tensor | None = None  # [Bm, Hm, Qb] query blocks, most work first (launch order)
    kv_order: torch.Tensor | None = None  # [Bm, Hm, KVb] kv blocks, most work first (dK/dV launch order)

    @property
    def has_full(self) -> bool:
        return self.full_kv_num is not None


def _i32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int32).contiguous()


def dense_blocks(num: torch.Tensor, idx: torch.Tensor, ncols: int) -> torch.Tensor:
    """(num [..., R], idx [..., R, K]) -> bool [..., R, ncols] occupancy."""
    K = idx.shape[-1]
    valid = torch.arange(K, device=idx.device) < num[..., None].long()
    dense = torch.zeros(*idx.shape[:-1], max(ncols, 1) + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, torch.where(valid, idx.long().clamp(0, ncols), ncols), True)
    return dense[..., :ncols]


def _lists(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., R, C] -> (num [..., R], idx [..., R, C]) with the set columns first, ascending."""
    num = dense.sum(-1)
    C = dense.shape[-1]
    key = torch.where(dense, 0, C) + torch.arange(C, device=dense.device)
    idx = key.argsort(dim=-1)
    idx = torch.where(torch.arange(C, device=dense.device) < num[..., None], idx, 0)
    return num, idx


def _work_order(num: torch.Tensor, full_num: torch.Tensor | None) -> torch.Tensor:
    """Block indices sorted by decreasing work (partial blocks weigh a little more): longest first."""
    work = num.long() * 5
    if full_num is not None:
        work = work + full_num.long() * 4
    return torch.argsort(-work, dim=-1, stable=True).to(torch.int32).contiguous()


def _set_orders(km: KernelMask, Sq: int, Skv: int) -> KernelMask:
    """Launch orders over the blocks in use (a BlockMask may list more blocks than the sequence needs)."""
    nq, nk = -(-Sq // km.QBS), -(-Skv // km.KBS)
    fq = km.full_kv_num[..., :nq] if km.full_kv_num is not None else None
    fk = km.full_q_num[..., :nk] if km.full_q_num is not None else None
    km.q_order = _work_order(km.kv_num[..., :nq], fq)
    km.kv_order = _work_order(km.q_num[..., :nk], fk)
    return km


def _is_noop(mask_mod) -> bool:
    try:
        from torch.nn.attention.flex_attention import noop_mask
    except ImportError:  # pragma: no cover
        return False
    return mask_mod is None or mask_mod is noop_mask


def dense_kernel_mask(Sq: int, Skv: int, block: int, device: torch.device) -> KernelMask:
    """block_mask=None: every block is full (no mask evaluation anywhere)."""
    key = (Sq, Skv, block, str(device))
    km = _DENSE_CACHE.get(key)
    if km is not None:
        return km
    Qb, KVb = -(-Sq // block), -(-Skv // block)
    z = torch.zeros(1, 1, Qb, dtype=torch.int32, device=device)
    full_num = torch.full((1, 1, Qb), KVb, dtype=torch.int32, device=device)
    full_idx = torch.arange(KVb, dtype=torch.int32, device=device).expand(1, 1, Qb, KVb).contiguous()
    zq = torch.zeros(1, 1, KVb, dtype=torch.int32, device=device)
    fq_num = torch.full((1, 1, KVb), Qb, dtype=torch.int32, device=device)
    fq_idx = torch.arange(Qb, dtype=torch.int32, device=device).expand(1, 1, KVb, Qb).contiguous()
    km = KernelMask(
        block,
        block,
        1,
        1,
        Qb,
        KVb,
        z,
        torch.zeros_like(full_idx),
        full_num,
        full_idx,
        zq,
        torch.zeros_like(fq_idx),
        fq_num,
        fq_idx,
    )
    _set_orders(km, Sq, Skv)
    if len(_DENSE_CACHE) > 64:
        _DENSE_CACHE.clear()
    _DENSE_CACHE[key] = km
    return km


def _eval_grid(mask_mod, b, h, qi, ki) -> torch.Tensor:
    """mask_mod on broadcast grids; per-element vmap when the mod does not broadcast."""
    try:
        out = mask_mod(b, h, qi, ki)
        return (
            torch.as_tensor(out, device=qi.device)
            .to(torch.bool)
            .expand(qi.shape[0], qi.shape[1], ki.shape[2])
        )
    except Exception:
        P, QBS, KBS = qi.shape[0], qi.shape[1], ki.shape[2]
        shape = (P, QBS, KBS)
        flat = [t.expand(shape).reshape(-1) for t in (b, h, qi, ki)]
        fn = torch.vmap(mask_mod, in_dims=(0, 0, 0, 0))
        return fn(*flat).to(torch.bool).view(shape)


def _build_bits(
    mask_mod, num, idx, QBS: int, KBS: int, shape: AttnShape, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Bit tiles of the partial blocks: (bits [P, QBS, WORDS] int32, pid [Bm,Hm,Qb,KVb] int32, WORDS)."""
    K = idx.shape[-1]
    valid = torch.arange(K, device=device) < num[..., None].long()
    pid = torch.cumsum(valid.reshape(-1).to(torch.int64), 0).view(valid.shape) - 1
    pid = torch.where(valid, pid, -1).to(torch.int32)
    nz = valid.nonzero()  # [P, 4] = (b, h, qb, j)
    P = nz.shape[0]
    words = -(-KBS // 32)
    bits = torch.zeros(max(P, 1), QBS, words, dtype=torch.int32, device=device)
    if P == 0:
        return bits, pid, words
    kb = idx[nz[:, 0], nz[:, 1], nz[:, 2], nz[:, 3]].long()
    ar_q = torch.arange(QBS, device=device)
    ar_k = torch.arange(KBS, device=device)
    shifts = torch.arange(32, device=device, dtype=torch.int64)
    chunk = max(1, _GRID_CHUNK_ELEMS // (QBS * KBS))
    for s in range(0, P, chunk):
        e = min(P, s + chunk)
        b = nz[s:e, 0].view(-1, 1, 1)
        h = nz[s:e, 1].view(-1, 1, 1)
        # indices past the sequence are clamped for evaluation (the kernel masks them by bounds)
        qi = (nz[s:e, 2].view(-1, 1, 1) * QBS + ar_q.view(1, -1, 1)).clamp_max(shape.Sq - 1)
        ki = (kb[s:e].view(-1, 1, 1) * KBS + ar_k.view(1, 1, -1)).clamp_max(shape.Skv - 1)
        m = _eval_grid(mask_mod, b, h, qi, ki)
        if words * 32 != KBS:
            m = torch.nn.functional.pad(m, (0, words * 32 - KBS))
        w = (m.view(e - s, QBS, words, 32).to(torch.int64) << shifts).sum(-1)
        w = torch.where(w >= 2**31, w - 2**32, w)
        bits[s:e] = w.to(torch.int32)
    return bits, pid, words


def _doc_tensors(mm: DocumentMaskMod, shape: AttnShape, device: torch.device) -> dict:
    Bd = mm.q_doc.shape[0]
    if Bd not in (1, shape.B):
        raise ValueError(f"DocumentMaskMod has batch {Bd} but q has B={shape.B}")
    if mm.q_doc.shape[1] != shape.Sq:
        raise ValueError(f"DocumentMaskMod.q_doc has {mm.q_doc.shape[1]} tokens but q has Sq={shape.Sq}")
    if mm.kv_doc.shape[1] != shape.Skv:
        raise ValueError(f"DocumentMaskMod.kv_doc has {mm.kv_doc.shape[1]} tokens but k has Skv={shape.Skv}")
    pre = mm.kv_in_prefix
    return {
        # padding (negative ids) -> -1 for queries and -2 for keys: the kernel then tests equality only
        "q_doc": _i32(torch.where(mm.q_doc < 0, -1, mm.q_doc), device),
        "kv_doc": _i32(torch.where(mm.kv_doc < 0, -2, mm.kv_doc), device),
        "q_pos": _i32(mm.q_pos, device),
        "kv_pos": _i32(mm.kv_pos, device),
        "kv_pre": _i32(pre, device) if pre is not None else None,
        "stride_b": 0 if Bd == 1 else shape.Sq,
        "stride_bk": 0 if Bd == 1 else shape.Skv,
        "causal": bool(mm.causal),
        "window": int(mm.window) if mm.window is not None else 0,
    }


def kernel_mask(block_mask, shape: AttnShape, device: torch.device, dense_block: int = 128) -> KernelMask:
    """Kernel metadata for ``block_mask`` (cached per BlockMask object and problem shape)."""
    if block_mask is None:
        return dense_kernel_mask(shape.Sq, shape.Skv, dense_block, device)
    check_block_mask(block_mask, shape)
    key = (shape, str(device))
    try:
        per_bm = _CACHE.setdefault(block_mask, {})
    except TypeError:
        per_bm = {}
    km = per_bm.get(key)
    if km is not None:
        return km
    QBS, KBS = (int(x) for x in block_mask.BLOCK_SIZE)
    kv_num = _i32(block_mask.kv_num_blocks, device)
    kv_idx = _i32(block_mask.kv_indices, device)
    Bm, Hm, Qb = kv_num.shape
    KVb = kv_idx.shape[-1]
    full_num = full_idx = None
    if block_mask.full_kv_num_blocks is not None:
        full_num = _i32(block_mask.full_kv_num_blocks, device)
        full_idx = _i32(block_mask.full_kv_indices, device)
        if full_idx.shape != kv_idx.shape:
            raise ValueError(
                f"block_mask.full_kv_indices {tuple(full_idx.shape)} must match kv_indices {tuple(kv_idx.shape)}"
            )
    # transposed lists, for the dK/dV pass (recomputed from the kv lists: robust to masks built without them)
    p_dense = dense_blocks(kv_num, kv_idx, KVb)
    q_num, q_idx = _lists(p_dense.transpose(-1, -2))
    fq_num = fq_idx = None
    if full_num is not None:
        fq_num, fq_idx = _lists(dense_blocks(full_num, full_idx, KVb).transpose(-1, -2))
        fq_num, fq_idx = _i32(fq_num, device), _i32(fq_idx, device)
    km = KernelMask(
        QBS,
        KBS,
        Bm,
        Hm,
        Qb,
        KVb,
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        _i32(q_num, device),
        _i32(q_idx, device),
        fq_num,
        fq_idx,
    )
    mm = block_mask.mask_mod
    if isinstance(mm, DocumentMaskMod):
        km.mask_kind = MASK_DOC
        km.doc = _doc_tensors(mm, shape, device)
    elif _is_noop(mm):
        km.mask_kind = MASK_NONE
    else:
        km.mask_kind = MASK_BITS
        # evaluate where the BlockMask (and the tensors its mask_mod closes over) lives, then move
        ev = block_mask.kv_num_blocks.device
        bits, pid, words = _build_bits(mm, kv_num.to(ev), kv_idx.to(ev), QBS, KBS, shape, ev)
        km.bits, km.kv_pid, km.words = bits.to(device), pid.to(device), words
        # dense lookup (block-level, same size as kv_indices) -> partial ids along the transposed lists
        lut = torch.full((Bm, Hm, Qb, KVb + 1), -1, dtype=torch.int32, device=device)
        valid = pid >= 0
        lut.scatter_(-1, torch.where(valid, kv_idx.long(), KVb), pid)
        lut = lut[..., :KVb].transpose(-1, -2)  # [Bm, Hm, KVb, Qb]
        km.q_pid = torch.gather(lut, -1, km.q_idx.long()).contiguous()
    _set_orders(km, shape.Sq, shape.Skv)
    per_bm[key] = km
    return km
