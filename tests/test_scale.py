"""Scale profiles (`scales:` + `--scale`): overrides validated by the same rules, errors located at the `set:`
entry, the scaled run in its own namespace, and a malformed profile a located error (never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sferd.cli import app
from sferd.pipeline.graph import build_graph
from sferd.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = (ROOT / "specs/table1.yaml").read_text()


def _with_profile(tmp_path: Path, set_block: str, *, name: str = "t1.yaml", text: str = TABLE1) -> Path:
    """table1 with one extra profile `tiny` whose `set:` block is `set_block` (lines indented 6)."""
    f = tmp_path / name
    f.write_text(text.replace("scales:\n", "scales:\n  tiny:\n    description: test\n    set:\n" + set_block, 1))
    return f


def _line(path: Path, needle: str) -> int:
    return next(k for k, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_smoke_profile_scales_table1_into_its_own_namespace():
    spec = load_spec(ROOT / "specs/table1.yaml", scale="smoke")
    paper = load_spec(ROOT / "specs/table1.yaml")
    assert (spec.scale, spec.pipeline, spec.table.id) == ("smoke", "stages/table1-smoke", "table1-smoke")
    assert spec.teacher.model.base_channels == 16 and paper.teacher.model.base_channels == 256
    assert [m.start_steps for m in spec.methods] == [16, 16] and spec.evaluation.num_samples == 64
    assert spec.reported == paper.reported  # the paper's numbers stay beside the smoke run's
    stages = build_graph(spec, spec_path="specs/table1.yaml")
    names = {s.name for s in stages}
    assert all(n.startswith(("cifar10-smoke-", "table1-smoke-")) for n in names)
    assert not names & {s.name for s in build_graph(paper, spec_path="specs/table1.yaml")}
    render = next(s for s in stages if s.kind == "render")
    assert render.params["scale"]["name"] == "smoke" and render.params["scale"]["set"]["teacher.updates"] == 20
    assert "scale" not in next(s for s in build_graph(paper, spec_path="x") if s.kind == "render").params


def test_an_invalid_overridden_value_is_located_at_its_set_entry(tmp_path):
    f = _with_profile(tmp_path, "      teacher.batch_size: 0\n")
    with pytest.raises(SpecError) as e:
        load_spec(f, display_path="specs/t1.yaml", scale="tiny")
    [issue] = e.value.issues
    assert (issue.path, issue.line, issue.loc) == ("specs/t1.yaml", _line(f, "teacher.batch_size: 0"),
                                                   "scales.tiny.set.teacher.batch_size")
    assert "greater than 0" in issue.message
    # a semantic check on a value the profile wrote: the same place
    f = _with_profile(tmp_path, "      methods.1.guidance.blur_kernel_size: 101\n")
    with pytest.raises(SpecError) as e:
        load_spec(f, scale="tiny")
    [issue] = e.value.issues
    assert issue.line == _line(f, "blur_kernel_size: 101") and "too large for 32×32" in issue.message


@pytest.mark.parametrize(
    "block, message",
    [
        ("      teacher.nosuch.x: 1\n", "the spec has no teacher.nosuch"),
        ("      methods.7.lr: 1.0\n", "methods is a list of 2: use an index or `*`"),
        ("      evaluation.calibration.*: heldout\n", "evaluation.calibration is an empty list: `*` sets nothing"),
        # what a published number means is the same at every scale
        ("      reported.*.values: {}\n", "a scale profile cannot set 'reported'"),
        ("      reported.0.values.1: 1.0\n", "a scale profile cannot set 'reported'"),
        ("      table.title: Better numbers\n", "a scale profile cannot set 'table'"),
        ("      name: other\n", "a scale profile cannot set 'name'"),
        ("      pipeline: stages/x\n", "a scale profile cannot set 'pipeline'"),
        ("      scales: {}\n", "a scale profile cannot set 'scales'"),
        ("      teacher.updates: 7\n      teacher: {kind: train}\n", "sets teacher, which teacher.updates also sets"),
    ],
)
def test_profile_keys_that_would_do_nothing_or_too_much_are_located_errors(tmp_path, block, message):
    f = _with_profile(tmp_path, block)
    with pytest.raises(SpecError) as e:
        load_spec(f, display_path="specs/t1.yaml", scale="tiny")
    assert any(message in i.message and i.loc.startswith("scales.tiny.set") for i in e.value.issues), e.value


@pytest.mark.parametrize("scales_block", ["scales: 5\n", "scales:\n  tiny: ~\n", "scales:\n  tiny: {description: x, set: [a]}\n"])
def test_a_malformed_scales_block_is_a_located_error_not_a_traceback(tmp_path, scales_block):
    f = tmp_path / "t1.yaml"
    f.write_text(TABLE1[:TABLE1.index("\nscales:") + 1] + scales_block)
    with pytest.raises(SpecError) as e:
        load_spec(f, scale="tiny")
    assert all(i.loc.startswith("scales") and i.line > 1 for i in e.value.issues), e.value


def test_unknown_profile_and_written_scale_field(tmp_path):
    with pytest.raises(SpecError, match=r"no scale profile 'huge' \(this spec defines: \['smoke'\]\)"):
        load_spec(ROOT / "specs/table1.yaml", scale="huge")
    f = tmp_path / "t1.yaml"
    f.write_text(TABLE1.replace("seed: 0\n", "seed: 0\nscale: smoke\n", 1))
    with pytest.raises(SpecError, match="set by `--scale NAME`"):
        load_spec(f)


def test_a_method_named_after_a_profile_would_collide_and_is_refused(tmp_path):
    f = tmp_path / "t1.yaml"
    f.write_text(TABLE1.replace("    name: pd\n", "    name: smoke-pd\n", 1))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert any(i.loc == "methods.0.name" and "would collide" in i.message for i in e.value.issues)


def test_a_scaled_root_spec_gets_its_own_folder(tmp_path):
    text = (ROOT / "specs/quickstart.yaml").read_text().rstrip("\n")
    f = tmp_path / "q.yaml"
    f.write_text(text + "\nscales:\n  tiny:\n    description: fewer samples\n    set:\n      evaluation.num_samples: 100\n")
    spec = load_spec(f, scale="tiny")
    assert spec.pipeline == "stages/quickstart-tiny" and spec.evaluation.num_samples == 100


def test_validate_checks_every_profile_and_reports_the_scale(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    f = _with_profile(tmp_path / "specs", "      teacher.nosuch.x: 1\n")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["validate", "specs/t1.yaml"])  # no --scale: the broken profile still counts
    assert r.exit_code == 1 and f"specs/t1.yaml:{_line(f, 'teacher.nosuch.x')}:" in r.stderr
    r = CliRunner().invoke(app, ["validate", "--format", "json", "--scale", "smoke", str(ROOT / "specs/table1.yaml")])
    assert r.exit_code == 0, r.output
    [res] = json.loads(r.stdout)
    assert (res["name"], res["scale"], res["stages"]) == ("table1", "smoke", 30)


def test_editor_schema_knows_extends_and_hides_scale():
    schema = json.loads((ROOT / "specs/spec.schema.json").read_text())
    assert "scale" not in schema["properties"] and "scales" in schema["properties"]
    assert "teacher" not in schema["required"] and {"required": ["extends"]} in schema["anyOf"]
