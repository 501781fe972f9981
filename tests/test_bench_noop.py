"""bench/noop_repro.py in its tiny configuration, on the working tree: in CI a clean clone, whose outputs are in no
DVC cache (the bench's `dvc repro --dry --allow-missing` runs no stage and must not stop at the first missing one)."""

from __future__ import annotations

import re

import pytest
from ruamel.yaml import YAML
from tiny_bench import ROOT, run_tiny_bench


@pytest.mark.usefixtures("checkout_dvc_lock")  # conftest.py: DVC in this checkout, one test at a time
def test_noop_bench_reports_every_pipeline_with_its_stage_count():
    out = run_tiny_bench("noop_repro.py")
    assert re.search(r"^DVC start-up \(`dvc --version`\): \d+\.\d\d s$", out, flags=re.M), out
    assert re.search(r"^ratio to the 3 s reference: \d+\.\d\d; to DVC's start-up: \d+\.\d$", out, flags=re.M), out
    pipelines = ["dvc.yaml"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages").glob("*/dvc.yaml"))
    for path in pipelines:
        # the count DVC loaded must be the count the compiled file declares
        n = len(YAML(typ="safe").load((ROOT / path).read_text(encoding="utf-8"))["stages"])
        assert re.search(rf"^{re.escape(path)} +{n} +\d+ +(yes|no) +\d+\.\d\d$", out, flags=re.M), (path, out)
    assert f"the {len(pipelines) - 1} pipelines other than the root" in out, out
