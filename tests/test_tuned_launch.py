"""kernels/tuned_launch.py: an autotuned kernel launched with the autotuner's cached config, skipping its run.

A real ``triton.autotune`` object over a tiny kernel (under the interpreter on CPU; its benchmark function is
replaced by one that ranks the configs in a known order, since the interpreter has no timer). The first call
of a key tunes through the autotuner; later calls of that key go straight to the kernel with the config the
autotuner cached for it, found by recomputing the autotuner's own key; a new key tunes again.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from flexdist.kernels.tuned_launch import launch_tuned, tuned_key

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ranked_bench():
    """A do_bench that times the configs of each tuning 2.0, 1.0, 3.0, ... so the second config wins."""
    order = itertools.cycle([2.0, 1.0])

    def bench(fn, quantiles=None, **_):
        fn()
        t = next(order)
        return [t, t, t] if quantiles else t

    return bench


def _make_tuner():
    @triton.jit
    def axpb(X, Y, n, B: tl.constexpr, SCALE: tl.constexpr):
        o = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(Y + o, tl.load(X + o, mask=o < n) * SCALE + 1, mask=o < n)

    configs = [triton.Config({"B": 16}, num_warps=1), triton.Config({"B": 32}, num_warps=1)]
    return triton.autotune(configs=configs, key=["n"], do_bench=_ranked_bench())(axpb)


class _Spy:
    """Stands in for the tuner's wrapped kernel: records each direct launch's keyword arguments."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.fn[grid](*args, **kwargs)

        return launch


def test_direct_launch_uses_the_autotuners_cached_config() -> None:
    tuner = _make_tuner()
    spy = _Spy(tuner.fn)
    grid = lambda m: (triton.cdiv(100, m["B"]),)
    x = torch.arange(100.0, device=DEV)
    ys = [torch.full((100,), -7.0, device=DEV) for _ in range(3)]
    assert launch_tuned(tuner, grid, x, ys[0], 100, SCALE=2) is False  # first time: tuned by the autotuner
    key = tuned_key(tuner, (x, ys[0], 100), {"SCALE": 2})
    assert list(tuner.cache) == [key] and tuner.cache[key].kwargs == {"B": 32}, tuner.cache
    tuner.fn = spy
    assert launch_tuned(tuner, grid, x, ys[1], 100, SCALE=2) is True  # the same key: straight to the kernel
    assert len(spy.calls) == 1 and spy.calls[0]["B"] == 32 and spy.calls[0]["num_warps"] == 1, spy.calls
    assert tuner.best_config.kwargs == {"B": 32}
    for y in ys[:2]:
        assert torch.equal(y, x * 2 + 1)
    # a new key (n) is not in the cache: through the autotuner again, which tunes it
    tuner.fn = spy.fn
    assert launch_tuned(tuner, grid, x, ys[2], 64, SCALE=2) is False
    assert len(tuner.cache) == 2 and torch.equal(ys[2][:64], x[:64] * 2 + 1) and (ys[2][64:] == -7).all()


def test_key_matches_the_autotuners_for_dtypes_and_keyword_arguments() -> None:
    """The key holds the key arguments' values then every argument's dtype, as Autotuner.run builds it: a
    float64 input is a different key from a float32 one."""
    tuner = _make_tuner()
    grid = lambda m: (triton.cdiv(10, m["B"]),)
    for dtype in (torch.float32, torch.float64):
        x = torch.ones(10, dtype=dtype, device=DEV)
        assert launch_tuned(tuner, grid, x, torch.empty_like(x), 10, SCALE=3) is False
        assert tuned_key(tuner, (x, x, 10), {"SCALE": 3}) in tuner.cache
    assert len(tuner.cache) == 2 and {k[1:] for k in tuner.cache} == {
        ("torch.float32", "torch.float32"),
        ("torch.float64", "torch.float64"),
    }


@pytest.mark.gpu
def test_gpu_tuned_kernels_launch_directly_with_the_same_results() -> None:
    """On CUDA, the attention kernels above the autotuning size: the first forward / backward tunes through
    the autotuners, the second launches with the cached configs directly (tuned_launch.ENABLED) and gives
    bit-identical output, LSE and gradients (same kernels and tiles; the backward is deterministic), which
    also match the launches forced through the autotuner."""
    from flexdist.kernels import flex_attention_backward, flex_attention_forward, tuned_launch
    from flexdist.kernels.triton_bwd import _dkdv_kernel_tuned, _dq_kernel_tuned
    from flexdist.kernels.triton_fwd import _fwd_kernel_tuned
    from flexdist.masks import document_block_mask

    S, H, D = 8192, 4, 128
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, S, D, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
    doc = (torch.arange(S, device="cuda") // 3000)[None]  # three documents, one cut short
    bm = document_block_mask(doc, block_size=128)

    def run():  # (backend="triton": on a Hopper, "auto" runs this call's forward and backward in Gluon)
        out, lse = flex_attention_forward(q, k, v, bm, backend="triton")
        return (out, lse, *flex_attention_backward(q, k, v, out, do, lse, bm, backend="triton"))

    first = run()  # tunes (or finds the keys tuned by an earlier test)
    direct = []
    for tuner in (_fwd_kernel_tuned, _dkdv_kernel_tuned, _dq_kernel_tuned):
        orig = tuner.fn
        spy = _Spy(orig)
        tuner.fn = spy
        direct.append((tuner, orig, spy))
    try:
        second = run()
    finally:
        for tuner, orig, _ in direct:
            tuner.fn = orig
    assert all(len(spy.calls) == 1 for _, _, spy in direct), [len(s.calls) for _, _, s in direct]
    tuned_launch.ENABLED = False
    try:
        third = run()  # every launch through the autotuners' run
    finally:
        tuned_launch.ENABLED = True
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
