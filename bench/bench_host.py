"""Benchmark: host (CPU) time per kernel call vs the GPU time of the same call — is a path launch-bound?

Small problems (an 8k document mask, a ring step's 8k × 8k shard pair) leave well under a millisecond of GPU
work per call; if issuing a call costs the host about as much, the GPU waits between calls and every
benchmark that times calls back to back (the CP simulation, a real ring, bench_kernel's autograd path) sees
host time. For each path this prints, per call:

- ``host us``: wall time to *issue* N calls (no synchronisation inside; the GPU lags behind), divided by N;
- ``gpu us``: CUDA-event time of the same N calls issued back to back (the GPU's time if the host keeps up);
- ``sync us``: wall time of one call followed by a synchronisation (what a fully synchronised benchmark sees).

``host us`` ≥ ``gpu us`` means the path is launch-bound at that size. Paths: flexdist forward (raw entry
point), forward with accumulation into a running (out, LSE) as a ring step does, backward (raw), forward +
backward through autograd (``flex_attention``), and compiled torch ``flex_attention`` for reference. The
flexdist paths run twice: as shipped (a tuned key launches with its config directly, kernels/tuned_launch.py)
and ``[autotuner]``, every launch through Triton's autotuner.

    python bench/bench_host.py --out bench/results/host_h100.json     # GPU
    python bench/bench_host.py --quick                                # CPU smoke (interpreter, tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

if "--quick" in sys.argv and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit runs (see bench_kernel)

from torch.nn.attention.flex_attention import flex_attention as torch_flex

from flexdist import document_block_mask
from flexdist.kernels import flex_attention, flex_attention_backward, flex_attention_forward, tuned_launch


def exponential_docs(S: int, mean: int, seed: int) -> torch.Tensor:
    """[1, S] contiguous document ids with exponential lengths (seeded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = (-torch.log(torch.rand(4 * S // mean + 16, generator=g)) * mean).round().clamp_min(1).long()
    return torch.searchsorted(torch.cumsum(lengths, 0), torch.arange(S), right=True)[None]


def time_path(fn, n: int, device: torch.device) -> dict:
    """host / gpu / sync microseconds per call of ``fn`` (see the module docstring)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    sync()
    gpu = None
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        gpu = a.elapsed_time(b) / 1e3 / n
    walls = []
    for _ in range(max(3, n // 4)):
        t0 = time.perf_counter()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
    walls.sort()
    return {
        "host_us": host * 1e6,
        "gpu_us": gpu * 1e6 if gpu is not None else None,
        "sync_us": walls[len(walls) // 2] * 1e6,
        "launch_bound": gpu is not None and host >= 0.9 * gpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test under the interpreter)")
    ap.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 8192 32768)")
    ap.add_argument("--mean-doc", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--calls", type=int, default=None, help="calls per measurement (default 50; quick 2)")
    ap.add_argument("--no-torch", dest="torch_flex", action="store_false", help="skip compiled torch flex")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    seqs = args.seqs or ([256] if quick else [8192, 32768])
    H, D = (2, 16) if quick else (args.heads, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = args.calls or (2 if quick else 50)
    bs = 64 if quick else 128
    rows = []
    print(f"{'S':>7} {'path':<46} {'host us':>9} {'gpu us':>9} {'sync us':>9}  launch-bound")
    for S in seqs:
        doc = exponential_docs(S, min(args.mean_doc, S // 2), seed=0).to(device)
        bm = document_block_mask(doc, block_size=bs)
        g = torch.Generator().manual_seed(1)
        q, k, v, do = (torch.randn(1, H, S, D, generator=g).to(device, dtype) for _ in range(4))
        out, lse = flex_attention_forward(q, k, v, bm)
        o_acc = torch.zeros(1, H, S, D, device=device)
        l_acc = torch.full((1, H, S), float("-inf"), device=device)
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

        def fwd_bwd(fn):
            def run():
                o = fn(qg, kg, vg, block_mask=bm)
                o.backward(do)

            return run

        paths = {
            "flexdist forward": lambda: flex_attention_forward(q, k, v, bm),
            "flexdist forward, accumulate": lambda: flex_attention_forward(
                q, k, v, bm, out_acc=o_acc, lse_acc=l_acc
            ),
            "flexdist backward (raw)": lambda: flex_attention_backward(q, k, v, out, do, lse, bm),
            "flexdist fwd+bwd (autograd)": fwd_bwd(flex_attention),
        }
        if args.torch_flex and device.type == "cuda":
            torch.compiler.reset()
            compiled = torch.compile(torch_flex, dynamic=False)
            paths["torch flex fwd+bwd (compiled)"] = fwd_bwd(compiled)
        runs = [(name, fn, True) for name, fn in paths.items()]
        # the flexdist paths again with every tuned launch through Triton's autotuner (kernels/tuned_launch.py)
        runs += [
            (f"{name} [autotuner]", fn, False) for name, fn in paths.items() if name.startswith("flexdist")
        ]
        for name, fn, direct in runs:
            tuned_launch.ENABLED = direct
            try:
                r = {"S": S, "path": name, "direct_tuned_launch": direct, **time_path(fn, n, device)}
            finally:
                tuned_launch.ENABLED = True
            rows.append(r)
            gpu = f"{r['gpu_us']:9.1f}" if r["gpu_us"] is not None else f"{'-':>9}"
            print(
                f"{S:>7} {name:<46} {r['host_us']:9.1f} {gpu} {r['sync_us']:9.1f}  {r['launch_bound']}",
                flush=True,
            )
    if args.out:
        import triton

        meta = {
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "H": H,
            "D": D,
            "dtype": str(dtype),
            "mean_doc": args.mean_doc,
            "calls": n,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
