"""bench/cld_cost.py in its tiny configuration, as a subprocess, one thread (as tests/test_bench_samplers_tiny.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_cld_cost_runs_tiny():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench/cld_cost.py", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(rf"^machine: torch {re.escape(torch.__version__)}, CPU .+, 1 thread, 1 process, fp32$", out,
                     flags=re.M), out
    assert "TINY configuration" in out and "VP on 1 channel(s), CLD on 2" in out, out
    m = re.search(r"^training update +VP +([\d.]+) ms +CLD +([\d.]+) ms +CLD/VP ([\d.]+)×$", out, flags=re.M)
    assert m and all(float(v) > 0 for v in m.groups()), out
    for label in ("VP DDIM", r"CLD gDDIM \(order 2\)", "CLD Euler"):
        s = re.search(rf"^sampling {label} +([\d.]+) ms/sample/NFE +([\d.]+)× VP DDIM$", out, flags=re.M)
        assert s and float(s[1]) > 0 and float(s[2]) > 0, (label, out)
