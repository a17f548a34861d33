"""Benchmark: the Gluon Hopper dQ kernel (kernels/gluon_bwd.py) against the Triton dQ kernel, side by side.

Backward TFLOP/s counting only visible (q, kv) pairs (2.5 × the forward's 4·H·D·pairs for the whole
backward; the dQ pass alone is counted as 3 of its 7 GEMMs, 4·H·D·pairs·3/2, the dK/dV pass as the other 4), bf16, B = 1, calls interleaved
in one process (``bench_gluon_fwd.interleaved``). Cases as ``bench_gluon_fwd.py``. Rows: the dQ pass and the
dK/dV pass alone (Triton, Gluon), and the whole backward as ``flex_attention_backward`` runs it
(``backend="triton"``: both passes Triton; ``"auto"``: both Gluon where they cover the call). dQ, dK and dV of
the Gluon kernels are compared with Triton's (max |Δ|). Rows ``*_lead0``: the Gluon rows without the lead
blocks launched ahead of the head groups (``triton_fwd.launch_lead``, s16). (s14 calls 1–2 also timed the dK/dV schedules since
removed; the rows there name them.)

    python bench/bench_gluon_bwd.py --out /tmp/gluon_bwd.json
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

from bench_gluon_fwd import case, interleaved
from bench_kernel import pair_count

from flexdist.kernels import flex_attention_backward, flex_attention_forward
from flexdist.kernels.gluon_bwd import gluon_dkdv, gluon_dq
from flexdist.kernels.triton_bwd import triton_backward, triton_delta
from flexdist.masks import document_block_mask


def _without_lead(fn):
    from flexdist.kernels import triton_fwd

    saved, triton_fwd.LEAD_SM_FRACTION = triton_fwd.LEAD_SM_FRACTION, 0.0
    try:
        return fn()
    finally:
        triton_fwd.LEAD_SM_FRACTION = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="pack,doc4k,causal")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name in args.cases.split(","):
        doc, Hq, Hkv = case(name, args.seed)
        S, D = doc.shape[0], args.dim
        pairs = pair_count(doc)
        fwd = 4.0 * Hq * D * pairs
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (
            torch.randn(1, h, S, D, generator=g).to(dev, torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq)
        )
        bm = document_block_mask(doc[None].to(dev), causal=True, block_size=128)
        gqa = Hq != Hkv
        out, lse = flex_attention_forward(q, k, v, bm, enable_gqa=gqa)
        delta = triton_delta(out, do)
        fns = {
            "dq_triton": lambda: triton_backward(q, k, v, out, do, lse, bm, enable_gqa=gqa, delta=delta, which="dq"),
            "dq_gluon": lambda: gluon_dq(q, k, v, do, lse, delta, bm, enable_gqa=gqa),
            "dkdv_triton": lambda: triton_backward(
                q, k, v, out, do, lse, bm, enable_gqa=gqa, delta=delta, which="dkdv"
            ),
            "dkdv_gluon": lambda: gluon_dkdv(q, k, v, do, lse, delta, bm, enable_gqa=gqa),
            "bwd_triton": lambda: flex_attention_backward(q, k, v, out, do, lse, bm, enable_gqa=gqa, backend="triton"),
            "bwd_auto": lambda: flex_attention_backward(q, k, v, out, do, lse, bm, enable_gqa=gqa),
        }  # fmt: skip
        # the same Gluon calls without the lead blocks ahead of the head groups (triton_fwd.launch_lead)
        for kn in ("dq_gluon", "dkdv_gluon", "bwd_auto"):
            fns[f"{kn}_lead0"] = lambda fn=fns[kn]: _without_lead(fn)
        a = fns["dq_triton"]()[0]
        b = fns["dq_gluon"]()
        err = float((a.float() - b.float()).abs().max())
        _, tk, tv = fns["dkdv_triton"]()
        gk, gv = fns["dkdv_gluon"]()
        err_kv = max(
            float((tk.float() - gk.float()).abs().max()), float((tv.float() - gv.float()).abs().max())
        )
        ms = interleaved(fns, args.rounds, args.reps)
        flops = {
            kn: fwd * (1.5 if kn.startswith("dq") else 2.0 if kn.startswith("dkdv") else 2.5) for kn in fns
        }
        row = dict(
            case=name, S=S, Hq=Hq, Hkv=Hkv, D=D, pairs=pairs, dq_max_abs_diff=err, dkdv_max_abs_diff=err_kv
        )
        for kname, t in ms.items():
            row[f"{kname}_ms"] = round(t, 4)
            row[f"{kname}_tflops"] = round(flops[kname] / (t * 1e-3) / 1e12, 1)
        rows.append(row)
        line = "  ".join(f"{kn} {t:.3f} ms {flops[kn] / (t * 1e-3) / 1e12:.0f}" for kn, t in ms.items())
        print(
            f"{name:7} S={S} H={Hq}:{Hkv}  {line}  TFLOP/s | max|ΔdQ| {err:.2e} max|ΔdK,dV| {err_kv:.2e}",
            flush=True,
        )
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                host=platform.node(), args=vars(args))  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
