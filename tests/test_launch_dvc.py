"""`dvc repro` starts the processes itself: an FID stage of the tiny pipeline re-run by real `dvc repro` with the
launcher set to 2 processes writes the outputs of the 1-process run, and `dvc.lock` stays byte for byte the same,
with no manual commit. Runtime settings change no stage's status either."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from workspace import init_repo, run

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = "sferd.pipeline.launch"
FID = "digits-teacher-s0002-fid"


@contextmanager
def _environment(d: Path, **settings: str):
    """workspace.run passes os.environ on: for the block it is this one, the copy's code first on the path and
    exactly the given runtime settings."""
    old = dict(os.environ)
    env = {k: v for k, v in old.items() if not k.startswith("SFERD_")}
    os.environ.clear()
    os.environ.update({**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(d), **settings})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch-repo")
    shutil.copytree(ROOT / "sferd", d / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    for f in (".gitignore", ".dvcignore"):
        shutil.copy(ROOT / f, d / f)
    (d / "specs").mkdir()
    shutil.copy(ROOT / "tests/specs/tiny.yaml", d / "specs/tiny.yaml")
    init_repo(d)
    with _environment(d):  # the copy's compiler, not the venv's editable install
        run(["sferd-spec", "compile", "specs/tiny.yaml"], d)
    text = (d / "dvc.yaml").read_text()
    # the compiler's stage commands are the launcher (no rewriting here)
    assert f"cmd: python -m {LAUNCHER} --params params.json {FID}\n" in text and "sferd.pipeline.run " not in text
    # 4 batches of 16 rather than one of 64, so both ranks sample (and rank 0 shows its progress line)
    params = json.loads((d / "params.json").read_text())
    assert params[FID]["num_samples"] == 64
    params[FID]["sample_batch_size"] = 16
    (d / "params.json").write_text(json.dumps(params, indent=2))
    return d


def _repro(d: Path, *args: str, **settings: str):
    with _environment(d, **settings):
        return run(["dvc", "repro", *args], d)


@pytest.mark.slow
def test_fid_stage_at_2_processes_under_dvc_repro_equals_1_process(repo):
    d = repo
    first = _repro(d, FID)  # 1 process: data, features, reference statistics, teacher, then the FID stage
    assert "[rank 0 of 2]" not in first.stdout + first.stderr
    lock = (d / "dvc.lock").read_bytes()
    samples = (d / f"results/{FID}/samples.npz").read_bytes()
    metrics = (d / f"results/metrics/{FID}.json").read_bytes()

    # runtime settings (environment and local file) leave every stage up to date
    (d / "sferd.local.toml").write_text("nproc_per_node = 2\nloader_workers = 2\n")
    status = _repro(d, FID, "--dry", SFERD_NPROC_PER_NODE="2", SFERD_MICRO_BATCH="8")
    assert "Running stage" not in status.stdout, status.stdout
    assert run(["git", "status", "--porcelain", "--ignored", "sferd.local.toml"], d).stdout.startswith("!! ")

    # DVC runs the FID stage again (forced: its outputs are in the cache), now at 2 processes through the launcher
    shutil.rmtree(d / f"results/{FID}")
    (d / f"results/metrics/{FID}.json").unlink()
    second = _repro(d, "--force", "--single-item", FID, SFERD_NPROC_PER_NODE="2")
    out = second.stdout + second.stderr
    assert f"Running stage '{FID}'" in out and f"{FID} [rank 0 of 2]: 32/32" in out, out
    assert out.count("Running stage") == 1, out  # nothing upstream re-ran
    assert (d / f"results/{FID}/samples.npz").read_bytes() == samples
    assert (d / f"results/metrics/{FID}.json").read_bytes() == metrics
    assert (d / "dvc.lock").read_bytes() == lock  # no manual commit, and nothing about the process count recorded
    assert "nproc" not in lock.decode() and "SFERD" not in lock.decode()
