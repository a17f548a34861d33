"""Real multi-GPU CP attention benchmark (run under torchrun): per-GPU TFLOP/s and CP efficiency.

For each tokens-per-GPU size, balance (contiguous, zigzag, document) and strategy (ring, direct, allgather, ulysses), it times
`flexdist.cp.attention` forward and forward+backward on a document-causal pack (long-tailed mixture of
document lengths, MagiAttention-style GQA 64:8, head dim 128, bf16), takes the max over ranks, and reports
per-GPU TFLOP/s (useful FLOPs: forward 4·Hq·D·visible pairs, backward 2.5×) and CP efficiency against the
same kernel on the whole sequence on one GPU (measured in the same process). Peak memory per rank added by
the op (forward + backward, above the benchmark's own global tensors) is reported for each strategy. As a side-by-side baseline on a plain causal mask (torch's CP cannot take a
document mask through public APIs: its FlexAttention path needs the private ``create_cp_block_mask``), it
also times torch's ``context_parallel`` with SDPA (is_causal) against flexdist's ring on the same causal
mask.

    torchrun --nproc-per-node 2 bench/bench_cp_multi.py --out $OUT/cp_multi_2gpu.json
    torchrun --nproc-per-node 2 bench/bench_cp_multi.py --quick          # CPU/gloo smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cp_sim import visible_pairs
from bench_planner import make_pack

import flexdist.cp as cp
from flexdist.kernels import flex_attention_backward, flex_attention_forward
from flexdist.masks import document_block_mask


def timeit(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call (after a warm-up), then the max over ranks (the slowest rank sets the pace)."""
    import statistics
    import time

    fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(ts)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU + gloo + reference kernel, tiny shapes")
    ap.add_argument("--tokens-per-gpu", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--mean-doc", type=int, default=4096)
    ap.add_argument("--dist", default="mixture", choices=["exp", "mixture"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--balances", nargs="+", default=["contiguous", "zigzag", "document"])
    ap.add_argument("--strategies", nargs="+", default=["ring", "direct", "allgather", "ulysses"])
    ap.add_argument("--no-torch-cp", dest="torch_cp", action="store_false")
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
    dist.init_process_group(backend, timeout=timedelta(seconds=300))
    N, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for L in args.tokens_per_gpu:
        S = N * L
        for mask_kind in ("document", "causal"):
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
            # single GPU, whole sequence, same kernel
            bm = document_block_mask(doc, causal=True, block_size=args.block_size)
            o1, l1 = flex_attention_forward(q, k, v, bm, enable_gqa=True, backend=kb)
            t1f = timeit(
                lambda: flex_attention_forward(q, k, v, bm, enable_gqa=True, backend=kb), device, args.reps
            )
            t1b = timeit(
                lambda: flex_attention_backward(q, k, v, o1, dout, l1, bm, enable_gqa=True, backend=kb),
                device,
                args.reps,
            )
            base = dict(
                N=N,
                S=S,
                tokens_per_gpu=L,
                mask=mask_kind,
                Hq=args.hq,
                Hkv=args.hkv,
                D=args.d,
                block_size=args.block_size,
                single_fwd_s=t1f,
                single_bwd_s=t1b,
            )
            for balance in args.balances:
                for strategy in args.strategies:
                    try:
                        p = cp.plan(
                            doc,
                            None,
                            balance=balance,
                            strategy=strategy,
                            block_size=args.block_size,
                            kernel_backend=kb,
                        )
                    except ValueError as e:
                        if rank == 0:
                            print(f"skip {balance}/{strategy}: {e}")
                        continue
                    ql, kl, vl, dl = (p.shard(t, 2) for t in (q, k, v, dout))
                    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (ql, kl, vl))
                    base_mem = 0
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base_mem = torch.cuda.memory_allocated()  # the global test tensors are not the op's
                    tf = timeit(
                        lambda p=p, ql=ql, kl=kl, vl=vl: cp.attention(ql, kl, vl, p), device, args.reps
                    )

                    out_keep = cp.attention(ql, kl, vl, p)  # backward alone, re-run on a retained graph

                    def bw(out_keep=out_keep, ql=ql, kl=kl, vl=vl, dl=dl):
                        torch.autograd.grad(out_keep, (ql, kl, vl), dl, retain_graph=True)

                    tb = timeit(bw, device, args.reps)
                    del out_keep
                    peak = (
                        (torch.cuda.max_memory_allocated() - base_mem) / 2**30
                        if device.type == "cuda"
                        else 0.0
                    )
                    r = dict(
                        base,
                        balance=p.balance,
                        strategy=strategy,
                        fwd_s=tf,
                        bwd_s=tb,
                        tflops_fwd=f_fwd / N / tf / 1e12,
                        tflops_bwd=f_bwd / N / tb / 1e12,
                        eff_fwd=t1f / (N * tf),
                        eff_bwd=t1b / (N * tb),
                        peak_gib=peak,
                        plan_stats={k_: v_ for k_, v_ in p.stats.items() if k_ != "planner"},
                    )
                    rows.append(r)
                    if rank == 0:
                        print(
                            f"{mask_kind:8} L={L:6} {balance:10} {strategy:9} fwd {tf * 1e3:8.2f} ms "
                            f"{r['tflops_fwd']:6.1f} TF/s eff {r['eff_fwd']:.2f} | bwd {tb * 1e3:8.2f} ms "
                            f"{r['tflops_bwd']:6.1f} TF/s eff {r['eff_bwd']:.2f} | peak {peak:.1f} GiB",
                            flush=True,
                        )
            if mask_kind == "causal" and args.torch_cp and device.type == "cuda":
                rows.append(dict(base, **torch_cp_sdpa(q, k, v, dout, N, f_fwd, f_bwd, args.reps, device)))
                if rank == 0:
                    print("torch CP (SDPA causal):", {k_: v_ for k_, v_ in rows[-1].items() if "torch" in k_})
    if rank == 0 and args.out:
        import triton

        meta = dict(
            benchmark="bench_cp_multi",
            world_size=N,
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            triton=triton.__version__,
            python=platform.python_version(),
            args=vars(args),
        )
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    dist.destroy_process_group()


def torch_cp_sdpa(q, k, v, dout, N, f_fwd, f_bwd, reps, device) -> dict:
    """torch.distributed.tensor.experimental.context_parallel around SDPA(is_causal=True): the public torch CP."""
    try:
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cuda", (N,))
        rep = q.shape[1] // k.shape[1]
        qq = q.detach().clone()
        kk = k.repeat_interleave(rep, 1).detach().clone()  # torch CP SDPA path has no GQA
        vv = v.repeat_interleave(rep, 1).detach().clone()
        dd = dout.detach().clone()
        res = {}
        with context_parallel(mesh, buffers=[qq, kk, vv, dd], buffer_seq_dims=[2, 2, 2, 2]):
            ql, kl, vl = (t.requires_grad_() for t in (qq, kk, vv))
            tf = timeit(lambda: F.scaled_dot_product_attention(ql, kl, vl, is_causal=True), device, reps)

            o_keep = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
            tb = timeit(
                lambda: torch.autograd.grad(o_keep, (ql, kl, vl), dd, retain_graph=True), device, reps
            )
        res.update(
            balance="torch-headtail",
            strategy="torch_cp_sdpa",
            torch_cp_fwd_s=tf,
            torch_cp_bwd_s=tb,
            torch_cp_tflops_fwd=f_fwd / N / tf / 1e12,
            torch_cp_tflops_bwd=f_bwd / N / tb / 1e12,
            note="K/V repeated to Hq heads (no GQA in torch CP SDPA)",
        )
        return res
    except Exception as e:
        return dict(
            balance="torch", strategy="torch_cp_sdpa", torch_cp_error=f"{type(e).__name__}: {e}"[:400]
        )


if __name__ == "__main__":
    main()
