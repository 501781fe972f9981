"""The paper pipeline at smoke scale: specs/table1.yaml with its `smoke` scale profile, tiny fake CIFAR-10 files
in torchvision's format and the small feature CNN trained on them, through real `sferd-spec compile --scale` and
`dvc repro`, offline, to a rendered table that says which scale it was run at."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from fakes import write_fake_cifar10
from workspace import init_repo, run
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
PER_BATCH = 16  # 5 training batches → 80 training images; 16 test images


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("smoke")
    shutil.copytree(ROOT / "sferd", d / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", d / "specs")
    write_fake_cifar10(d / "data/cifar10", per_batch=PER_BATCH)  # table1's data_dir
    init_repo(d)
    run(["sferd-spec", "compile", "specs/table1.yaml", "--scale", "smoke"], d)
    repro = run(["dvc", "repro", "stages/table1-smoke/dvc.yaml"], d)
    return d, repro


def test_smoke_scale_runs_the_whole_table1_pipeline_to_a_rendered_table(smoke):
    d, _ = smoke
    stages = YAML(typ="safe").load((d / "stages/table1-smoke/dvc.yaml").read_text())["stages"]
    assert all(name.startswith(("cifar10-smoke-", "table1-smoke-")) for name in stages)
    assert sorted(p.name for p in (d / "stages").iterdir()) == ["table1-smoke"]  # a scaled compile writes only its own
    table = (d / "results/tables/table1-smoke.md").read_text()
    assert " missing |" not in table and "cells measured: 9/9" in table
    assert "**Scale: `smoke`**" in table and "`methods.*.start_steps` = 16" in table
    # the paper's numbers beside ours, with Δ
    assert "| PD (Salimans & Ho) | 9.12 | 4.51 | 3.00 | 2.57 |" in table
    assert "| SFERD | 1 | 5.31 |" in table
    for name in ["cifar10-smoke-teacher-s0016-fid", "cifar10-smoke-pd-s0001-fid", "cifar10-smoke-sferd-s0008-fid"]:
        m = json.loads((d / f"results/metrics/{name}.json").read_text())
        assert math.isfinite(m["fid"]) and m["num_samples"] == 64 and m["feature_extractor"] == "digits-cnn"
    # trained on the fake files through torchvision's loader: 5 batches × 16 images, RGB 32×32
    import numpy as np

    from sferd.data.store import open_split

    assert open_split(d / "results/cifar10-smoke-data/train").images.shape == (5 * PER_BATCH, 32, 32, 3)
    feats = json.loads((d / "results/metrics/cifar10-smoke-features.json").read_text())
    assert 0.0 <= feats["heldout_accuracy"] <= 1.0
    samples = np.load(d / "results/cifar10-smoke-sferd-s0001-fid/samples.npz")
    assert samples["images"].shape == (64, 32, 32, 3)


def test_smoke_run_is_up_to_date_afterwards(smoke):
    d, _ = smoke
    status = run(["dvc", "status", "stages/table1-smoke/dvc.yaml"], d).stdout
    assert "up to date" in status, status


def _cells(table: str) -> dict[tuple[str, str], float]:
    """(row label, column) → number, from the rendered table's main FID block."""
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header) or cells[0] == header[0]:
            break
        for col, v in zip(header[1:], cells[1:]):
            try:
                out[(cells[0], col)] = float(v)
            except ValueError:
                pass
    return out


@pytest.mark.slow
def test_two_processes_render_the_table_of_one(smoke, tmp_path_factory):
    """The same `dvc repro stages/table1-smoke/dvc.yaml` with the launcher at 2 processes (every training stage
    data-parallel, every FID stage sharded; gloo) renders the one-process table: the same cells, each FID within
    2 % (weights agree within float tolerance; the FID of 64 samples amplifies that a little), no manual commit."""
    import os

    d1, _ = smoke
    d = tmp_path_factory.mktemp("smoke2")
    shutil.copytree(ROOT / "sferd", d / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", d / "specs")
    write_fake_cifar10(d / "data/cifar10", per_batch=PER_BATCH)
    init_repo(d)
    run(["sferd-spec", "compile", "specs/table1.yaml", "--scale", "smoke"], d)
    os.environ["SFERD_NPROC_PER_NODE"] = "2"
    try:
        r = run(["dvc", "repro", "stages/table1-smoke/dvc.yaml"], d)
    finally:
        del os.environ["SFERD_NPROC_PER_NODE"]
    assert "[rank 0 of 2]" in r.stdout + r.stderr  # the FID stages really sharded
    one = _cells((d1 / "results/tables/table1-smoke.md").read_text())
    two = _cells((d / "results/tables/table1-smoke.md").read_text())
    assert one.keys() == two.keys() and len(one) >= 9
    worst = max(abs(one[k] - two[k]) / max(abs(one[k]), 1e-9) for k in one)
    print(f"largest relative FID difference, 1 vs 2 processes: {worst:.2e}")
    assert worst <= 0.02, {k: (one[k], two[k]) for k in one}
    assert "up to date" in run(["dvc", "status", "stages/table1-smoke/dvc.yaml"], d).stdout
