"""One-way layering of the package, and a cache that moves only when results do (issue 10).

Imports are read statically (sferd.pipeline.codedeps's AST scanner, which also sees imports inside functions and
relative imports), the same view from which every stage's DVC code deps are compiled. Layers, each importing only
its own and lower ones:

    cli
    pipeline            compiler (graph, dvcfile, codedeps) and stage runtime (run, stages/, distributed)
    spec                models and checks, compiled by the pipeline; never imports it
    methods, metrics, report
    nn, diffusion, data
    util                errors, atomic artifact I/O, progress, seeding: below everything

The compiler reads spec models, so `pipeline` sits above `spec`; what a stage runs must not import the spec
package or the compiler at all (a spec or compiler edit would otherwise re-run every stage).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from sferd.pipeline.codedeps import _imports, code_fingerprint, stage_code
from sferd.pipeline.fingerprints import FINGERPRINT_STAGE, fingerprint_text

ROOT = Path(__file__).resolve().parents[1]
RANK = {"util": 0, "nn": 1, "diffusion": 1, "data": 1, "methods": 2, "metrics": 2, "report": 2, "spec": 3,
        "pipeline": 4, "cli": 5}
LOWER = {name for name, rank in RANK.items() if rank <= RANK["report"]}
# Files a stage may never depend on: the spec package, the compiler and the CLI.
NOT_STAGE_CODE = ("sferd/spec/", "sferd/cli.py", "sferd/pipeline/graph.py", "sferd/pipeline/dvcfile.py")
FID_KINDS = ("fid", "fid_sferd", "reference")


def _module(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    """'sferd' itself (it only carries the version) has no layer: anything may read sferd.__version__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _dynamic_imports(path: Path) -> list[str]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name not in ("import_module", "__import__"):
                continue
            target = node.args[0] if node.args else None
            if isinstance(target, ast.Constant) and isinstance(target.value, str) and not (
                    target.value == "sferd" or target.value.startswith(("sferd.", "."))):
                continue  # a fixed module outside the package (e.g. `__import__("sys")`): nothing to layer
            calls.append(f"{path.name}:{node.lineno} {name}()")
    return calls


def layering_violations(root: Path) -> list[str]:
    """Every import that goes up the layers, every module outside a known layer, every dynamic import in the
    lower layers of a package module or of a computed name (the static scan cannot follow those)."""
    problems = []
    for path in sorted((root / "sferd").rglob("*.py")):
        module = _module(root, path)
        layer = _layer(module)
        if layer is None:
            problems += [f"sferd/__init__.py imports {m}" for m in _imports(path, module) if m != "sferd"]
            continue
        if layer not in RANK:
            problems.append(f"{module}: no layer assigned (add its package to RANK in {Path(__file__).name})")
            continue
        for imported in sorted(_imports(path, module)):
            target = _layer(imported)
            if target is not None and target in RANK and RANK[target] > RANK[layer]:
                problems.append(f"{module} ({layer}) imports {imported} ({target})")
        if layer in LOWER:
            problems += [f"{module}: dynamic import {c}" for c in _dynamic_imports(path)]
    return problems


def test_imports_only_go_down_the_layers():
    assert layering_violations(ROOT) == []


def test_the_layering_check_catches_upward_imports(tmp_path):
    """The check above can fail: plant violations (lazy, relative, submodule, dynamic) in a copy of the package."""
    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    planted = {
        "sferd/data/planted_a.py": "def f():\n    from ..pipeline.stages.common import load_model\n",
        "sferd/nn/planted_b.py": "import sferd.spec.models\n",
        "sferd/util/planted_c.py": "from sferd.metrics import keys\n",
        "sferd/metrics/planted_d.py": "from sferd.pipeline import run\n",
        "sferd/report/planted_e.py": "import importlib\nm = importlib.import_module('sferd.pipeline.run')\n",
        "sferd/diffusion/planted_g.py": "def f(name):\n    return __import__(name)\n",
        "sferd/spec/planted_f.py": "from sferd.pipeline.graph import build_graph\n",
        "sferd/newlayer/__init__.py": "",
    }
    for rel, text in planted.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = "\n".join(layering_violations(tmp_path))
    for needle in ["sferd.data.planted_a (data) imports sferd.pipeline.stages.common",
                   "sferd.nn.planted_b (nn) imports sferd.spec.models",
                   "sferd.util.planted_c (util) imports sferd.metrics",
                   "sferd.metrics.planted_d (metrics) imports sferd.pipeline",
                   "sferd.report.planted_e: dynamic import",
                   "sferd.diffusion.planted_g: dynamic import",
                   "sferd.spec.planted_f (spec) imports sferd.pipeline.graph",
                   "sferd.newlayer: no layer assigned"]:
        assert needle in found, found


def _kinds() -> list[str]:
    return sorted(p.stem for p in (ROOT / "sferd/pipeline/stages").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("kind", _kinds())
def test_stage_code_holds_no_spec_or_compiler_code(kind):
    deps = stage_code(str(ROOT), kind)
    assert f"sferd/pipeline/stages/{kind}.py" in deps
    assert [d for d in deps if d.startswith(NOT_STAGE_CODE)] == []


def test_feature_stage_does_not_run_fid_code_and_fid_stages_do_not_run_the_training_loop():
    """The feature network is trained by the training engine (so it does depend on the loop), but nothing of
    the FID code; the FID stages sample and measure, and run nothing of the training loop."""
    features = stage_code(str(ROOT), "features")
    assert "sferd/nn/digits_cnn.py" in features  # the network it trains: a real dependency
    assert [d for d in features if d.startswith("sferd/metrics/")] == []
    for kind in FID_KINDS:
        deps = stage_code(str(ROOT), kind)
        assert "sferd/metrics/fid.py" in deps and "sferd/methods/training.py" not in deps, kind


# ------------------------------------------------------------------------------------------------ edits


def _copy(tmp_path: Path, name: str, edit: str | None = None) -> Path:
    """A copy of the package (in a fresh folder: codedeps caches parses by path) with `edit`'s file changed."""
    root = tmp_path / name
    shutil.copytree(ROOT / "sferd", root / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        path = root / edit
        # a real code change: a new function with a new import of a package module
        path.write_text(path.read_text(encoding="utf-8")
                        + "\n\ndef _edited():\n    from sferd.util.errors import StageError\n\n    return StageError\n")
    return root


def _compiled_quickstart(root: Path) -> dict[str, dict]:
    """The quickstart's root dvc.yaml as compiled against the package under `root`: stage name → stage, with
    the stage's kind from the compiled params."""
    import json

    from sferd.pipeline.dvcfile import pipeline_files
    from sferd.pipeline.graph import build_graph
    from sferd.spec import load_spec

    spec = load_spec(ROOT / "specs/quickstart.yaml", display_path="specs/quickstart.yaml")
    # code_kinds=set(): the quickstart holds the code fingerprint stage, for its own kinds
    files = pipeline_files(build_graph(spec, spec_path="specs/quickstart.yaml"), pipeline=spec.pipeline,
                           root=str(root), code_kinds=set())
    assert spec.pipeline in ("", ".")  # the quickstart is the root pipeline
    stages = YAML(typ="safe").load(files["dvc.yaml"])["stages"]
    params = json.loads(files["params.json"])
    code = params[FINGERPRINT_STAGE]["stage_code"]
    # each stage with the source files its kind's fingerprint file covers
    return {name: {**stage, "kind": params[name]["kind"], "code": code[params[name]["kind"]]}
            for name, stage in stages.items() if name != FINGERPRINT_STAGE}


@pytest.mark.parametrize(
    "edited, unaffected, affected",
    [
        ("sferd/metrics/fid.py", ("features",), ("fid", "fid_sferd", "reference")),
        ("sferd/methods/training.py", FID_KINDS, ("teacher", "distill", "predictor", "prior", "features")),
    ],
    ids=["fid-code", "training-loop"],
)
def test_editing_code_moves_only_the_stages_that_run_it(tmp_path, edited, unaffected, affected):
    before, after = _copy(tmp_path, "before"), _copy(tmp_path, "after", edit=edited)
    dvc_before, dvc_after = _compiled_quickstart(before), _compiled_quickstart(after)
    assert dvc_before.keys() == dvc_after.keys()
    kinds = {stage["kind"] for stage in dvc_before.values()}
    assert set(unaffected) | set(affected) <= kinds  # the quickstart has every stage kind this test is about
    for name, stage in dvc_before.items():
        if stage["kind"] in unaffected:
            # the same dvc.yaml entry (deps, params, outs, cmd), the edited file is not among its code, and its
            # kind's fingerprint file (its code dep) keeps its content, so DVC does not re-run it
            assert dvc_after[name] == stage, name
            assert edited not in stage["code"], name
            assert fingerprint_text(str(after), stage["kind"]) == fingerprint_text(str(before), stage["kind"])
            # nor does the edit move the code fingerprint a stage's checkpoints and resume state carry
            assert code_fingerprint(str(after), stage["kind"]) == code_fingerprint(str(before), stage["kind"])
        if stage["kind"] in affected:  # the control: an edit to code a stage runs does reach it
            assert edited in stage["code"], name
            assert fingerprint_text(str(after), stage["kind"]) != fingerprint_text(str(before), stage["kind"])
            assert code_fingerprint(str(after), stage["kind"]) != code_fingerprint(str(before), stage["kind"])
