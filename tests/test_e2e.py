"""End to end: a tiny quickstart through real `sferd-spec compile` and `dvc repro` in a fresh git+DVC repo."""

import json
import math
import shutil
from pathlib import Path

import pytest
from workspace import init_repo, run

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "sferd", d / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    (d / "specs").mkdir()
    shutil.copy(ROOT / "tests/specs/tiny.yaml", d / "specs/tiny.yaml")
    init_repo(d)
    run(["sferd-spec", "compile", "specs/tiny.yaml"], d)
    r = run(["dvc", "repro"], d)
    return d, r


def test_repro_produces_table_and_metrics(repo):
    d, r = repo
    table = (d / "results/tables/tiny.md").read_text()
    assert "| PD |" in table and "| SFERD-PD |" in table and "Teacher (DDIM" in table and " missing |" not in table
    assert "cells measured: 7/7" in table
    fids = {}
    for name in ["digits-teacher-s0002-fid", "digits-pd-s0001-fid", "digits-pd-s0002-fid", "digits-sferd-s0001-fid",
                 "digits-sferd-s0002-fid", "digits-heldout-fid", "digits-noise-fid"]:
        m = json.loads((d / f"results/metrics/{name}.json").read_text())
        assert math.isfinite(m["fid"]) and m["fid"] >= 0
        assert m["feature_extractor"] == "digits-cnn" and m["fid_impl"].startswith("torch-fidelity==")
        assert len(m["weights_sha256"]) == 64
        fids[name] = m["fid"]
    # the calibration rows bracket the scale: real held-out digits are far closer than noise
    assert fids["digits-heldout-fid"] < fids["digits-noise-fid"]
    samples = __import__("numpy").load(d / "results/digits-pd-s0001-fid/samples.npz")
    assert samples["images"].shape == (64, 8, 8, 1) and samples["images"].dtype.name == "uint8"
    assert samples["seeds"].tolist() == list(range(64))
    assert (d / "dvc.lock").is_file()
    # figures beside the table: FID-vs-steps plot (+ its data for `dvc plots`) and a sample grid per FID set
    assert (d / "results/tables/tiny-fid.png").is_file() and "tiny-fid.png" in table
    assert len((d / "results/tables/tiny-fid.csv").read_text().splitlines()) == 1 + 7 - 2  # model cells only
    grids = sorted(p.name for p in (d / "results/tables/tiny-samples").iterdir())
    assert "digits-sferd-s0001-fid.png" in grids and "digits-noise-fid.png" not in grids and len(grids) == 6
    plots = run(["dvc", "plots", "show", "--json"], d).stdout
    assert "tiny-fid.csv" in plots and "steps" in plots


def test_sferd_stages_record_costs_and_statistics(repo):
    """D14 cost counts in the SFERD FID records; the prior carries its normalisation statistics."""
    import numpy as np
    import torch

    d, _ = repo
    for k in (1, 2):
        m = json.loads((d / f"results/metrics/digits-sferd-s{k:04d}-fid.json").read_text())
        assert m["nfe"] == k and m["nfe_with_predictor"] == 2 * k  # K = 1, 2: the shift is on at every step
        assert m["latent_prior_steps"] == 10
        prior = torch.load(d / f"results/digits-sferd-s{k:04d}-prior/prior.pt", weights_only=True)
        assert prior["stats"]["mean"].shape == (8,) and (prior["stats"]["std"] > 0).all()
        pred = torch.load(d / f"results/digits-sferd-s{k:04d}-predictor/predictor.pt", weights_only=True)
        assert pred["config"]["student"]["checkpoint"] == f"results/digits-sferd-s{k:04d}/model.pt"
        images = np.load(d / f"results/digits-sferd-s{k:04d}-fid/samples.npz")["images"]
        assert images.shape == (64, 8, 8, 1) and images.std() > 0
    for stage in ("digits-sferd-s0002", "digits-sferd-s0001-predictor", "digits-sferd-s0001-prior"):
        m = json.loads((d / f"results/metrics/{stage}.json").read_text())
        losses = [v for key, v in m.items() if key.startswith("loss_mean")]
        assert losses and all(math.isfinite(v) for v in losses), m


def test_second_repro_is_noop(repo):
    d, _ = repo
    r = run(["dvc", "repro"], d)
    assert "Running stage" not in r.stdout, r.stdout


def test_pd_change_reruns_only_pd_stages(repo):
    d, _ = repo
    spec = d / "specs/tiny.yaml"
    text = spec.read_text()
    spec.write_text(text.replace("lr: 1.0e-4", "lr: 2.0e-4"))
    try:
        run(["sferd-spec", "compile", "specs/tiny.yaml"], d)
        status = run(["dvc", "status", "--json"], d).stdout
        changed = set(json.loads(status))
        assert changed == {"dvc.yaml:digits-pd-s0002", "dvc.yaml:digits-pd-s0001"} or changed == {"digits-pd-s0002", "digits-pd-s0001"}, changed
    finally:
        spec.write_text(text)
        run(["sferd-spec", "compile", "specs/tiny.yaml"], d)
