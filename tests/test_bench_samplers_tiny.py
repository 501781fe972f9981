"""bench/samplers_cost.py in its tiny configuration, as a subprocess (~8 s here), as tests/test_bench_tiny.py does
for the training bench: one thread, because on shared cores OpenMP's spin-waiting times the neighbours."""

from __future__ import annotations

import re

from tiny_bench import run_tiny_bench

SAMPLERS = ("ddim", "gddim (order 2)", "euler_pf", "d_ddim (K = 2)", "d_gddim (order 2, K = 2)", "gddim_cld (order 2)")


def test_samplers_cost_runs_tiny():
    out = run_tiny_bench("samplers_cost.py")
    assert "batch 2, 4 steps" in out, out
    for name in SAMPLERS:
        m = re.search(rf"^{re.escape(name)} +([\d.]+) s/sample +([\d.]+)× DDIM +\(4 NFE\)$", out, flags=re.M)
        assert m and float(m[1]) > 0 and float(m[2]) > 0, (name, out)
    # the same network evaluations: no sampler may cost a multiple of DDIM (loose, the cores are shared)
    ratios = [float(v) for v in re.findall(r"([\d.]+)× DDIM", out)]
    assert ratios[0] == 1.0 and max(ratios) < 3.0, out


def test_dode_calibration_bench_runs_tiny():
    """bench/dode_calibration.py --tiny: the machine line, and per step count the stage's calibration time, the DDIM
    pass it is compared with (same run), their ratio and the network evaluations B·(K·N + 3N)."""
    out = run_tiny_bench("dode_calibration.py")
    assert "K = 2, calibration batch 4" in out, out
    for steps, evals in ((1, 4 * (2 + 3)), (2, 4 * (4 + 6))):
        m = re.search(rf"^ +{steps} +([\d.]+) +([\d.]+) +([\d.]+)× +{evals}$", out, flags=re.M)
        assert m and all(float(v) > 0 for v in m.groups()), (steps, out)
