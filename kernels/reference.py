"""Dense, materialised fp32 reference of flex attention: the ground truth for tests and the CPU path.

Same signatures as the Triton entry points. It builds the S×S score matrix, so it is for small shapes only.
Block semantics follow torch's FlexAttention exactly: keys in *full* blocks are visible without evaluating
``mask_mod``; keys in *partial* blocks are visible where ``mask_mod`` says so; every other key is masked.
A query row with no visible key gets output 0, LSE −inf and zero gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .validation import AttnShape, check_block_mask, check_index_map, check_qkv

ScoreMod = Callable[..., torch.Tensor]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp32, or fp64 when the inputs already are (for gradient checks)."""
    return t if t.dtype == torch.float64 else t.float()


def _blocks_to_dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(num [Bm,Hm,Qb], idx [Bm,Hm,Qb,K]) -> bool [Bm,Hm,Qb,K] block-level occupancy."""
    K = idx.shape[-1]
    valid = torch.arange(K, device=idx.device) < num[..., None]
    dense = torch.zeros(*idx.shape[:-1], K + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, torch.where(valid, idx.long(), K), True)
    return dense[..., :K]


def _eval_mod_dense(fn: Callable, args: Sequence[torch.Tensor]) -> torch.Tensor:
    """Evaluate a torch-style mask/score mod on broadcast index grids (vmap when broadcasting fails)."""
    try:
        return fn(*args)
    except Exception:
        # Some mods index with Python control flow that only works per element; torch itself uses vmap.
        from torch.nn.attention.flex_attention import create_mask

        if len(args) != 4:
            raise
        b, h, qi, ki = args
        return create_mask(fn, b.shape[0], h.shape[1], qi.shape[2], ki.shape[3], device=qi.device)


def dense_mask(block_mask, shape: AttnShape, device: torch.device) -> torch.Tensor | None:
    """Element mask ``[Bm, Hm, Sq, Skv]`` (Bm ∈ {1, B}, Hm ∈ {1, Hq}) implied by a BlockMask, or None."""
    if block_mask is None:
        return None
    check_block_mask(block_mask, shape)
    QBS, KBS = block_mask.BLOCK_SIZE
    partial = _blocks_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices)
    if block_mask.full_kv_num_blocks is not None:
        full = _blocks_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    else:
        full = torch.zeros_like(partial)

    def expand(blk: torch.Tensor) -> torch.Tensor:
        e = blk.repeat_interleave(QBS, dim=2).repeat_interleave(KBS, dim=3)
        return e[:, :, : shape.Sq, : shape.Skv]

    Bm, Hm = partial.shape[:2]
    b = torch.arange(Bm, device=device).view(-1, 1, 1, 1)
    h = torch.arange(Hm, device=device).view(1, -1, 1, 1)
    qi = torch.arange(shape.Sq, device=device).view(1, 1, -1, 1)
    ki = torch.arange(shape.Skv, device=device).view(1, 1, 1, -1)
    elem = _eval_mod_dense(block_mask.mask_mod, (b, h, qi, ki)).to(torch.bool)
    elem = elem.expand(Bm, Hm, shape.Sq, shape.Skv)
    return expand(full.to(device)) | (expand(partial.to(device)) & elem)


def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    shape: AttnShape,
    scale: float,
    score_mod: ScoreMod | None,
    mask: torch.Tensor | None,
    q_global_idx: torch.Tensor | None,
    kv_global_idx: torch.Tensor | None,
    track_raw: bool = False,
):
    """fp32 scores after scale, score_mod and mask; optionally the raw (pre-mod) leaf for autograd."""
    kx = _acc(k).repeat_interleave(shape.groups, dim=1)
    raw = torch.einsum("bhqd,bhkd->bhqk", _acc(q), kx) * scale
    if track_raw:
        raw = raw.detach().requires_grad_(True)
    s = raw
    if score_mod is not None:
        dev = q.device
        qi = torch.arange(shape.Sq, device=dev) if q_global_idx is None else q_global_idx.long()
        ki = torch.arange(shape.Skv, device=dev) if kv_global_idx is None else kv_global_idx.long()
        b = torch.arange(shape.B, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(shape.Hq, device=dev).view(1, -1, 1, 1)
        s = score_mod(s, b, h, qi.view(1, 1, -1, 1), ki.view(1, 1, 1, -1))
        s = s.expand(shape.B, shape.Hq, shape.Sq, shape.Skv).to(raw.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, raw


def _prepare(q, k, v, block_mask, scale, enable_gqa, q_global_idx, kv_global_idx):
    shape = check_qkv(q, k, v, enable_gqa)
    check_index_map("q_global_idx", q_global_idx, shape.Sq, q.device)
    check_index_map("kv_global_idx", kv_global_idx, shape.Skv, q.device)
    scale = shape.D**-0.5 if scale is None else float(scale)
    return shape, scale, dense_mask(block_mask, shape, q.device)


def reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_global_idx: torch.Tensor | None = None,
    kv_global_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B,Hq,Sq,Dv] in q.dtype, lse [B,Hq,Sq] fp32, natural log)``; not differentiable."""
    with torch.no_grad():
        shape, scale, mask = _prepare(q, k, v, block_mask, scale, enable_gqa, q_global_idx, kv_global_idx)
        s, _ = _scores(q, k, shape, scale, score_mod, mask, q_global_idx, kv_global_idx)
        out, lse = _softmax_av(s, v, shape)
    return out.to(q.dtype), lse


def _softmax_av(s: torch.Tensor, v: torch.Tensor, shape: AttnShape):
    """Numerically safe softmax(s)·v and LSE; rows with nothing visible give 0 and −inf, never NaN."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    vx = _acc(v).repeat_interleave(shape.groups, dim=1)
    out = torch.einsum("bhqk,bhkd->bhqd", p, vx) / l_safe
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l_safe)).squeeze(-1)
    return out, lse


def reference_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    block_mask=None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    delta: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
    q_global_idx: torch.Tensor | None = None,
    kv_global_idx: torch.Tensor | None = None,
    score_mod_grads: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one attention call given the *global* ``lse`` (and ``out``) of the merged result.

    ``delta = rowsum(dout · out) − dlse`` unless given. Under ring attention each step calls this with the
    final merged out/lse, and the per-step dq / dk / dv sum to the full gradients. If ``score_mod`` has
    learnable tensors (``score_mod.tensors()``), their gradients are *added* into ``score_mod_grads``.
    """
    shape, scale, mask = _prepare(q, k, v, block_mask, scale, enable_gqa, q_global_idx, kv_global_idx)
    if delta is None:
        delta = (_acc(dout) * _acc(out)).sum(-1)
        if dlse is not None:
            delta = delta - _acc(dlse)
    params = tuple(score_mod.tensors()) if score_mod is not None and hasattr(score_mod, "tensors") else ()
    # Without a score mod d(score)/d(raw score) is the identity on visible entries (masked ones have p = 0),
    # so dS is the raw-score gradient: no autograd, which also makes this usable inside custom ops (their
    # implementations run below the autograd dispatch key, where torch.autograd.grad records nothing).
    track = score_mod is not None
    with torch.enable_grad() if track else torch.no_grad():
        s, raw = _scores(q, k, shape, scale, score_mod, mask, q_global_idx, kv_global_idx, track_raw=track)
        lse_safe = _acc(torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
        p = torch.exp(s.detach() - lse_safe[..., None])  # masked entries: exp(-inf) = 0
        vx = _acc(v).repeat_interleave(shape.groups, dim=1)
        dp = torch.einsum("bhqd,bhkd->bhqk", _acc(dout), vx)
        ds = p * (dp - _acc(delta)[..., None])
        if track:
            wanted = [raw, *[t for t in params if t.requires_grad]]
            grads = torch.autograd.grad(s, wanted, grad_outputs=ds, allow_unused=True)
        else:
            grads = (ds,)
    draw = grads[0]
    kx = _acc(k).repeat_interleave(shape.groups, dim=1)
    dq = torch.einsum("bhqk,bhkd->bhqd", draw, kx) * scale
    dkx = torch.einsum("bhqk,bhqd->bhkd", draw, _acc(q)) * scale
    dvx = torch.einsum("bhqk,bhqd->bhkd", p, _acc(dout))
    G = shape.groups
    dk = dkx.view(shape.B, shape.Hkv, G, shape.Skv, shape.D).sum(2)
    dv = dvx.view(shape.B, shape.Hkv, G, shape.Skv, shape.Dv).sum(2)
    if score_mod_grads is not None:
        it = iter(grads[1:])
        for acc, t in zip(score_mod_grads, params, strict=True):
            if t.requires_grad:
                g = next(it)
                if g is not None:
                    acc.add_(g.to(acc.dtype))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def flex_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: ScoreMod | None = None,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
):
    """Differentiable dense fp32 flex attention (autograd through plain torch ops)."""
    shape, scale_, mask = _prepare(q, k, v, block_mask, scale, enable_gqa, None, None)
    s, _ = _scores(q, k, shape, scale_, score_mod, mask, None, None)
    out, lse = _softmax_av(s, v, shape)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def merge_by_lse(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a partial result ``(out, lse)`` over some keys into a running one over other keys (new tensors).

    ``lse_new = m + log(exp(lse_acc - m) + exp(lse - m))`` with ``m`` the row max (0 where both are −inf, so
    never ``-inf - -inf``); each output is weighted by ``exp(lse_i - lse_new)``. A row empty on both sides
    keeps output 0 and LSE −inf. Computed in ``out_acc``'s dtype. The Triton kernel's ``out_acc=`` mode
    computes the same formula in its epilogue.
    """
    lse = lse.to(lse_acc.dtype)
    m = torch.maximum(lse_acc, lse)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.exp(lse_acc - m)
    wb = torch.exp(lse - m)
    s = wa + wb
    new_lse = m + torch.log(s)  # -inf where both are empty
    safe = torch.where(s > 0, s, torch.ones_like(s))
    merged = out_acc * (wa / safe)[..., None] + out.to(out_acc.dtype) * (wb / safe)[..., None]
    return merged, new_lse
