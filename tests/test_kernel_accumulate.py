"""The kernel's accumulate mode: forward merging into a running (out, lse), backward adding into buffers.

Ring attention calls the kernel once per visiting K/V shard. Instead of a separate merge pass over the whole
accumulator every step, the forward kernel merges its tile into ``out_acc`` / ``lse_acc`` in its epilogue
and leaves tiles with no block untouched; the backward kernels add dQ / dK / dV into caller buffers. Here the
keys are split into chunks (any token sets, as CP shards are) and the chunked result must equal one call
over all keys: out, LSE, dq, dk, dv, with padding rows (fully masked everywhere) and rows that are empty in
some chunks, GQA, a score mod that reads global positions, and both backends.
"""

from __future__ import annotations

import pytest
import torch

from flexdist.cp.plan import build_pair_masks
from flexdist.kernels import ALiBi, flex_attention_backward, flex_attention_forward

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16


def _problem(seed: int, S: int = 96, B: int = 2, Hq: int = 4, Hkv: int = 2, D: int = 16):
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):  # random document lengths, then a padding tail (negative ids)
        pos, d = 0, 0
        while pos < S - 8:
            n = int(torch.randint(1, 40, (1,), generator=g))
            doc[b, pos : pos + n] = d
            pos, d = pos + n, d + 1
        doc[b, pos:] = -1
    q = torch.randn(B, Hq, S, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    dout = torch.randn(B, Hq, S, D, generator=g)
    # queries and key chunks: whole blocks of a permutation of the blocks (as a CP planner produces)
    blocks = torch.randperm(S // BS, generator=g)
    order = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1)
    return doc, q, k, v, dout, order


def _chunks(order: torch.Tensor, n: int) -> list[torch.Tensor]:
    per = order.numel() // n // BS * BS
    return [order[i * per : (i + 1) * per] if i < n - 1 else order[i * per :] for i in range(n)]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("score", [None, "alibi"])
def test_chunked_accumulation_equals_one_call(backend: str, score: str | None) -> None:
    doc, q, k, v, dout, order = _problem(seed=3 if score is None else 4)
    dev = torch.device(DEV)
    doc, q, k, v, dout, order = (t.to(dev) for t in (doc, q, k, v, dout, order))
    qi = order  # this "rank" holds the queries in planner order
    ql, dl = q[:, :, qi], dout[:, :, qi]
    sm = ALiBi(ALiBi.default_slopes(q.shape[1], DEV)) if score == "alibi" else None
    chunks = _chunks(order.flip(0), 3)
    masks = build_pair_masks(doc, qi, chunks, causal=True, window=None, block_size=BS)
    ((full_mask, _, _),) = build_pair_masks(doc, qi, [order], causal=True, window=None, block_size=BS)
    kw = dict(score_mod=sm, enable_gqa=True, q_global_idx=qi, backend=backend)

    want_o, want_l = flex_attention_forward(
        ql, k[:, :, order], v[:, :, order], full_mask, kv_global_idx=order, **kw
    )
    assert torch.isneginf(want_l).any(), "the case must contain rows that see nothing (padding)"

    B, Hq, L, D = ql.shape
    out_acc = torch.zeros(B, Hq, L, D, device=dev)
    lse_acc = torch.full((B, Hq, L), float("-inf"), device=dev)
    empty_chunks = 0
    for idx, (m, _, _) in zip(chunks, masks, strict=True):
        if m is None:
            empty_chunks += 1
            continue
        ret = flex_attention_forward(
            ql, k[:, :, idx], v[:, :, idx], m, kv_global_idx=idx, out_acc=out_acc, lse_acc=lse_acc, **kw
        )
        assert ret[0] is out_acc and ret[1] is lse_acc
    assert empty_chunks < len(chunks)
    torch.testing.assert_close(out_acc, want_o.float(), atol=2e-4, rtol=2e-4)
    fin = torch.isfinite(want_l)
    assert torch.equal(torch.isfinite(lse_acc), fin)
    torch.testing.assert_close(lse_acc[fin], want_l[fin], atol=2e-4, rtol=2e-4)
    assert not torch.isnan(out_acc).any()

    # backward: every chunk adds into dq (shared) and its own dK/dV buffers, with the global lse and delta
    out = out_acc.to(q.dtype)
    gq, gk, gv = flex_attention_backward(
        ql, k[:, :, order], v[:, :, order], out, dl, lse_acc, full_mask, kv_global_idx=order, **kw
    )
    delta = (dl.float() * out.float()).sum(-1)
    dq = torch.zeros_like(ql)
    dk = torch.zeros(k.shape, device=dev)
    dv = torch.zeros(v.shape, device=dev)
    for idx, (m, _, _) in zip(chunks, masks, strict=True):
        if m is None:
            continue
        dk_c = torch.full((B, k.shape[1], idx.numel(), D), 0.5, device=dev)  # adds to what is there
        dv_c = torch.full_like(dk_c, 0.5)
        # the two kernels separately, as the ring runs them (dQ while dK/dV is still in flight)
        got = flex_attention_backward(
            ql, k[:, :, idx], v[:, :, idx], out, dl, lse_acc, m, delta=delta, kv_global_idx=idx,
            dq_out=dq, which="dq", **kw,
        )  # fmt: skip
        assert got[0] is dq and got[1] is None and got[2] is None
        flex_attention_backward(
            ql, k[:, :, idx], v[:, :, idx], out, dl, lse_acc, m, delta=delta, kv_global_idx=idx,
            dk_out=dk_c, dv_out=dv_c, which="dkdv", **kw,
        )  # fmt: skip
        dk[:, :, idx] = dk_c - 0.5
        dv[:, :, idx] = dv_c - 0.5
    torch.testing.assert_close(dq, gq, atol=3e-4, rtol=3e-4)
    torch.testing.assert_close(dk[:, :, order], gk, atol=3e-4, rtol=3e-4)
    torch.testing.assert_close(dv[:, :, order], gv, atol=3e-4, rtol=3e-4)
    pad_rows = (doc[:, qi] < 0)[:, None, :, None].expand_as(dq)
    assert (dq[pad_rows] == 0).all(), "padding queries must get exactly zero gradient"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_last_merge_written_to_out(backend: str, out_dtype: torch.dtype) -> None:
    """``out=`` with ``out_acc`` / ``lse_acc``: the last chunk's merge lands in ``out`` (a head slice of a
    garbage-filled tensor, in its own dtype) and equals the in-place merge; ``out_acc`` is only read. Rows
    the last chunk sees nothing of carry the running result over, padding rows get 0 and -inf."""
    doc, q, k, v, _, order = _problem(seed=8)
    dev = torch.device(DEV)
    doc, q, k, v, order = (t.to(dev) for t in (doc, q, k, v, order))
    ql = q[:, :, order]
    chunks = _chunks(order.flip(0), 3)
    masks = [m for m, _, _ in build_pair_masks(doc, order, chunks, causal=True, window=None, block_size=BS)]
    assert masks[-1] is not None
    kw = dict(enable_gqa=True, q_global_idx=order, backend=backend)
    B, Hq, L, D = ql.shape
    o_acc = torch.zeros(B, Hq, L, D, device=dev)
    l_acc = torch.full((B, Hq, L), float("-inf"), device=dev)
    for idx, m in zip(chunks[:-1], masks[:-1], strict=True):
        if m is not None:
            flex_attention_forward(ql, k[:, :, idx], v[:, :, idx], m, kv_global_idx=idx, out_acc=o_acc,
                                   lse_acc=l_acc, **kw)  # fmt: skip
    # rows that the last chunk sees nothing of, but earlier chunks do: their result must be carried over
    idx = chunks[-1]
    want_o, want_l = o_acc.clone(), l_acc.clone()
    flex_attention_forward(ql, k[:, :, idx], v[:, :, idx], masks[-1], kv_global_idx=idx, out_acc=want_o,
                           lse_acc=want_l, **kw)  # fmt: skip
    carried = torch.isfinite(l_acc) & torch.isclose(want_l, l_acc)
    assert carried.any(), "the case must hold rows the last chunk adds nothing to"
    prev_o = o_acc.clone()
    big = torch.full((B, Hq + 2, L, D), 123.0, dtype=out_dtype, device=dev)
    out = big[:, 1 : 1 + Hq]
    got_o, got_l = flex_attention_forward(ql, k[:, :, idx], v[:, :, idx], masks[-1], kv_global_idx=idx,
                                          out=out, out_acc=o_acc, lse_acc=l_acc, **kw)  # fmt: skip
    assert got_o is out and got_l is l_acc
    assert torch.equal(o_acc, prev_o), "out_acc must only be read"
    assert (big[:, 0] == 123.0).all() and (big[:, -1] == 123.0).all()
    assert torch.equal(torch.isfinite(got_l), torch.isfinite(want_l))
    fin = torch.isfinite(want_l)
    torch.testing.assert_close(got_l[fin], want_l[fin], atol=0, rtol=0)
    if out_dtype == torch.float32:
        torch.testing.assert_close(got_o, want_o, atol=0, rtol=0)
    else:  # the same fp32 value rounded (the interpreter truncates, a GPU rounds to nearest)
        torch.testing.assert_close(got_o.float(), want_o, rtol=2**-7, atol=0)
    assert (got_o[~fin] == 0).all()


@pytest.mark.gpu
def test_autotuned_accumulating_calls_merge_once() -> None:
    """On a GPU, calls at 128-token blocks above ``AUTOTUNE_MIN_PAIRS`` go through Triton's autotuner, which
    benchmarks every config on the call's own arguments. A merging / adding call must still merge its result
    once: here the first call of a fresh tuning key accumulates into zeros and must equal the plain call."""
    from flexdist.kernels import triton_bwd as TB
    from flexdist.kernels import triton_fwd as TF
    from flexdist.masks import document_block_mask

    for tuner in (TF._fwd_kernel_tuned_accum, TB._dkdv_kernel_tuned_accum, TB._dq_kernel_tuned_accum):
        tuner.cache.clear()  # a fresh key: this process's first accumulating call tunes
    S, Hq, Hkv, D = 4224, 4, 2, 64  # 33 blocks of 128; 4224² > AUTOTUNE_MIN_PAIRS
    assert S * S >= TF.AUTOTUNE_MIN_PAIRS
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, Hq, S, D, generator=g).cuda().bfloat16() for _ in range(2))
    k, v = (torch.randn(1, Hkv, S, D, generator=g).cuda().bfloat16() for _ in range(2))
    doc = (torch.arange(S) // 1000).view(1, S).cuda()
    bm = document_block_mask(doc, block_size=128)
    kw = dict(enable_gqa=True, backend="triton")
    want_o, want_l = flex_attention_forward(q, k, v, bm, **kw)
    o = torch.zeros(1, Hq, S, D, device="cuda")
    lse = torch.full((1, Hq, S), float("-inf"), device="cuda")
    flex_attention_forward(q, k, v, bm, out_acc=o, lse_acc=lse, **kw)
    assert TF._fwd_kernel_tuned_accum.cache, "the accumulating call did not go through the autotuner"
    torch.testing.assert_close(lse, want_l, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o, want_o.float(), atol=1e-2, rtol=1e-2)
    dq_w, dk_w, dv_w = flex_attention_backward(q, k, v, want_o, dout, want_l, bm, **kw)
    dq = torch.zeros(q.shape, device="cuda")
    dk, dv = torch.zeros(k.shape, device="cuda"), torch.zeros(v.shape, device="cuda")
    flex_attention_backward(q, k, v, want_o, dout, want_l, bm, dq_out=dq, dk_out=dk, dv_out=dv, **kw)
    assert TB._dkdv_kernel_tuned_accum.cache and TB._dq_kernel_tuned_accum.cache
    for got, want, name in ((dq, dq_w, "dq"), (dk, dk_w, "dk"), (dv, dv_w, "dv")):
        torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_accumulators_are_checked() -> None:
    _, q, k, v, _, _ = _problem(seed=5)
    dev = torch.device(DEV)
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    B, Hq, S, D = q.shape
    o = torch.zeros(B, Hq, S, D, device=dev)
    lse = torch.full((B, Hq, S), float("-inf"), device=dev)
    with pytest.raises(ValueError, match="together"):
        flex_attention_forward(q, k, v, enable_gqa=True, out_acc=o, backend="triton")
    with pytest.raises(TypeError, match="out_acc must be float32"):
        flex_attention_forward(q, k, v, enable_gqa=True, out_acc=o.half(), lse_acc=lse, backend="triton")
    with pytest.raises(ValueError, match=r"lse_acc must have shape \(2, 4, 96\)"):
        flex_attention_forward(q, k, v, enable_gqa=True, out_acc=o, lse_acc=lse[:, :, :10], backend="triton")
    out, l = flex_attention_forward(q, k, v, enable_gqa=True, backend="triton")
    dk = torch.zeros_like(k)
    with pytest.raises(ValueError, match="dk_out and dv_out must be given together"):
        flex_attention_backward(q, k, v, out, out, l, enable_gqa=True, dk_out=dk, backend="triton")
    with pytest.raises(ValueError, match="which must be"):
        flex_attention_backward(q, k, v, out, out, l, enable_gqa=True, which="dk", backend="triton")


@pytest.mark.parametrize("accumulate", [False, True])
def test_fma_softmax_variant_equals_default(accumulate: bool) -> None:
    """The forward's FMA softmax (one of the autotuner's choices on a GPU) against the default form and the
    reference: padding rows that see nothing, rows empty in some chunks, a ragged last kv tile, GQA, and the
    accumulate epilogue."""
    from flexdist.kernels import triton_fwd as TF
    from flexdist.kernels.reference import reference_forward

    doc, q, k, v, _, order = _problem(seed=7)
    dev = torch.device(DEV)
    doc, q, k, v, order = (t.to(dev) for t in (doc, q, k, v, order))
    ((mask, _, _),) = build_pair_masks(doc, order, [order], causal=True, window=None, block_size=BS)
    ql, kl, vl = q[:, :, order], k[:, :, order], v[:, :, order]
    want_o, want_l = reference_forward(ql, kl, vl, mask, enable_gqa=True, scale=0.4)
    fin = torch.isfinite(want_l)
    assert (~fin).any() and fin.any()
    res = []
    for fma in (False, True):
        cfg = (64, 64, 4, 1, fma)
        if accumulate:
            B, Hq, L, D = ql.shape
            o = torch.zeros(B, Hq, L, D, device=dev)
            lse = torch.full((B, Hq, L), float("-inf"), device=dev)
            for idx in _chunks(torch.arange(L, device=dev), 2):
                ((m, _, _),) = build_pair_masks(
                    doc, order, [order[idx]], causal=True, window=None, block_size=BS
                )
                if m is not None:
                    TF.triton_forward(
                        ql, kl[:, :, idx], vl[:, :, idx], m, scale=0.4, enable_gqa=True,
                        config=cfg, out_acc=o, lse_acc=lse,
                    )  # fmt: skip
        else:
            o, lse = TF.triton_forward(ql, kl, vl, mask, scale=0.4, enable_gqa=True, config=cfg)
        assert not torch.isnan(o).any() and not torch.isnan(lse).any()
        assert torch.equal(torch.isfinite(lse), fin) and (o[~fin] == 0).all()
        torch.testing.assert_close(o.float(), want_o.float(), atol=2e-4, rtol=2e-4, msg=f"out fma={fma}")
        torch.testing.assert_close(lse[fin], want_l[fin], atol=2e-4, rtol=2e-4, msg=f"lse fma={fma}")
        res.append((o, lse))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-5, rtol=1e-5)
    if not accumulate:
        # large scores (hundreds after scaling): only a running max taken on the scaled scores keeps every
        # exponent in range
        big = ql * 40
        want_o, want_l = reference_forward(big, kl, vl, mask, enable_gqa=True, scale=0.4)
        o, lse = TF.triton_forward(big, kl, vl, mask, scale=0.4, enable_gqa=True, config=(64, 64, 4, 1, True))
        torch.testing.assert_close(o.float(), want_o.float(), atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(lse[fin], want_l[fin], atol=1e-3, rtol=2e-4)
    if not accumulate:  # no mask, 85 keys: the last kv tile is ragged (masked loads, EVEN_N off)
        want_o, want_l = reference_forward(ql, kl[:, :, :85], vl[:, :, :85], None, enable_gqa=True, scale=0.4)
        o, lse = TF.triton_forward(ql, kl[:, :, :85], vl[:, :, :85], None, scale=0.4, enable_gqa=True,
                                   config=(64, 64, 4, 1, True))  # fmt: skip
        torch.testing.assert_close(o.float(), want_o.float(), atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(lse, want_l, atol=2e-4, rtol=2e-4)
