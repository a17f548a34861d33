"""All-gather of K/V and one kernel call per chunk of heads, pipelined over ``plan.head_chunks`` chunks.

``head_chunks=1`` is what torch's CP does for FlexAttention: gather all K/V, one call, reduce-scatter dK/dV,
nothing overlapped. With c > 1 chunks of key/value heads (and their GQA query heads):

- forward: chunk i+1's all-gather runs while chunk i's kernel does; only the first gather is exposed, and
  with ``local_first`` not even that: chunk 0's heads first attend to the rank's own keys during it;
- backward: K/V are gathered again the same way (over ``plan.bwd_head_chunks``, by default the forward's
  chunks); chunk i's dK/dV kernel writes fp32 gradients straight into
  the reduce-scatter buffer, whose reduce-scatter then runs while chunk i's dQ kernel and the later chunks
  do; only the first gather and what is left of the last reduce-scatter are exposed.

Every call sees all keys of its heads, so no partial results are merged (unlike the ring: each query tile
loads Q and writes its output once). Memory: a rank holds the whole sequence's K/V for at most two chunks at a
time (all of it for ``head_chunks=1``), and in backward the fp32 dK/dV reduce-scatter buffers of the chunks
until the end: O(S·Hkv), never O(S²). (At 32k tokens per GPU on 2 GPUs the measured peak was 2.08 GiB per
rank with two chunks, 2.39 with one, 3.02 for the ring: ``bench/results/2026-11-26-s7/call2``.)

Layout: each rank packs its chunk token-major, ``[B, L, hc, D + Dv]`` (one Triton copy, kv_pack.py), so
for B = 1 the gathered buffer ``[N, L, hc, D + Dv]`` is the whole sequence in plan order and K and V are strided views ``[1, hc, S, D]`` of
it: no reorder, no copy (the rank's mask is built against keys in plan order, ``kv_global_idx = plan.perm``).
The dK/dV kernel writes the same layout in fp32, which is the reduce-scatter's rank-major input. For B > 1
one copy moves the batch in front of the ranks (and back for dK/dV).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .head_slice import slice_score_mod
from .kv_pack import pack, unpack
from .merge import _acc_dtype
from .plan import chunk_sizes


def _chunks(plan, k: torch.Tensor, backward: bool = False) -> list[tuple[int, int]]:
    """(first, last + 1) K/V head of every chunk of the forward's (or the backward's) pipeline."""
    spec, name = (plan.bwd_head_chunks, "bwd_head_chunks") if backward else (plan.head_chunks, "head_chunks")
    bounds, h = [], 0
    for c in chunk_sizes(spec, k.shape[1], name):
        bounds.append((h, h + c))
        h += c
    return bounds


def _start_gather(local: torch.Tensor, plan) -> tuple[torch.Tensor, list]:
    """Post the all-gather of one chunk: ``([N, B, L, hc, E] buffer, [work])`` (nothing to wait for if N = 1)."""
    N = plan.world_size
    if N == 1:
        return local.unsqueeze(0), []
    out = local.new_empty((N, *local.shape))
    # flat 1-D buffers: the shape every backend accepts (gloo checks the leading dim against N)
    work = dist.all_gather_into_tensor(out.view(-1), local.view(-1), group=plan.group, async_op=True)
    return out, [work]


def _pack_all(k: torch.Tensor, v: torch.Tensor, chunks: list, plan) -> tuple[tuple, list[torch.Tensor]]:
    """Chunk 0 packed and its gather posted (the one exposed transfer starts as early as it can), then the
    other chunks packed while it runs: ``((buffer, works) of chunk 0, [local pack of chunks 1, 2, ...])``."""
    first = _start_gather(pack(k, v, *chunks[0]), plan)
    return first, [pack(k, v, h0, h1) for h0, h1 in chunks[1:]]


def _seq_view(buf: torch.Tensor) -> torch.Tensor:
    """``[N, B, L, hc, E]`` rank-major buffer → ``[B, hc, N·L, E]``: a view for B = 1, else a copy."""
    N, B, L, hc, E = buf.shape
    if B == 1:
        return buf.view(N * L, hc, E).permute(1, 0, 2).unsqueeze(0)
    return buf.permute(1, 3, 0, 2, 4).reshape(B, hc, N * L, E)


def _chunk_kw(kw: dict, q0: int, q1: int, whole: bool) -> dict:
    """Kernel keywords for query heads q0:q1: the score mod (and its gradients) of those heads only."""
    if whole:
        return kw
    grads = kw.get("score_mod_grads")
    out = dict(
        kw, score_mod=slice_score_mod(kw.get("score_mod"), q0, q1, "allgather", leaf=grads is not None)
    )
    if grads is not None:  # views: each chunk adds its heads' rows
        out["score_mod_grads"] = [g[q0:q1] for g in grads]
    return out


def allgather_forward(q, k, v, plan, full_mask, fwd: Callable, kw: dict):
    """This rank's output (q.dtype) and LSE (fp32) against every key, chunk by chunk of heads.

    With ``plan.local_first`` the first chunk's heads first attend to the rank's own K/V (in the shard it
    already holds) while that chunk's gather runs, into an fp32 running result; the chunk's call over the
    gathered keys then covers the other ranks' keys only (``plan.remote_mask``), merges by LSE in the
    kernel's epilogue and writes the output. Only the first chunk is split: it is the one whose gather
    nothing else hides, and a split costs one more call and an fp32 round trip of that chunk's output.
    """
    dev = q.device
    B, Hq, L, _ = q.shape
    D, g = k.shape[-1], Hq // k.shape[1]
    chunks = _chunks(plan, k)
    whole = len(chunks) == 1
    q_idx, kv_idx = plan.index_on(dev, plan.rank), plan.perm_on(dev)
    out = torch.empty(B, Hq, L, v.shape[-1], dtype=q.dtype, device=dev)
    lses = []
    pending, rest = _pack_all(k, v, chunks, plan)
    if plan.local_first:
        h1 = chunks[0][1]
        n0 = h1 * g
        own = plan.masks_on(dev)[0][plan.rank]
        o_acc = torch.empty(B, n0, L, v.shape[-1], dtype=_acc_dtype(q.dtype), device=dev)
        if own is not None:  # (chunk 0's gather is in flight)
            _, l_acc = fwd(
                q[:, :n0], k[:, :h1], v[:, :h1], own, q_global_idx=q_idx, kv_global_idx=q_idx, out=o_acc,
                head_group=n0, **_chunk_kw(kw, 0, n0, whole),
            )  # fmt: skip
        else:  # no row of this shard sees any of its own keys
            o_acc.zero_()
            l_acc = torch.full((B, n0, L), float("-inf"), dtype=o_acc.dtype, device=dev)
    for i, (h0, h1) in enumerate(chunks):
        buf, works = pending
        plan.record_wait(works, dev)
        if i + 1 < len(chunks):  # posted before this chunk's kernel: the transfer overlaps it
            pending = _start_gather(rest[i], plan)
        kv = _seq_view(buf)
        q0, q1 = h0 * g, h1 * g
        ckw = dict(_chunk_kw(kw, q0, q1, whole), q_global_idx=q_idx, kv_global_idx=kv_idx, head_group=q1 - q0)
        # (head_group: all the call's heads in one launch group. A rank's call has 1/N of the query tiles but
        # rows as long as on one GPU, so with the kernels' L2-sized groups the last group's longest rows
        # start in the last waves; bench_cp_sim at N = 8: forward 3% faster. The backward keeps the rule.)
        if i == 0 and plan.local_first:
            remote = plan.remote_mask_on(dev)
            if remote is None:  # nothing visible outside the own shard
                out[:, q0:q1] = o_acc
            else:
                fwd(q[:, q0:q1], kv[..., :D], kv[..., D:], remote, out=out[:, q0:q1], out_acc=o_acc,
                    lse_acc=l_acc, **ckw)  # fmt: skip
            lses.append(l_acc)
            continue
        _, lse = fwd(q[:, q0:q1], kv[..., :D], kv[..., D:], full_mask, out=out[:, q0:q1], **ckw)
        lses.append(lse)
    return out, torch.cat(lses, dim=1) if len(lses) > 1 else lses[0]


def allgather_backward(q, k, v, out, dout, lse, delta, plan, full_mask, bwd: Callable, kw: dict):
    """dq, dk, dv of this rank's shards; dK/dV are summed over ranks in fp32 by reduce-scatters."""
    dev = q.device
    N = plan.world_size
    B, Hq, L, _ = q.shape
    D, Dv, g = k.shape[-1], v.shape[-1], Hq // k.shape[1]
    acc = _acc_dtype(q.dtype)
    chunks = _chunks(plan, k, backward=True)
    q_idx, kv_idx = plan.index_on(dev, plan.rank), plan.perm_on(dev)
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    pending, rest = _pack_all(k, v, chunks, plan)
    scattered = []  # (first head, this rank's summed dK|dV, the reduce-scatter's work, its input kept alive)
    for i, (h0, h1) in enumerate(chunks):
        buf, works = pending
        plan.record_wait(works, dev)
        if i + 1 < len(chunks):
            pending = _start_gather(rest[i], plan)
        kv = _seq_view(buf)
        q0, q1 = h0 * g, h1 * g
        args = (
            q[:, q0:q1],
            kv[..., :D],
            kv[..., D:],
            out[:, q0:q1],
            dout[:, q0:q1],
            lse[:, q0:q1],
            full_mask,
        )
        ckw = dict(
            _chunk_kw(kw, q0, q1, len(chunks) == 1),
            delta=delta[:, q0:q1], q_global_idx=q_idx, kv_global_idx=kv_idx, accumulate=False,
        )  # fmt: skip
        # dK/dV first, in fp32 into the reduce-scatter's buffer (rank-major, as the gather delivered K/V)
        hc = h1 - h0
        grad = torch.empty(N, B, L, hc, D + Dv, dtype=acc, device=dev)
        gseq = _seq_view(grad) if B == 1 else torch.empty(B, hc, N * L, D + Dv, dtype=acc, device=dev)
        bwd(*args, dk_out=gseq[..., :D], dv_out=gseq[..., D:], which="dkdv", **ckw)
        if B > 1:
            grad.copy_(gseq.view(B, hc, N, L, D + Dv).permute(2, 0, 3, 1, 4))
        mine = grad.new_empty(grad.shape[1:])
        if N > 1:  # runs while this chunk's dQ kernel (and the next chunks) do
            work = dist.reduce_scatter_tensor(mine.view(-1), grad.view(-1), group=plan.group, async_op=True)
            scattered.append((h0, mine, [work], grad))
        else:
            scattered.append((h0, grad[0], [], None))
        bwd(*args, dq_out=dq[:, q0:q1], which="dq", **ckw)
    for h0, mine, works, _ in scattered:
        plan.record_wait(works, dev)
        unpack(mine, dk, dv, h0)
    return dq, dk, dv
