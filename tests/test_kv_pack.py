"""The all-gather's K/V pack / dK/dV unpack kernel (flexdist/cp/kv_pack.py) against its torch copies.

The kernel runs under the Triton interpreter on CPU (tests/conftest.py), compiled on a GPU. Inputs are the
layouts the all-gather meets: head-major ``[B, H, L, D]`` tensors, a model's token-major ``[B, L, H, D]``
storage seen through ``transpose(1, 2)``, head slices of bigger tensors, D != Dv, head dims that are not
powers of two, lengths that are not multiples of the kernel's token block. Copies are exact, so equality is
bit for bit; the unpack's fp32 → bf16 cast too on a GPU (round to nearest even, as torch), while the
interpreter truncates (triton 3.9's ``cast_impl``), so there it may differ by one bf16 unit in the last place.
"""

from __future__ import annotations

import pytest
import torch

from flexdist.cp.kv_pack import BLOCK_L, pack, pack_torch, unpack, unpack_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _kv(B, H, L, D, Dv, dtype, token_major, seed=0):
    g = torch.Generator().manual_seed(seed)
    if token_major:  # a model's projections: [B, L, H, D] storage, attention sees the transpose
        k = torch.randn(B, L, H, D, generator=g).to(DEV, dtype).transpose(1, 2)
        v = torch.randn(B, L, H, Dv, generator=g).to(DEV, dtype).transpose(1, 2)
    else:  # head-major, with a spare head on each side so the tensors are slices of bigger ones
        k = torch.randn(B, H + 2, L, D, generator=g).to(DEV, dtype)[:, 1 : H + 1]
        v = torch.randn(B, H + 2, L, Dv, generator=g).to(DEV, dtype)[:, 1 : H + 1]
    return k, v


SHAPES = [  # B, Hkv, L, D, Dv, (h0, h1)
    (1, 4, 2 * BLOCK_L, 16, 16, (0, 4)),
    (1, 4, BLOCK_L + 5, 16, 32, (1, 3)),
    (2, 3, 37, 24, 40, (2, 3)),
    (2, 2, 3 * BLOCK_L - 1, 48, 48, (0, 1)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"_h{s[5][0]}{s[5][1]}")
def test_pack_matches_torch(shape, token_major: bool, dtype: torch.dtype) -> None:
    B, H, L, D, Dv, (h0, h1) = shape
    k, v = _kv(B, H, L, D, Dv, dtype, token_major)
    got = pack(k, v, h0, h1, use_triton=True)
    want = pack_torch(k, v, h0, h1)
    assert got.shape == (B, L, h1 - h0, D + Dv) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)
    # and what that layout means: token t, head h of the chunk holds K then V of head h0 + h
    assert torch.equal(got[1 % B, L - 1, 0, :D], k[1 % B, h0, L - 1])
    assert torch.equal(got[0, 0, h1 - h0 - 1, D:], v[0, h1 - 1, 0])


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"_h{s[5][0]}{s[5][1]}")
def test_unpack_matches_torch(shape, token_major: bool) -> None:
    """fp32 reduce-scatter output into head slices of dk / dv (their dtype); the other heads untouched."""
    B, H, L, D, Dv, (h0, h1) = shape
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(B, L, h1 - h0, D + Dv, generator=g).to(DEV)
    outs = []
    for fn in (lambda *a: unpack(*a, use_triton=True), unpack_torch):
        dk, dv = _kv(B, H, L, D, Dv, dtype, token_major, seed=2)  # the same garbage both times
        before_k, before_v = dk.clone(), dv.clone()
        fn(buf, dk, dv, h0)
        others = [h for h in range(H) if not h0 <= h < h1]
        assert torch.equal(dk[:, others], before_k[:, others]) and torch.equal(
            dv[:, others], before_v[:, others]
        )
        outs.append((dk, dv))
    (gk, gv), (wk, wv) = outs
    if DEV == "cuda":
        assert torch.equal(gk, wk) and torch.equal(gv, wv)
    else:  # within one bf16 ulp (2^-8 relative), and nothing else moved
        torch.testing.assert_close(gk, wk, rtol=2**-7, atol=0)
        torch.testing.assert_close(gv, wv, rtol=2**-7, atol=0)
    torch.testing.assert_close(gk[:, h0:h1].float(), buf[..., :D].transpose(1, 2), rtol=2**-7, atol=0)


def test_unpack_rejects_mismatched_buffer() -> None:
    dk, dv = _kv(1, 2, 8, 16, 16, torch.float32, False)
    with pytest.raises(ValueError, match=r"buf \(1, 8, 2, 40\).*heads 1:3.*dk \(1, 2, 8, 16\)"):
        unpack(torch.zeros(1, 8, 2, 40, device=DEV), dk, dv, 1)


def test_default_path_follows_backend_rule(monkeypatch) -> None:
    """Without ``use_triton`` the kernel runs where the attention kernels' ``backend="auto"`` runs Triton (CUDA,
    or CPU under TRITON_INTERPRET=1), else the torch copies; both give the same buffer."""
    import flexdist.cp.kv_pack as kvp

    calls = []
    monkeypatch.setattr(kvp, "_launch", lambda *a, **kw: calls.append(kw["unpack"]))
    k, v = _kv(1, 3, 20, 16, 8, torch.float32, True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kvp.pack(k, v, 1, 3)
    assert calls == [False]
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert torch.equal(kvp.pack(k, v, 1, 3), pack_torch(k, v, 1, 3)) and calls == [False]
