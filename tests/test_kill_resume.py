"""SIGKILL a real teacher stage process at random moments — during updates and while it writes a checkpoint — and
resume it: the final weights are bitwise those of an uninterrupted run, and the outputs hold no stray files.

Checkpoints are written after every update here, so a kill lands inside a checkpoint write often. The kill moments
are drawn from a seeded generator (reproducible), each after the process has shown a sign of training (a state or a
temporary file in its scratch folder).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from stage_fixtures import workspace

ROOT = Path(__file__).resolve().parents[1]
STAGE = "x-teacher"
UPDATES = 40


def _start(d: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sferd.pipeline.run", "--params", "params.json", STAGE], cwd=d,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(d: Path) -> str:
    p = _start(d)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return err


def test_sigkill_at_random_moments_then_resume_is_bitwise_equal(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        workspace(d, updates=UPDATES, checkpoint_every=1)
    _finish(ref)

    rng = random.Random(1234)
    scratch = run / ".sferd/scratch" / STAGE
    kills = 0
    for _ in range(4):
        p = _start(run)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if scratch.is_dir() and any(p.name != "lock" for p in scratch.iterdir()):
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate(timeout=60)
    assert kills >= 2, "the stage finished before it could be killed: make it longer"

    err = _finish(run)
    assert "Traceback" not in err
    a = torch.load(ref / f"results/{STAGE}/model.pt", weights_only=True)["state_dict"]
    b = torch.load(run / f"results/{STAGE}/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (run / f"results/{STAGE}").iterdir()) == ["config.json", "model.pt"]
    assert [p.name for p in scratch.iterdir()] == ["lock"]  # no state, no temporary, no set-aside file


@pytest.mark.slow  # the same fallback is checked in-process in test_training.py; this one goes through a killed process
def test_a_truncated_state_is_reported_in_one_line_and_the_previous_one_used(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        workspace(d, updates=12, checkpoint_every=4)
    _finish(ref)
    p = _start(run)
    scratch = run / ".sferd/scratch" / STAGE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if len(list(scratch.glob("state-*.pt"))) >= 2:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    states = sorted(scratch.glob("state-*.pt"))
    if len(states) < 2:
        pytest.skip("the stage finished before two states existed")  # pragma: no cover - timing
    newest = states[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    err = _finish(run)
    lines = [ln for ln in err.splitlines() if "unreadable" in ln]
    assert len(lines) == 1 and newest.name in lines[0] and "Traceback" not in err
    a = torch.load(ref / f"results/{STAGE}/model.pt", weights_only=True)["state_dict"]
    b = torch.load(run / f"results/{STAGE}/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
