"""``bench/bench_plan_time.py --quick`` (CPU): every phase is timed, plans are deterministic across repetitions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_train import ROOT


def test_bench_plan_time_quick_smoke(tmp_path) -> None:
    out = tmp_path / "plan_time.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/bench_plan_time.py", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["S"], r["N"]) for r in rows] == [(4096, 2), (4096, 4)]
    for r in rows:
        phases = [k for k in r if k.startswith(("layout_", "pair_work_"))]
        assert len(phases) == 6, r  # contiguous, zigzag, document: layout and pair work each
        assert r["total"] > 0 and r["block_work"] > 0 and len(r["fingerprint"]) == 16, r
