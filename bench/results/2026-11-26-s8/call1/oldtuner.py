# One-off check (s8 call 1): does an ACCUM call through Triton's plain autotuner corrupt its accumulators?
import torch

from flexdist.kernels import flex_attention_backward, flex_attention_forward
from flexdist.kernels import triton_bwd as TB
from flexdist.kernels import triton_fwd as TF
from flexdist.masks import document_block_mask

S, Hq, Hkv, D = 4352, 4, 2, 64
g = torch.Generator().manual_seed(0)
q, dout = (torch.randn(1, Hq, S, D, generator=g).cuda().bfloat16() for _ in range(2))
k, v = (torch.randn(1, Hkv, S, D, generator=g).cuda().bfloat16() for _ in range(2))
bm = document_block_mask((torch.arange(S) // 1000).view(1, S).cuda(), block_size=128)
kw = dict(enable_gqa=True, backend="triton")
want_o, want_l = flex_attention_forward(q, k, v, bm, **kw)
dq_w, _, _ = flex_attention_backward(q, k, v, want_o, dout, want_l, bm, **kw)
for label, plain in (("plain tuner (before the fix)", True), ("restore_value tuner", False)):
    saved = (TF._fwd_kernel_tuned_accum, TB._dq_kernel_tuned_accum)
    if plain:
        TF._fwd_kernel_tuned_accum, TB._dq_kernel_tuned_accum = TF._fwd_kernel_tuned, TB._dq_kernel_tuned
    for t in (TF._fwd_kernel_tuned_accum, TB._dq_kernel_tuned_accum):
        t.cache.clear()
    o = torch.zeros(1, Hq, S, D, device="cuda")
    l = torch.full((1, Hq, S), float("-inf"), device="cuda")
    flex_attention_forward(q, k, v, bm, out_acc=o, lse_acc=l, **kw)
    dq = torch.zeros(q.shape, device="cuda")
    flex_attention_backward(q, k, v, want_o, dout, want_l, bm, dq_out=dq, which="dq", **kw)
    print(
        f"{label}: first accumulating call of a fresh key: max|out-want| {(o - want_o.float()).abs().max().item():.3e} "
        f"max|lse-want| {(l - want_l).abs().max().item():.3e} max|dq-want|/max|want| "
        f"{((dq - dq_w.float()).abs().max() / dq_w.float().abs().max()).item():.3e}",
        flush=True,
    )
    TF._fwd_kernel_tuned_accum, TB._dq_kernel_tuned_accum = saved
