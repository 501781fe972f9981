"""`kind: solver` in specs: located errors for the sampler / order / D-ODE calibration rules (issue 12, "Bad input"),
through the real CLI in a throw-away repository (tests/test_hostile_specs.py's harness: exit 1, file:line:col of
the offending text, nothing written), and the stage graph a valid solver spec compiles to."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_hostile_specs import EVIL, _at, _refused, repo  # noqa: F401  (`repo` is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def _with(method: str) -> str:
    """tiny.yaml (as stages/evil, student steps 1 and 2) with one more method appended."""
    return EVIL.replace("evaluation:\n", method + "evaluation:\n")


def _solver(sampler: str, extra: str = "") -> str:
    return f"  - kind: solver\n    name: x\n    label: X\n    sampler: {sampler}\n{extra}"


CAL = "    calibration: {teacher_sampler: ddim, factor: 4, batch_size: 8, seed: 0}\n"

CASES = [
    # (id, method text, (needle, prefix) locating the error, message fragment)
    ("cld-sampler-on-vp-teacher", _solver("gddim_cld"), ("gddim_cld", "sampler: "), "the spec's teacher is a VP model"),
    ("gddim-order-above-steps", _solver("gddim", "    order: 2\n"), ("2\n", "order: "),
     "order 2 needs at least 3 steps"),
    ("gddim-order-above-row-steps", _solver("gddim", "    order: 3\n    steps: [8, 3]\n"), ("3\n", "order: "),
     "this row's `steps` has 3"),
    ("d-gddim-order-above-steps", _solver("d_gddim", "    order: 2\n" + CAL), ("2\n", "order: "),
     "order 2 needs at least 3 steps"),
    ("gddim-without-order", _solver("gddim"), ("gddim", "sampler: "), "needs an `order`"),
    ("order-on-ddim", _solver("ddim", "    order: 1\n"), ("1\n", "order: "), "ddim has no order"),
    ("order-out-of-range", _solver("gddim", "    order: 4\n"), ("4\n", "order: "), "less than or equal to 3"),
    ("d-ddim-without-calibration", _solver("d_ddim"), ("d_ddim", "sampler: "), "needs a `calibration` block"),
    ("calibration-on-plain-sampler", _solver("euler_pf", CAL), ("teacher_sampler", "calibration: {"),
     "fits no λ's"),
    ("factor-one", _solver("d_ddim", CAL.replace("factor: 4", "factor: 1")), ("1,", "factor: "),
     "the teacher solver the student itself"),
    ("factor-and-teacher-steps", _solver("d_ddim", CAL.replace("factor: 4", "factor: 4, teacher_steps: 8")),
     ("teacher_sampler", "calibration: {"), "exactly one of them"),
    ("neither-factor-nor-teacher-steps", _solver("d_ddim", CAL.replace("factor: 4, ", "")),
     ("teacher_sampler", "calibration: {"), "exactly one of them"),
    ("student-steps-not-below-teacher", _solver("d_ddim", CAL.replace("factor: 4", "teacher_steps: 2")),
     ("2,", "teacher_steps: "), "not fewer than the teacher solver's 2"),
    ("teacher-steps-not-a-multiple", _solver("d_ddim", CAL.replace("factor: 4", "teacher_steps: 5")),
     ("5,", "teacher_steps: "), "not a multiple of the student's 2"),
    ("gddim-teacher-without-order", _solver("d_ddim", CAL.replace("teacher_sampler: ddim", "teacher_sampler: gddim")),
     ("gddim,", "teacher_sampler: "), "needs a `teacher_order`"),
    ("order-on-ddim-teacher", _solver("d_ddim", CAL.replace("factor: 4", "factor: 4, teacher_order: 1")),
     ("1,", "teacher_order: "), "the ddim teacher solver has no order"),
    ("teacher-order-above-teacher-steps",
     _solver("d_ddim", CAL.replace("teacher_sampler: ddim, factor: 4",
                                   "teacher_sampler: gddim, teacher_order: 3, factor: 2")),
     ("3,", "teacher_order: "), "order 3 needs at least 4 teacher steps; at NFE 1 the teacher takes 2"),
    ("unknown-teacher-solver", _solver("d_ddim", CAL.replace("teacher_sampler: ddim", "teacher_sampler: euler_pf")),
     ("euler_pf", "teacher_sampler: "), "Input should be 'ddim' or 'gddim'"),
    ("unknown-sampler", _solver("heun"), ("heun", "sampler: "), "Input should be"),
    ("reserved-name", _solver("ddim").replace("name: x", "name: teacher"), ("teacher\n", "name: "),
     "the name of a fixed stage"),
]


@pytest.mark.parametrize("method, where, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_solver_rules_are_located_errors(repo, method, where, fragment):  # noqa: F811
    text = _with(method)
    needle, prefix = where
    start = text.index("  - kind: solver\n")
    line, col = _at(text[start:], needle, prefix)
    line += text.count("\n", 0, start)
    _refused(repo, text, (line, col), fragment)


def test_a_valid_solver_spec_compiles_to_its_stages():
    from sferd.pipeline.graph import build_graph, bundle
    from sferd.spec import load_spec

    spec = load_spec(ROOT / "tests/specs/solver-tiny.yaml", display_path="tests/specs/solver-tiny.yaml")
    stages = {s.name: s for s in build_graph(spec, spec_path="tests/specs/solver-tiny.yaml")}
    mine = {n: s.kind for n, s in stages.items() if s.kind in ("fid_solver", "dode_calibration")}
    assert mine == {
        "digits-ddim-s0001-fid": "fid_solver", "digits-ddim-s0002-fid": "fid_solver",
        "digits-euler-s0001-fid": "fid_solver", "digits-euler-s0002-fid": "fid_solver",
        "digits-gddim2-s0002-fid": "fid_solver",  # `steps: [2]`: order 1 cannot run 1 step
        "digits-d-ddim-s0001-calibration": "dode_calibration", "digits-d-ddim-s0002-calibration": "dode_calibration",
        "digits-d-ddim-s0001-fid": "fid_solver", "digits-d-ddim-s0002-fid": "fid_solver",
        # d-ddim-again asks for the very same fit: it reuses d-ddim's calibration stages
        "digits-d-ddim-again-s0001-fid": "fid_solver", "digits-d-ddim-again-s0002-fid": "fid_solver",
        "digits-d-gddim-s0002-calibration": "dode_calibration", "digits-d-gddim-s0002-fid": "fid_solver",
    }
    teacher = "results/digits-teacher"
    cal = stages["digits-d-ddim-s0002-calibration"]
    p = cal.params
    assert (p["student_steps"], p["teacher_steps"], p["factor"], p["batch_size"], p["seed"]) == (2, 8, 4, 8, 7)
    assert p["sampler"] == {"base": "ddim"} and p["teacher_solver"] == {"base": "ddim"} and p["clip"] is True
    assert p["chunk_size"] == spec.evaluation.sample_batch_size
    assert p["teacher"]["checkpoint"] == f"{teacher}/model.pt" and p["teacher"]["parameterization"] == "x"
    assert p["teacher"]["model"] == stages["digits-teacher"].params["model"]
    assert cal.deps == (teacher,) and cal.outs == ("results/digits-d-ddim-s0002-calibration",)
    assert p["outputs"]["lambdas"] == "results/digits-d-ddim-s0002-calibration/lambdas.json"
    # teacher_steps: 8 for a 2-step student is K = 4; the gDDIM base carries its order
    g = stages["digits-d-gddim-s0002-calibration"].params
    assert (g["teacher_steps"], g["factor"], g["sampler"]) == (8, 4, {"base": "gddim", "order": 1})
    for row in ("d-ddim", "d-ddim-again"):
        fid = stages[f"digits-{row}-s0002-fid"]
        assert fid.params["source"]["lambdas"] == p["outputs"]["lambdas"]
        assert fid.params["source"]["sampler"] == {"name": "d_ddim", "clip": True}
        assert "results/digits-d-ddim-s0002-calibration" in fid.deps and teacher in fid.deps
        assert fid.params["steps"] == 2 and fid.params["row"] == row
    src = stages["digits-gddim2-s0002-fid"].params["source"]
    assert src == {"kind": "solver", "checkpoint": f"{teacher}/model.pt", "model": p["teacher"]["model"],
                   "parameterization": "x", "sampler": {"name": "gddim", "clip": True, "order": 1}}
    assert "lambdas" not in stages["digits-ddim-s0001-fid"].params["source"]
    # row granularity: one FID bundle per method, the calibrations of one fit owner in one
    groups = {s.group for s in stages.values() if s.kind in ("fid_solver", "dode_calibration")}
    assert {"digits-d-ddim-calibration", "digits-d-gddim-calibration", "digits-d-ddim-fid",
            "digits-d-ddim-again-fid", "digits-gddim2-fid"} <= groups
    bundled = {s.name for _, s in bundle([("stages/solver-tiny", s) for s in stages.values()])}
    assert "digits-d-ddim-calibration" in bundled and "digits-d-ddim-again-fid" in bundled


def test_committed_specs_keep_their_stages():
    """The solver kind adds stages only where a spec asks for it: table 1's and the quickstart's graphs hold none."""
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    for rel in ("specs/quickstart.yaml", "specs/table1.yaml"):
        kinds = {s.kind for s in build_graph(load_spec(ROOT / rel, display_path=rel), spec_path=rel)}
        assert not kinds & {"fid_solver", "dode_calibration"}, rel
