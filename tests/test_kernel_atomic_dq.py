"""``deterministic=False``: dQ computed inside the dK/dV kernel and added with fp32 atomics.

Checked against the deterministic kernels (same math, another summation order: fp32 rounding apart) and
the dense fp32 reference, for document / causal / window / bit-tile masks, GQA, ragged lengths, fully
masked rows, score mods, the ``dq_out`` buffer modes and the autograd entry point; and that the
deterministic kernels still run where the atomic path does not apply (one kernel only, a learnable bias
table, ``torch.use_deterministic_algorithms``). On CPU the kernels run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import flexdist.kernels.triton_bwd as triton_bwd
from flexdist.kernels import (
    ALiBi,
    DocumentMaskMod,
    RelativeBias,
    SoftCap,
    flex_attention,
    flex_attention_backward,
    flex_attention_forward,
    reference_backward,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _docs(S: int, seed: int, max_len: int, pad: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (S,), generator=g)
    doc = torch.searchsorted(torch.cumsum(lengths, 0), torch.arange(S), right=True)
    if pad:
        doc[-pad:] = -1  # padding: rows that see nothing
    return doc[None]


def _mask(kind: str, S: int, bs: int, pad: int = 0):
    doc = _docs(S, seed=7, max_len=max(2, S // 3), pad=pad).to(DEV)
    pos = torch.arange(S, device=DEV)[None]
    if kind == "causal":  # a Python mask_mod: bit tiles
        return create_block_mask(lambda b, h, q, k: q >= k, None, None, S, S, device=DEV, BLOCK_SIZE=bs)
    if kind == "general":  # dilated causal, also bit tiles
        mm = lambda b, h, q, k: (q >= k) & ((q - k) % 2 == 0)
        return create_block_mask(mm, None, None, S, S, device=DEV, BLOCK_SIZE=bs)
    window = 11 if kind == "window" else None
    return create_block_mask(
        DocumentMaskMod(doc, doc, pos, pos, window=window), 1, None, S, S, device=DEV, BLOCK_SIZE=bs
    )


def _inputs(Hq: int, Hkv: int, S: int, D: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, S, D, generator=g).to(DEV, dtype)
    k = torch.randn(1, Hkv, S, D, generator=g).to(DEV, dtype)
    v = torch.randn(1, Hkv, S, D, generator=g).to(DEV, dtype)
    return q, k, v


def _both(q, k, v, bm, sm=None, gqa=False, **kw):
    """(forward, dout, deterministic grads, atomic grads)."""
    out, lse = flex_attention_forward(q, k, v, bm, sm, None, gqa, backend="triton")
    g = torch.Generator().manual_seed(11)
    dout = torch.randn(out.shape, generator=g).to(q.device, q.dtype)
    det = flex_attention_backward(q, k, v, out, dout, lse, bm, sm, None, gqa, backend="triton", **kw)
    atom = flex_attention_backward(
        q, k, v, out, dout, lse, bm, sm, None, gqa, backend="triton", deterministic=False, **kw
    )
    return (out, lse), dout, det, atom


@pytest.mark.parametrize(
    "kind,Hq,Hkv,S,sm",
    [
        ("doc", 4, 2, 128, None),
        ("doc", 2, 2, 100, None),  # ragged: S is not a multiple of the block
        ("causal", 2, 1, 96, None),
        ("window", 4, 1, 64, None),
        ("general", 2, 2, 64, None),
        ("doc", 4, 2, 64, SoftCap(5.0)),
        ("doc", 2, 1, 64, "alibi"),
    ],
)
def test_atomic_dq_matches_deterministic_and_reference(kind, Hq, Hkv, S, sm):
    if sm == "alibi":
        sm = ALiBi(torch.linspace(0.1, 0.9, Hq, device=DEV))
    bm = _mask(kind, S, 32)
    q, k, v = _inputs(Hq, Hkv, S, 32, seed=3)
    (out, lse), dout, det, atom = _both(q, k, v, bm, sm, gqa=Hq != Hkv)
    ref = reference_backward(q, k, v, out, dout, lse, bm, sm, None, Hq != Hkv)
    for name, a, d, r in zip(("dq", "dk", "dv"), atom, det, ref, strict=True):
        assert a.dtype == q.dtype and a.shape == d.shape
        assert torch.isfinite(a).all(), name
        # same products, another order of the fp32 sums
        torch.testing.assert_close(
            a, d, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n} vs deterministic: {m}"
        )
        torch.testing.assert_close(a, r, atol=4e-4, rtol=4e-4, msg=lambda m, n=name: f"{n} vs reference: {m}")
    # dK / dV come from the same kernel and loop either way
    assert torch.equal(atom[1], det[1]) and torch.equal(atom[2], det[2])


def test_atomic_dq_bf16_and_fully_masked_rows():
    S, pad = 96, 7
    bm = _mask("doc", S, 32, pad=pad)
    q, k, v = _inputs(4, 2, S, 32, dtype=torch.bfloat16, seed=5)
    (out, lse), dout, det, atom = _both(q, k, v, bm, gqa=True)
    assert torch.isneginf(lse[..., -pad:]).all()
    ref = reference_backward(
        q.float(), k.float(), v.float(), out.float(), dout.float(), lse, bm, None, None, True
    )
    assert atom[0].dtype == torch.bfloat16
    assert torch.equal(atom[0][..., -pad:, :], torch.zeros_like(atom[0][..., -pad:, :]))
    torch.testing.assert_close(atom[0].float(), det[0].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(atom[0].float(), ref[0], atol=6e-2, rtol=6e-2)


def test_atomic_dq_into_buffers():
    """dq_out: fp32 is added into in place (accumulate) or overwritten; other dtypes through a scratch."""
    S = 64
    bm = _mask("doc", S, 32)
    q, k, v = _inputs(2, 1, S, 32, seed=9)
    out, lse = flex_attention_forward(q, k, v, bm, None, None, True, backend="triton")
    dout = torch.randn_like(out)
    want = flex_attention_backward(q, k, v, out, dout, lse, bm, None, None, True, backend="triton")[0]
    start = torch.randn_like(q)
    for dtype in (torch.float32, torch.float64):
        for accumulate in (True, False):
            buf = start.to(dtype).clone()
            dq, _, _ = flex_attention_backward(
                q, k, v, out, dout, lse, bm, None, None, True, backend="triton", deterministic=False,
                dq_out=buf, accumulate=accumulate,
            )  # fmt: skip
            assert dq is buf and dq.dtype == dtype
            expect = (start + want if accumulate else want).to(dtype)
            torch.testing.assert_close(dq, expect, atol=3e-5, rtol=3e-5)


def _count_dq_kernel_launches(monkeypatch) -> list:
    calls = []
    real = triton_bwd._dq

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(triton_bwd, "_dq", spy)
    return calls


def test_deterministic_kernels_where_atomics_do_not_apply(monkeypatch):
    S = 64
    bm = _mask("doc", S, 32)
    q, k, v = _inputs(2, 2, S, 32, seed=4)
    out, lse = flex_attention_forward(q, k, v, bm, None, None, False, backend="triton")
    dout = torch.randn_like(out)
    calls = _count_dq_kernel_launches(monkeypatch)
    kw = dict(backend="triton")
    flex_attention_backward(q, k, v, out, dout, lse, bm, None, None, False, deterministic=False, **kw)
    assert calls == [], "the atomic path must not launch the dQ kernel"
    flex_attention_backward(q, k, v, out, dout, lse, bm, None, None, False, **kw)
    assert calls == [1]
    # one kernel only: the dQ kernel (its own, deterministic) runs
    dq1 = flex_attention_backward(
        q, k, v, out, dout, lse, bm, None, None, False, which="dq", deterministic=False, **kw
    )
    assert calls == [1, 1] and dq1[1] is None
    # a learnable bias table: its gradient is reduced in the dQ kernel
    sm = RelativeBias(torch.randn(2, 2 * 8 - 1, device=DEV, requires_grad=True))
    o2, l2 = flex_attention_forward(q, k, v, bm, sm, None, False, backend="triton")
    grads = [torch.zeros(2, 15, device=DEV)]
    flex_attention_backward(
        q, k, v, o2, dout, l2, bm, sm, None, False, score_mod_grads=grads, deterministic=False, **kw
    )
    assert calls == [1, 1, 1] and grads[0].abs().sum() > 0
    # torch's global switch picks the deterministic implementation, as torch's own ops do
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        flex_attention_backward(q, k, v, out, dout, lse, bm, None, None, False, deterministic=False, **kw)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert calls == [1, 1, 1, 1]


def test_autograd_deterministic_false_matches_reference():
    S = 64
    bm = _mask("window", S, 16)
    q0, k0, v0 = _inputs(4, 2, S, 16, seed=8)
    res = []
    for backend, det in (("triton", False), ("reference", True)):
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        out, lse = flex_attention(
            q, k, v, None, bm, enable_gqa=True, return_lse=True, backend=backend, deterministic=det
        )
        (out.square().sum() + lse.sum()).backward()
        res.append((q.grad, k.grad, v.grad))
    for name, a, b in zip(("dq", "dk", "dv"), *res, strict=True):
        torch.testing.assert_close(a, b, atol=4e-4, rtol=4e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_bad_deterministic_argument():
    bm = _mask("doc", 32, 16)
    q, k, v = _inputs(1, 1, 32, 16)
    with pytest.raises(ValueError, match="deterministic must be a bool, got 'no'"):
        flex_attention(q, k, v, None, bm, deterministic="no")
    out, lse = flex_attention_forward(q, k, v, bm, backend="triton")
    with pytest.raises(ValueError, match="deterministic must be a bool, got 0"):
        flex_attention_backward(q, k, v, out, out, lse, bm, backend="triton", deterministic=0)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [2048, 8192])  # 8192: the autotuned launch (tuning restores dQ between runs)
def test_atomic_dq_gpu_bf16(S):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(256, 3000, (S,), generator=g)
    doc = torch.searchsorted(torch.cumsum(lengths, 0), torch.arange(S), right=True)[None].cuda()
    pos = torch.arange(S, device="cuda")[None]
    bm = create_block_mask(DocumentMaskMod(doc, doc, pos, pos), 1, None, S, S, device="cuda", BLOCK_SIZE=128)
    q, k, v = _inputs(8, 2, S, 128, dtype=torch.bfloat16, seed=1)
    (out, lse), dout, det, atom = _both(q, k, v, bm, gqa=True)
    again = flex_attention_backward(q, k, v, out, dout, lse, bm, None, None, True, deterministic=False)
    for name, a, d in zip(("dq", "dk", "dv"), atom, det, strict=True):
        err = (a.float() - d.float()).abs().max().item()
        scale = d.float().abs().max().item()
        assert err <= 2e-2 * scale, f"{name}: max |atomic - deterministic| {err} vs max |grad| {scale}"
    torch.testing.assert_close(again[0].float(), atom[0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_tma_reduce_is_used_on_hopper():
    """On Hopper and newer the dQ tiles go through TMA reduce-adds (mode 2), not per-element atomics; a buffer
    TMA cannot address (a row stride that is not a multiple of 16 bytes) takes the atomics."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or newer")
    assert triton_bwd._tma_reduce_ok(torch.zeros(1, 2, 256, 128, device="cuda"))
    odd = torch.zeros(1, 2, 256, 129, device="cuda")[..., :128]
    assert not triton_bwd._tma_reduce_ok(odd)
