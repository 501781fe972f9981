"""bench/cfd_cost.py in its tiny configuration, as a subprocess (seconds), one thread like the other bench tests
(on shared cores OpenMP's spin-waiting would time the neighbours)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_cfd_cost_runs_tiny():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench/cfd_cost.py", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(rf"^machine: torch {re.escape(torch.__version__)}, CPU .+, 1 thread, 1 process, fp32$", out,
                     flags=re.M), out
    assert "TINY configuration" in out and "tiny U-Net 8×8 (base 8) + digits-cnn classifier, batch 2" in out, out
    pd = float(re.search(r"^PD update +([\d.]+) ms$", out, flags=re.M)[1])
    m = re.search(r"^CFD update +([\d.]+) ms +([\d.]+)× PD$", out, flags=re.M)
    assert pd > 0 and m and float(m[1]) > 0
    # CFD does all of PD's work plus the classifier's: it cannot be much cheaper (loose: the cores are shared)
    assert float(m[2]) > 0.7, out
