"""The `classifier` stage and a CFD halving end to end, tiny, through the stage runner (as `dvc repro` runs them):
a digits classifier trained with its own seed, a pretrained file verified before anything is built (offline: a
missing file names what to fetch), and a halving whose loss is the classifier's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sferd.nn.classifiers import load_classifier
from sferd.pipeline.run import main as run_stage

pytestmark = pytest.mark.usefixtures("single_thread")

NETWORK = {"architecture": "digits-cnn", "channels": 1, "resolution": 8, "num_classes": 10, "pretrained": False,
           "width": 8, "feature_dim": 8}


def _workspace(tmp_path: Path, monkeypatch) -> dict:
    params = cfd_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    return params


def cfd_workspace(tmp_path: Path) -> dict:
    """Digit-shaped splits and params.json with a teacher, a classifier, a PD and a CFD halving (tiny)."""
    from fakes import write_split_arrays
    from stage_fixtures import stages

    rng = np.random.default_rng(0)
    write_split_arrays(tmp_path / "results/digits-data/train", rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
                       rng.integers(0, 3, 40))
    write_split_arrays(tmp_path / "results/digits-data/heldout", rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8),
                       rng.integers(0, 3, 12))
    params = stages(updates=4, checkpoint_every=2)
    params["x-classifier"] = {
        "kind": "classifier", "seed": 7, "precision": "fp32", "dataset": params["x-teacher"]["dataset"],
        "num_classes": 10, "network": NETWORK,
        "training": {"updates": 6, "batch_size": 10, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                     "weight_decay": 5e-4, "lr_milestones": [0.5], "lr_decay": 0.1, "random_crop_padding": 1,
                     "checkpoint_every_updates": 3},
        "inputs": {"train": "results/digits-data/train", "heldout": "results/digits-data/heldout"},
        "outputs": {"dir": "results/x-classifier", "metrics": "results/metrics/x-classifier.json",
                    "train_log": "results/metrics/x-classifier-train.tsv"},
    }
    cfd = json.loads(json.dumps(params["x-pd-s0002"]))
    cfd["kind"] = "distill_cfd"  # a CFD halving's own runner (graph._halving)
    cfd["cfd"] = {"classifier": {"checkpoint": "results/x-classifier/classifier.pt", "network": NETWORK},
                  "temperature": 0.9, "beta": 0.1, "gamma": 0.5, "coverage_group_size": 5}
    cfd["outputs"] = {"dir": "results/x-cfd-s0002", "metrics": "results/metrics/x-cfd-s0002.json"}
    params["x-cfd-s0002"] = cfd
    (tmp_path / "params.json").write_text(json.dumps(params))
    return params


def test_classifier_stage_then_a_cfd_halving(tmp_path, monkeypatch, capsys):
    _workspace(tmp_path, monkeypatch)
    for stage in ("x-teacher", "x-classifier", "x-pd-s0002", "x-cfd-s0002"):
        assert run_stage([stage]) == 0, capsys.readouterr().err
    m = json.loads(Path("results/metrics/x-classifier.json").read_text())
    assert 0.0 <= m["heldout_accuracy"] <= 1.0 and np.isfinite(m["loss_mean_recent"])
    classifier = load_classifier("results/x-classifier/classifier.pt", expect=NETWORK)
    assert all(not p.requires_grad for p in classifier.parameters())
    log = Path("results/metrics/x-classifier-train.tsv").read_text().splitlines()
    assert log[0].startswith("update\tloss") and float(log[-1].split("\t")[3]) == pytest.approx(0.005)  # ÷10 at 50 %
    pd_m = json.loads(Path("results/metrics/x-pd-s0002.json").read_text())
    cfd_m = json.loads(Path("results/metrics/x-cfd-s0002.json").read_text())
    assert np.isfinite(cfd_m["loss_mean_recent"]) and cfd_m["loss_mean_recent"] != pd_m["loss_mean_recent"]
    load = lambda p: torch.load(p, weights_only=True)["state_dict"]  # noqa: E731
    teacher, pd_s, cfd_s = (load(f"results/{d}/model.pt") for d in ("x-teacher", "x-pd-s0002", "x-cfd-s0002"))
    assert any(not torch.equal(cfd_s[k], teacher[k]) for k in teacher)
    assert any(not torch.equal(cfd_s[k], pd_s[k]) for k in pd_s)
    assert json.loads(Path("results/x-cfd-s0002/config.json").read_text())["cfd"]["temperature"] == 0.9


def test_a_micro_batch_that_splits_a_coverage_group_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    _workspace(tmp_path, monkeypatch)
    for stage in ("x-teacher", "x-classifier"):
        assert run_stage([stage]) == 0
    capsys.readouterr()
    monkeypatch.setenv("SFERD_MICRO_BATCH", "4")
    assert run_stage(["x-cfd-s0002"]) == 1
    err = capsys.readouterr().err
    assert "x-cfd-s0002: error: coverage group 0 has 4 of its 5 samples" in err and "Traceback" not in err


def test_a_classifier_of_another_setup_is_refused(tmp_path, monkeypatch, capsys):
    params = _workspace(tmp_path, monkeypatch)
    for stage in ("x-teacher", "x-classifier"):
        assert run_stage([stage]) == 0
    params["x-cfd-s0002"]["cfd"]["classifier"]["network"] = {**NETWORK, "width": 16}
    Path("params.json").write_text(json.dumps(params))
    capsys.readouterr()
    assert run_stage(["x-cfd-s0002"]) == 1
    assert "classifier for another set-up: width 8 (expected 16)" in capsys.readouterr().err


def _pretrained(tmp_path: Path, monkeypatch, sha: str) -> None:
    params = _workspace(tmp_path, monkeypatch)
    params["x-classifier"] = {
        "kind": "classifier", "dataset": params["x-teacher"]["dataset"], "num_classes": 10,
        "network": {"architecture": "resnet18", "channels": 3, "resolution": 32, "num_classes": 1000,
                    "pretrained": True, "input_resolution": 64},
        "weights": {"path": "weights/resnet18.pth", "sha256": sha},
        "inputs": params["x-classifier"]["inputs"],
        "outputs": {"dir": "results/x-classifier", "metrics": "results/metrics/x-classifier.json"},
    }
    Path("params.json").write_text(json.dumps(params))


def test_a_missing_pretrained_file_names_what_to_fetch_and_where(tmp_path, monkeypatch, capsys):
    _pretrained(tmp_path, monkeypatch, "a" * 64)
    assert run_stage(["x-classifier"]) == 1
    err = capsys.readouterr().err
    assert "pretrained classifier weights weights/resnet18.pth not found" in err
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err and "downloads nothing" in err
    assert not Path("results/x-classifier").exists()


def test_a_pretrained_file_is_checked_by_hash_then_used(tmp_path, monkeypatch, capsys):
    import torchvision

    torch.manual_seed(0)
    Path(tmp_path / "weights").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "weights/resnet18.pth")
    sha = hashlib.sha256((tmp_path / "weights/resnet18.pth").read_bytes()).hexdigest()
    _pretrained(tmp_path, monkeypatch, "b" * 64)
    assert run_stage(["x-classifier"]) == 1
    assert f"have sha256 {sha}, the spec expects {'b' * 64}" in capsys.readouterr().err
    _pretrained(tmp_path, monkeypatch, sha)
    assert run_stage(["x-classifier"]) == 0, capsys.readouterr().err
    net = load_classifier("results/x-classifier/classifier.pt")
    ref = torchvision.models.resnet18()
    ref.load_state_dict(torch.load(tmp_path / "weights/resnet18.pth", weights_only=True))
    torch.testing.assert_close(net.net.fc.weight, ref.fc.weight)
    m = json.loads(Path("results/metrics/x-classifier.json").read_text())
    assert m["heldout_accuracy"] is None and m["weights_sha256"] == sha  # 1000 ImageNet classes: no digits accuracy
