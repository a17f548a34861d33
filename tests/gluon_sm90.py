"""Ahead-of-time sm_90a compiles of the Gluon kernels, shared by tests/test_gluon_fwd.py and test_gluon_bwd.py.

The compiles run in a child process without ``TRITON_INTERPRET``: under the interpreter (the CPU suite's
setting) the ``@triton.jit`` combine functions behind Gluon's reductions are interpreted ones, which Gluon
cannot compile. Where the installed Triton ships ptxas, its ``-v`` report (register use, spills, wgmma
serialisation warnings) comes back too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_CHILD = """
import importlib, json, os, subprocess, sys, tempfile
import triton
mod, name = sys.argv[1].rsplit(".", 1)
compile_fn = getattr(importlib.import_module(mod), name)
nv = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = next((os.path.join(nv, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(nv, n))),
             None)
out = {}
for key, spec in json.loads(sys.argv[2]).items():
    try:
        ptx = compile_fn(**spec).asm["ptx"]
        report = ""
        if ptxas is not None:
            with tempfile.TemporaryDirectory() as d:
                open(os.path.join(d, "k.ptx"), "w").write(ptx)
                report = subprocess.run([ptxas, "-arch=sm_90a", "-v", os.path.join(d, "k.ptx"), "-o",
                                         os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
        out[key] = {"ptx": ptx, "ptxas": report}
    except Exception as e:  # reported per specialisation
        out[key] = {"error": type(e).__name__ + ": " + str(e)[-2000:]}
print("@@" + json.dumps(out))
"""


def compile_in_child(compile_fn: str, specs: dict) -> dict:
    """``{name: {"ptx", "ptxas"} or {"error"}}`` of ``compile_fn(**spec)`` (a dotted path, e.g.
    ``flexdist.kernels.gluon_fwd.compile_for_sm90``) for every spec."""
    pytest.importorskip("triton.experimental.gluon._runtime", reason="this Triton cannot compile Gluon ahead")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, compile_fn, json.dumps(specs)], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("@@")]
    assert r.returncode == 0 and lines, f"compile child failed (rc {r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(lines[0][2:])
