"""Build time of document BlockMasks: flexdist's analytic builders vs torch's ``create_block_mask``.

Two parts, both document-causal (exponential document lengths, mean 4k tokens, seeded), block size 128:

1. one mask over the whole packed sequence at S = 8k, 32k, 128k, 512k: ``flexdist.document_block_mask``
   (default backend: two Triton kernels on CUDA; also its torch-ops backend, the previous builder) vs torch
   ``create_block_mask`` eager and ``torch.compile(create_block_mask, dynamic=False)`` — compiled afresh for
   every size after ``torch.compiler.reset()`` (so the recompile limit is never hit; the first call, compile
   included, is reported as ``compile_s``);
2. all N×N (query rank, key rank) masks of an N-rank CP plan (default 8 ranks, S = 128k), for contiguous shards
   and a zigzag of 2N chunks: ``flexdist.masks.rank_step_block_masks`` — the tables alone and with all N²
   BlockMask objects made, each with and without ``validate`` — vs N² single-mask calls and, for the contiguous
   layout (``--plan-baselines`` for both), N² torch ``create_block_mask`` calls (eager, compiled).

Timings are wall-clock medians with the device synchronised before and after each call (mask building is
host-bound, so launch and Python overheads are part of the cost). Peak memory is the CUDA allocator's peak above
the memory held before the call. Every torch result that is computed is also compared block for block with
ours (``match``). Eager ``create_block_mask`` materialises int64 index grids of S×S (8·S² bytes); it is
skipped, and the row says so, where that exceeds ``--eager-limit-gib``.

    python bench/bench_masks.py --out bench/results/masks_h100.json      # GPU, full sizes (~1 min on an H100)
    python bench/bench_masks.py --quick                                   # CPU smoke test, small sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from flexdist.masks import document_block_mask, lengths_to_doc_ids, rank_step_block_masks


def exponential_doc_ids(S: int, mean: float, seed: int, device: torch.device) -> torch.Tensor:
    """``[1, S]`` ids of documents with exponential lengths (mean ``mean``, at least 1 token), seeded."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    total = 0
    while total < S:
        n = max(1, math.ceil(-mean * math.log(1.0 - torch.rand((), generator=g).item())))
        n = min(n, S - total)
        lengths.append(n)
        total += n
    return lengths_to_doc_ids([lengths], S).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1):
    """(median ms, peak GiB above the starting allocation or None on CPU, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
        del out
    sync(device)
    peak = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        out = None
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return statistics.median(times), peak, out


def _occupancy(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """bool [..., R, C] block occupancy from (num [..., R], idx [..., R, C]); entries past num are ignored."""
    C = idx.shape[-1]
    valid = torch.arange(C, device=idx.device) < num[..., None]
    dense = torch.zeros(*idx.shape[:-1], C + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, torch.where(valid, idx.long(), C), True)
    return dense[..., :C]


def same_blocks(a: BlockMask, b: BlockMask) -> bool:
    """Same partial and same full blocks (as sets; the order of unused index slots is not compared)."""
    pairs = (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"))
    for num, idx in pairs:
        oa = _occupancy(getattr(a, num), getattr(a, idx))
        ob = _occupancy(getattr(b, num), getattr(b, idx))
        if not torch.equal(oa.to(ob.device), ob):
            return False
    return True


def doc_causal_mod(q_doc: torch.Tensor, kv_doc: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor):
    """The mask_mod a torch user writes for document-causal attention over (possibly sharded) tokens."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_doc[b, q_idx] == kv_doc[b, kv_idx]) & (q_pos[b, q_idx] >= kv_pos[b, kv_idx])

    return mask_mod


def zigzag(S: int, N: int, device: torch.device) -> torch.Tensor:
    c = S // (2 * N)
    chunks = torch.arange(S, device=device).view(2 * N, c)
    return torch.stack([torch.cat([chunks[r], chunks[2 * N - 1 - r]]) for r in range(N)])


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def row_line(key, r) -> str:
    note = r.get("skipped") or ("" if "match" not in r else f"match={r['match']}")
    if r.get("compile_s") is not None:
        note = f"{note} compile+first call {r['compile_s']:.1f} s".strip()
    return (
        f"{key:<11} {r['method']:<60} {fmt(r['ms']):>10} {fmt(r.get('speedup'), '.1f'):>8} "
        f"{fmt(r.get('peak_gib')):>9}  {note}"
    )


def timed_compile(compiled_cbm, args, kwargs, device) -> float:
    """Seconds of the first call of a freshly reset compiled create_block_mask (compile included)."""
    sync(device)
    t0 = time.perf_counter()
    out = compiled_cbm(*args, **kwargs)
    sync(device)
    del out
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="*", help="sequence lengths of part 1")
    ap.add_argument("--plan-seq", type=int, help="sequence length of the CP plan (part 2)")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--mean-doc", type=float, default=4096.0)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--eager-limit-gib", type=float, default=40.0)
    ap.add_argument(
        "--compile", dest="compile", action="store_true", default=None, help="time compiled torch"
    )
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument(
        "--compile-max-seq",
        type=int,
        default=None,
        help="time compiled torch only up to this S in part 1 (its 512k compile alone can take minutes)",
    )
    ap.add_argument(
        "--plan-baselines",
        choices=["contiguous", "both", "none"],
        default="contiguous",
        help="layouts of part 2 that also time N² torch create_block_mask calls (seconds each)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_start = time.perf_counter()
    device = torch.device(args.device)
    sizes = args.sizes or ([2048, 8192] if args.quick else [8192, 32768, 131072, 524288])
    plan_seq = args.plan_seq or (8192 if args.quick else 131072)
    repeats = args.repeats or (3 if args.quick else 20)
    use_compile = args.compile if args.compile is not None else not args.quick
    bs, N = args.block_size, args.ranks

    meta = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "block_size": bs,
        "mean_doc": args.mean_doc,
        "mask": "document-causal",
        "B": 1,
        "repeats": repeats,
        "ours_backend": "triton" if device.type == "cuda" else "torch",
        "timing": "wall-clock median, device synchronised before and after each call",
        "compiled": "torch.compile(create_block_mask, dynamic=False), torch.compiler.reset() before each shape",
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        pass
    print(
        f"# {meta['gpu'] or 'CPU'} | torch {meta['torch']} | triton {meta['triton']} | block {bs} | "
        f"ours = {meta['ours_backend']} backend"
    )

    # ------------------------------------------------------------------ part 1: one mask over S tokens
    single = []
    print(f"\n{'S':<11} {'method':<60} {'ms':>10} {'speedup':>8} {'peak GiB':>9}  match / note")
    for S in sizes:
        doc = exponential_doc_ids(S, args.mean_doc, args.seed, device)
        n_docs = int((doc[0, 1:] != doc[0, :-1]).sum()) + 1
        ours_ms, ours_peak, ours = measure(lambda: document_block_mask(doc, block_size=bs), device, repeats)
        rows = [dict(S=S, docs=n_docs, method="flexdist.document_block_mask", ms=ours_ms, peak_gib=ours_peak)]
        if device.type == "cuda":
            ms, peak, prev = measure(
                lambda: document_block_mask(doc, block_size=bs, backend="torch"), device, repeats
            )
            rows.append(
                dict(
                    S=S,
                    method="  same, backend='torch' (torch-ops builder)",
                    ms=ms,
                    peak_gib=peak,
                    match=same_blocks(ours, prev),
                )
            )
            del prev
        mm = doc_causal_mod(
            doc, doc, torch.arange(S, device=device)[None], torch.arange(S, device=device)[None]
        )
        eager_gib = 8 * S * S / 2**30
        if eager_gib > args.eager_limit_gib:
            rows.append(
                dict(
                    S=S,
                    method="torch create_block_mask (eager)",
                    ms=None,
                    skipped=f"needs ~{eager_gib:.0f} GiB (8·S² bytes) > --eager-limit-gib {args.eager_limit_gib}",
                )
            )
        else:
            reps = max(1, min(repeats, 5 if S > 16384 else repeats))
            ms, peak, ref = measure(
                lambda: create_block_mask(mm, 1, None, S, S, device=device, BLOCK_SIZE=bs), device, reps
            )
            rows.append(
                dict(
                    S=S,
                    method="torch create_block_mask (eager)",
                    ms=ms,
                    peak_gib=peak,
                    match=same_blocks(ours, ref),
                )
            )
            del ref
        if use_compile and args.compile_max_seq is not None and args.compile_max_seq < S:
            rows.append(
                dict(
                    S=S,
                    method="torch.compile(create_block_mask)",
                    ms=None,
                    skipped=f"S > --compile-max-seq {args.compile_max_seq}",
                )
            )
        elif use_compile:
            torch.compiler.reset()
            compiled_cbm = torch.compile(create_block_mask, dynamic=False)
            call_args = (mm, 1, None, S, S)
            call_kw = dict(device=device, BLOCK_SIZE=bs)
            compile_s = timed_compile(compiled_cbm, call_args, call_kw, device)
            reps = max(1, min(repeats, 3 if S > 131072 else repeats))
            ms, peak, ref = measure(lambda: compiled_cbm(*call_args, **call_kw), device, reps, warmup=1)
            rows.append(
                dict(
                    S=S,
                    method="torch.compile(create_block_mask)",
                    ms=ms,
                    peak_gib=peak,
                    match=same_blocks(ours, ref),
                    compile_s=compile_s,
                )
            )
            del ref
        else:
            rows.append(dict(S=S, method="torch.compile(create_block_mask)", ms=None, skipped="--no-compile"))
        for r in rows:
            r["speedup"] = (r["ms"] / ours_ms) if r.get("ms") else None
            r["speedup_of_ours"] = r["speedup"]
            print(row_line(S, r))
        single += rows
    t_single = time.perf_counter() - t_start

    # ------------------------------------------------------------------ part 2: N×N masks of a CP plan
    plan_rows = []
    S = plan_seq
    L = S // N
    doc = exponential_doc_ids(S, args.mean_doc, args.seed + 1, device)
    print(f"\nCP plan: {N} ranks × {L} tokens (S={S}), all {N * N} (q rank, kv rank) masks")
    print(f"{'layout':<11} {'method':<60} {'ms':>10} {'speedup':>8} {'peak GiB':>9}  note")
    if use_compile:
        torch.compiler.reset()  # one fresh static compile for the L×L shape of every pair
    compiled_cbm = torch.compile(create_block_mask, dynamic=False) if use_compile else None
    for layout in ("contiguous", "zigzag"):
        pos = torch.arange(S, device=device).view(N, L) if layout == "contiguous" else zigzag(S, N, device)

        def batched(validate: bool, objects: bool = False, q_ranks=None, backend: str = "auto"):
            m = rank_step_block_masks(
                doc, pos, block_size=bs, validate=validate, q_ranks=q_ranks, backend=backend
            )
            if objects:
                m.all_masks()
            return m

        def singles():
            return [
                [
                    document_block_mask(doc, q_positions=pos[r], kv_positions=pos[j], block_size=bs)
                    for j in range(N)
                ]
                for r in range(N)
            ]

        objects_name = f"rank_step_block_masks: tables + {N * N} objects"
        cases = [
            ("rank_step_block_masks: tables (validate=False)", lambda: batched(False)),
            ("rank_step_block_masks: tables (validate=True)", lambda: batched(True)),
            (f"{objects_name} (validate=False)", lambda: batched(False, True)),
            (f"{objects_name} (validate=True)", lambda: batched(True, True)),
            (f"one rank's row: q_ranks=[0] + {N} objects", lambda: batched(False, True, [0])),
            (f"{N * N} × document_block_mask", singles),
        ]
        if device.type == "cuda":
            cases.append(
                (
                    f"  backend='torch' (torch-ops builder) + {N * N} objects",
                    lambda: batched(False, True, None, "torch"),
                )
            )
        results = {}
        for name, fn in cases:
            ms, peak, out = measure(fn, device, repeats)
            results[name] = out
            plan_rows.append(dict(layout=layout, method=name, ms=ms, peak_gib=peak))
        masks = results[f"{objects_name} (validate=False)"]
        counts = masks.counts_cpu()
        empty = int(((counts[0] + counts[1]) == 0).sum())
        ours_ms = plan_rows[-len(cases) + 2]["ms"]  # tables + objects, validate=False

        qd = doc[0, pos][:, None, :]  # [N, 1, L] doc ids of each rank's tokens
        qp = pos[:, None, :]

        def torch_all(fn_cbm):
            return [
                [
                    fn_cbm(
                        doc_causal_mod(qd[r], qd[j], qp[r], qp[j]),
                        1,
                        None,
                        L,
                        L,
                        device=device,
                        BLOCK_SIZE=bs,
                    )
                    for j in range(N)
                ]
                for r in range(N)
            ]

        baselines = []
        if args.plan_baselines == "both" or args.plan_baselines == layout:
            eager_gib = 8 * L * L / 2**30
            if eager_gib <= args.eager_limit_gib:
                baselines.append((f"{N * N} × torch create_block_mask (eager)", create_block_mask, 1))
            if compiled_cbm is not None:
                baselines.append((f"{N * N} × torch.compile(create_block_mask)", compiled_cbm, 2))
        for name, fn_cbm, warm in baselines:
            reps = max(1, min(repeats, 3))
            ms, peak, ref = measure(lambda fn_cbm=fn_cbm: torch_all(fn_cbm), device, reps, warmup=warm)
            match = all(same_blocks(masks.get(r, j), ref[r][j]) for r in range(N) for j in range(N))
            plan_rows.append(dict(layout=layout, method=name, ms=ms, peak_gib=peak, match=match))
            del ref
        if not baselines:
            plan_rows.append(
                dict(
                    layout=layout,
                    method="torch create_block_mask baselines",
                    ms=None,
                    skipped="--plan-baselines",
                )
            )
        for r in plan_rows:
            if r["layout"] != layout:
                continue
            r["speedup"] = r["ms"] / ours_ms if r.get("ms") else None
            r["speedup_of_ours"] = r["speedup"]
            r["empty_pairs"] = empty
            r["partial_blocks"] = int(counts[0].sum())
            r["full_blocks"] = int(counts[1].sum())
            print(row_line(layout, r))
        print(
            f"{layout:<11} {empty} of {N * N} pairs empty; {int(counts[0].sum())} partial and "
            f"{int(counts[1].sum())} full blocks in total"
        )
    t_total = time.perf_counter() - t_start
    print(
        "\nspeedup = method time / time of our corresponding builder (document_block_mask; plan: tables +"
        f" objects, validate=False). Wall time: part 1 {t_single:.1f} s, total {t_total:.1f} s"
    )

    if args.out:
        payload = {
            "meta": meta,
            "single_mask": single,
            "cp_plan": plan_rows,
            "plan": {"S": S, "ranks": N, "L": L},
            "wall_s": {"single": t_single, "total": t_total},
        }
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
