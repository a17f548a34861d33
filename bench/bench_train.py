"""Benchmark: training throughput of the Llama model on one device — flexdist vs torch flex vs SDPA cuDNN.

For each model (350m, 1b) and packed length (16k, 64k tokens) one training step (forward, backward, AdamW)
is timed with three attention implementations, in one process, on the same packed stdlib windows:

- ``flexdist``: flexdist's Triton kernel with the document-causal BlockMask from ``flexdist.masks``;
- ``torch_flex``: ``torch.compile(torch.nn.attention.flex_attention.flex_attention)`` with the same block
  structure and the usual closure ``mask_mod`` (same document and causal);
- ``sdpa_cudnn_causal``: SDPA with the cuDNN backend and plain causal masking over the whole window — NOT
  the same mask (documents see each other), the speed ceiling of dense causal attention.

Reported: tokens/s, MFU (model FLOPs per token from ``flexdist.model.flops_per_token`` with the attention
pairs each variant actually computes: document-causal pairs for the flex variants, causal pairs for SDPA;
peak 989 TFLOP/s bf16 for H100/H200, ``--peak-tflops`` otherwise) and peak memory. Activation checkpointing per block at 64k (``--ac``), AdamW. Precision (``--mode``): ``fsdp`` (default) is
exactly the trainer's setup — FSDP2 ``fully_shard`` on a 1-rank group, bf16 parameters for compute, fp32 master
weights and gradient reduction; ``autocast`` keeps fp32 parameters and runs the forward under bf16 autocast.

Compilation (``--compile``, one row per mode): ``none`` (eager), ``regions`` (``flexdist.model.compile_model``:
projections, norms, SwiGLU; attention eager) or ``blocks`` (``train.trainer.compile_blocks``: each block's whole
forward with ``fullgraph=True``, the attention custom op inside — what ``trainer.compile_scope=blocks`` runs).
Activation checkpointing (``--ac``, one row per mode): ``none``, ``selective`` (blocks recomputed except the
attention op), ``full``, or ``auto`` (selective above 16k tokens). ``first_step_s`` is the first warmup
step's wall time (compilation and autotuning included).

    python bench/bench_train.py --out bench/results/train.json            # GPU: 350m, 1b × 16k, 64k
    python bench/bench_train.py --quick --out /tmp/train_quick.json       # CPU smoke: tiny model, 512 tokens
    # issue 8: 350m at 16k, eager vs compiled (whole blocks), with and without selective checkpointing
    python bench/bench_train.py --models 350m --seq-lens 16384 --attention flexdist \
        --compile none blocks --ac none selective --out bench/results/train_compile_350m_16k.json
    python bench/bench_train.py --quick --compile none regions blocks --ac none selective   # its CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from flexdist.data import IGNORE_INDEX, PackedLoader, StdlibSource  # noqa: E402
from flexdist.model import (  # noqa: E402
    Llama,
    LlamaConfig,
    LocalDocumentAttention,
    checkpointing_mode,
    compile_model,
    document_causal_pairs,
    flops_per_token,
)
from train.trainer import compile_blocks, shard_model  # noqa: E402

MODELS = {  # same shapes as configs/model/*.yaml (byte vocabulary rounded up to 320)
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=384),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_hidden_dim=2816),
    "1b": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_hidden_dim=8192, rope_theta=500000.0),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class TorchFlexAttention:
    """Compiled torch flex_attention with flexdist's block structure and a closure document-causal mask_mod."""

    _compiled = None

    def __init__(self, doc_ids: torch.Tensor, block_size: int) -> None:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        from flexdist.masks import document_block_mask

        if TorchFlexAttention._compiled is None:
            TorchFlexAttention._compiled = torch.compile(flex_attention, dynamic=False)
        bm = document_block_mask(doc_ids, causal=True, block_size=block_size)
        doc = doc_ids

        def mask_mod(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (q >= kv)

        self.block_mask = BlockMask.from_kv_blocks(
            bm.kv_num_blocks,
            bm.kv_indices,
            bm.full_kv_num_blocks,
            bm.full_kv_indices,
            BLOCK_SIZE=bm.BLOCK_SIZE,
            mask_mod=mask_mod,
            seq_lengths=bm.seq_lengths,
        )

    def __call__(self, q, k, v):
        return TorchFlexAttention._compiled(
            q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1]
        )


class SDPACausal:
    """Plain causal SDPA (cuDNN on CUDA): ignores documents — the dense-causal speed ceiling."""

    def __call__(self, q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        backends = [SDPBackend.CUDNN_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _ensure_process_group(device: torch.device) -> None:
    """A 1-rank process group (FSDP2 needs one), on an in-memory store: no ports, no launcher."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if device.type == "cuda" else {}
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)


def make_attention(name: str, doc_ids: torch.Tensor, block_size: int, backend: str):
    if name == "flexdist":
        return LocalDocumentAttention(doc_ids, backend=backend, block_size=block_size)
    # compiled: the kernels hidden in an opaque custom op (how flexdist ran before the triton_op)
    if name == "flexdist_opaque":
        return LocalDocumentAttention(doc_ids, backend=backend, block_size=block_size, opaque_op=True)
    if name == "torch_flex":
        return TorchFlexAttention(doc_ids, block_size)
    if name == "sdpa_cudnn_causal":
        return SDPACausal()
    raise ValueError(name)


COMPILE_MODES = ("none", "regions", "blocks")
AC_MODES = (
    "auto",
    "none",
    "selective",
    "full",
    "on",
    "off",
)  # on / off: the old spellings of selective / none


def resolve_ac(ac: str, seq_len: int) -> str:
    """An ``--ac`` value as a model checkpointing mode (auto: selective above 16k tokens)."""
    if ac == "auto":
        return "selective" if seq_len > 16384 else "none"
    return checkpointing_mode({"on": "selective", "off": "none"}.get(ac, ac))


def bench_one(
    model_name: str,
    seq_len: int,
    attn: str,
    args: argparse.Namespace,
    device: torch.device,
    compile_mode: str = "none",
    ac: str = "auto",
) -> dict[str, Any]:
    cfg = LlamaConfig(vocab_size=320, **MODELS[model_name])
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg)
    model.activation_checkpointing = resolve_ac(ac, seq_len)
    if compile_mode == "regions":
        compile_model(model, backend=args.compile_backend)
    elif compile_mode == "blocks":
        compile_blocks(model, backend=args.compile_backend)
    elif compile_mode != "none":
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    bf16 = device.type == "cuda"
    if args.mode == "fsdp":
        _ensure_process_group(device)
        shard_model(model, init_device_mesh(device.type, (1,)), torch.bfloat16 if bf16 else torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = PackedLoader(StdlibSource(), seq_len=seq_len, micro_batch=1, seed=0)
    batches = [
        {k: v.to(device) for k, v in loader.next_batch().items()} for _ in range(args.steps + args.warmup)
    ]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and args.mode == "autocast")

    def step(batch) -> float:
        attention = make_attention(attn, batch["doc_ids"], args.block_size, args.backend)
        with amp:
            logits = model(batch["tokens"], batch["positions"], attention)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_step_s = float("nan")
    for i, b in enumerate(batches[: args.warmup]):
        t0 = time.perf_counter()
        step(b)
        sync()
        if i == 0:
            first_step_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, pairs = [], 0
    for b in batches[args.warmup :]:
        sync()
        t0 = time.perf_counter()
        step(b)
        sync()
        times.append(time.perf_counter() - t0)
        if attn == "sdpa_cudnn_causal":
            pairs += seq_len * (seq_len + 1) // 2
        else:
            pairs += document_causal_pairs(b["doc_ids"])
    dt = sorted(times)[len(times) // 2]  # median step
    tps = seq_len / dt
    fpt = flops_per_token(cfg, pairs / (len(times) * seq_len))
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "model": model_name,
        "params_M": round(model.num_params() / 1e6, 1),
        "seq_len": seq_len,
        "attention": attn,
        "compile": compile_mode,
        "activation_checkpointing": model.activation_checkpointing,
        "first_step_s": round(first_step_s, 2),
        "step_ms": round(1e3 * dt, 2),
        "tokens_per_s": round(tps, 1),
        "tflops_per_s": round(fpt * tps / 1e12, 2),
        "mfu": round(fpt * tps / (peak * 1e12), 4) if peak else None,
        "attn_pairs_per_token": round(pairs / (len(times) * seq_len), 1),
        "peak_mem_gib": round(mem, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["350m", "1b"], choices=sorted(MODELS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 65536])
    p.add_argument(
        "--attention",
        nargs="+",
        default=["flexdist", "torch_flex", "sdpa_cudnn_causal"],
        help="also: flexdist_opaque (the kernels inside an opaque custom op under torch.compile, not the triton_op)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--backend", default="auto", help="flexdist kernel backend: auto | triton | reference")
    p.add_argument(
        "--ac",
        nargs="+",
        choices=AC_MODES,
        default=["auto"],
        help="activation checkpointing modes, one row each (auto: selective above 16k tokens)",
    )
    p.add_argument(
        "--compile",
        nargs="+",
        choices=COMPILE_MODES,
        default=None,
        help="compile modes, one row each: none | regions (not attention) | blocks (fullgraph, attention inside)",
    )
    p.add_argument("--compile-model", action="store_true", help="old spelling of --compile regions")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU: no C++ build in smoke runs)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)"
    )
    p.add_argument("--mode", choices=["fsdp", "autocast"], default="fsdp", help="precision setup (see above)")
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, 512 tokens, 1+1 steps")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.compile is None:
        args.compile = ["regions"] if args.compile_model else ["none"]
    if args.compile_backend is None:
        args.compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    if args.quick:
        args.models, args.seq_lens, args.steps, args.warmup = ["tiny"], [512], 1, 1
        if device.type == "cpu":
            args.backend = "reference"
            args.attention = [a for a in args.attention if a != "torch_flex"]  # no backward on CPU
    rows = []
    for model_name in args.models:
        for S in args.seq_lens:
            for attn, comp, ac in itertools.product(args.attention, args.compile, args.ac):
                head = {"model": model_name, "seq_len": S, "attention": attn, "compile": comp}
                head["activation_checkpointing"] = resolve_ac(ac, S)
                try:
                    row = bench_one(model_name, S, attn, args, device, comp, ac)
                except torch.cuda.OutOfMemoryError:
                    row = {**head, "error": "out of memory"}
                except Exception as e:  # report and go on: one failing variant must not hide the others
                    row = {**head, "error": f"{type(e).__name__}: {e}"}
                finally:
                    # drop compiled graphs: every variant's first_step_s includes its own compilation
                    torch.compiler.reset()
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(_row_line(row), flush=True)
    import triton

    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mode": args.mode,
        "dtype": (
            ("FSDP2 bf16 params, fp32 master/reduce" if args.mode == "fsdp" else "bf16 autocast, fp32 params")
            if device.type == "cuda"
            else "fp32"
        ),
        "batch": "1 packed window of stdlib .py files per step (byte tokenizer, vocab 320)",
        "steps": args.steps,
        "warmup": args.warmup,
        "block_size": args.block_size,
        "compile_modes": args.compile,
        "compile_backend": args.compile_backend,
        "ac_modes": args.ac,
    }
    print(_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _row_line(r: dict[str, Any]) -> str:
    what = (
        f"{r['model']:>5} S={r['seq_len']:>6} {r['attention']:<18} compile={r.get('compile', 'none'):<7} "
        f"ac={r.get('activation_checkpointing', 'none'):<9}"
    )
    if "error" in r:
        return f"{what} ERROR {r['error'][:200]}"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    return (
        f"{what} {r['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:>6}  {r['tflops_per_s']:>7.1f} TFLOP/s  "
        f"mem {r['peak_mem_gib']:.1f} GiB  ({r['step_ms']:.0f} ms; first step {r['first_step_s']:.1f} s)"
    )


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | seq_len | attention | compile | act. ckpt | tokens/s | MFU | TFLOP/s | peak GiB | step ms "
        "| first step s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        what = (
            f"| {r['model']} | {r['seq_len']} | {r['attention']} | {r.get('compile', 'none')} | "
            f"{r.get('activation_checkpointing', 'none')} |"
        )
        if "error" in r:
            lines.append(f"{what} {r['error'][:60]} | | | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(
                f"{what} {r['tokens_per_s']:,.0f} | {mfu} | {r['tflops_per_s']:.1f} | {r['peak_mem_gib']} | "
                f"{r['step_ms']:.0f} | {r['first_step_s']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
