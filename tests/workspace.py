"""Throw-away git + DVC workspaces for the tests that run the real `sferd-spec compile` and `dvc repro`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's sferd-spec and dvc


def run(args: list[str], cwd: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH and DVC's telemetry off; on failure, show its output's end."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def init_repo(d: Path) -> None:
    """An empty git repository with one commit and DVC initialised, analytics off."""
    run(["git", "init", "-q"], d)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], d)
    run(["dvc", "init", "-q"], d)
    run(["dvc", "config", "core.analytics", "false"], d)
