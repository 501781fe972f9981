"""bench/cld_cost.py in its tiny configuration, as a subprocess, one thread (as tests/test_bench_samplers_tiny.py)."""

from __future__ import annotations

import re

from tiny_bench import run_tiny_bench


def test_cld_cost_runs_tiny():
    out = run_tiny_bench("cld_cost.py")
    assert "VP on 1 channel(s), CLD on 2" in out, out
    m = re.search(r"^training update +VP +([\d.]+) ms +CLD +([\d.]+) ms +CLD/VP ([\d.]+)×$", out, flags=re.M)
    assert m and all(float(v) > 0 for v in m.groups()), out
    for label in ("VP DDIM", r"CLD gDDIM \(order 2\)", "CLD Euler"):
        s = re.search(rf"^sampling {label} +([\d.]+) ms/sample/NFE +([\d.]+)× VP DDIM$", out, flags=re.M)
        assert s and float(s[1]) > 0 and float(s[2]) > 0, (label, out)
