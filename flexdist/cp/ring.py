"""Ring exchange of K/V (forward) and K/V + travelling dK/dV (backward) with `dist.batch_isend_irecv`.

Rank r at ring step t holds the K/V shard of rank ``j = (r - t) mod N`` and attends its own queries to it
with the plan's mask ``(r, j)``. Double-buffered: the transfer for step t+1 (send the current shard to r+1,
receive the next from r−1) is posted *before* step t's kernel runs and waited after it. Steps whose mask is
empty skip the kernel; a shard stops travelling after the last rank that needs it (``plan.t_last``), so the
tail of the ring skips communication too (e.g. causal masks on contiguous shards).

Backward: the K/V transfer is posted first as in forward; dK/dV for shard j accumulate (fp32) in a buffer that
travels with it, sent on after each step's kernel (and overlapped with the next step's kernel); after the
last rank that needs shard j, the buffer is sent straight home to rank j. A rank holds its own shard, two K/V
buffers and two dK/dV buffers: O(S/N) memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .merge import _acc_dtype, merge_into


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


def wait_all(works: list) -> None:
    for w in works:
        w.wait()


def pack(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One flat buffer holding a then b (one message per transfer)."""
    dt = dtype or a.dtype
    return torch.cat([a.reshape(-1).to(dt), b.reshape(-1).to(dt)])


def unpack(buf: torch.Tensor, a_shape: torch.Size, b_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    na = a_shape.numel()
    return buf[:na].view(a_shape), buf[na:].view(b_shape)


def ring_forward(q, k, v, plan, masks, fwd: Callable, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's merged output (q.dtype) and global LSE (fp32) over all K/V shards."""
    N, r, t_last = plan.world_size, plan.rank, plan.t_last
    comm = P2P(plan.group, N) if N > 1 else None
    dev = q.device
    q_idx = plan.index_on(dev, r)
    kv_cur = pack(k, v)
    kv_nxt = torch.empty_like(kv_cur) if N > 1 else None
    out_acc = lse_acc = None
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
            o, l = fwd(q, kj, vj, masks[j], q_global_idx=q_idx, kv_global_idx=plan.index_on(dev, j), **kw)
            out_acc, lse_acc = merge_into(out_acc, lse_acc, o, l)
        wait_all(works)
        if N > 1:
            kv_cur, kv_nxt = kv_nxt, kv_cur
    if out_acc is None:  # this rank's queries see nothing at all
        B, H, L, _ = q.shape
        out_acc = torch.zeros(B, H, L, v.shape[-1], dtype=_acc_dtype(q.dtype), device=dev)
        lse_acc = torch.full((B, H, L), float("-inf"), dtype=_acc_dtype(q.dtype), device=dev)
    return out_acc.to(q.dtype), lse_acc


def ring_backward(
    q, k, v, out, dout, lse, delta, plan, masks, bwd: Callable, kw: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's shards; every step's kernel uses the global ``lse`` and ``delta``."""
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
        contrib = None
        if hold and masks[j] is not None:
            kj, vj = unpack(kv_cur, k.shape, v.shape)
            dq_t, dk_t, dv_t = bwd(
                q,
                kj,
                vj,
                out,
                dout,
                lse,
                masks[j],
                delta=delta,
                q_global_idx=q_idx,
                kv_global_idx=plan.index_on(dev, j),
                **kw,
            )
            dq += dq_t
            contrib = pack(dk_t, dv_t, acc)
        wait_all(prev_b)  # travelling dK/dV of this step has arrived; last step's sends are done
        ops_b = []
        if hold:
            buf = dkv_bufs[t % 2]
            if t == 0:
                buf.zero_()
            if contrib is not None:
                buf += contrib
            if t < t_last[j]:
                ops_b.append(("send", buf, (r + 1) % N))
            elif t > 0:
                ops_b.append(("send", buf, j))  # last rank that needed shard j: send its gradient home
            else:
                dkv_home = buf.clone()  # only this rank needs its own shard
        if t + 1 < N:
            jn = (r - 1 - t) % N
            if t + 1 <= t_last[jn]:
                ops_b.append(("recv", dkv_bufs[(t + 1) % 2], (r - 1) % N))
        if t_last[r] > 0 and t == t_last[r]:
            ops_b.append(("recv", dkv_home, (r + t) % N))
        prev_b = comm.post(ops_b) if comm else []
        wait_all(works_a)
        if N > 1:
            kv_cur, kv_nxt = kv_nxt, kv_cur
    wait_all(prev_b)
    dk, dv = unpack(dkv_home, k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
