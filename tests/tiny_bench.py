"""Running a bench script in its tiny configuration from a test: a subprocess with one thread (on shared cores
OpenMP's spin-waiting would only time the neighbours), which must succeed and print the machine first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_tiny_bench(script: str) -> str:
    """stdout of `python bench/<script> --tiny`, checked for success, the TINY banner and the machine line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, f"bench/{script}", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(rf"^machine: torch {re.escape(torch.__version__)}, CPU .+, 1 thread, 1 process, fp32$", out,
                     flags=re.M), out
    assert "TINY configuration" in out, out
    return out
