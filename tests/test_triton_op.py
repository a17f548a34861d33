"""The ``torch.library.triton_op`` path of kernels/ops.py (issue #8): under torch.compile the document-attention
ops decompose into their Triton kernel launches (``triton_kernel_wrapper_functional`` nodes), not one opaque call.

On CUDA the op body launches the compiled kernels through ``wrap_triton``. On this CPU machine the kernels are
``TRITON_INTERPRET=1``'s interpreted functions, which ``wrap_triton`` cannot capture, so the op routes them to
its opaque custom op (``test_cpu_interpreter_path_stays_opaque``). To test the traced body itself on CPU, the
``traced_body`` fixture (test-only, private torch/triton API, CPU interpreter only):

- swaps each kernel for :class:`_InterpretedJIT`, a ``triton.jit`` function over the same source whose
  launch runs the interpreter, so ``wrap_triton`` captures it and the captured graph can still run on CPU;
- lets the op body take its Triton branch for CPU tensors;
- answers torch's question "which tensor arguments does this kernel write?" with the kernels' outputs. On a
  GPU torch finds that out by lowering the kernel to Triton IR; here there is no GPU target, and the
  interpreter has replaced parts of ``triton.language`` in-process, so the lowering fails and torch assumes
  every argument is written, which AOTAutograd's partitioner then rejects (views of op inputs written).

The GPU test at the end runs the real thing with inductor (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from test_compile import _block_module, _step
from test_compile import _doc_ids as packed_doc_ids
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from flexdist.kernels import document_attention, flex_attention, ops, triton_bwd, triton_fwd
from flexdist.masks import document_block_mask

B, H, S, D, BS = 1, 2, 128, 16, 32

# The tensors each kernel writes (what torch's Triton-IR analysis finds on a GPU; TGRAD of the dQ kernel is
# written only with the RelativeBias table gradient, which the op never asks for).
_KERNEL_WRITES = {
    "_fwd_kernel": ("O", "LSE"),
    "_delta_kernel": ("DELTA",),
    "_dkdv_kernel": ("DK", "DV_"),
    "_dq_kernel": ("DQ",),
}
_KERNELS = (
    (triton_fwd, "_fwd_kernel"),
    (triton_bwd, "_delta_kernel"),
    (triton_bwd, "_dkdv_kernel"),
    (triton_bwd, "_dq_kernel"),
)


@pytest.fixture
def traced_body(monkeypatch: pytest.MonkeyPatch):
    """The op body's Triton branch on CPU tensors, with capturable kernels that run in the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(triton_fwd._fwd_kernel, InterpretedFunction):
        pytest.skip("needs TRITON_INTERPRET=1 kernels (CPU); on a GPU the inductor test covers this path")
    import torch._higher_order_ops.triton_kernel_wrap as tkw
    from triton.runtime.autotuner import Autotuner

    class _InterpretedJIT(JITFunction):
        """A JIT function (capturable by wrap_triton) whose launches run the interpreted kernel."""

        def __init__(self, interpreted: InterpretedFunction) -> None:
            super().__init__(interpreted.fn)
            self._interpreted = interpreted

        # JITFunction hashes its source *and its callees*, which are interpreted functions here
        @property
        def cache_key(self) -> str:
            return f"interpreted-{self.fn.__qualname__}-{id(self)}"

        def __hash__(self) -> int:
            return id(self)

        def run(self, *args, grid, warmup, **kwargs):
            return self._interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    for mod, name in _KERNELS:
        monkeypatch.setattr(mod, name, _InterpretedJIT(getattr(mod, name)))

    def compiled_triton(q: torch.Tensor, backend: str) -> bool:  # ops._compiled_triton less "q on CUDA"
        return triton_fwd.kernels_are_compiled() and ops.resolve_backend(backend, q) == "triton"

    monkeypatch.setattr(ops, "_compiled_triton", compiled_triton)

    def kernel_writes(kernel_idx, constant_args_idx, kwargs, tma_descriptor_metadata) -> list[str]:
        kernel = tkw.kernel_side_table.get_kernel(kernel_idx)
        while isinstance(kernel, Autotuner):  # num_warps / num_stages wrap the kernel in a 1-config autotuner
            kernel = kernel.fn
        return list(_KERNEL_WRITES[kernel.fn.__name__])

    monkeypatch.setattr(tkw, "get_mutated_tensors", kernel_writes)

    def no_opaque(*args, **kwargs):
        raise AssertionError("the op took its opaque branch, not the traced Triton body")

    monkeypatch.setattr(ops, "_fwd_opaque", no_opaque)
    monkeypatch.setattr(ops, "_bwd_opaque", no_opaque)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _doc_ids(seed: int, n_docs: int = 3, length: int = S, pad: int = 0) -> torch.Tensor:
    return packed_doc_ids(seed, n_docs, length, pad)


def _qkv(hq: int, hkv: int, seed: int, s: int = S, d: int = D, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, h, s, d, generator=g, dtype=dtype).to(device).requires_grad_(True)
        for h in (hq, hkv, hkv)
    ]


def _loss(out: torch.Tensor, lse: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (out * w).sum() + torch.where(torch.isinf(lse), 0.0, lse).pow(2).sum() * 0.1


MASKS = {
    "doc_causal": dict(),
    "window_padding": dict(window=40, pad=24),
    "noncausal_window": dict(causal=False, window=50),
    "prefix_lm": dict(prefix_lengths=20),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_eager_triton_body_matches_flex_and_reference(traced_body, name: str, gqa: bool) -> None:
    """The body's Triton branch (wrap_triton launches, per-call placeholders) in eager mode: out, lse and
    dq/dk/dv through both equal flexdist's flex_attention (same kernels) and the dense reference."""
    kw = dict(MASKS[name])
    pad = kw.pop("pad", 0)
    bm = document_block_mask(_doc_ids(1, pad=pad), block_size=BS, **kw)
    hq, hkv = (4, 2) if gqa else (H, H)
    q, k, v = _qkv(hq, hkv, seed=2)
    w = torch.randn(B, hq, S, D, generator=torch.Generator().manual_seed(3))
    out, lse = document_attention(q, k, v, bm, enable_gqa=gqa, backend="triton", return_lse=True)
    got = torch.autograd.grad(_loss(out, lse, w), (q, k, v))
    for backend in ("triton", "reference"):
        r_out, r_lse = flex_attention(
            q, k, v, block_mask=bm, enable_gqa=gqa, return_lse=True, backend=backend
        )
        torch.testing.assert_close(out, r_out, rtol=1e-4, atol=1e-4, msg=f"out vs {backend}")
        torch.testing.assert_close(lse, r_lse, rtol=1e-4, atol=1e-4, msg=f"lse vs {backend}")
        want = torch.autograd.grad(_loss(r_out, r_lse, w), (q, k, v))
        for g_, w_, n in zip(got, want, "qkv", strict=True):
            torch.testing.assert_close(g_, w_, rtol=1e-3, atol=1e-4, msg=f"d{n} vs {backend}")
    if pad:  # fully masked rows: output 0, LSE -inf, finite (zero) gradients
        assert torch.isneginf(lse[..., -pad:]).all() and (out[..., -pad:, :] == 0).all()
        assert all(torch.isfinite(g_).all() for g_ in got)
        assert (got[0][..., -pad:, :] == 0).all()


def _block(seed: int, opaque: bool = False) -> torch.nn.Module:
    """test_compile's block at this file's sizes, on the Triton backend, with the LSE in its output."""
    return _block_module(seed, "triton", heads=H, dim=D, opaque=opaque, with_lse=True)


class _GraphCapture:
    """An AOTAutograd backend that keeps the forward and backward graphs and runs them as they are."""

    def __init__(self) -> None:
        self.forward: list[torch.fx.GraphModule] = []
        self.backward: list[torch.fx.GraphModule] = []
        self.backend = aot_autograd(fw_compiler=self._fw, bw_compiler=self._bw)

    def _fw(self, gm: torch.fx.GraphModule, example_inputs):
        self.forward.append(gm)
        return make_boxed_func(gm.forward)

    def _bw(self, gm: torch.fx.GraphModule, example_inputs):
        self.backward.append(gm)
        return make_boxed_func(gm.forward)


def _kernels_in(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the Triton kernels the graph launches (its triton_kernel_wrapper HOP nodes)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.autotuner import Autotuner

    names = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
            kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            while isinstance(kernel, Autotuner):
                kernel = kernel.fn
            names.append(kernel.fn.__name__)
    return names


def _flexdist_ops_in(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "flexdist" in str(n.target)]


def test_compile_aot_eager_traces_kernel_launches(traced_body) -> None:
    """fullgraph=True (a graph break raises) with AOTAutograd: the forward graph launches the forward kernel,
    the backward graph the delta, dK/dV and dQ kernels, as functional HOP nodes with no flexdist op left;
    out and every gradient equal eager; the placeholder cache holds no tracer tensor afterwards."""
    from torch._subclasses.fake_tensor import FakeTensor

    mod = _block(0)
    cap = _GraphCapture()
    compiled = torch.compile(mod, fullgraph=True, dynamic=False, backend=cap.backend)
    bm = document_block_mask(_doc_ids(5, pad=16), block_size=BS)
    x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(6), requires_grad=True)
    y_c, g_c = _step(compiled, mod, x, bm)
    y_e, g_e = _step(mod, mod, x, bm)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert len(cap.forward) == 1 and len(cap.backward) == 1
    fw, bw = cap.forward[0], cap.backward[0]
    assert _kernels_in(fw) == ["_fwd_kernel"], fw.code
    assert sorted(_kernels_in(bw)) == ["_delta_kernel", "_dkdv_kernel", "_dq_kernel"], bw.code
    assert "triton_kernel_wrapper_functional" in fw.code and "triton_kernel_wrapper_functional" in bw.code
    assert _flexdist_ops_in(fw) == [] and _flexdist_ops_in(bw) == [], (fw.code, bw.code)
    assert not any(isinstance(t, FakeTensor) for t in triton_fwd._PLACEHOLDERS.values())


def test_no_recompile_across_document_layouts_traced(traced_body) -> None:
    """Five document layouts (same shapes) run one compiled graph of kernel launches, each equal to eager."""
    mod = _block(1)
    cap = _GraphCapture()
    compiled = torch.compile(mod, fullgraph=True, dynamic=False, backend=cap.backend)
    layouts = [_doc_ids(10 + i, n_docs=2 + i, pad=16 * (i % 2)) for i in range(5)]
    assert len({tuple(ids[0].tolist()) for ids in layouts}) == 5
    for i, ids in enumerate(layouts):
        bm = document_block_mask(ids, block_size=BS, validate=False)
        x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(20 + i), requires_grad=True)
        y_e, g_e = _step(mod, mod, x, bm)
        if i == 0:
            y_c, g_c = _step(compiled, mod, x, bm)
        else:  # any recompile raises from here on
            with torch.compiler.set_stance("fail_on_recompile"):
                y_c, g_c = _step(compiled, mod, x, bm)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert len(cap.forward) == 1 and len(cap.backward) == 1


def _op_args(backend: str):
    s, bs = 64, 32
    bm = document_block_mask(torch.tensor([[0] * 20 + [1] * 30 + [2] * (s - 50)]), block_size=bs, window=24)
    mm = bm.mask_mod
    q, k, v = _qkv(2, 2, seed=7, s=s)
    tensors = (*(getattr(bm, n) for n in ops._BM_TABLES), *(getattr(mm, n) for n in ops._DOC_TENSORS))
    return q, k, v, tensors, (bs, bs, s, s, True, 24, None, False, backend)


def test_opcheck_triton_body(traced_body) -> None:
    """torch.library.opcheck on both triton_ops with the Triton branch: schema, fake implementation (the body
    itself, run on FakeTensors), autograd registration, AOT dispatch (static and dynamic shapes)."""
    q, k, v, tensors, scalars = _op_args("triton")
    torch.library.opcheck(ops._fwd, (q, k, v, *tensors, *scalars))
    with torch.no_grad():
        out, lse = ops._fwd(q, k, v, *tensors, *scalars)
    args = (q.detach(), k.detach(), v.detach(), out, torch.randn_like(out), lse, torch.randn_like(lse))
    torch.library.opcheck(ops._bwd, (*args, *tensors, *scalars))


def test_cpu_interpreter_path_stays_opaque() -> None:
    """Without the fixture (interpreted kernels, or the reference backend) the body calls the opaque op: the
    AOT graphs hold ``document_attention_*_opaque`` nodes and no kernel launch, and results equal eager."""
    if triton_fwd.kernels_are_compiled():
        pytest.skip("the kernels are compiled (CUDA machine): the traced path is taken there")
    torch._dynamo.reset()
    mod = _block(2)
    cap = _GraphCapture()
    compiled = torch.compile(mod, fullgraph=True, dynamic=False, backend=cap.backend)
    bm = document_block_mask(_doc_ids(8), block_size=BS)
    x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(9), requires_grad=True)
    y_c, g_c = _step(compiled, mod, x, bm)
    y_e, g_e = _step(mod, mod, x, bm)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert _flexdist_ops_in(cap.forward[0]) == ["flexdist.document_attention_fwd_opaque.default"]
    assert _flexdist_ops_in(cap.backward[0]) == ["flexdist.document_attention_bwd_opaque.default"]
    assert _kernels_in(cap.forward[0]) == [] and _kernels_in(cap.backward[0]) == []
    torch._dynamo.reset()


# the opaque ops themselves, before ``traced_body`` replaces them with a tripwire
_OPAQUE_OPS = {"_fwd_opaque": ops._fwd_opaque, "_bwd_opaque": ops._bwd_opaque}


def test_opaque_flag_keeps_the_custom_op(traced_body, monkeypatch: pytest.MonkeyPatch) -> None:
    """``document_attention(..., opaque=True)`` (the benchmarks' comparison, a workaround for a torch whose
    user-kernel support fails): even where the traced branch would run, the graphs hold the opaque ops and no
    kernel launch, and out and gradients equal the traced op's."""
    # (the traced run still proves it took its branch: its graph holds the kernel)
    for name, op in _OPAQUE_OPS.items():
        monkeypatch.setattr(ops, name, op)
    bm = document_block_mask(_doc_ids(12, pad=8), block_size=BS)
    x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(13), requires_grad=True)
    results = {}
    for opaque in (False, True):
        torch._dynamo.reset()
        mod = _block(3, opaque=opaque)
        cap = _GraphCapture()
        compiled = torch.compile(mod, fullgraph=True, dynamic=False, backend=cap.backend)
        results[opaque] = _step(compiled, mod, x, bm)
        want = ["_fwd_kernel"] if not opaque else []
        assert _kernels_in(cap.forward[0]) == want, cap.forward[0].code
    fw, bw = cap.forward[0], cap.backward[0]
    assert _flexdist_ops_in(fw) == ["flexdist.document_attention_fwd_opaque.default"], fw.code
    assert _flexdist_ops_in(bw) == ["flexdist.document_attention_bwd_opaque.default"], bw.code
    assert _kernels_in(bw) == []
    (y_t, g_t), (y_o, g_o) = results[False], results[True]
    torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_o, g_t, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("s", [1000, 4160], ids=["ragged_1000", "autotuned_4160"])
def test_inductor_compiles_the_kernels_gpu(s: int) -> None:
    """On a GPU: inductor, fullgraph, bf16, ragged length. out and dq/dk/dv equal eager, and inductor's output
    code launches the flexdist kernels itself (user-defined Triton kernels), with no call to a flexdist op.

    s=1000 takes the fixed-config kernels; s=4160 (Sq·Skv above AUTOTUNE_MIN_PAIRS, 128-token blocks) the
    ``triton.autotune`` ones, whose configs inductor tunes."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    d, bs = 64, 128
    ids = _doc_ids(31, n_docs=5, length=s, pad=24).cuda()
    bm = document_block_mask(ids, block_size=bs)
    q, k, v = _qkv(H, H, seed=32, s=s, d=d, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(B, H, s, d, generator=torch.Generator().manual_seed(33)).to("cuda", torch.bfloat16)

    def f(q_, k_, v_, bm_):
        return document_attention(q_, k_, v_, bm_, backend="triton")

    def step(fn):
        out = fn(q, k, v, bm)
        grads = torch.autograd.grad((out.float() * w.float()).sum(), (q, k, v))
        return out.detach(), grads

    compiled = torch.compile(f, fullgraph=True, dynamic=False, backend="inductor")
    (out_c, grads_c), codes = run_and_get_code(step, compiled)
    out_e, grads_e = step(f)
    torch.testing.assert_close(out_c, out_e, rtol=2e-2, atol=2e-2)
    for a, b, n in zip(grads_c, grads_e, "qkv", strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=f"d{n}")
    code = "\n".join(codes)
    for kernel in ("_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"):
        assert kernel in code, f"{kernel} is not in inductor's output code"
    assert "flexdist.document_attention" not in code and "torch.ops.flexdist" not in code
    torch._dynamo.reset()
