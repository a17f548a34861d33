"""Simulate N-GPU context-parallel attention on ONE GPU: every rank's real per-step kernel calls, timed.

For document-causal packs with ``--tokens-per-rank`` tokens per rank (default 8k, MagiAttention's setup: bf16,
GQA 64:8, head dim 128, document lengths from a long-tailed mixture capped at S/4) and N in ``--ns``, for every
balance (contiguous, zigzag, document-aware planner):

- ring: for each ring step t and rank r, run the kernel forward (merging into the running output in its
  epilogue, as the ring does) and backward (dQ, then dK/dV into the travelling buffer; global LSE/delta) of
  rank r's queries against shard (r − t) mod N with the plan's mask; the step
  time is the max over ranks; the K/V transfer for the next step (bytes / ``--link-gbs``, dK/dV in fp32 in
  backward) overlaps the current step, so a step costs max(compute, transfer). Steps whose mask is empty
  cost only their transfer, and a shard stops travelling after its last consumer (as `flexdist.cp.ring`).
- direct: as ring, but each step rank r gets from rank r − t only the K/V blocks its mask needs (kernel on
  the compacted K/V), and sends their dK/dV straight back; transfers cost the largest message of the step.
- ulysses: each rank runs the whole sequence for Hq/N heads, plus four exposed all-to-alls.
- allgather: one kernel call per rank with its full mask, plus the exposed all-gather (and in backward the
  reduce-scatter) time.

Reported: predicted per-GPU TFLOP/s (useful FLOPs: forward 4·Hq·D·visible pairs, backward 2.5×) and CP
efficiency = single-GPU full-sequence kernel time / (N × predicted time), with the single-GPU run of the
same kernel (and torch's compiled flex_attention when available) measured in the same process.
Anchor: MagiAttention ≈459 fwd / ≈360 bwd TFLOP/s per H100 at 8 GPUs (plain ring P2P ≈89 fwd).

    python bench/bench_cp_sim.py --out bench/results/cp_sim_h100.json            # one GPU
    python bench/bench_cp_sim.py --quick                                          # CPU, reference kernel
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_planner import make_pack

from flexdist.cp import balance as bal
from flexdist.cp.plan import _needed_tokens, _pair_work_tokens, build_pair_masks
from flexdist.kernels import flex_attention_backward, flex_attention_forward


class timer:
    """Seconds per call of fn(): one warm-up, then ``rounds`` times ``reps`` calls back to back between two
    CUDA events; the fastest round counts.

    Back to back, as the ring issues its steps. With ``host_ahead`` (the default) each round starts behind
    ~2 ms of queued GPU work (matrix products), so the host has issued the round's first calls before the
    start event fires: the events then time the GPU alone, as in a training step, where the host issues a
    layer's CP calls while the GPU still runs the layers before. Without it (``--host-gaps``, how sessions up
    to s10 timed) the start event fires on an idle GPU and the host's time to issue the first call lands in
    the round: about 0.1–0.2 ms over ``reps`` calls, which inflates short calls (the K/V packs, a
    ``local_first`` own-shard call) but not the 19 ms one-GPU baseline. Where the host is slower than the GPU
    for longer than the head start, host time still shows. The host's side is measured on its own
    (``bench_host.py``, ``bench_cp_multi.py``). The best of several rounds keeps a moment of contention for
    the host's CPUs (another benchmark lane, a compile) from being charged to one configuration.

    ``many(fns)`` times calls that stand for *different ranks* (whose maximum the simulation takes): with
    ``interleaved`` (the default, ``--timing interleaved``) round i of every call runs before round i + 1 of
    any, so a slow stretch of the GPU (clocks, a busy neighbour) falls on every rank alike instead of on the
    ranks timed during it; every other round runs the calls in reverse order (s15: in s13-s14 the ranks
    timed last in each round often measured 3-6% slower in the forward; in s16 they still did: the fastest
    round counts, and of three rounds two run in the forward order). ``--timing shuffled`` draws a fresh
    random rank order every round. Timed one after another (``--timing sequential``, how sessions up to s8
    timed), the
    chunk-0 and chunk-1 calls of one rank, which have the same mask and shapes, differed by up to 8%
    (``bench/results/2026-11-26-s8/call4``), and the maximum over ranks picks up such noise.
    """

    PREFILL_S = 2e-3  # GPU work queued ahead of each round: > the host's time to issue a round's first calls

    def __init__(
        self,
        device: torch.device,
        reps: int,
        rounds: int = 3,
        interleaved: bool = True,
        host_ahead: bool = True,
        shuffled: bool = False,
    ):
        self.device, self.reps, self.rounds, self.interleaved = device, reps, rounds, interleaved
        self._rng = random.Random(0) if shuffled else None
        self.host_ahead = host_ahead and device.type == "cuda"
        self._busy: tuple[torch.Tensor, int] | None = None

    def _prefill(self) -> None:
        """Queue about PREFILL_S of GPU work (4096² bf16 products; their count calibrated once)."""
        if self._busy is None:
            x = torch.randn(4096, 4096, device=self.device, dtype=torch.bfloat16)
            x @ x
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(10):
                x @ x
            b.record()
            b.synchronize()
            per = a.elapsed_time(b) / 1e3 / 10
            self._busy = (x, max(1, round(self.PREFILL_S / per)))
        x, n = self._busy
        for _ in range(n):
            x @ x

    def _round(self, fn) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self.host_ahead:
                self._prefill()
            a.record()
            for _ in range(self.reps):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3 / self.reps
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def __call__(self, fn) -> float:
        return self.many([fn])[0]

    def many(self, fns: list) -> list[float]:
        if not self.interleaved and len(fns) > 1:
            return [self.many([f])[0] for f in fns]
        for f in fns:
            f()
        if self.device.type == "cuda":
            best = [float("inf")] * len(fns)
            for k in range(self.rounds):
                # every other round in reverse, so no rank is always timed first or last within a round
                # (shuffled: a fresh random order every round)
                order = range(len(fns)) if k % 2 == 0 else range(len(fns) - 1, -1, -1)
                if self._rng is not None:
                    order = self._rng.sample(range(len(fns)), len(fns))
                for i in order:
                    best[i] = min(best[i], self._round(fns[i]))
            return best
        ts = [[] for _ in fns]
        for _ in range(self.reps):
            for i, f in enumerate(fns):
                ts[i].append(self._round(f))
        return [statistics.median(t) for t in ts]


def _bracketed(row: dict, which: str) -> str:
    """`` (bracketed 0.88)`` when the row has an efficiency against its bracketing baselines."""
    e = row.get(f"eff_{which}_bracketed")
    return "" if e is None else f" (bracketed {e:.2f})"


def layout(balance: str, doc: torch.Tensor, N: int, bs: int, cost: bal.CostModel) -> torch.Tensor:
    S = doc.shape[1]
    if balance == "contiguous":
        return bal.contiguous_perm(S, N)
    if balance == "zigzag":
        return bal.zigzag_perm(S, N)
    G = bal.global_block_work(doc.cpu(), bs, True, None, cost.partial_weight)
    assign, _ = bal.plan_document(G, N, cost)
    return bal.blocks_to_perm(assign, N, bs)


def visible_pairs(doc: torch.Tensor) -> int:
    """Unmasked (q, kv) pairs of the document-causal mask: sum over tokens of (position in document + 1)."""
    pos = bal.positions_in_document(doc.cpu())
    return int(((pos + 1) * (doc.cpu() >= 0)).sum())


def parse_chunks(spec: str) -> int | tuple[int, ...]:
    """``--head-chunks`` entry: "2" (two near-equal chunks) or "3,5" (K/V heads per chunk)."""
    parts = [int(x) for x in spec.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def replay_forward(
    C: list[list[float]],
    G: list[float],
    pack: float,
    pack_rest: float = 0.0,
    local: list[float] | None = None,
) -> float:
    """Makespan of the pipelined all-gather forward from per-chunk, per-rank kernel times ``C[c][r]``.

    As ``flexdist.cp.allgather`` issues it: every rank packs chunk 0 (``pack``) and posts its gather, packs the
    other chunks (``pack_rest``, beside that gather); at chunk c it waits for gather c, posts gather c+1 and
    launches chunk c's kernel. NCCL runs the collectives in post order on its own stream, each once every
    rank's compute enqueued before its post (chunk c-1's kernel) is done: what bounds the gathered buffers
    to two chunks. ``local[r]``: rank r's own-shard call (``local_first``), issued after the packs, before
    the first wait: gather 0 runs beside it, gather 1 only after it.
    """
    N = len(C[0])
    done = [pack + G[0]]
    prev = [pack + pack_rest + (local[r] if local else 0.0) for r in range(N)]
    for c in range(len(G)):
        start = [max(prev[r], done[c]) for r in range(N)]
        if c + 1 < len(G):
            done.append(max(done[c], max(prev)) + G[c + 1])
        prev = [start[r] + C[c][r] for r in range(N)]
    return max(prev)


def replay_backward(
    K: list[list[float]],
    Q: list[list[float]],
    G: list[float],
    R: list[float],
    pack: float,
    unpack: float,
    pack_rest: float = 0.0,
) -> float:
    """Makespan of the pipelined backward: per chunk wait gather c, post gather c+1, dK/dV kernel (fp32 into
    the reduce-scatter buffer), post reduce-scatter c, dQ kernel; at the end wait for every reduce-scatter and
    unpack. NCCL order G0, G1, RS0, G2, RS1, ..., each after the compute enqueued before its post."""
    N = len(K[0])
    nccl = pack + G[0]
    done = [nccl]
    prev = [pack + pack_rest] * N
    for c in range(len(G)):
        start = [max(prev[r], done[c]) for r in range(N)]
        if c + 1 < len(G):
            nccl = max(nccl, max(prev)) + G[c + 1]
            done.append(nccl)
        kend = [start[r] + K[c][r] for r in range(N)]
        nccl = max(nccl, max(kend)) + R[c]
        prev = [kend[r] + Q[c][r] for r in range(N)]
    return max(max(prev), nccl) + unpack


def _chunk_shapes(spec: str, qs, ks, vs) -> tuple:
    """(N, L, D, Dv, GQA group, device, K/V heads per chunk) of the per-rank shards and a chunk spec."""
    from flexdist.cp.plan import chunk_sizes

    _, Hq, L, D = qs[0].shape
    Hkv, Dv = ks[0].shape[1], vs[0].shape[-1]
    return len(qs), L, D, Dv, Hq // Hkv, ks[0].device, chunk_sizes(parse_chunks(spec), Hkv)


def allgather_pipeline(
    spec: str,
    perm,
    shards,
    masks,
    ks,
    vs,
    qs,
    douts,
    outs,
    lses,
    deltas,
    kb,
    gqa,
    hg,
    fwd_hg,
    tm,
    link,
    dq_hg: int | None = None,
) -> tuple[float, float, dict]:
    """(forward s, backward s, JSON extras) of ``strategy="allgather", head_chunks=spec`` at N = len(shards).

    Every rank's kernel calls run and are timed as `flexdist.cp.allgather` makes them: the chunk's query heads
    against the whole sequence's K/V of its heads (token-major strided views in plan order), outputs into
    head slices, fp32 dK/dV written into the reduce-scatter layout. Transfers cost bytes / link: the gather
    moves (N-1) shards' K/V of the chunk, the reduce-scatter (N-1) shards' fp32 dK/dV. The pipeline is then
    replayed as issued (`replay_forward`, `replay_backward`). Forward calls launch all their heads in one
    group as the strategy does (``fwd_hg`` overrides), backward calls use ``hg`` (default: the kernels' rule),
    the dQ calls ``dq_hg`` where given (``0``: every head of the call in one group).
    ``masks[r]``: rank r's queries against every key in plan order; ``ks`` / ``vs``: every rank's shard.
    """
    from flexdist.cp import kv_pack
    from flexdist.cp.allgather import _seq_view

    N, L, D, Dv, g, dev, sizes = _chunk_shapes(spec, qs, ks, vs)
    perm_dev = perm.to(dev)
    elem = ks[0].element_size()
    C, K, Q, G, R = [], [], [], [], []
    h0 = 0
    for hc in sizes:
        h1, q0, q1 = h0 + hc, h0 * g, (h0 + hc) * g
        # the gathered buffer of this chunk, as every rank would hold it: [N, B, L, hc, D+Dv] in plan order
        buf = torch.stack([kv_pack.pack(ks[r], vs[r], h0, h1) for r in range(N)])
        kv = _seq_view(buf)
        kc, vc = kv[..., :D], kv[..., D:]
        grad = torch.empty(buf.shape, dtype=torch.float32, device=dev)
        gseq = _seq_view(grad)
        kw = dict(enable_gqa=gqa, kv_global_idx=perm_dev, backend=kb, **hg)
        ff, fk, fq = [], [], []
        for r in range(N):
            out_buf = torch.empty_like(outs[r])
            dq_buf = torch.empty_like(qs[r])
            a = (qs[r][:, q0:q1], kc, vc)
            b = (outs[r][:, q0:q1], douts[r][:, q0:q1], lses[r][:, q0:q1], masks[r])
            rkw = dict(kw, q_global_idx=shards[r])
            fkw = dict(rkw, head_group=fwd_hg or (q1 - q0))
            ff.append(
                lambda a=a, r=r, fkw=fkw, o=out_buf: flex_attention_forward(
                    *a, masks[r], out=o[:, q0:q1], **fkw
                )
            )
            bkw = dict(rkw, delta=deltas[r][:, q0:q1], accumulate=False)
            fk.append(
                lambda a=a, b=b, bkw=bkw: flex_attention_backward(
                    *a, *b, dk_out=gseq[..., :D], dv_out=gseq[..., D:], which="dkdv", **bkw
                )
            )
            qkw = bkw if dq_hg is None else dict(bkw, head_group=dq_hg or (q1 - q0))
            fq.append(
                lambda a=a, b=b, bkw=qkw, d=dq_buf: flex_attention_backward(
                    *a, *b, dq_out=d[:, q0:q1], which="dq", **bkw
                )
            )
        C.append(tm.many(ff))
        K.append(tm.many(fk))
        Q.append(tm.many(fq))
        G.append((N - 1) * L * hc * (D + Dv) * elem / link)
        R.append((N - 1) * L * hc * (D + Dv) * 4 / link)
        h0 = h1
    # the copies around the kernels, on one rank (every rank's are the same size): the library's (one Triton
    # copy each, `flexdist.cp.kv_pack`) and, for comparison, the torch copies it replaced (`*_torch`)
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    mine = [torch.empty(1, L, b - a, D + Dv, dtype=torch.float32, device=dev) for a, b in bounds]
    dk, dv = torch.empty_like(ks[0]), torch.empty_like(vs[0])

    def copies(pack_fn, unpack_fn) -> tuple[float, float, float]:
        pack = tm(lambda: pack_fn(ks[0], vs[0], *bounds[0]))
        rest = tm(lambda: [pack_fn(ks[0], vs[0], a, b) for a, b in bounds[1:]]) if len(bounds) > 1 else 0.0
        unpack = tm(lambda: [unpack_fn(m, dk, dv, a) for (a, _), m in zip(bounds, mine, strict=True)])
        return pack, rest, unpack

    pack, pack_rest, unpack = copies(kv_pack.pack, kv_pack.unpack)
    t_pack, t_rest, t_unpack = copies(kv_pack.pack_torch, kv_pack.unpack_torch)
    T_f = replay_forward(C, G, pack, pack_rest)
    T_b = replay_backward(K, Q, G, R, pack, unpack, pack_rest)
    ms = lambda xs: [round(x * 1e3, 4) for x in xs]
    extra = dict(
        head_chunks=sizes,
        chunk_fwd_ms=[ms(c) for c in C],
        chunk_dkdv_ms=[ms(c) for c in K],
        chunk_dq_ms=[ms(c) for c in Q],
        gather_ms=ms(G),
        reduce_scatter_ms=ms(R),
        pack_ms=round(pack * 1e3, 4),
        pack_rest_ms=round(pack_rest * 1e3, 4),
        fwd_head_group=fwd_hg or "heads of the call",
        dq_head_group="backward's" if dq_hg is None else (dq_hg or "heads of the call"),
        unpack_ms=round(unpack * 1e3, 4),
        kv_tokens_moved=N * (N - 1) * L,
        torch_copies=dict(
            pack_ms=round(t_pack * 1e3, 4),
            pack_rest_ms=round(t_rest * 1e3, 4),
            unpack_ms=round(t_unpack * 1e3, 4),
            pred_fwd_s=replay_forward(C, G, t_pack, t_rest),
            pred_bwd_s=replay_backward(K, Q, G, R, t_pack, t_unpack, t_rest),
        ),
    )
    return T_f, T_b, extra


def local_first_forward(
    spec: str,
    perm,
    shards,
    local_masks,
    remote_masks,
    ks,
    vs,
    qs,
    kb,
    gqa,
    tm,
    link,
    C_rest,
    pack,
    pack_rest,
    torch_packs: tuple[float, float] | None = None,
) -> tuple[float, dict]:
    """(forward s, JSON extras) of ``strategy="allgather", head_chunks=spec, local_first=True``: every rank's
    call of chunk 0's heads against its own shard (fp32 running result) and chunk 0's call over the other
    ranks' keys (``remote_masks[r]``: its all-gather mask without its own key blocks), merged in the epilogue
    and written in bf16, timed as `flexdist.cp.allgather` makes them; the later chunks' calls are the same as
    without local_first (``C_rest``, seconds per chunk and rank). Replayed with the own-shard call ahead of the
    first wait (`replay_forward`); ``torch_packs``: (pack, pack_rest) of the torch copies, replayed as well."""
    from flexdist.cp.allgather import _seq_view
    from flexdist.cp.kv_pack import pack as _pack

    N, L, D, Dv, g, dev, sizes = _chunk_shapes(spec, qs, ks, vs)
    h1 = sizes[0]
    n0 = h1 * g
    kw = dict(enable_gqa=gqa, backend=kb)
    buf = torch.stack([_pack(ks[r], vs[r], 0, h1) for r in range(N)])
    kv = _seq_view(buf)
    kc, vc = kv[..., :D], kv[..., D:]
    fl, fr = [], []  # per rank: the own-shard call, the call over the other ranks' keys (None: no call)
    for r in range(N):
        q0 = qs[r][:, :n0]
        o32 = torch.zeros(1, n0, L, Dv, dtype=torch.float32, device=dev)
        l32 = torch.full((1, n0, L), float("-inf"), device=dev)
        if local_masks[r] is not None:
            lkw = dict(kw, q_global_idx=shards[r], kv_global_idx=shards[r], head_group=n0, out=o32)
            lk, lv = ks[r][:, :h1], vs[r][:, :h1]
            _, l32 = flex_attention_forward(q0, lk, lv, local_masks[r], **lkw)
            fl.append(
                lambda q0=q0, lk=lk, lv=lv, m=local_masks[r], lkw=lkw: flex_attention_forward(
                    q0, lk, lv, m, **lkw
                )
            )
        else:  # nothing visible in the own shard: the running result starts empty
            fl.append(None)
        if remote_masks[r] is None:  # the code copies the running result: charged as nothing
            fr.append(None)
            continue
        out_buf = torch.empty(1, n0, L, Dv, dtype=qs[r].dtype, device=dev)
        rkw = dict(
            kw, q_global_idx=shards[r], kv_global_idx=perm.to(dev), head_group=n0, out=out_buf, out_acc=o32,
            lse_acc=l32,
        )  # fmt: skip
        fr.append(lambda q0=q0, m=remote_masks[r], rkw=rkw: flex_attention_forward(q0, kc, vc, m, **rkw))

    def timed(fns):
        t = iter(tm.many([f for f in fns if f is not None]))
        return [0.0 if f is None else next(t) for f in fns]

    local, remote = timed(fl), timed(fr)
    elem = ks[0].element_size()
    G = [(N - 1) * L * hc * (D + Dv) * elem / link for hc in sizes]
    T_f = replay_forward([remote, *C_rest], G, pack, pack_rest, local)
    ms = lambda xs: [round(x * 1e3, 4) for x in xs]
    extra = dict(
        head_chunks=sizes,
        local_first=True,
        local_fwd_ms=ms(local),
        chunk_fwd_ms=[ms(remote)] + [ms(c) for c in C_rest],
        gather_ms=ms(G),
        pack_ms=round(pack * 1e3, 4),
        pack_rest_ms=round(pack_rest * 1e3, 4),
    )
    if torch_packs is not None:
        extra["torch_copies"] = dict(pred_fwd_s=replay_forward([remote, *C_rest], G, *torch_packs, local))
    return T_f, extra


def _dq_group(value: str) -> int | None:
    """``--dq-head-groups`` value → ``allgather_pipeline``'s ``dq_hg``: "rule" None, "all" 0, else the int."""
    return None if value == "rule" else 0 if value == "all" else int(value)


def _dq_suffix(value: str) -> str:
    return "" if value == "rule" else f"/dq{value}"


def simulate(args, N: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    L, Hq, Hkv, D, bs = args.tokens_per_rank, args.hq, args.hkv, args.d, args.block_size
    # the per-rank calls' launch grouping of heads (None: the kernels' rule; "all": every head of a call in one
    # group, i.e. Hq, which covers the dK/dV kernel's Hkv too)
    hg = (
        {}
        if args.head_group is None
        else {"head_group": Hq if args.head_group == "all" else int(args.head_group)}
    )
    S = N * L
    doc = make_pack(S, args.mean_doc, args.dist, args.seed).to(device)
    pairs = visible_pairs(doc)
    fwd_flops = 4.0 * Hq * D * pairs
    bwd_flops = 2.5 * fwd_flops
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, Hq, S, D, generator=g).to(device, dtype)
    k = torch.randn(1, Hkv, S, D, generator=g).to(device, dtype)
    v = torch.randn(1, Hkv, S, D, generator=g).to(device, dtype)
    dout = torch.randn(1, Hq, S, D, generator=g).to(device, dtype)
    kb = args.backend
    tm = timer(
        device,
        args.reps,
        rounds=args.rounds,
        interleaved=args.timing != "sequential",
        host_ahead=not args.host_gaps,
        shuffled=args.timing == "shuffled",
    )
    gqa = Hq != Hkv
    kv_bytes = 2 * Hkv * L * D * torch.finfo(dtype).bits // 8
    dkv_bytes = 2 * Hkv * L * D * 4
    link = args.link_gbs * 1e9

    # single-GPU baseline: the same kernel on the full sequence
    ((full_mask, _, _),) = build_pair_masks(
        doc, torch.arange(S), [torch.arange(S)], causal=True, window=None, block_size=bs
    )
    out_full, lse_full = flex_attention_forward(q, k, v, full_mask, enable_gqa=gqa, backend=kb)

    def baseline(grouped: bool = True) -> tuple[tuple[float, float], tuple[float, float]]:
        """The one-GPU forward / backward times measured now: ``(kernels' rule, as the efficiencies take
        it)``, the second the faster of the rule and the ranks' grouping when the forward's is fixed
        (``grouped=False``: the rule only, returned twice)."""

        def fwd(**g):
            return tm(lambda: flex_attention_forward(q, k, v, full_mask, enable_gqa=gqa, backend=kb, **g))

        def bwd(**g):
            return tm(
                lambda: flex_attention_backward(
                    q, k, v, out_full, dout, lse_full, full_mask, enable_gqa=gqa, backend=kb, **g
                )
            )

        rule = (fwd(), bwd())
        if not (hg and grouped):
            return rule, rule
        return rule, (min(rule[0], fwd(**hg)), min(rule[1], bwd(**hg)))

    if device.type == "cuda" and args.warmup_s > 0:
        # bring the GPU to the clocks it holds under sustained load before anything is timed: measured cold,
        # the one-GPU baseline ran 4-6% faster than right after the CP rows (s14 call 7: 16.12 vs 17.09 ms),
        # and the first measurement favours the one GPU by that much
        t_end = time.perf_counter() + args.warmup_s
        while time.perf_counter() < t_end:
            flex_attention_forward(q, k, v, full_mask, enable_gqa=gqa, backend=kb)
            flex_attention_backward(q, k, v, out_full, dout, lse_full, full_mask, enable_gqa=gqa, backend=kb)
            torch.cuda.synchronize()
    single_rule, (t1_fwd, t1_bwd) = baseline()

    # The baseline measured last (before the next row's calls): each row's bracket is that and the baseline
    # measured right after the row. The GPU slows by 1-2% over a run as it warms (s10 call 4: 19.25 ms at the
    # start, 19.70 after the CP rows), so the first measurement alone favours the one GPU.
    last_base = [(t1_fwd, t1_bwd)]
    rows = []
    base = dict(
        N=N,
        S=S,
        tokens_per_rank=L,
        Hq=Hq,
        Hkv=Hkv,
        D=D,
        block_size=bs,
        dtype=str(dtype),
        dist=args.dist,
        mean_doc=args.mean_doc,
        visible_pairs=pairs,
        single_fwd_s=t1_fwd,
        single_bwd_s=t1_bwd,
        single_fwd_tflops=fwd_flops / t1_fwd / 1e12,
        single_bwd_tflops=bwd_flops / t1_bwd / 1e12,
        single_rule_fwd_s=single_rule[0],
        single_rule_bwd_s=single_rule[1],
    )
    print(
        f"N={N} S={S}: single-GPU fwd {t1_fwd * 1e3:.2f} ms ({fwd_flops / t1_fwd / 1e12:.0f} TFLOP/s), "
        f"bwd {t1_bwd * 1e3:.2f} ms ({bwd_flops / t1_bwd / 1e12:.0f} TFLOP/s)",
        flush=True,
    )
    if args.torch_flex and device.type == "cuda":
        base.update(torch_flex_baseline(q, k, v, doc, bs, tm, fwd_flops, bwd_flops))
    cost = bal.CostModel(comm_weight=(Hkv / Hq) * (args.tflops_model * 1e12 / link) / bs)
    balances = list(args.balances)
    if "document" in balances:  # the planner with a per-active-tile cost, as extra rows "document@tau<x>"
        balances += [f"document@tau{t:g}" for t in args.tile_overheads]
    for balance in balances:
        if balance == "zigzag" and S % (2 * N):
            continue
        if balance.startswith("document@tau"):
            cost_b = bal.CostModel(
                comm_weight=cost.comm_weight, tile_overhead=float(balance[len("document@tau") :])
            )
        elif balance == "document@gather":  # what plan(strategy="allgather") plans: per-rank totals
            cost_b = bal.CostModel(
                comm_weight=cost.comm_weight, gather=True, partial_weight=bal.ALLGATHER_PARTIAL_WEIGHT
            )
        else:
            cost_b = cost
        n_before = len(rows)
        perm = layout(balance.split("@")[0], doc, N, bs, cost_b)
        shards = [perm[r * L : (r + 1) * L].to(device) for r in range(N)]
        masks = [
            [
                m
                for m, _, _ in build_pair_masks(
                    doc, shards[r], shards, causal=True, window=None, block_size=bs
                )
            ]
            for r in range(N)
        ]
        lo, hi = bal.visible_intervals(doc.cpu(), True, None)
        W, _ = _pair_work_tokens(perm, N, lo, hi, bs, 1.0)  # exact; as plan(): skip where W == 0
        masks = [[None if W[r, j] == 0 else m for j, m in enumerate(masks[r])] for r in range(N)]
        t_last = bal.last_needed_step(W)
        qs = [q[:, :, s] for s in shards]
        ks = [k[:, :, s] for s in shards]
        vs = [v[:, :, s] for s in shards]
        douts = [dout[:, :, s] for s in shards]
        outs = [out_full[:, :, s] for s in shards]
        lses = [lse_full[:, :, s] for s in shards]
        deltas = [(douts[r].float() * outs[r].float()).sum(-1) for r in range(N)]
        tok_bytes = kv_bytes / L
        dtok_bytes = dkv_bytes / L

        step_detail: list = []  # per step: every non-empty rank's kernel times (JSON, for explaining the max)

        def run_steps(pair, comm_fwd, comm_bwd):
            step_detail.clear()
            """Per-step max over ranks of kernel (+ merge) time; transfers overlap the previous step."""
            fwd_steps, bwd_steps = [], []
            for t in range(N):
                cf, cb = [0.0], [0.0]
                fs, bs_ = [], []  # this step's calls of every rank, timed together (`timer.many`)
                for r in range(N):
                    j = (r - t) % N
                    m, kj, vj, kv_idx = pair(r, j)
                    if m is None:
                        continue
                    kw = dict(enable_gqa=gqa, q_global_idx=shards[r], kv_global_idx=kv_idx, backend=kb, **hg)
                    # as flexdist.cp.ring: the kernel merges into the running fp32 (out, lse) in place,
                    # and the backward adds into dq and the travelling fp32 dK/dV buffers
                    acc_o = outs[r].float().contiguous()
                    acc_l = lses[r].clone()
                    dq_b = torch.zeros(qs[r].shape, device=device)
                    dk_b = torch.zeros(kj.shape, device=device)
                    dv_b = torch.zeros(vj.shape, device=device)

                    def f(r=r, m=m, kj=kj, vj=vj, kw=kw, acc_o=acc_o, acc_l=acc_l):
                        flex_attention_forward(qs[r], kj, vj, m, out_acc=acc_o, lse_acc=acc_l, **kw)

                    def b(r=r, m=m, kj=kj, vj=vj, kw=kw, dq_b=dq_b, dk_b=dk_b, dv_b=dv_b):
                        a = (qs[r], kj, vj, outs[r], douts[r], lses[r], m)
                        flex_attention_backward(*a, delta=deltas[r], dq_out=dq_b, which="dq", **kw)
                        flex_attention_backward(
                            *a, delta=deltas[r], dk_out=dk_b, dv_out=dv_b, which="dkdv", **kw
                        )

                    fs.append(f)
                    bs_.append(b)
                cf += tm.many(fs)
                cb += tm.many(bs_)
                step_detail.append(
                    dict(
                        fwd_ms=[round(x * 1e3, 4) for x in cf[1:]], bwd_ms=[round(x * 1e3, 4) for x in cb[1:]]
                    )
                )
                fwd_steps.append(max(max(cf), comm_fwd(t)))
                bwd_steps.append(max(max(cb), comm_bwd(t)))
            return sum(fwd_steps), sum(bwd_steps)

        def add_row(strategy, T_f, T_b, **extra):
            row = dict(
                base,
                balance=balance,
                strategy=strategy,
                pred_fwd_s=T_f,
                pred_bwd_s=T_b,
                tflops_fwd=fwd_flops / N / T_f / 1e12,
                tflops_bwd=bwd_flops / N / T_b / 1e12,
                eff_fwd=t1_fwd / (N * T_f),
                eff_bwd=t1_bwd / (N * T_b),
                **extra,
            )
            if args.bracket_baseline:
                # against the mean of the baselines just before and just after this row's calls
                (f0, b0), (f1, b1) = last_base[0], baseline()[1]
                last_base[0] = (f1, b1)
                row.update(
                    single_fwd_bracket_s=[f0, f1],
                    single_bwd_bracket_s=[b0, b1],
                    eff_fwd_bracketed=(f0 + f1) / 2 / (N * T_f),
                    eff_bwd_bracketed=(b0 + b1) / 2 / (N * T_b),
                )
            tc = row.get("torch_copies")  # the same row with the torch K/V copies (allgather rows)
            if tc is not None:
                for w, t1 in (("fwd", t1_fwd), ("bwd", t1_bwd)):
                    tc[f"eff_{w}"] = t1 / (N * tc[f"pred_{w}_s"])
                    if "eff_fwd_bracketed" in row:
                        tc[f"eff_{w}_bracketed"] = (
                            sum(row[f"single_{w}_bracket_s"]) / 2 / (N * tc[f"pred_{w}_s"])
                        )
            rows.append(row)

        # ring: whole shards travel; a shard stops after its last consumer
        def ring_more(t):
            return t + 1 < N and bool((t_last >= t + 1).any())

        skipped = int(sum(m is None for r in range(N) for j, m in enumerate(masks[r]) if j != r))
        if "ring" in args.strategies:
            T_f, T_b = run_steps(
                lambda r, j: (masks[r][j], ks[j], vs[j], shards[j]),
                lambda t: kv_bytes / link if ring_more(t) else 0.0,
                # K/V for the next step plus this step's travelling dK/dV (fp32)
                lambda t: (
                    (kv_bytes / link if ring_more(t) else 0.0)
                    + (dkv_bytes / link if t > 0 or ring_more(t) else 0.0)
                ),
            )
            add_row(
                "ring",
                T_f,
                T_b,
                steps_skipped=skipped,
                kv_tokens_moved=int(sum(ring_more(t) for t in range(N))) * N * L,
                steps=list(step_detail),
            )
        # ring with g steps per kernel call (a design study, not a flexdist strategy yet): each rank runs one
        # call per group of g ring steps over the concatenated K/V of the group's shards that it has work with;
        # the group's g hops overlap the previous group's call. Forward and dQ as the ring would; dK/dV of the
        # group in one call too (an upper bound: the ring's travelling dK/dV would need per-shard calls or
        # home-sent partials).
        for g in args.ring_groups:
            gf, gb = [], []
            for p0 in range(0, N, g):
                cf, cb = [0.0], [0.0]
                for r in range(N):
                    js = [(r - t) % N for t in range(p0, min(p0 + g, N)) if masks[r][(r - t) % N] is not None]
                    if not js:
                        continue
                    kv_idx = torch.cat([shards[j] for j in js])
                    ((m, _, _),) = build_pair_masks(
                        doc, shards[r], [kv_idx], causal=True, window=None, block_size=bs
                    )
                    if m is None:
                        continue
                    kj = torch.cat([ks[j] for j in js], dim=2)
                    vj = torch.cat([vs[j] for j in js], dim=2)
                    kw = dict(enable_gqa=gqa, q_global_idx=shards[r], kv_global_idx=kv_idx, backend=kb, **hg)
                    acc_o, acc_l = outs[r].float().contiguous(), lses[r].clone()
                    dq_b = torch.zeros(qs[r].shape, device=device)
                    dk_b, dv_b = torch.zeros(kj.shape, device=device), torch.zeros(vj.shape, device=device)
                    cf.append(
                        tm(
                            lambda r=r, m=m, kj=kj, vj=vj, kw=kw, o=acc_o, l=acc_l: flex_attention_forward(
                                qs[r], kj, vj, m, out_acc=o, lse_acc=l, **kw
                            )
                        )
                    )

                    def gbwd(r=r, m=m, kj=kj, vj=vj, kw=kw, dq_b=dq_b, dk_b=dk_b, dv_b=dv_b):
                        a = (qs[r], kj, vj, outs[r], douts[r], lses[r], m)
                        flex_attention_backward(*a, delta=deltas[r], dq_out=dq_b, which="dq", **kw)
                        flex_attention_backward(
                            *a, delta=deltas[r], dk_out=dk_b, dv_out=dv_b, which="dkdv", **kw
                        )

                    cb.append(tm(gbwd))
                hops = min(g, N - p0 - g) if p0 + g < N else 0  # the next group's hops overlap this call
                gf.append(max(max(cf), hops * kv_bytes / link))
                gb.append(max(max(cb), hops * (kv_bytes + dkv_bytes) / link))
            add_row(
                f"ring/g{g}",
                sum(gf),
                sum(gb),
                group=g,
                note=(
                    "upper bound of g ring steps per kernel call: the group's hops all overlap the previous "
                    "call (the first group's hops are not charged) and dK/dV run once per group; flexdist's "
                    "ring_group exposes g-1 of each group's g hops and runs dK/dV per step"
                ),
            )

        # direct: only the needed K/V blocks, shift-by-t exchange, dK/dV straight home
        if "direct" in args.strategies:
            cpu_shards = [perm[r * L : (r + 1) * L] for r in range(N)]
            need = [[None] * N for _ in range(N)]
            dpair = [[(None, None, None, None)] * N for _ in range(N)]
            for r in range(N):
                for j in range(N):
                    if masks[r][j] is None:
                        continue
                    if j == r:
                        dpair[r][j] = (masks[r][j], ks[j], vs[j], shards[j])
                        continue
                    tok = _needed_tokens(lo, hi, cpu_shards[r], cpu_shards[j], bs)
                    need[r][j] = 0 if tok is None else tok.numel()
                    tok = tok.to(device)
                    kvi = shards[j][tok]
                    ((m, _, _),) = build_pair_masks(
                        doc, shards[r], [kvi], causal=True, window=None, block_size=bs
                    )
                    dpair[r][j] = (m, ks[j][:, :, tok], vs[j][:, :, tok], kvi)

            def need_max(t):
                return max((need[r][(r - t) % N] or 0) for r in range(N)) if 0 < t < N else 0

            T_f, T_b = run_steps(
                lambda r, j: dpair[r][j],
                lambda t: need_max(t + 1) * tok_bytes / link,
                lambda t: need_max(t + 1) * tok_bytes / link + need_max(t) * dtok_bytes / link,
            )
            moved = sum(x or 0 for row in need for x in row)
            add_row("direct", T_f, T_b, steps_skipped=skipped, kv_tokens_moved=moved, steps=list(step_detail))
        # allgather as flexdist.cp.allgather runs it: keys in plan order, per chunk of K/V heads one call per
        # rank; the pipeline (gathers, reduce-scatters, kernels) replayed on the measured kernel times
        if "allgather" in args.strategies:
            perm_dev = perm.to(device)
            ag_masks = [  # built once, shared by every chunking
                build_pair_masks(doc, shards[r], [perm_dev], causal=True, window=None, block_size=bs)[0][0]
                for r in range(N)
            ]
            dq0, lead0 = args.dq_head_groups[0], args.lead_fractions[0]

            def backward_variant(bspec: str, dqg: str, lead: float = lead0) -> tuple:
                """(forward s, backward s, extras) of chunking ``bspec`` with dQ head group ``dqg``, the
                backward kernels' lead blocks sized for ``lead`` of the SMs (`triton_fwd.launch_lead`)."""
                from flexdist.kernels import triton_fwd

                saved = triton_fwd.LEAD_SM_FRACTION
                triton_fwd.LEAD_SM_FRACTION = lead
                try:
                    return allgather_pipeline(
                        bspec, perm, shards, ag_masks, ks, vs, qs, douts, outs, lses, deltas, kb, gqa, hg,
                        args.fwd_head_group, tm, link, dq_hg=_dq_group(dqg),
                    )  # fmt: skip
                finally:
                    triton_fwd.LEAD_SM_FRACTION = saved

            for spec in args.head_chunks:
                T_f, T_b, extra = backward_variant(spec, dq0)
                name = "allgather" if spec == "1" else f"allgather/hc{spec}"
                add_row(name + _dq_suffix(dq0), T_f, T_b, **extra)
                fname, T_fwd = name + _dq_suffix(dq0), T_f
                if args.local_first:
                    from flexdist.cp.plan import drop_key_blocks

                    nb = L // bs
                    remote = [drop_key_blocks(ag_masks[r], r * nb, (r + 1) * nb) for r in range(N)]
                    C_rest = [[t / 1e3 for t in c] for c in extra["chunk_fwd_ms"][1:]]
                    T_lf, extra_lf = local_first_forward(
                        spec, perm, shards, [masks[r][r] for r in range(N)], remote, ks, vs, qs, kb, gqa,
                        tm, link, C_rest,
                        extra["pack_ms"] / 1e3, extra["pack_rest_ms"] / 1e3,
                        (extra["torch_copies"]["pack_ms"] / 1e3, extra["torch_copies"]["pack_rest_ms"] / 1e3),
                    )  # fmt: skip
                    # the backward is the same as without local_first (it runs the whole mask per chunk)
                    extra_lf["torch_copies"]["pred_bwd_s"] = extra["torch_copies"]["pred_bwd_s"]
                    fname, T_fwd = f"{name}+lf", T_lf
                    add_row(fname, T_lf, T_b, backward_of=name, **extra_lf)
                # this forward (with local_first where asked) with the other backwards: each chunking of
                # --bwd-head-chunks (plan(bwd_head_chunks=...)) and each further --dq-head-groups value
                others = [
                    (b, d, f)
                    for b in [spec, *(b for b in args.bwd_head_chunks if b != spec)]
                    for d in args.dq_head_groups
                    for f in args.lead_fractions
                    if (b, d, f) != (spec, dq0, lead0)
                ]
                for bspec, dqg, lead in others:
                    _, T_b2, extra2 = backward_variant(bspec, dqg, lead)
                    keep = {
                        k: v for k, v in extra2.items() if k.startswith(("chunk_dkdv", "chunk_dq", "dq_"))
                    }
                    suffix = _dq_suffix(dqg) + ("" if lead == lead0 else f"/lead{lead:g}")
                    add_row(
                        f"{fname}/b{bspec}{suffix}", T_fwd, T_b2, forward_of=fname, lead_sm_fraction=lead,
                        bwd_head_chunks=extra2["head_chunks"], gather_ms=extra2["gather_ms"],
                        reduce_scatter_ms=extra2["reduce_scatter_ms"], **keep,
                    )  # fmt: skip
        for rr in rows[n_before:]:
            print(
                f"  {balance:11} {rr['strategy']:15} fwd {rr['pred_fwd_s'] * 1e3:8.2f} ms {rr['tflops_fwd']:6.0f} TFLOP/s "
                f"eff {rr['eff_fwd']:.2f}{_bracketed(rr, 'fwd')} | bwd {rr['pred_bwd_s'] * 1e3:8.2f} ms "
                f"{rr['tflops_bwd']:6.0f} TFLOP/s eff {rr['eff_bwd']:.2f}{_bracketed(rr, 'bwd')}",
                flush=True,
            )
            tc = rr.get("torch_copies")
            if tc is not None:
                print(
                    f"  {'':11} {'  torch copies':15} fwd {tc['pred_fwd_s'] * 1e3:8.2f} ms eff {tc['eff_fwd']:.2f}"
                    f"{_bracketed(tc, 'fwd')} | bwd {tc['pred_bwd_s'] * 1e3:8.2f} ms eff {tc['eff_bwd']:.2f}"
                    f"{_bracketed(tc, 'bwd')}  (packs {tc.get('pack_ms', '-')} + {tc.get('pack_rest_ms', '-')} ms, "
                    f"unpack {tc.get('unpack_ms', '-')}; kernel: {rr.get('pack_ms')} + {rr.get('pack_rest_ms')}, "
                    f"{rr.get('unpack_ms', '-')})",
                    flush=True,
                )
        # ulysses: every rank runs the whole sequence for Hq/N heads (same mask), plus four exposed
        # all-to-alls (q, k, v, out; backward: dout, dq, dk, dv)
        if "ulysses" in args.strategies and Hq % N == 0 and Hkv % N == 0 and balance == args.balances[0]:
            hq, hk = Hq // N, Hkv // N
            qh, kh, vh, dh = q[:, :hq], k[:, :hk], v[:, :hk], dout[:, :hq]
            oh, lh = out_full[:, :hq], lse_full[:, :hq]
            dlt = (dh.float() * oh.float()).sum(-1)
            u_f = tm(lambda: flex_attention_forward(qh, kh, vh, full_mask, enable_gqa=gqa, backend=kb))
            u_b = tm(
                lambda: flex_attention_backward(
                    qh, kh, vh, oh, dh, lh, full_mask, enable_gqa=gqa, delta=dlt, backend=kb
                )
            )
            elem = torch.finfo(dtype).bits // 8
            a2a = (2 * Hq + 2 * Hkv) * L * D * elem * (N - 1) / N / link
            add_row(
                "ulysses", u_f + a2a, u_b + a2a, note="layout-independent; a2a bytes (2Hq+2Hkv)·L·D·(N-1)/N"
            )
            for rr in rows[-1:]:
                print(
                    f"  {'(any)':11} {rr['strategy']:15} fwd {rr['pred_fwd_s'] * 1e3:8.2f} ms {rr['tflops_fwd']:6.0f} TFLOP/s "
                    f"eff {rr['eff_fwd']:.2f} | bwd {rr['pred_bwd_s'] * 1e3:8.2f} ms {rr['tflops_bwd']:6.0f} TFLOP/s "
                    f"eff {rr['eff_bwd']:.2f}",
                    flush=True,
                )
    if device.type == "cuda":
        # The one-GPU baseline again, after every rank's calls: a GPU that clocks down as it warms would make
        # the efficiencies (taken against the first measurement) pessimistic. Recorded, not used.
        a_f, a_b = baseline(grouped=False)[0]
        for rr in rows:
            rr["single_rule_fwd_after_s"], rr["single_rule_bwd_after_s"] = a_f, a_b
        print(
            f"N={N}: one-GPU baseline after the CP rows: fwd {a_f * 1e3:.2f} ms ({a_f / single_rule[0] - 1:+.1%}), "
            f"bwd {a_b * 1e3:.2f} ms ({a_b / single_rule[1] - 1:+.1%})",
            flush=True,
        )
    return rows


def torch_flex_baseline(q, k, v, doc, bs, tm, fwd_flops, bwd_flops) -> dict:
    """torch's compiled flex_attention on the full sequence with the same document mask (single GPU)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention

        from flexdist.masks import document_block_mask

        bm = document_block_mask(doc, causal=True, block_size=bs)
        fa = torch.compile(flex_attention, dynamic=False)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        t_f = tm(lambda: fa(qq, kk, vv, block_mask=bm, enable_gqa=True))
        o = fa(qq, kk, vv, block_mask=bm, enable_gqa=True)
        g = torch.randn_like(o)
        t_b = tm(lambda: torch.autograd.grad(o, (qq, kk, vv), g, retain_graph=True))  # backward alone
        return dict(
            torch_flex_fwd_s=t_f,
            torch_flex_bwd_s=t_b,
            torch_flex_fwd_tflops=fwd_flops / t_f / 1e12,
            torch_flex_bwd_tflops=bwd_flops / t_b / 1e12,
        )
    except Exception as e:  # report, do not hide: the row says why the baseline is missing
        return dict(torch_flex_error=f"{type(e).__name__}: {e}"[:300])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU + dense reference at tiny sizes (smoke test)")
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens-per-rank", type=int, default=8192)
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--mean-doc", type=int, default=4096)
    ap.add_argument("--dist", default="mixture", choices=["exp", "mixture"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--link-gbs", type=float, default=450.0, help="per-direction link bandwidth (NVLink H100: 450)"
    )
    ap.add_argument(
        "--tflops-model", type=float, default=400.0, help="kernel speed the planner's cost model assumes"
    )
    ap.add_argument(
        "--tile-overheads",
        type=float,
        nargs="*",
        default=[],
        help="also plan 'document' with these CostModel.tile_overhead values (rows document@tau<x>)",
    )
    ap.add_argument(
        "--ring-groups",
        type=int,
        nargs="*",
        default=[],
        help="also time a ring with g steps per kernel call for these g (design study rows ring/g<g>)",
    )
    ap.add_argument(
        "--head-group",
        default=None,
        help="launch heads in groups of this size in every rank's kernel calls, or 'all' (every head of a call "
        "in one group; default: the kernels' rule); the one-GPU baseline is the faster of the rule and this",
    )
    ap.add_argument(
        "--fwd-head-group",
        type=int,
        default=None,
        help="allgather rows: the forward calls' head group (default: every head of the call, as flexdist.cp "
        "does)",
    )
    ap.add_argument(
        "--head-chunks",
        nargs="+",
        default=["1"],
        help="allgather rows for these plan head_chunks: '1' (unpipelined), '2' (two chunks), '3,5' (K/V heads "
        "per chunk)",
    )
    ap.add_argument(
        "--bwd-head-chunks",
        nargs="*",
        default=[],
        help="allgather rows whose backward is pipelined over these chunks instead of the forward's "
        "(plan(bwd_head_chunks=...)), e.g. '1,7': rows '<forward>/b1,7'",
    )
    ap.add_argument(
        "--dq-head-groups",
        nargs="+",
        default=["rule"],
        help="allgather rows: the dQ calls' head group: 'rule' (the backward's, default), 'all' (every head of "
        "the call) or an int; more than one value: rows for each (suffix '/dq<value>')",
    )
    ap.add_argument(
        "--lead-fractions",
        type=float,
        nargs="+",
        default=[0.5],
        help="allgather rows: the backward kernels' lead blocks sized for this share of the SMs "
        "(kernels.triton_fwd.LEAD_SM_FRACTION; 0: none); the first value is the main rows', every further one "
        "adds rows '/lead<value>' (the one-GPU baseline keeps the first)",
    )
    ap.add_argument(
        "--local-first",
        action="store_true",
        help="allgather rows also with plan(local_first=True) (rows '+lf': the own shard's call during the first "
        "gather; the backward is the same as without)",
    )
    ap.add_argument(
        "--bracket-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the one-GPU baseline again after every row and also report each row's efficiency against "
        "the mean of the baselines before and after it (eff_*_bracketed; the GPU slows as a run goes on)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--warmup-s",
        type=float,
        default=20.0,
        help="seconds of one-GPU forward + backward before the first timing (GPU only; 0: none, as up to s14)",
    )
    ap.add_argument(
        "--timing",
        choices=["interleaved", "shuffled", "sequential"],
        default="interleaved",
        help="time the ranks' calls round by round across ranks (default; every other round in reverse), the "
        "same with a fresh random rank order every round (shuffled), or each rank's rounds in a row (how sessions "
        "up to s8 timed them); see `timer`",
    )
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per call (the fastest counts)")
    ap.add_argument(
        "--host-gaps",
        action="store_true",
        help="start each timed round on an idle GPU (how sessions up to s10 timed): the host's time to issue "
        "the first call counts; by default ~2 ms of queued GPU work ahead of each round hides it (see `timer`)",
    )
    ap.add_argument("--backend", default="auto", help="flexdist.kernels backend")
    ap.add_argument(
        "--balances",
        nargs="+",
        default=["contiguous", "zigzag", "document"],
        help="also 'document@gather': the planner's all-gather objective (what plan(strategy='allgather') "
        "uses: the largest per-rank total, partial blocks weighted balance.ALLGATHER_PARTIAL_WEIGHT)",
    )
    ap.add_argument("--strategies", nargs="+", default=["ring", "direct", "allgather", "ulysses"])
    ap.add_argument("--no-torch-flex", dest="torch_flex", action="store_false")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        args.tokens_per_rank, args.hq, args.hkv, args.d, args.block_size = 128, 4, 2, 16, 32
        args.mean_doc, args.ns, args.reps, args.backend = 96, [2, 4], 1, "reference"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_cp_sim needs a CUDA GPU (use --quick for a CPU smoke run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for N in args.ns:
        rows.extend(simulate(args, N, device, dtype))
    print(
        f"\n{'N':>3} {'balance':11} {'strategy':15} {'fwd TF/s':>9} {'bwd TF/s':>9} {'eff fwd':>8} {'eff bwd':>8} "
        f"{'bracketed':>10} {'skipped':>8}"
    )
    for r in rows:
        br = f"{r['eff_fwd_bracketed']:.2f}/{r['eff_bwd_bracketed']:.2f}" if "eff_fwd_bracketed" in r else "-"
        print(
            f"{r['N']:>3} {r['balance']:11} {r['strategy']:15} {r['tflops_fwd']:>9.1f} {r['tflops_bwd']:>9.1f} "
            f"{r['eff_fwd']:>8.2f} {r['eff_bwd']:>8.2f} {br:>10} {r.get('steps_skipped', '-')!s:>8}"
        )
    if args.out:
        import triton

        meta = dict(
            benchmark="bench_cp_sim",
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            triton=triton.__version__,
            python=platform.python_version(),
            args=vars(args),
            anchor="MagiAttention H100 8 GPUs doc-causal: ~459 fwd / ~360 bwd TFLOP/s",
            timing="per call: one warm-up, then the fastest of 3 rounds of --reps calls back to back (CUDA events), "
            + (
                "each round on an idle GPU (host gaps counted); "
                if args.host_gaps
                else "each round behind ~2 ms of queued GPU work (host ahead: GPU time); "
            )
            + f"{args.timing}: the ranks of one step or chunk timed round by round together (interleaved) or one "
            "after another (sequential)",
        )
        if (
            device.type == "cuda"
        ):  # the tile the autotuner picked per shape key (the rank calls have their own)
            from flexdist.kernels.triton_fwd import tuned_choices

            meta["tuned"] = tuned_choices()
            print("autotuner picks (fwd):", json.dumps(meta["tuned"].get("fwd", {})))
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
