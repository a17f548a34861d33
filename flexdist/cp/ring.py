"""Ring exchange of K/V (forward) and K/V + travelling dK/dV (backward) with `dist.batch_isend_irecv`.

Rank r at ring step t holds the K/V shard of rank ``j = (r - t) mod N`` and attends its own queries to it
with the plan's mask ``(r, j)``. Double-buffered: the transfer for step t+1 (send the current shard to r+1,
receive the next from r−1) is posted *before* step t's kernel runs and waited after it. Steps whose mask is
empty skip the kernel; a shard stops travelling after the last rank that needs it (``plan.t_last``), so the
tail of the ring skips communication too (e.g. causal masks on contiguous shards).

Forward: each step's kernel merges into one fp32 (out, lse) accumulator in its epilogue, touching only the
query tiles the step has work for (no separate merge pass over the whole accumulator per step).

Backward: the K/V transfer is posted first as in forward; dK/dV for shard j accumulate (fp32) in a buffer that
travels with it: each step runs the dQ kernel while that buffer is still arriving, then the dK/dV kernel adds
into it in place, and it is sent on (overlapped with the next step's kernels); after the last rank that needs
shard j, the buffer is sent straight home to rank j. Exposed waits are timed with ``plan.timing``. A rank holds its own shard, two K/V
buffers and two dK/dV buffers: O(S/N) memory.
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


def ring_forward(q, k, v, plan, masks, fwd: Callable, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's merged output (q.dtype) and global LSE (fp32) over all K/V shards.

    Every step's kernel merges its result into one fp32 accumulator in its epilogue (``out_acc=``), touching
    only the query tiles that see a key of the visiting shard; rows that see nothing keep 0 / −inf.
    """
    if plan.ring_group > 1:
        return ring_forward_grouped(q, k, v, plan, fwd, kw)
    N, r, t_last = plan.world_size, plan.rank, plan.t_last
    comm = P2P(plan.group, N) if N > 1 else None
    dev = q.device
    acc = _acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    out_acc = torch.zeros(B, H, L, v.shape[-1], dtype=acc, device=dev)
    lse_acc = torch.full((B, H, L), float("-inf"), dtype=acc, device=dev)
    q_idx = plan.index_on(dev, r)
    kv_cur = pack(k, v)
    kv_nxt = torch.empty_like(kv_cur) if N > 1 else None
    for t in range(N):
        j = (r - t) % N
        ops = []
        if t + 1 < N:
            if t + 1 <= t_last[j]:
                ops.append(("send", kv_cur, (r + 1) % N))
            jn = (r - 1 - t) % N
            if t + 1 <= t_last[jn]:
                ops.append(("recv", kv_nxt, (r - 1) % N))
        works = comm.post(ops) if comm else []
        if t <= t_last[j] and masks[j] is not None:
            kj, vj = unpack(kv_cur, k.shape, v.shape)
            fwd(
                q, kj, vj, masks[j], q_global_idx=q_idx, kv_global_idx=plan.index_on(dev, j),
                out_acc=out_acc, lse_acc=lse_acc, **kw,
            )  # fmt: skip
        plan.record_wait(works, dev)
        if N > 1:
            kv_cur, kv_nxt = kv_nxt, kv_cur
    return out_acc.to(q.dtype), lse_acc


def ring_backward(
    q, k, v, out, dout, lse, delta, plan, masks, bwd: Callable, kw: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's shards; every step's kernel uses the global ``lse`` and ``delta``.

    Per step: the dQ kernel runs first (adding into this rank's fp32 dq) while the travelling dK/dV buffer of
    the visiting shard is still arriving; then the dK/dV kernel adds straight into that buffer, which is sent
    on. Tiles with no work this step are not touched, so sparse steps cost only their work.
    """
    if plan.ring_group > 1:
        return ring_backward_grouped(q, k, v, out, dout, lse, delta, plan, masks, bwd, kw)
    N, r, t_last = plan.world_size, plan.rank, plan.t_last
    comm = P2P(plan.group, N) if N > 1 else None
    dev = q.device
    acc = _acc_dtype(q.dtype)
    q_idx = plan.index_on(dev, r)
    kv_cur = pack(k, v)
    kv_nxt = torch.empty_like(kv_cur) if N > 1 else None
    n_kv = kv_cur.numel()
    dkv_bufs = [
        torch.zeros(n_kv, dtype=acc, device=dev),
        torch.empty(n_kv, dtype=acc, device=dev) if N > 1 else None,
    ]
    dkv_home = torch.empty(n_kv, dtype=acc, device=dev) if t_last[r] > 0 else None
    dq = torch.zeros(q.shape, dtype=acc, device=dev)
    prev_b: list = []
    for t in range(N):
        j = (r - t) % N
        ops = []
        if t + 1 < N:
            if t + 1 <= t_last[j]:
                ops.append(("send", kv_cur, (r + 1) % N))
            jn = (r - 1 - t) % N
            if t + 1 <= t_last[jn]:
                ops.append(("recv", kv_nxt, (r - 1) % N))
        works_a = comm.post(ops) if comm else []
        hold = t <= t_last[j]
        run = hold and masks[j] is not None
        kj, vj = unpack(kv_cur, k.shape, v.shape)
        step_kw = dict(delta=delta, q_global_idx=q_idx, kv_global_idx=plan.index_on(dev, j), **kw)
        if run:
            bwd(q, kj, vj, out, dout, lse, masks[j], dq_out=dq, which="dq", **step_kw)
        plan.record_wait(prev_b, dev)  # the travelling dK/dV of shard j has arrived; last sends are done
        ops_b = []
        if hold:
            buf = dkv_bufs[t % 2]
            if run:
                dkb, dvb = unpack(buf, k.shape, v.shape)
                bwd(q, kj, vj, out, dout, lse, masks[j], dk_out=dkb, dv_out=dvb, which="dkdv", **step_kw)
            if t < t_last[j]:
                ops_b.append(("send", buf, (r + 1) % N))
            elif t > 0:
                ops_b.append(("send", buf, j))  # last rank that needed shard j: send its gradient home
            else:
                dkv_home = buf.clone()  # only this rank needs its own shard (buf is reused by recvs)
        if t + 1 < N:
            jn = (r - 1 - t) % N
            if t + 1 <= t_last[jn]:
                ops_b.append(("recv", dkv_bufs[(t + 1) % 2], (r - 1) % N))
        if t_last[r] > 0 and t == t_last[r]:
            ops_b.append(("recv", dkv_home, (r + t) % N))
        prev_b = comm.post(ops_b) if comm else []
        plan.record_wait(works_a, dev)
        if N > 1:
            kv_cur, kv_nxt = kv_nxt, kv_cur
    plan.record_wait(prev_b, dev)
    dk, dv = unpack(dkv_home, k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# grouped ring: K/V hop one step at a time as above, but the forward and dQ kernels run once per group of
# `plan.ring_group` steps over the concatenated keys of the group's shards (fewer, larger calls)
# ----------------------------------------------------------------------------------------------------------
def _hop_ops(plan, t: int, bufs: list, n_slots: int) -> list:
    """Step t's transfers: forward the shard held at step t to r+1, receive step t+1's from r−1."""
    N, r, t_last = plan.world_size, plan.rank, plan.t_last
    ops = []
    if t + 1 < N:
        j = (r - t) % N
        if t + 1 <= t_last[j]:
            ops.append(("send", bufs[t % n_slots], (r + 1) % N))
        jn = (r - 1 - t) % N
        if t + 1 <= t_last[jn]:
            ops.append(("recv", bufs[(t + 1) % n_slots], (r - 1) % N))
    return ops


def _group_kv(bufs: list, n_slots: int, steps: list[int], k: torch.Tensor, v: torch.Tensor):
    """K and V of a group's steps concatenated along the sequence (a copy: shards arrive in separate buffers)."""
    parts = [unpack(bufs[t % n_slots], k.shape, v.shape) for t in steps]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


def _group_kv_index(plan, dev: torch.device, steps: list[int]) -> torch.Tensor:
    r, N = plan.rank, plan.world_size
    return torch.cat([plan.index_on(dev, (r - t) % N) for t in steps])


def ring_forward_grouped(q, k, v, plan, fwd: Callable, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`ring_forward` with one kernel call per group of ``plan.ring_group`` steps.

    Shard buffers: ``g + 1`` slots, step t's shard in slot ``t mod (g+1)``; a slot is overwritten only by the
    receive of step t + g + 1, posted after the group holding step t has been computed (stream order on CUDA).
    """
    N, g = plan.world_size, plan.ring_group
    comm = P2P(plan.group, N) if N > 1 else None
    dev = q.device
    acc = _acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    out_acc = torch.zeros(B, H, L, v.shape[-1], dtype=acc, device=dev)
    lse_acc = torch.full((B, H, L), float("-inf"), dtype=acc, device=dev)
    q_idx = plan.index_on(dev, plan.rank)
    n_slots = min(g + 1, N)
    own = pack(k, v)
    bufs = [own] + [torch.empty_like(own) for _ in range(n_slots - 1)]
    groups = plan.group_masks_on(dev)
    for t in range(N):
        works = comm.post(_hop_ops(plan, t, bufs, n_slots)) if comm else []
        if t % g == g - 1 or t == N - 1:
            mask, steps = groups[t // g]
            if mask is not None:
                kj, vj = _group_kv(bufs, n_slots, steps, k, v)
                fwd(
                    q, kj, vj, mask, q_global_idx=q_idx, kv_global_idx=_group_kv_index(plan, dev, steps),
                    out_acc=out_acc, lse_acc=lse_acc, **kw,
                )  # fmt: skip
        plan.record_wait(works, dev)
    return out_acc.to(q.dtype), lse_acc


def ring_backward_grouped(
    q, k, v, out, dout, lse, delta, plan, masks, bwd: Callable, kw: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ring_backward` with the dQ kernel once per group of steps; dK/dV still per step into the travelling
    buffer (its accumulator has only the K/V heads, so its per-step cost is small)."""
    N, r, g, t_last = plan.world_size, plan.rank, plan.ring_group, plan.t_last
    comm = P2P(plan.group, N) if N > 1 else None
    dev = q.device
    acc = _acc_dtype(q.dtype)
    q_idx = plan.index_on(dev, r)
    n_slots = min(g + 1, N)
    own = pack(k, v)
    bufs = [own] + [torch.empty_like(own) for _ in range(n_slots - 1)]
    n_kv = own.numel()
    dkv_bufs = [
        torch.zeros(n_kv, dtype=acc, device=dev),
        torch.empty(n_kv, dtype=acc, device=dev) if N > 1 else None,
    ]
    dkv_home = torch.empty(n_kv, dtype=acc, device=dev) if t_last[r] > 0 else None
    dq = torch.zeros(q.shape, dtype=acc, device=dev)
    groups = plan.group_masks_on(dev)
    prev_b: list = []
    for t in range(N):
        j = (r - t) % N
        works_a = comm.post(_hop_ops(plan, t, bufs, n_slots)) if comm else []
        hold = t <= t_last[j]
        if t % g == g - 1 or t == N - 1:
            mask, steps = groups[t // g]
            if mask is not None:
                kj, vj = _group_kv(bufs, n_slots, steps, k, v)
                bwd(
                    q, kj, vj, out, dout, lse, mask, delta=delta, q_global_idx=q_idx,
                    kv_global_idx=_group_kv_index(plan, dev, steps), dq_out=dq, which="dq", **kw,
                )  # fmt: skip
        plan.record_wait(prev_b, dev)  # the travelling dK/dV of shard j has arrived; last sends are done
        ops_b = []
        if hold:
            buf = dkv_bufs[t % 2]
            if masks[j] is not None:
                kj, vj = unpack(bufs[t % n_slots], k.shape, v.shape)
                dkb, dvb = unpack(buf, k.shape, v.shape)
                bwd(
                    q, kj, vj, out, dout, lse, masks[j], delta=delta, q_global_idx=q_idx,
                    kv_global_idx=plan.index_on(dev, j), dk_out=dkb, dv_out=dvb, which="dkdv", **kw,
                )  # fmt: skip
            if t < t_last[j]:
                ops_b.append(("send", buf, (r + 1) % N))
            elif t > 0:
                ops_b.append(("send", buf, j))  # last rank that needed shard j: send its gradient home
            else:
                dkv_home = buf.clone()  # only this rank needs its own shard (buf is reused by recvs)
        if t + 1 < N:
            jn = (r - 1 - t) % N
            if t + 1 <= t_last[jn]:
                ops_b.append(("recv", dkv_bufs[(t + 1) % 2], (r - 1) % N))
        if t_last[r] > 0 and t == t_last[r]:
            ops_b.append(("recv", dkv_home, (r + t) % N))
        prev_b = comm.post(ops_b) if comm else []
        plan.record_wait(works_a, dev)
    plan.record_wait(prev_b, dev)
    dk, dv = unpack(dkv_home, k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
