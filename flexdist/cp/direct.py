"""Direct (zero-redundancy) exchange: at step t rank r receives from rank r−t exactly the K/V blocks its mask
needs, and (backward) sends their dK/dV straight back to the owner.

Each step is one shift-by-t permutation of point-to-point messages (``batch_isend_irecv``), posted before the
previous step's kernel runs (double-buffered), so every K/V block a rank attends to crosses the fabric once:
the mask's minimum volume (on NVSwitch systems any permutation runs at full link bandwidth). Pairs whose mask
is empty exchange nothing and compute nothing. Message sizes come from the plan, identical on both sides.
Memory: the rank's own shard, two compacted visiting K/V buffers, and the dK/dV messages in flight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .merge import _acc_dtype
from .ring import P2P, pack, unpack


def _post_kv(comm, k, v, plan, send_idx, recv_idx, t):
    """Post the K/V exchange of step t; returns (works, recv buffer or None, send buffer or None)."""
    N, r = plan.world_size, plan.rank
    ops, rbuf, sbuf = [], None, None
    if send_idx[t] is not None:
        sbuf = pack(k.index_select(2, send_idx[t]), v.index_select(2, send_idx[t]))
        ops.append(("send", sbuf, (r + t) % N))
    if recv_idx[t] is not None:
        n = recv_idx[t].numel()
        B, H = k.shape[:2]
        rbuf = torch.empty(B * H * n * (k.shape[-1] + v.shape[-1]), dtype=k.dtype, device=k.device)
        ops.append(("recv", rbuf, (r - t) % N))
    return comm.post(ops), rbuf, sbuf


def _shapes(k, v, n):
    B, H = k.shape[:2]
    return torch.Size((B, H, n, k.shape[-1])), torch.Size((B, H, n, v.shape[-1]))


def direct_forward(q, k, v, plan, masks, fwd: Callable, kw: dict):
    N, r = plan.world_size, plan.rank
    dev = q.device
    comm = P2P(plan.group, N) if N > 1 else None
    send_idx, recv_idx = plan.direct_on(dev)
    q_idx = plan.index_on(dev, r)
    B, H, L, _ = q.shape
    acc = _acc_dtype(q.dtype)
    out_acc = torch.zeros(B, H, L, v.shape[-1], dtype=acc, device=dev)  # merged into by every step's kernel
    lse_acc = torch.full((B, H, L), float("-inf"), dtype=acc, device=dev)
    cur = None
    for t in range(N):
        nxt = _post_kv(comm, k, v, plan, send_idx, recv_idx, t + 1) if t + 1 < N else ([], None, None)
        j = (r - t) % N
        if t == 0:
            kj, vj = k, v
        elif cur is not None and cur[1] is not None:
            kj, vj = unpack(cur[1], *_shapes(k, v, recv_idx[t].numel()))
        else:
            kj = vj = None
        if kj is not None and masks[j] is not None:
            fwd(
                q, kj, vj, masks[j], q_global_idx=q_idx, kv_global_idx=plan.kv_index_on(dev, j),
                out_acc=out_acc, lse_acc=lse_acc, **kw,
            )  # fmt: skip
        plan.record_wait(nxt[0], dev)
        cur = nxt
    return out_acc.to(q.dtype), lse_acc


def direct_backward(q, k, v, out, dout, lse, delta, plan, masks, bwd: Callable, kw: dict):
    N, r = plan.world_size, plan.rank
    dev = q.device
    acc = _acc_dtype(q.dtype)
    comm = P2P(plan.group, N) if N > 1 else None
    send_idx, recv_idx = plan.direct_on(dev)
    q_idx = plan.index_on(dev, r)
    dq = torch.zeros(q.shape, dtype=acc, device=dev)
    dk = torch.zeros(k.shape, dtype=acc, device=dev)
    dv = torch.zeros(v.shape, dtype=acc, device=dev)
    pending: list = []  # (works, [(recv buffer, my local token indices)]) of the previous step's dK/dV
    keep: list = []  # send buffers in flight

    def drain():
        nonlocal pending, keep
        for works, recvs in pending:
            plan.record_wait(works, dev)
            for buf, idx in recvs:
                gk, gv = unpack(buf, *_shapes(k, v, idx.numel()))
                dk.index_add_(2, idx, gk)
                dv.index_add_(2, idx, gv)
        pending, keep = [], []

    cur = None
    for t in range(N):
        nxt = _post_kv(comm, k, v, plan, send_idx, recv_idx, t + 1) if t + 1 < N else ([], None, None)
        j = (r - t) % N
        if t == 0:
            if masks[r] is not None:
                bwd(
                    q, k, v, out, dout, lse, masks[r], delta=delta, q_global_idx=q_idx,
                    kv_global_idx=plan.kv_index_on(dev, r), dq_out=dq, dk_out=dk, dv_out=dv, **kw,
                )  # fmt: skip
        else:
            ops, recvs = [], []
            if recv_idx[t] is not None:  # I attended to shard j's blocks: their dK/dV go back to j
                n = recv_idx[t].numel()
                kj, vj = unpack(cur[1], *_shapes(k, v, n))
                if masks[j] is not None:
                    g = torch.zeros(kj.numel() + vj.numel(), dtype=acc, device=dev)
                    gk, gv = unpack(g, kj.shape, vj.shape)
                    bwd(
                        q, kj, vj, out, dout, lse, masks[j], delta=delta, q_global_idx=q_idx,
                        kv_global_idx=plan.kv_index_on(dev, j), dq_out=dq, dk_out=gk, dv_out=gv, **kw,
                    )  # fmt: skip
                else:  # the owner expects a message: nothing visible after all
                    g = torch.zeros(kj.numel() + vj.numel(), dtype=acc, device=dev)
                ops.append(("send", g, j))
                keep.append(g)
            if send_idx[t] is not None:  # rank r+t attended to my blocks send_idx[t]
                n = send_idx[t].numel()
                buf = torch.empty(
                    k.shape[0] * k.shape[1] * n * (k.shape[-1] + v.shape[-1]), dtype=acc, device=dev
                )
                ops.append(("recv", buf, (r + t) % N))
                recvs.append((buf, send_idx[t]))
            drain()  # the previous step's dK/dV (overlapped with this step's kernel)
            works = comm.post(ops) if ops else []
            pending.append((works, recvs))
        plan.record_wait(nxt[0], dev)
        cur = nxt
    drain()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
