"""Activation checkpointing never re-runs the attention op (the CP ring) unless asked for full-block recompute.

The model runs with the context-parallel attention op (``make_cp_plan`` + ``ContextParallelDocumentAttention``)
at cp = 1 (one process, a ring of one) and cp = 2 (two spawned gloo ranks). ``ring_forward`` is wrapped with
counters: how many times the ring runs and how many kernel calls (ring steps) it makes per training step.
Selective checkpointing must run it exactly as often as no checkpointing (once per layer), full-block
checkpointing twice as often; losses and every gradient (fp64) must equal the un-checkpointed model's.
"""

from __future__ import annotations

import importlib
import traceback

import numpy as np
import pytest
import torch
from spawn import init_group, run_ranks

from flexdist.model import checkpointing_mode

N_LAYERS = 2


def _run_modes(group) -> dict[str, dict]:
    """Loss, gradients (summed over the group) and ring / kernel-step counts for each checkpointing mode."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from flexdist.data import IGNORE_INDEX, pack_segments
    from flexdist.model import (
        AttentionTimer,
        ContextParallelDocumentAttention,
        Llama,
        LlamaConfig,
        make_cp_plan,
    )

    # the module (``flexdist.cp.attention`` the attribute is the function of the same name)
    cpa = importlib.import_module("flexdist.cp.attention")
    counts = {"ring": 0, "kernel": 0}
    original = cpa.ring_forward

    def counting_ring_forward(q, k, v, plan, masks, fwd, kw):
        counts["ring"] += 1

        def counting_fwd(*args, **kwargs):
            counts["kernel"] += 1
            return fwd(*args, **kwargs)

        return original(q, k, v, plan, masks, counting_fwd, kw)

    cpa.ring_forward = counting_ring_forward
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64, dim=32, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, ffn_hidden_dim=48
        )
        base = Llama(cfg).double()
        g = torch.Generator().manual_seed(1)
        row = pack_segments([torch.randint(0, 64, (n,), generator=g).numpy() for n in (70, 33, 90, 63)])
        batch = {k: torch.from_numpy(np.stack([row[k]])) for k in row}
        n_valid = int((batch["labels"] != IGNORE_INDEX).sum())
        plan = make_cp_plan(batch["doc_ids"], group, balance="zigzag", block_size=32, backend="reference")
        tokens, labels = plan.shard(batch["tokens"], 1), plan.shard(batch["labels"], 1)
        out = {}
        for mode in ("none", "selective", "full"):
            model = Llama(cfg).double()
            model.load_state_dict(base.state_dict())
            model.activation_checkpointing = mode
            counts.update(ring=0, kernel=0)
            timer = AttentionTimer()
            logits = model(tokens, plan.positions, ContextParallelDocumentAttention(plan, timer=timer))
            loss = (
                F.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                / n_valid
            )
            fwd_counts = dict(counts)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            total = loss.detach().clone()
            if dist.is_initialized():
                dist.all_reduce(total)
                for gr in grads.values():
                    dist.all_reduce(gr)
            out[mode] = {
                "loss": total,
                "grads": grads,
                "fwd": fwd_counts,
                "step": dict(counts),
                "timer": (timer.calls, timer.total_s()),
                "world": plan.world_size,
            }
        return out
    finally:
        cpa.ring_forward = original


def _check(out: dict[str, dict]) -> None:
    N = out["none"]["world"]
    ref = out["none"]
    # without checkpointing: one ring per layer, N kernel steps at most per ring (empty steps are skipped)
    assert ref["step"]["ring"] == N_LAYERS, ref["step"]
    assert ref["step"] == ref["fwd"], "backward must not run the forward ring"
    assert 1 <= ref["step"]["kernel"] <= N_LAYERS * N
    # selective: backward's recompute never runs the ring; full: every layer's ring runs again in backward
    assert out["selective"]["step"] == ref["step"], (out["selective"]["step"], ref["step"])
    assert out["full"]["fwd"] == ref["fwd"]
    assert out["full"]["step"] == {k: 2 * v for k, v in ref["step"].items()}, out["full"]["step"]
    # the trainer's attention timer sees the same calls (it wraps the attention callable the model runs)
    for mode, rings in (("none", N_LAYERS), ("selective", N_LAYERS), ("full", 2 * N_LAYERS)):
        calls, seconds = out[mode]["timer"]
        assert calls == rings and seconds > 0, (mode, out[mode]["timer"])
    for mode in ("selective", "full"):
        torch.testing.assert_close(out[mode]["loss"], ref["loss"], rtol=1e-12, atol=1e-12)
        for name, g in ref["grads"].items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(
                out[mode]["grads"][name], g, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{mode} {n}: {m}"
            )


def test_checkpointing_mode_values() -> None:
    assert [checkpointing_mode(v) for v in (False, None, True, "FULL", "selective", "true", "false")] == [
        "none",
        "none",
        "selective",
        "full",
        "selective",
        "selective",
        "none",
    ]
    with pytest.raises(ValueError, match=r"activation_checkpointing must be one of.*'blocks'"):
        checkpointing_mode("blocks")


def test_selective_checkpointing_does_not_rerun_attention_cp1() -> None:
    _check(_run_modes(None))


def _worker(rank: int, world: int, init_method: str, results) -> None:
    import torch.distributed as dist

    try:
        init_group("gloo", rank, world, init_method)
        torch.set_num_threads(1)
        out = _run_modes(dist.group.WORLD)
        _check(out)
        assert out["none"]["world"] == world
        results.put((rank, "ok", ""))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
def test_selective_checkpointing_does_not_rerun_the_ring_cp2() -> None:
    run_ranks(_worker, 2)


def test_config_accepts_modes_and_old_booleans_and_names_bad_values() -> None:
    from test_config import make

    from train.config import validate

    for value, mode in (
        ("true", "selective"),
        ("false", "none"),
        ("full", "full"),
        ("selective", "selective"),
    ):
        cfg = make("trainer.run_dir=/tmp/x", f"trainer.activation_checkpointing={value}")
        validate(cfg, world_size=1)
        assert checkpointing_mode(cfg.trainer.activation_checkpointing) == mode
    assert make("trainer.run_dir=/tmp/x", "trainer=long").trainer.activation_checkpointing == "selective"
    cfg = make("trainer.run_dir=/tmp/x", "trainer.activation_checkpointing=blocks")
    with pytest.raises(ValueError, match=r"trainer\.activation_checkpointing must be one of .*got 'blocks'"):
        validate(cfg, world_size=1)
