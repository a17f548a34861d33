"""The model under context parallelism: cp = 2 gives the single-device loss and every parameter's gradient.

Two spawned gloo ranks; each computes the full-sequence reference on its own (float64, dense reference
attention), then the CP version on its shard (``make_cp_plan`` + ``ContextParallelDocumentAttention``,
tokens/labels sharded by the plan, positions-within-document from the plan) with the loss normalised by the
global number of valid labels and gradients all-reduced — for every sharding and exchange strategy the planner offers.
"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from spawn import init_group, run_ranks

# every sharding with the ring, and every exchange strategy with the planner's choice of sharding
CASES = [(b, "ring", {}) for b in ("contiguous", "zigzag", "document", "auto")]
CASES += [("auto", s, {}) for s in ("allgather", "direct", "ulysses")]
# the pipelined all-gather with the first chunk's own keys first (the trainer's cp_head_chunks / cp_local_first)
CASES += [("document", "allgather", {"head_chunks": 2, "local_first": True})]
# the backward over its own chunks (cp_bwd_head_chunks; 2 K/V heads: one chunk against the forward's two)
CASES += [("document", "allgather", {"head_chunks": 2, "bwd_head_chunks": 1})]


def _worker(rank: int, world: int, init_method: str, results) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from flexdist.data import IGNORE_INDEX, pack_segments
    from flexdist.model import (
        ContextParallelDocumentAttention,
        Llama,
        LlamaConfig,
        LocalDocumentAttention,
        make_cp_plan,
    )

    try:
        init_group("gloo", rank, world, init_method)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96)
        model = Llama(cfg).double()
        # two packed windows: several documents of uneven lengths (one cut short), and one whole document
        g = torch.Generator().manual_seed(1)
        rows = [
            pack_segments([torch.randint(0, 256, (n,), generator=g).numpy() for n in lengths])
            for lengths in ([100, 37, 250, 1, 124], [512])
        ]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}

        def loss_sum(logits, labels):
            return F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )

        n_valid = int((batch["labels"] != IGNORE_INDEX).sum())
        ref_attn = LocalDocumentAttention(batch["doc_ids"], backend="reference", block_size=64)
        ref_loss = loss_sum(model(batch["tokens"], batch["positions"], ref_attn), batch["labels"]) / n_valid
        ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))

        for balance, strategy, extra in CASES:
            plan = make_cp_plan(
                batch["doc_ids"],
                dist.group.WORLD,
                balance=balance,
                strategy=strategy,
                block_size=64,
                backend="reference",
                **extra,
            )
            # make_cp_plan passes the all-gather's knobs through (None: the forward's chunks)
            assert plan.bwd_head_chunks == extra.get("bwd_head_chunks", plan.head_chunks), (extra, plan)
            tokens, labels = plan.shard(batch["tokens"], 1), plan.shard(batch["labels"], 1)
            assert tokens.shape == (2, 512 // world)
            # the plan's positions are the packed positions-within-document of this rank's tokens
            assert torch.equal(plan.positions.long(), plan.shard(batch["positions"], 1))
            logits = model(tokens, plan.positions, ContextParallelDocumentAttention(plan))
            local = loss_sum(logits, labels) / n_valid
            grads = torch.autograd.grad(local, list(model.parameters()))
            total = local.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-10, atol=1e-10)
            for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads, strict=True):
                g = g.clone()
                dist.all_reduce(g)
                torch.testing.assert_close(
                    g,
                    rg,
                    rtol=1e-8,
                    atol=1e-10,
                    msg=lambda m, n=name, b=balance, st=strategy, x=extra: f"{b}/{st} {x} {n}: {m}",
                )
        results.put((rank, "ok", ""))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
def test_cp2_model_loss_and_every_gradient_match_single_device() -> None:
    run_ranks(_worker, 2)
