"""Ablation specs (sferd-method.md §13): `extends` (set-up from another spec), `start_from` (a chain that branches
off another chain's student), the four ImageNet 64×64 ablations sharing table2's teacher and PD chain, and
`dvc repro --dry` on every paper pipeline."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from workspace import run

from sferd.pipeline.graph import build_graph
from sferd.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ("ablation-psi", "ablation-w", "ablation-sigma", "ablation-components")
PAPER_PIPELINES = ("table1", "table2", *ABLATIONS)


def _stages(name: str) -> dict:
    return YAML(typ="safe").load((ROOT / f"stages/{name}/dvc.yaml").read_text())["stages"]


# ------------------------------------------------------------------------------------------------ extends


BASE = """\
schema_version: 1
name: base
pipeline: stages/base
seed: 3
dataset: {id: digits-8x8}
features: {kind: digits-cnn, updates: 10}
teacher:
  kind: train
  model: {base_channels: 16, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [4], norm_groups: 8}
  parameterization: x
  loss_weighting: truncated_snr
  updates: 10
  batch_size: 8
  lr: 1.0e-3
methods:
  - {kind: pd, name: pd, start_steps: 16, end_steps: 2, updates_per_halving: 5, batch_size: 8, lr: 1.0e-4}
evaluation:
  teacher_steps: [4]
  student_steps: [2, 4]
  num_samples: 10
  feature_extractor: digits-cnn
table: {id: base, title: Base}
"""

CHILD = """\
schema_version: 1
name: child
extends: base.yaml
pipeline: stages/child
methods:
  - {kind: pd, name: pd, start_steps: 16, end_steps: 4, updates_per_halving: 5, batch_size: 8, lr: 1.0e-4}
  - kind: sferd
    name: ag
    start_from: pd
    start_steps: 8
    end_steps: 4
    updates_per_halving: 5
    batch_size: 8
    lr: 1.0e-4
    guidance: {attention_block: {part: decoder, resolution: 4, position: last}, threshold: 0.9, blur_kernel_size: 15}
    predictor: null
    prior: null
evaluation:
  teacher_steps: []
  student_steps: [4]
  num_samples: 10
  feature_extractor: digits-cnn
table: {id: child, title: Child}
"""


def _write(tmp_path: Path, base: str = BASE, child: str = CHILD) -> Path:
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "child.yaml").write_text(child)
    return tmp_path / "child.yaml"


def test_extends_inherits_set_up_fields_whole_and_keeps_its_identity(tmp_path):
    spec = load_spec(_write(tmp_path))
    base = load_spec(tmp_path / "base.yaml")
    assert (spec.seed, spec.dataset, spec.features, spec.teacher) == (base.seed, base.dataset, base.features, base.teacher)
    assert (spec.name, spec.pipeline, spec.table.id) == ("child", "stages/child", "child")
    assert [m.name for m in spec.methods] == ["pd", "ag"] and spec.evaluation.student_steps == [4]
    # the child's own set-up field wins, whole: `seed` written here replaces the base's
    spec = load_spec(_write(tmp_path, child=CHILD.replace("pipeline: stages/child\n", "pipeline: stages/child\nseed: 7\n")))
    assert spec.seed == 7
    # identity is never inherited: without `table` the child is invalid, not a copy of the base's table
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, child=CHILD.replace("table: {id: child, title: Child}\n", "")))
    assert [i.loc for i in e.value.issues] == ["table"] and e.value.issues[0].path.endswith("child.yaml")


def test_errors_in_inherited_fields_point_into_the_base_file(tmp_path):
    bad_base = BASE.replace("  batch_size: 8\n  lr: 1.0e-3\n", "  batch_size: 0\n  lr: 1.0e-3\n")
    child = _write(tmp_path, base=bad_base)
    with pytest.raises(SpecError) as e:
        load_spec(child, display_path="specs/child.yaml")
    [issue] = e.value.issues
    line = bad_base.splitlines().index("  batch_size: 0") + 1
    assert (issue.path, issue.line, issue.loc) == ("specs/base.yaml", line, "teacher.batch_size")
    # a semantic check on an inherited field is located there too (the base's teacher has no 8×8 attention)
    bad_base = BASE.replace("attention_resolutions: [4]", "attention_resolutions: [4, 3]")
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, base=bad_base), display_path="specs/child.yaml")
    assert {(i.path, i.loc) for i in e.value.issues} >= {("specs/base.yaml", "teacher.model.attention_resolutions.1")}


@pytest.mark.parametrize(
    "value, base_extends, message",
    [
        ("nope.yaml", False, "no spec file specs/nope.yaml to extend"),
        ("child.yaml", False, "a spec cannot extend itself"),
        ("3", False, "takes the path of another spec file"),
        ("base.yaml", True, "specs/base.yaml itself extends other.yaml: extend that spec directly (one level only)"),
    ],
)
def test_bad_extends_is_a_located_error(tmp_path, value, base_extends, message):
    base = BASE.replace("pipeline: stages/base\n", "pipeline: stages/base\nextends: other.yaml\n") if base_extends else BASE
    child = _write(tmp_path, base=base, child=CHILD.replace("extends: base.yaml", f"extends: {value}"))
    with pytest.raises(SpecError) as e:
        load_spec(child, display_path="specs/child.yaml")
    [issue] = e.value.issues
    assert (issue.path, issue.line, issue.col) == ("specs/child.yaml", 3, 10)
    assert message in issue.message


def test_a_clash_between_inherited_and_own_fields_points_at_extends(tmp_path):
    """The base is valid on its own; the child's methods (down to 4 steps) clash with the inherited evaluation."""
    child = CHILD[:CHILD.index("evaluation:")] + "table: {id: child, title: Child}\n"
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, child=child), display_path="specs/child.yaml")
    assert {(i.path, i.line, i.col) for i in e.value.issues} == {("specs/child.yaml", 3, 10)}
    assert any(i.loc == "evaluation.student_steps.0 (inherited from specs/base.yaml)"
               and "produces no 2-step student" in i.message for i in e.value.issues)


def test_an_impossible_extends_path_is_a_located_error(tmp_path):
    child = _write(tmp_path, child=CHILD.replace("extends: base.yaml", f"extends: {'x' * 300}.yaml"))
    with pytest.raises(SpecError) as e:
        load_spec(child)
    [issue] = e.value.issues
    assert issue.line == 3 and "cannot use" in issue.message


# --------------------------------------------------------------------------------------------- start_from


def test_a_branch_starts_from_the_named_chains_student(tmp_path):
    stages = {s.name: s for s in build_graph(load_spec(_write(tmp_path)), spec_path="child.yaml")}
    assert [n for n in stages if n.startswith("digits-ag-")] == ["digits-ag-s0004", "digits-ag-s0004-fid"]
    ag = stages["digits-ag-s0004"]
    assert ag.params["teacher"]["checkpoint"] == "results/digits-pd-s0008/model.pt"
    assert ag.params["teacher"]["is_original_teacher"] is False
    assert ag.params["teacher"]["model"] == ag.params["model"]  # a student (dropout 0), not the teacher network
    assert "results/digits-pd-s0008" in ag.deps and ag.params["guidance"]["threshold"] == 0.9
    # the branch comes after the stage it starts from
    order = list(stages)
    assert order.index("digits-pd-s0008") < order.index("digits-ag-s0004")


def test_identical_branches_share_stages_and_the_predictor_learns_against_the_branch_teacher(tmp_path):
    ag = CHILD[CHILD.index("  - kind: sferd\n"):CHILD.index("evaluation:")]
    both = ag.replace("name: ag", "name: both").replace(
        "    predictor: null\n    prior: null\n",
        "    predictor: {latent_dim: 16, updates: 5}\n    prior: {width: 32, num_layers: 2, updates: 5}\n")
    assert both != ag.replace("name: ag", "name: both")
    spec = load_spec(_write(tmp_path, child=CHILD.replace("evaluation:", both + "evaluation:", 1)))
    stages = {s.name: s for s in build_graph(spec, spec_path="child.yaml")}
    assert "digits-both-s0004" not in stages  # same chain as `ag`: trained once
    pred = stages["digits-both-s0004-predictor"]
    assert pred.params["student"]["checkpoint"] == "results/digits-ag-s0004/model.pt"
    assert pred.params["teacher"]["checkpoint"] == "results/digits-pd-s0008/model.pt"  # T_2K of the branch


@pytest.mark.parametrize(
    "edit, loc, message",
    [
        ("    start_from: pd\n", "methods.1.start_from", "method 'xx' does not exist"),
        ("    start_steps: 8\n", "methods.1.start_steps", "method 'pd' produces no 32-step student"),
    ],
)
def test_bad_start_from_is_a_located_error(tmp_path, edit, loc, message):
    new = {"    start_from: pd\n": "    start_from: xx\n", "    start_steps: 8\n": "    start_steps: 32\n"}[edit]
    child = CHILD.replace(edit, new)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, child=child), display_path="specs/child.yaml")
    assert any(i.loc == loc and message in i.message and i.line == child.splitlines().index(new.rstrip("\n")) + 1
               for i in e.value.issues), e.value


def test_start_from_a_later_method_or_itself_is_refused(tmp_path):
    methods = CHILD[CHILD.index("  - {kind: pd"):CHILD.index("evaluation:")]
    pd_line, rest = methods.split("\n", 1)
    swapped = CHILD.replace(methods, rest + pd_line + "\n")  # the branch listed before the chain it starts from
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, child=swapped))
    assert any("method 'pd' is listed after this one" in i.message for i in e.value.issues)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, child=CHILD.replace("    start_from: pd\n", "    start_from: ag\n")))
    assert any("cannot start from its own student" in i.message for i in e.value.issues)


# ----------------------------------------------------------------------------------- paper-scale ablations

GRIDS = {  # sferd-method.md §13: axis, grid, the paper's best
    "ablation-psi": ("threshold", [0.8, 0.9, 1.0, 1.1, 1.2], 1.0),
    "ablation-w": ("strength", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.3),
    "ablation-sigma": ("blur_sigma", [1.0, 3.0, 5.0], 3.0),
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_knob_ablations_sweep_the_papers_grid_one_axis_at_a_time(name):
    spec = load_spec(ROOT / f"specs/{name}.yaml")
    table2 = load_spec(ROOT / "specs/table2.yaml")
    axis, grid, best = GRIDS[name]
    assert spec.extends == "table2.yaml" and spec.teacher == table2.teacher and spec.dataset == table2.dataset
    assert spec.evaluation.student_steps == [4] and spec.evaluation.num_samples == 50000
    pd, *points = spec.methods
    assert pd.kind == "pd" and pd.chain_params() | {"end_steps": 1} == table2.methods[0].chain_params()
    assert [getattr(m.guidance, axis) for m in points] == grid
    default = table2.methods[1].guidance.model_dump()
    for m in points:
        assert m.predictor is None and m.prior is None  # §13: without the predictor
        assert (m.start_from, m.start_steps, m.end_steps) == ("pd", 8, 4)
        assert m.guidance.model_dump() | {axis: default[axis]} == default  # every other knob at table2's value
        assert (m.name == "ag") == (getattr(m.guidance, axis) == best)
    assert all(v is None for r in spec.reported for v in r.values.values())
    assert all("not recovered" in r.reason for r in spec.reported)


def test_components_ablation_has_the_four_rows():
    spec = load_spec(ROOT / "specs/ablation-components.yaml")
    table2 = load_spec(ROOT / "specs/table2.yaml")
    pd, ag, sgp, both = spec.methods
    assert (pd.kind, ag.predictor, sgp.guidance) == ("pd", None, None)
    assert ag.guidance == both.guidance == table2.methods[1].guidance
    assert sgp.predictor == both.predictor == table2.methods[1].predictor
    assert sgp.prior == both.prior == table2.methods[1].prior
    names = [s.name for s in build_graph(spec, spec_path="specs/ablation-components.yaml")]
    # `both` trains no halving of its own: its chain is `ag`'s; `sgp` trains none either (PD's)
    assert not any(re.fullmatch(r"imagenet64-(both|sgp)-s\d{4}", n) for n in names)
    assert {"imagenet64-sgp-s0004-predictor", "imagenet64-both-s0004-predictor"} <= set(names)


def test_ablations_share_table2s_teacher_and_chain_and_train_each_point_once():
    table2 = _stages("table2")
    own = {name: _stages(name) for name in ABLATIONS}
    everything = {**table2, **{k: v for stages in own.values() for k, v in stages.items()}}
    assert len(everything) == len(table2) + sum(len(s) for s in own.values())  # no stage in two files
    for name, stages in own.items():
        graph = [s.name for s in build_graph(load_spec(ROOT / f"specs/{name}.yaml"), spec_path=f"specs/{name}.yaml")]
        shared = [n for n in graph if n not in stages]
        assert {"imagenet64-teacher", "imagenet64-pd-s0008", "imagenet64-pd-s0004-fid"} <= set(shared)
        assert all(n in everything for n in graph)  # every stage of the spec is compiled somewhere
        assert not any(n.startswith("imagenet64-pd-") for n in stages)  # the PD chain is table2's
    homes = [name for name, stages in own.items() if "imagenet64-ag-s0004" in stages]
    assert homes == ["ablation-components"]  # the paper's best point: one stage for all four ablations
    produced = {next(iter(o)) if isinstance(o, dict) else o for st in everything.values()
                for o in st.get("outs", []) + st.get("metrics", [])}
    # code comes through the fingerprint files of the root pipeline's code-fingerprints stage, the one home of
    # that shared stage; no paper pipeline lists a source file itself
    root = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    produced |= set(root["code-fingerprints"]["outs"])
    for stages in own.values():
        for st in stages.values():
            assert all(d in produced for d in st["deps"]), [d for d in st["deps"] if d not in produced]


def _dry_run_stages(pipeline: str) -> list[str]:
    # --force: on a fresh clone every stage is due, and DVC (#9021) cannot compute the status of a stage whose
    # upstream outputs do not exist yet; forced, it lists the stages without looking at them.
    r = run(["dvc", "repro", "--dry", "--force", f"stages/{pipeline}/dvc.yaml"], ROOT)
    return re.findall(r"Running stage '(?:[^']*:)?([a-z0-9-]+)'", r.stdout)  # root stages have no file prefix


@pytest.mark.skipif(shutil.which("git") is None, reason="dvc needs git")
@pytest.mark.usefixtures("checkout_dvc_lock")  # conftest.py: DVC in this checkout, one test at a time
@pytest.mark.parametrize("pipeline", PAPER_PIPELINES)
def test_dvc_repro_dry_lists_exactly_the_specs_stages_in_a_valid_order(pipeline):
    spec = load_spec(ROOT / f"specs/{pipeline}.yaml")
    graph = build_graph(spec, spec_path=f"specs/{pipeline}.yaml")
    listed = _dry_run_stages(pipeline)
    # plus the root pipeline's code fingerprint stage, which every stage's code dep comes from: first
    assert listed[0] == "code-fingerprints"
    listed = listed[1:]
    assert sorted(listed) == sorted(s.name for s in graph)
    producer = {o: s.name for s in graph for o in (*s.outs, *s.metrics)}
    pos = {n: k for k, n in enumerate(listed)}
    for s in graph:
        for d in s.deps:
            if d in producer:
                assert pos[producer[d]] < pos[s.name], f"{s.name} listed before {producer[d]}"
