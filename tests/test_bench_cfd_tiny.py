"""bench/cfd_cost.py in its tiny configuration, as a subprocess (seconds), one thread like the other bench tests
(on shared cores OpenMP's spin-waiting would time the neighbours)."""

from __future__ import annotations

import re

from tiny_bench import run_tiny_bench


def test_cfd_cost_runs_tiny():
    out = run_tiny_bench("cfd_cost.py")
    assert "tiny U-Net 8×8 (base 8) + digits-cnn classifier, batch 2" in out, out
    pd = float(re.search(r"^PD update +([\d.]+) ms$", out, flags=re.M)[1])
    m = re.search(r"^CFD update +([\d.]+) ms +([\d.]+)× PD$", out, flags=re.M)
    assert pd > 0 and m and float(m[1]) > 0
    # CFD does all of PD's work plus the classifier's: it cannot be much cheaper (loose: the cores are shared)
    assert float(m[2]) > 0.7, out
