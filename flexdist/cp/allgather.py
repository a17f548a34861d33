"""All-gather baseline (what torch's CP does for FlexAttention): gather K/V, one kernel call, reduce-scatter dK/dV.

Every rank holds the whole sequence's K/V (O(S) memory) during the call; communication is not overlapped.
K/V are gathered at Hkv heads, reordered to global token order, and attended with the rank's full mask
(its query shard against all S keys). Backward re-gathers K/V (nothing of size S is kept between forward
and backward) and reduce-scatters fp32 dK/dV back to the owning ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .merge import _acc_dtype
from .ring import pack


def _gather_kv(k: torch.Tensor, v: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor]:
    N = plan.world_size
    B, Hkv, L, D = k.shape
    Dv = v.shape[-1]
    kv = pack(k, v)
    if N > 1:
        gathered = torch.empty(N * kv.numel(), dtype=kv.dtype, device=kv.device)
        dist.all_gather_into_tensor(gathered, kv, group=plan.group)
    else:
        gathered = kv
    parts = gathered.view(N, -1)
    nk = k.numel()
    inv = plan.inv_perm.to(k.device)
    k_all = parts[:, :nk].reshape(N, B, Hkv, L, D).permute(1, 2, 0, 3, 4).reshape(B, Hkv, N * L, D)
    v_all = parts[:, nk:].reshape(N, B, Hkv, L, Dv).permute(1, 2, 0, 3, 4).reshape(B, Hkv, N * L, Dv)
    return k_all.index_select(2, inv), v_all.index_select(2, inv)


def allgather_forward(q, k, v, plan, full_mask, fwd: Callable, kw: dict):
    k_g, v_g = _gather_kv(k, v, plan)
    q_idx = plan.index_on(q.device, plan.rank)
    out, lse = fwd(q, k_g, v_g, full_mask, q_global_idx=q_idx, kv_global_idx=None, **kw)
    return out.to(q.dtype), lse


def allgather_backward(q, k, v, out, dout, lse, delta, plan, full_mask, bwd: Callable, kw: dict):
    N = plan.world_size
    k_g, v_g = _gather_kv(k, v, plan)
    q_idx = plan.index_on(q.device, plan.rank)
    dq, dk_g, dv_g = bwd(
        q, k_g, v_g, out, dout, lse, full_mask, delta=delta, q_global_idx=q_idx, kv_global_idx=None, **kw
    )
    acc = _acc_dtype(q.dtype)
    B, Hkv, L, D = k.shape
    Dv = v.shape[-1]
    perm = plan.perm.to(q.device)
    dk_p = dk_g.index_select(2, perm).to(acc).reshape(B, Hkv, N, L, D).permute(2, 0, 1, 3, 4).reshape(N, -1)
    dv_p = dv_g.index_select(2, perm).to(acc).reshape(B, Hkv, N, L, Dv).permute(2, 0, 1, 3, 4).reshape(N, -1)
    send = torch.cat([dk_p, dv_p], dim=1).contiguous()
    if N > 1:
        mine = torch.empty(send.shape[1], dtype=acc, device=q.device)
        dist.reduce_scatter_tensor(mine, send.view(-1), group=plan.group)
    else:
        mine = send.view(-1)
    nk = k.numel()
    return dq, mine[:nk].view(k.shape).to(k.dtype), mine[nk:].view(v.shape).to(v.dtype)
