"""The all-gather's layout copies (`flexdist.cp.kv_pack`): the Triton kernels equal the torch copies exactly.

The Triton path runs on CUDA where there is a GPU, else under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 without CUDA); the torch path (``backend="torch"``) is the plain ``copy_`` the strategy used
before and is itself checked against an explicit per-head loop.
"""

from __future__ import annotations

import pytest
import torch

from flexdist.cp.kv_pack import pack_kv, unpack_dkv, use_kernels


def _dev(device: str) -> torch.device:
    return torch.device(device)


def _strided(B: int, H: int, L: int, D: int, dtype, dev, seed: int) -> torch.Tensor:
    """``[B, H, L, D]`` as a projection writes it: a transposed view of ``[B, L, H, D]`` (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, H, D, generator=g).to(dev, dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("B", "H", "L", "D", "Dv", "h0", "h1"), [(1, 4, 128, 32, 32, 1, 3), (2, 3, 70, 16, 64, 0, 3)]
)
def test_pack_kv_matches_torch(device, dtype, B, H, L, D, Dv, h0, h1) -> None:
    dev = _dev(device)
    k = _strided(B, H, L, D, dtype, dev, 0)
    v = torch.randn(B, H, L, Dv, generator=torch.Generator().manual_seed(1)).to(dev, dtype)  # contiguous
    assert use_kernels(k, v)
    fast = pack_kv(k, v, h0, h1, backend="triton")
    ref = pack_kv(k, v, h0, h1, backend="torch")
    assert fast.shape == (B, L, h1 - h0, D + Dv) and fast.is_contiguous()
    assert torch.equal(fast, ref)
    for h in range(h0, h1):  # the layout itself: token-major, K then V along the last dim
        assert torch.equal(ref[:, :, h - h0, :D], k[:, h])
        assert torch.equal(ref[:, :, h - h0, D:], v[:, h])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_unpack_dkv_matches_torch(device, out_dtype) -> None:
    dev = _dev(device)
    B, H, L, D, Dv, h0, hc = 2, 5, 70, 32, 16, 2, 2
    g = torch.Generator().manual_seed(2)
    src = torch.randn(B, L, hc, D + Dv, generator=g).to(dev)  # fp32, as the reduce-scatter leaves it
    outs = {}
    for backend in ("triton", "torch"):
        dk = torch.full((B, H, L, D), 7.0, dtype=out_dtype, device=dev)
        dv = torch.full((B, H, L, Dv), 7.0, dtype=out_dtype, device=dev)
        unpack_dkv(src, dk, dv, h0, backend=backend)
        outs[backend] = (dk, dv)
    for a, b in zip(outs["triton"], outs["torch"], strict=True):
        if dev.type == "cuda" or out_dtype == torch.float32:
            assert torch.equal(a, b)
        else:  # the interpreter truncates fp32 → bf16 where the GPU rounds to nearest: at most one unit apart
            ulps = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
            assert int(ulps.max()) <= 1 and torch.allclose(a.float(), b.float(), rtol=2**-7, atol=0)
    dk, dv = outs["torch"]
    assert torch.equal(dk[:, h0 : h0 + hc], src[..., :D].transpose(1, 2).to(out_dtype))
    assert torch.equal(dv[:, h0 : h0 + hc], src[..., D:].transpose(1, 2).to(out_dtype))
    # heads outside h0:h0+hc are not touched
    assert (dk[:, :h0] == 7).all() and (dk[:, h0 + hc :] == 7).all() and (dv[:, :h0] == 7).all()


def test_pack_arguments_are_checked() -> None:
    k = torch.zeros(1, 4, 8, 16)
    with pytest.raises(ValueError, match=r"h0=2, h1=2 .* Hkv=4"):
        pack_kv(k, k, 2, 2)
    with pytest.raises(ValueError, match="backend must be"):
        pack_kv(k, k, 0, 1, backend="cuda")
    odd = torch.zeros(1, 4, 8, 24)
    with pytest.raises(ValueError, match=r"head dims \[16, 24\]"):
        use_kernels(k, odd, backend="triton")
    assert not use_kernels(k, odd)  # "auto" falls back to torch: still exact
    assert torch.equal(pack_kv(k, odd, 0, 4)[..., 16:], odd.transpose(1, 2))
    with pytest.raises(ValueError, match=r"src \(1, 8, 2, 40\) does not fit heads 3:5"):
        unpack_dkv(torch.zeros(1, 8, 2, 40), torch.zeros(1, 4, 8, 16), odd, 3)
