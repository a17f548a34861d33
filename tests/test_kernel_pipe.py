"""The forward kernel's opt-in software-pipelined kv loop (``config``'s 8th entry, ``pipe_qk``).

With ``pipe_qk`` the kv loop computes the next sub-tile's QK^T before this sub-tile's softmax and P·V
(peeled: the first QK^T before the loop, the last update after it). It is a reordering of the same math, so
its out and LSE must match the plain loop's to rounding (bit for bit under the CPU interpreter) and the fp32
dense reference: on document-causal masks whose documents are longer and shorter than a block (partial and
full blocks), bit tiles (a Python causal mask_mod), a sliding window, GQA, a ragged last kv tile, query blocks
that visit no kv block at all, score mods (SoftCap, ALiBi with global index maps), the FMA softmax, the CPU
bf16 path and the accumulate epilogues. Every case runs at two tilings of the 32-token blocks: two kv
sub-tiles per block and one (the flattened walk's block / sub-tile bookkeeping differs). The host rejects
``pipe_qk`` with ``tma``. The GPU case compiles both loops at the benchmark tiles in bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from flexdist.kernels import ALiBi, DocumentMaskMod, SoftCap
from flexdist.kernels.block_sparse import MASK_BITS, MASK_DOC
from flexdist.kernels.reference import reference_forward
from flexdist.kernels.triton_fwd import prepare, triton_forward

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BS = 32  # BlockMask block size of the CPU cases
# (BLOCK_M, BLOCK_N, warps, stages): two kv sub-tiles per 32-key block, and one
TILES = [(32, 16, 4, 1), (32, 32, 4, 1)]
# pipe vs plain loop: the same operations in the same order, so equal under the interpreter; compiled, the
# two loops are scheduled differently and may round differently in the last bits
TIGHT = 1e-6 if DEV == "cpu" else 1e-5
REF_TOL = 2e-4


def _pipe(cfg: tuple, fma: bool = False) -> tuple:
    return (*cfg, fma, False, False, True)


def _plain(cfg: tuple, fma: bool = False) -> tuple:
    return (*cfg, fma)


def _docs(lengths: list[int], pad: int) -> torch.Tensor:
    """[1, sum(lengths) + pad] contiguous document ids of the given lengths, then ``pad`` padding (-1)."""
    ids = [torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)]
    return torch.cat(ids)[None]


# 136 tokens: documents of 1..75 tokens (inside one block, straddling blocks, spanning several), 5 padding;
# 136 = 4·32 + 8, so the last kv tile is ragged
DOC_LENGTHS = [3, 45, 7, 1, 75]


def _doc_mask(doc: torch.Tensor, q_sel: slice = slice(None), kv_sel: slice = slice(None), **kw):
    """Document mask (causal unless told) of the queries ``q_sel`` against the keys ``kv_sel``."""
    pos = torch.arange(doc.shape[1]).expand_as(doc)
    qd, kd, qp, kp = (
        t.contiguous().to(DEV) for t in (doc[:, q_sel], doc[:, kv_sel], pos[:, q_sel], pos[:, kv_sel])
    )
    mm = DocumentMaskMod(qd, kd, qp, kp, **kw)
    return create_block_mask(mm, doc.shape[0], None, qd.shape[1], kd.shape[1], device=DEV, BLOCK_SIZE=BS)


def _qkv(Sq: int, Skv: int, B: int = 1, Hq: int = 4, Hkv: int = 2, D: int = 16, seed: int = 0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Skv, D, generator=g)
    v = torch.randn(B, Hkv, Skv, D, generator=g)
    return (t.to(DEV, dtype or torch.float32) for t in (q, k, v))


def _check(got, want, ref, what: str, tight: float = TIGHT, ref_tol: float = REF_TOL) -> None:
    """(out, lse) of the pipelined loop against the plain loop's (tight) and the fp32 reference's."""
    (o, lse), (wo, wl), (ro, rl) = got, want, ref
    fin = torch.isfinite(rl)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), what
    assert torch.equal(torch.isfinite(lse), fin), f"{what}: lse -inf pattern differs from the reference"
    assert (o[~fin] == 0).all(), f"{what}: rows that see nothing must be 0"
    assert (lse[~fin] == float("-inf")).all(), f"{what}: rows that see nothing must have lse -inf"
    torch.testing.assert_close(o, wo, atol=tight, rtol=tight, msg=lambda m: f"{what} vs plain loop: {m}")
    torch.testing.assert_close(lse, wl, atol=tight, rtol=tight, msg=lambda m: f"{what} lse vs plain: {m}")
    torch.testing.assert_close(
        o.float(), ro.float(), atol=ref_tol, rtol=ref_tol, msg=lambda m: f"{what}: {m}"
    )
    torch.testing.assert_close(lse[fin], rl[fin], atol=ref_tol, rtol=ref_tol, msg=lambda m: f"{what}: {m}")


def _compare(q, k, v, bm, cfg: tuple, what: str, fma: bool = False, **kw) -> None:
    kw = dict(scale=0.3, enable_gqa=q.shape[1] != k.shape[1], **kw)
    want = triton_forward(q, k, v, bm, config=_plain(cfg, fma), **kw)
    got = triton_forward(q, k, v, bm, config=_pipe(cfg, fma), **kw)
    ref = reference_forward(q.float(), k.float(), v.float(), bm, **kw)
    bf16 = q.dtype == torch.bfloat16
    _check(got, want, ref, f"{what} at {cfg}", ref_tol=3e-2 if bf16 else REF_TOL)


def _mask_kind(q, k, v, bm) -> int:
    return prepare(q, k, v, bm, None, None, q.shape[1] != k.shape[1], None, None).km.mask_kind


@pytest.mark.parametrize("cfg", TILES)
def test_pipe_document_causal(cfg: tuple) -> None:
    doc = _docs(DOC_LENGTHS, pad=5)
    S = doc.shape[1]
    q, k, v = _qkv(S, S, seed=1)
    bm = _doc_mask(doc)
    assert _mask_kind(q, k, v, bm) == MASK_DOC
    assert bm.full_kv_num_blocks.sum() > 0 and bm.kv_num_blocks.sum() > 0, "needs full and partial blocks"
    _compare(q, k, v, bm, cfg, "document-causal")


@pytest.mark.parametrize("cfg", TILES)
def test_pipe_causal_bit_tiles_ragged(cfg: tuple) -> None:
    """A Python causal mask_mod (evaluated into bit tiles), 100 tokens: a ragged 4-key last tile."""
    S = 100
    q, k, v = _qkv(S, S, seed=2)
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=DEV, BLOCK_SIZE=BS)
    assert _mask_kind(q, k, v, bm) == MASK_BITS
    _compare(q, k, v, bm, cfg, "causal bit tiles")


@pytest.mark.parametrize("cfg", TILES)
def test_pipe_sliding_window(cfg: tuple) -> None:
    doc = _docs([90, 41], pad=5)
    S = doc.shape[1]
    q, k, v = _qkv(S, S, seed=3)
    _compare(q, k, v, _doc_mask(doc, window=20), cfg, "sliding window")


@pytest.mark.parametrize("cfg", TILES)
def test_pipe_ragged_kv_no_mask(cfg: tuple) -> None:
    """No BlockMask (only full blocks, no mask evaluated), Skv = 100 != Sq: only the column mask keeps the
    rows past Skv out; GQA with 4 query heads per kv head."""
    q, k, v = _qkv(64, 100, Hq=4, Hkv=1, seed=4)
    _compare(q, k, v, None, cfg, "ragged kv")


@pytest.mark.parametrize("cfg", TILES)
def test_pipe_query_blocks_without_kv_blocks(cfg: tuple) -> None:
    """40 trailing padding tokens: query blocks 3 and 4 visit no kv block (partial or full), so the
    pipelined loop must load nothing there; their rows come out 0 with LSE -inf."""
    doc = _docs([20, 50, 26], pad=40)
    S = doc.shape[1]
    q, k, v = _qkv(S, S, B=2, seed=5)
    bm = _doc_mask(doc)
    none = (bm.kv_num_blocks + bm.full_kv_num_blocks)[0, 0] == 0
    assert none.tolist() == [False, False, False, True, True]
    _compare(q, k, v, bm, cfg, "empty query blocks")


@pytest.mark.parametrize("cfg", TILES)
@pytest.mark.parametrize("score", ["softcap", "alibi"])
def test_pipe_score_mods(cfg: tuple, score: str) -> None:
    doc = _docs(DOC_LENGTHS, pad=5)
    S = doc.shape[1]
    q, k, v = _qkv(S, S, seed=6)
    kw = {}
    if score == "softcap":
        sm = SoftCap(2.0)
    else:
        sm = ALiBi(ALiBi.default_slopes(q.shape[1], DEV))
        # global index maps (a CP shard's positions): the kernel then reads the key positions (HAS_KVIDX)
        kw = dict(
            q_global_idx=torch.arange(S, device=DEV) + 40, kv_global_idx=torch.arange(S, device=DEV) + 7
        )
    _compare(q, k, v, _doc_mask(doc), cfg, score, score_mod=sm, **kw)


@pytest.mark.parametrize("cfg", TILES)
def test_pipe_fma_softmax(cfg: tuple) -> None:
    doc = _docs(DOC_LENGTHS, pad=5)
    S = doc.shape[1]
    q, k, v = _qkv(S, S, seed=7)
    _compare(q, k, v, _doc_mask(doc), cfg, "fma softmax", fma=True)


def test_pipe_bf16() -> None:
    """bf16 inputs: on the CPU the interpreter path that computes the dots in fp32 (UPCAST)."""
    doc = _docs(DOC_LENGTHS, pad=5)
    S = doc.shape[1]
    q, k, v = _qkv(S, S, seed=8, dtype=torch.bfloat16)
    bm = _doc_mask(doc)
    kw = dict(scale=0.3, enable_gqa=True)
    cfg = TILES[0]
    want = triton_forward(q, k, v, bm, config=_plain(cfg), **kw)
    got = triton_forward(q, k, v, bm, config=_pipe(cfg), **kw)
    ref = reference_forward(q.float(), k.float(), v.float(), bm, **kw)
    # CPU: the same fp32 math, rounded to bf16 once at the store; GPU: bf16 GEMMs scheduled differently
    tight = 0.0 if DEV == "cpu" else 2e-2
    _check(got, want, ref, "bf16", tight=tight, ref_tol=3e-2)


@pytest.mark.parametrize("cfg", TILES)
def test_pipe_accumulate(cfg: tuple) -> None:
    """Keys in two chunks merged into (out_acc, lse_acc): the first in place (a ragged 72-key chunk), the
    second written to ``out`` (the last merge of a ring). The second chunk leaves the first documents' query
    blocks with no kv block (their running result must still reach ``out``)."""
    doc = _docs(DOC_LENGTHS, pad=5)
    B, Hq, S = 1, 4, doc.shape[1]
    q, k, v = _qkv(S, S, seed=9)
    kw = dict(scale=0.3, enable_gqa=True)
    want = triton_forward(q, k, v, _doc_mask(doc), config=_plain(cfg), **kw)
    ref = reference_forward(q, k, v, _doc_mask(doc), **kw)
    o = torch.zeros(B, Hq, S, q.shape[-1], device=DEV)
    lse = torch.full((B, Hq, S), float("-inf"), device=DEV)
    merge = dict(config=_pipe(cfg), out_acc=o, lse_acc=lse, **kw)
    first, second = slice(0, 72), slice(72, S)
    ret = triton_forward(q, k[:, :, first], v[:, :, first], _doc_mask(doc, kv_sel=first), **merge)
    assert ret[0] is o and ret[1] is lse
    bm2 = _doc_mask(doc, kv_sel=second)
    assert ((bm2.kv_num_blocks + bm2.full_kv_num_blocks) == 0).any(), "a query block must see no key here"
    out = torch.empty_like(q)
    ret = triton_forward(q, k[:, :, second], v[:, :, second], bm2, out=out, **merge)
    assert ret[0] is out and ret[1] is lse
    # two merges round differently from one pass: the plain loop's one-call result is only close
    _check((out, lse), want, ref, f"accumulate at {cfg}", tight=1e-5)


def test_pipe_with_tma_is_rejected() -> None:
    q, k, v = _qkv(64, 64)
    with pytest.raises(ValueError, match=r"pipe_qk \(8th entry\) cannot be combined with tma"):
        triton_forward(q, k, v, enable_gqa=True, config=(64, 64, 4, 1, False, True, False, True))


# ------------------------------------------------------------------------------------------------------
# GPU (compiled): the pipelined loop at the benchmark tiles, bf16, D = 128.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cfg", [(128, 128, 8, 3, True, False, False, True), (128, 64, 4, 3, False, False, False, True)]
)
def test_gpu_pipe_bf16(cfg: tuple) -> None:
    S, B, H, D = 2048, 1, 4, 128
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    lengths = torch.randint(1, 400, (64,), generator=g).tolist()
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[: S - 7]
    doc = torch.cat([doc, torch.full((S - doc.numel(),), -1)])[None]  # >= 7 padding tokens
    pos = torch.arange(S)[None]
    mm = DocumentMaskMod(doc.to(DEV), doc.to(DEV), pos.to(DEV), pos.to(DEV))
    bm = create_block_mask(mm, B, None, S, S, device=DEV, BLOCK_SIZE=128)
    want = triton_forward(q, k, v, bm, config=cfg[:7])
    got = triton_forward(q, k, v, bm, config=cfg)
    fin = torch.isfinite(want[1])
    assert torch.equal(torch.isfinite(got[1]), fin)
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=0)
    torch.testing.assert_close(got[1][fin], want[1][fin], atol=2e-2, rtol=0)
