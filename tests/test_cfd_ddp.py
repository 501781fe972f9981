"""The classifier stage and a CFD halving (with the coverage term) trained by 2 processes (torchrun, gloo, CPU)
give the weights of 1 process, within the float tolerance of tests/test_ddp.py: each rank's half of the batch is
one whole coverage group, so the dataset term is the same term whatever the process count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cfd_stages import cfd_workspace

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = 2e-5
# ~50 s of torchrun start-ups and training: opt-in (`scripts/test -m slow`); the split independence of the CFD loss
# itself is checked in the default suite (tests/test_cfd.py), the engine's DDP equality by tests/test_ddp.py
pytestmark = pytest.mark.slow


def _run(d: Path, stage: str, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SFERD_MICRO_BATCH", None)
    runner = ["-m", "sferd.pipeline.run", "--params", "params.json", stage]
    cmd = [sys.executable, *runner] if nproc == 1 else [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc),
                                                          *runner]
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for nproc in (1, 2):
        d = tmp_path_factory.mktemp(f"cfd{nproc}")
        cfd_workspace(d)
        _run(d, "x-teacher", 1)  # the same teacher in both (the teacher's own 1-vs-2 test is test_ddp.py's)
        for stage in ("x-classifier", "x-cfd-s0002"):
            _run(d, stage, nproc)
        out[nproc] = d
    return out


@pytest.mark.parametrize("stage, file", [("x-classifier", "classifier.pt"), ("x-cfd-s0002", "model.pt")])
def test_two_processes_train_the_weights_of_one(runs, stage, file):
    one, two = (torch.load(runs[n] / f"results/{stage}/{file}", weights_only=True)["state_dict"] for n in (1, 2))
    assert one.keys() == two.keys()
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert worst <= TOL, f"{stage}: 1 vs 2 processes differ by {worst:.3g} (tolerance {TOL})"
