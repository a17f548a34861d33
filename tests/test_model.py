"""The Llama-style model: document isolation through the kernel's document mask, RoPE, GQA, gradients, FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexdist.kernels import DocumentMaskMod
from flexdist.model import (
    Llama,
    LlamaConfig,
    LocalDocumentAttention,
    apply_rope,
    compile_model,
    document_causal_pairs,
    flops_per_token,
    rope_cos_sin,
)


def tiny(**kw) -> LlamaConfig:
    base = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96)
    base.update(kw)
    return LlamaConfig(**base)


def packed(lengths: list[int], vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = sum(lengths)
    tokens = torch.randint(0, vocab, (1, S), generator=g)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    starts = torch.cumsum(torch.tensor(lengths), 0) - torch.tensor(lengths)
    pos = (torch.arange(S) - torch.repeat_interleave(starts, torch.tensor(lengths)))[None]
    return tokens, doc, pos


class DenseDocumentAttention:
    """Independent dense fp32 reference: SDPA with the explicit document-causal mask, K/V heads repeated."""

    def __init__(self, doc: torch.Tensor) -> None:
        S = doc.shape[1]
        ar = torch.arange(S)[None]
        self.mask = DocumentMaskMod(doc, doc, ar, ar).dense()[:, None]

    def __call__(self, q, k, v):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=self.mask).to(
            q.dtype
        )


def test_documents_are_isolated_and_positions_restart() -> None:
    """Logits of a document packed after others equal the logits of that document alone."""
    torch.manual_seed(0)
    model = Llama(tiny()).eval()
    tokens, doc, pos = packed([40, 70, 18])
    with torch.no_grad():
        full = model(tokens, pos, LocalDocumentAttention(doc, backend="reference", block_size=32))
        for lo, hi in ((0, 40), (40, 110), (110, 128)):
            t = tokens[:, lo:hi]
            alone = model(t, pos[:, lo:hi], LocalDocumentAttention(doc[:, lo:hi] * 0, backend="reference"))
            torch.testing.assert_close(full[:, lo:hi], alone, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_forward_backward_match_dense_reference(tie: bool) -> None:
    torch.manual_seed(1)
    cfg = tiny(tie_embeddings=tie)
    a, b = Llama(cfg), Llama(cfg)
    b.load_state_dict(a.state_dict())
    tokens, doc, pos = packed([30, 50, 16, 32], seed=1)
    labels = torch.roll(tokens, -1, 1)
    la = F.cross_entropy(
        a(tokens, pos, LocalDocumentAttention(doc, backend="reference", block_size=32))[0], labels[0]
    )
    lb = F.cross_entropy(b(tokens, pos, DenseDocumentAttention(doc))[0], labels[0])
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad.abs().sum() > 0 for p in a.parameters())


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(2)
    a, b = Llama(tiny()), Llama(tiny())
    b.load_state_dict(a.state_dict())
    b.activation_checkpointing = True
    tokens, doc, pos = packed([20, 44], seed=2)
    for m in (a, b):
        m(tokens, pos, DenseDocumentAttention(doc)).logsumexp(-1).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(3)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), 32, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), 32, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_flops_per_token_counts_every_matmul_parameter() -> None:
    cfg = tiny(vocab_size=100)
    model = Llama(cfg)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    matmul = model.num_params() - model.tok_embeddings.weight.numel() - norms
    assert flops_per_token(cfg, 0.0) == 6 * matmul
    assert flops_per_token(cfg, 10.0) - flops_per_token(cfg, 0.0) == 12 * cfg.n_layers * cfg.dim * 10.0


def test_document_causal_pairs_counts_the_mask() -> None:
    _, doc, _ = packed([5, 17, 1, 9])
    doc = torch.cat([doc, torch.where(torch.arange(32) < 20, 0, -1)[None]])  # second row: one doc + padding
    ar = torch.arange(32).expand(2, 32)
    assert document_causal_pairs(doc) == int(DocumentMaskMod(doc, doc, ar, ar).dense().sum())


def test_config_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match=r"n_heads=6 is not a multiple of model\.n_kv_heads=4"):
        tiny(n_heads=6, n_kv_heads=4, dim=96)
    with pytest.raises(ValueError, match=r"dim=100 is not divisible by model\.n_heads=8"):
        tiny(dim=100, n_heads=8, n_kv_heads=8)
    with pytest.raises(ValueError, match=r"tokens .* and positions"):
        Llama(tiny())(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), None)


def test_compile_model_wiring_keeps_the_gradients() -> None:
    """compile_model compiles around the attention op; with the eager backend (no C++ toolchain needed in
    CI) the wiring must leave outputs and gradients unchanged, across batches with different attention."""
    torch.manual_seed(4)
    a, b = Llama(tiny()), Llama(tiny())
    b.load_state_dict(a.state_dict())
    compile_model(b, backend="eager")
    for seed, lengths in ((4, [20, 44]), (5, [64])):
        tokens, doc, pos = packed(lengths, seed=seed)
        for m in (a, b):
            m.zero_grad()
            m(tokens, pos, DenseDocumentAttention(doc)).logsumexp(-1).sum().backward()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad)
