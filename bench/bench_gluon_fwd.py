"""Benchmark: the Gluon Hopper forward (kernels/gluon_fwd.py) against the Triton forward, side by side.

Forward TFLOP/s counting only visible (q, kv) pairs (4·H·D·pairs), bf16, B = 1, calls interleaved in one
process (CUDA events, median over rounds that alternate the kernels). Cases (``--cases``):

- ``pack``: the one-GPU run of ``bench_cp_sim.py``'s default N = 8 pack (64k tokens, long-tailed document
  mixture with mean 4k capped at S/4, GQA 64:8, D = 128), the per-GPU throughput issue #5 compares with
  MagiAttention;
- ``doc4k`` / ``doc1k``: ``bench_kernel.py``'s exponential documents (mean 4k / 1k), 32k tokens, 16 heads;
- ``causal``: one 32k document, 16 heads.

The Triton side is the shipped default (``flex_attention_forward(backend="triton")``: the autotuned config)
and, with ``--triton-cfgs``, explicit configs. Outputs of both are compared (max |Δ| of out, LSE) so a fast
wrong kernel cannot pass as a result.

    python bench/bench_gluon_fwd.py --out /tmp/gluon_fwd.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernel import document_ids, pair_count
from bench_planner import make_pack

from flexdist.kernels import flex_attention_forward
from flexdist.kernels.gluon_fwd import gluon_forward
from flexdist.kernels.triton_fwd import triton_forward
from flexdist.masks import document_block_mask


def case(name: str, seed: int) -> tuple[torch.Tensor, int, int]:
    """(doc ids [S], Hq, Hkv) of a named case."""
    if name == "pack":
        return make_pack(65536, 4096, "mixture", seed)[0], 64, 8
    if name == "doc4k":
        return document_ids(32768, 4096, seed), 16, 16
    if name == "doc1k":
        return document_ids(32768, 1024, seed), 16, 16
    if name == "causal":
        return document_ids(32768, None, seed), 16, 16
    raise ValueError(f"--cases: unknown case {name!r} (pack, doc4k, doc1k, causal)")


def interleaved(fns: dict, rounds: int, reps: int) -> dict:
    """Median ms per call of each fn; every round times each fn ``reps`` times back to back, in turn."""
    times = {k: [] for k in fns}
    for f in fns.values():  # warm up / compile / tune
        f()
        f()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for k, f in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                f()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) / reps)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def parse_cfgs(text: str | None) -> list[tuple]:
    if not text:
        return []
    import ast

    v = ast.literal_eval(text)
    return [tuple(c) for c in (v if isinstance(v[0], (tuple, list)) else [v])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="pack,doc4k,causal")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--triton-cfgs", default=None, help="explicit Triton configs too, e.g. '(128,64,4,3,True)'"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name in args.cases.split(","):
        doc, Hq, Hkv = case(name, args.seed)
        S, D = doc.shape[0], args.dim
        pairs = pair_count(doc)
        flops = 4.0 * Hq * D * pairs
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, S, D, generator=g).to(dev, torch.bfloat16) for h in (Hq, Hkv, Hkv))
        bm = document_block_mask(doc[None].to(dev), causal=True, block_size=128)
        gqa = Hq != Hkv
        fns = {
            "triton": lambda: flex_attention_forward(q, k, v, bm, enable_gqa=gqa, backend="triton"),
            "gluon_ws": lambda: gluon_forward(q, k, v, bm, enable_gqa=gqa),
        }
        for c in parse_cfgs(args.triton_cfgs):
            fns[f"triton{c}"] = lambda c=c: triton_forward(q, k, v, bm, enable_gqa=gqa, config=c)
        ot, lt = fns["triton"]()
        og, lg = fns["gluon_ws"]()
        fin = torch.isfinite(lt)
        err = dict(
            out_max_abs=float((ot.float() - og.float()).abs().max()),
            lse_max_abs=float((lt[fin] - lg[fin]).abs().max()) if fin.any() else 0.0,
            lse_inf_equal=bool(torch.equal(torch.isfinite(lg), fin)),
        )
        ms = interleaved(fns, args.rounds, args.reps)
        row = dict(case=name, S=S, Hq=Hq, Hkv=Hkv, D=D, pairs=pairs, **err)
        for kname, t in ms.items():
            row[f"{kname}_ms"] = round(t, 4)
            row[f"{kname}_tflops"] = round(flops / (t * 1e-3) / 1e12, 1)
        rows.append(row)
        line = "  ".join(
            f"{kname} {t:.3f} ms {flops / (t * 1e-3) / 1e12:.0f} TFLOP/s" for kname, t in ms.items()
        )
        print(f"{name:7} S={S} H={Hq}:{Hkv}  {line}  | max|Δout| {err['out_max_abs']:.2e} "
              f"max|Δlse| {err['lse_max_abs']:.2e} lse-inf-equal {err['lse_inf_equal']}", flush=True)  # fmt: skip
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        host=platform.node(),
        args=vars(args),
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
