"""Ring exchange of K/V (forward) and K/V + travelling dK/dV (backward) with `dist.batch_isend_irecv`.

Rank r at ring step t holds the K/V shard of rank ``j = (r - t) mod N`` and attends its own queries to it
with the plan's mask ``(r, j)``. The transfer for step t+1 (send the shard held at step t to r+1, receive the
next from r−1) is posted *before* step t's kernels run and waited after them. Steps whose mask is empty skip
the kernel; a shard stops travelling after the last rank that needs it (``plan.t_last``), so the tail of the
ring skips communication too (e.g. causal masks on contiguous shards).

Forward: the kernel merges into one fp32 (out, lse) accumulator in its epilogue, touching only the query
tiles that have work (no separate merge pass over the whole accumulator).

Backward: dK/dV for shard j accumulate (fp32) in a buffer that travels with it: each step runs the dQ kernel
while that buffer is still arriving, then the dK/dV kernel adds into it in place, and it is sent on
(overlapped with the next step's kernels); after the last rank that needs shard j, the buffer is sent
straight home to rank j. Exposed waits are timed with ``plan.timing``.

``plan.ring_group = g``: the forward and dQ kernels run once per group of g steps, over the concatenated keys
of the group's shards with work (fewer, larger calls; K/V still hop and dK/dV still travel per step). Shard
slots: ``g + 1`` (step t's shard in slot ``t mod (g+1)``, overwritten only by the receive for step t + g + 1,
posted after the group holding step t was computed); g = 1 is the plain double-buffered ring. A rank holds
its own shard, ``g + 1`` K/V slots (plus a concatenated copy when g > 1) and two dK/dV buffers: O(g·S/N).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .merge import _acc_dtype


class P2P:
    """Posts batches of point-to-point ops to group ranks (translated to global ranks)."""

    def __init__(self, group, world_size: int):
        self.group = group
        self.world_size = world_size
        self._global = [dist.get_global_rank(group, r) for r in range(world_size)] if world_size > 1 else [0]

    def post(self, ops: list[tuple[str, torch.Tensor, int]]) -> list:
        if not ops:
            return []
        p2p = [
            dist.P2POp(
                dist.isend if kind == "send" else dist.irecv, t, peer=self._global[peer], group=self.group
            )
            for kind, t, peer in ops
        ]
        return dist.batch_isend_irecv(p2p)


def pack(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One flat buffer holding a then b (one message per transfer)."""
    dt = dtype or a.dtype
    return torch.cat([a.reshape(-1).to(dt), b.reshape(-1).to(dt)])


def unpack(buf: torch.Tensor, a_shape: torch.Size, b_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    na = a_shape.numel()
    return buf[:na].view(a_shape), buf[na:].view(b_shape)


def _groups(plan, masks, dev: torch.device) -> list[tuple]:
    """Per group of ``plan.ring_group`` steps: (mask over the keys of its steps with work, those steps, their
    global key indices); for g = 1 simply each step's own mask (``None`` where the step has no work)."""
    if plan.ring_group > 1:
        return plan.group_masks_on(dev)
    r, N = plan.rank, plan.world_size
    return [
        (masks[(r - t) % N], [t], plan.index_on(dev, (r - t) % N))
        if masks[(r - t) % N] is not None
        else (None, [], None)
        for t in range(N)
    ]


def _hop_ops(plan, t: int, slots: list) -> list:
    """Step t's transfers: forward the shard held at step t to r+1, receive step t+1's from r−1."""
    N, r, t_last = plan.world_size, plan.rank, plan.t_last
    ops = []
    if t + 1 < N:
        if t + 1 <= t_last[(r - t) % N]:
            ops.append(("send", slots[t % len(slots)], (r + 1) % N))
        if t + 1 <= t_last[(r - 1 - t) % N]:
            ops.append(("recv", slots[(t + 1) % len(slots)], (r - 1) % N))
    return ops


def _kv_slots(k: torch.Tensor, v: torch.Tensor, plan) -> list[torch.Tensor]:
    """Slot 0 holds this rank's own shard (packed K|V), the others receive visiting shards."""
    own = pack(k, v)
    n = min(plan.ring_group + 1, plan.world_size)
    return [own] + [torch.empty_like(own) for _ in range(n - 1)]


def _group_kv(slots: list, steps: list[int], k: torch.Tensor, v: torch.Tensor):
    """K and V of a group's steps along the sequence: views of the slot for one step, a copy for several."""
    parts = [unpack(slots[t % len(slots)], k.shape, v.shape) for t in steps]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


def _group_done(plan, t: int) -> bool:
    g = plan.ring_group
    return t % g == g - 1 or t == plan.world_size - 1


def ring_forward(q, k, v, plan, masks, fwd: Callable, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's merged output (q.dtype) and global LSE (fp32) over all K/V shards."""
    N = plan.world_size
    comm = P2P(plan.group, N) if N > 1 else None
    dev = q.device
    acc = _acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    out_acc = torch.zeros(B, H, L, v.shape[-1], dtype=acc, device=dev)
    lse_acc = torch.full((B, H, L), float("-inf"), dtype=acc, device=dev)
    q_idx = plan.index_on(dev, plan.rank)
    slots = _kv_slots(k, v, plan)
    groups = _groups(plan, masks, dev)
    for t in range(N):
        works = comm.post(_hop_ops(plan, t, slots)) if comm else []
        if _group_done(plan, t):
            mask, steps, kv_idx = groups[t // plan.ring_group]
            if mask is not None:
                kj, vj = _group_kv(slots, steps, k, v)
                fwd(
                    q, kj, vj, mask, q_global_idx=q_idx, kv_global_idx=kv_idx,
                    out_acc=out_acc, lse_acc=lse_acc, **kw,
                )  # fmt: skip
        plan.record_wait(works, dev)
    return out_acc.to(q.dtype), lse_acc


def ring_backward(
    q, k, v, out, dout, lse, delta, plan, masks, bwd: Callable, kw: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's shards; every kernel uses the global ``lse`` and ``delta``."""
    N, r, t_last = plan.world_size, plan.rank, plan.t_last
    comm = P2P(plan.group, N) if N > 1 else None
    dev = q.device
    acc = _acc_dtype(q.dtype)
    q_idx = plan.index_on(dev, r)
    slots = _kv_slots(k, v, plan)
    groups = _groups(plan, masks, dev)
    n_kv = slots[0].numel()
    dkv_bufs = [
        torch.zeros(n_kv, dtype=acc, device=dev),
        torch.empty(n_kv, dtype=acc, device=dev) if N > 1 else None,
    ]
    # a shard's gradient comes home complete (every rank's share added on the way), so it travels its last hop
    # in the output dtype: the home rank would round it to that dtype anyway (same numbers, half the bytes
    # of the one transfer nothing is left to overlap with)
    dkv_home = torch.empty(n_kv, dtype=k.dtype, device=dev) if t_last[r] > 0 else None
    keep: list = []  # converted send buffers: alive until their sends are waited (the end of this call)
    dq = torch.zeros(q.shape, dtype=acc, device=dev)
    prev_b: list = []
    for t in range(N):
        j = (r - t) % N
        works_a = comm.post(_hop_ops(plan, t, slots)) if comm else []
        if _group_done(plan, t):
            mask, steps, kv_idx = groups[t // plan.ring_group]
            if mask is not None:
                kj, vj = _group_kv(slots, steps, k, v)
                bwd(
                    q, kj, vj, out, dout, lse, mask, delta=delta, q_global_idx=q_idx, kv_global_idx=kv_idx,
                    dq_out=dq, which="dq", **kw,
                )  # fmt: skip
        plan.record_wait(prev_b, dev)  # the travelling dK/dV of shard j has arrived; last sends are done
        ops_b = []
        if t <= t_last[j]:  # this rank holds shard j at step t
            buf = dkv_bufs[t % 2]
            if masks[j] is not None:
                kj, vj = unpack(slots[t % len(slots)], k.shape, v.shape)
                dkb, dvb = unpack(buf, k.shape, v.shape)
                bwd(
                    q, kj, vj, out, dout, lse, masks[j], delta=delta, q_global_idx=q_idx,
                    kv_global_idx=plan.index_on(dev, j), dk_out=dkb, dv_out=dvb, which="dkdv", **kw,
                )  # fmt: skip
            if t < t_last[j]:
                ops_b.append(("send", buf, (r + 1) % N))
            elif t > 0:  # last rank that needed shard j: send its (complete) gradient home
                keep.append(buf.to(k.dtype))
                ops_b.append(("send", keep[-1], j))
            else:
                dkv_home = buf.clone()  # only this rank needs its own shard (buf is reused by recvs)
        if t + 1 < N and t + 1 <= t_last[(r - 1 - t) % N]:
            ops_b.append(("recv", dkv_bufs[(t + 1) % 2], (r - 1) % N))
        if t_last[r] > 0 and t == t_last[r]:
            ops_b.append(("recv", dkv_home, (r + t) % N))
        prev_b = comm.post(ops_b) if comm else []
        plan.record_wait(works_a, dev)
    plan.record_wait(prev_b, dev)
    dk, dv = unpack(dkv_home, k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
