"""The analysis helpers behind the profiles: bench/trace_timeline.py (compute / NCCL busy time and their
overlap from a chrome trace) and bench/model_tail.py (the forward grid's tail under a launch order)."""

from __future__ import annotations

import os
import sys

import pytest
from test_train import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))

from trace_timeline import format_summary, summarize


def _k(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summarize_busy_overlap_and_idle() -> None:
    trace = {
        "traceEvents": [
            _k("_dkdv_kernel", 0, 100),
            _k("_dq_kernel", 50, 100),  # overlaps the first: compute union 0..150
            _k("ncclDevKernel_SendRecv", 120, 80),  # 120..200: overlaps compute for 30
            _k("_dq_kernel", 250, 50),  # idle 150..250 on compute
            _k("Memcpy DtoD", 300, 10, cat="gpu_memcpy"),
            {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1000},  # host: ignored
        ]
    }
    s = summarize(trace)
    assert s["span_us"] == pytest.approx(310)
    assert s["compute_busy_us"] == pytest.approx(150 + 50 + 10)
    assert s["comm_busy_us"] == pytest.approx(80)
    assert s["overlap_us"] == pytest.approx(30)
    assert s["compute_idle_us"] == pytest.approx(100)
    dq = s["kernels"]["_dq_kernel"]
    assert dq["calls"] == 2 and dq["us"] == pytest.approx(150) and dq["us_beside_nccl"] == pytest.approx(30)
    assert s["kernels"]["_dkdv_kernel"]["us_beside_nccl"] == pytest.approx(0)
    assert next(iter(s["kernels"])) == "_dq_kernel"  # longest first
    assert "overlap 30" in format_summary("bwd", s)


def test_summarize_empty_trace() -> None:
    s = summarize({"traceEvents": []})
    assert s["span_us"] == 0 and s["compute_busy_us"] == 0 and s["kernels"] == {}


def test_tail_model_list_scheduling() -> None:
    """bench/model_tail.py: greedy list scheduling in launch order, and the head-group launch order."""
    import torch
    from model_tail import busy_fraction, makespan

    assert makespan([3, 1, 1, 1], 2) == 3  # 3 | 1+1+1
    assert makespan([1, 1, 1, 3], 2) == 4  # the long one started last
    tiles = torch.tensor([3, 1])
    # two heads, two slots: one head at a time runs 3,1 then 3,1 -> slots end at 3+1 and 1+3: makespan 4;
    # both heads together start the two 3s first -> 3+1, 3+1: also 4, busy 1.0
    assert busy_fraction(tiles, 2, 2, 2) == (1.0, 3, 4.0)
    # tiles 6,1,1 of two heads on three slots: by head the second 6 starts after a 1 (makespan 7); together
    # both 6s start first (makespan 6); the work per slot is 16 / 3 either way
    tiles = torch.tensor([6, 1, 1])
    f1, mx, per = busy_fraction(tiles, 2, 3, 1)
    f2, _, _ = busy_fraction(tiles, 2, 3, 2)
    assert mx == 6 and per == pytest.approx(16 / 3)
    assert f1 == pytest.approx(16 / 3 / 7) and f2 == pytest.approx(16 / 3 / 6)


def test_allgather_pipeline_replay() -> None:
    """bench/bench_cp_sim.py replays the pipelined all-gather as flexdist.cp.allgather issues it."""
    from bench_cp_sim import replay_backward, replay_forward

    # one chunk: pack, the exposed gather, then the slowest rank's kernel
    assert replay_forward([[1.0, 2.0]], [0.5], 0.1) == pytest.approx(2.6)
    # two chunks, the second gather hidden behind the first chunk's kernel
    assert replay_forward([[1.0, 1.0], [1.0, 1.0]], [0.2, 0.5], 0.0) == pytest.approx(2.2)
    # ... and not hidden: the second chunk waits for its gather
    assert replay_forward([[1.0, 1.0], [1.0, 1.0]], [0.2, 3.0], 0.0) == pytest.approx(4.2)
    # ranks only meet at the collectives: 1+2 and 2+1 end together at 3 (a per-chunk barrier would give 4)
    assert replay_forward([[1.0, 2.0], [2.0, 1.0]], [0.0, 0.0], 0.0) == pytest.approx(3.0)
    # a gather waits for the kernel enqueued before its post on every rank (chunk c-1): with a 5 s first
    # chunk on one rank, gather 2 cannot start before 5 even though the link is free
    assert replay_forward([[5.0, 0.1], [0.1, 0.1], [0.1, 0.1]], [0.0, 0.0, 1.0], 0.0) == pytest.approx(6.1)
    # backward, one chunk: the reduce-scatter starts after dK/dV and runs beside dQ
    assert replay_backward([[1.0]], [[2.0]], [0.5], [1.5], 0.0, 0.1) == pytest.approx(3.6)
    assert replay_backward([[1.0]], [[2.0]], [0.5], [3.0], 0.0, 0.1) == pytest.approx(4.6)
    # two chunks: G0 0.5 | dkdv0 0.5..1.5, RS0 after G1 (0.5..0.7) and dkdv0: 1.5..2.5 | dq0 1.5..3.5 |
    # dkdv1 3.5..4.5, RS1 4.5..5.5 | dq1 4.5..6.5
    got = replay_backward([[1.0], [1.0]], [[2.0], [2.0]], [0.5, 0.2], [1.0, 1.0], 0.0, 0.0)
    assert got == pytest.approx(6.5)
    # the other chunks are packed beside gather 0: hidden while shorter than it, exposed past it
    assert replay_forward([[1.0]], [0.5], 0.1, pack_rest=0.2) == pytest.approx(1.6)
    assert replay_forward([[1.0]], [0.5], 0.1, pack_rest=1.0) == pytest.approx(2.1)
    # local_first: the own-shard call runs beside gather 0 and hides it (0.1 + max(0.8, 0.5) + 1.0) ...
    assert replay_forward([[1.0, 1.0]], [0.5], 0.1, local=[0.8, 0.8]) == pytest.approx(1.9)
    # ... or part of it (0.1 + 0.5, local 0.2 shorter than the gather)
    assert replay_forward([[1.0, 1.0]], [0.5], 0.1, local=[0.2, 0.2]) == pytest.approx(1.6)
    # gather 1 is posted after the local call: it cannot start before the slowest rank's local call ends
    # (2.0), so chunk 1 waits until 2.0 + 1.5 = 3.5 although chunk 0 ended at 3.0 on every rank
    assert replay_forward([[1.0, 1.0], [1.0, 1.0]], [0.1, 1.5], 0.0, local=[2.0, 0.1]) == pytest.approx(4.5)


def test_fit_partial_weight_recovers_a_known_weight(tmp_path) -> None:
    """bench/fit_partial_weight.py: per-rank times built as a·full + b·partial give back b / a exactly."""
    import json

    import numpy as np
    from bench_cp_sim import layout
    from bench_planner import make_pack
    from fit_partial_weight import _cost, fit

    from flexdist.cp import balance as bal
    from flexdist.cp.plan import _pair_work_tokens

    args = dict(
        hq=8, hkv=2, block_size=64, tflops_model=400.0, link_gbs=450.0, mean_doc=300, dist="mixture", seed=0
    )
    N, L = 4, 512
    rows = []
    for balance in ("document", "document@gather"):
        doc = make_pack(N * L, args["mean_doc"], args["dist"], args["seed"])
        perm = layout(balance.split("@")[0], doc, N, 64, _cost(balance, args))
        lo, hi = bal.visible_intervals(doc, True, None)
        full = _pair_work_tokens(perm, N, lo, hi, 64, 0.0)[0].sum(1)
        part = _pair_work_tokens(perm, N, lo, hi, 64, 1.0)[0].sum(1) - full
        assert part.std() > 0 and full.std() > 0  # the fit is determined
        ms = lambda a, b: [(a * full + b * part).tolist()]  # one chunk, every rank
        rows.append(
            dict(
                N=N, tokens_per_rank=L, balance=balance, strategy="allgather/hc2",
                chunk_fwd_ms=ms(1.0, 1.5), chunk_dkdv_ms=ms(2.0, 2.0), chunk_dq_ms=ms(1.0, 2.5),
            )
        )  # fmt: skip
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"meta": {"args": args}, "rows": rows}))
    for r in fit(str(path)):
        assert np.isclose(r["w_fwd"], 1.5) and np.isclose(r["w_dkdv"], 1.0) and np.isclose(r["w_dq"], 2.5), r
        assert np.isclose(r["w_all"], 6.0 / 4.0), r


def test_cp_sim_rows_carry_their_bracketing_baselines(tmp_path) -> None:
    """bench_cp_sim --quick: every row's bracketed efficiency is the mean of the one-GPU baselines timed just
    before and just after its calls over N × its predicted time, and the brackets chain (a row's "before" is
    the previous row's "after")."""
    import json
    import subprocess

    out = tmp_path / "sim.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "bench", "bench_cp_sim.py"),
        "--quick",
        "--strategies",
        "allgather",
    ]
    cmd += ["--balances", "contiguous", "document", "--head-chunks", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4  # N = 2 and 4 (--quick), two balances each
    prev = {}
    for r in rows:
        for w in ("fwd", "bwd"):
            b0, b1 = r[f"single_{w}_bracket_s"]
            assert r[f"eff_{w}_bracketed"] == pytest.approx((b0 + b1) / 2 / (r["N"] * r[f"pred_{w}_s"]))
            if r["N"] in prev:
                assert b0 == prev[r["N"]][w]
            else:  # a new N starts from its first baseline
                assert b0 == r[f"single_{w}_s"]
        prev[r["N"]] = {w: r[f"single_{w}_bracket_s"][1] for w in ("fwd", "bwd")}
