"""The document-attention custom ops (kernels/ops.py): equal to eager flex attention, compile with
``fullgraph=True`` (forward and backward), and do not recompile when the document layout changes.

CPU only, ``backend="reference"`` inside the op so the tests are fast; the op path itself (schema, autograd
wiring, BlockMask rebuild) is the same for the Triton backend. On CPU both backends run through the op's opaque
branch; its traced Triton branch (``triton_op`` + ``wrap_triton``, CUDA) is tested in tests/test_triton_op.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from flexdist.kernels import document_attention, flex_attention, ops
from flexdist.masks import document_block_mask

B, H, S, D, BS = 1, 2, 256, 32, 64


def _doc_ids(seed: int, n_docs: int = 4, length: int = S, pad: int = 0) -> torch.Tensor:
    """A packed row of ``n_docs`` documents with random lengths (and ``pad`` trailing padding tokens)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(length - pad - 1, generator=g)[: n_docs - 1] + 1).values
    ids = torch.zeros(1, length, dtype=torch.long)
    for c in cuts:
        ids[0, c:] += 1
    if pad:
        ids[0, length - pad :] = -1
    return ids


def _qkv(hq: int, hkv: int, s: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, s, d, generator=g, dtype=dtype).requires_grad_(True) for h in (hq, hkv, hkv)]


def _grads(loss: torch.Tensor, ts) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, ts))


MASKS = {
    "doc_causal": dict(),
    "doc_window": dict(window=40),
    "doc_noncausal_window": dict(causal=False, window=50),
    "prefix_lm": dict(prefix_lengths=20),
    "padding": dict(pad=30),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_op_matches_eager_flex_attention(name: str, gqa: bool) -> None:
    """out, lse and dq/dk/dv (through a loss on both out and lse) equal eager flex_attention's."""
    kw = dict(MASKS[name])
    pad = kw.pop("pad", 0)
    bm = document_block_mask(_doc_ids(1, pad=pad), block_size=BS, **kw)
    hq, hkv = (4, 2) if gqa else (H, H)
    q, k, v = _qkv(hq, hkv, S, D, seed=2)
    w = torch.randn(B, hq, S, D, generator=torch.Generator().manual_seed(3))

    out, lse = document_attention(q, k, v, bm, enable_gqa=gqa, backend="reference", return_lse=True)
    ref_out, ref_lse = flex_attention(
        q, k, v, block_mask=bm, enable_gqa=gqa, return_lse=True, backend="reference"
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if pad:  # padding rows: output 0, LSE -inf, as the semantics require
        assert torch.isneginf(lse[..., -pad:]).all() and (out[..., -pad:, :] == 0).all()

    def loss(o, lse_):
        return (o * w).sum() + torch.where(torch.isinf(lse_), 0.0, lse_).pow(2).sum() * 0.1

    got = _grads(loss(out, lse), (q, k, v))
    want = _grads(loss(ref_out, ref_lse), (q, k, v))
    for g_, w_, n in zip(got, want, "qkv", strict=True):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-5, msg=f"d{n} differs ({name}, gqa={gqa})")
        assert torch.isfinite(g_).all()


def test_op_gradcheck_float64() -> None:
    """Numerical gradients of out and lse agree with the op's closed-form backward (float64)."""
    s, bs = 32, 16
    bm = document_block_mask(torch.tensor([[0] * 10 + [1] * 15 + [2] * 7]), block_size=bs, window=12)
    q, k, v = _qkv(2, 2, s, 8, seed=4, dtype=torch.float64)

    def f(q_, k_, v_):
        return document_attention(q_, k_, v_, bm, backend="reference", return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def _block_module(
    seed: int,
    attn_backend: str = "reference",
    *,
    heads: int = H,
    dim: int = D,
    opaque: bool = False,
    with_lse: bool = False,
) -> torch.nn.Module:
    """q/k/v projections + document_attention + output projection: the unit users compile. ``with_lse``
    adds the mean LSE to the output (fully masked rows, lse = -inf, left out), so LSE gradients flow too."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
            self.proj = torch.nn.Linear(heads * dim, heads * dim)

        def forward(self, x: torch.Tensor, block_mask) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, heads, dim).permute(2, 0, 3, 1, 4)
            res = document_attention(
                q, k, v, block_mask, backend=attn_backend, return_lse=with_lse, opaque=opaque
            )
            o, lse = res if with_lse else (res, None)
            y = self.proj(o.transpose(1, 2).reshape(b, s, heads * dim))
            return y + torch.where(torch.isinf(lse), 0.0, lse).mean() if with_lse else y

    torch.manual_seed(seed)
    return Block()


def _step(fn, mod: torch.nn.Module, x: torch.Tensor, bm) -> tuple[torch.Tensor, list[torch.Tensor]]:
    y = fn(x, bm)
    grads = _grads(y.pow(2).mean(), [x, *mod.parameters()])
    return y.detach(), grads


def test_compile_fullgraph_aot_eager_matches_eager() -> None:
    """fullgraph=True (a graph break would raise) with AOT autograd: forward and backward equal eager."""
    mod = _block_module(0)
    compiled = torch.compile(mod, fullgraph=True, dynamic=False, backend="aot_eager")
    bm = document_block_mask(_doc_ids(5), block_size=BS)
    x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(6), requires_grad=True)
    y_c, g_c = _step(compiled, mod, x, bm)
    y_e, g_e = _step(mod, mod, x, bm)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_recompile_across_document_layouts() -> None:
    """Five batches with different document layouts (same shapes) reuse one compiled graph."""
    compiles = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        compiles.append(gm)
        return gm.forward

    mod = _block_module(1)
    counted = torch.compile(mod, fullgraph=True, dynamic=False, backend=counting_backend)
    aot = torch.compile(mod, fullgraph=True, dynamic=False, backend="aot_eager")
    layouts = [_doc_ids(10 + i, n_docs=2 + i, pad=16 * (i % 2)) for i in range(5)]
    for i, ids in enumerate(layouts):
        bm = document_block_mask(ids, block_size=BS, validate=False)
        x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(20 + i), requires_grad=True)
        y_e, g_e = _step(mod, mod, x, bm)
        y_c, g_c = _step(counted, mod, x, bm)
        if i == 0:
            y_a, g_a = _step(aot, mod, x, bm)
        else:  # any recompile of the AOT-compiled block raises from here on
            with torch.compiler.set_stance("fail_on_recompile"):
                y_a, g_a = _step(aot, mod, x, bm)
        for y in (y_c, y_a):
            torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-5)
        for g in (g_c, g_a):
            for a, b in zip(g, g_e, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert len(compiles) == 1, f"compiled {len(compiles)} times over 5 document layouts"
    # the layouts really differ (otherwise the test would prove nothing)
    assert len({tuple(ids[0].tolist()) for ids in layouts}) == 5


def _op_args(s: int = 128, bs: int = 32):
    bm = document_block_mask(torch.tensor([[0] * 40 + [1] * 50 + [2] * (s - 90)]), block_size=bs, window=30)
    mm = bm.mask_mod
    q, k, v = _qkv(2, 2, s, 16, seed=7)
    tensors = (*(getattr(bm, n) for n in ops._BM_TABLES), *(getattr(mm, n) for n in ops._DOC_TENSORS))
    scalars = (bs, bs, s, s, True, 30, None, False, "reference")
    return q, k, v, tensors, scalars


def test_opcheck_forward_and_backward_ops() -> None:
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration, AOT dispatch."""
    q, k, v, tensors, scalars = _op_args()
    torch.library.opcheck(ops._fwd, (q, k, v, *tensors, *scalars))
    with torch.no_grad():
        out, lse = ops._fwd(q, k, v, *tensors, *scalars)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    args = (q.detach(), k.detach(), v.detach(), out, dout, lse, dlse, *tensors, *scalars)
    torch.library.opcheck(ops._bwd, args)


def test_rejects_masks_the_op_cannot_take() -> None:
    q, k, v = _qkv(H, H, S, D, seed=8)
    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cpu", BLOCK_SIZE=BS)
    with pytest.raises(TypeError, match="DocumentMaskMod"):
        document_attention(q, k, v, causal)
    with pytest.raises(TypeError, match="BlockMask"):
        document_attention(q, k, v, object())
    short = document_block_mask(_doc_ids(1, length=128), block_size=BS)
    with pytest.raises(ValueError, match=r"\(128, 128\)"):
        document_attention(q, k, v, short)


def test_op_triton_backend_matches_reference(device: str) -> None:
    """The op with the Triton kernel inside (the interpreter on CPU): out, lse and grads equal the reference."""
    s, bs = 128, 32
    bm = document_block_mask(_doc_ids(9, length=s, pad=8).to(device), block_size=bs, window=48)
    q, k, v = (t.detach().to(device).requires_grad_(True) for t in _qkv(4, 2, s, 16, seed=10))
    out, lse = document_attention(q, k, v, bm, enable_gqa=True, backend="triton", return_lse=True)
    ref_out, ref_lse = flex_attention(
        q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="reference"
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(device)

    def loss(o, lse_):
        return (o * w).sum() + torch.where(torch.isinf(lse_), 0.0, lse_).sum()

    for a, b in zip(
        _grads(loss(out, lse), (q, k, v)), _grads(loss(ref_out, ref_lse), (q, k, v)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_compile_inductor_gpu_no_recompile() -> None:
    """On a GPU: inductor + the Triton kernel op, fullgraph, 5 document layouts, one compile, equal to eager."""
    mod = _block_module(2, attn_backend="triton").cuda()
    compiled = torch.compile(mod, fullgraph=True, dynamic=False, backend="inductor")
    for i in range(5):
        ids = _doc_ids(30 + i, n_docs=2 + i, pad=16 * (i % 2)).cuda()
        bm = document_block_mask(ids, block_size=BS, validate=False)
        x = (
            torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(40 + i))
            .cuda()
            .requires_grad_(True)
        )
        y_e, g_e = _step(mod, mod, x, bm)
        if i == 0:
            y_c, g_c = _step(compiled, mod, x, bm)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                y_c, g_c = _step(compiled, mod, x, bm)
        torch.testing.assert_close(y_c, y_e, rtol=2e-3, atol=2e-3)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
