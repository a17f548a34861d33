"""Where the attention time goes, kernel by kernel: flexdist's forward / delta / dK-dV / dQ kernels beside
compiled torch ``flex_attention``'s kernels on the same masks (the "profile it" of issue #3).

Two modes, same workload (B=1, H=16, D=128, bf16; causal and document-causal at one S; one forward+backward
per implementation after a warm-up that runs autotuning and torch.compile):

- ``--mode torch``: ``torch.profiler`` (CUPTI) around ``--iters`` forward+backward calls of each
  implementation; prints and writes every GPU kernel's mean duration and its TFLOP/s share.
- ``--mode host``: ``cProfile`` of ``--iters`` flexdist forward+backward calls through autograd (host time
  only: where a launch-bound call spends its CPU time);
- ``--mode ncu``: brackets one forward+backward of each implementation with ``cudaProfilerStart/Stop`` and
  nothing else, for Nsight Compute's hardware counters (tensor-pipe use, occupancy, registers, stall
  reasons), e.g.

    ncu --clock-control none --profile-from-start off --csv --page details \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section ComputeWorkloadAnalysis python3 bench/profile_kernel.py --mode ncu > ncu.csv

    python3 bench/profile_kernel.py --mode torch --out bench/results/kernel_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernel import block_mask_from_docs, document_ids, pair_count
from torch.nn.attention.flex_attention import flex_attention as torch_flex

from flexdist.kernels import DocumentMaskMod, flex_attention

MEANS = {"causal": None, "doc4k": 4096, "doc1k": 1024}


def workload(name: str, S: int, H: int, D: int, dev: str):
    """q, k, v, dout, the two BlockMasks (torch mask_mod / flexdist document mask) and the forward FLOPs."""
    mean = MEANS[name]
    doc = document_ids(S, mean, seed=0)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    dd = doc.to(dev)
    if mean is None:
        torch_mm = ours_mm = lambda b, h, qi, ki: qi >= ki
    else:
        torch_mm = lambda b, h, qi, ki: (dd[qi] == dd[ki]) & (qi >= ki)
        pos = torch.arange(S, device=dev)[None]
        ours_mm = DocumentMaskMod(dd[None], dd[None], pos, pos)
    bm_t = block_mask_from_docs(doc, 128, torch_mm, dev)
    bm_o = block_mask_from_docs(doc, 128, ours_mm, dev)
    return (q, k, v, do), bm_t, bm_o, 4.0 * H * D * pair_count(doc)


def step_fn(f, q, k, v, do):
    def run():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = f(qq, kk, vv)
        torch.autograd.grad(out, (qq, kk, vv), do)

    return run


def kernel_table(prof, iters: int) -> list[dict]:
    """Mean GPU duration per kernel name over ``iters`` iterations (from the profiler's kernel events)."""
    tot: dict[str, float] = defaultdict(float)
    cnt: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name] += e.time_range.elapsed_us()
            cnt[e.name] += 1
    rows = [
        {"kernel": n, "calls_per_iter": cnt[n] / iters, "us_per_iter": tot[n] / iters}
        for n in sorted(tot, key=tot.get, reverse=True)
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["torch", "ncu", "host"], default="torch")
    ap.add_argument("--masks", default="doc4k,causal")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--impls", default="flexdist,torch_flex")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernel.py needs a CUDA device")
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "S": args.seq,
        "H": args.heads,
        "D": args.dim,
        "flops": "useful pairs only: fwd 4*H*D*pairs, bwd 2.5x",
    }
    print(json.dumps(meta), flush=True)
    results = []
    for name in args.masks.split(","):
        (q, k, v, do), bm_t, bm_o, f_fwd = workload(name, args.seq, args.heads, args.dim, "cuda")
        torch.compiler.reset()
        compiled = torch.compile(torch_flex, dynamic=False)
        impls = {
            "flexdist": step_fn(lambda a, b, c: flex_attention(a, b, c, block_mask=bm_o), q, k, v, do),
            "torch_flex": step_fn(lambda a, b, c: compiled(a, b, c, block_mask=bm_t), q, k, v, do),
        }
        for impl in args.impls.split(","):
            fn = impls[impl]
            for _ in range(3):  # autotuning, compilation, caches
                fn()
            torch.cuda.synchronize()
            if args.mode == "host":
                if impl != "flexdist":
                    continue
                import cProfile
                import io
                import pstats

                pr = cProfile.Profile()
                pr.enable()
                for _ in range(args.iters):
                    fn()
                pr.disable()
                torch.cuda.synchronize()
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(45)
                print(f"== host profile {name} S={args.seq} flexdist, {args.iters} fwd+bwd calls", flush=True)
                print(buf.getvalue(), flush=True)
                continue
            if args.mode == "ncu":
                torch.cuda.profiler.start()
                fn()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                print(f"ncu range: {name} S={args.seq} {impl}", flush=True)
                continue
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(args.iters):
                    fn()
                torch.cuda.synchronize()
            rows = kernel_table(prof, args.iters)
            total = sum(r["us_per_iter"] for r in rows)
            print(f"== {name} S={args.seq} {impl}: {total:.0f} us of kernels per fwd+bwd "
                  f"({3.5 * f_fwd / total / 1e6:.0f} TFLOP/s over all kernels)", flush=True)  # fmt: skip
            for r in rows:
                print(
                    f"   {r['us_per_iter']:9.1f} us  x{r['calls_per_iter']:.0f}  {r['kernel'][:110]}",
                    flush=True,
                )
            results.append({"mask": name, "impl": impl, "fwd_flops": f_fwd, "kernels": rows})
        impls = compiled = None  # free the compiled graph before the next mask
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
