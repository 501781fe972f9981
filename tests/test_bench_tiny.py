"""bench/train_throughput.py in its tiny configuration, as a subprocess (what CI runs without a GPU; ~20 s here).

One thread (OMP_NUM_THREADS=1), as the other multi-process tests: on shared cores OpenMP's spin-waiting makes the
tiny model's small ops ~60x slower with two threads, which would only time the neighbours.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the bench runs the paper U-Nets (tests/test_gpu.py)")
def test_train_throughput_runs_tiny_without_cuda():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench/train_throughput.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # the machine first: CPU model, threads, torch version, device
    assert re.search(rf"^machine: torch {re.escape(torch.__version__)}, CPU .+, 1 thread, 1 process, fp32; device cpu$",
                     out, flags=re.M), out
    for spec, params, res in (("table1", "60.0", 32), ("table2", "295.9", 64)):
        block = out.split(f"== specs/{spec}.yaml")[1].split("\n== ")[0]
        assert f"teacher U-Net, {params} M parameters, {res}×{res}" in block, block
        assert "TINY configuration" in block and "batch 2, 2 timed steps" in block, block
        ips = float(re.search(r"throughput: ([\d.]+) images/s", block)[1])
        ratio = float(re.search(r"= ([\d.]+)× the forward", block)[1])
        est = re.search(r"this tiny network at batch 2 needs ([\d.]+) GiB fp32; largest micro-batch in 80 GiB: 2$",
                        block, flags=re.M)
        assert ips > 0 and 2.5 < ratio < 3.5 and est and float(est[1]) > 0, block
        assert f"`sferd-spec plan specs/{spec}.yaml --gpu-memory-gib 80`" in block
        assert "not measurable on the CPU" in block
