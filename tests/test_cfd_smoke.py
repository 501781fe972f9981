"""specs/cfd-cifar10.yaml at its `smoke` scale through real `sferd-spec compile --scale smoke` and `dvc repro`, on
tiny fake CIFAR-10 files, offline: the classifier stage, PD's halvings shared by the CFD chains, the CFD halvings
and every FID, to a rendered table whose CFD rows sit beside PD's (the 8-step CFD cell is PD's own FID)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fakes import write_fake_cifar10
from workspace import init_repo, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cfd_smoke_pipeline_renders_its_table(tmp_path):
    d = tmp_path
    shutil.copytree(ROOT / "sferd", d / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", d / "specs")
    write_fake_cifar10(d / "data/cifar10", per_batch=16)
    init_repo(d)
    run(["sferd-spec", "compile", "specs/cfd-cifar10.yaml", "--scale", "smoke"], d)
    run(["dvc", "repro", "stages/cfd-cifar10-smoke/dvc.yaml"], d)
    table = (d / "results/tables/cfd-cifar10-smoke.md").read_text()
    for label in ("| PD |", "| CFD (ResNet-18) |", "| CFD (DenseNet-201) |"):
        row = next(line for line in table.splitlines() if line.startswith(label))
        assert "missing" not in row, row
    assert (d / "results/cifar10-smoke-cfd-resnet18-classifier/classifier.pt").is_file()
    assert not (d / "results/cifar10-smoke-cfd-resnet18-s0008").exists()  # the plain halving is PD's
    assert "up to date" in run(["dvc", "status", "stages/cfd-cifar10-smoke/dvc.yaml"], d).stdout
