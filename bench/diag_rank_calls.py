"""Where a CP rank's all-gather forward call loses against 1/N of the one-GPU call (one GPU).

bench_cp_sim at N = 8 (8k tokens per rank, document-causal) measured each rank's forward call over the whole
sequence's keys about 8% slower per visited block than the one-GPU call over the same blocks
(``results/2026-11-26-s7``). This script times, in one process, calls that differ in one thing each:

- ``one GPU``: all queries against all keys in natural order (the efficiency baseline);
- ``one GPU, plan order``: the same blocks with queries and keys in the planner's order (permuted blocks);
- ``ranks, strided``: every rank's call as flexdist.cp.allgather makes it (K/V strided views of the
  token-major gathered buffer, every head in one launch group); the sum over ranks is the work of one GPU;
- ``ranks, contiguous``: the same with K/V copied to ``[1, Hkv, S, D]`` (the layout the one-GPU call reads);
- ``ranks, rule``: strided, with the kernels' launch-group rule (L2-sized head groups);
- each of the above also at fixed tiles ``--configs`` instead of the autotuner's choice.

If the plan-order one-GPU call is as fast as the natural one, the loss is in splitting the grid over ranks
(L2 reuse across a call's programs, tails); if it is as slow as the ranks' sum, it is the permuted key
order. Usage (GPU): ``python bench/diag_rank_calls.py --n 8 --out bench/results/diag_rank_calls.json``
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cp_sim import layout, timer, visible_pairs
from bench_planner import make_pack

from flexdist.cp import balance as bal
from flexdist.cp.allgather import _pack, _seq_view
from flexdist.cp.plan import build_pair_masks
from flexdist.kernels import flex_attention_forward
from flexdist.kernels.triton_fwd import triton_forward, tuned_choices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens-per-rank", type=int, default=8192)
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--mean-doc", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--configs",
        nargs="*",
        default=["128,128,8,3", "128,64,4,3"],
        help="fixed BLOCK_M,BLOCK_N,warps,stages",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run at tiny sizes (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.quick:
        dev, dt = torch.device("cpu"), torch.float32
        args.n, args.tokens_per_rank, args.hq, args.hkv, args.d, args.mean_doc = 2, 256, 4, 2, 16, 200
        args.reps, args.configs = 1, ["64,64,4,1"]
    elif not torch.cuda.is_available():
        sys.exit("diag_rank_calls needs a CUDA GPU (or --quick with TRITON_INTERPRET=1)")
    else:
        dev, dt = torch.device("cuda"), torch.bfloat16
    N, L, Hq, Hkv, D, bs = args.n, args.tokens_per_rank, args.hq, args.hkv, args.d, 128
    S = N * L
    doc = make_pack(S, args.mean_doc, "mixture", args.seed).to(dev)
    flops = 4.0 * Hq * D * visible_pairs(doc)
    cost = bal.CostModel(comm_weight=(Hkv / Hq) * (400e12 / 450e9) / bs)
    perm = layout("document", doc, N, bs, cost).to(dev)
    shards = [perm[r * L : (r + 1) * L] for r in range(N)]
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, Hq, S, D, generator=g).to(dev, dt)
    k = torch.randn(1, Hkv, S, D, generator=g).to(dev, dt)
    v = torch.randn(1, Hkv, S, D, generator=g).to(dev, dt)
    tm = timer(dev, args.reps)
    mk = lambda qi, ki: build_pair_masks(doc, qi, [ki], causal=True, window=None, block_size=bs)[0][0]
    # (the quick run also checks that every variant computes the same output)
    ar = torch.arange(S, device=dev)
    one_mask, perm_mask = mk(ar, ar), mk(perm, perm)
    rank_masks = [mk(s, perm) for s in shards]
    kp, vp, qp = k[:, :, perm].contiguous(), v[:, :, perm].contiguous(), q[:, :, perm].contiguous()
    gathered = _seq_view(torch.stack([_pack(k[:, :, s], v[:, :, s], 0, Hkv) for s in shards]))
    ks, vs = gathered[..., :D], gathered[..., D:]
    qs = [q[:, :, s] for s in shards]
    assert torch.equal(ks, kp) and not ks.is_contiguous()

    configs = [None] + [tuple(int(x) for x in c.split(",")) for c in args.configs]
    rows = []

    def fwd(qq, kk, vv, m, cfg, hg):
        if cfg is None:
            return lambda: flex_attention_forward(qq, kk, vv, m, enable_gqa=True, head_group=hg)
        return lambda: triton_forward(qq, kk, vv, m, enable_gqa=True, head_group=hg, config=cfg)

    for cfg in configs:
        name = "tuned" if cfg is None else ",".join(map(str, cfg))
        res = {
            "one GPU": tm(fwd(q, k, v, one_mask, cfg, None)),
            "one GPU, plan order": tm(fwd(qp, kp, vp, perm_mask, cfg, None)),
        }
        for label, kk, vv, hg in (
            ("ranks, strided", ks, vs, Hq),
            ("ranks, contiguous", kp, vp, Hq),
            ("ranks, rule", ks, vs, None),
        ):
            per = [tm(fwd(qs[r], kk, vv, rank_masks[r], cfg, hg)) for r in range(N)]
            res[label] = sum(per)
            res[label + " (max×N)"] = max(per) * N
            rows.append(dict(config=name, call=label, per_rank_ms=[round(t * 1e3, 4) for t in per]))
        if args.quick:
            want = fwd(q, k, v, one_mask, cfg, None)()[0][:, :, perm]
            got = torch.cat([fwd(qs[r], ks, vs, rank_masks[r], cfg, Hq)()[0] for r in range(N)], dim=2)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        base = res["one GPU"]
        for call, t in res.items():
            rows.append(
                dict(config=name, call=call, ms=round(t * 1e3, 4), tflops=flops / t / 1e12, vs_one=t / base)
            )
            print(
                f"{name:>12} {call:26} {t * 1e3:8.3f} ms {flops / t / 1e12:6.0f} TFLOP/s  ×{t / base:.3f}",
                flush=True,
            )
    picks = tuned_choices()
    print("autotuner picks:", json.dumps(picks.get("fwd", {})))
    if args.out:
        meta = dict(
            benchmark="diag_rank_calls",
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            args=vars(args),
            tuned=picks,
        )
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
