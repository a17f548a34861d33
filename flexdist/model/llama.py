"""A Llama-style decoder for packed documents: RMSNorm, RoPE on positions-within-document, SwiGLU, GQA.

Attention is not hard-wired: ``forward(tokens, positions, attention)`` takes a callable
``attention(q, k, v) -> out`` on ``[B, H, S, D]`` tensors (``Hq`` a multiple of ``Hkv``). The training loop
builds it once per batch — the flexdist kernel with a document BlockMask on one device
(:class:`flexdist.model.attention.LocalDocumentAttention`), or the context-parallel op with the batch's
plan (:class:`flexdist.model.attention.ContextParallelDocumentAttention`) — and every layer reuses it. That
keeps the model free of distributed code and lets benchmarks swap in torch's flex_attention or SDPA.

``positions`` are given, not implied by the token index: in a packed window they restart at 0 in every
document, and under context parallelism a rank's tokens are a permutation of the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LlamaConfig:
    """Shape of the model. ``ffn_hidden_dim`` is the SwiGLU inner width (Llama: ~8/3·dim, rounded)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads} (GQA)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim dim/n_heads = {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _acc(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, so a ``.double()`` model is exact enough for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _acc(x)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[B, S, 1, head_dim/2]`` for integer ``positions [B, S]`` (angles in fp32, or fp64
    when ``dtype`` is fp64)."""
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=adt) / head_dim))
    angles = positions.to(adt)[..., None] * inv_freq
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` by position: pairs (x[i], x[i + D/2]) rotate by angle pos·θ_i (fp32)."""
    x1, x2 = _acc(x).chunk(2, dim=-1)
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class GQAttention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` key/value heads; the attention op itself is passed in."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections + RoPE, ``[B, H, S, D]`` (separate so it can be compiled without the attention op)."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        B, S, _ = x.shape
        out = attention(*self.qkv(x, cos, sin))
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + ffn(norm(h))``."""

    def __init__(self, layer_id: int, cfg: LlamaConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = GQAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: Attention,
        checkpointing: str = "none",
    ) -> torch.Tensor:
        """The block; ``checkpointing="selective"`` recomputes everything but the attention op in backward.

        Selective: two checkpointed regions (norm + Q/K/V + RoPE before, output projection + residual +
        feed-forward after) around an attention call that is *not* checkpointed, so its own autograd node keeps
        what its backward needs (Q, K, V, output, LSE) and the recomputed forward never runs the attention —
        under context parallelism that would be the whole ring again. ``"full"`` is applied by the caller
        (:meth:`Llama.forward` checkpoints the whole block, attention included)."""
        if checkpointing == "selective" and torch.is_grad_enabled():
            q, k, v = checkpoint(self._pre_attention, x, cos, sin, use_reentrant=False)
            out = attention(q, k, v)
            return checkpoint(self._post_attention, x, out, use_reentrant=False)
        return self._post_attention(x, attention(*self._pre_attention(x, cos, sin)))

    def _pre_attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attention.qkv(self.attention_norm(x), cos, sin)

    def _post_attention(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        h = x + self.attention.wo(out.transpose(1, 2).reshape(B, S, -1))
        return h + self.feed_forward(self.ffn_norm(h))


#: ``Llama.activation_checkpointing`` values; booleans are accepted too (True = "selective", False = "none").
CHECKPOINTING_MODES = ("none", "selective", "full")


def checkpointing_mode(value: bool | str | None) -> str:
    """Normalise an activation-checkpointing setting to one of :data:`CHECKPOINTING_MODES`.

    ``True`` means "selective" (recompute everything but attention: never re-runs a CP ring), ``False`` / None
    "none"; strings are case-insensitive ("true" / "false" as written by configs that used to hold a bool)."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "selective"
    if isinstance(value, str):
        v = value.strip().lower()
        v = {"true": "selective", "false": "none"}.get(v, v)
        if v in CHECKPOINTING_MODES:
            return v
    raise ValueError(
        f"activation_checkpointing must be one of {CHECKPOINTING_MODES} (or a bool: true = selective), "
        f"got {value!r}"
    )


class Llama(nn.Module):
    """The decoder. ``forward(tokens [B,S], positions [B,S], attention) -> logits [B,S,vocab]`` (fp32)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        #: "none", "selective" (recompute each block in backward except its attention op, whose output and
        #: LSE stay saved: a CP ring never runs twice) or "full" (recompute whole blocks, attention included);
        #: True / False mean "selective" / "none"
        self.activation_checkpointing: bool | str = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Llama/torchtitan-style init: std ``init_std`` for inputs of each sub-layer, depth-scaled
        ``init_std / sqrt(2 (layer_id + 1))`` for the projections that write into the residual stream, unit
        normal embeddings (``init_std`` when tied to the output), output ``dim**-0.5`` truncated at 3σ."""
        std = self.cfg.init_std

        def tn(w: torch.Tensor, s: float) -> None:
            nn.init.trunc_normal_(w, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=generator)

        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, std=std, generator=generator)
        else:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0, generator=generator)
            tn(self.output.weight, self.cfg.dim**-0.5)
        for layer in self.layers:
            depth_std = std / math.sqrt(2 * (layer.layer_id + 1))
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1):
                tn(lin.weight, std)
            for lin in (layer.attention.wo, layer.feed_forward.w2, layer.feed_forward.w3):
                tn(lin.weight, depth_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        if tokens.shape != positions.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must match"
            )
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, _acc(h).dtype)
        mode = checkpointing_mode(self.activation_checkpointing)
        for layer in self.layers:
            if mode == "full" and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, attention, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attention, mode)
        return _acc(self.output(self.norm(h)))

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Parameter count (a tied output matrix counted once)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n


def compile_model(model: Llama, **compile_kwargs) -> Llama:
    """``torch.compile`` everything of every block except the attention op itself (in place).

    The attention callable changes every batch (it carries the batch's BlockMask or CP plan), and the kernel
    is already a fused Triton kernel; compiling around it would guard on a new object each step and recompile.
    So the compiled regions are the Q/K/V projections + RoPE, the norms, and the SwiGLU feed-forward.
    """
    for layer in model.layers:
        layer.attention.qkv = torch.compile(layer.attention.qkv, **compile_kwargs)
        for module in (layer.attention_norm, layer.ffn_norm, layer.feed_forward):
            module.compile(**compile_kwargs)
    return model


def flops_per_token(cfg: LlamaConfig, attn_pairs_per_token: float) -> float:
    """Training FLOPs per token (forward + backward = 3× forward), for MFU.

    Matmuls: ``6 ×`` the parameters a token is multiplied with (every linear layer and the output; not the
    embedding lookup). Attention: per layer and head, ``QKᵀ`` and ``PV`` cost ``2·D`` each per visible
    (query, key) pair, so ``12 · n_layers · n_heads · head_dim · attn_pairs_per_token`` — pass the batch's
    real number of unmasked pairs per token (document-causal packs see far fewer than ``seq_len / 2``).
    """
    d, L, hd = cfg.dim, cfg.n_layers, cfg.head_dim
    per_layer = d * (cfg.n_heads * hd) * 2 + d * (cfg.n_kv_heads * hd) * 2 + 3 * d * cfg.ffn_hidden_dim
    matmul_params = L * per_layer + d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * L * cfg.n_heads * hd * attn_pairs_per_token


def document_causal_pairs(doc_ids: torch.Tensor) -> int:
    """Number of visible (query, key) pairs of a document-causal mask: Σ over documents n(n+1)/2.

    ``doc_ids [B, S]`` (negative = padding, which sees nothing). Documents are runs of equal ids per row.
    """
    total = 0
    for row in doc_ids:
        valid = row[row >= 0]
        if valid.numel() == 0:
            continue
        _, counts = torch.unique_consecutive(valid, return_counts=True)
        total += int((counts * (counts + 1) // 2).sum())
    return total
