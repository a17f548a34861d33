"""The Triton kernel (forward + backward) against the dense fp32 reference and torch's flex_attention.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are small. Every case checks
out, LSE, dq, dk, dv (and score-mod tensor gradients) with real tolerances; the forward is also compared
with torch's own ``flex_attention`` (torch's CPU flex has no backward: gradients are checked against the
reference, whose backward is itself checked against float64 autograd in test_reference.py).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

from flexdist.kernels import (
    ALiBi,
    DocumentMaskMod,
    RelativeBias,
    SoftCap,
    flex_attention,
    flex_attention_backward,
    flex_attention_forward,
    flex_attention_reference,
    reference_backward,
    reference_forward,
)
from flexdist.kernels.block_sparse import MASK_BITS, MASK_DOC, kernel_mask
from flexdist.kernels.triton_fwd import _launch_coords, _launch_coords_lead
from flexdist.kernels.validation import check_qkv

# the device the kernel runs on: CUDA where present, else the CPU under the Triton interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _docs(B: int, S: int, seed: int, pad: int = 5, max_len: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    max_len = max_len or S // 3
    doc = torch.empty(B, S, dtype=torch.long)
    for b in range(B):
        lengths = torch.randint(1, max_len + 1, (S,), generator=g)
        starts = torch.cumsum(lengths, 0)
        doc[b] = torch.searchsorted(starts, torch.arange(S), right=True)
    if pad:
        doc[:, -pad:] = -1
    return doc


def _doc_positions(doc: torch.Tensor) -> torch.Tensor:
    """Position of each token inside the packed sequence (global index; docs are contiguous)."""
    return torch.arange(doc.shape[1], device=doc.device).expand_as(doc).contiguous()


def _prefix_flags(doc: torch.Tensor, P: int) -> torch.Tensor:
    """kv_in_prefix: the first P tokens of each document."""
    B, S = doc.shape
    start = torch.zeros_like(doc)
    for b in range(B):
        new = torch.ones(S, dtype=torch.bool)
        new[1:] = doc[b, 1:] != doc[b, :-1]
        idx = torch.arange(S)
        start[b] = torch.cummax(torch.where(new, idx, 0), 0).values
    return (torch.arange(S) - start) < P


def _random_block_mask(B, H, Sq, Skv, bs, seed) -> BlockMask:
    """Seeded random block structure (per batch and head) with a random element mask in partial blocks."""
    g = torch.Generator().manual_seed(seed)
    Qb, KVb = -(-Sq // bs), -(-Skv // bs)
    kind = torch.randint(0, 3, (B, H, Qb, KVb), generator=g).to(DEV)  # 0 empty, 1 partial, 2 full
    # element mask consistent with the blocks (full = all visible, empty = none), as torch's eager flex
    # evaluates mask_mod everywhere while the kernel trusts the block classification
    dense_kind = kind.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :Sq, :Skv]
    elem = (dense_kind == 2) | ((dense_kind == 1) & (torch.rand(B, H, Sq, Skv, generator=g).to(DEV) < 0.5))

    def lists(sel):
        num = sel.sum(-1).to(torch.int32)
        key = torch.where(sel, 0, KVb) + torch.arange(KVb, device=DEV)
        return num, key.argsort(-1).to(torch.int32)

    n, i = lists(kind == 1)
    fn, fi = lists(kind == 2)
    mask_mod = lambda b, h, q, k: elem[b, h, q, k]
    return BlockMask.from_kv_blocks(n, i, fn, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(Sq, Skv))


def _mask(kind: str, B: int, Sq: int, Skv: int, bs: int, H: int = 1):
    doc = _docs(B, Sq, seed=7)
    pos = _doc_positions(doc)
    pre = _prefix_flags(doc, 6).to(DEV)
    doc, pos = doc.to(DEV), pos.to(DEV)
    if kind == "causal":
        return create_block_mask(lambda b, h, q, k: q >= k, None, None, Sq, Skv, device=DEV, BLOCK_SIZE=bs)
    if kind == "doc":
        mm = DocumentMaskMod(doc, doc, pos, pos)
    elif kind == "window":
        mm = DocumentMaskMod(doc, doc, pos, pos, window=11)
    elif kind == "prefix":
        mm = DocumentMaskMod(doc, doc, pos, pos, kv_in_prefix=pre)
    elif kind == "general":
        # a torch mask_mod the kernel cannot recognise: dilated causal (keys at even distance)
        mm = lambda b, h, q, k: (q >= k) & ((q - k) % 2 == 0)
        return create_block_mask(mm, None, H, Sq, Skv, device=DEV, BLOCK_SIZE=bs)
    elif kind == "random":
        return _random_block_mask(B, H, Sq, Skv, bs, seed=3)
    else:
        raise AssertionError(kind)
    return create_block_mask(mm, B, None, Sq, Skv, device=DEV, BLOCK_SIZE=bs)


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype=torch.float32, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _close(got, want, tol, name):
    assert torch.isfinite(got).all(), f"{name} has non-finite values"
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def _check_against_reference(q, k, v, bm, sm=None, gqa=False, tol=None, qidx=None, kvidx=None):
    """Triton forward and backward == reference forward and backward (given the same out/lse)."""
    tol = tol or TOL[q.dtype]
    kw = dict(q_global_idx=qidx, kv_global_idx=kvidx)
    out, lse = flex_attention_forward(q, k, v, bm, sm, None, gqa, backend="triton", **kw)
    qf, kf, vf = q.float(), k.float(), v.float()
    ro, rl = reference_forward(qf, kf, vf, bm, sm, None, gqa, **kw)
    _close(out, ro, tol, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)), "lse -inf pattern differs"
    fin = torch.isfinite(rl)
    _close(lse[fin], rl[fin], tol, "lse")
    g = torch.Generator().manual_seed(11)
    dout = torch.randn(out.shape, generator=g).to(device=q.device, dtype=q.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(q.device)
    params = list(sm.tensors()) if sm is not None else []
    acc_t = [torch.zeros_like(t, dtype=torch.float32) for t in params]
    acc_r = [torch.zeros_like(t, dtype=torch.float32) for t in params]
    grads = flex_attention_backward(
        q, k, v, out, dout, lse, bm, sm, None, gqa, dlse=dlse, score_mod_grads=acc_t, backend="triton", **kw
    )
    ref = reference_backward(
        qf, kf, vf, out.float(), dout.float(), lse, bm, sm, None, gqa, dlse=dlse, score_mod_grads=acc_r, **kw
    )
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref, strict=True):
        assert a.dtype == q.dtype and a.shape == b.shape
        _close(a, b, tol * 2, name)
    for a, b in zip(acc_t, acc_r, strict=True):
        _close(a, b, tol * 5, "score_mod tensor grad")
    return out, lse, grads


def _check_against_torch_flex(q, k, v, bm, sm=None, gqa=False):
    """Forward equals torch's own flex_attention where torch's output is defined."""
    out, lse = flex_attention_forward(q, k, v, bm, sm, None, gqa, backend="triton")
    to, tl = torch_flex(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=gqa, return_lse=True)
    rows = ~torch.isnan(to).any(-1) & torch.isfinite(tl)
    _close(out[rows], to[rows], 2e-4, "out vs torch flex")
    _close(lse[rows], tl[rows], 2e-4, "lse vs torch flex")


@pytest.mark.parametrize("kind", ["causal", "doc", "window", "prefix", "general", "random"])
def test_masks_match_reference_and_torch(kind):
    B, H, S, D = 2, 2, 96, 16
    bm = _mask(kind, B, S, S, 16, H)
    q, k, v = _inputs(B, H, H, S, S, D, seed=1)
    _check_against_reference(q, k, v, bm)
    _check_against_torch_flex(q, k, v, bm)
    km = kernel_mask(bm, check_qkv(q, k, v, False), q.device)
    if kind in ("doc", "window", "prefix"):
        assert km.mask_kind == MASK_DOC
    if kind in ("general", "random"):
        assert km.mask_kind == MASK_BITS
        assert kernel_mask(bm, check_qkv(q, k, v, False), q.device) is km  # evaluated once, cached


@pytest.mark.parametrize("mod", ["softcap", "alibi", "relbias"])
def test_score_mods_with_grads(mod):
    B, Hq, Hkv, S, D = 1, 4, 2, 80, 32
    bm = _mask("doc", B, S, S, 16)
    q, k, v = _inputs(B, Hq, Hkv, S, S, D, seed=2)
    sm = {
        "softcap": SoftCap(1.5),
        "alibi": ALiBi(ALiBi.default_slopes(Hq, DEV)),
        "relbias": RelativeBias(
            torch.randn(Hq, 2 * 12 - 1, generator=torch.Generator().manual_seed(5)).to(DEV)
        ),
    }[mod]
    if mod == "relbias":
        sm.table.requires_grad_(True)
    _check_against_reference(q, k, v, bm, sm, gqa=True)
    _check_against_torch_flex(q, k, v, bm, sm, gqa=True)


def test_global_index_maps_under_cp():
    """A shard of queries / keys at scattered global positions: score mods see the global indices."""
    B, H, Sq, Skv, D = 1, 2, 48, 64, 16
    g = torch.Generator().manual_seed(4)
    qidx = torch.randperm(200, generator=g)[:Sq].to(DEV)
    kvidx = torch.randperm(200, generator=g)[:Skv].to(DEV)
    q, k, v = _inputs(B, H, H, Sq, Skv, D, seed=3)
    qd = torch.zeros(1, Sq, dtype=torch.long, device=DEV)
    kd = torch.zeros(1, Skv, dtype=torch.long, device=DEV)
    mm = DocumentMaskMod(qd, kd, qidx[None], kvidx[None])
    bm = create_block_mask(mm, 1, None, Sq, Skv, device=DEV, BLOCK_SIZE=16)
    for sm in (
        ALiBi(ALiBi.default_slopes(H, DEV)),
        RelativeBias(torch.randn(H, 2 * 40 - 1, device=DEV, requires_grad=True)),
    ):
        _check_against_reference(q, k, v, bm, sm, qidx=qidx, kvidx=kvidx)
    # without a score mod the maps are still validated, but neither converted nor passed to the kernels
    # (nothing reads them), and the result equals the call without maps
    _check_against_reference(q, k, v, bm, None, qidx=qidx, kvidx=kvidx)
    from flexdist.kernels.triton_fwd import prepare

    assert not prepare(q, k, v, bm, None, None, False, qidx, kvidx).has_qidx
    lp = prepare(q, k, v, bm, ALiBi(ALiBi.default_slopes(H, DEV)), None, False, qidx, kvidx)
    assert lp.has_qidx and lp.has_kvidx
    with pytest.raises(ValueError, match="q_global_idx must be"):
        prepare(q, k, v, bm, None, None, False, qidx[:-1], kvidx)


def test_odd_lengths_sq_ne_skv_gqa():
    B, Hq, Hkv, Sq, Skv, D = 2, 4, 1, 37, 83, 32
    off = Skv - Sq
    bm = create_block_mask(lambda b, h, q, k: k <= q + off, None, None, Sq, Skv, device=DEV, BLOCK_SIZE=32)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, seed=4)
    _check_against_reference(q, k, v, bm, gqa=True)
    _check_against_torch_flex(q, k, v, bm, gqa=True)
    _check_against_reference(q, k, v, None, SoftCap(3.0), gqa=True)  # dense, no BlockMask


def test_sub_tiles_of_large_blocks():
    """torch's default 128-token blocks walked in smaller kernel tiles, with a ragged last block."""
    B, H, Sq, Skv, D = 1, 2, 200, 170, 16
    off = Skv - Sq
    bm = create_block_mask(lambda b, h, q, k: k <= q + off, None, None, Sq, Skv, device=DEV)
    assert bm.BLOCK_SIZE == (128, 128)
    q, k, v = _inputs(B, H, H, Sq, Skv, D, seed=14)
    _check_against_reference(q, k, v, bm, ALiBi(ALiBi.default_slopes(H, DEV)))


def test_every_autotune_tile_is_correct():
    """Each tile shape the GPU autotuner may pick gives the reference result (document mask, 128 blocks)."""
    from flexdist.kernels import triton_bwd as TB
    from flexdist.kernels import triton_fwd as TF

    S, H, D = 256, 1, 16
    doc = torch.tensor([[0] * 100 + [1] * 120 + [2] * 36], device=DEV)
    pos = _doc_positions(doc)
    bm = create_block_mask(DocumentMaskMod(doc, doc, pos, pos), 1, None, S, S, device=DEV)
    q, k, v = _inputs(1, H, H, S, S, D, seed=15)
    ro, rl = reference_forward(q, k, v, bm)
    fin = torch.isfinite(rl)
    for m, n, fma in sorted({(*c[:2], len(c) > 4 and c[4]) for c in TF.FWD_TUNE}):
        out, lse = TF.triton_forward(q, k, v, bm, config=(m, n, 4, 1, fma))
        _close(out, ro, 2e-4, f"out with tile {m}x{n} fma={fma}")
        _close(lse[fin], rl[fin], 2e-4, f"lse with tile {m}x{n} fma={fma}")
    dout = torch.randn_like(out)
    want = reference_backward(q, k, v, out, dout, lse, bm)
    d1, d2 = TB.bwd_config(D, False)
    cfgs = [((m, n, 4, 1), d2) for m, n in sorted({c[:2] for c in TB.DKDV_TUNE})]
    cfgs += [(d1, (m, n, 4, 1)) for m, n in sorted({c[:2] for c in TB.DQ_TUNE})]
    for cfg in cfgs:
        got = TB.triton_backward(q, k, v, out, dout, lse, bm, config=cfg)
        for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
            _close(a, b, 4e-4, f"{name} with tiles {cfg}")


@triton.jit
def _coords_kernel(OUT, REF, NB, BH, HG, LEAD, SUBS: tl.constexpr):
    """Each program writes its ``_launch_coords_lead`` and ``_launch_coords`` (slot, head)."""
    slot, bh = _launch_coords_lead(NB, BH, HG, LEAD, SUBS)
    slot0, bh0 = _launch_coords(NB, BH, HG, SUBS)
    pid = tl.program_id(0)
    tl.store(OUT + 2 * pid, slot)
    tl.store(OUT + 2 * pid + 1, bh)
    tl.store(REF + 2 * pid, slot0)
    tl.store(REF + 2 * pid + 1, bh0)


def test_launch_coords_lead_cover_every_program_once():
    """``_launch_coords_lead`` maps the 1-D grid one-to-one onto (slot, head): the lead blocks of every head
    first (slot-major across all heads), then head groups; ``LEAD = 0`` is ``_launch_coords``."""
    for NB, BH, HG, LEAD, SUBS in [
        (5, 6, 4, 2, 1), (5, 6, 4, 0, 2), (7, 3, 1, 3, 2), (4, 5, 2, 4, 1), (6, 8, 3, 1, 1), (3, 2, 5, 1, 2),
    ]:  # fmt: skip
        n = NB * SUBS * BH
        out = torch.full((n, 2), -1, dtype=torch.int32, device=DEV)
        ref = torch.full((n, 2), -1, dtype=torch.int32, device=DEV)
        _coords_kernel[(n,)](out, ref, NB, BH, HG, LEAD, SUBS)
        got = [tuple(x) for x in out.tolist()]
        case = f"NB={NB} BH={BH} HG={HG} LEAD={LEAD} SUBS={SUBS}"
        assert sorted(got) == [(s_, h) for s_ in range(NB * SUBS) for h in range(BH)], case
        lead = LEAD * SUBS * BH
        assert got[:lead] == [(p // BH, p % BH) for p in range(lead)], case  # slot-major over all heads
        assert all(s_ >= LEAD * SUBS for s_, _ in got[lead:]), case
        if LEAD == 0:
            assert got == [tuple(x) for x in ref.tolist()], case


def test_launch_lead_rule(monkeypatch):
    """Lead blocks fill half the SMs across the heads, only when heads are grouped and the call has at least
    two keys per query (a CP rank's all-gather call), at most every block."""
    from flexdist.kernels import triton_fwd as TF
    from flexdist.kernels.validation import AttnShape

    monkeypatch.setattr(TF, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    rank = AttnShape(B=1, Hq=32, Hkv=4, Sq=8192, Skv=65536, D=128, Dv=128)  # one chunk of an 8-rank call
    assert TF.launch_lead(rank, 8, 64, False, cuda) == 3  # dQ: 32 query heads in groups of 8
    assert TF.launch_lead(rank, 1, 512, True, cuda) == 17  # dK/dV: 4 K/V heads one at a time
    assert (
        TF.launch_lead(rank, 32, 64, False, cuda) == 0
    )  # one group: longest-first across every head already
    assert TF.launch_lead(rank, 8, 2, False, cuda) == 2  # never more blocks than there are
    assert TF.launch_lead(rank, 1, 512, True, torch.device("cpu")) == -(-TF.DEFAULT_SMS // 8)
    one_gpu = AttnShape(B=1, Hq=64, Hkv=8, Sq=65536, Skv=65536, D=128, Dv=128)
    assert TF.launch_lead(one_gpu, 8, 512, False, cuda) == 0  # keys = queries: no tail to remove
    monkeypatch.setattr(TF, "LEAD_SM_FRACTION", 0.0)  # off: the plain head groups
    assert TF.launch_lead(rank, 8, 64, False, cuda) == 0


def test_head_groups_change_launch_order_not_results(monkeypatch):
    """Every launch grouping of heads (one head at a time, groups that do not divide B·H, all heads at once),
    with the backward's lead blocks (none, one, every block) gives bit-identical out, lse and gradients, with GQA, ragged lengths and the RelativeBias table gradient
    (whose per-program scratch rows are indexed by the launch coordinates)."""
    from flexdist.kernels import triton_bwd as TB
    from flexdist.kernels import triton_fwd as TF

    B, Hq, Hkv, S, D = 2, 6, 3, 150, 16
    doc = _docs(B, S, seed=21).to(DEV)
    pos = _doc_positions(doc)
    bm = create_block_mask(DocumentMaskMod(doc, doc, pos, pos), B, None, S, S, device=DEV, BLOCK_SIZE=32)
    q, k, v = _inputs(B, Hq, Hkv, S, S, D, seed=22)
    mod = RelativeBias(torch.randn(Hq, 2 * 40 - 1, device=DEV, requires_grad=True))
    results = []
    # (head group, SMs the backward's lead blocks are sized for: 1 → one lead block per head, 48 → dQ 2 and
    # dK/dV 4 of the 5 blocks, 10**4 → every block leads, no grouped programs left; groups of 12 or more
    # hold every head: no lead)
    variants = [(1, 1), (2, 48), (5, 1), (12, 48), (100, 1), (1, 10**4)]
    monkeypatch.setattr(TF, "LEAD_MIN_KV_PER_Q", 1)  # (the lead is for CP calls with more keys than queries)
    for hg, sms in variants:
        monkeypatch.setattr(TF, "_sm_count", lambda index, sms=sms: sms)
        monkeypatch.setattr(TF, "DEFAULT_SMS", sms)
        out, lse = TF.triton_forward(q, k, v, bm, mod, enable_gqa=True, head_group=hg)
        dout = torch.linspace(-1, 1, out.numel(), device=DEV).reshape(out.shape)
        tg = [torch.zeros_like(mod.table)]
        grads = TB.triton_backward(
            q, k, v, out, dout, lse, bm, mod, enable_gqa=True, score_mod_grads=tg, head_group=hg
        )
        results.append((out, lse, *grads, tg[0]))
    ro, _ = reference_forward(q, k, v, bm, mod, None, True)
    _close(results[0][0], ro, 2e-4, "out (head_group=1) vs reference")
    for (hg, sms), res in zip(variants[1:], results[1:], strict=True):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dtable"), res, results[0], strict=True):
            assert torch.equal(a, b), f"{name} differs between head_group={hg} ({sms} SMs) and head_group=1"
    with pytest.raises(ValueError, match="head_group must be a positive int"):
        TF.triton_forward(q, k, v, bm, enable_gqa=True, head_group=0)
    # the public entry points pass it through (and check it for the reference backend too)
    out, lse = flex_attention_forward(q, k, v, bm, mod, enable_gqa=True, backend="triton", head_group=5)
    assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    with pytest.raises(ValueError, match="head_group must be a positive int"):
        flex_attention_backward(
            q, k, v, out, out, lse, bm, enable_gqa=True, backend="reference", head_group=-1
        )


def test_triton_delta_matches_torch_rowsum():
    """The fused delta (what CP computes once per backward) equals rowsum(dO·O) − dLSE, with an odd length,
    a non-contiguous dout, and dLSE; bad shapes name the argument."""
    from flexdist.kernels.triton_bwd import triton_delta

    B, H, S, D = 2, 3, 77, 32
    g = torch.Generator().manual_seed(31)
    out = torch.randn(B, H, S, D, generator=g).to(DEV)
    dout = torch.randn(B, S, H, D, generator=g).to(DEV).transpose(1, 2)  # strided heads
    dlse = torch.randn(B, H, S, generator=g).to(DEV)
    want = (dout.double() * out.double()).sum(-1)
    _close(triton_delta(out, dout), want, 1e-5, "delta")
    _close(triton_delta(out, dout, dlse), want - dlse.double(), 1e-5, "delta with dlse")
    _close(
        triton_delta(out.half(), dout.half()),
        (dout.half().double() * out.half().double()).sum(-1),
        1e-3,
        "fp16",
    )
    odd = torch.randn(B, H, S, 24, generator=g).to(DEV)  # head dim not a power of two: masked columns
    _close(triton_delta(odd, 2 * odd), 2 * (odd.double() ** 2).sum(-1), 1e-5, "delta, head dim 24")
    with pytest.raises(ValueError, match="out and dout must both be"):
        triton_delta(out, dout[:, :, :-1])
    with pytest.raises(ValueError, match="dlse must have shape"):
        triton_delta(out, dout, dlse[:, :1])


def test_launch_head_group_rule():
    """The shipped grouping: as many heads as fit their streamed operand in 32 MiB (bf16, D = Dv = 128: a
    head's K/V is 16 MiB at 32k keys, shared by its GQA group; dK/dV streams Q/dO of the whole group)."""
    from flexdist.kernels.triton_fwd import launch_head_group
    from flexdist.kernels.validation import AttnShape

    def shape(S, Hq, Hkv):
        return AttnShape(B=1, Hq=Hq, Hkv=Hkv, Sq=S, Skv=S, D=128, Dv=128)

    assert launch_head_group(shape(32768, 16, 16), 2, kv_programs=False) == 2
    assert launch_head_group(shape(8192, 16, 16), 2, kv_programs=False) == 8
    assert launch_head_group(shape(131072, 16, 16), 2, kv_programs=False) == 1  # never fewer than one
    assert launch_head_group(shape(8192, 64, 8), 2, kv_programs=False) == 64  # capped at the heads there are
    assert launch_head_group(shape(8192, 64, 8), 2, kv_programs=True) == 1  # 8 query heads' Q/dO: 32 MiB
    assert launch_head_group(shape(8192, 16, 16), 2, kv_programs=True) == 8


def test_fully_masked_rows_no_nan():
    B, H, S, D = 1, 2, 64, 16
    doc = torch.full((B, S), -1)
    doc[:, 5:20] = 0
    doc[:, 40:45] = 1
    doc = doc.to(DEV)
    pos = _doc_positions(doc)
    bm = create_block_mask(DocumentMaskMod(doc, doc, pos, pos), B, None, S, S, device=DEV, BLOCK_SIZE=16)
    q, k, v = _inputs(B, H, H, S, S, D, seed=5)
    out, lse, (dq, dk, dv) = _check_against_reference(q, k, v, bm, SoftCap(2.0))
    dead = (doc < 0)[:, None, :].expand(B, H, S)
    assert torch.all(out[dead] == 0) and torch.all(torch.isneginf(lse[dead]))
    assert torch.all(dq[dead] == 0) and torch.all(dk[dead] == 0) and torch.all(dv[dead] == 0)


def test_backward_is_deterministic():
    B, Hq, Hkv, S, D = 1, 4, 2, 128, 32
    bm = _mask("doc", B, S, S, 32)
    q, k, v = _inputs(B, Hq, Hkv, S, S, D, seed=6)
    sm = RelativeBias(torch.randn(Hq, 2 * 16 - 1, device=DEV, requires_grad=True))
    out, lse = flex_attention_forward(q, k, v, bm, sm, None, True, backend="triton")
    dout = torch.randn_like(out)
    runs = []
    for _ in range(2):
        acc = [torch.zeros(Hq, 31, device=DEV)]
        runs.append(
            (
                *flex_attention_backward(q, k, v, out, dout, lse, bm, sm, None, True, score_mod_grads=acc),
                acc[0],
            )
        )
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_autograd_function_matches_reference_autograd():
    """flex_attention (Triton) backpropagates through out, the returned LSE and a learnable bias table."""
    B, Hq, Hkv, S, D = 1, 2, 1, 64, 16
    bm = _mask("window", B, S, S, 16)
    q0, k0, v0 = _inputs(B, Hq, Hkv, S, S, D, seed=8)
    t0 = torch.randn(Hq, 2 * 8 - 1, device=DEV)
    res = []
    for backend in ("triton", "reference"):
        q, k, v, t = (x.clone().requires_grad_(True) for x in (q0, k0, v0, t0))
        out, lse = flex_attention(
            q, k, v, RelativeBias(t), bm, enable_gqa=True, return_lse=True, backend=backend
        )
        w = torch.linspace(-1, 1, S, device=DEV)
        loss = (out * out).sum() + (lse.masked_fill(torch.isinf(lse), 0) * w).sum()
        loss.backward()
        res.append((out, lse, q.grad, k.grad, v.grad, t.grad))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dtable"), *res, strict=True):
        fin = torch.isfinite(b)
        _close(a[fin], b[fin], 5e-4, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    B, H, S, D = 1, 2, 64, 32
    bm = _mask("causal", B, S, S, 32)
    q, k, v = _inputs(B, H, H, S, S, D, dtype=dtype, seed=9)
    _check_against_reference(q, k, v, bm, ALiBi(ALiBi.default_slopes(H, DEV)))


def test_dispatch_accumulate_buffers_and_fallback(monkeypatch):
    B, H, S, D = 1, 2, 32, 16
    q, k, v = _inputs(B, H, H, S, S, D, seed=10)
    from flexdist.kernels import resolve_backend

    qc = q.cpu()
    with monkeypatch.context() as mp:  # TRITON_INTERPRET is read at call time
        mp.setenv("TRITON_INTERPRET", "0")
        assert resolve_backend("auto", qc) == "reference"
        mp.setenv("TRITON_INTERPRET", "1")
        assert resolve_backend("auto", qc) == "triton"
        assert resolve_backend("auto", qc.double()) == "reference"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", q)
    out, lse = flex_attention_forward(q, k, v, backend="triton")
    dout = torch.randn_like(out)
    bufs = [torch.ones_like(t) for t in (q, k, v)]
    got = flex_attention_backward(
        q, k, v, out, dout, lse, backend="triton", dq_out=bufs[0], dk_out=bufs[1], dv_out=bufs[2]
    )
    want = reference_backward(q, k, v, out, dout, lse)
    for g, b, w in zip(got, bufs, want, strict=True):
        assert g is b
        _close(g, w + 1, 2e-4, "accumulated grad")
    # an arbitrary Python score_mod cannot run in the kernel: documented fallback with a warning
    with pytest.warns(UserWarning, match="falling back to the dense reference"):
        o2 = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 0.5, backend="triton")
    _close(o2, flex_attention_reference(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 0.5), 1e-6, "fallback")


def test_bad_inputs_raise_clear_errors():
    q, k, v = _inputs(1, 4, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_attention_forward(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="Hq=4, Hkv=3"):
        flex_attention_forward(
            q, k[:, :1].expand(1, 3, 32, 16), v[:, :1].expand(1, 3, 32, 16), enable_gqa=True, backend="triton"
        )
    q48 = torch.randn(1, 2, 32, 48, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        flex_attention_forward(q48, q48, q48, backend="triton")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flex_attention_forward(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(TypeError, match="share a dtype"):
        flex_attention_forward(q, q.half(), q, backend="triton")
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 64, 64, device=DEV, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        flex_attention_forward(q, q, q, bm, backend="triton")
    bm8 = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 32, 32, device=DEV, BLOCK_SIZE=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        flex_attention_forward(q, q, q, bm8, backend="triton")
    with pytest.raises(ValueError, match="heads"):
        flex_attention_forward(q, q, q, score_mod=ALiBi(torch.ones(3, device=DEV)), backend="triton")
    out, lse = flex_attention_forward(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="lse must have shape"):
        flex_attention_backward(q, q, q, out, out, lse[:, :, :5], backend="triton")
    with pytest.raises(ValueError, match="q_global_idx"):
        flex_attention_forward(
            q,
            q,
            q,
            score_mod=ALiBi(torch.ones(4, device=DEV)),
            q_global_idx=torch.arange(5, device=DEV),
            backend="triton",
        )


# ------------------------------------------------------------------------------------------------------
# GPU scale (run on the GPU machine): same checks at S = 1k..4k, D = 64/128, bf16, torch flex compiled.
# ------------------------------------------------------------------------------------------------------


def _gpu_doc_block_mask(S: int, mean: int, seed: int):
    doc = _docs(1, S, seed=seed, pad=0, max_len=2 * mean).to(DEV)
    pos = _doc_positions(doc)
    return create_block_mask(DocumentMaskMod(doc, doc, pos, pos), 1, None, S, S, device=DEV)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "S,D,mask", [(1024, 64, "causal"), (2048, 128, "doc"), (4096, 128, "causal"), (1536 + 17, 128, "doc")]
)
def test_gpu_scale_bf16(S, D, mask):
    B, Hq, Hkv = 1, 4, 2
    if mask == "causal":
        bm = create_block_mask(lambda b, h, q, k: q >= k, None, None, S, S, device=DEV)
    else:
        bm = _gpu_doc_block_mask(S, 300, seed=1)
    q, k, v = _inputs(B, Hq, Hkv, S, S, D, dtype=torch.bfloat16, seed=12)
    _check_against_reference(q, k, v, bm, gqa=True, tol=3e-2)
    _check_against_reference(q, k, v, bm, SoftCap(20.0), gqa=True, tol=3e-2)


@pytest.mark.gpu
def test_gpu_matches_compiled_torch_flex_fwd_bwd():
    S, D, B, Hq, Hkv = 2048, 128, 1, 4, 2
    bm = _gpu_doc_block_mask(S, 300, seed=2)
    q, k, v = _inputs(B, Hq, Hkv, S, S, D, dtype=torch.bfloat16, seed=13)
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    to = torch.compile(torch_flex)(qs, ks, vs, block_mask=bm, enable_gqa=True)
    do = torch.randn_like(to)
    to.backward(do)
    qm, km_, vm = (t.clone().requires_grad_(True) for t in (q, k, v))
    mo = flex_attention(qm, km_, vm, block_mask=bm, enable_gqa=True)
    mo.backward(do)
    pairs = (("out", mo, to), ("dq", qm.grad, qs.grad), ("dk", km_.grad, ks.grad), ("dv", vm.grad, vs.grad))
    for name, a, b in pairs:
        _close(a, b, 4e-2, f"{name} vs torch flex")
