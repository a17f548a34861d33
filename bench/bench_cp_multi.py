"""Real multi-GPU CP attention benchmark (run under torchrun): per-GPU TFLOP/s and CP efficiency, side by side
with torch's own context parallelism for FlexAttention on the same masks.

For each tokens-per-GPU size and mask (document-causal: long-tailed mixture of document lengths; plain
causal), MagiAttention-style GQA 64:8, head dim 128, bf16, it times (forward, and backward alone on a retained
graph; median of ``--reps``, max over ranks):

- flexdist: ``flexdist.cp.attention`` for each balance (contiguous, zigzag, document) and strategy (ring,
  direct, allgather, ulysses); CP efficiency against flexdist's kernel on the whole sequence on one GPU;
- torch CP FlexAttention (``bench/torch_cp_flex.py``, torch's all-gather CP through its private API, compiled
  ``flex_attention`` with dynamic=False, mask from the same doc ids through ``create_block_mask``) for each of
  torch's load balancers (``--torch-cp-balancers``: head-tail, PTRR); CP efficiency against torch's compiled
  flex_attention on the whole sequence on one GPU; its output is checked once per row against flexdist's CP
  output, unsharded (``max_abs_diff_vs_flexdist``);
- causal only: torch's public ``context_parallel`` around SDPA(is_causal) (K/V repeated: no GQA there);
  efficiency against SDPA on one GPU.

Per-GPU TFLOP/s count useful FLOPs only (forward 4·Hq·D·visible pairs, backward 2.5×). ``peak_gib_per_rank``:
memory each rank's op added above the benchmark's own global tensors (forward + backward). Each row is
guarded (an error is recorded in the row, the run goes on), printed as it finishes, and the JSON is rewritten
after every row (``"partial": true`` until the end), so a time limit loses only the row in flight.

    torchrun --nproc-per-node 2 bench/bench_cp_multi.py --out $OUT/cp_multi_2gpu.json
    torchrun --nproc-per-node 2 bench/bench_cp_multi.py --quick          # CPU/gloo smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch_cp_flex as tcf
from bench_cp_sim import visible_pairs
from bench_planner import make_pack

import flexdist.cp as cp
from flexdist.kernels import flex_attention_backward, flex_attention_forward
from flexdist.masks import document_block_mask


def timeit(fn, device: torch.device, reps: int, back_to_back: int = 1) -> float:
    """Median seconds per call (after a warm-up), then the max over ranks (the slowest rank sets the pace).

    ``back_to_back`` > 1 times that many calls between two synchronisations and divides: the host then runs
    ahead as in a training step, so its per-call overhead only counts where it starves the GPU.
    """
    fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(back_to_back):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) / back_to_back)
    t = torch.tensor([statistics.median(ts)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def peak_start(device: torch.device) -> int:
    """Reset the peak counter; the bytes already allocated (the global test tensors are not the op's)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(device: torch.device, base: int) -> float:
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def peak_per_rank(peak: float, device: torch.device) -> list[float]:
    """Every rank's peak GiB (a collective: every rank calls it after every row, failed rows too)."""
    t = torch.tensor([peak], dtype=torch.float64, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [round(float(p), 4) for p in parts]


def rates(row: dict, N: int, f_fwd: float, f_bwd: float, single_fwd: float | None, single_bwd: float | None):
    """Per-GPU TFLOP/s and CP efficiency (single-GPU time / (N · CP time)) for whatever times the row has."""
    if row.get("fwd_s"):
        row["tflops_fwd"] = f_fwd / N / row["fwd_s"] / 1e12
        if single_fwd:
            row["eff_fwd"] = single_fwd / (N * row["fwd_s"])
    if row.get("bwd_s"):
        row["tflops_bwd"] = f_bwd / N / row["bwd_s"] / 1e12
        if single_bwd:
            row["eff_bwd"] = single_bwd / (N * row["bwd_s"])


def fmt(r: dict) -> str:
    head = f"{r.get('mask', '?'):8} L={r.get('tokens_per_gpu', 0):6} {r.get('impl', '?'):13} {r.get('balance', '?'):14} {r.get('strategy', '?'):13}"
    err = r.get("error") or r.get("torch_cp_error")
    if err:
        return f"{head} ERROR {err}"
    s = f"{head} fwd {r.get('fwd_s', float('nan')) * 1e3:8.2f} ms {r.get('tflops_fwd', float('nan')):6.1f} TF/s eff {r.get('eff_fwd', float('nan')):.2f}"
    if "bwd_s" in r:
        s += f" | bwd {r['bwd_s'] * 1e3:8.2f} ms {r.get('tflops_bwd', float('nan')):6.1f} TF/s eff {r.get('eff_bwd', float('nan')):.2f}"
    s += f" | peak {max(r.get('peak_gib_per_rank') or [0.0]):.2f} GiB"
    if "max_abs_diff_vs_flexdist" in r:
        s += f" | max|torch-flexdist| {r['max_abs_diff_vs_flexdist']:.3g}"
    return s


class Results:
    """Rows and the JSON file; rank 0 rewrites the file after every row so a time limit keeps finished rows."""

    def __init__(self, path: str | None, meta: dict, rank: int) -> None:
        self.path, self.meta, self.rank, self.rows = path, meta, rank, []
        self.t0 = time.perf_counter()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.rank == 0:
            print(f"[{time.perf_counter() - self.t0:5.0f}s] {fmt(row)}", flush=True)
            self.write(partial=True)

    def write(self, partial: bool) -> None:
        if self.rank != 0 or not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows, "partial": partial}, f, indent=1)
        os.replace(tmp, self.path)


def profile_row(root: str, tag: str, rank: int, device: torch.device, calls: dict) -> dict:
    """One profiled call of each of ``calls`` (after the timed ones, so nothing compiles or autotunes here):
    a gzipped chrome trace per rank and pass, and the timeline summary (trace_timeline.summarize) of every
    rank, gathered (a collective: every rank calls it)."""
    import gzip
    import shutil

    from trace_timeline import format_summary, load, summarize

    os.makedirs(root, exist_ok=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    mine = {}
    for name, fn in calls.items():
        dist.barrier()
        with torch.profiler.profile(activities=acts) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        path = os.path.join(root, f"trace_{tag}_{name}_rank{rank}.json")
        prof.export_chrome_trace(path)
        mine[name] = summarize(load(path))
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank == 0:
        for r, s in enumerate(every):
            for name, summ in s.items():
                print(format_summary(f"profile {tag} {name} rank {r}", summ), flush=True)
        out = os.path.join(root, "profile_summary.json")
        allp = {}
        if os.path.exists(out):
            with open(out) as f:
                allp = json.load(f)
        allp[tag] = every
        with open(out, "w") as f:
            json.dump(allp, f, indent=1)
    return {name: {k: v for k, v in every[0][name].items() if k != "kernels"} for name in calls}


def say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _strategy_knobs(strategy: str) -> dict:
    """plan() keywords of a row name: "ring/g<g>", "allgather/hc<c>[+lf][/b<k,k,...>]"."""
    kw = dict(ring_group=1, head_chunks=1, local_first=False, bwd_head_chunks=None)
    for part in strategy.split("/")[1:]:
        if part.startswith("g"):
            kw["ring_group"] = int(part[1:])
        elif part.startswith("hc"):
            kw["head_chunks"] = int(part[2:].removesuffix("+lf"))
            kw["local_first"] = part.endswith("+lf")
        elif part == "lead0":  # (timed with LEAD_SM_FRACTION = 0, see --lead0-rows)
            continue
        elif part.startswith("b"):
            sizes = tuple(int(x) for x in part[1:].split(","))
            kw["bwd_head_chunks"] = sizes[0] if len(sizes) == 1 else sizes
    return kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU + gloo + reference kernel, tiny shapes")
    ap.add_argument("--tokens-per-gpu", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--masks", nargs="+", default=["document", "causal"], choices=["document", "causal"])
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--mean-doc", type=int, default=4096)
    ap.add_argument("--dist", default="mixture", choices=["exp", "mixture"])
    ap.add_argument(
        "--ring-groups", type=int, nargs="*", default=[], help="also the ring with g steps per kernel call"
    )
    ap.add_argument(
        "--head-chunks",
        type=int,
        nargs="*",
        default=[],
        help="also the all-gather pipelined over this many chunks of K/V heads (rows allgather/hc<c>)",
    )
    ap.add_argument(
        "--local-first",
        type=int,
        nargs="*",
        default=[],
        help="also the pipelined all-gather with local_first=True over this many chunks (rows allgather/hc<c>+lf)",
    )
    ap.add_argument(
        "--bwd-head-chunks",
        nargs="*",
        default=[],
        help="also every allgather/hc row with its backward pipelined over these chunks of K/V heads, e.g. "
        "'1,7' (plan(bwd_head_chunks=(1, 7)); rows allgather/hc<c>[+lf]/b<spec>)",
    )
    ap.add_argument(
        "--lead0-rows",
        action="store_true",
        help="also every allgather row with the backward kernels' lead blocks off (rows .../lead0; "
        "kernels.triton_fwd.LEAD_SM_FRACTION = 0)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--back-to-back",
        type=int,
        default=1,
        help="calls per timed sample (1: every call synchronised, host overhead fully counted)",
    )
    ap.add_argument(
        "--balances",
        nargs="+",
        default=["contiguous", "zigzag", "document"],
        help="plan(balance=...); 'document@ring' / 'document@totals' also set plan(objective=...)",
    )
    ap.add_argument("--strategies", nargs="+", default=["ring", "direct", "allgather", "ulysses"])
    ap.add_argument("--no-torch-cp", dest="torch_cp", action="store_false", help="no torch CP rows at all")
    ap.add_argument(
        "--torch-cp-balancers",
        nargs="*",
        default=["headtail", "ptrr"],
        choices=list(tcf.BALANCERS),
        help="torch CP FlexAttention rows, one per load balancer (none given: no torch flex rows)",
    )
    ap.add_argument(
        "--torch-cp-mask",
        default="eager",
        choices=["eager", "compiled"],
        help="how torch builds each rank's CP BlockMask: eager create_block_mask (default: its compile did "
        "not finish in 120 s on the 4-CPU device machine) or torch's own compiled builder",
    )
    ap.add_argument(
        "--no-torch-single",
        dest="torch_single",
        action="store_false",
        help="no one-GPU torch flex baseline (one compile less per config; torch CP eff vs flexdist's kernel)",
    )
    ap.add_argument("--no-torch-sdpa", dest="torch_sdpa", action="store_false", help="no SDPA causal row")
    ap.add_argument(
        "--profile-dir",
        default=None,
        help="torch.profiler trace of one forward and one backward of each --profile-rows row, per rank "
        "(gzipped chrome traces and a compute / NCCL timeline summary, profile_summary.json)",
    )
    ap.add_argument(
        "--profile-rows",
        nargs="*",
        default=["document/ring"],
        help="balance/strategy rows to profile (the balance as asked, e.g. document/ring, zigzag/allgather)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
        args.tokens_per_gpu, args.hq, args.hkv, args.d, args.block_size = [128], 4, 2, 16, 32
        args.mean_doc, args.reps, kb = 64, 1, "reference"
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, dtype, backend, kb = torch.device("cuda", local), torch.bfloat16, "nccl", "auto"
    dist.init_process_group(backend, timeout=timedelta(seconds=60 if args.quick else 300))
    N, rank = dist.get_world_size(), dist.get_rank()
    import triton

    meta = dict(
        benchmark="bench_cp_multi",
        world_size=N,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        args=vars(args),
        flops="useful pairs only: fwd 4*Hq*D*pairs, bwd 2.5x; tflops_* per GPU",
        timing="median of reps after a warm-up, max over ranks; bwd alone on a retained graph",
    )
    res = Results(args.out, meta, rank)
    tm = lambda fn: timeit(fn, device, args.reps, args.back_to_back)
    cuda = device.type == "cuda"
    # torch CP FlexAttention: compiled on GPU; on CPU eager and forward only (flex_attention has no CPU
    # backward), which still checks the sharding, the load balancers and the output against flexdist's
    mesh, mesh_error = None, None
    if args.torch_cp:
        try:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (N,))
        except Exception as e:
            mesh_error = f"init_device_mesh: {type(e).__name__}: {e}"
        api, missing = tcf.torch_cp_flex_api()
        say(rank, f"torch CP FlexAttention API: {'found' if api else missing}; GQA via {tcf.gqa_mode()}")
        if not cuda:
            say(rank, "torch CP flex on CPU: eager flex_attention, forward only (no CPU flex backward)")
    t_start = time.perf_counter()
    for L in args.tokens_per_gpu:
        S = N * L
        for mask_kind in args.masks:
            say(rank, f"== {mask_kind} S={S} ({L} tokens/GPU), t={time.perf_counter() - t_start:.0f}s")
            base = dict(
                N=N,
                S=S,
                tokens_per_gpu=L,
                mask=mask_kind,
                Hq=args.hq,
                Hkv=args.hkv,
                D=args.d,
                block_size=args.block_size,
            )
            try:
                config(args, res, base, mask_kind, S, N, rank, device, dtype, kb, tm, mesh, mesh_error)
            except Exception as e:  # the configuration's own setup failed: record it, go on
                import traceback

                traceback.print_exc()
                res.add(dict(base, impl="setup", error=f"{type(e).__name__}: {e}"[:600]))
            if cuda:
                torch.cuda.empty_cache()
    say(rank, f"done in {time.perf_counter() - t_start:.0f}s")
    res.write(partial=False)
    if rank == 0 and args.out:
        print(f"wrote {args.out}", flush=True)
    dist.destroy_process_group()


def config(args, res, base, mask_kind, S, N, rank, device, dtype, kb, tm, mesh, mesh_error) -> None:
    """All rows of one (tokens per GPU, mask): flexdist's, torch CP flex, torch CP SDPA (causal)."""
    cuda = device.type == "cuda"
    doc = (
        make_pack(S, args.mean_doc, args.dist, 0)
        if mask_kind == "document"
        else torch.zeros(1, S, dtype=torch.long)
    )
    doc = doc.to(device)
    pairs = visible_pairs(doc)
    f_fwd = 4.0 * args.hq * args.d * pairs
    f_bwd = 2.5 * f_fwd
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.hq, S, args.d, generator=g).to(device, dtype)
    k = torch.randn(1, args.hkv, S, args.d, generator=g).to(device, dtype)
    v = torch.randn(1, args.hkv, S, args.d, generator=g).to(device, dtype)
    dout = torch.randn(1, args.hq, S, args.d, generator=g).to(device, dtype)
    base["pairs"] = pairs
    # single GPU, whole sequence, same kernel
    bm = document_block_mask(doc, causal=True, block_size=args.block_size)
    o1, l1 = flex_attention_forward(q, k, v, bm, enable_gqa=True, backend=kb)
    base["single_fwd_s"] = t1f = tm(lambda: flex_attention_forward(q, k, v, bm, enable_gqa=True, backend=kb))
    base["single_bwd_s"] = t1b = tm(
        lambda: flex_attention_backward(q, k, v, o1, dout, l1, bm, enable_gqa=True, backend=kb)
    )
    o1 = l1 = None  # free before the CP rows
    ref_out, ref_from = None, None
    from flexdist.kernels import triton_fwd as lead_frac

    lead_default = lead_frac.LEAD_SM_FRACTION
    for balance in args.balances:
        # "ring/g<g>": the ring with g steps per kernel call (plan(ring_group=g)); "allgather/hc<c>": the
        # all-gather pipelined over c chunks of K/V heads (plan(head_chunks=c))
        # ("+lf": plan(local_first=True), the own shard's call during the first gather)
        extra = [f"ring/g{g}" for g in args.ring_groups] + [f"allgather/hc{c}" for c in args.head_chunks]
        extra += [f"allgather/hc{c}+lf" for c in args.local_first]
        # "/b<spec>": the same forward, the backward pipelined over other chunks (plan(bwd_head_chunks=...))
        extra += [f"{x}/b{b}" for x in extra if x.startswith("allgather/hc") for b in args.bwd_head_chunks]
        rows = args.strategies + extra
        if (
            args.lead0_rows
        ):  # "/lead0": the backward kernels without their lead blocks (triton_fwd.launch_lead)
            rows = [y for x in rows for y in ([x, f"{x}/lead0"] if x.startswith("allgather") else [x])]
        for strategy in rows:
            row = dict(base, impl="flexdist", balance=balance, strategy=strategy)
            peak, out = 0.0, None
            try:
                p = cp.plan(
                    doc,
                    None,
                    # "document@ring" / "document@totals": the document planner with that objective
                    balance=balance.split("@")[0],
                    objective=balance.split("@")[1] if "@" in balance else None,
                    strategy=strategy.split("/")[0],
                    block_size=args.block_size,
                    kernel_backend=kb,
                    **_strategy_knobs(strategy),
                )
            except ValueError as e:  # this balance/strategy does not apply here (e.g. heads not divisible)
                say(rank, f"skip {balance}/{strategy}: {e}")
                continue
            except Exception as e:  # the planner itself failed: a row that says so
                row.update(
                    error=f"plan: {type(e).__name__}: {e}"[:600], peak_gib_per_rank=peak_per_rank(0.0, device)
                )
                res.add(row)
                continue
            try:
                row["balance"] = p.balance + (f"@{balance.split('@')[1]}" if "@" in balance else "")
                ql, kl, vl, dl = (p.shard(t, 2) for t in (q, k, v, dout))
                ql, kl, vl = (t.detach().clone().requires_grad_() for t in (ql, kl, vl))
                b0 = peak_start(device)
                lead_frac.LEAD_SM_FRACTION = 0.0 if strategy.endswith("/lead0") else lead_default
                row["fwd_s"] = tm(lambda p=p, ql=ql, kl=kl, vl=vl: cp.attention(ql, kl, vl, p))
                out_keep = cp.attention(ql, kl, vl, p)  # backward alone, re-run on a retained graph

                def bw(out_keep=out_keep, ql=ql, kl=kl, vl=vl, dl=dl):
                    torch.autograd.grad(out_keep, (ql, kl, vl), dl, retain_graph=True)

                row["bwd_s"] = tm(bw)
                if args.profile_dir and f"{balance}/{strategy}" in args.profile_rows:
                    tag = f"{base['mask']}_L{base['tokens_per_gpu']}_{balance}_{strategy.replace('/', '-')}"
                    row["profile"] = profile_row(
                        args.profile_dir, tag, rank, device,
                        {"fwd": lambda p=p, ql=ql, kl=kl, vl=vl: cp.attention(ql, kl, vl, p), "bwd": bw},
                    )  # fmt: skip
                out = out_keep.detach()
                del out_keep, bw
                peak = peak_gib(device, b0)
                rates(row, N, f_fwd, f_bwd, t1f, t1b)
                row["plan_stats"] = {k_: v_ for k_, v_ in p.stats.items() if k_ != "planner"}
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:600]
            lead_frac.LEAD_SM_FRACTION = lead_default
            row["peak_gib_per_rank"] = peak_per_rank(peak, device)
            if ref_out is None and out is not None and args.torch_cp:
                # the reference the torch CP rows are checked against: flexdist's CP output, unsharded
                ref_out, ref_from = p.unshard(out, 2), f"{row['balance']}/{strategy}"
            del out
            res.add(row)
    if args.torch_cp:
        torch_flex_rows(
            args,
            res,
            base,
            mask_kind,
            doc,
            q,
            k,
            v,
            dout,
            N,
            device,
            tm,
            mesh,
            mesh_error,
            ref_out,
            ref_from,
            f_fwd,
            f_bwd,
        )
    del ref_out
    if mask_kind == "causal" and args.torch_cp and args.torch_sdpa:
        if cuda:
            row = dict(base, **torch_cp_sdpa(q, k, v, dout, mesh, tm, device))
            rates(row, N, f_fwd, f_bwd, row.get("sdpa_single_fwd_s"), row.get("sdpa_single_bwd_s"))
            row["peak_gib_per_rank"] = peak_per_rank(row.pop("peak_gib", 0.0), device)
            res.add(row)
        else:
            say(rank, "torch CP SDPA row skipped: CPU (its ring SDPA needs CUDA flash/efficient attention)")


def torch_flex_rows(
    args,
    res,
    base,
    mask_kind,
    doc,
    q,
    k,
    v,
    dout,
    N,
    device,
    tm,
    mesh,
    mesh_error,
    ref_out,
    ref_from,
    f_fwd,
    f_bwd,
) -> None:
    """torch's CP FlexAttention, one row per load balancer, and its single-GPU baseline (torch_cp_flex.py)."""
    if not args.torch_cp_balancers:
        return
    cuda = device.type == "cuda"
    if mesh is None:
        for b in args.torch_cp_balancers:
            row = dict(
                base,
                impl="torch_cp_flex",
                balance=f"torch-{b}",
                strategy="torch_cp_flex",
                torch_cp_error=mesh_error,
            )
            row["peak_gib_per_rank"] = peak_per_rank(0.0, device)
            res.add(row)
        return
    if args.torch_single:
        single = tcf.torch_flex_single(
            doc, mask_kind, q, k, v, dout, timeit=tm, backward=cuda, compile=cuda, ref_out=ref_out
        )
        s_fwd, s_bwd = single.get("torch_single_fwd_s"), single.get("torch_single_bwd_s")
        eff_base = f"torch {'compiled' if cuda else 'eager'} flex_attention, whole sequence, one device"
    else:  # one compile less per configuration; efficiency against flexdist's one-GPU kernel instead
        single, s_fwd, s_bwd = {}, base["single_fwd_s"], base["single_bwd_s"]
        eff_base = "flexdist's kernel, whole sequence, one device (--no-torch-single)"
    for b in args.torch_cp_balancers:
        r = tcf.torch_cp_flex(
            doc,
            mask_kind,
            q,
            k,
            v,
            dout,
            mesh=mesh,
            balancer=b,
            timeit=tm,
            backward=cuda,
            compile=cuda,
            ref_out=ref_out,
            cp_mask=args.torch_cp_mask,
        )
        row = dict(base, **single, **r)
        row["eff_baseline"] = eff_base
        if ref_from:
            row["checked_against"] = f"flexdist {ref_from}, unsharded"
        rates(row, N, f_fwd, f_bwd, s_fwd, s_bwd)
        row["peak_gib_per_rank"] = peak_per_rank(row.pop("peak_gib", 0.0), device)
        res.add(row)
    torch.compiler.reset()  # leave no compiled flex state to the next configuration


def torch_cp_sdpa(q, k, v, dout, mesh, tm, device) -> dict:
    """torch.distributed.tensor.experimental.context_parallel around SDPA(is_causal=True): the public torch CP."""
    res = dict(impl="torch_cp_sdpa", balance="torch-headtail", strategy="torch_cp_sdpa")
    try:
        import torch.nn.functional as F
        from torch.distributed.tensor.experimental import context_parallel

        rep = q.shape[1] // k.shape[1]
        qq = q.detach().clone()
        kk = k.repeat_interleave(rep, 1).detach().clone()  # torch CP SDPA path has no GQA
        vv = v.repeat_interleave(rep, 1).detach().clone()
        dd = dout.detach().clone()
        res["gqa"] = "repeat_kv"
        # one GPU, whole sequence: the efficiency baseline
        q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (qq, kk, vv))
        res["sdpa_single_fwd_s"] = tm(lambda: F.scaled_dot_product_attention(q1, k1, v1, is_causal=True))
        o1 = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True)
        res["sdpa_single_bwd_s"] = tm(lambda: torch.autograd.grad(o1, (q1, k1, v1), dd, retain_graph=True))
        q1 = k1 = v1 = o1 = None
        with context_parallel(mesh, buffers=[qq, kk, vv, dd], buffer_seq_dims=[2, 2, 2, 2]):
            ql, kl, vl = (t.requires_grad_() for t in (qq, kk, vv))
            b0 = peak_start(device)
            res["fwd_s"] = tm(lambda: F.scaled_dot_product_attention(ql, kl, vl, is_causal=True))
            o_keep = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
            res["bwd_s"] = tm(lambda: torch.autograd.grad(o_keep, (ql, kl, vl), dd, retain_graph=True))
            o_keep = None
            res["peak_gib"] = peak_gib(device, b0)
        res["note"] = "K/V repeated to Hq heads (no GQA in torch CP SDPA); eff vs SDPA on one GPU"
    except Exception as e:
        res["torch_cp_error"] = f"{type(e).__name__}: {e}"[:600]
    return res


if __name__ == "__main__":
    main()
