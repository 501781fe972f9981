"""CFD in specs and in the stage graph: located errors before any compute, PD stages untouched, a CFD chain that
shares exactly its plain PD halvings, deduplicated classifier and FID stages."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sferd.cli import app
from sferd.pipeline.graph import build_graph
from sferd.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

CLASSIFIER = """\
    classifier:
      architecture: digits-cnn
      seed: 7
      updates: 40
      batch_size: 64
      optimizer: adam
      lr: 2.0e-3
"""


def _method(name: str, *, steps="[4, 2, 1]", tau="0.9", beta="0.0", gamma=None, classifier=CLASSIFIER,
            extra="") -> str:
    return (f"  - kind: cfd\n    name: {name}\n    label: CFD {name}\n    <<: *chain\n"
            f"    cfd_student_steps: {steps}\n    temperature: {tau}\n    beta: {beta}\n"
            + (f"    gamma: {gamma}\n" if gamma is not None else "") + extra + classifier)


PD = """\
  - kind: pd
    name: pd
    label: PD
    <<: &chain
      start_steps: 16
      end_steps: 1
      updates_per_halving: 120
      batch_size: 64
      lr: 4.0e-4
      grad_clip_norm: 1.0
      checkpoint_every_updates: 60
"""


def _spec(tmp_path: Path, methods: str, *, dataset: str | None = None) -> Path:
    """A spec extending a copy of the quickstart (its data, features, teacher and evaluation)."""
    (tmp_path / "quickstart.yaml").write_bytes((ROOT / "specs/quickstart.yaml").read_bytes())
    text = ("schema_version: 1\nname: qs-cfd\nextends: quickstart.yaml\npipeline: stages/qs-cfd\n"
            + (dataset or "") + "methods:\n" + methods + "table:\n  id: qs-cfd\n  title: CFD\n")
    path = tmp_path / "qs-cfd.yaml"
    path.write_text(text)
    return path


def _graph(path: Path):
    return {st.name: st for st in build_graph(load_spec(path), spec_path="specs/x.yaml")}


def test_pd_stages_keep_their_params_and_cfd_shares_only_the_plain_halvings(tmp_path):
    quick = _graph(ROOT / "specs/quickstart.yaml")
    g = _graph(_spec(tmp_path, PD + _method("cfd") + _method("cfd-b", tau="0.5", beta="0.01", gamma="0.75",
                                                                         extra="    coverage_group_size: 16\n")))
    for steps in (8, 4, 2, 1):
        name = f"digits-pd-s{steps:04d}"
        assert g[name].params == quick[name].params and g[name].deps == quick[name].deps
    # the 16 → 8 halving is plain PD in both CFD chains: PD's stage; from 8 → 4 on the chains differ
    assert "digits-cfd-s0008" not in g and "digits-cfd-b-s0008" not in g
    first = g["digits-cfd-s0004"]
    assert first.params["teacher"]["checkpoint"] == "results/digits-pd-s0008/model.pt"
    assert not first.params["teacher"]["is_original_teacher"]
    assert g["digits-cfd-s0002"].params["teacher"]["checkpoint"] == "results/digits-cfd-s0004/model.pt"
    assert g["digits-cfd-b-s0004"].params["teacher"]["checkpoint"] == "results/digits-pd-s0008/model.pt"
    # one classifier for the two identical blocks, named after the first method; every CFD halving reads it
    classifiers = [st for st in g.values() if st.kind == "classifier"]
    assert [st.name for st in classifiers] == ["digits-cfd-classifier"]
    cls = classifiers[0]
    assert cls.params["network"] == {"architecture": "digits-cnn", "channels": 1, "resolution": 8, "num_classes": 10,
                                     "pretrained": False, "width": 32, "feature_dim": 64}
    assert cls.params["seed"] == 7 and "weights" not in cls.params  # its own seed, never the FID network's file
    assert cls.deps == ("results/digits-data",)
    for name, tau, beta, gamma, group in (("digits-cfd-s0001", 0.9, 0.0, None, None),
                                          ("digits-cfd-b-s0002", 0.5, 0.01, 0.75, 16)):
        st = g[name]
        assert st.kind == st.params["kind"] == "distill_cfd"  # its own runner: plain halvings never import CFD
        assert st.params["cfd"] == {"classifier": {"checkpoint": "results/digits-cfd-classifier/classifier.pt",
                                                   "network": cls.params["network"]},
                                    "temperature": tau, "beta": beta, "gamma": gamma, "coverage_group_size": group}
        assert "results/digits-cfd-classifier" in st.deps
    # the stage list is a valid run order: the classifier comes before the halvings that read it
    order = list(g)
    assert order.index("digits-cfd-classifier") < order.index("digits-cfd-s0004")


def test_identical_students_share_their_fid_stage(tmp_path):
    stages = build_graph(load_spec(_spec(tmp_path, PD + _method("cfd"))), spec_path="specs/x.yaml")
    names = {st.name for st in stages}
    assert "digits-cfd-s0008-fid" not in names and "digits-cfd-s0004-fid" in names
    [render] = [st for st in stages if st.kind == "render"]
    rows = {(r["row"], r["steps"]): r["metrics"] for r in render.params["rows"]}
    assert rows[("cfd", 8)] == rows[("pd", 8)] == "results/metrics/digits-pd-s0008-fid.json"
    assert len(render.deps) == len(set(render.deps))


def test_a_cfd_chain_listed_first_lends_its_plain_halvings_to_pd(tmp_path):
    methods = PD.replace("  - kind: pd\n    name: pd\n    label: PD\n    <<: &chain\n", "")
    text = ("  - kind: cfd\n    name: cfd\n    label: CFD\n    <<: &chain\n" + methods.replace("      ", "      ", 1)
            + "    cfd_student_steps: [2, 1]\n    temperature: 0.9\n    beta: 0.0\n" + CLASSIFIER
            + "  - kind: pd\n    name: pd\n    label: PD\n    <<: *chain\n")
    g = _graph(_spec(tmp_path, text))
    assert {"digits-cfd-s0008", "digits-cfd-s0004", "digits-cfd-s0002", "digits-pd-s0002"} <= set(g)
    assert "digits-pd-s0004" not in g and "cfd" not in g["digits-cfd-s0004"].params
    assert g["digits-pd-s0002"].params["teacher"]["checkpoint"] == "results/digits-cfd-s0004/model.pt"
    assert "cfd" not in g["digits-pd-s0002"].params and "cfd" in g["digits-cfd-s0002"].params


def test_a_cfd_chain_from_the_first_halving_shares_nothing(tmp_path):
    g = _graph(_spec(tmp_path, PD + _method("cfd", steps="[8, 4, 2, 1]")))
    assert g["digits-cfd-s0008"].params["teacher"]["is_original_teacher"]
    assert "cfd" in g["digits-cfd-s0008"].params


def test_paper_spec_compiles_with_both_classifiers_and_nulls_with_reasons():
    spec = load_spec(ROOT / "specs/cfd-cifar10.yaml")
    g = {st.name: st for st in build_graph(spec, spec_path="specs/cfd-cifar10.yaml")}
    table1 = {st.name: st for st in build_graph(load_spec(ROOT / "specs/table1.yaml"), spec_path="specs/table1.yaml")}
    assert g["cifar10-pd-s0008"].params == table1["cifar10-pd-s0008"].params  # table1's PD chain, shared
    r18, d201 = g["cifar10-cfd-resnet18-classifier"].params, g["cifar10-cfd-densenet201-classifier"].params
    assert r18["network"]["architecture"] == "resnet18" and d201["network"]["architecture"] == "densenet201"
    tr = r18["training"]
    assert (tr["lr"], tr["weight_decay"], tr["lr_milestones"], tr["lr_decay"], tr["optimizer"]) == \
        (0.1, 5e-4, [0.5, 0.75], 0.1, "sgd")  # RCFD's recipe
    assert tr["updates"] == 300 * -(-50000 // 128)  # 300 epochs
    assert g["cifar10-cfd-resnet18-s0004"].params["cfd"]["beta"] == 0.003
    assert g["cifar10-cfd-densenet201-s0001"].params["cfd"]["temperature"] == 0.9
    assert "cifar10-cfd-resnet18-s0008" not in g
    cfd_rows = [r for r in spec.reported if r.method and r.method.startswith("cfd")]
    assert len(cfd_rows) == 2 and all(v is None for r in cfd_rows for v in r.values.values())
    assert all("not recovered" in r.reason for r in cfd_rows)
    smoke = load_spec(ROOT / "specs/cfd-cifar10.yaml", scale="smoke")
    sg = build_graph(smoke, spec_path="specs/cfd-cifar10.yaml")
    assert [st.name for st in sg if st.kind == "classifier"] == ["cifar10-smoke-cfd-resnet18-classifier"]


# ------------------------------------------------------------------------------------------ located errors

LOCATED = re.compile(r"^(?P<path>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.*)$")


def _errors(path: Path) -> list[tuple[int, int, str]]:
    r = runner.invoke(app, ["validate", str(path)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    out = []
    for line in r.stderr.splitlines()[:-1]:
        m = LOCATED.match(line)
        assert m, line
        out.append((int(m["line"]), int(m["col"]), m["msg"]))
    return out


def _pos(path: Path, needle: str, after: str = "") -> tuple[int, int]:
    text = path.read_text()
    i = text.index(needle, text.index(after) if after else 0)
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


@pytest.mark.parametrize("arch", ["resnet18", "densenet201"])
def test_a_cifar_classifier_on_digits_is_refused_where_it_is_named(tmp_path, arch):
    path = _spec(tmp_path, PD + _method("cfd", classifier=CLASSIFIER.replace("digits-cnn", arch)))
    [(line, col, msg)] = _errors(path)
    assert (line, col) == _pos(path, arch)
    assert f"methods.1.classifier.architecture: {arch} follows the CIFAR recipe" in msg
    assert "digits-8x8 (1 channel, 8×8, 10 classes) does not match" in msg


def test_a_pretrained_classifier_on_grey_digits_is_refused(tmp_path):
    pre = ("    classifier:\n      architecture: pretrained\n      base: resnet18\n      path: w/resnet18.pth\n"
           f"      sha256: {'a' * 64}\n")
    path = _spec(tmp_path, PD + _method("cfd", beta="0.01", gamma="0.5", classifier=pre,
                                             extra="    coverage_group_size: 16\n"))
    errs = _errors(path)
    assert any((l, c) == _pos(path, "pretrained") and "takes RGB images" in m for l, c, m in errs), errs
    assert any("methods.1.classifier.num_classes" in m and "1000" in m for _, _, m in errs), errs


def test_a_cfd_halving_the_chain_does_not_have_is_located_at_the_item(tmp_path):
    path = _spec(tmp_path, PD + _method("cfd", steps="[4, 32]"))
    [(line, col, msg)] = _errors(path)
    assert (line, col) == _pos(path, "32]")
    assert "no halving produces a 32-step student (chain: [8, 4, 2, 1])" in msg


@pytest.mark.parametrize("tau, needle", [("0.0", "greater than or equal to 0.001"),
                                         ("-1.0", "greater than or equal to 0.001"),
                                         ("1.0e-320", "greater than or equal to 0.001")])
def test_a_temperature_that_is_not_positive_is_refused(tmp_path, tau, needle):
    path = _spec(tmp_path, PD + _method("cfd", tau=tau))
    [(line, col, msg)] = _errors(path)
    assert (line, col) == _pos(path, tau, "temperature") and "temperature" in msg and needle in msg


def test_beta_without_gamma_and_a_group_that_does_not_divide_the_batch(tmp_path):
    path = _spec(tmp_path, PD + _method("cfd", beta="0.003", extra="    coverage_group_size: 16\n"))
    [(_, _, msg)] = _errors(path)
    assert "beta > 0 needs gamma" in msg
    # the whole batch as one coverage group would make the run depend on the process count: a group size is required
    path = _spec(tmp_path, PD + _method("cfd", beta="0.003", gamma="0.75"))
    [(line, col, msg)] = _errors(path)
    assert (line, col) == _pos(path, "0.003", "beta") and "beta > 0 needs coverage_group_size" in msg
    path = _spec(tmp_path, PD + _method("cfd", beta="0.003", gamma="0.75", extra="    coverage_group_size: 48\n"))
    [(line, col, msg)] = _errors(path)
    assert (line, col) == _pos(path, "48") and "coverage groups of 48 must divide the batch of 64" in msg


def test_digits_cnn_on_a_dataset_with_other_classes_is_refused(tmp_path):
    (tmp_path / "quickstart.yaml").write_bytes((ROOT / "specs/quickstart.yaml").read_bytes())
    path = _spec(tmp_path, PD + _method("cfd"))
    # ImageNet 64×64 (1000 classes): load the quickstart's graph-relevant parts with another dataset
    text = (ROOT / "specs/table2.yaml").read_text()
    assert "imagenet-64x64" in text
    spec = load_spec(path)
    from sferd.spec.checks import _check_cfd

    wrong = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"id": "imagenet-64x64"})})
    [(where, msg)] = _check_cfd(wrong, 1, wrong.methods[1])
    assert where == ("methods", 1, "classifier", "architecture")
    assert "digits-cnn is a 10-class classifier; imagenet-64x64 (3 channels, 64×64, 1000 classes)" in msg


def test_a_misspelt_classifier_field_is_located(tmp_path):
    path = _spec(tmp_path, PD + _method("cfd", classifier=CLASSIFIER.replace("      lr:", "      lrr:")))
    errs = _errors(path)
    assert any((l, c) == _pos(path, "lrr") and "Extra inputs are not permitted" in m for l, c, m in errs), errs
    assert any("methods.1.classifier.lr: Field required" in m for _, _, m in errs), errs


def test_a_cfd_method_is_named_cfd_by_default(tmp_path):
    text = _method("x").replace("    name: x\n    label: CFD x\n", "")
    spec = load_spec(_spec(tmp_path, PD + text))
    assert (spec.methods[1].name, spec.methods[1].label) == ("cfd", "CFD")


@pytest.mark.parametrize("value, needle", [
    ("../../etc/passwd", "is not a local weights file"),
    ('"${foo}.pth"', "is not a local weights file"),
    ("http://evil.example/x.pth", "is not a local weights file"),
    ('"w.pth\\ntouch /tmp/pwned"', "is not a local weights file"),
    ("~/x.pth", "is not a local weights file"),
    ("results/cifar10-pd-s0008/model.pt", "folder of stage outputs"),
])
def test_a_pretrained_weights_path_is_a_plain_local_file(tmp_path, value, needle):
    """The path becomes a DVC dependency of the classifier stage: no traversal, URL, DVC variable, newline, or a
    stage's output folder (found by a hostile run of the CLI). Absolute paths stay allowed (offline machines)."""
    pre = ("    classifier:\n      architecture: pretrained\n      base: resnet18\n"
           f"      path: {value}\n      sha256: {'a' * 64}\n")
    path = _spec(tmp_path, PD + _method("cfd", classifier=pre))
    errs = _errors(path)
    assert any((l, c) == _pos(path, value, "path: ") and "classifier.path" in m and needle in m
               for l, c, m in errs), errs


def test_an_absolute_pretrained_weights_path_is_accepted():
    from sferd.spec.models import PretrainedClassifierSpec

    spec = PretrainedClassifierSpec(architecture="pretrained", base="resnet18", path="/data/w/resnet18-f37072fd.pth",
                                    sha256="a" * 64)
    assert spec.path == "/data/w/resnet18-f37072fd.pth"
