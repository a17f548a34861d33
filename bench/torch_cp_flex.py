"""Torch's own context parallelism for FlexAttention, timed on the same masks as flexdist (for bench_cp_multi).

This is the ONE module of the project that uses private torch API, and it needs it because torch exposes its
FlexAttention context parallelism only privately: the public ``context_parallel`` context manager patches
SDPA alone, while the FlexAttention path (all-gather K/V before each call, the per-rank CP BlockMask, the
head-tail and PTRR load balancers) lives in ``torch.distributed.tensor.experimental._attention`` (torch ≥ 2.9,
re-exported from ``._context_parallel``): ``_context_parallel_shard`` (shards q/k/v and rewrites a global
BlockMask for the local query shard), ``_ContextParallel`` (the ParallelStyle whose FLEX pre-hook
all-gathers K/V, reduce-scatters dK/dV in backward), ``_HeadTailLoadBalancer``, ``_PTRRLoadBalancer`` and
``context_parallel_unshard``. It is wired the way torchtitan's ``apply_cp`` wires it: a module around
``flex_attention``, ``parallelize_module(module, mesh, _ContextParallel(seq_dim=2, FLEX))``, inputs and the
BlockMask sharded with the same load balancer. Two more private touches, each for a stated reason:
``_cp_options.enable_load_balance`` is global state that ``_context_parallel_shard`` overwrites and torch's
public SDPA ``context_parallel`` reads, so it is restored afterwards; ``torch._functorch.config.donated_buffer``
is turned off while compiling so that the backward can be timed alone on a retained graph (compiled
backwards with donated buffers refuse ``retain_graph=True``), the way flexdist's rows are timed; and with
``cp_mask="eager"`` (the default) the module global ``_compiled_create_block_mask``, through which torch
builds each rank's CP BlockMask, is pointed at the plain ``create_block_mask`` for the row: on the 2×H100
device machine (4 CPUs) compiling that mask builder did not finish in 120 s (both torchrun runs of
2026-11-25 were cut inside its ptxas step), while the eager builder needs only O(S/N · S) bytes of
temporaries (about 0.3 GB at 8k tokens per GPU on 2 GPUs) and no compile. The mask it builds is the same.

Every entry point feature-detects and never raises: a missing API or any failure comes back as a row with
``torch_cp_error`` naming what was missing or what failed. torch 2.11 (device machine) and 2.13 (CI) differ;
nothing here assumes one of them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# where the CP-for-FlexAttention API lives, newest first (both exist in torch 2.10–2.13: the first is the
# package, the second its backward-compatible re-export)
_API_MODULES = (
    "torch.distributed.tensor.experimental._context_parallel",
    "torch.distributed.tensor.experimental._attention",
)
_API_NAMES = (
    "_context_parallel_shard",
    "_ContextParallel",
    "_HeadTailLoadBalancer",
    "_PTRRLoadBalancer",
    "context_parallel_unshard",
)
BALANCERS = ("headtail", "ptrr", "none")
Timer = Callable[[Callable[[], Any]], float]


def torch_cp_flex_api() -> tuple[dict[str, Any] | None, str | None]:
    """The private CP-for-FlexAttention names this torch has, or (None, what is missing)."""
    tried = []
    for modname in _API_MODULES:
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # an older torch has neither module
            tried.append(f"{modname}: {type(e).__name__}: {e}")
            continue
        missing = [n for n in _API_NAMES if not hasattr(mod, n)]
        if missing:
            tried.append(f"{modname} lacks {', '.join(missing)}")
            continue
        api = {n: getattr(mod, n) for n in _API_NAMES}
        flex_type = getattr(getattr(api["_ContextParallel"], "AttentionType", None), "FLEX", None)
        if flex_type is None:
            tried.append(f"{modname}._ContextParallel has no AttentionType.FLEX")
            continue
        api["FLEX"] = flex_type
        api["module"] = mod
        return api, None
    return None, f"torch {torch.__version__}: no FlexAttention CP API ({'; '.join(tried)})"


def gqa_mode() -> str:
    """'enable_gqa' when this torch's flex_attention takes it, else 'repeat_kv' (K/V repeated to Hq heads)."""
    return "enable_gqa" if "enable_gqa" in inspect.signature(flex_attention).parameters else "repeat_kv"


def mask_mod_for(doc: torch.Tensor, mask: str) -> Callable:
    """The global mask_mod torch users write: document-causal over ``doc`` ([1, S] ids), or plain causal."""
    if mask == "causal":
        return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    if mask != "document":
        raise ValueError(f"mask must be 'document' or 'causal', got {mask!r}")
    ids = doc.reshape(-1)
    return lambda b, h, q_idx, kv_idx: (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)


def global_block_mask(doc: torch.Tensor, mask: str) -> BlockMask:
    """The whole-sequence BlockMask (B=1, H=1, 128-token blocks) with the mask_mod above.

    Its block lists come straight from the sorted doc ids through ``BlockMask.from_kv_blocks`` (torch's API;
    bench_kernel's ``block_mask_from_docs``) rather than a compiled ``create_block_mask``: one inductor
    compile less per row (minutes on the device machine's 4 CPUs), and no S×S intermediate at 64k+ tokens.
    torch builds each rank's CP mask itself from the mask_mod; this one feeds PTRR and the 1-GPU baseline.
    """
    from bench_kernel import block_mask_from_docs

    return block_mask_from_docs(doc.reshape(-1).cpu(), 128, mask_mod_for(doc, mask), doc.device)


class _Flex(torch.nn.Module):
    """The module torch's ``_ContextParallel`` FLEX style hooks: its pre-hook swaps in all-gathered K/V."""

    def __init__(self, fn: Callable, gqa: str) -> None:
        super().__init__()
        self.fn = fn
        self.kw = {"enable_gqa": True} if gqa == "enable_gqa" else {}

    def forward(self, query, key, value, block_mask=None):
        return self.fn(query, key, value, block_mask=block_mask, **self.kw)


def _flex_fn(compile: bool) -> Callable:
    # dynamic=False: torch.compile would otherwise go dynamic at the second shape, and the dynamic flex
    # kernel is markedly slower (seen in bench_kernel) — an unfair baseline
    return torch.compile(flex_attention, dynamic=False) if compile else flex_attention


def _no_donated_buffers() -> contextlib.AbstractContextManager:
    """Compiled backwards that donate saved buffers refuse retain_graph=True; turn donation off (if it exists)."""
    try:
        import torch._functorch.config as fc
    except Exception:
        return contextlib.nullcontext()
    if not hasattr(fc, "donated_buffer"):
        return contextlib.nullcontext()
    return fc.patch(donated_buffer=False)


@contextlib.contextmanager
def _cp_mask_builder(api: dict[str, Any], cp_mask: str):
    """Build torch's per-rank CP BlockMask with eager create_block_mask (cp_mask="eager") for the block.

    Yields what was used: "eager", "compiled" (torch's own default), or "compiled (...)" when this torch has
    no module global to override.
    """
    if cp_mask not in ("eager", "compiled"):
        raise ValueError(f"cp_mask must be 'eager' or 'compiled', got {cp_mask!r}")
    mod = importlib.import_module(api["_context_parallel_shard"].__module__)
    if cp_mask == "compiled":
        yield "compiled"
        return
    if not hasattr(mod, "_compiled_create_block_mask"):
        yield f"compiled ({mod.__name__} has no _compiled_create_block_mask to override)"
        return
    old = mod._compiled_create_block_mask
    mod._compiled_create_block_mask = create_block_mask
    try:
        yield "eager"
    finally:
        mod._compiled_create_block_mask = old


def _peak_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_gib(device: torch.device, base: int) -> float:
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _time_backward(
    timeit: Timer, fwd: Callable[[], torch.Tensor], inputs: tuple, dout: torch.Tensor, tf: float
) -> tuple[float, str]:
    """Backward alone on a retained graph (as flexdist's rows), else (fwd+bwd) − fwd, saying which."""
    kept = [fwd()]
    try:
        t = timeit(lambda: torch.autograd.grad(kept[0], inputs, dout, retain_graph=True))
        return t, "retained_graph"
    except RuntimeError as e:
        if "retain_graph" not in str(e) and "donated" not in str(e):
            raise
    kept.clear()

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, dout)

    return max(
        timeit(fwd_bwd) - tf, 1e-9
    ), f"fwd_bwd_minus_fwd (retained graph refused on torch {torch.__version__})"


def _inputs(q, k, v, dout, gqa: str):
    if gqa == "repeat_kv" and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return q, k, v, dout


def _error_row(impl: str, balance: str, what: str) -> dict:
    return {"impl": impl, "balance": balance, "strategy": impl, "torch_cp_error": what[:600]}


def torch_flex_single(
    doc: torch.Tensor,
    mask: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    *,
    timeit: Timer,
    backward: bool,
    compile: bool,
    ref_out: torch.Tensor | None = None,
) -> dict:
    """torch's flex_attention on the whole sequence on this one device: the CP rows' efficiency baseline.

    Returns ``torch_single_fwd_s`` / ``torch_single_bwd_s`` and, given flexdist's CP output ``ref_out``, the
    max abs difference to it (or ``torch_single_error``). Resets dynamo first, so
    the recompile limit can never be reached however many configurations a run has.
    """
    try:
        torch.compiler.reset()
        gqa = gqa_mode()
        with _no_donated_buffers():
            bm = global_block_mask(doc, mask)
            mod = _Flex(_flex_fn(compile), gqa)
            qq, kk, vv, dd = _inputs(q, k, v, dout, gqa)
            qq, kk, vv = (t.detach().clone().requires_grad_(backward) for t in (qq, kk, vv))
            fwd = lambda: mod(qq, kk, vv, block_mask=bm)
            tf = timeit(fwd)
            res = {"torch_single_fwd_s": tf}
            if backward:
                tb, how = _time_backward(timeit, fwd, (qq, kk, vv), dd, tf)
                res.update(torch_single_bwd_s=tb, torch_single_bwd_method=how)
            if ref_out is not None:  # also checks the global BlockMask that PTRR is planned from
                diff = (fwd().detach().float() - ref_out.float()).abs().max()
                res["torch_single_max_abs_diff_vs_flexdist"] = float(diff)
            return res
    except Exception as e:
        return {"torch_single_error": f"{type(e).__name__}: {e}"[:600]}


def torch_cp_flex(
    doc: torch.Tensor,
    mask: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    *,
    mesh: Any,
    balancer: str,
    timeit: Timer,
    backward: bool,
    compile: bool,
    ref_out: torch.Tensor | None = None,
    cp_mask: str = "eager",
) -> dict:
    """Time torch's CP FlexAttention (all-gather K/V) on the global ``q, k, v`` ``[1, H, S, D]``; never raises.

    Args:
        doc: ``[1, S]`` document ids (the same as flexdist's plan gets); ``mask`` "document" or "causal".
        q, k, v, dout: the whole-sequence tensors (identical on every rank); K/V may have fewer heads (GQA).
        mesh: a 1-D DeviceMesh over the CP ranks.
        balancer: "headtail" (``_HeadTailLoadBalancer``), "ptrr" (``_PTRRLoadBalancer``, from the BlockMask)
            or "none".
        timeit: ``timeit(fn) -> seconds`` (warm-up, median, max over ranks); the warm-up call compiles.
        backward: also time the backward (needs a device whose flex_attention has one: not CPU).
        compile: compile flex_attention (dynamic=False); torch compiles each rank's CP BlockMask itself.
        ref_out: flexdist's CP output, unsharded to ``[1, Hq, S, D]``: the row gets the max abs difference.
        cp_mask: how torch builds each rank's CP BlockMask: "eager" create_block_mask (default; see the
            module docstring) or "compiled" (torch's own choice).

    Returns:
        A row: impl "torch_cp_flex", balance "torch-<balancer>", ``fwd_s``, ``bwd_s``, ``gqa``, ``peak_gib``
        (this rank's, above the inputs), ``max_abs_diff_vs_flexdist`` — or ``torch_cp_error``.
    """
    impl, label = "torch_cp_flex", f"torch-{balancer}"
    api, missing = torch_cp_flex_api()
    if api is None:
        return _error_row(impl, label, missing)
    if balancer not in BALANCERS:
        return _error_row(impl, label, f"balancer must be one of {BALANCERS}, got {balancer!r}")
    opts = getattr(api["module"], "_cp_options", None)
    old_lb = getattr(opts, "enable_load_balance", None)
    stage = "setup"
    try:
        torch.compiler.reset()  # a fresh dynamo cache per row: the recompile limit (8) is never reached
        gqa = gqa_mode()
        S, N = doc.shape[-1], mesh.size()
        with _no_donated_buffers(), _cp_mask_builder(api, cp_mask) as mask_build:
            stage = "global BlockMask (from_kv_blocks)"
            bm = global_block_mask(doc, mask)
            stage = f"load balancer {balancer}"
            if balancer == "headtail":
                lb = api["_HeadTailLoadBalancer"](S, N, doc.device)
            elif balancer == "ptrr":
                lb = api["_PTRRLoadBalancer"](bm, N)
            else:
                lb = None
            stage = "_context_parallel_shard (q, k, v, dout)"
            qq, kk, vv, dd = _inputs(q, k, v, dout, gqa)
            ql, kl, vl, dl = api["_context_parallel_shard"](
                mesh, [qq, kk, vv, dd], [2, 2, 2, 2], load_balancer=lb
            )
            stage = "_context_parallel_shard (BlockMask)"
            (bml,) = api["_context_parallel_shard"](mesh, [bm], [2], load_balancer=lb)
            stage = "parallelize_module(_ContextParallel FLEX)"
            from torch.distributed.tensor.parallel import parallelize_module

            mod = _Flex(_flex_fn(compile), gqa)
            parallelize_module(mod, mesh, api["_ContextParallel"](seq_dim=2, attention_type=api["FLEX"]))
            ql, kl, vl = (t.detach().clone().requires_grad_(backward) for t in (ql, kl, vl))
            fwd = lambda: mod(ql, kl, vl, block_mask=bml)
            base = _peak_start(q.device)
            stage = "forward"
            tf = timeit(fwd)
            row = {"impl": impl, "balance": label, "strategy": impl, "fwd_s": tf, "gqa": gqa}
            row["cp_mask_build"] = mask_build
            if backward:
                stage = "backward"
                tb, how = _time_backward(timeit, fwd, (ql, kl, vl), dl, tf)
                row.update(bwd_s=tb, bwd_method=how)
            else:
                row["bwd_skipped"] = f"flex_attention has no backward on {q.device.type}"
            row["peak_gib"] = _peak_gib(q.device, base)
            if ref_out is not None:
                stage = "correctness (context_parallel_unshard)"
                out = fwd().detach()  # in grad mode, as timed: no_grad would be one more compile
                (full,) = api["context_parallel_unshard"](mesh, [out], [2], load_balancer=lb)
                row["max_abs_diff_vs_flexdist"] = float((full.float() - ref_out.float()).abs().max())
                row["max_abs_flexdist"] = float(ref_out.float().abs().max())
            return row
    except Exception as e:
        return _error_row(impl, label, f"{stage}: {type(e).__name__}: {e}")
    finally:
        if opts is not None and old_lb is not None:
            opts.enable_load_balance = old_lb
