"""Benchmark: flexdist's Triton flex-attention kernel vs compiled torch flex_attention and SDPA (flash, cuDNN).

Forward and backward TFLOP/s counting only unmasked (q, kv) pairs (forward 4·B·H·D·pairs, backward 2.5×
that), for causal and document-causal masks (exponential document lengths, seeded), B=1, H=16, D=128,
bf16, all in one process; peak extra memory of forward+backward next to each. All flex runs use the same
block structure (BlockMask built straight from the document ids); torch gets the usual closure mask_mod
(``doc[q] == doc[k] & q >= k``), flexdist the same mask as a ``DocumentMaskMod`` (evaluated natively) or,
for plain causal, the same Python mask_mod (evaluated once into bit tiles).

    python bench/bench_kernel.py --out bench/results/kernel.json          # full run (GPU)
    python bench/bench_kernel.py --quick --out /tmp/kernel_quick.json    # small shapes (GPU or CPU smoke)
    python bench/bench_kernel.py --sweep                                 # tile configs of the kernel
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import time

import torch

if "--quick" in sys.argv and not torch.cuda.is_available() and "triton" not in sys.modules:
    # CPU smoke test: the Triton kernel under the interpreter (must be set before triton.jit runs; once
    # triton is imported, as when bench_cp_multi --quick imports this module for a helper, setting it would
    # only send later calls to kernels that were compiled for a GPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

from flexdist.kernels import DocumentMaskMod, flex_attention, flex_attention_forward
from flexdist.kernels.triton_bwd import triton_backward
from flexdist.kernels.triton_fwd import triton_forward


def document_ids(S: int, mean: int | None, seed: int) -> torch.Tensor:
    """[S] contiguous document ids with exponential lengths of the given mean (None: one document)."""
    if mean is None:
        return torch.zeros(S, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    n = 4 * S // mean + 16
    lengths = (-torch.log(torch.rand(n, generator=g)) * mean).round().clamp_min(1).long()
    ends = torch.cumsum(lengths, 0)
    return torch.searchsorted(ends, torch.arange(S), right=True)


def pair_count(doc: torch.Tensor) -> int:
    """Exact number of visible (q, kv) pairs of the document-causal mask."""
    _, counts = torch.unique_consecutive(doc, return_counts=True)
    return int((counts * (counts + 1) // 2).sum())


def block_mask_from_docs(doc: torch.Tensor, block: int, mask_mod, device) -> BlockMask:
    """Document-causal BlockMask straight from sorted contiguous doc ids: O((S/block)²) ints, no S×S."""
    S = doc.shape[0]
    nb = -(-S // block)
    d = torch.nn.functional.pad(doc, (0, nb * block - S), value=int(doc[-1])).to(device)
    first, last = d[::block], d[block - 1 :: block]
    qb = torch.arange(nb, device=device)[:, None]
    kb = torch.arange(nb, device=device)[None, :]
    nonempty = (kb <= qb) & (last[None, :] >= first[:, None]) & (first[None, :] <= last[:, None])
    single = first == last
    full = (kb < qb) & single[:, None] & single[None, :] & (first[:, None] == first[None, :])
    partial = nonempty & ~full

    def lists(sel):
        num = sel.sum(-1).to(torch.int32)
        key = torch.where(sel, 0, nb) + torch.arange(nb, device=device)
        return num[None, None], key.argsort(-1).to(torch.int32)[None, None]

    n, i = lists(partial)
    fn, fi = lists(full)
    return BlockMask.from_kv_blocks(n, i, fn, fi, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(S, S))


def _bench(fn, quick: bool) -> float:
    """Milliseconds per call (triton do_bench on GPU: median over reps; wall clock on CPU)."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25 if quick else 100, rep=50 if quick else 300)
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _peak(fn) -> float:
    """Peak GiB allocated during fn beyond what was allocated before (CUDA only)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def run_case(name, S, mean, args, dev, dtype, results, make_compiled, save=None):
    """All rows of one (mask, S): flexdist, torch's compiled flex_attention, SDPA (causal); then a check.

    ``make_compiled()`` returns a fresh ``torch.compile(flex_attention, dynamic=False)`` (None: no torch
    rows). Dynamo's cache is reset first: each row compiles flex_attention for its own shape, mask_mod and
    grad mode (no_grad forward, forward for backward), and one function shared across rows would pass
    dynamo's recompile limit (8) after a few rows and silently fall back to eager flex (dense scores, OOM).
    ``save()`` is called after every row, so a time limit keeps the finished rows.
    """
    compiled_flex = None
    if make_compiled is not None:
        torch.compiler.reset()
        compiled_flex = make_compiled()
    B, H, D = 1, args.heads, args.dim
    doc = document_ids(S, mean, seed=0)
    pairs = pair_count(doc)
    fwd_flops = 4 * B * H * D * pairs
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, generator=g) for _ in range(3))
    do = torch.randn_like(q)
    doc_d = doc.to(dev)
    if mean is None:
        torch_mm = lambda b, h, qi, ki: qi >= ki
        ours_mm = torch_mm
    else:
        torch_mm = lambda b, h, qi, ki: (doc_d[qi] == doc_d[ki]) & (qi >= ki)
        pos = torch.arange(S, device=dev)[None]
        ours_mm = DocumentMaskMod(doc_d[None], doc_d[None], pos, pos)
    t0 = time.perf_counter()
    bm_t = block_mask_from_docs(doc, 128, torch_mm, dev)
    bm_o = block_mask_from_docs(doc, 128, ours_mm, dev)
    mask_ms = (time.perf_counter() - t0) * 1e3 / 2

    def fwd_bwd(f):
        def run():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = f(qq, kk, vv)
            torch.autograd.grad(out, (qq, kk, vv), do)

        return run

    impls = {
        "flexdist": (
            lambda: flex_attention_forward(q, k, v, bm_o),
            fwd_bwd(lambda a, b, c: flex_attention(a, b, c, block_mask=bm_o)),
        ),
    }
    if compiled_flex is not None:
        impls["torch_flex"] = (
            lambda: compiled_flex(q, k, v, block_mask=bm_t),
            fwd_bwd(lambda a, b, c: compiled_flex(a, b, c, block_mask=bm_t)),
        )
    if mean is None and torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = torch.nn.functional.scaled_dot_product_attention
        for label, be in (
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def f(a, b, c, be=be):
                with sdpa_kernel(be):
                    return sdpa(a, b, c, is_causal=True)

            impls[label] = (lambda f=f: f(q, k, v), fwd_bwd(f))
    for impl, (fwd, fb) in impls.items():
        row = {
            "mask": name,
            "S": S,
            "B": B,
            "H": H,
            "D": D,
            "dtype": str(dtype),
            "impl": impl,
            "pairs": pairs,
        }
        try:
            with torch.no_grad():
                t_f = _bench(fwd, args.quick)
            t_fb = _bench(fb, args.quick)
            mem = _peak(fb)
            t_b = max(t_fb - t_f, 1e-9)
            row.update(
                fwd_ms=t_f,
                fwd_bwd_ms=t_fb,
                bwd_ms=t_b,
                fwd_tflops=fwd_flops / t_f / 1e9,
                bwd_tflops=2.5 * fwd_flops / t_b / 1e9,
                fwd_bwd_tflops=3.5 * fwd_flops / t_fb / 1e9,
                peak_fwd_bwd_gib=mem,
                block_mask_build_ms=mask_ms,
            )
        except Exception as e:  # report, keep going (e.g. a backend unavailable for this shape)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        results.append(row)
        print(_fmt(row), flush=True)
        if save is not None:
            save()
    # correctness at benchmark scale: flexdist's out and grads against torch flex (same BlockMask)
    if compiled_flex is not None:
        try:
            ours = _outputs_and_grads(lambda a, b, c: flex_attention(a, b, c, block_mask=bm_o), q, k, v, do)
            ref = _outputs_and_grads(lambda a, b, c: compiled_flex(a, b, c, block_mask=bm_t), q, k, v, do)
            err = {
                n: float((x.float() - y.float()).abs().max())
                for n, x, y in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True)
            }
            scale = {
                n: float(y.float().abs().max()) for n, y in zip(("out", "dq", "dk", "dv"), ref, strict=True)
            }
            row = next(r for r in results if r["impl"] == "flexdist" and r["mask"] == name and r["S"] == S)
            row["max_abs_err_vs_torch_flex"] = err
            row["max_abs_torch_flex"] = scale
            print(
                f"{'':>10} {'':>7} {'check':>11} max|flexdist - torch flex| {err} (max|torch| {scale})",
                flush=True,
            )
            del ours, ref
        except Exception as e:
            print(f"correctness check failed to run: {type(e).__name__}: {e}", flush=True)


def _outputs_and_grads(f, q, k, v, do):
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = f(qq, kk, vv)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
    return out.detach(), dq, dk, dv


def _fmt(r) -> str:
    if "error" in r:
        return f"{r['mask']:>10} {r['S']:>7} {r['impl']:>11}  ERROR {r['error']}"
    return (
        f"{r['mask']:>10} {r['S']:>7} {r['impl']:>11} {r['fwd_tflops']:8.1f} {r['bwd_tflops']:8.1f} "
        f"{r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['peak_fwd_bwd_gib']:8.2f}"
    )


MASK_MEANS = {"causal": None, "doc4k": 4096, "doc1k": 1024}  # mean document length per --masks name


def kernel_inputs(name: str, S: int, args, dev, dtype):
    """One sweep shape: q, k, v, the flexdist BlockMask, a forward's (out, lse), a dout and the fwd FLOPs."""
    q, k, v, bm, flops = sweep_problem(name, S, args, dev, dtype)
    o, lse = triton_forward(q, k, v, bm)
    return q, k, v, bm, o, lse, torch.randn_like(o), flops


def sweep_problem(name: str, S: int, args, dev, dtype):
    """One sweep shape's q, k, v, flexdist BlockMask and forward FLOPs (``args``: heads, dim)."""
    if name not in MASK_MEANS:
        raise ValueError(f"--masks must be among {sorted(MASK_MEANS)}, got {name!r}")
    mean = MASK_MEANS[name]
    doc = document_ids(S, mean, 0)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(1, args.heads, S, args.dim, device=dev, dtype=dtype, generator=g) for _ in range(3)
    )
    if mean is None:
        mm = lambda b, h, qi, ki: qi >= ki
    else:
        dd = doc.to(dev)
        pos = torch.arange(S, device=dev)[None]
        mm = DocumentMaskMod(dd[None], dd[None], pos, pos)
    bm = block_mask_from_docs(doc, 128, mm, dev)
    return q, k, v, bm, 4 * args.heads * args.dim * pair_count(doc)


def _error(e: BaseException) -> str:
    """An exception for a results row: long enough to tell a compiler pass's complaint apart (Triton puts
    the failing pass near the end of a long message), short enough for a JSON row."""
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= 500 else f"{msg[:300]} [...] {msg[-200:]}"


def _cuda_broken() -> str | None:
    """After a failed config: the error of a poisoned CUDA context (an illegal access is sticky: every later
    launch of the process would fail with it), None if the device still works. A compile error never gets
    this far, it is raised before anything is launched."""
    if not torch.cuda.is_available():
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as e:
        return _error(e)
    return None


_PROBE = """
import argparse, sys
import torch
sys.path.insert(0, {bench!r})
import bench_kernel as bk
a = argparse.Namespace(heads={heads}, dim={dim})
q, k, v, bm, _ = bk.sweep_problem({name!r}, {S}, a, "cuda", {dtype})
bk.triton_forward(q, k, v, bm, config={cfg!r})
torch.cuda.synchronize()
"""


def probe_in_child(cfg: tuple, name: str, S: int, args, dtype) -> str | None:
    """Compile and run the forward with ``cfg`` once in a child process: None if it worked, else why not.

    For warp-specialized configs. On an H200 with Triton 3.6 a failing NVGPUWarpSpecialization pass tripped an
    LLVM assertion (abort) that MLIR's crash recovery turned into a RuntimeError inside the process, which
    then went on compiling every later config; a hang or a hard abort would end the sweep. In a child none
    of this reaches the sweep, and the kernel it compiled lands in Triton's on-disk cache for the sweep's
    own launch (same shape, same specialization).
    """
    import subprocess

    code = _PROBE.format(
        bench=os.path.dirname(os.path.abspath(__file__)), heads=args.heads, dim=args.dim, name=name, S=S,
        dtype=str(dtype), cfg=tuple(cfg),
    )  # fmt: skip
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "TimeoutExpired: the child did not compile and run the config in 600 s"
    if r.returncode == 0:
        return None
    lines = r.stderr.strip().splitlines()
    # the compiler's own words (assertion, failing pass) and the Python exception, not the IR dump between
    said = [ln.strip() for ln in lines if "Assertion" in ln or "error:" in ln or "Pipeline failed" in ln]
    tail = lines[-1] if lines else f"exit status {r.returncode}, no output"
    return _error(RuntimeError(f"child exit {r.returncode}: {tail} | " + " | ".join(said[:3])))


def parse_cfgs(text: str) -> list[tuple]:
    """Tile configs from the command line: tuples, e.g. ``(128,64,4,3),(64,64,4,3)`` (no spaces or brackets
    needed, so the list passes unquoted through a shell variable); one tuple alone is a list of one."""
    val = ast.literal_eval(text)
    if not isinstance(val, (tuple, list)) or not val:
        raise ValueError(f"configs must be tuples like (128,64,4,3), got {text!r}")
    if not isinstance(val[0], (tuple, list)):
        val = [val]
    return [tuple(c) for c in val]


def sweep(args, dev, dtype, save=None) -> list[dict]:
    """Time the kernel's tile configs (forward; dK/dV and dQ separately) at one shape per mask.

    A config that fails (compile error, e.g. warp specialization the installed Triton cannot do) gets an
    error row and the sweep goes on; one that breaks the CUDA context ends the sweep with the rows so far.
    Warp-specialized configs are first compiled in a child process (``probe_in_child``).
    Forward rows also give the largest difference from the shipped path's output. ``save(rows)`` is called
    after every row, so a time limit keeps the finished ones.
    """
    from flexdist.kernels.triton_bwd import bwd_config

    S = args.sweep_seq
    out = []
    c1s = [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)]
    c2s = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2)]
    fwd_cfgs = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
    fwd_cfgs += [(128, 128, 8, 3, True), (128, 64, 4, 3, True)]  # the FMA softmax beside its plain twins
    # K/V through device-side TMA descriptors (6th entry), then also Triton's automatic warp specialization
    # of the kv loop (7th; experimental on Hopper: a compile error is a result too; Triton 3.6 on an H200
    # failed the pass at 4 warps and left the loop unspecialized at 8); last, so a config that breaks the
    # process cannot cost the plain rows
    fwd_cfgs += [(128, 128, 8, 3, False, True), (128, 128, 8, 3, False, True, True)]
    fwd_cfgs += [(128, 64, 4, 3, False, True), (128, 64, 4, 3, False, True, True)]
    fwd_cfgs += [(128, 128, 8, 3, True, True)]  # FMA softmax + TMA
    # QK^T one sub-tile ahead (8th entry, pipe_qk): slower on triton 3.6 (s12); for a Triton whose wgmma
    # pass keeps that dot in flight
    fwd_cfgs += [(128, 64, 4, 3, True, False, False, True)]
    if args.sweep_fwd_cfgs:
        fwd_cfgs = parse_cfgs(args.sweep_fwd_cfgs)
    if args.sweep_bwd_cfgs:
        c1s = parse_cfgs(args.sweep_bwd_cfgs)

    def record(row: dict) -> str | None:
        out.append(row)
        print(row, flush=True)
        broken = _cuda_broken() if "error" in row else None
        if broken:
            out.append({"mask": row["mask"], "pass": row["pass"], "cfg": row["cfg"], "cuda_broken": broken})
            print(out[-1], flush=True)
        if save is not None:
            save(out)
        return broken

    for name in args.masks.split(","):
        q, k, v, bm, o, lse, do, fl = kernel_inputs(name, S, args, dev, dtype)
        shipped = None
        for c in [None, *fwd_cfgs]:  # None: the shipped path (autotuned on GPU for these shapes)
            row = {"mask": name, "S": S, "pass": "fwd", "cfg": c}
            ws = c is not None and len(c) > 6 and c[6]
            why = probe_in_child(c, name, S, args, dtype) if ws and torch.cuda.is_available() else None
            try:
                if why is not None:
                    raise RuntimeError(f"(probed in a child process) {why}")
                t = _bench(lambda c=c: triton_forward(q, k, v, bm, config=c), True)
                row.update(ms=t, tflops=fl / t / 1e9)
                res = triton_forward(q, k, v, bm, config=c)[0]
                if shipped is None:
                    shipped = res
                else:
                    row["max_abs_diff_vs_shipped"] = float((res.float() - shipped.float()).abs().max())
                del res
            except Exception as e:
                row["error"] = _error(e)
            if record(row):
                return out
        if args.sweep_fwd_only:
            continue
        d1, d2 = bwd_config(args.dim, True)
        # every backward row times both kernels: the shipped path (autotuned on GPU), then one kernel's fixed
        # tile config with the other at its default
        for which, cfgs in (("shipped", [None]), ("dkdv", c1s), ("dq", c2s)):
            if args.sweep_bwd_only and which not in args.sweep_bwd_only.split(","):
                continue
            for c in cfgs:
                cfg = None if c is None else ((c, d2) if which == "dkdv" else (d1, c))
                row = {"mask": name, "S": S, "pass": f"bwd[{which}]", "cfg": c}
                try:
                    t = _bench(lambda cfg=cfg: triton_backward(q, k, v, o, do, lse, bm, config=cfg), True)
                    row.update(ms=t, tflops=2.5 * fl / t / 1e9)
                except Exception as e:
                    row["error"] = _error(e)
                if record(row):
                    return out
    return out


def head_group_sweep(args, dev, dtype) -> list[dict]:
    """Time the forward and the backward kernels for each launch head grouping (``head_group``; None: the
    shipped rule) at every --seqs size and --masks mask, with the shipped (autotuned) tiles."""
    groups = [None, *(int(x) for x in args.head_groups.split(","))]
    out = []
    for name in args.masks.split(","):
        for S in (int(x) for x in args.seqs.split(",")):
            q, k, v, bm, o, lse, do, fl = kernel_inputs(name, S, args, dev, dtype)
            for hg in groups:
                row = {"mask": name, "S": S, "head_group": hg}
                try:
                    tf = _bench(lambda hg=hg: triton_forward(q, k, v, bm, head_group=hg), False)
                    tb = _bench(lambda hg=hg: triton_backward(q, k, v, o, do, lse, bm, head_group=hg), False)
                    row.update(fwd_ms=tf, bwd_ms=tb, fwd_tflops=fl / tf / 1e9, bwd_tflops=2.5 * fl / tb / 1e9)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                out.append(row)
                print(row, flush=True)
            q = k = v = o = lse = do = None  # free before the next size
            torch.cuda.empty_cache()
    return out


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument(
        "--quick", action="store_true", help="small shapes (smoke test; CPU runs the interpreter)"
    )
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--masks", default="causal,doc4k,doc1k")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch flex baseline")
    ap.add_argument("--sweep", action="store_true", help="time tile configs of the kernel instead")
    ap.add_argument("--sweep-seq", type=int, default=32768)
    ap.add_argument("--sweep-fwd-only", action="store_true", help="--sweep: the forward configs only")
    ap.add_argument(
        "--sweep-fwd-cfgs",
        default=None,
        help="--sweep: the forward configs to time instead of the built-in list, tuples "
        "(BLOCK_M,BLOCK_N,warps,stages[,fma[,tma[,ws[,pipe_qk]]]]) separated by commas",
    )
    ap.add_argument(
        "--sweep-bwd-cfgs",
        default=None,
        help="--sweep: the dK/dV configs to time instead of the built-in list, tuples "
        "(BLOCK_M,BLOCK_N,warps,stages) separated by commas",
    )
    ap.add_argument(
        "--sweep-bwd-only",
        default=None,
        help="--sweep: only these backward row kinds, comma-separated (shipped, dkdv, dq)",
    )
    ap.add_argument(
        "--head-groups",
        default=None,
        help="time these launch head groupings (e.g. 1,2,4,16) beside the shipped rule instead (GPU)",
    )
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        seqs = [1024, 4096] if cuda else [256]
        if not cuda:
            args.heads, args.dim = 2, 64
    else:
        seqs = [int(s) for s in args.seqs.split(",")]
    meta = {
        "gpu": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype),
        "B": 1,
        "H": args.heads,
        "D": args.dim,
        "flops": "only unmasked (q, kv) pairs: fwd 4*B*H*D*pairs, bwd 2.5x fwd; bwd time = (fwd+bwd) - fwd",
        "timing": "triton.testing.do_bench (median ms)" if cuda else "wall clock, one call",
    }
    print(json.dumps(meta))
    if args.head_groups:
        res = head_group_sweep(args, dev, dtype)
        if args.out:
            _write(args.out, {"meta": meta, "head_group_sweep": res})
        return
    if args.sweep:
        if args.quick and not cuda:
            args.sweep_seq = min(args.sweep_seq, 256)  # the interpreter: a smoke test of the sweep's code

        def save_sweep(rows: list[dict], partial: bool = True) -> None:
            if args.out:
                _write(args.out, {"meta": meta, "sweep": rows, "partial": partial})

        res = sweep(args, dev, dtype, save_sweep)
        save_sweep(res, partial=False)
        return
    make_compiled = None
    if cuda and not args.no_torch:
        # dynamic=False: without it torch.compile switches to dynamic shapes at the second sequence length,
        # and the dynamic flex kernel is markedly slower — an unfair baseline (it was, in an earlier run).
        # One compiled function per (mask, S) row, after a dynamo reset (see run_case).
        def make_compiled():
            return torch.compile(torch_flex, dynamic=False)

    masks = dict(MASK_MEANS)
    if args.quick and not cuda:
        masks = {"causal": None, "doc64": 64}
    print(
        f"{'mask':>10} {'S':>7} {'impl':>11} {'fwd TF/s':>8} {'bwd TF/s':>8} {'fwd ms':>9} {'bwd ms':>9} {'peak GiB':>8}"
    )
    results: list[dict] = []

    def save() -> None:  # partial results survive a time limit
        if args.out:
            _write(args.out, {"meta": meta, "results": results, "partial": True})

    names = list(masks) if (args.quick and not cuda) else args.masks.split(",")
    for name in names:
        if name not in masks:
            raise SystemExit(f"unknown mask {name!r}; choose from {sorted(masks)}")
        for S in seqs:
            if masks[name] is not None and masks[name] >= S and not args.quick:
                continue
            run_case(name, S, masks[name], args, dev, dtype, results, make_compiled, save)
            if cuda:
                torch.cuda.empty_cache()
            save()
    speed = []
    for r in results:
        if r["impl"] == "flexdist" and "error" not in r:
            base = next(
                (
                    x
                    for x in results
                    if x["impl"] == "torch_flex"
                    and x["mask"] == r["mask"]
                    and x["S"] == r["S"]
                    and "error" not in x
                ),
                None,
            )
            if base and cuda:
                speed.append(
                    {
                        "mask": r["mask"],
                        "S": r["S"],
                        "fwd_x_torch_flex": base["fwd_ms"] / r["fwd_ms"],
                        "bwd_x_torch_flex": base["bwd_ms"] / r["bwd_ms"],
                    }
                )
    for s in speed:
        print(
            f"flexdist vs torch flex  {s['mask']:>7} S={s['S']:>7}: fwd {s['fwd_x_torch_flex']:.2f}x  bwd {s['bwd_x_torch_flex']:.2f}x"
        )
    if args.out:
        from flexdist.kernels.triton_fwd import tuned_choices

        _write(args.out, {"meta": meta, "results": results, "speedup": speed, "autotuned": tuned_choices()})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
