"""Launch an autotuned Triton kernel with its tuned config directly, skipping the autotuner's per-call work.

``triton.autotune``'s ``run`` rebuilds two dicts of all ~70 arguments and the tuning key (with a ``hasattr``
per argument) on every call, then calls the kernel's own launcher. On the eager path that costs tens of µs
per launch (session 6's cProfile of an 8k document-masked fwd + bwd put ``Autotuner.run``'s own time at
~87 µs per launch on that host), and the small calls of context parallelism are host-bound: every CP rank
issues several per layer.

:func:`launch_tuned` computes the autotuner's key the way its ``run`` does (the ``key`` arguments' values, then
the dtype of every argument that has one, in argument order) and, when the autotuner already holds a config
for it, launches the wrapped kernel with that config: the same kernel, config and grid as the autotuner's
launch. A key it has not tuned (or a Triton whose autotuner lacks these attributes) goes through the
autotuner, which tunes and caches as before. So the choice of config is always the autotuner's own.

Eager launches only: under ``torch.compile`` the kernels go through ``wrap_triton`` with the autotuner itself.
"""

from __future__ import annotations

from typing import Any

# False: every launch through the autotuner (bench_host.py times both paths in one process)
ENABLED = True
_POSITIONS: dict[int, tuple] = {}  # id(tuner) -> (tuner, key names) (the tuner kept so the id stays unique)


def tuned_key(tuner: Any, args: tuple, kwargs: dict) -> tuple:
    """The key ``tuner.run(*args, **kwargs)`` would look its config up by (Triton 3.6–3.9)."""
    entry = _POSITIONS.get(id(tuner))
    if entry is None:
        entry = _POSITIONS[id(tuner)] = (tuner, tuple(tuner.keys), frozenset(tuner.arg_names))
    _, keys, names = entry
    all_args = dict(zip(tuner.arg_names, args, strict=False))  # (constexprs come as keywords)
    all_args.update((k, v) for k, v in kwargs.items() if k in names)
    key = [all_args[k] for k in keys if k in all_args]
    key += [str(a.dtype) for a in all_args.values() if hasattr(a, "dtype")]
    return tuple(key)


def launch_tuned(tuner: Any, grid: Any, *args: Any, **kwargs: Any) -> bool:
    """``tuner[grid](*args, **kwargs)``; through the cached config when there is one. Returns whether it was
    launched directly (``False``: through the autotuner)."""
    cache = getattr(tuner, "cache", None)
    if ENABLED and cache is not None and len(getattr(tuner, "configs", ())) > 1 and hasattr(tuner, "fn"):
        cfg = cache.get(tuned_key(tuner, args, kwargs))
        if cfg is not None and cfg.pre_hook is None:
            tuner.best_config = cfg  # what tuned_choices() and benchmark reports read
            tuner.fn[grid](*args, **kwargs, **cfg.all_kwargs())
            return True
    tuner[grid](*args, **kwargs)
    return False
