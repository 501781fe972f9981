"""Spec → stage graph → dvc.yaml: golden file, names, dependency closure, granularity of params."""

import re
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from sferd.pipeline.dvcfile import pipeline_files
from sferd.pipeline.graph import build_graph
from sferd.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def _compile(spec_rel: str):
    spec = load_spec(ROOT / spec_rel, display_path=spec_rel)
    stages = build_graph(spec, spec_path=spec_rel)
    files = pipeline_files(stages, pipeline=spec.pipeline, root=str(ROOT))
    return spec, stages, files


def test_quickstart_compiles_to_committed_files():
    _, _, files = _compile("specs/quickstart.yaml")
    for rel, text in files.items():
        committed = (ROOT / rel).read_text(encoding="utf-8")
        assert committed == text, f"{rel} is stale: run `sferd-spec compile`"


def test_compile_check_cli_is_green_on_committed_tree():
    r = subprocess.run([sys.executable, "-m", "sferd.cli", "compile", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stage_graph_is_closed_and_well_named():
    _, stages, files = _compile("specs/quickstart.yaml")
    dvc = YAML(typ="safe").load(files["dvc.yaml"])["stages"]
    produced: dict[str, str] = {}
    order = list(dvc)
    for name, st in dvc.items():
        assert NAME.match(name), name
        assert st["cmd"] == f"python -m sferd.pipeline.run {name}"
        assert st["params"] == [name]
        for out in st.get("outs", []) + st.get("metrics", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path not in produced, f"{path} declared by {produced.get(path)} and {name}"
            produced[path] = name
    for name, st in dvc.items():
        for dep in st["deps"]:
            if dep.startswith("sferd/"):
                assert (ROOT / dep).is_file(), dep
                continue
            assert dep in produced, f"{name} depends on {dep}, which no stage produces"
            assert order.index(produced[dep]) < order.index(name), f"{dep} is produced after {name}"


def test_expected_stage_list():
    _, stages, _ = _compile("specs/quickstart.yaml")
    names = [s.name for s in stages]
    assert names[:3] == ["digits-data", "digits-features", "digits-teacher"]
    chain = [n for n in names if re.fullmatch(r"digits-pd-s\d{4}", n)]
    assert chain == ["digits-pd-s0016", "digits-pd-s0008", "digits-pd-s0004", "digits-pd-s0002", "digits-pd-s0001"]
    for k in (1, 2, 4, 8):
        assert f"digits-pd-s{k:04d}-fid" in names
    assert "digits-heldout-fid" in names and "digits-noise-fid" in names
    assert names[-1] == "quickstart-render"


def test_code_deps_are_specific():
    """A stage depends on the modules it imports, not the whole package (a CLI edit must not retrain)."""
    _, _, files = _compile("specs/quickstart.yaml")
    dvc = YAML(typ="safe").load(files["dvc.yaml"])["stages"]
    teacher_deps = dvc["digits-teacher"]["deps"]
    assert "sferd/methods/teacher.py" in teacher_deps
    assert "sferd/nn/unet.py" in teacher_deps
    assert "sferd/cli.py" not in teacher_deps
    assert "sferd/report/table.py" not in teacher_deps
    assert "sferd/methods/pd.py" not in teacher_deps
    assert "sferd/methods/pd.py" in dvc["digits-pd-s0004"]["deps"]
    assert "sferd/nn/unet.py" not in dvc["quickstart-render"]["deps"]


def test_pd_param_change_touches_only_pd_sections(tmp_path):
    src = (ROOT / "specs/quickstart.yaml").read_text()
    changed = tmp_path / "q.yaml"
    assert src.count("    lr: 1.0e-4\n") == 1  # the PD block's learning rate (4-space indent)
    changed.write_text(src.replace("    lr: 1.0e-4\n", "    lr: 3.0e-4\n"))
    base = {s.name: s.params for s in build_graph(load_spec(ROOT / "specs/quickstart.yaml"), spec_path="specs/quickstart.yaml")}
    new = {s.name: s.params for s in build_graph(load_spec(changed), spec_path="specs/quickstart.yaml")}
    differ = sorted(n for n in base if base[n] != new[n])
    assert differ == sorted(n for n in base if re.fullmatch(r"digits-pd-s\d{4}", n))
