"""The CP attention custom op (flexdist/cp/ops.py): a block holding ``flexdist.ContextParallelAttention``
compiles with ``torch.compile(fullgraph=True)`` (backend "aot_eager" on CPU), forward and backward equal
eager, and five batches with different document layouts (a new plan each) reuse one compiled graph.

World size 1 in this process, and 2 gloo ranks (``run_ranks``) for the ring, direct and all-gather exchanges.
fp64 with the dense reference kernel: the op runs the eager forward code bit for bit and the same backward
exchange with an autograd-free form of the reference kernel, so compiled and eager agree to ~1e-12; the
tolerance 1e-9 leaves room for summation order only.
"""

from __future__ import annotations

import gc
import traceback

import pytest
import torch
import torch._dynamo as dynamo  # tests only: graph / recompile counters and explain
import torch.distributed as dist
from spawn import init_group, run_ranks
from test_cp import make_doc_ids

import flexdist
import flexdist.cp as cp
from flexdist.cp import ops

H, HKV, D, S, BS = 4, 2, 8, 128, 16
TOL = dict(rtol=1e-9, atol=1e-9)


class Block(torch.nn.Module):
    """Q/K/V projections (GQA) + ``flexdist.ContextParallelAttention`` + output projection."""

    def __init__(
        self,
        seed: int,
        dtype: torch.dtype = torch.float64,
        kernel_backend: str = "reference",
        head_dim: int = D,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = d = head_dim
        # 1/sqrt(fan_in): scores of order one, so fp32 runs compare by rounding, not softmax saturation
        w = torch.randn(H * d, (H + 2 * HKV) * d, generator=g, dtype=dtype) / (H * d) ** 0.5
        self.wqkv = torch.nn.Parameter(w)
        self.wo = torch.nn.Parameter(torch.randn(H * d, H * d, generator=g, dtype=dtype) * 0.2)
        self.cpa = flexdist.ContextParallelAttention(kernel_backend=kernel_backend)

    def forward(self, x: torch.Tensor, plan=None) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.d
        q, k, v = (x @ self.wqkv).view(b, s, H + 2 * HKV, d).transpose(1, 2).split([H, HKV, HKV], dim=1)
        out, lse = self.cpa(q, k, v, plan, return_lse=True)
        y = out.transpose(1, 2).reshape(b, s, H * d) @ self.wo
        return y + 0.01 * torch.where(torch.isinf(lse), 0.0, lse).transpose(1, 2).sum(-1, keepdim=True)


def _step(fn, block: Block, x: torch.Tensor, plan=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and d(loss)/d(x, parameters) of one call, the loss using both out and lse."""
    y = fn(x) if plan is None else fn(x, plan)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, *block.parameters()])
    return y.detach(), list(grads)


def _assert_equal(got, want, what: str, tol: dict | None = None) -> None:
    tol = tol or TOL
    (y_g, g_g), (y_w, g_w) = got, want
    for a, b, n in zip((y_g, *g_g), (y_w, *g_w), ("output", "dx", "dwqkv", "dwo"), strict=True):
        err = (a - b).abs().max().item()
        msg = f"{n} differs ({what}): max abs diff {err:.3g}, max abs value {b.abs().max().item():.3g}"
        torch.testing.assert_close(a, b, **tol, msg=msg)


def _layouts(n: int = 5) -> list[torch.Tensor]:
    kinds = ["doc", "long", "pad", "doc", "causal"]
    ids = [make_doc_ids(kinds[i % len(kinds)], 1, S, seed=40 + i) for i in range(n)]
    assert len({tuple(t[0].tolist()) for t in ids}) == n  # really different layouts
    return ids


def compile_and_check(
    group,
    strategy: str,
    balance: str,
    per_call: bool,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    kernel_backend: str = "reference",
    backend: str = "aot_eager",
    tol: dict | None = None,
    head_dim: int = D,
) -> int:
    """Compile a Block once (fullgraph) and run 5 document layouts, each with a new plan: equal to eager every
    time, and no recompile after the first (``fail_on_recompile`` raises; the graph count stays at one).
    Returns the number of graphs dynamo compiled for it."""
    block = Block(seed=1, dtype=dtype, kernel_backend=kernel_backend, head_dim=head_dim).to(device)
    compiled = torch.compile(block, fullgraph=True, dynamic=False, backend=backend)
    graphs0 = dynamo.utils.counters["stats"]["unique_graphs"]
    for i, doc in enumerate(_layouts()):
        plan = cp.plan(
            doc.to(device),
            group,
            balance=balance,
            strategy=strategy,
            block_size=BS,
            kernel_backend=kernel_backend,
        )
        x_full = torch.randn(1, S, H * head_dim, generator=torch.Generator().manual_seed(60 + i), dtype=dtype)
        x = plan.shard(x_full.to(device), 1).requires_grad_(True)
        if per_call:
            ops.register_plan(plan)
            args = (plan,)
        else:
            block.cpa.set_plan(plan)
            args = ()
        want = _step(block, block, x, *args)  # eager: flexdist.cp.attention
        if i == 0:
            got = _step(compiled, block, x, *args)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                got = _step(compiled, block, x, *args)
        _assert_equal(got, want, f"{strategy}/{balance} layout {i} per_call={per_call}", tol)
    graphs = dynamo.utils.counters["stats"]["unique_graphs"] - graphs0
    assert graphs == 1, f"{graphs} graphs compiled over 5 document layouts ({strategy}, {balance})"
    return graphs


# ----------------------------------------------------------------------------------------------------------
# world size 1 (no process group)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_call", [False, True], ids=["set_plan", "plan_per_call"])
def test_block_compiles_fullgraph_without_recompiles_world1(per_call: bool) -> None:
    compile_and_check(None, "ring", "auto", per_call)


@pytest.mark.gpu
def test_block_compiles_inductor_gpu_without_recompiles() -> None:
    """On a GPU: inductor around the op with the Triton kernel inside (fp32), 5 layouts, one graph, equal to
    eager up to the kernel's fp32 accumulation order (inductor fuses the projections differently)."""
    compile_and_check(
        None,
        "ring",
        "auto",
        False,
        device="cuda",
        dtype=torch.float32,
        kernel_backend="triton",
        backend="inductor",
        tol=dict(rtol=2e-3, atol=2e-3),
        head_dim=16,  # the Triton kernel's smallest head dim
    )


def test_explain_one_graph_no_breaks() -> None:
    block = Block(seed=2)
    plan = cp.plan(_layouts(1)[0], None, block_size=BS, kernel_backend="reference")
    block.cpa.set_plan(plan)
    x = torch.randn(1, S, H * D, dtype=torch.float64, requires_grad=True)
    ex = dynamo.explain(block)(x)
    assert ex.graph_count == 1 and ex.graph_break_count == 0, ex
    assert any("flexdist.cp_attention_fwd" in str(n.target) for n in ex.graphs[0].graph.nodes)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "direct"])
def test_op_equals_eager_attention(strategy: str) -> None:
    """``ops.cp_attention`` (the op, eager) equals ``flexdist.cp.attention``: out, lse and dq/dk/dv."""
    doc = make_doc_ids("doc", 2, S, seed=3)
    plan = cp.plan(doc, None, strategy=strategy, block_size=BS, kernel_backend="reference")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, HKV, S, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    w = torch.randn(2, H, S, D, generator=g, dtype=torch.float64)
    res = []
    for fn in (ops.cp_attention, cp.attention):
        out, lse = fn(q, k, v, plan, scale=0.3, return_lse=True)
        loss = (out * w).sum() + torch.where(torch.isinf(lse), 0.0, lse).pow(2).sum() * 0.1
        res.append((out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v))))
    for a, b, n in zip(*res, ("out", "lse", "dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=f"{n} differs ({strategy})")
    assert torch.isneginf(res[0][1][..., -5:]).all()  # padding rows: LSE -inf through the op too


def test_opcheck_forward_and_backward_ops() -> None:
    """torch.library.opcheck: schema, fake (meta) implementations, autograd registration, AOT dispatch."""
    plan = cp.plan(make_doc_ids("doc", 1, 64, seed=5), None, block_size=BS, kernel_backend="reference")
    h = ops.register_plan(plan)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, H, 64, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, HKV, 64, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    torch.library.opcheck(ops._fwd, (q, k, v, h, None, "reference"))
    with torch.no_grad():
        out, lse = ops._fwd(q, k, v, h, 0.5, None)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    torch.library.opcheck(
        ops._bwd, (qd, kd, vd, out, lse, torch.randn_like(out), torch.randn_like(lse), h, 0.5, None)
    )
    torch.library.opcheck(ops._bwd, (qd, kd, vd, out, lse, torch.randn_like(out), None, h, None, "reference"))


def test_registry_is_weak_bounded_and_stale_handles_fail_clearly() -> None:
    doc = make_doc_ids("doc", 1, 64, seed=7)
    plan = cp.plan(doc, None, block_size=BS, kernel_backend="reference")
    h = ops.register_plan(plan)
    assert ops.register_plan(plan) is h and ops.lookup_plan(h) is plan  # idempotent
    n_before = len(ops._plans)
    for _ in range(20):  # plans built and dropped every batch: the registry does not keep them
        ops.register_plan(cp.plan(doc, None, block_size=BS, kernel_backend="reference"))
    gc.collect()
    assert len(ops._plans) <= n_before, (len(ops._plans), n_before)
    stale = h.clone()
    del plan
    gc.collect()
    with pytest.raises(RuntimeError, match=rf"plan handle {int(stale)} is stale"):
        ops.lookup_plan(stale)
    # a new plan never gets an old handle back
    again = ops.register_plan(cp.plan(doc, None, block_size=BS, kernel_backend="reference"))
    assert int(again) > int(stale)
    with pytest.raises(TypeError, match="0-d int64"):
        ops.lookup_plan(torch.tensor([1]))


def test_eager_op_keeps_its_plan_until_backward() -> None:
    """Eager calls through the op: the autograd graph holds the plan (the registry only weakly), so dropping
    the caller's reference before backward is fine; the plan is freed with the graph."""
    import weakref

    doc = make_doc_ids("doc", 1, 64, seed=10)
    plan = cp.plan(doc, None, block_size=BS, kernel_backend="reference")
    alive = weakref.ref(plan)
    q = torch.randn(1, H, 64, D, dtype=torch.float64, requires_grad=True)
    out = ops.cp_attention(q, q[:, :HKV], q[:, :HKV], plan)
    del plan
    gc.collect()
    assert alive() is not None
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    del out
    gc.collect()
    assert alive() is None


def test_unsupported_calls_fail_clearly() -> None:
    doc = make_doc_ids("doc", 1, 64, seed=8)
    q = torch.randn(1, 4, 64, 8, dtype=torch.float64)
    uly = cp.plan(doc, None, strategy="ulysses", block_size=BS, kernel_backend="reference")
    with pytest.raises(ValueError, match="ulysses"):
        ops.cp_attention(q, q, q, uly)
    with pytest.raises(ValueError, match="strategy='ulysses'"):
        cp.ContextParallelAttention(use_op=True)(q, q, q, uly)
    ring = cp.plan(doc, None, block_size=BS, kernel_backend="reference")
    with pytest.raises(ValueError, match="score_mod=SoftCap"):
        cp.ContextParallelAttention(flexdist.kernels.SoftCap(20.0), use_op=True)(q, q, q, ring)
    # a plan never registered, used inside compiled code: the error says what to do
    m = cp.ContextParallelAttention(kernel_backend="reference")
    f = torch.compile(lambda a, p: m(a, a, a, p), fullgraph=True, backend="aot_eager")
    fresh = cp.plan(doc, None, block_size=BS, kernel_backend="reference")
    with pytest.raises(Exception, match="not registered before compilation"):
        f(q, fresh)


def test_module_use_op_true_equals_eager() -> None:
    """``use_op=True`` runs the op in eager mode too, with the eager path's results."""
    doc = make_doc_ids("long", 1, S, seed=9)
    plan = cp.plan(doc, None, block_size=BS, kernel_backend="reference")
    block_op, block_eager = Block(seed=3), Block(seed=3)
    block_op.cpa.use_op = True
    x = torch.randn(1, S, H * D, dtype=torch.float64, requires_grad=True)
    _assert_equal(_step(block_op, block_op, x, plan), _step(block_eager, block_eager, x, plan), "use_op=True")


# ----------------------------------------------------------------------------------------------------------
# 2 gloo ranks
# ----------------------------------------------------------------------------------------------------------
CASES_2 = [
    ("ring", "zigzag", False),
    ("ring", "auto", True),
    ("direct", "document", False),
    ("allgather", "contiguous", False),
]


def _worker(rank: int, world: int, init_method: str, results) -> None:
    try:
        torch.set_num_threads(1)
        init_group("gloo", rank, world, init_method)
        graphs = [compile_and_check(dist.group.WORLD, *c) for c in CASES_2]
        dist.barrier()
        results.put((rank, "ok", graphs))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
def test_block_compiles_fullgraph_without_recompiles_2_gloo_ranks() -> None:
    got = run_ranks(_worker, 2, timeout=240.0)
    assert got == {0: [1] * len(CASES_2), 1: [1] * len(CASES_2)}, got
