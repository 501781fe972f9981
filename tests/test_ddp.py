"""Data-parallel training through real stage processes: 2 processes (torchrun, gloo, CPU) vs 1 process.

A teacher and a halving stage at tiny size, run by the stage runner exactly as `dvc repro` runs them, give
weights equal within float tolerance after N updates, for any process count and micro-batch: every sample draws
its image, flip, time step, noise and dropout mask from its own generator, so only the summation order of the
gradient differs. Tolerance: 2e-5 absolute on weights of order 0.1–1 after 6 Adam updates at lr 1e-3 (Adam
normalises each step, so float differences in the gradient move a weight by far less than lr per update).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_fixtures import MODEL, STUDENT, workspace

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = 2e-5

def _run(d: Path, stage: str, nproc: int, micro: int | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SFERD_MICRO_BATCH", None)
    if micro:
        env["SFERD_MICRO_BATCH"] = str(micro)
    runner = ["-m", "sferd.pipeline.run", "--params", "params.json", stage]
    cmd = [sys.executable, *runner] if nproc == 1 else [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), *runner]
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _weights(d: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(d / f"results/{stage}/model.pt", weights_only=True)["state_dict"]


CONFIGS = {"one": (1, None), "two": (2, None), "two-micro": (2, 2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workspaces by label, each run once on first use (the micro-batch run only by the slow variant)."""
    done: dict[str, Path] = {}

    class Runs(dict):
        def __missing__(self, label):
            nproc, micro = CONFIGS[label]
            d = tmp_path_factory.mktemp(label)
            workspace(d)
            for stage in ("x-teacher", "x-pd-s0002"):
                _run(d, stage, nproc, micro)
            self[label] = d
            return d

    return Runs(done)


@pytest.mark.parametrize("stage", ["x-teacher", "x-pd-s0002"])
@pytest.mark.parametrize("other", ["two", pytest.param("two-micro", marks=pytest.mark.slow)])
def test_two_processes_train_the_weights_of_one(runs, stage, other):
    one, two = _weights(runs["one"], stage), _weights(runs[other], stage)
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= TOL, f"{stage}: 1 vs 2 processes differ by {worst:.3g} (tolerance {TOL})"


def test_only_the_writer_writes_and_the_log_is_a_plot(runs):
    d = runs["two"]
    assert sorted(p.name for p in (d / "results/x-teacher").iterdir()) == ["config.json", "model.pt"]
    log = (d / "results/metrics/x-teacher-train.tsv").read_text().splitlines()
    assert log[0] == "update\tloss\tgrad_norm\tlr\timages_per_s" and len(log) == 1 + 6
    assert not any((d / ".sferd/scratch").rglob("state-*.pt"))  # finished stages clear their scratch state
    m = json.loads((d / "results/metrics/x-teacher.json").read_text())
    assert m["updates"] == 6 and np.isfinite(m["loss_mean_recent"])


def test_the_halving_differs_from_its_teacher(runs):
    """A sanity check that the distilled student actually trained (the comparison above is not vacuous)."""
    t, s = _weights(runs["one"], "x-teacher"), _weights(runs["one"], "x-pd-s0002")
    assert max(float((t[k] - s[k]).abs().max()) for k in s) > 100 * TOL


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_each_write_the_same_outputs_into_their_own_workspace(runs, tmp_path):
    """Two 'nodes' on this machine (two torchrun agents, c10d rendezvous, one process each, separate workspaces as
    two clones would be): the first process of each node writes the stage's outputs, and both nodes hold the same
    bytes, equal to one process within the tolerance."""
    port, nodes = _free_port(), [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for d in nodes:
        workspace(d)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("SFERD_MICRO_BATCH", None)
        procs.append(subprocess.Popen(
            [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
             "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sferd-test", "-m", "sferd.pipeline.run",
             "--params", "params.json", "x-teacher"], cwd=d, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = (d / "results/x-teacher/model.pt" for d in nodes)
    assert a.read_bytes() == b.read_bytes()
    one, two = _weights(runs["one"], "x-teacher"), torch.load(a, weights_only=True)["state_dict"]
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= TOL


@pytest.mark.gpu
def test_two_gpus_train_the_weights_of_one_gpu(runs):
    """On a machine with ≥ 2 GPUs the same stages run on cuda:LOCAL_RANK with nccl: the 'one' and 'two' workspaces
    above were then trained on 1 and 2 GPUs. cuDNN's kernels are not bitwise reproducible across batch sizes,
    hence a looser tolerance than on the CPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    for stage in ("x-teacher", "x-pd-s0002"):
        one, two = _weights(runs["one"], stage), _weights(runs["two"], stage)
        assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-4


def test_training_metrics_record_the_machine(runs):
    for label, world in (("one", 1), ("two", 2)):
        m = json.loads((runs[label] / "results/metrics/x-teacher.json").read_text())["machine"]
        assert m["world_size"] == world and m["precision"] == "fp32" and m["torch"]
