"""Code deps through one fingerprint file per stage kind (sferd/pipeline/fingerprints.py): the entry point that writes
them, and, in a throw-away git+DVC repo, that a source edit re-runs only the stages whose kind imports the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from workspace import init_repo, run

from sferd.pipeline import fingerprints
from sferd.pipeline.codedeps import code_fingerprint, stage_code
from sferd.pipeline.fingerprints import FINGERPRINT_STAGE, fingerprint_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pkg(tmp_path):
    """A copy of the package (a fresh path: codedeps caches parses by path, so edits in one test stay there)."""
    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_entry_point_writes_one_file_per_kind(pkg):
    assert fingerprints.main(["--out", "results/code", "teacher", "distill", "teacher"], root=str(pkg)) == 0
    written = sorted(p.name for p in (pkg / "results/code").iterdir())
    assert written == ["distill.sha256", "teacher.sha256"]  # each kind once, no temporary file left behind
    lines = (pkg / "results/code/teacher.sha256").read_text().splitlines()
    files = stage_code(str(pkg), "teacher")
    # one `sha256  path` line per source file, so a diff of two versions names the file that changed
    assert [ln.split("  ", 1)[1] for ln in lines[:-1]] == list(files)
    import hashlib

    unet = next(ln for ln in lines if ln.endswith("  sferd/nn/unet.py"))
    assert unet.split()[0] == hashlib.sha256((pkg / "sferd/nn/unet.py").read_bytes()).hexdigest()
    # the last line is the runner's code_sha256 for the kind (run.py stamps it into checkpoints and resume keys)
    assert lines[-1] == f"code_fingerprint {code_fingerprint(str(pkg), 'teacher')}"


def test_entry_point_replaces_files_atomically(pkg, monkeypatch, capsys):
    out = pkg / "results/code/teacher.sha256"
    out.parent.mkdir(parents=True)
    out.write_text("old\n")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)  # the rename that publishes the new file fails
    assert fingerprints.main(["--out", "results/code", "teacher"], root=str(pkg)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "Traceback" not in err[0]
    assert out.read_text() == "old\n"  # the old file whole, never a half-written one
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.sha256"]  # the temporary file is gone
    monkeypatch.undo()
    assert fingerprints.main(["--out", "results/code", "teacher"], root=str(pkg)) == 0
    assert out.read_text() == fingerprints.fingerprint_text(str(pkg), "teacher")  # once it can, the whole new file


@pytest.mark.parametrize("argv, code, message", [
    ([], 2, "usage: python -m sferd.pipeline.fingerprints --out DIR KIND"),
    (["--out", "results/code"], 2, "usage:"),
    (["results/code", "teacher"], 2, "usage:"),
    (["--out", "../elsewhere", "teacher"], 2, "not a relative folder inside the repository"),
    (["--out", "/tmp/x", "teacher"], 2, "not a relative folder inside the repository"),
    (["--out", "results/code", "teacher", "Teacher; rm -rf ."], 2, "is not a stage kind name"),
    (["--out", "results/code", "teacher", "nope"], 1, "no stage kind 'nope'"),
    (["--out", "results/code", "common_x"], 1, "no stage kind 'common_x'"),
])
def test_entry_point_refuses_bad_input_in_one_line(pkg, capsys, argv, code, message):
    assert fingerprints.main(argv, root=str(pkg)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (pkg / "results/code/teacher.sha256").exists()  # every kind is checked before anything is written


def test_entry_point_as_a_command(pkg):
    """What DVC runs: `python -m sferd.pipeline.fingerprints` from the repo root; exit codes, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    ok = subprocess.run([sys.executable, "-m", "sferd.pipeline.fingerprints", "--out", "results/code", "render"], cwd=pkg,
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "  sferd/report/templates/table.md.j2\n" in (pkg / "results/code/render.sha256").read_text()
    bad = subprocess.run([sys.executable, "-m", "sferd.pipeline.fingerprints", "--out", "results/code", "x-y"], cwd=pkg,
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_fingerprint_argv_takes_identifiers_only():
    import shlex

    argv = fingerprints.fingerprint_argv(["teacher", "distill", "teacher"])
    assert shlex.split(shlex.join(argv)) == argv == [
        "python", "-m", "sferd.pipeline.fingerprints", "--out", "results/code", "distill", "teacher"]
    for bad in ([], ["teacher", "a b"], ["$(id)"], ["Teacher"]):
        with pytest.raises(ValueError):
            fingerprints.fingerprint_argv(bad)


def _status(d: Path) -> set[str]:
    """Names of the stages `dvc status` reports as changed."""
    r = run(["dvc", "status", "--json"], d)
    return {key.rsplit(":", 1)[-1] for key in json.loads(r.stdout or "{}")}


def test_a_source_edit_reruns_only_the_stages_whose_kind_imports_it(tmp_path):
    """Real DVC: after an edit to sferd/methods/pd.py (the PD loss: imported by the distill, predictor, prior and
    fid_sferd kinds, not by the teacher's), the fingerprint stage rewrites those kinds' files alone and DVC reports
    exactly the stages that run one of those kinds as changed; nothing is trained."""
    d = tmp_path
    shutil.copytree(ROOT / "sferd", d / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    (d / "specs").mkdir()
    shutil.copy(ROOT / "tests/specs/tiny.yaml", d / "specs/tiny.yaml")
    init_repo(d)
    py = [sys.executable, "-m"]  # this copy's code (cwd first on sys.path), not the installed console script's
    run([*py, "sferd.cli", "compile", "specs/tiny.yaml"], d)
    dvc = YAML(typ="safe").load((d / "dvc.yaml").read_text())["stages"]
    params = json.loads((d / "params.json").read_text())
    kinds_of = {name: {p["params"]["kind"] for p in params[name]["parts"]} if params[name]["kind"] == "bundle"
                else {params[name]["kind"]} for name in dvc if name != FINGERPRINT_STAGE}
    code = params[FINGERPRINT_STAGE]["stage_code"]
    touched = {k for k, files in code.items() if "sferd/methods/pd.py" in files}
    assert "distill" in touched and not touched & {"teacher", "data", "features", "fid"}
    run(["dvc", "repro", "--single-item", FINGERPRINT_STAGE], d)
    # Record every other stage as if it had run, without running it: stand-in outputs, then `dvc commit`, which
    # stores each stage's dep hashes (the fingerprint files' included) in dvc.lock
    for st in dvc.values():
        for o in (*st.get("outs", []), *st.get("metrics", []), *st.get("plots", [])):
            p = d / (o if isinstance(o, str) else next(iter(o)))
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("stand-in\n")
    run(["dvc", "commit", "-f", "-q"], d)
    assert _status(d) == set()
    before = {k: (d / fingerprint_path(k)).read_text() for k in code}

    pd_py = d / "sferd/methods/pd.py"
    pd_py.write_text(pd_py.read_text() + "\n# an edit to the PD code\n")
    assert _status(d) == {FINGERPRINT_STAGE}  # the source edit reaches the fingerprint stage only, so far
    run(["dvc", "repro", "--single-item", FINGERPRINT_STAGE], d)
    after = {k: (d / fingerprint_path(k)).read_text() for k in before}
    assert {k for k in before if before[k] != after[k]} == touched
    # the file names the changed source: its line and the kind's fingerprint line, nothing else
    new_lines = set(after["distill"].splitlines()) - set(before["distill"].splitlines())
    assert len(new_lines) == 2 and any(ln.endswith("  sferd/methods/pd.py") for ln in new_lines)
    changed = _status(d)
    assert changed == {name for name, kinds in kinds_of.items() if kinds & touched}
    assert any("distill" in kinds_of[name] for name in changed)
    assert "digits-teacher" in kinds_of and "digits-teacher" not in changed
    # and `compile --check` still agrees: a comment changes no closure
    run([*py, "sferd.cli", "compile", "specs/tiny.yaml", "--check"], d)


def test_compile_check_reports_a_new_import_even_inside_the_union(tmp_path):
    """The teacher starting to import the table code (a file the render kind already imports, so the fingerprint
    stage's deps stay the same) still makes `compile --check` fail: params.json records each kind's file set."""
    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    for rel in ("dvc.yaml", "params.json", "params.sha256.json"):
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "stages", tmp_path / "stages")

    def check():  # a fresh process each time, as a user runs it (codedeps caches parses per process)
        return subprocess.run([sys.executable, "-m", "sferd.cli", "compile", "--check"], cwd=tmp_path,
                              capture_output=True, text=True)

    assert check().returncode == 0
    teacher = tmp_path / "sferd/methods/teacher.py"
    teacher.write_text(teacher.read_text() + "\n\ndef _table():\n    from sferd.report import table\n\n    return table\n")
    r = check()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stale: params.json" in r.stderr and "dvc.yaml" not in r.stderr.split("stale:")[1]
    assert '+        "sferd/report/table.py",' in r.stdout  # the diff shows the file joining teacher's set
