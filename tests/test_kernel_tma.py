"""The forward kernel's opt-in TMA loads and warp-specialized kv loop (``config``'s 6th and 7th entries).

With ``tma`` the K / V tiles come through device-side tensor descriptors built once per program; with
``warp_specialize`` as well the kv loop is a ``tl.range(warp_specialize=True)``. Both must give the default
path's result: out and LSE against the default config and the fp32 dense reference, on a document-causal
BlockMask with GQA, padding rows that see nothing, a ragged last kv tile (the zero-filled TMA rows must still
be masked) and a score mod, and the accumulate epilogue. Under the CPU interpreter (CI) a descriptor load is
a bounds-checked gather that also asserts TMA's alignment rules, and ``tl.range``'s ``warp_specialize`` is
accepted and ignored (the interpreter runs the loop as a Python range), so WS is checked for its numbers
only; the GPU cases at the end compile both for real, a WS config first in a child process: Triton 3.6 on
an H200 crashed in its NVGPUWarpSpecialization pass at 4 warps (the case then xfails with the compiler's
words) and at 8 warps compiled the loop without specializing it (the same kernel as TMA alone). The
host-side rejections (WS without TMA, K / V that break TMA's alignment rules) are checked too.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from flexdist.kernels import ALiBi, DocumentMaskMod
from flexdist.kernels.reference import reference_forward
from flexdist.kernels.triton_fwd import triton_forward

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BASE = (64, 64, 4, 1)
TMA = (64, 64, 4, 1, False, True)
TMA_WS = (64, 64, 4, 1, False, True, True)


def _doc_ids(B: int, S: int, seed: int, pad: int) -> torch.Tensor:
    """[B, S] contiguous document ids (random lengths), the last ``pad`` tokens padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.empty(B, S, dtype=torch.long)
    for b in range(B):
        starts = torch.cumsum(torch.randint(1, S // 3 + 1, (S,), generator=g), 0)
        doc[b] = torch.searchsorted(starts, torch.arange(S), right=True)
    doc[:, S - pad :] = -1
    return doc


def _doc_mask(doc: torch.Tensor, q_sel: slice, kv_sel: slice, bs: int):
    """Document-causal BlockMask of the queries ``q_sel`` against the keys ``kv_sel`` (global positions)."""
    pos = torch.arange(doc.shape[1], device=doc.device).expand_as(doc)
    qd, kd, qp, kp = doc[:, q_sel], doc[:, kv_sel], pos[:, q_sel], pos[:, kv_sel]
    mm = DocumentMaskMod(qd.contiguous(), kd.contiguous(), qp.contiguous(), kp.contiguous())
    return create_block_mask(mm, doc.shape[0], None, qd.shape[1], kd.shape[1], device=DEV, BLOCK_SIZE=bs)


def _problem(S: int = 136, B: int = 2, Hq: int = 4, Hkv: int = 2, D: int = 16, seed: int = 0):
    # S = 136: two whole 64-key tiles and a ragged 8-key one (EVEN_M / EVEN_N off), 5 padding tokens
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g).to(DEV)
    k = torch.randn(B, Hkv, S, D, generator=g).to(DEV)
    v = torch.randn(B, Hkv, S, D, generator=g).to(DEV)
    return _doc_ids(B, S, seed, pad=5).to(DEV), q, k, v


def _check_same(got, want, ref, what: str) -> None:
    """(out, lse) of a variant against the default config's (tight) and the fp32 reference's."""
    (o, lse), (wo, wl), (ro, rl) = got, want, ref
    fin = torch.isfinite(rl)
    assert (~fin).any() and fin.any(), "the case must hold rows that see nothing and rows that see keys"
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), what
    assert torch.equal(torch.isfinite(lse), fin), f"{what}: lse -inf pattern differs from the reference"
    assert (o[~fin] == 0).all(), f"{what}: rows that see nothing must be 0"
    torch.testing.assert_close(o, wo, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} vs default: {m}")
    torch.testing.assert_close(lse[fin], wl[fin], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} lse: {m}")
    torch.testing.assert_close(o, ro, atol=2e-4, rtol=2e-4, msg=lambda m: f"{what} vs reference: {m}")
    torch.testing.assert_close(lse[fin], rl[fin], atol=2e-4, rtol=2e-4, msg=lambda m: f"{what} lse: {m}")


@pytest.mark.parametrize("score", [None, "alibi"])
def test_tma_and_ws_equal_default(score: str | None) -> None:
    doc, q, k, v = _problem(seed=1 if score is None else 2)
    S = q.shape[2]
    bm = _doc_mask(doc, slice(None), slice(None), 64)
    sm = ALiBi(ALiBi.default_slopes(q.shape[1], DEV)) if score == "alibi" else None
    kw = dict(score_mod=sm, scale=0.3, enable_gqa=True)
    ref = reference_forward(q, k, v, bm, **kw)
    want = triton_forward(q, k, v, bm, config=BASE, **kw)
    assert S % BASE[1] != 0, "the last kv tile must be ragged"
    for cfg in (TMA, TMA_WS):
        _check_same(triton_forward(q, k, v, bm, config=cfg, **kw), want, ref, f"config {cfg}")


def test_tma_ragged_tail_of_full_blocks() -> None:
    """No BlockMask (every block full, no mask evaluated) and 72 keys: only the kernel's column mask keeps
    the zero-filled rows of the last TMA tile out of the softmax."""
    _, q, k, v = _problem(seed=4)
    k, v = k[:, :, :72], v[:, :, :72]
    kw = dict(scale=0.3, enable_gqa=True)
    ref = reference_forward(q, k, v, None, **kw)
    want = triton_forward(q, k, v, None, config=BASE, **kw)
    for cfg in (TMA, TMA_WS):
        got = triton_forward(q, k, v, None, config=cfg, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[0], ref[0], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(got[1], ref[1], atol=2e-4, rtol=2e-4)


def test_tma_accumulate_equals_one_call() -> None:
    """Keys in two chunks merged into (out_acc, lse_acc) with TMA loads: the first chunk ragged (72 keys),
    the second a strided view that starts mid-tensor (still 16-byte aligned)."""
    doc, q, k, v = _problem(seed=3)
    B, Hq, S, D = q.shape
    kw = dict(scale=0.3, enable_gqa=True)
    ref = reference_forward(q, k, v, _doc_mask(doc, slice(None), slice(None), 64), **kw)
    want = triton_forward(q, k, v, _doc_mask(doc, slice(None), slice(None), 64), config=BASE, **kw)
    o = torch.zeros(B, Hq, S, D, device=DEV)
    lse = torch.full((B, Hq, S), float("-inf"), device=DEV)
    for sel in (slice(0, 72), slice(72, S)):
        bm = _doc_mask(doc, slice(None), sel, 64)
        ret = triton_forward(q, k[:, :, sel], v[:, :, sel], bm, config=TMA, out_acc=o, lse_acc=lse, **kw)
        assert ret[0] is o and ret[1] is lse
    _check_same((o, lse), want, ref, "chunked TMA")


def test_ws_without_tma_is_rejected() -> None:
    _, q, k, v = _problem(S=64, B=1)
    with pytest.raises(ValueError, match=r"warp_specialize \(7th entry\) needs tma"):
        triton_forward(q, k, v, enable_gqa=True, config=(64, 64, 4, 1, False, False, True))


def test_tma_rejects_misaligned_kv() -> None:
    _, q, k, v = _problem(S=64, B=1)
    B, Hkv, S, D = k.shape
    # one element past a 16-byte aligned allocation: every program's base is 4 bytes off
    shifted = torch.empty(k.numel() + 1, device=DEV)[1:].view(k.shape).copy_(k)
    with pytest.raises(ValueError, match=r"k \(shape .*data_ptr 0x[0-9a-f]+ is 4 bytes past a 16-byte"):
        triton_forward(q, shifted, v, enable_gqa=True, config=TMA)
    # rows 18 fp32 apart (72 bytes): not a multiple of 16 bytes
    wide = torch.zeros(B, Hkv, S, D + 2, device=DEV)[..., :D]
    wide.copy_(v)
    with pytest.raises(ValueError, match=r"v \(shape .*row stride 18 × 4 B is not a multiple of 16 bytes"):
        triton_forward(q, k, wide, enable_gqa=True, config=TMA)
    # the same tensors are fine without TMA
    want = triton_forward(q, k, v, enable_gqa=True, config=BASE)
    got = triton_forward(q, shifted, wide, enable_gqa=True, config=BASE)
    torch.testing.assert_close(got[0], want[0])


# ------------------------------------------------------------------------------------------------------
# GPU (compiled): TMA and TMA + warp specialization at the benchmark tiles, bf16, D = 128.
# ------------------------------------------------------------------------------------------------------


def _gpu_problem():
    S, B, Hq, Hkv, D = 1024 + 40, 1, 8, 4, 128  # 40 extra keys: a ragged last kv tile
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(DEV, torch.bfloat16) for h in (Hq, Hkv, Hkv))
    doc = _doc_ids(B, S, seed=5, pad=7).to(DEV)
    return q, k, v, _doc_mask(doc, slice(None), slice(None), 128)


def _compiles_in_child(cfg: tuple) -> str | None:
    """Run ``cfg`` on the GPU problem in a fresh process: None if it worked, else the end of its stderr.

    Automatic warp specialization is experimental on Hopper: Triton 3.6 (H200) failed this kernel's
    NVGPUWarpSpecialization pass at (128, 64, 4, 3) through an LLVM assertion that MLIR's crash recovery
    caught inside the process. Probing in a child keeps that out of the test worker; what compiles there
    is reused from Triton's disk cache."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_kernel_tma as t; t._gpu_run({cfg!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode == 0:
        return None
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln or "Assertion" in ln or "Pipeline" in ln]
    return " | ".join([*lines[:3], *r.stderr.strip().splitlines()[-1:]])[:600]


def _gpu_run(cfg: tuple) -> None:
    q, k, v, bm = _gpu_problem()
    triton_forward(q, k, v, bm, enable_gqa=True, config=cfg)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(128, 128, 8, 3), (128, 64, 4, 3)])
@pytest.mark.parametrize("ws", [False, True])
def test_gpu_tma_ws_bf16(tile: tuple, ws: bool) -> None:
    import triton

    cfg = (*tile, False, True, ws)
    if ws:
        why = _compiles_in_child(cfg)
        if why is not None:
            pytest.xfail(f"Triton {triton.__version__} cannot warp-specialize the kv loop at {tile}: {why}")
    q, k, v, bm = _gpu_problem()
    want = triton_forward(q, k, v, bm, enable_gqa=True, config=tile)
    got = triton_forward(q, k, v, bm, enable_gqa=True, config=cfg)
    ro, rl = reference_forward(q.float(), k.float(), v.float(), bm, enable_gqa=True)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(got[1]), fin)
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1][fin], want[1][fin], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got[0].float(), ro, atol=3e-2, rtol=3e-2)
