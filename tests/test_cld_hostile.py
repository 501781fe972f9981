"""Bad CLD rows (issue 12): located errors through the real CLI before any compute, nothing written — in
tests/test_hostile_specs.py's style and with its helpers (its `repo` holds tiny.yaml as specs/root.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_hostile_specs import _at, _refused, repo, runner  # noqa: F401  (repo is a fixture)

from sferd.cli import app

ROOT = Path(__file__).resolve().parents[1]
CLD = (ROOT / "tests/specs/tiny-cld.yaml").read_text(encoding="utf-8").replace("extends: tiny.yaml", "extends: root.yaml")


def test_the_tiny_cld_spec_itself_is_valid(repo):
    (repo / "specs/cld.yaml").write_text(CLD)
    r = runner.invoke(app, ["validate", "specs/cld.yaml"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("value, message", [
    ("spec", "the spec's teacher is a VP model"),
    ("teacher", "the spec's teacher is a VP model"),
])
def test_a_cld_row_cannot_sample_the_specs_vp_teacher(repo, value, message):
    text = CLD.replace("teacher: *cld, sampler: {kind: euler}", f"teacher: {value}, sampler: {{kind: euler}}")
    _refused(repo, text, _at(text, value, "teacher: "), message)


def test_an_external_vp_checkpoint_is_not_a_cld_teacher(repo):
    block = "{kind: external, path: results/digits-teacher/model.pt, sha256: " + "a" * 64 + "}"
    text = CLD.replace("teacher: *cld, sampler: {kind: euler}", f"teacher: {block}, sampler: {{kind: euler}}")
    _refused(repo, text, _at(text, "kind: external", "teacher: {"), "an external checkpoint cannot be a CLD teacher")


def test_a_gddim_order_above_the_steps_taken(repo):
    text = CLD.replace("student_steps: [4, 8]", "student_steps: [8, 3]")
    where = _at(text, "3}", "name: cld-q3, label: CLD + gDDIM (q=3), teacher: *cld, sampler: {kind: gddim, order: ")
    errors = _refused(repo, text, where, "at 3 NFE (evaluation.student_steps.1) only 3 steps are taken")
    assert len(errors) == 1  # orders 0-2 are reached in 3 steps


@pytest.mark.parametrize("line, needle, message", [
    ("beta: -1.0", "-1.0", "greater than 0"),
    ("m_inv: 0.0", "0.0", "greater than 0"),
    ("gamma: 2.0", "2.0", "less than or equal to 1"),
    ("t_min: 0.5", "0.5", "less than or equal to 0.1"),
    ("beta: .nan", ".nan", "numbers must be finite"),
])
def test_cld_constants_out_of_range(repo, line, needle, message):
    text = CLD.replace("      updates: 12\n", f"      process: {{{line}}}\n      updates: 12\n", 1)
    _refused(repo, text, _at(text, needle, "process: {" + line.split(":")[0] + ": "), message)


def test_a_process_that_does_not_reach_its_prior(repo):
    text = CLD.replace("      updates: 12\n", "      process:\n        beta: 0.5\n      updates: 12\n", 1)
    _refused(repo, text, _at(text, "beta: 0.5"), "β·√M⁻¹ = 1 < 2")


def test_one_teacher_name_with_two_settings(repo):
    text = CLD.replace("teacher: *cld, sampler: {kind: euler}", "teacher: {<<: *cld, updates: 13}, sampler: {kind: euler}")
    _refused(repo, text, _at(text, "updates: 13}", "teacher: {<<: *cld, "), "CLD teacher 'cld' is defined by methods.0")


def test_an_unknown_sampler(repo):
    text = CLD.replace("sampler: {kind: euler}", "sampler: {kind: heun}")
    _refused(repo, text, _at(text, "heun"), "euler")


def test_a_rows_own_steps_and_the_order_checked_against_them(repo):
    ok = CLD.replace("student_steps: [4, 8]", "student_steps: [1, 2]").replace(
        "sampler: {kind: gddim, order: 0}", "sampler: {kind: gddim, order: 0}\n    steps: [1, 2]").replace(
        "sampler: {kind: gddim, order: 1}}", "sampler: {kind: gddim, order: 1}, steps: [2, 4]}").replace(
        "sampler: {kind: gddim, order: 2}}", "sampler: {kind: gddim, order: 2}, steps: [4, 8]}").replace(
        "sampler: {kind: gddim, order: 3}}", "sampler: {kind: gddim, order: 3}, steps: [4, 8, 16]}").replace(
        "sampler: {kind: euler}}", "sampler: {kind: euler}, steps: [4, 8]}")
    (repo / "specs/ok.yaml").write_text(ok)
    r = runner.invoke(app, ["validate", "specs/ok.yaml"])
    assert r.exit_code == 0, r.output
    bad = ok.replace("order: 3}, steps: [4, 8, 16]", "order: 3}, steps: [8, 3]")
    _refused(repo, bad, _at(bad, "3}, steps: [8, 3]", "order: "), "at 3 NFE (methods.3.steps.1)")


def test_heads_that_do_not_split_the_cld_unets_attention_channels(repo):
    """The CLD U-Net gets the VP teacher's U-Net checks (one helper): heads that do not divide an attention block's
    channels are refused at the field, not met as a traceback when the teacher stage builds the network."""
    text = CLD.replace("        norm_groups: 4\n", "        norm_groups: 4\n        num_heads: 3\n", 1)
    _refused(repo, text, _at(text, "3", "num_heads: "), "num_heads=3 must divide the 16 channels")
