"""`stage_granularity: row`: the same stages, run as one DVC stage per chain, per predictor+prior set and per FID row.

What must hold: every part of a bundle is exactly the stage the `step` graph defines (same name, same params, so
the same result and the same scratch folder); the bundles' deps are what their parts read from outside; a real
`dvc repro` runs the bundles and a second one is a no-op; under torchrun (2 gloo processes) a bundle that holds the
process group across its parts gives the one-process FID samples byte for byte and halvings within the training
tolerance of tests/test_ddp.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workspace import init_repo, run

from sferd.pipeline.graph import BUNDLE_KIND, build_graph, bundle
from sferd.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _graph(path: Path, granularity: str):
    spec = load_spec(path)
    spec = spec.model_copy(update={"stage_granularity": granularity})
    return build_graph(spec, spec_path=path.as_posix())


def test_quickstart_bundles_hold_exactly_the_step_graphs_stages():
    path = ROOT / "specs/quickstart.yaml"
    fine = {st.name: st for st in _graph(path, "step")}
    out = [st for _, st in bundle([(".", st) for st in _graph(path, "row")])]
    names = [st.name for st in out]
    assert names.count("digits-pd-chain") == 1 and "digits-teacher-fid" in names and "digits-calibration-fid" in names
    assert len(out) == 15 and len(fine) == 52  # 37 process start-ups fewer
    seen: list[str] = []
    produced: set[str] = set()
    for st in out:
        parts = st.params["parts"] if st.kind == BUNDLE_KIND else [{"name": st.name, "params": st.params}]
        for part in parts:
            assert part["params"] == fine[part["name"]].params, part["name"]  # nothing that changes a result
            seen.append(part["name"])
        # run order: whatever a stage reads from this pipeline was produced by an earlier stage
        # (or is a committed input: the versioned feature weights under assets/)
        assert all(d in produced or d.startswith("assets/") for d in st.deps), (
            st.name, [d for d in st.deps if d not in produced])
        assert not set(st.deps) & set(st.outs)  # a part's input made by an earlier part is no bundle dep
        produced.update((*st.outs, *st.metrics))
    assert sorted(seen) == sorted(fine)
    pd_chain = next(st for st in out if st.name == "digits-pd-chain")
    assert [p["name"] for p in pd_chain.params["parts"]] == [f"digits-pd-s{k:04d}" for k in (8, 4, 2, 1)]
    assert pd_chain.deps == ("results/digits-data", "results/digits-teacher")


def test_a_group_split_across_pipelines_stays_single_where_it_is_not_home():
    path = ROOT / "specs/quickstart.yaml"
    stages = _graph(path, "row")
    chain = [st for st in stages if st.group == "digits-pd-chain"]
    homed = [(".", chain[0]), (".", chain[1]), ("stages/other", chain[2]), ("stages/other", chain[3])]
    out = bundle(homed)
    assert [(pl, st.name, st.kind) for pl, st in out] == [
        (".", "digits-pd-chain", BUNDLE_KIND), ("stages/other", "digits-pd-s0002", "distill"),
        ("stages/other", "digits-pd-s0001", "distill")]


def test_granularity_is_inherited_and_validated(tmp_path):
    from sferd.spec import SpecError

    seeds = load_spec(ROOT / "specs/quickstart-ablation.yaml")
    assert seeds.stage_granularity == "row"  # extends quickstart.yaml: its shared stages are grouped the same way
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "tests/specs/tiny.yaml").read_text() + "stage_granularity: cell\n")
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    assert "bad.yaml:" in str(e.value) and "stage_granularity" in str(e.value)


# ---- real DVC, real processes


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle-repo")
    shutil.copytree(ROOT / "sferd", d / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    for f in (".gitignore", ".dvcignore"):
        shutil.copy(ROOT / f, d / f)
    (d / "specs").mkdir()
    (d / "specs/tiny.yaml").write_text((ROOT / "tests/specs/tiny.yaml").read_text() + "stage_granularity: row\n")
    init_repo(d)
    env = {"PYTHONPATH": str(d), "OMP_NUM_THREADS": "1"}
    old = dict(os.environ)
    os.environ.update(env)
    try:
        run(["sferd-spec", "compile", "specs/tiny.yaml"], d)
        r = run(["dvc", "repro"], d)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return d, r


def test_dvc_repro_runs_the_bundles_and_the_table_is_whole(repo):
    d, r = repo
    dvc = (d / "dvc.yaml").read_text()
    for name in ("digits-pd-chain:", "digits-sferd-chain:", "digits-sferd-predictor-prior:", "digits-sferd-fid:",
                 "digits-calibration-fid:"):
        assert f"\n  {name}\n" in dvc, name
    assert "Running stage 'digits-pd-s0001'" not in r.stdout and "Running stage 'digits-pd-chain'" in r.stdout
    table = (d / "results/tables/tiny.md").read_text()
    assert "cells measured: 7/7" in table and " missing |" not in table
    for k in (1, 2):  # each part wrote its own outputs, where the step graph puts them
        assert (d / f"results/digits-sferd-s{k:04d}-prior/prior.pt").is_file()
        assert json.loads((d / f"results/metrics/digits-sferd-s{k:04d}-fid.json").read_text())["steps"] == k
    again = run(["dvc", "repro"], d)
    assert "Running stage" not in again.stdout, again.stdout
    # the lock records each stage's params digest, never the params themselves (dvcfile.py: the locks were mostly
    # params, and parsing them was most of a no-op `dvc repro`)
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((d / "dvc.lock").read_text())["stages"]
    digests = json.loads((d / "params.sha256.json").read_text())
    assert set(lock) == set(digests)
    for name, st in lock.items():
        assert st["params"] == {"params.sha256.json": {name: digests[name]}}, name


def _runner(d: Path, stage: str, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(d), "OMP_NUM_THREADS": "1"}
    cmd = ["-m", "sferd.pipeline.run", "--params", "params.json", stage]
    cmd = [sys.executable, *cmd] if nproc == 1 else [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), *cmd]
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_run_a_bundle_as_one(repo):
    import torch

    d, _ = repo
    samples = {k: (d / f"results/digits-pd-s{k:04d}-fid/samples.npz").read_bytes() for k in (1, 2)}
    _runner(d, "digits-pd-fid", 2)  # the FID row: the group is held across its two cells
    for k in (1, 2):
        assert (d / f"results/digits-pd-s{k:04d}-fid/samples.npz").read_bytes() == samples[k]
    weights = {k: torch.load(d / f"results/digits-pd-s{k:04d}/model.pt", weights_only=True)["state_dict"]
               for k in (1, 2)}
    _runner(d, "digits-pd-chain", 2)  # two halvings, the second reading the first's output, in one torchrun
    for k in (1, 2):
        new = torch.load(d / f"results/digits-pd-s{k:04d}/model.pt", weights_only=True)["state_dict"]
        worst = max(float((new[n].float() - w.float()).abs().max()) for n, w in weights[k].items())
        assert worst < 2e-5, (k, worst)  # tests/test_ddp.py's tolerance
