"""Several nodes on this machine: two torchrun agents joined by a c10d rendezvous, one process each, each in its own
workspace (as each node runs `dvc repro` in its own clone). The first process of every node writes the stage's
outputs into its workspace; both nodes end with the same bytes as a one-process run.

Training stages: tests/test_ddp.py. This file: a sharded FID stage, where rank 0 gathers the samples and shares them
with the other node's writer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.usefixtures("single_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fid_stage_on_two_nodes_writes_the_one_process_outputs_on_both(tmp_path, monkeypatch):
    from test_shard import _two_fid_stages

    from sferd.pipeline.run import main

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
        monkeypatch.chdir(d)
        _two_fid_stages(d)
    monkeypatch.chdir(nodes[0])
    assert main(["one"]) == 0

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    procs = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sferd-fid", "-m",
                               "sferd.pipeline.run", "two"], cwd=d, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for d in nodes]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    one = (nodes[0] / "results/one/samples.npz").read_bytes()
    m1 = json.loads((nodes[0] / "results/metrics/one.json").read_text())
    m1.pop("stage")
    for d in nodes:
        assert (d / "results/two/samples.npz").read_bytes() == one
        m2 = json.loads((d / "results/metrics/two.json").read_text())
        assert m2.pop("stage") == "two" and m2 == m1
    assert np.load(nodes[1] / "results/two/samples.npz")["seeds"].tolist() == list(range(100, 111))
