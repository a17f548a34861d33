"""The dense reference agrees with torch's own flex_attention (forward) and with autograd (backward)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flexdist.kernels import (
    ALiBi,
    DocumentMaskMod,
    RelativeBias,
    SoftCap,
    flex_attention_reference,
    reference_backward,
    reference_forward,
)


def _doc_mask_mod(B: int, S: int, seed: int, causal: bool = True, window: int | None = None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S // 3 + 2, (B, S), generator=g)
    doc = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        starts = torch.cumsum(lengths[b], 0)
        doc[b] = torch.searchsorted(starts, torch.arange(S), right=True)
    doc[:, -5:] = -1  # padding tail
    pos = torch.arange(S).expand(B, S)
    return DocumentMaskMod(doc, doc, pos, pos, causal=causal, window=window)


@pytest.mark.parametrize("score_kind", [None, "softcap", "alibi", "relbias"])
@pytest.mark.parametrize("gqa", [False, True])
def test_reference_forward_matches_torch_flex(score_kind, gqa):
    torch.manual_seed(0)
    B, Hq, S, D = 2, 4, 200, 16
    Hkv = 2 if gqa else Hq
    q = torch.randn(B, Hq, S, D)
    k = torch.randn(B, Hkv, S, D)
    v = torch.randn(B, Hkv, S, D)
    mm = _doc_mask_mod(B, S, seed=1)
    bm = create_block_mask(mm, B, None, S, S, device="cpu", BLOCK_SIZE=64)
    score_mod = {
        None: None,
        "softcap": SoftCap(2.0),
        "alibi": ALiBi(ALiBi.default_slopes(Hq)),
        "relbias": RelativeBias(torch.randn(Hq, 2 * 32 - 1)),
    }[score_kind]
    out_ref, lse_ref = reference_forward(q, k, v, bm, score_mod, enable_gqa=gqa)
    out_t, lse_t = flex_attention(
        q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=gqa, return_lse=True
    )
    # torch's CPU flex gives NaN output for padding rows in some versions; compare where torch is defined
    rows = ~torch.isnan(out_t).any(-1)
    torch.testing.assert_close(out_ref[rows], out_t[rows], atol=2e-5, rtol=2e-5)
    pad = mm.q_doc[:, None, :].expand(B, Hq, S) < 0
    assert torch.all(out_ref[pad] == 0) and torch.all(torch.isneginf(lse_ref[pad]))
    torch.testing.assert_close(lse_ref[~pad], lse_t[~pad], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("gqa", [False, True])
def test_reference_backward_matches_autograd(gqa):
    torch.manual_seed(0)
    B, Hq, S, D = 1, 4, 150, 16
    Hkv = 1 if gqa else Hq
    q = torch.randn(B, Hq, S, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, dtype=torch.float64, requires_grad=True)
    mm = _doc_mask_mod(B, S, seed=3, window=40)
    bm = create_block_mask(mm, B, None, S, S, device="cpu", BLOCK_SIZE=32)
    table = torch.randn(Hq, 2 * 16 - 1, dtype=torch.float64, requires_grad=True)
    sm = RelativeBias(table)
    out, lse = flex_attention_reference(q, k, v, sm, bm, enable_gqa=gqa, return_lse=True)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0)
    (out * dout).sum().backward(retain_graph=True)
    (lse.masked_fill(torch.isinf(lse), 0) * dlse).sum().backward()
    acc = [torch.zeros_like(table)]
    dq, dk, dv = reference_backward(
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        dout,
        lse.detach(),
        bm,
        sm,
        enable_gqa=gqa,
        dlse=dlse,
        score_mod_grads=acc,
    )
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad), (acc[0], table.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


def test_fully_masked_rows_are_zero_without_nan():
    B, H, S, D = 1, 2, 64, 8
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    doc = torch.full((B, S), -1)
    doc[:, :10] = 0
    pos = torch.arange(S).expand(B, S)
    bm = create_block_mask(DocumentMaskMod(doc, doc, pos, pos), B, None, S, S, device="cpu", BLOCK_SIZE=16)
    out, lse = flex_attention_reference(q, k, v, block_mask=bm, return_lse=True)
    assert torch.all(out[:, :, 10:] == 0) and torch.all(torch.isneginf(lse[:, :, 10:]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 10:] == 0)
    assert torch.all(k.grad[:, :, 10:] == 0)


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 4, 32, 16)
    k = torch.randn(1, 3, 32, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        reference_forward(q, k, k)
    with pytest.raises(ValueError, match="Hq=4, Hkv=3"):
        reference_forward(q, k, k, enable_gqa=True)
    with pytest.raises(TypeError, match="share a dtype"):
        reference_forward(q, q.double(), q)
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, 16, 16, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="Sq=32"):
        reference_forward(q, q, q, bm)
