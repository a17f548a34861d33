"""The Gluon Hopper forward (kernels/gluon_fwd.py).

Without a GPU (CI): every specialisation the host can ask for compiles for sm_90a on the installed Triton,
and the compiled kernel keeps the score GEMM's wgmma in flight across the softmax (a ``wgmma.wait_group 1``:
the point of the kernel); the host names why it declines a call.
On a Hopper GPU: out and LSE equal the fp32 dense reference and the Triton kernel on document-causal masks
(documents shorter and longer than a block, padding rows that see nothing), plain causal, sliding windows,
prefix-LM, no mask, GQA, ragged sequence ends, batches, fp16 and bf16, D = 64 and 128, strided inputs and
an ``out=`` target.
"""

from __future__ import annotations

import pytest
import torch
from gluon_sm90 import compile_in_child
from torch.nn.attention.flex_attention import create_block_mask

from flexdist.kernels import SoftCap
from flexdist.kernels.block_sparse import MASK_DOC, MASK_NONE
from flexdist.kernels.gluon_fwd import gluon_forward, gluon_forward_unsupported
from flexdist.kernels.reference import reference_forward
from flexdist.kernels.triton_fwd import triton_forward
from flexdist.masks import document_block_mask

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm_90) CUDA device")


SPECS = {
    "doc-causal": dict(),
    "d64-fp16": dict(D=64, dtype="fp16"),
    "ragged": dict(even_m=False, even_n=False),
    "no-mask": dict(mask_kind=MASK_NONE, causal=False, has_full=False),
    "window-prefix": dict(mask_kind=MASK_DOC, causal=True, has_window=True, has_prefix=True),
    "bidirectional-window": dict(causal=False, has_window=True, has_full=False),
    "merge": dict(accum=True),
    "merge-to-out-ragged": dict(accum=True, acc_to_out=True, even_m=False),
}


@pytest.fixture(scope="module")
def sm90_ptx() -> dict:
    return compile_in_child("flexdist.kernels.gluon_fwd.compile_for_sm90", SPECS)


@pytest.mark.parametrize("name", list(SPECS))
def test_compiles_for_sm90_with_the_overlap(sm90_ptx: dict, name: str) -> None:
    res = sm90_ptx[name]
    assert "error" not in res, res.get("error")
    ptx = res["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx
    # S_t waited for alone while P_{t-1}·V_{t-1} stays in flight under the softmax
    assert "wgmma.wait_group.sync.aligned 1;" in ptx


def _doc_ids(lengths: list[int], pad: int, B: int = 1) -> torch.Tensor:
    ids = [torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)]
    return torch.cat(ids)[None].expand(B, -1).contiguous()


def test_declines_with_the_reason() -> None:
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    bm = document_block_mask(_doc_ids([100, 156], 0), block_size=128)
    assert "CUDA" in gluon_forward_unsupported(q, q, q, bm, None, None)
    assert "float32" in gluon_forward_unsupported(q.float(), q.float(), q.float(), bm, None, None)
    q96 = torch.zeros(1, 2, 256, 96, dtype=torch.bfloat16)
    assert "D=96" in gluon_forward_unsupported(q96, q96, q96, bm, None, None)
    assert "SoftCap" in gluon_forward_unsupported(q, q, q, bm, SoftCap(20.0), None)
    assert "scale -1" in gluon_forward_unsupported(q, q, q, bm, None, -1.0)
    assert "out dtype torch.float64" in gluon_forward_unsupported(q, q, q, bm, None, None, out=q.double())
    odd = torch.zeros(1, 2, 256, 68, dtype=torch.bfloat16)[..., :64]  # rows of 136 bytes
    assert "row stride 68" in gluon_forward_unsupported(odd, odd, odd, bm, None, None)
    small = document_block_mask(_doc_ids([100, 156], 0), block_size=64)
    assert "(64, 64)" in gluon_forward_unsupported(q, q, q, small, None, None)
    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 256, 256, device="cpu")
    assert "mask_mod" in gluon_forward_unsupported(q, q, q, causal, None, None)
    with pytest.raises(ValueError, match=r"gluon_forward cannot run this call: .*CUDA"):
        gluon_forward(q, q, q, bm)


def _qkv(B, Hq, Hkv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, h, S, D, generator=g).to("cuda", dtype) for h in (Hq, Hkv, Hkv))


def _check(q, k, v, bm, gqa: bool, what: str, **kw) -> None:
    o, lse = gluon_forward(q, k, v, bm, enable_gqa=gqa, **kw)
    ro, rl = reference_forward(q.float(), k.float(), v.float(), bm, enable_gqa=gqa)
    to, tl_ = triton_forward(q, k, v, bm, enable_gqa=gqa)
    fin = torch.isfinite(rl)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), what
    assert torch.equal(torch.isfinite(lse), fin), f"{what}: the -inf LSE rows differ from the reference"
    assert (o.float()[~fin] == 0).all(), f"{what}: rows that see nothing must be 0"
    tol = 2e-2 if q.dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(o.float(), ro.float(), atol=tol, rtol=tol, msg=lambda m: f"{what} vs ref: {m}")
    torch.testing.assert_close(lse[fin], rl[fin], atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} lse: {m}")
    # against the Triton kernel: both accumulate bf16 P·V in fp32 over the same blocks
    torch.testing.assert_close(
        o.float(), to.float(), atol=tol, rtol=tol, msg=lambda m: f"{what} vs triton: {m}"
    )
    torch.testing.assert_close(lse, tl_, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} lse vs triton: {m}")


# documents inside one block, straddling blocks, spanning several; then padding (rows that see nothing)
LENGTHS = [3, 200, 7, 1, 530, 60, 129]


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_document_causal(dtype, D) -> None:
    doc = _doc_ids(LENGTHS, 94, B=2)  # 1024 tokens
    doc[1, :300] = torch.arange(300) // 37  # the second sequence has another layout
    bm = document_block_mask(doc.cuda(), block_size=128)
    q, k, v = _qkv(2, 4, 2, doc.shape[1], D, dtype)
    _check(q, k, v, bm, True, f"document-causal {dtype} D={D}")


@needs_hopper
@pytest.mark.parametrize("S", [1000, 1153, 77])
def test_ragged_lengths(S) -> None:
    lengths = [S // 3, S - S // 3 - 5]
    doc = _doc_ids(lengths, 5)
    bm = document_block_mask(doc.cuda(), block_size=128)
    q, k, v = _qkv(1, 8, 8, S, 128, torch.bfloat16, seed=S)
    _check(q, k, v, bm, False, f"ragged S={S}")


@needs_hopper
@pytest.mark.parametrize(
    "kw", [dict(causal=True), dict(causal=True, window=200), dict(causal=False, window=150),
           dict(causal=True, prefix_lengths=64), dict(causal=False)],
    ids=["causal-one-doc", "causal-window", "bidirectional-window", "prefix-lm", "bidirectional-docs"],
)  # fmt: skip
def test_mask_variants(kw) -> None:
    doc = _doc_ids([1500], 0) if "window" in kw and kw.get("causal") else _doc_ids([700, 500, 300], 36)
    bm = document_block_mask(doc.cuda(), block_size=128, **kw)
    q, k, v = _qkv(1, 4, 1, doc.shape[1], 128, torch.bfloat16, seed=3)
    _check(q, k, v, bm, True, f"mask {kw}")


@needs_hopper
def test_no_mask_and_blocks_of_256() -> None:
    q, k, v = _qkv(1, 2, 2, 640, 128, torch.bfloat16, seed=4)
    noop = create_block_mask(lambda b, h, qi, ki: qi >= 0, None, None, 640, 640, device="cuda")
    # a no-op-equivalent Python mask goes to bit tiles: only torch's own noop_mask is MASK_NONE
    from torch.nn.attention.flex_attention import noop_mask

    bm = create_block_mask(noop_mask, None, None, 640, 640, device="cuda")
    _check(q, k, v, bm, False, "noop mask")
    assert gluon_forward_unsupported(q, k, v, noop, None, None) is not None
    doc = _doc_ids([300, 200, 140], 0)
    bm256 = document_block_mask(doc.cuda(), block_size=256)
    _check(q, k, v, bm256, False, "256-token blocks (two kv steps per block)")


@needs_hopper
def test_strided_inputs_and_out_target() -> None:
    doc = _doc_ids([400, 600], 24)
    bm = document_block_mask(doc.cuda(), block_size=128)
    S = doc.shape[1]
    g = torch.Generator().manual_seed(5)
    # [B, S, H, D] storage seen as [B, H, S, D] (how a model hands q, k, v over)
    q = torch.randn(1, S, 4, 128, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, S, 2, 128, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    v = torch.randn(1, S, 2, 128, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    big = torch.full((1, 6, S, 128), 7.0, device="cuda", dtype=torch.bfloat16)
    o, _ = gluon_forward(q, k, v, bm, enable_gqa=True, out=big[:, 1:5])
    assert o.data_ptr() == big[:, 1:5].data_ptr()
    assert (big[:, 0] == 7).all() and (big[:, 5] == 7).all(), "out= wrote outside its head slice"
    _check(q, k, v, bm, True, "strided [B,S,H,D] inputs")


@needs_hopper
def test_against_torch_flex_attention() -> None:
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    doc = _doc_ids([333, 900, 47, 768], 0)
    S = doc.shape[1]
    d = doc[0].cuda()

    def mm(b, h, qi, ki):
        return (d[qi] == d[ki]) & (qi >= ki)

    tbm = create_block_mask(mm, None, None, S, S, device="cuda")
    bm = document_block_mask(doc.cuda(), block_size=128)
    q, k, v = _qkv(1, 8, 2, S, 128, torch.bfloat16, seed=6)
    o, lse = gluon_forward(q, k, v, bm, enable_gqa=True)
    to, tlse = torch_flex(q, k, v, block_mask=tbm, enable_gqa=True, return_lse=True)
    torch.testing.assert_close(o, to, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, tlse.float(), atol=1e-3, rtol=1e-3)


def test_backend_gluon_needs_cuda() -> None:
    from flexdist.kernels import flex_attention_forward

    q = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend='gluon' needs a CUDA tensor"):
        flex_attention_forward(q, q, q, backend="gluon")


@needs_hopper
@pytest.mark.parametrize("to_out", [False, True], ids=["merge-in-place", "merge-to-out"])
def test_running_result_merge(to_out: bool) -> None:
    """Two calls over the two halves of the keys merged by LSE (CP's ring / local-first forward) equal one
    call over all of them; query tiles that see nothing of a half are left as they were (in place)."""
    doc = _doc_ids([300, 500, 200, 17], 7)  # 1024 tokens
    S = doc.shape[1]
    h = 512
    d = doc.cuda()
    full = document_block_mask(d, block_size=128)
    halves = [torch.arange(0, h, device="cuda"), torch.arange(h, S, device="cuda")]
    masks = [document_block_mask(d, kv_positions=kv, block_size=128) for kv in halves]
    q, k, v = _qkv(1, 4, 2, S, 128, torch.bfloat16, seed=7)
    ref_o, ref_l = reference_forward(q.float(), k.float(), v.float(), full, enable_gqa=True)
    for fwd in (gluon_forward, triton_forward):
        o_acc = torch.zeros(1, 4, S, 128, device="cuda")
        l_acc = torch.full((1, 4, S), float("-inf"), device="cuda")
        final = torch.empty(1, 4, S, 128, device="cuda", dtype=torch.bfloat16) if to_out else None
        for i, (kv, bm) in enumerate(zip(halves, masks, strict=True)):
            kw = dict(out=final) if to_out and i == 1 else {}
            res, lse = fwd(
                q, k[:, :, kv], v[:, :, kv], bm, enable_gqa=True, out_acc=o_acc, lse_acc=l_acc, **kw
            )
        got = final if to_out else o_acc
        assert res.data_ptr() == got.data_ptr() and lse.data_ptr() == l_acc.data_ptr()
        fin = torch.isfinite(ref_l)
        assert torch.equal(torch.isfinite(l_acc), fin), fwd.__name__
        torch.testing.assert_close(
            got.float(), ref_o.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{fwd.__name__} {m}"
        )
        torch.testing.assert_close(l_acc[fin], ref_l[fin], atol=1e-4, rtol=1e-4)


@needs_hopper
def test_auto_backend_picks_gluon_where_it_applies() -> None:
    """flex_attention_forward(backend="auto") gives the Gluon kernel's result where it covers the call, the
    Triton kernel's where not (a score mod), and backend="gluon" names why it cannot run."""
    from flexdist.kernels import flex_attention, flex_attention_forward

    doc = _doc_ids([300, 500, 200], 24)
    bm = document_block_mask(doc.cuda(), block_size=128)
    q, k, v = _qkv(1, 4, 2, doc.shape[1], 128, torch.bfloat16, seed=8)
    auto = flex_attention_forward(q, k, v, bm, enable_gqa=True)
    glu = gluon_forward(q, k, v, bm, enable_gqa=True)
    assert torch.equal(auto[0], glu[0]) and torch.equal(auto[1], glu[1])
    capped = flex_attention_forward(q, k, v, bm, SoftCap(20.0), enable_gqa=True)
    tri = triton_forward(q, k, v, bm, SoftCap(20.0), enable_gqa=True)
    assert torch.equal(capped[0], tri[0])
    with pytest.raises(ValueError, match="backend='gluon' cannot run this forward: score_mod SoftCap"):
        flex_attention_forward(q, k, v, bm, SoftCap(20.0), enable_gqa=True, backend="gluon")
    # the differentiable entry point: Gluon forward, Triton backward, gradients as the Triton forward's
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = flex_attention(qs, ks, vs, block_mask=bm, enable_gqa=True)
    assert torch.equal(out, glu[0])
    out.float().square().sum().backward()
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    flex_attention(
        qt, kt, vt, block_mask=bm, enable_gqa=True, backend="triton"
    ).float().square().sum().backward()
    for a, b_ in ((qs, qt), (ks, kt), (vs, vt)):
        torch.testing.assert_close(a.grad, b_.grad, atol=3e-2, rtol=3e-2)
