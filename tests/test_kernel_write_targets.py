"""Write targets of the kernel entry points: ``out=`` (forward) and ``accumulate=False`` (backward buffers).

Context parallelism calls the kernels per chunk of heads and wants each result to land in a head slice of one
big tensor, and dK/dV in fp32 straight in a token-major communication buffer, with no copy, zero-fill or
dtype-conversion pass. Here the targets are strided views of garbage-filled tensors (so every element must be
overwritten, zeros included: the document mask leaves padding rows and whole tiles with nothing visible),
K/V are views of a token-major ``[S, Hkv, D + Dv]`` buffer, q is a head slice, with GQA. The results must
equal the plain call's: bit for bit on the same backend (the same kernel runs), the rest of the big tensors
untouched. On CPU the Triton kernels run under the interpreter (tests/conftest.py), so shapes are small.
"""

from __future__ import annotations

import pytest
import torch

from flexdist.kernels import flex_attention_backward, flex_attention_forward
from flexdist.masks import document_block_mask

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GARBAGE = 123.0
SMALL = dict(S=64, Hq=4, Hkv=2, D=16, Dv=32, bs=16)  # interpreter-sized; D != Dv
LARGE = dict(S=2048, Hq=8, Hkv=2, D=128, Dv=64, bs=128)  # GPU only
BACKENDS = ["triton", "reference"]


def _doc_ids(S: int) -> torch.Tensor:
    """Three documents, padding (negative ids) before, between and after: rows and whole query / key tiles
    that see nothing (the last quarter of the sequence)."""
    doc = torch.full((1, S), -1, dtype=torch.long)
    a, b, c, d = S * 3 // 64, S * 20 // 64, S * 37 // 64, S * 44 // 64
    doc[:, a:b], doc[:, b:c], doc[:, c + 2 : d] = 0, 1, 2
    return doc.to(DEV)


def _problem(S, Hq, Hkv, D, Dv, bs, dtype, seed=0):
    """q a head slice of a bigger tensor; k / v views of a token-major [S, Hkv, D + Dv] buffer (B = 1)."""
    g = torch.Generator().manual_seed(seed)
    qbig = torch.randn(1, Hq + 2, S, D, generator=g).to(DEV, dtype)
    q = qbig[:, 1 : 1 + Hq]
    kvbuf = torch.randn(S, Hkv, D + Dv, generator=g).to(DEV, dtype)
    k = kvbuf[..., :D].permute(1, 0, 2).unsqueeze(0)
    v = kvbuf[..., D:].permute(1, 0, 2).unsqueeze(0)
    assert k.stride()[1:] == (D + Dv, Hkv * (D + Dv), 1) and not k.is_contiguous()
    dout = torch.randn(1, Hq, S, Dv, generator=g).to(DEV, dtype)
    bm = document_block_mask(_doc_ids(S), block_size=bs)
    return q, k, v, dout, bm


def _token_major(S, Hkv, D, Dv, dtype):
    """A garbage-filled [S, Hkv, D + Dv] buffer and its dK / dV views ([1, Hkv, S, D] / [1, Hkv, S, Dv])."""
    buf = torch.full((S, Hkv, D + Dv), GARBAGE, dtype=dtype, device=DEV)
    return buf, buf[..., :D].permute(1, 0, 2).unsqueeze(0), buf[..., D:].permute(1, 0, 2).unsqueeze(0)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _rounds_to(got32: torch.Tensor, plain: torch.Tensor, name: str) -> None:
    """An fp32 result against the plain call's result in a lower precision, which is the same fp32 value
    rounded: within one unit in the last place of ``plain``'s dtype (the Triton interpreter truncates
    fp32 -> bf16, a GPU rounds to nearest even)."""
    rtol = torch.finfo(plain.dtype).eps  # bf16: 2**-7, one ulp relative to the rounded value
    torch.testing.assert_close(got32, plain.float(), rtol=rtol, atol=0.0, msg=lambda m: f"{name}: {m}")


def _check_forward(sizes: dict, backend: str, dtype: torch.dtype) -> None:
    S, Hq, Dv = sizes["S"], sizes["Hq"], sizes["Dv"]
    q, k, v, _, bm = _problem(**sizes, dtype=dtype, seed=1)
    kw = dict(enable_gqa=True, backend=backend)
    want_o, want_l = flex_attention_forward(_plain(q), _plain(k), _plain(v), bm, **kw)
    assert (want_o[:, :, -S // 4 :] == 0).all() and torch.isneginf(want_l[:, :, -S // 4 :]).all()

    # same dtype: bit-identical (same kernel), the rest of the big tensor untouched
    big = torch.full((1, Hq + 3, S, Dv), GARBAGE, dtype=dtype, device=DEV)
    out = big[:, 2 : 2 + Hq]
    got_o, got_l = flex_attention_forward(q, k, v, bm, out=out, **kw)
    assert got_o is out
    assert torch.equal(big[:, 2 : 2 + Hq], want_o), "out= differs from the plain call"
    assert torch.equal(got_l, want_l)
    assert (big[:, :2] == GARBAGE).all() and (big[:, 2 + Hq :] == GARBAGE).all(), "wrote outside out"

    if dtype != torch.float32:
        # an fp32 target of low-precision inputs: the kernel stores its fp32 accumulator unrounded (the
        # reference copies its rounded result in)
        big32 = torch.full((1, Hq + 3, S, Dv), GARBAGE, dtype=torch.float32, device=DEV)
        got32, _ = flex_attention_forward(q, k, v, bm, out=big32[:, 1 : 1 + Hq], **kw)
        assert got32.dtype == torch.float32
        _rounds_to(got32, want_o, "fp32 out")
        assert (big32[:, 0] == GARBAGE).all() and (big32[:, 1 + Hq :] == GARBAGE).all()
        if backend == "reference":
            assert torch.equal(got32, want_o.float())


def _check_backward(sizes: dict, backend: str, dtype: torch.dtype, which: str) -> None:
    S, Hq, Hkv, D, Dv = (sizes[n] for n in ("S", "Hq", "Hkv", "D", "Dv"))
    q, k, v, dout, bm = _problem(**sizes, dtype=dtype, seed=2)
    kw = dict(enable_gqa=True, backend=backend, which=which)
    out, lse = flex_attention_forward(_plain(q), _plain(k), _plain(v), bm, enable_gqa=True, backend=backend)
    plain = flex_attention_backward(_plain(q), _plain(k), _plain(v), out, dout, lse, bm, **kw)
    want_q, want_kv = which in ("all", "dq"), which in ("all", "dkdv")

    # dq in q's dtype into a head slice, dK / dV in fp32 into a token-major buffer, both garbage-filled
    qbig = torch.full((1, Hq + 3, S, D), GARBAGE, dtype=dtype, device=DEV)
    kvbuf, dk_out, dv_out = _token_major(S, Hkv, D, Dv, torch.float32)
    targets = {}
    if want_q:
        targets["dq_out"] = qbig[:, 2 : 2 + Hq]
    if want_kv:
        targets.update(dk_out=dk_out, dv_out=dv_out)
    got = flex_attention_backward(q, k, v, out, dout, lse, bm, accumulate=False, **kw, **targets)

    # accumulate=True into zero fp32 buffers of the same layout: the same kernel, adding to 0
    zq = torch.zeros_like(qbig)
    zbuf, zk, zv = _token_major(S, Hkv, D, Dv, torch.float32)
    zbuf.zero_()
    ztargets = {}
    if want_q:
        ztargets["dq_out"] = zq[:, 2 : 2 + Hq]
    if want_kv:
        ztargets.update(dk_out=zk, dv_out=zv)
    flex_attention_backward(q, k, v, out, dout, lse, bm, **kw, **ztargets)

    if want_q:
        assert got[0] is targets["dq_out"]
        assert torch.equal(got[0], plain[0]), "dq_out differs from the plain call"
        assert torch.equal(got[0], ztargets["dq_out"])
        assert (qbig[:, :2] == GARBAGE).all() and (qbig[:, 2 + Hq :] == GARBAGE).all(), "wrote outside dq_out"
        assert (got[0][:, :, -S // 4 :] == 0).all(), "rows that see nothing must get exact zeros"
    else:
        assert got[0] is None and (qbig == GARBAGE).all()
    if want_kv:
        assert got[1] is dk_out and got[2] is dv_out
        # the whole interleaved buffer is covered by the two views: every element overwritten
        assert torch.equal(kvbuf, zbuf), "fp32 dK/dV differ from accumulate=True into zeros"
        for name, g, p in (("dk", got[1], plain[1]), ("dv", got[2], plain[2])):
            assert g.dtype == torch.float32
            # the plain call rounds the same fp32 values to the input dtype (the reference copies its
            # rounded result in)
            if backend == "reference" or dtype == torch.float32:
                assert torch.equal(g, p.float()), f"{name} differs from the plain call"
            else:
                _rounds_to(g, p, name)
            assert (g[:, :, -S // 4 :] == 0).all(), f"{name}: keys nobody sees must get exact zeros"
    else:
        assert got[1] is None and got[2] is None and (kvbuf == GARBAGE).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_out_into_head_slice(backend: str, dtype: torch.dtype) -> None:
    _check_forward(SMALL, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["all", "dq", "dkdv"])
def test_backward_overwrite_fp32_dkdv(backend: str, which: str) -> None:
    _check_backward(SMALL, backend, torch.bfloat16, which)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_overwrite_same_dtype(backend: str) -> None:
    _check_backward(SMALL, backend, torch.float32, "all")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_targets_independent(backend: str) -> None:
    """which="all" with only dq_out, or only dK/dV, given: the other results are fresh tensors as before."""
    S, Hq, Hkv, D, Dv = (SMALL[n] for n in ("S", "Hq", "Hkv", "D", "Dv"))
    q, k, v, dout, bm = _problem(**SMALL, dtype=torch.float32, seed=3)
    kw = dict(enable_gqa=True, backend=backend)
    out, lse = flex_attention_forward(q, k, v, bm, **kw)
    want = flex_attention_backward(q, k, v, out, dout, lse, bm, **kw)
    dq_t = torch.full((1, Hq, S, D), GARBAGE, device=DEV)
    got = flex_attention_backward(q, k, v, out, dout, lse, bm, dq_out=dq_t, accumulate=False, **kw)
    assert got[0] is dq_t
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    _, dk_t, dv_t = _token_major(S, Hkv, D, Dv, torch.float32)
    got = flex_attention_backward(
        q, k, v, out, dout, lse, bm, dk_out=dk_t, dv_out=dv_t, accumulate=False, **kw
    )
    assert got[1] is dk_t and got[2] is dv_t
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_target_errors_name_the_argument(backend: str) -> None:
    S, Hq, D, Dv = (SMALL[n] for n in ("S", "Hq", "D", "Dv"))
    q, k, v, dout, _ = _problem(**SMALL, dtype=torch.float32, seed=4)
    kw = dict(enable_gqa=True, backend=backend)
    with pytest.raises(ValueError, match=r"out must have shape \(1, 4, 64, 32\).*got \(1, 4, 64, 16\)"):
        flex_attention_forward(q, k, v, out=torch.empty(1, Hq, S, D, device=DEV), **kw)
    with pytest.raises(ValueError, match=r"out must have a floating dtype, got torch\.int32"):
        flex_attention_forward(q, k, v, out=torch.empty(1, Hq, S, Dv, dtype=torch.int32, device=DEV), **kw)
    with pytest.raises(ValueError, match="out needs a unit last-dim stride"):
        flex_attention_forward(q, k, v, out=torch.empty(1, Hq, Dv, S, device=DEV).transpose(2, 3), **kw)
    o_acc = torch.zeros(1, Hq, S, Dv, device=DEV)
    l_acc = torch.full((1, Hq, S), float("-inf"), device=DEV)
    with pytest.raises(ValueError, match=r"out must have shape \(1, 4, 64, 32\).*got \(1, 4, 64, 16\)"):
        flex_attention_forward(
            q, k, v, out=torch.empty(1, Hq, S, D, device=DEV), out_acc=o_acc, lse_acc=l_acc, **kw
        )
    out, lse = flex_attention_forward(q, k, v, **kw)
    for bad in (1, None, "no"):
        with pytest.raises(ValueError, match=f"accumulate must be a bool, got {bad!r}"):
            flex_attention_backward(q, k, v, out, dout, lse, accumulate=bad, **kw)


# ------------------------------------------------------------------------------------------------------
# GPU scale: the same checks at S = 2048, D = 128 / Dv = 64, bf16, 128-token blocks.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_gpu_write_targets_at_scale(backend: str) -> None:
    _check_forward(LARGE, backend, torch.bfloat16)
    for which in ("all", "dq", "dkdv"):
        _check_backward(LARGE, backend, torch.bfloat16, which)
