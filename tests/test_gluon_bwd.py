"""The Gluon Hopper backward kernels, dQ and dK/dV (kernels/gluon_bwd.py).

Without a GPU (CI): the dQ and dK/dV kernels' specialisations compile for sm_90a on the installed Triton
without register spills or wgmma serialisation, with two GEMMs in flight at the step's first wait.
On a Hopper GPU: dQ equals the fp32 dense reference and the Triton dQ kernel on document-causal masks
(documents shorter and longer than a block, padding rows that see nothing), windows, prefix-LM, no mask,
GQA, ragged lengths, fp16 and bf16, D = 64 and 128, both kv step widths; ``dq_out`` added into and written
over (fp32 and bf16); likewise dK and dV (``gluon_dkdv``); ``flex_attention_backward``'s
default backend takes both where they cover the call, with and without GQA, and the Triton kernels where
not.
"""

from __future__ import annotations

import pytest
import torch
import triton
from gluon_sm90 import compile_in_child

from flexdist.kernels.block_sparse import MASK_NONE
from flexdist.kernels.gluon_bwd import gluon_backward_unsupported, gluon_dkdv, gluon_dq
from flexdist.kernels.reference import reference_backward, reference_forward
from flexdist.kernels.triton_bwd import triton_backward, triton_delta
from flexdist.masks import document_block_mask

_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm_90) CUDA device")

DQ_SPECS = {
    "doc-causal": dict(),
    "d64-fp16-ragged": dict(D=64, dtype="fp16", even_m=False, even_n=False),
    "no-mask-accum": dict(mask_kind=MASK_NONE, causal=False, has_full=False, accum=True),
    "window-prefix": dict(has_window=True, has_prefix=True),
}
DKDV_SPECS = {
    "dkdv-doc-causal": dict(),
    "dkdv-d64-fp16-ragged-accum": dict(D=64, dtype="fp16", even_m=False, even_n=False, accum=True),
    "dkdv-window-prefix": dict(has_window=True, has_prefix=True),
    "dkdv-no-mask": dict(mask_kind=MASK_NONE, causal=False, has_full=False),
}
SPECS = {**DQ_SPECS, **DKDV_SPECS}


@pytest.fixture(scope="module")
def sm90() -> dict:
    return {
        **compile_in_child("flexdist.kernels.gluon_bwd.compile_dq_for_sm90", DQ_SPECS),
        **compile_in_child("flexdist.kernels.gluon_bwd.compile_dkdv_for_sm90", DKDV_SPECS),
    }


@pytest.mark.parametrize("name", list(SPECS))
def test_dq_compiles_for_sm90(sm90: dict, name: str) -> None:
    res = sm90[name]
    assert "error" not in res, res.get("error")
    ptx = res["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    # the step's first GEMM waited for while its second is still in flight
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    if "spill" in res["ptxas"]:  # this ptxas reports register use: the shipped dQ tiles must not spill
        # (the dK/dV kernel spills on triton 3.6, 44-104 bytes of per-head scalars, outside the step loop;
        # none on 3.9: s14),
        if not name.startswith("dkdv") or _TRITON >= (3, 9):
            assert "0 bytes spill stores" in res["ptxas"], res["ptxas"]
        # nor run short of registers to keep the asynchronous wgmmas in flight (ptxas C7512 then
        # serialises them: what the in-flight accumulators across steps cost before SERIAL)
        assert "serialized" not in res["ptxas"], res["ptxas"]


def _doc_ids(lengths: list[int], pad: int, B: int = 1) -> torch.Tensor:
    ids = [torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)]
    return torch.cat(ids)[None].expand(B, -1).contiguous()


def test_declines_with_the_reason() -> None:
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    bm = document_block_mask(_doc_ids([100, 156], 0), block_size=128)
    assert "CUDA" in gluon_backward_unsupported(q, q, q, q, bm, None, None)
    assert "dout dtype" in gluon_backward_unsupported(q, q, q, q.half(), bm, None, None)
    assert "dq_out dtype torch.float64" in gluon_backward_unsupported(
        q, q, q, q, bm, None, None, dq_out=q.double()
    )
    assert "dv_out dtype torch.float64" in gluon_backward_unsupported(
        q, q, q, q, bm, None, None, dv_out=q.double()
    )
    with pytest.raises(ValueError, match="gluon_dq cannot run this call"):
        gluon_dq(q, q, q, q, torch.zeros(1, 2, 256), torch.zeros(1, 2, 256), bm)


def _inputs(B, Hq, Hkv, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, h, S, D, generator=g).to("cuda", dtype) for h in (Hq, Hkv, Hkv, Hq))
    return q, k, v, do


def _check(bm, B, Hq, Hkv, S, D, dtype, what, seed=0, block_n=64) -> None:
    q, k, v, do = _inputs(B, Hq, Hkv, S, D, dtype, seed)
    gqa = Hq != Hkv
    ro, rl = reference_forward(q.float(), k.float(), v.float(), bm, enable_gqa=gqa)
    rdq, _, _ = reference_backward(
        q.float(), k.float(), v.float(), ro, do.float(), rl, bm, enable_gqa=gqa
    )  # fmt: skip
    out = ro.to(dtype)
    delta = triton_delta(out, do)
    dq = gluon_dq(q, k, v, do, rl, delta, bm, enable_gqa=gqa, block_n=block_n)
    tdq, _, _ = triton_backward(q, k, v, out, do, rl, bm, enable_gqa=gqa, delta=delta, which="dq")
    assert dq.dtype == q.dtype and not torch.isnan(dq).any(), what
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    scale = rdq.abs().max().clamp_min(1.0)
    torch.testing.assert_close(
        dq.float() / scale, rdq / scale, atol=tol, rtol=0, msg=lambda m: f"{what}: {m}"
    )
    torch.testing.assert_close(dq.float() / scale, tdq.float() / scale, atol=tol, rtol=0,
                               msg=lambda m: f"{what} vs triton: {m}")  # fmt: skip
    fin = torch.isfinite(rl)
    assert (dq[~fin] == 0).all(), f"{what}: rows that see nothing get dQ 0"
    _, rdk, rdv = reference_backward(q.float(), k.float(), v.float(), ro, do.float(), rl, bm, enable_gqa=gqa)
    dk, dv = gluon_dkdv(q, k, v, do, rl, delta, bm, enable_gqa=gqa)
    _, tdk, tdv = triton_backward(q, k, v, out, do, rl, bm, enable_gqa=gqa, delta=delta, which="dkdv")
    for nm, got, ref, tri in (("dK", dk, rdk, tdk), ("dV", dv, rdv, tdv)):
        assert got.dtype == k.dtype and not torch.isnan(got).any(), f"{what} {nm}"
        sc = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            got.float() / sc, ref / sc, atol=tol, rtol=0, msg=lambda m: f"{what} {nm}: {m}"
        )
        torch.testing.assert_close(got.float() / sc, tri.float() / sc, atol=tol, rtol=0,
                                   msg=lambda m: f"{what} {nm} vs triton: {m}")  # fmt: skip


LENGTHS = [3, 200, 7, 1, 530, 60, 129]


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_document_causal(dtype, D) -> None:
    doc = _doc_ids(LENGTHS, 94, B=2)
    doc[1, :300] = torch.arange(300) // 37
    bm = document_block_mask(doc.cuda(), block_size=128)
    _check(bm, 2, 4, 2, doc.shape[1], D, dtype, f"doc-causal {dtype} D={D}")


@needs_hopper
def test_lead_blocks_and_head_groups_keep_results(monkeypatch) -> None:
    """The launch order (head groups, and the lead blocks launched ahead of them: none, some, all) changes
    no bit of dQ, dK or dV (``triton_fwd.launch_lead``: the SM count it sizes the lead for is faked to get
    each case at these small shapes: dQ has 12 batch·heads, dK/dV 4, over 8 blocks)."""
    from flexdist.kernels import triton_fwd as TF

    doc = _doc_ids(LENGTHS, 94, B=2)
    bm = document_block_mask(doc.cuda(), block_size=128)
    B, Hq, Hkv, S = 2, 6, 2, doc.shape[1]
    q, k, v, do = _inputs(B, Hq, Hkv, S, 128, torch.bfloat16, seed=7)
    ro, rl = reference_forward(q.float(), k.float(), v.float(), bm, enable_gqa=True)
    rdq, rdk, rdv = reference_backward(
        q.float(), k.float(), v.float(), ro, do.float(), rl, bm, enable_gqa=True
    )
    delta = triton_delta(ro.to(q.dtype), do)
    monkeypatch.setattr(TF, "LEAD_MIN_KV_PER_Q", 1)  # (the lead is for CP calls with more keys than queries)
    first = None
    for hg, sms in [(100, 132), (1, 1), (1, 48), (5, 10**4), (2, 24)]:
        monkeypatch.setattr(TF, "_sm_count", lambda index, sms=sms: sms)
        dq = gluon_dq(q, k, v, do, rl, delta, bm, enable_gqa=True, head_group=hg)
        dk, dv = gluon_dkdv(q, k, v, do, rl, delta, bm, enable_gqa=True, head_group=hg)
        if first is None:
            first = (dq, dk, dv)
            for nm, got, ref in (("dQ", dq, rdq), ("dK", dk, rdk), ("dV", dv, rdv)):
                sc = ref.abs().max().clamp_min(1.0)
                torch.testing.assert_close(
                    got.float() / sc, ref / sc, atol=5e-2, rtol=0, msg=lambda m: f"{nm}: {m}"
                )
            continue
        for nm, got, want in zip(("dQ", "dK", "dV"), (dq, dk, dv), first, strict=True):
            assert torch.equal(got, want), f"{nm} differs with head_group={hg}, lead sized for {sms} SMs"


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
def test_window_gqa_batch(D) -> None:
    """Sliding windows over ragged documents, GQA 3:1, padding, and a batch of two document layouts."""
    doc = _doc_ids(LENGTHS, 94, B=2)
    doc[1, :300] = torch.arange(300) // 37
    bm = document_block_mask(doc.cuda(), block_size=128, window=300)
    _check(bm, 2, 6, 2, doc.shape[1], D, torch.bfloat16, f"window GQA batch D={D}", seed=D)


@needs_hopper
@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("S", [1000, 77])
def test_ragged_and_step_width(S, block_n) -> None:
    doc = _doc_ids([S // 3, S - S // 3 - 5], 5)
    bm = document_block_mask(doc.cuda(), block_size=128)
    _check(bm, 1, 8, 8, S, 128, torch.bfloat16, f"ragged S={S} block_n={block_n}", seed=S, block_n=block_n)


@needs_hopper
@pytest.mark.parametrize(
    "kw", [dict(causal=True, window=200), dict(causal=False, window=150), dict(causal=True, prefix_lengths=64),
           dict(causal=False)],
    ids=["causal-window", "bidirectional-window", "prefix-lm", "bidirectional-docs"],
)  # fmt: skip
def test_mask_variants(kw) -> None:
    doc = _doc_ids([700, 500, 300], 36)
    bm = document_block_mask(doc.cuda(), block_size=128, **kw)
    _check(bm, 1, 4, 1, doc.shape[1], 128, torch.bfloat16, f"mask {kw}", seed=3)


@needs_hopper
def test_no_mask() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, noop_mask

    bm = create_block_mask(noop_mask, None, None, 640, 640, device="cuda")
    _check(bm, 1, 2, 2, 640, 128, torch.bfloat16, "noop mask", seed=4)


@needs_hopper
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
def test_dq_out_add_and_overwrite(buf_dtype) -> None:
    doc = _doc_ids([300, 500, 200], 24)
    bm = document_block_mask(doc.cuda(), block_size=128)
    S = doc.shape[1]
    q, k, v, do = _inputs(1, 4, 2, S, 128, torch.bfloat16, 9)
    ro, rl = reference_forward(q.float(), k.float(), v.float(), bm, enable_gqa=True)
    delta = triton_delta(ro.to(q.dtype), do)
    fresh = gluon_dq(q, k, v, do, rl, delta, bm, enable_gqa=True)
    base = torch.randn(1, 4, S, 128, device="cuda").to(buf_dtype)
    added = base.clone()
    assert gluon_dq(q, k, v, do, rl, delta, bm, enable_gqa=True, dq_out=added) is added
    torch.testing.assert_close(
        added.float(), (base.float() + fresh.float()).to(buf_dtype).float(), atol=3e-2, rtol=2e-2
    )
    over = torch.full_like(base, 7.0)
    gluon_dq(q, k, v, do, rl, delta, bm, enable_gqa=True, dq_out=over, accumulate=False)
    torch.testing.assert_close(over.float(), fresh.float(), atol=2e-2, rtol=2e-2)


@needs_hopper
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
def test_dkdv_out_add_and_overwrite(buf_dtype) -> None:
    doc = _doc_ids([300, 500, 200], 24)
    bm = document_block_mask(doc.cuda(), block_size=128)
    S = doc.shape[1]
    q, k, v, do = _inputs(1, 4, 2, S, 128, torch.bfloat16, 10)
    ro, rl = reference_forward(q.float(), k.float(), v.float(), bm, enable_gqa=True)
    delta = triton_delta(ro.to(q.dtype), do)
    fk, fv = gluon_dkdv(q, k, v, do, rl, delta, bm, enable_gqa=True)
    bk, bv = (torch.randn(1, 2, S, 128, device="cuda").to(buf_dtype) for _ in range(2))
    ak, av = bk.clone(), bv.clone()
    rk, rv = gluon_dkdv(q, k, v, do, rl, delta, bm, enable_gqa=True, dk_out=ak, dv_out=av)
    assert rk is ak and rv is av
    for got, base, fresh in ((ak, bk, fk), (av, bv, fv)):
        want = (base.float() + fresh.float()).to(buf_dtype).float()
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)
    ok, ov = torch.full_like(bk, 7.0), torch.full_like(bv, 7.0)
    gluon_dkdv(q, k, v, do, rl, delta, bm, enable_gqa=True, dk_out=ok, dv_out=ov, accumulate=False)
    torch.testing.assert_close(ok.float(), fk.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ov.float(), fv.float(), atol=2e-2, rtol=2e-2)


@needs_hopper
def test_flex_backward_default_dispatch() -> None:
    from flexdist.kernels import flex_attention_backward

    doc = _doc_ids([333, 900, 47], 0)
    bm = document_block_mask(doc.cuda(), block_size=128)
    q, k, v, do = _inputs(1, 8, 2, doc.shape[1], 128, torch.bfloat16, 11)
    ro, rl = reference_forward(q.float(), k.float(), v.float(), bm, enable_gqa=True)
    out = ro.to(q.dtype)
    delta = triton_delta(out, do)
    dq, dk, dv = flex_attention_backward(q, k, v, out, do, rl, bm, enable_gqa=True)
    assert torch.equal(dq, gluon_dq(q, k, v, do, rl, delta, bm, enable_gqa=True))
    wk, wv = gluon_dkdv(q, k, v, do, rl, delta, bm, enable_gqa=True)
    assert torch.equal(dk, wk) and torch.equal(dv, wv)
    tq, tk, tv = flex_attention_backward(q, k, v, out, do, rl, bm, enable_gqa=True, backend="triton")
    _, sk, sv = triton_backward(q, k, v, out, do, rl, bm, enable_gqa=True, delta=delta, which="dkdv")
    assert torch.equal(tk, sk) and torch.equal(tv, sv)  # backend="triton": the Triton dK/dV kernel
    for got, want in ((dq, tq), (dk, tk), (dv, tv)):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    # without GQA too
    mq, mdo = q[:, :2], do[:, :2]
    mo, ml = reference_forward(mq.float(), k.float(), v.float(), bm)
    mo = mo.to(q.dtype)
    _, ak, av = flex_attention_backward(mq, k, v, mo, mdo, ml, bm)
    wk, wv = gluon_dkdv(mq, k, v, mdo, ml, triton_delta(mo, mdo), bm)
    assert torch.equal(ak, wk) and torch.equal(av, wv)
    # a call the Gluon kernels do not cover (a score mod) runs the Triton ones under the default backend
    from flexdist.kernels.score_mods import SoftCap

    cq, ck, cv = flex_attention_backward(q, k, v, out, do, rl, bm, SoftCap(20.0), enable_gqa=True)
    xq, xk, xv = flex_attention_backward(
        q, k, v, out, do, rl, bm, SoftCap(20.0), enable_gqa=True, backend="triton"
    )
    assert torch.equal(cq, xq) and torch.equal(ck, xk) and torch.equal(cv, xv)
