"""Context-parallel attention equals single-device attention: gloo worlds of 1–4 ranks, every balance/strategy.

Each world size is ONE spawned process group that runs many cases (document-causal, causal, sliding window,
bidirectional documents, GQA, position-dependent and learnable score mods, padding rows, documents longer
than a shard) in fp64 against the dense reference on the full sequence — output, LSE, dq, dk, dv — plus the
bad-input checks. The workers are joined with a timeout so a hang fails.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from spawn import init_group, run_ranks
from torch.nn.attention.flex_attention import create_block_mask

import flexdist.cp as cp
from flexdist.cp import balance as bal
from flexdist.cp.merge import merge_all
from flexdist.kernels import (
    ALiBi,
    DocumentMaskMod,
    RelativeBias,
    flex_attention_forward,
    flex_attention_reference,
    reference_forward,
)

BS = 8  # BlockMask block for the CPU cases (reference kernel); S is a multiple of N*BS and 2N
S_TEST = 96


# ----------------------------------------------------------------------------------------------------------
# helpers shared with test_cp_nccl.py
# ----------------------------------------------------------------------------------------------------------
def make_doc_ids(kind: str, B: int, S: int, seed: int) -> torch.Tensor:
    """Random packs: 'doc' (short and long documents, padding rows), 'long' (one doc longer than a shard),
    'causal' (one document), 'pad' (a large padding region)."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(B, S, dtype=torch.long)
    if kind == "causal":
        return doc
    for b in range(B):
        if kind == "long":
            cut = int(torch.randint(S // 2, S - 4, (1,), generator=g))
            doc[b, cut:] = 1
            doc[b, -3:] = -1
            continue
        lens = torch.randint(1, S // 3, (S,), generator=g)
        if kind == "doc":
            lens[int(torch.randint(0, 3, (1,), generator=g))] = S // 2 + 5  # a document longer than a shard
        starts = torch.cumsum(lens, 0)
        doc[b] = torch.searchsorted(starts, torch.arange(S), right=True)
        doc[b, -5:] = -1
        if kind == "pad":
            doc[b, S // 3 : S // 3 + S // 4] = -1
            # keep documents contiguous: relabel the part after the padding hole
            doc[b, S // 3 + S // 4 : -5] += 1000
    return doc


def reference(q, k, v, doc, causal, window, score_mod, dout, dlse, bs: int = BS, prefix: int | None = None):
    """Single-device dense reference on the full sequence: out, lse, dq, dk, dv (and score-mod grads)."""
    B, _, S, _ = q.shape
    pos = torch.arange(S, device=q.device).expand(B, S)
    in_prefix = None
    if prefix is not None:
        in_prefix = (bal.positions_in_document(doc) < prefix) & (doc >= 0)
    mm = DocumentMaskMod(doc, doc, pos, pos, causal=causal, window=window, kv_in_prefix=in_prefix)
    bm = create_block_mask(mm, B, None, S, S, device=str(q.device), BLOCK_SIZE=bs)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = flex_attention_reference(
        qr, kr, vr, score_mod, bm, enable_gqa=q.shape[1] != k.shape[1], return_lse=True
    )
    loss = (out * dout.double()).sum() + (lse.masked_fill(torch.isinf(lse), 0) * dlse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), qr.grad, kr.grad, vr.grad


def cases():
    out = []
    for balance in ("contiguous", "zigzag", "document", "auto"):
        for strategy in ("ring", "allgather"):
            out.append(
                dict(balance=balance, strategy=strategy, kind="doc", causal=True, window=None, gqa=True)
            )
            out.append(
                dict(balance=balance, strategy=strategy, kind="causal", causal=True, window=None, gqa=False)
            )
            out.append(
                dict(balance=balance, strategy=strategy, kind="long", causal=True, window=20, gqa=True)
            )
    for balance in ("contiguous", "zigzag", "document", "auto"):
        out.append(dict(balance=balance, strategy="direct", kind="doc", causal=True, window=None, gqa=True))
    out.append(
        dict(
            balance="document",
            strategy="direct",
            kind="long",
            causal=True,
            window=20,
            gqa=False,
            sm="relbias",
        )
    )
    out.append(
        dict(
            balance="contiguous", strategy="direct", kind="pad", causal=False, window=None, gqa=True, prefix=3
        )
    )
    out.append(
        dict(balance="zigzag", strategy="ulysses", kind="doc", causal=True, window=None, gqa=True, sm="alibi")
    )
    out.append(
        dict(
            balance="document",
            strategy="ulysses",
            kind="long",
            causal=True,
            window=9,
            gqa=False,
            sm="relbias",
        )
    )
    out.append(dict(balance="document", strategy="ring", kind="doc", causal=False, window=None, gqa=False))
    out.append(dict(balance="zigzag", strategy="ring", kind="pad", causal=True, window=None, gqa=True))
    out.append(dict(balance="auto", strategy="allgather", kind="pad", causal=False, window=9, gqa=False))
    out.append(
        dict(balance="document", strategy="ring", kind="doc", causal=True, window=None, gqa=True, sm="alibi")
    )
    out.append(
        dict(
            balance="zigzag",
            strategy="allgather",
            kind="doc",
            causal=True,
            window=None,
            gqa=False,
            sm="alibi",
        )
    )
    out.append(
        dict(
            balance="document", strategy="ring", kind="doc", causal=True, window=None, gqa=False, sm="relbias"
        )
    )
    out.append(
        dict(
            balance="contiguous",
            strategy="allgather",
            kind="long",
            causal=True,
            window=None,
            gqa=False,
            sm="relbias",
        )
    )
    out.append(
        dict(balance="document", strategy="ring", kind="doc", causal=True, window=None, gqa=True, prefix=5)
    )
    out.append(
        dict(balance="zigzag", strategy="allgather", kind="doc", causal=True, window=6, gqa=False, prefix=4)
    )
    out.append(
        dict(
            balance="auto",
            strategy="ring",
            kind="doc",
            causal=True,
            window=None,
            gqa=True,
            builder="intervals",
        )
    )
    out.append(
        dict(
            balance="zigzag",
            strategy="ring",
            kind="long",
            causal=False,
            window=11,
            gqa=False,
            builder="intervals",
        )
    )
    # ring with several steps per kernel call (forward and dQ over the concatenated keys of a group)
    out.append(
        dict(
            balance="document", strategy="ring", kind="doc", causal=True, window=None, gqa=True, ring_group=2
        )
    )
    out.append(
        dict(balance="zigzag", strategy="ring", kind="long", causal=True, window=20, gqa=False, ring_group=3)
    )
    out.append(
        dict(
            balance="contiguous", strategy="ring", kind="doc", causal=True, window=None, gqa=True, sm="alibi",
            ring_group=2,
        )
    )  # fmt: skip
    out.append(
        dict(balance="auto", strategy="ring", kind="pad", causal=False, window=None, gqa=True, ring_group=4)
    )
    # all-gather pipelined over chunks of K/V heads (B = 1 takes the no-copy views of the gathered buffer,
    # B = 2 the batch-major copies); score mods sliced per chunk, RelativeBias gradients through the slices
    out.append(
        dict(balance="document", strategy="allgather", kind="doc", causal=True, window=None, gqa=True,
             head_chunks=2, batch=1)
    )  # fmt: skip
    out.append(
        dict(balance="zigzag", strategy="allgather", kind="long", causal=True, window=20, gqa=False,
             head_chunks=(1, 3), sm="alibi")
    )  # fmt: skip
    out.append(
        dict(balance="contiguous", strategy="allgather", kind="doc", causal=True, window=None, gqa=False,
             head_chunks=3, sm="relbias", batch=1)
    )  # fmt: skip
    out.append(
        dict(balance="auto", strategy="allgather", kind="pad", causal=False, window=None, gqa=True,
             head_chunks=2, prefix=3)
    )  # fmt: skip
    # local keys first: the own shard's call during the first gather, the other ranks' keys merged into it
    # (padding shards: ranks whose own or other keys hold nothing visible)
    out.append(
        dict(balance="document", strategy="allgather", kind="doc", causal=True, window=None, gqa=True,
             head_chunks=2, batch=1, local_first=True)
    )  # fmt: skip
    out.append(
        dict(balance="zigzag", strategy="allgather", kind="long", causal=True, window=20, gqa=False,
             head_chunks=(1, 3), sm="alibi", local_first=True)
    )  # fmt: skip
    out.append(
        dict(balance="contiguous", strategy="allgather", kind="pad", causal=True, window=None, gqa=False,
             sm="relbias", local_first=True)
    )  # fmt: skip
    out.append(
        dict(balance="auto", strategy="allgather", kind="pad", causal=False, window=None, gqa=True,
             head_chunks=2, prefix=3, local_first=True)
    )  # fmt: skip
    # the backward pipelined over other chunks than the forward (a small first chunk: its gather is exposed)
    out.append(
        dict(balance="document", strategy="allgather", kind="long", causal=True, window=None, gqa=False,
             head_chunks=2, bwd_head_chunks=(1, 3), batch=1, local_first=True)
    )  # fmt: skip
    out.append(
        dict(balance="zigzag", strategy="allgather", kind="pad", causal=True, window=None, gqa=False,
             head_chunks=(3, 1), bwd_head_chunks=4, sm="alibi")
    )  # fmt: skip
    # the planner's other objective for each strategy (the defaults are "totals" for allgather, "ring" else)
    out.append(
        dict(balance="document", strategy="allgather", kind="long", causal=True, window=None, gqa=True,
             head_chunks=2, objective="ring")
    )  # fmt: skip
    out.append(
        dict(
            balance="auto",
            strategy="ring",
            kind="doc",
            causal=True,
            window=None,
            gqa=False,
            objective="totals",
        )
    )
    return out


AUTO_CASES = [
    dict(balance="document", strategy="ring", kind="doc", causal=True, window=None, gqa=True),
    dict(balance="contiguous", strategy="direct", kind="doc", causal=True, window=None, gqa=False),
    dict(balance="document", strategy="ulysses", kind="doc", causal=True, window=None, gqa=True),
    dict(balance="zigzag", strategy="allgather", kind="long", causal=True, window=20, gqa=False, sm="alibi"),
    dict(balance="document", strategy="ring", kind="doc", causal=True, window=None, gqa=True, ring_group=2),
    dict(balance="document", strategy="allgather", kind="doc", causal=True, window=None, gqa=True,
         head_chunks=2, batch=1),
    dict(balance="document", strategy="allgather", kind="doc", causal=True, window=None, gqa=True,
         head_chunks=2, batch=1, local_first=True),
]  # fmt: skip


def run_case(
    c: dict,
    group,
    device: str,
    kernel_backend: str,
    dtype: torch.dtype,
    seed: int,
    S: int = S_TEST,
    bs: int = BS,
    D: int = 8,
):
    """One exactness case on the calling rank; raises AssertionError with the case in the message."""
    B, Hq = c.get("batch", 2), 4
    Hkv = 2 if c["gqa"] else Hq
    g = torch.Generator().manual_seed(seed)
    doc = make_doc_ids(c["kind"], B, S, seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    dlse = torch.randn(B, Hq, S, generator=g, dtype=torch.float64)
    sm_kind = c.get("sm")
    table = torch.randn(Hq, 2 * 16 - 1, generator=g, dtype=torch.float64)
    if sm_kind == "alibi":
        sm_ref = sm_cp = ALiBi(ALiBi.default_slopes(Hq).double())
    elif sm_kind == "relbias":
        sm_ref = RelativeBias(table.clone().requires_grad_())
        sm_cp = RelativeBias(
            table.clone()
            .to(device, torch.float64 if dtype == torch.float64 else torch.float32)
            .requires_grad_()
        )
    else:
        sm_ref = sm_cp = None
    out_r, lse_r, dq_r, dk_r, dv_r = reference(
        q, k, v, doc, c["causal"], c["window"], sm_ref, dout, dlse, bs, c.get("prefix")
    )

    p = cp.plan(
        doc.to(device),
        group,
        balance=c["balance"],
        strategy=c["strategy"],
        causal=c["causal"],
        window=c["window"],
        block_size=bs,
        prefix_lengths=c.get("prefix"),
        kernel_backend=kernel_backend,
        mask_builder=c.get("builder", "masks"),
        ring_group=c.get("ring_group", 1),
        head_chunks=c.get("head_chunks", 1),
        local_first=c.get("local_first", False),
        bwd_head_chunks=c.get("bwd_head_chunks"),
        objective=c.get("objective"),
    )
    if c.get("local_first") and p.world_size > 1:  # the own-keys-first path runs (not the plain one)
        assert p.local_first, c
    if sm_kind == "alibi" and (device != "cpu" or dtype != torch.float64):
        sm_cp = ALiBi(ALiBi.default_slopes(Hq).to(device))

    def loc(x):
        return p.shard(x.to(device), 2)

    ql, kl, vl = (loc(t).to(dtype).requires_grad_() for t in (q, k, v))
    if c["strategy"] == "ulysses" and (Hq % p.world_size or Hkv % p.world_size):
        try:
            cp.attention(ql, kl, vl, p, score_mod=sm_cp)
        except ValueError as e:
            assert "divisible by the CP world size" in str(e), e
            return p
        raise AssertionError(f"ulysses with Hq={Hq}, Hkv={Hkv}, N={p.world_size} did not raise")
    out, lse = cp.attention(ql, kl, vl, p, score_mod=sm_cp, return_lse=True)
    loss = (out.double() * loc(dout)).sum() + (
        lse.masked_fill(torch.isinf(lse), 0).double() * p.shard(dlse.to(device), 2)
    ).sum()
    loss.backward()
    tol = {
        torch.float64: dict(atol=1e-8, rtol=1e-7),
        # fp32 on a GPU may use TF32 tensor cores inside the kernel
        torch.float32: dict(atol=1e-2, rtol=1e-2)
        if device.startswith("cuda")
        else dict(atol=2e-3, rtol=2e-3),
    }.get(dtype, dict(atol=3e-2, rtol=3e-2))
    msg = f"case {c} world={p.world_size} rank={p.rank} balance->{p.balance}"
    torch.testing.assert_close(out.double().cpu(), loc(out_r).cpu(), **tol, msg=lambda m: f"out {msg}: {m}")
    torch.testing.assert_close(
        lse.double().cpu(), p.shard(lse_r.to(device), 2).cpu(), **tol, msg=lambda m: f"lse {msg}: {m}"
    )
    for name, got, want in (("dq", ql.grad, dq_r), ("dk", kl.grad, dk_r), ("dv", vl.grad, dv_r)):
        torch.testing.assert_close(
            got.double().cpu(), loc(want).cpu(), **tol, msg=lambda m, n=name: f"{n} {msg}: {m}"
        )
    assert not torch.isnan(out).any() and not torch.isnan(ql.grad).any(), msg
    pad = p.shard(doc.to(device), 1)[:, None, :].expand_as(lse) < 0
    assert torch.all(out[pad] == 0) and torch.all(torch.isneginf(lse[pad])), msg
    # unshard puts the output back in global order
    torch.testing.assert_close(
        p.unshard(out.detach(), 2).double().cpu(), out_r, **tol, msg=lambda m: f"unshard {msg}: {m}"
    )
    st = p.stats
    assert st["work_max_over_mean"] >= 1.0 and st["critical_path_over_ideal"] >= 1.0 - 1e-9, st
    assert st["kv_tokens_min"] <= st["kv_tokens_moved_ring"] <= st["kv_tokens_moved_allgather"], st
    default_objective = "totals" if c["strategy"] == "allgather" else "ring"
    assert st["objective"] == c.get("objective", default_objective), (st["objective"], c)
    if c["strategy"] == "direct" and p.world_size > 1:
        # the schedule moves exactly the mask's minimum that the stats report
        got = torch.tensor(
            [sum(x.numel() for x in p.direct_recv if x is not None)], dtype=torch.int64, device=device
        )
        dist.all_reduce(got)
        assert int(got) == st["kv_tokens_moved_direct"], (int(got), st)
    if sm_kind == "relbias":
        gsum = sm_cp.table.grad.clone()
        if group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(gsum, group=group)
        torch.testing.assert_close(
            gsum.double().cpu(), sm_ref.table.grad, **tol, msg=lambda m: f"score grad {msg}: {m}"
        )
    return p


def check_bad_inputs(group, device: str, world: int, rank: int) -> None:
    """Clear errors, raised on every rank, never a hang."""
    S = S_TEST
    doc = make_doc_ids("doc", 1, S, 3).to(device)
    # doc_ids differing between ranks: every rank must raise (the check is a collective)
    bad = doc.clone()
    if rank == world - 1 and world > 1:
        bad[0, 0] = 77
    if world > 1:
        try:
            cp.plan(bad, group, balance="contiguous", block_size=BS, check=True)
        except ValueError as e:
            assert "differ between the ranks" in str(e), e
        else:
            raise AssertionError("doc_ids differing between ranks was not detected")
        # the same doc_ids but a different planner objective on one rank: different layouts, caught too
        objective = "ring" if rank == world - 1 else "totals"
        try:
            cp.plan(doc, group, strategy="allgather", block_size=BS, objective=objective, check=True)
        except ValueError as e:
            assert "differ between the ranks" in str(e), e
        else:
            raise AssertionError("plan objectives differing between ranks were not detected")
    # S not splittable
    for args, needle in (
        (dict(balance="contiguous"), "not divisible by the CP world size"),
        (dict(balance="document", block_size=64), "divisible by N*block_size"),
    ):
        d = make_doc_ids(
            "doc", 1, S + (1 if "balance" in args and args["balance"] == "contiguous" and world > 1 else 0), 1
        )
        if world == 1 and args["balance"] == "contiguous":
            continue
        try:
            cp.plan(d.to(device), group, **({"block_size": BS} | args))
        except ValueError as e:
            assert needle in str(e) or "not divisible" in str(e), e
        else:
            raise AssertionError(f"{args} did not raise for S={d.shape[1]}")
    # a 1-D DeviceMesh works as the group; debug mode checks shapes across ranks on every call
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.split(":")[0], (world,))
    p = cp.plan(doc, mesh, balance="zigzag", block_size=BS, debug=True, kernel_backend="reference")
    L = S // world
    heads = 4 if rank == 0 and world > 1 else 2
    qd = torch.randn(1, heads, L, 8, device=device)
    kd = torch.randn(1, 2, L, 8, device=device)
    if world > 1:
        try:
            cp.attention(qd, kd, kd, p)
        except ValueError as e:
            assert "differ between ranks" in str(e), e
        else:
            raise AssertionError("q heads differing between ranks were not detected in debug mode")
    p = cp.plan(doc, group, balance="contiguous", block_size=BS)
    q = torch.randn(1, 2, L, 8, device=device)
    try:
        cp.attention(
            q, torch.randn(1, 2, L + 1, 8, device=device), torch.randn(1, 2, L + 1, 8, device=device), p
        )
    except ValueError as e:
        assert "plan's local shard" in str(e), e
    else:
        raise AssertionError("mismatched shard shapes were not detected")
    try:
        cp.attention(q, torch.randn(1, 2, L, 8, device="meta"), torch.randn(1, 2, L, 8, device=device), p)
    except ValueError as e:
        assert "one device" in str(e), e
    else:
        raise AssertionError("q/k/v on different devices were not detected")


def _worker(
    rank: int,
    world: int,
    init_method: str,
    results,
    backend: str,
    device_kind: str,
    kernel_backend: str,
    dtype_name: str,
):
    try:
        torch.set_num_threads(1)
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        else:
            device = "cpu"
        init_group(backend, rank, world, init_method)
        dtype = getattr(torch, dtype_name)
        n = 0
        if device_kind == "cuda":
            # the Triton kernel on GPU: every case at D=64 with blocks of 32 and 64 (FLEXDIST_CP_NCCL_BS);
            # rank 0 reports progress on stderr, so a slow run (cold Triton cache) is told from a hang
            sizes = [int(b) for b in os.environ.get("FLEXDIST_CP_NCCL_BS", "32,64").split(",")]
            # FLEXDIST_CP_NCCL_CASES="a-b": only cases a..b (a cold Triton cache costs 7-25 s per case; split
            # the run over device calls)
            # (or a comma-separated list of cases and ranges, e.g. "36,38,47-50")
            spans = [
                (int(lo), int(hi or lo))
                for lo, _, hi in (
                    part.partition("-")
                    for part in os.environ.get("FLEXDIST_CP_NCCL_CASES", "0-9999").split(",")
                )
            ]
            t0 = time.monotonic()
            for i, c in enumerate(cases()):
                if not any(lo <= i <= hi for lo, hi in spans):
                    continue
                for bs in sizes:
                    S = 4 * world * bs
                    run_case(c, None, device, kernel_backend, dtype, seed=100 + i, S=S, bs=bs, D=64)
                    n += 1
                if rank == 0:
                    print(
                        f"[nccl world={world}] case {i} done {c} ({time.monotonic() - t0:.0f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
        else:
            for i, c in enumerate(cases()):
                if world > 2 and c.get("sm") == "relbias" and i % 2:
                    continue
                run_case(c, None, device, kernel_backend, dtype, seed=100 + i)
                n += 1
            if world == 2:
                # the Triton kernel under the interpreter (backend "auto" picks it with TRITON_INTERPRET=1)
                for i, c in enumerate(AUTO_CASES):
                    run_case(c, None, device, "auto", torch.float32, seed=300 + i, S=64, bs=16, D=16)
                    n += 1
        check_bad_inputs(None, device, world, rank)
        dist.barrier()
        results.put((rank, "ok", n))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_world(
    world: int,
    backend: str = "gloo",
    device_kind: str = "cpu",
    kernel_backend: str = "reference",
    dtype_name: str = "float64",
    timeout: float = 150.0,
    env: dict | None = None,
    min_cases: int = 11,
) -> None:
    """Run `_worker` on `world` processes; fail on any error or if they do not finish within `timeout`."""
    counts = run_ranks(
        _worker, world, backend, device_kind, kernel_backend, dtype_name, timeout=timeout, env=env
    )
    assert all(n >= min_cases for n in counts.values()), (counts, f"expected >= {min_cases} cases per rank")


# ----------------------------------------------------------------------------------------------------------
# single-process tests
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,window", [(True, None), (True, 7), (False, None), (False, 5)])
def test_pair_blocks_match_dense_mask(causal, window):
    """The fast block classifier equals the block structure of the dense DocumentMaskMod, for any token sets."""
    B, S, bs = 2, 120, 8
    doc = make_doc_ids("doc", B, S, 5)
    lo, hi = bal.visible_intervals(doc, causal, window)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        qi = torch.randperm(S, generator=g)[:44].sort().values
        ki = torch.randperm(S, generator=g)[:52].sort().values
        ne, fu = bal.pair_blocks(lo[:, qi], hi[:, qi], ki, bs)
        pos = torch.arange(S).expand(B, S)
        dense = DocumentMaskMod(
            doc[:, qi], doc[:, ki], pos[:, qi], pos[:, ki], causal=causal, window=window
        ).dense()
        Qb, Kb = ne.shape[1:]
        pad = torch.zeros(B, Qb * bs, Kb * bs, dtype=torch.int8)
        valid = torch.zeros_like(pad)
        pad[:, : qi.numel(), : ki.numel()] = dense.to(torch.int8)
        valid[:, : qi.numel(), : ki.numel()] = 1
        blk = pad.view(B, Qb, bs, Kb, bs).sum((2, 4))
        nvalid = valid.view(B, Qb, bs, Kb, bs).sum((2, 4))
        assert torch.equal(ne, blk > 0)
        assert torch.equal(fu, blk == nvalid)


def test_plan_single_process_and_positions():
    """World size 1 (no process group): the plan is the identity layout and attention equals the reference."""
    c = dict(balance="auto", strategy="ring", kind="doc", causal=True, window=None, gqa=True, sm="alibi")
    p = run_case(c, None, "cpu", "reference", torch.float64, seed=7)
    assert p.world_size == 1 and p.masks[0] is not None
    doc = make_doc_ids("doc", 2, S_TEST, 7)
    pos = p.positions
    for b in range(2):
        for s in range(1, S_TEST):
            if doc[b, s] >= 0 and doc[b, s] == doc[b, s - 1]:
                assert pos[b, s] == pos[b, s - 1] + 1
            elif doc[b, s] >= 0:
                assert pos[b, s] == 0


def test_module_wrapper_and_plan_per_batch():
    doc = make_doc_ids("doc", 1, 64, 2)
    p = cp.plan(doc, None, balance="contiguous", block_size=BS, kernel_backend="reference")
    m = cp.ContextParallelAttention()
    q = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a plan"):
        m(q, q, q)
    m.set_plan(p)
    o1 = m(q, q, q)
    o2 = m(q, q, q, p)
    torch.testing.assert_close(o1, o2)


def test_lse_merge_bf16_accuracy_n8():
    """Merging 8 bf16 partial results in fp32 is as accurate as one bf16 call (vs fp32 ground truth)."""
    torch.manual_seed(0)
    B, H, S, D, N = 1, 4, 512, 32, 8
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    ref, ref_lse = reference_forward(q, k, v)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    single, _ = reference_forward(qb, kb, vb)
    outs, lses = [], []
    for j in range(N):
        sl = slice(j * S // N, (j + 1) * S // N)
        o, l = reference_forward(qb, kb[:, :, sl], vb[:, :, sl])
        outs.append(o)
        lses.append(l)
    merged, lse = merge_all(outs, lses)
    err_merged = (merged.bfloat16().float() - ref).abs().max().item()
    err_single = (single.float() - ref).abs().max().item()
    assert err_merged <= 2 * err_single + 1e-3, (err_merged, err_single)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)
    # a step where rows see nothing contributes -inf without NaN
    empty_o = torch.zeros_like(outs[0])
    empty_l = torch.full_like(lses[0], float("-inf"))
    m2, l2_ = merge_all([empty_o, *outs, empty_o], [empty_l, *lses, empty_l])
    assert not torch.isnan(m2).any() and not torch.isnan(l2_).any()
    torch.testing.assert_close(m2, merged)
    m3, l3 = merge_all([empty_o, empty_o], [empty_l, empty_l])
    assert torch.all(m3 == 0) and torch.all(torch.isneginf(l3))
    # the ring's own path: the Triton kernel merging each bf16 step into an fp32 accumulator in its epilogue
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out_acc = torch.zeros(B, H, S, D, device=dev)
    lse_acc = torch.full((B, H, S), float("-inf"), device=dev)
    for j in range(N):
        sl = slice(j * S // N, (j + 1) * S // N)
        idx = torch.arange(S, device=dev)[sl]
        flex_attention_forward(
            qb.to(dev), kb[:, :, sl].to(dev), vb[:, :, sl].to(dev), kv_global_idx=idx,
            out_acc=out_acc, lse_acc=lse_acc, backend="triton",
        )  # fmt: skip
    err_kernel = (out_acc.bfloat16().float().cpu() - ref).abs().max().item()
    assert err_kernel <= 2 * err_single + 1e-3, (err_kernel, err_single)
    torch.testing.assert_close(lse_acc.cpu(), ref_lse, atol=2e-2, rtol=1e-3)


def test_document_planner_beats_fixed_layouts():
    """On a document pack the planner's predicted ring time is no worse than contiguous/zigzag and balanced."""
    g = torch.Generator().manual_seed(1)
    S, bs, N = 8192, 64, 8
    lens = (torch.distributions.Exponential(1 / 700.0).sample((64,)).long() + 1).tolist()
    doc = torch.zeros(1, S, dtype=torch.long)
    s, i = 0, 0
    while s < S:
        ln = lens[i % len(lens)]
        doc[0, s : s + ln] = i
        s, i = s + ln, i + 1
    del g
    cost = bal.CostModel(comm_weight=0.5)
    G = bal.global_block_work(doc, bs, True, None)
    assign, info = bal.plan_document(G, N, cost)
    assert np.bincount(assign, minlength=N).tolist() == [S // bs // N] * N
    _, _, W = bal._aggregate(G, assign, N)
    per = W.sum(1)
    assert per.max() / per.mean() <= 1.1, per
    assert info["cost"] <= min(info["seeds"].values()) + 1e-9
    assert info["cost"] <= 1.15 * W.sum() / N, (info, W.sum() / N)


def test_allgather_planner_balances_rank_totals():
    """``CostModel(gather=True)`` (what ``plan(strategy="allgather")`` uses): the predicted time is the largest
    per-rank total with partial blocks weighted, and the planner brings it closer to total/N than the ring
    objective does on the same pack, with every rank's plan identical (binary-exact weights)."""
    S, bs, N = 32768, 128, 8
    g = torch.Generator().manual_seed(3)
    # a long-tailed pack: mostly short documents, a few longer than a rank's shard
    lens = [*((-torch.log(torch.rand(40, generator=g)) * 900).long() + 1).tolist(), 6000, 9000]
    lens = [lens[i] for i in torch.randperm(len(lens), generator=g).tolist()]
    doc = torch.zeros(1, S, dtype=torch.long)
    s, i = 0, 0
    while s < S:
        ln = lens[i % len(lens)]
        doc[0, s : s + ln] = i
        s, i = s + ln, i + 1
    w = bal.ALLGATHER_PARTIAL_WEIGHT
    G = bal.global_block_work(doc, bs, True, None, partial_weight=w)
    gather = bal.CostModel(comm_weight=0.1, gather=True, partial_weight=w)
    a_g, info = bal.plan_document(G, N, gather)
    a_r, _ = bal.plan_document(G, N, bal.CostModel(comm_weight=0.1, partial_weight=w))
    totals = {}
    for name, a in (("gather", a_g), ("ring", a_r)):
        assert np.bincount(a, minlength=N).tolist() == [S // bs // N] * N
        _, _, W = bal._aggregate(G, a, N)
        totals[name] = W.sum(1)
    assert info["cost"] == bal.predicted_time(bal._aggregate(G, a_g, N)[2], S // bs // N, gather)
    assert info["cost"] == totals["gather"].max()
    ideal = G.sum() / N
    assert totals["gather"].max() <= totals["ring"].max(), totals
    assert totals["gather"].max() <= 1.01 * ideal, (totals["gather"], ideal)
    assert np.array_equal(bal.plan_document(G, N, gather)[0], a_g)  # deterministic
    # partial blocks are what the weight changes: a pack's G differs where partial blocks are
    G1 = bal.global_block_work(doc, bs, True, None)
    assert (G != G1).any() and ((G - G1)[G != G1] == w - 1).all()


# ----------------------------------------------------------------------------------------------------------
# distributed exactness (one spawn per world size)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cp_exact_gloo(world):
    spawn_world(world, timeout=170.0)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_cp_exact_gloo_bf16(world):
    """Every case in bf16 (fp32 accumulation; the ring's last dK/dV hop travels in bf16) against the fp64
    single-device reference, at bf16 tolerance."""
    spawn_world(world, dtype_name="bfloat16", timeout=170.0)


def test_block_level_pair_work_equals_token_level():
    """For block-aligned layouts the planner's block-aggregated pair work equals the exact token-level count."""
    from flexdist.cp.plan import _pair_work_tokens

    S, N, bs = 384, 4, 16
    doc = make_doc_ids("doc", 2, S, 11)
    for causal, window in ((True, None), (True, 20), (False, None)):
        lo, hi = bal.visible_intervals(doc, causal, window)
        G = bal.global_block_work(doc, bs, causal, window)
        assign, _ = bal.plan_document(G, N, bal.CostModel())
        for perm in (bal.blocks_to_perm(assign, N, bs), bal.contiguous_perm(S, N), bal.zigzag_perm(S, N)):
            a = bal.block_assignment(perm, N, bs)
            assert a is not None
            W1, need1 = bal.pair_work_from_blocks(G, a, N)
            W2, need2 = _pair_work_tokens(perm, N, lo, hi, bs, 1.0)
            np.testing.assert_array_equal(W1, W2)
            np.testing.assert_array_equal(need1, need2)
    assert bal.block_assignment(bal.zigzag_perm(S, 8), 8, 16) is None  # chunks of 24 tokens straddle blocks


def test_ring_group_arguments_are_checked():
    doc = make_doc_ids("doc", 1, S_TEST, 0)
    with pytest.raises(ValueError, match="ring_group must be a positive int, got 0"):
        cp.plan(doc, None, ring_group=0)
    with pytest.raises(ValueError, match="ring_group=2 needs strategy='ring', got strategy='allgather'"):
        cp.plan(doc, None, strategy="allgather", ring_group=2)
    p = cp.plan(doc, None, strategy="ring", ring_group=3, block_size=BS)
    assert p.ring_group == 3 and len(p.group_masks) == 1  # one rank: one group holding step 0


def test_head_chunks_arguments_are_checked():
    from flexdist.cp.plan import chunk_sizes

    doc = make_doc_ids("doc", 1, S_TEST, 0)
    with pytest.raises(ValueError, match="head_chunks must be >= 1, got 0"):
        cp.plan(doc, None, strategy="allgather", head_chunks=0)
    with pytest.raises(ValueError, match="head_chunks=2 needs strategy='allgather', got strategy='ring'"):
        cp.plan(doc, None, strategy="ring", head_chunks=2)
    with pytest.raises(ValueError, match=r"positive ints .* got \(2, 0\)"):
        cp.plan(doc, None, strategy="allgather", head_chunks=(2, 0))
    with pytest.raises(ValueError, match="head_chunks must be a positive int"):
        cp.plan(doc, None, strategy="allgather", head_chunks=True)
    assert chunk_sizes(3, 8) == [2, 3, 3]  # the larger chunks last: the first one's gather is exposed
    assert chunk_sizes(2, 8) == [4, 4] and chunk_sizes(1, 5) == [5] and chunk_sizes((3, 5), 8) == [3, 5]
    with pytest.raises(ValueError, match="head_chunks=4 is more chunks than the 2 key/value heads"):
        chunk_sizes(4, 2)
    with pytest.raises(ValueError, match=r"head_chunks=\(3, 3\) sums to 6, not the 8 key/value heads"):
        chunk_sizes((3, 3), 8)
    # the error reaches the caller of attention (the head count is only known there)
    p = cp.plan(doc, None, strategy="allgather", head_chunks=3, block_size=BS, kernel_backend="reference")
    q = torch.randn(1, 4, S_TEST, 8)
    kv = torch.randn(1, 2, S_TEST, 8)
    with pytest.raises(ValueError, match="head_chunks=3 is more chunks than the 2 key/value heads"):
        cp.attention(q, kv, kv, p)
    # the backward's own chunks: checked as head_chunks, named as bwd_head_chunks
    with pytest.raises(ValueError, match="bwd_head_chunks must be >= 1, got 0"):
        cp.plan(doc, None, strategy="allgather", bwd_head_chunks=0)
    with pytest.raises(
        ValueError, match=r"bwd_head_chunks=\(1, 1\) needs strategy='allgather', got strategy='ring'"
    ):
        cp.plan(doc, None, strategy="ring", bwd_head_chunks=[1, 1])
    assert cp.plan(doc, None, strategy="allgather", head_chunks=(1, 1)).bwd_head_chunks == (
        1,
        1,
    )  # None: same
    # the forward runs its two chunks; the backward reads its own spec (3 chunks of 2 heads: an error there)
    p = cp.plan(doc, None, strategy="allgather", head_chunks=2, bwd_head_chunks=3, block_size=BS,
                kernel_backend="reference")  # fmt: skip
    ql, kl, vl = (torch.randn(1, h, S_TEST, 8, requires_grad=True) for h in (4, 2, 2))
    o = cp.attention(ql, kl, vl, p)
    with pytest.raises(ValueError, match="bwd_head_chunks=3 is more chunks than the 2 key/value heads"):
        o.sum().backward()


def test_local_first_arguments_are_checked():
    from flexdist.cp.plan import build_pair_masks, drop_key_blocks

    doc = make_doc_ids("doc", 1, S_TEST, 0)
    with pytest.raises(ValueError, match="local_first=True needs strategy='allgather', got strategy='ring'"):
        cp.plan(doc, None, strategy="ring", local_first=True)
    with pytest.raises(ValueError, match="local_first must be a bool, got 1"):
        cp.plan(doc, None, strategy="allgather", local_first=1)
    with pytest.raises(ValueError, match=r"shard length S/N=96/1=96 to be a multiple of block_size=64"):
        cp.plan(doc, None, strategy="allgather", local_first=True, block_size=64)
    with pytest.raises(ValueError, match="objective must be 'ring', 'totals' or None, got 'max'"):
        cp.plan(doc, None, strategy="allgather", objective="max")
    # one rank: nothing to gather, the plain path runs
    p = cp.plan(doc, None, strategy="allgather", local_first=True, block_size=BS)
    assert not p.local_first and p.remote_mask is None
    # the remote mask is the whole one without the own key blocks; both parts cover it exactly
    perm = torch.randperm(S_TEST // BS)
    perm = (perm[:, None] * BS + torch.arange(BS)).reshape(-1)
    mine = perm[32:64]
    ((whole, _, _), (own, _, _)) = build_pair_masks(
        doc, mine, [perm, mine], causal=True, window=None, block_size=BS
    )
    rest = drop_key_blocks(whole, 4, 8)
    dw, do, dr = whole.to_dense()[0, 0], own.to_dense()[0, 0], rest.to_dense()[0, 0]
    assert torch.equal(dw[:, 4:8], do) and not dr[:, 4:8].any()
    assert torch.equal(dr[:, :4], dw[:, :4]) and torch.equal(dr[:, 8:], dw[:, 8:])
    assert rest.mask_mod is whole.mask_mod
    assert drop_key_blocks(whole, 0, S_TEST // BS) is None
