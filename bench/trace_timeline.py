"""GPU timeline of one profiled call, from a chrome trace written by ``torch.profiler``: how long the GPU was
busy computing, how long NCCL kernels ran, and how much of the two overlapped.

This is what separates a CP step's real time from the one-GPU simulation's prediction: the simulation runs
every rank's attention kernels alone on an idle GPU and models transfers as perfectly overlapped; the trace
shows the attention kernels' own durations while NCCL kernels share the SMs, the copies and reductions
around them, and the gaps where compute waits.
"""

from __future__ import annotations

import json
from collections import defaultdict


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length where two disjoint, sorted interval lists overlap."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        tot += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


def is_comm(name: str) -> bool:
    return "nccl" in name.lower()


def summarize(trace: dict) -> dict:
    """Timeline numbers (microseconds) over every GPU kernel and memcpy/memset in a chrome trace.

    ``span_us``: first GPU activity to last; ``compute_busy_us`` / ``comm_busy_us``: time covered by at least
    one non-NCCL / NCCL kernel; ``overlap_us``: both at once; ``compute_idle_us``: span without compute;
    ``kernels``: per name, calls and summed duration (and how much of it ran beside an NCCL kernel).
    """
    comp, comm = [], []
    per: dict[str, dict] = defaultdict(lambda: {"calls": 0, "us": 0.0, "us_beside_nccl": 0.0})
    events = [
        e
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    for e in events:
        iv = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        (comm if is_comm(e["name"]) else comp).append(iv)
    comp_u, comm_u = _union(comp), _union(comm)
    for e in events:
        iv = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        r = per[e["name"]]
        r["calls"] += 1
        r["us"] += iv[1] - iv[0]
        if not is_comm(e["name"]):
            r["us_beside_nccl"] += _intersection([iv], comm_u)
    allv = comp + comm
    span = (max(e for _, e in allv) - min(s for s, _ in allv)) if allv else 0.0
    return {
        "span_us": span,
        "compute_busy_us": _length(comp_u),
        "comm_busy_us": _length(comm_u),
        "overlap_us": _intersection(comp_u, comm_u),
        "compute_idle_us": span - _length(comp_u),
        "kernels": dict(sorted(per.items(), key=lambda kv: -kv[1]["us"])),
    }


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def format_summary(tag: str, s: dict, top: int = 8) -> str:
    lines = [
        f"{tag}: span {s['span_us']:.0f} us | compute busy {s['compute_busy_us']:.0f} | NCCL busy "
        f"{s['comm_busy_us']:.0f} | overlap {s['overlap_us']:.0f} | compute idle {s['compute_idle_us']:.0f}"
    ]
    for name, r in list(s["kernels"].items())[:top]:
        lines.append(
            f"    {r['us']:9.1f} us x{r['calls']:<3} ({r['us_beside_nccl']:8.1f} beside NCCL)  {name[:90]}"
        )
    return "\n".join(lines)
