"""``bench/bench_host.py --quick`` (CPU, interpreter): every path runs and reports a host time per call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_train import ROOT


def test_bench_host_quick_smoke(tmp_path) -> None:
    out = tmp_path / "host.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "bench/bench_host.py", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    paths = [
        "flexdist forward",
        "flexdist forward, accumulate",
        "flexdist backward (raw)",
        "flexdist fwd+bwd (autograd)",
    ]
    # each path as shipped (direct tuned launches), then again with every launch through Triton's autotuner
    assert [r["path"] for r in rows] == paths + [f"{p} [autotuner]" for p in paths]
    assert [r["direct_tuned_launch"] for r in rows] == [True] * 4 + [False] * 4
    assert all(r["host_us"] > 0 and r["sync_us"] > 0 and r["gpu_us"] is None for r in rows), rows
