"""`sferd-spec` through its real entry point: exit codes, located errors, no torch on the fast path."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sferd.cli import app

ROOT = Path(__file__).resolve().parents[1]
INVALID = sorted((ROOT / "tests/specs/invalid").glob("*.yaml"))
runner = CliRunner()


def _expectation(path: Path) -> tuple[int, int, str]:
    m = re.match(r"# expect: (\d+):(\d+) (.+)\n", path.read_text(encoding="utf-8"))
    assert m, f"{path.name} needs a leading '# expect: LINE:COL TEXT' comment"
    return int(m[1]), int(m[2]), m[3]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_spec_fixture(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    line, col, text = _expectation(path)
    rel = path.relative_to(ROOT).as_posix()
    r = runner.invoke(app, ["validate", rel])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"{rel}:{line}:{col}: error: "), errors[0]
    assert text in errors[0]
    assert "Traceback" not in r.output


def test_valid_spec_summary(monkeypatch):
    monkeypatch.chdir(ROOT)
    r = runner.invoke(app, ["validate", "specs/quickstart.yaml"])
    assert r.exit_code == 0, r.output
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    n = len(build_graph(load_spec(ROOT / "specs/quickstart.yaml"), spec_path="specs/quickstart.yaml"))
    assert "ok" in r.stdout and f"{n} stages" in r.stdout
    assert "methods pd, sferd, sferd-ag, sferd-sgp" in r.stdout


def test_validate_json(monkeypatch):
    import json

    monkeypatch.chdir(ROOT)
    r = runner.invoke(app, ["validate", "--format", "json", "specs/quickstart.yaml", "tests/specs/invalid/bad-enum.yaml"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert [d["valid"] for d in data] == [True, False]


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["validate"]).exit_code == 2
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2
    assert runner.invoke(app, ["validate", "--format", "xml", "specs/quickstart.yaml"]).exit_code == 2


def test_missing_file_is_located_error(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    r = runner.invoke(app, ["validate", "nope/absent.yaml"])
    assert r.exit_code == 1
    assert r.stderr.startswith("nope/absent.yaml:1:1: error:")


def test_plan_lists_stages_in_order(monkeypatch):
    monkeypatch.chdir(ROOT)
    r = runner.invoke(app, ["plan", "specs/quickstart.yaml"])
    assert r.exit_code == 0, r.output
    names = re.findall(r"^\s*\d+\. (\S+)", r.stdout, flags=re.M)
    assert names[0] == "digits-data" and names[-1] == "quickstart-render"
    assert names.index("digits-teacher") < names.index("digits-pd-s0008") < names.index("digits-pd-s0001")
    assert "image forward passes" in r.stdout


def test_render_marks_missing_cells(monkeypatch, tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs/q.yaml").write_text((ROOT / "specs/quickstart.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # no results/ here: nothing has run
    r = runner.invoke(app, ["render", "specs/q.yaml"])
    assert r.exit_code == 0, r.output
    from sferd.spec import load_spec

    spec = load_spec(ROOT / "specs/quickstart.yaml")
    ev = spec.evaluation
    cells = len(ev.teacher_steps) + len(spec.methods) * len(ev.student_steps)
    # teacher and method cells + 2 calibration rows (FID and sample count each): marked, none hidden
    assert r.stdout.count(" missing |") == cells + 2 * 2, r.stdout
    assert f"cells measured: 0/{cells + 2}" in r.stdout
    for m in spec.methods:
        assert f"| {m.label} |" in r.stdout


def test_compile_check_detects_stale(tmp_path, monkeypatch):
    """--check writes nothing, exits 1 and prints a diff when generated files differ."""
    import shutil

    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["compile", "--check"])
    assert r.exit_code == 1 and "+++ b/dvc.yaml" in r.stdout
    assert not (tmp_path / "dvc.yaml").exists()
    assert runner.invoke(app, ["compile"]).exit_code == 0
    assert runner.invoke(app, ["compile", "--check"]).exit_code == 0
    params = (tmp_path / "params.json").read_text()
    n = int(re.search(r'"updates": (\d+)', params)[1])
    (tmp_path / "params.json").write_text(re.sub(r'"updates": \d+', f'"updates": {n + 1}', params, count=1))
    r = runner.invoke(app, ["compile", "--check"])
    assert r.exit_code == 1 and f'-      "updates": {n + 1}' in r.stdout and f'+      "updates": {n}' in r.stdout


def test_validate_and_compile_do_not_import_torch():
    code = (
        "import sys; from sferd.cli import app\n"
        "try:\n    app(['validate', 'specs/quickstart.yaml'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "try:\n    app(['compile', '--check'])\nexcept SystemExit as e:\n    pass\n"
        "bad = [m for m in ('torch', 'torch_fidelity', 'torchvision', 'dvc') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_plan_prices_the_work_in_gpu_hours(monkeypatch):
    monkeypatch.chdir(ROOT)
    hours = {}
    for tflops in ("125", "62.5"):
        r = runner.invoke(app, ["plan", "specs/table1.yaml", "--tflops", tflops])
        assert r.exit_code == 0, r.output
        m = re.search(r"estimate: ~([\d,.]+) GPU-hours at ([\d.]+) TFLOP/s sustained, ([\d.]+) GFLOP per U-Net", r.stdout)
        assert m, r.stdout[-500:]
        hours[tflops] = float(m[1].replace(",", ""))
        assert 20 < float(m[3]) < 60  # PD's 256-channel CIFAR-10 U-Net: tens of GFLOP per 32×32 image
    assert hours["62.5"] == pytest.approx(2 * hours["125"], rel=1e-2)  # printed rounded to whole hours
    assert runner.invoke(app, ["plan", "specs/table1.yaml", "--tflops", "0"]).exit_code == 2


def test_results_index_is_current_and_detects_staleness(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(ROOT)
    r = runner.invoke(app, ["index", "--check"])
    assert r.exit_code == 0, r.output  # the committed results/README.md matches the committed metrics
    for sub in ("sferd", "specs"):
        shutil.copytree(ROOT / sub, tmp_path / sub, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)  # nothing measured here
    assert runner.invoke(app, ["index", "--check"]).exit_code == 1
    assert runner.invoke(app, ["index"]).exit_code == 0
    text = (tmp_path / "results/README.md").read_text()
    assert "| `specs/quickstart.yaml` | `.` | 0 | 23 | 0 | `dvc repro` |" in text
    assert "| `specs/table1.yaml` | `stages/table1` | 0 | 11 | 9 | `dvc repro stages/table1/dvc.yaml` |" in text
    assert "not rendered yet" in text


@pytest.mark.parametrize("rendered", [False, True])
def test_results_index_keeps_a_title_with_pipes_and_brackets_in_its_cell(tmp_path, monkeypatch, rendered):
    """A spec's title is free text: a `|` in it must not add a column to results/README.md, a `]` or a backtick
    must not end the link to the table early, a `<` must not open HTML."""
    from sferd.cli import index_text
    from sferd.spec import load_spec

    title = "Tiny | CIFAR ] `<b> 10 \\"
    text = (ROOT / "tests/specs/tiny.yaml").read_text().replace("  title: Tiny\n", f"  title: '{title}'\n")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs/tiny.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    if rendered:
        (tmp_path / "results/tables").mkdir(parents=True)
        (tmp_path / "results/tables/tiny.md").write_text("# table\n")
    path = Path("specs/tiny.yaml")
    lines = index_text([(path, load_spec(path))]).splitlines()
    header = next(ln for ln in lines if ln.startswith("| table |"))
    [row] = [ln for ln in lines if ln.startswith("| ") and "specs/tiny.yaml" in ln]
    unescaped = re.compile(r"(?<!\\)\|")  # cmark-gfm: only a pipe not right after a backslash splits the row
    assert len(unescaped.findall(row)) == len(unescaped.findall(header)) == 8, row
    # `\|` keeps the row's columns and `\]` the link's text; the title's last backslash doubled, so it shows and
    # escapes nothing that follows it
    # a `<` could open an HTML element that hides the rest of the page, a backtick (in a link) a code span reaching
    # past the link
    shown = "Tiny \\| CIFAR \\] \\`&lt;b> 10 \\\\" if rendered else "Tiny \\| CIFAR ] `&lt;b> 10 \\\\"
    assert row.startswith(f"| [{shown}](tables/tiny.md) |" if rendered else f"| {shown} (not rendered yet"), row
