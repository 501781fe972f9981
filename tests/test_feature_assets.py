"""Fixed, versioned FID feature weights (issue 11, part 5: "a metric that does not move between machines").

The quickstart's digits-cnn is a file committed to git with its SHA-256 in the spec; the features stage verifies it
and trains nothing; `sferd-spec features-train` writes new versions and never overwrites one. Stage runs here use a
tiny network on fake splits (seconds); the one retraining test trains a handful of updates on the real digits.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sferd.cli import app
from sferd.metrics import keys
from sferd.nn.digits_cnn import DigitsCNN, load_digits_cnn, save_digits_cnn
from sferd.pipeline.graph import build_graph
from sferd.pipeline.run import main as run_stage
from sferd.pipeline.stages.features import weights_record
from sferd.spec import SpecError, load_spec

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
ASSET = "assets/features/tiny-v1.pt"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_with_features(features: str) -> str:
    """tests/specs/tiny.yaml with its `features` block replaced by `features` (YAML text)."""
    src = (ROOT / "tests/specs/tiny.yaml").read_text()
    start, end = src.index("features:\n"), src.index("teacher:\n")
    return src[:start] + features + src[end:]


TINY_FEATURES = "features:\n  feature_dim: 16\n  width: 8\n  updates: 40\n"


def _weights_block(version: str, path: str, sha: str) -> str:
    return f"  weights:\n    version: {version}\n    path: {path}\n    sha256: {sha}\n"


# ------------------------------------------------------------------------------------------- the committed v1



def _fake_digit_splits(root):
    """Small random digit-shaped train/held-out splits where the data stage would write them."""
    from fakes import write_split_arrays

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("heldout", 20)):
        write_split_arrays(root / f"results/digits-data/{split}", rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
                           np.arange(n) % 10)

def test_committed_v1_is_the_file_the_quickstart_names():
    """The quickstart's weights are in git (not DVC, not ignored) and hash to the spec's sha256; the sidecar agrees
    and the file fits the spec. Swapping the file (or editing the spec's hash) fails here."""
    spec = load_spec(ROOT / "specs/quickstart.yaml")
    w = spec.features.weights
    assert w is not None, "specs/quickstart.yaml must use fixed feature weights"
    path = ROOT / w.path
    assert path.is_file()
    assert _sha(path) == w.sha256
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", w.path, Path(w.path).with_suffix(".json").as_posix()],
                             cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode == 0, f"{w.path} and its sidecar must be committed to git: {tracked.stderr}"
    ignored = subprocess.run(["git", "check-ignore", "-q", w.path], cwd=ROOT)
    assert ignored.returncode == 1, f"{w.path} is git-ignored"
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["sha256"] == w.sha256 and side["version"] == w.version
    assert side["training"] == {"updates": spec.features.updates, "batch_size": spec.features.batch_size,
                                "lr": spec.features.lr}
    net = load_digits_cnn(path)
    assert net.config == {"resolution": spec.dataset.resolution, "feature_dim": spec.features.feature_dim,
                          "width": spec.features.width, "channels": spec.dataset.channels}
    assert side["heldout_accuracy"] > 0.9  # features of a classifier that cannot tell digits apart are useless


def test_quickstart_features_stage_accepts_the_committed_v1(tmp_path, monkeypatch, capsys):
    """The quickstart's own data and features stages (its compiled params) on the committed file: every check of the
    stage passes and the measured held-out accuracy is the one features-train recorded (same split, same weights)."""
    spec = load_spec(ROOT / "specs/quickstart.yaml")
    stages = {s.name: s for s in build_graph(spec, spec_path="specs/quickstart.yaml")}
    monkeypatch.chdir(tmp_path)
    asset = tmp_path / spec.features.weights.path
    asset.parent.mkdir(parents=True)
    asset.write_bytes((ROOT / spec.features.weights.path).read_bytes())
    (tmp_path / "params.json").write_text(json.dumps({n: stages[n].params for n in ("digits-data", "digits-features")}))
    assert run_stage(["digits-data"]) == 0 and run_stage(["digits-features"]) == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "results/metrics/digits-features.json").read_text())
    side = json.loads((ROOT / Path(spec.features.weights.path).with_suffix(".json")).read_text())
    assert m["weights_sha256"] == spec.features.weights.sha256 and m["weights_version"] == spec.features.weights.version
    assert m["heldout_accuracy"] == side["heldout_accuracy"] == m["heldout_accuracy_recorded"]


def test_quickstart_graph_depends_on_the_weights_file_and_records_the_version():
    spec = load_spec(ROOT / "specs/quickstart.yaml")
    stages = build_graph(spec, spec_path="specs/quickstart.yaml")
    [feat] = [s for s in stages if s.kind == "features"]
    assert spec.features.weights.path in feat.deps
    assert feat.params["weights"] == spec.features.weights.model_dump(mode="json")
    assert "train_log" not in feat.params["outputs"] and not feat.plots  # nothing is trained
    fids = [s for s in stages if s.kind in ("fid", "fid_sferd")]
    assert fids and all(s.params["feature_weights_version"] == spec.features.weights.version for s in fids)


# ------------------------------------------------------------------------------------------- the stage


def _workspace(tmp_path: Path, monkeypatch, *, width: int = 8, record_updates: int | None = None):
    """A tiny spec with fixed weights, its compiled params.json, fake 8×8 splits; returns (params, weights path)."""
    monkeypatch.chdir(tmp_path)
    _fake_digit_splits(tmp_path)
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(_tiny_with_features(TINY_FEATURES + _weights_block("v1", ASSET, "ab" * 32)))
    params = next(s.params for s in build_graph(load_spec(spec_file), spec_path="s.yaml") if s.kind == "features")
    torch.manual_seed(0)
    net = DigitsCNN(8, feature_dim=16, width=width)
    record = weights_record(params)
    if record_updates is not None:
        record["training"]["updates"] = record_updates
    weights = tmp_path / ASSET
    save_digits_cnn(weights, net, config={**net.config, "version": "v1", **record, "heldout_accuracy": 0.1})
    params = {**params, "weights": {**params["weights"], "sha256": _sha(weights)}}
    (tmp_path / "params.json").write_text(json.dumps({"digits-features": params}))
    return params, weights


def test_stage_verifies_and_copies_the_weights_without_training(tmp_path, monkeypatch, capsys):
    params, weights = _workspace(tmp_path, monkeypatch)
    assert run_stage(["digits-features"]) == 0, capsys.readouterr().err
    out = tmp_path / params["outputs"]["dir"]
    assert (out / "model.pt").read_bytes() == weights.read_bytes()  # a byte copy: the same hash downstream
    m = json.loads((tmp_path / params["outputs"]["metrics"]).read_text())
    assert m["weights_version"] == "v1" and m["weights_sha256"] == _sha(weights)
    assert 0.0 <= m["heldout_accuracy"] <= 1.0 and m["heldout_accuracy_recorded"] == 0.1 and "machine" in m
    assert not (tmp_path / ".sferd").exists()  # no training session, no scratch state


@pytest.mark.parametrize("tamper", ["appended-byte", "other-weights"])
def test_stage_refuses_tampered_weights_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, tamper):
    params, weights = _workspace(tmp_path, monkeypatch)
    expected = params["weights"]["sha256"]
    if tamper == "appended-byte":
        weights.write_bytes(weights.read_bytes() + b"\0")
    else:
        torch.manual_seed(1)
        net = DigitsCNN(8, feature_dim=16, width=8)
        save_digits_cnn(weights, net, config={**net.config, "version": "v1", **weights_record(params)})
    actual = _sha(weights)
    assert actual != expected
    assert run_stage(["digits-features"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ASSET in err and expected in err and actual in err and "features-train" in err
    assert not (tmp_path / params["outputs"]["dir"]).exists()
    assert not (tmp_path / params["outputs"]["metrics"]).exists()


@pytest.mark.parametrize("kw, message", [({"width": 16}, "another network: width 16 (spec/dataset: 8)"),
                                         ({"record_updates": 7}, "trained with training updates 7 (spec: 40)")])
def test_stage_refuses_weights_that_do_not_fit_the_spec(tmp_path, monkeypatch, capsys, kw, message):
    params, _ = _workspace(tmp_path, monkeypatch, **kw)
    assert run_stage(["digits-features"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / params["outputs"]["dir"]).exists()


def test_without_weights_the_stage_still_trains(tmp_path, monkeypatch, capsys):
    """`weights: null` (paper specs at smoke scale): the stage trains the network itself, as before."""
    monkeypatch.chdir(tmp_path)
    _fake_digit_splits(tmp_path)
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(_tiny_with_features("features:\n  feature_dim: 16\n  width: 8\n  updates: 3\n  batch_size: 8\n"))
    stages = build_graph(load_spec(spec_file), spec_path="s.yaml")
    [feat] = [s for s in stages if s.kind == "features"]
    assert "weights" not in feat.params and feat.deps == ("results/digits-data",)
    assert all("feature_weights_version" not in s.params for s in stages if s.kind in ("fid", "fid_sferd"))
    (tmp_path / "params.json").write_text(json.dumps({feat.name: feat.params}))
    assert run_stage([feat.name]) == 0, capsys.readouterr().err
    assert load_digits_cnn(tmp_path / feat.params["outputs"]["dir"] / "model.pt").config["width"] == 8
    m = json.loads((tmp_path / feat.params["outputs"]["metrics"]).read_text())
    assert "weights_version" not in m and 0.0 <= m["heldout_accuracy"] <= 1.0
    assert (tmp_path / feat.params["outputs"]["train_log"]).is_file()


# ------------------------------------------------------------------------------------------- the spec


GOOD_SHA = "ab" * 32


@pytest.mark.parametrize("field, value, message", [
    ("version", "V1", "is not a weights version"),
    ("version", "-v1", "is not a weights version"),
    ("path", "../weights.pt", "is not a repo-relative path of a .pt file"),
    ("path", "/abs/weights.pt", "is not a repo-relative path of a .pt file"),
    ("path", "assets/../x.pt", "is not a repo-relative path of a .pt file"),
    ("path", "assets/weights.bin", "is not a repo-relative path of a .pt file"),
    ("sha256", "AB" * 32, "64 lowercase hexadecimal digits"),
    ("sha256", "ab" * 31, "64 lowercase hexadecimal digits"),
])
def test_bad_weights_block_is_located(tmp_path, field, value, message):
    fields = {"version": "v1", "path": "assets/features/x.pt", "sha256": GOOD_SHA, field: value}
    text = _tiny_with_features(TINY_FEATURES + _weights_block(fields["version"], fields["path"], fields["sha256"]))
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(text)
    line_text = f"    {field}: {value}"
    line = text.splitlines().index(line_text) + 1
    col = len(f"    {field}: ") + 1  # the value
    with pytest.raises(SpecError) as e:
        load_spec(spec_file, display_path="bad.yaml")
    [issue] = e.value.issues
    assert issue.format().startswith(f"bad.yaml:{line}:{col}: error: features.weights.{field}: ")
    assert message in issue.format()


def test_weights_block_missing_sha_and_unknown_key_are_located(tmp_path):
    text = _tiny_with_features(TINY_FEATURES + "  weights:\n    version: v1\n    path: a/x.pt\n    sha: 00\n")
    (tmp_path / "bad.yaml").write_text(text)
    lines = text.splitlines()
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "bad.yaml", display_path="bad.yaml")
    got = sorted(i.format().split(" [")[0] for i in e.value.issues)
    unknown = f"bad.yaml:{lines.index('    sha: 00') + 1}:5: error: features.weights.sha: "
    missing = f"bad.yaml:{lines.index('  weights:') + 1}:3: error: features.weights.sha256: "
    assert any(g.startswith(unknown) for g in got) and any(g.startswith(missing) for g in got), got


# ------------------------------------------------------------------------------------------- features-train


def _cli_workspace(tmp_path: Path, monkeypatch, features: str) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs/s.yaml"
    spec_file.write_text(_tiny_with_features(features))
    return spec_file


def test_features_train_refuses_an_existing_version(tmp_path, monkeypatch):
    _cli_workspace(tmp_path, monkeypatch, TINY_FEATURES)
    existing = tmp_path / "assets/features/digits-8x8-digits-cnn-v1.pt"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"v1 weights")
    r = runner.invoke(app, ["features-train", "specs/s.yaml", "--version", "v1"])
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "never overwritten" in r.stderr and existing.name in r.stderr
    assert existing.read_bytes() == b"v1 weights"
    assert sorted(p.name for p in existing.parent.iterdir()) == [existing.name]  # no sidecar, no staging left
    bad = runner.invoke(app, ["features-train", "specs/s.yaml", "--version", "V2"])
    assert bad.exit_code == 2


def test_features_train_writes_a_version_the_stage_accepts(tmp_path, monkeypatch):
    """A few updates on the real digits: a loadable file, a sidecar whose sha256 is the file's, the printed
    `weights:` block, and the features stage accepting the file through that block."""
    features = "features:\n  feature_dim: 16\n  width: 8\n  updates: 4\n  batch_size: 16\n"
    spec_file = _cli_workspace(tmp_path, monkeypatch, features)
    r = runner.invoke(app, ["features-train", "specs/s.yaml", "--version", "t1"])
    assert r.exit_code == 0, r.stderr
    pt = tmp_path / "assets/features/digits-8x8-digits-cnn-t1.pt"
    side = json.loads(pt.with_suffix(".json").read_text())
    assert side["sha256"] == _sha(pt) and side["version"] == "t1" and side["dataset"]["split_seed"] == 0
    assert side["training"] == {"updates": 4, "batch_size": 16, "lr": 1e-3} and side["machine"]["torch"]
    assert load_digits_cnn(pt).config == {"resolution": 8, "feature_dim": 16, "width": 8, "channels": 1}
    block = r.stdout[r.stdout.index("  weights:\n"):]
    assert f"sha256: {side['sha256']}" in block and not list(tmp_path.glob("assets/features/.*"))
    assert not (tmp_path / "results").exists() and not (tmp_path / ".sferd").exists()  # all work in a temp folder

    # the printed block, pasted into the spec, is what the stage verifies (real data split, via the data stage)
    spec_file.write_text(_tiny_with_features(features + block))
    stages = build_graph(load_spec(spec_file), spec_path="specs/s.yaml")
    (tmp_path / "params.json").write_text(json.dumps({s.name: s.params for s in stages}))
    assert run_stage(["digits-data"]) == 0 and run_stage(["digits-features"]) == 0
    m = json.loads((tmp_path / "results/metrics/digits-features.json").read_text())
    assert m["weights_sha256"] == side["sha256"]
    assert m["heldout_accuracy"] == side["heldout_accuracy"]  # same split, same weights: the same accuracy

    again = runner.invoke(app, ["features-train", "specs/s.yaml", "--version", "t1"])
    assert again.exit_code == 1 and _sha(pt) == side["sha256"]


# ------------------------------------------------------------------------------------------- the table


def test_table_footer_names_the_weights_version(tmp_path):
    from sferd.report.table import render_markdown, table_context

    def metrics(name: str, **extra) -> str:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"fid": 3.0, "steps": 1, "num_samples": 10, "seeds": "0-9", "fid_impl": "tf",
                                 "feature_extractor": "digits-cnn", "weights_sha256": "ab" * 32, "ref": "r", **extra}))
        return str(p)

    def render(**extra) -> str:
        rows = [{"row": "pd", "label": "PD", "steps": 1, "seed": 0, "metrics": metrics("pd", **extra),
                 "samples": str(tmp_path / "none.npz"), "name": "x-pd-s0001-fid"}]
        return render_markdown(table_context("s.yaml", {"id": "t", "title": "T"}, rows, [], root=tmp_path))

    assert f"- {keys.WEIGHTS_VERSION}: v7" in render(**{keys.WEIGHTS_VERSION: "v7"})
    assert keys.WEIGHTS_VERSION not in render()  # weights trained by a stage: no version to name
