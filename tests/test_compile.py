"""Spec → stage graph → dvc.yaml: golden file, names, dependency closure, granularity of params."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from sferd.pipeline.fingerprints import FINGERPRINT_STAGE, fingerprint_path
from sferd.pipeline.dvcfile import pipeline_files
from sferd.pipeline.graph import build_graph, bundle
from sferd.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def _compile(spec_rel: str):
    spec = load_spec(ROOT / spec_rel, display_path=spec_rel)
    stages = build_graph(spec, spec_path=spec_rel)  # the parts, whatever the spec's stage_granularity
    dvc_stages = [st for _, st in bundle([(spec.pipeline, st) for st in stages])]  # what `sferd-spec compile` writes
    # code_kinds=set(): this pipeline holds the code fingerprint stage, for its own stage kinds
    files = pipeline_files(dvc_stages, pipeline=spec.pipeline, root=str(ROOT), code_kinds=set())
    return spec, stages, files


def _code_sets(files) -> dict[str, list[str]]:
    """Stage kind → the source files its fingerprint file covers (recorded in the fingerprint stage's params)."""
    return json.loads(files["params.json"])[FINGERPRINT_STAGE]["stage_code"]


def test_quickstart_compiles_to_committed_files():
    """Compiled alone, the quickstart writes the committed files, its code fingerprint stage included: that stage
    lists the stage kinds of every pipeline (the context specs too), whichever specs are compiled."""
    r = subprocess.run([sys.executable, "-m", "sferd.cli", "compile", "specs/quickstart.yaml", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    _, _, files = _compile("specs/quickstart.yaml")
    committed = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    compiled = YAML(typ="safe").load(files["dvc.yaml"])["stages"]
    assert {k: v for k, v in committed.items() if k != FINGERPRINT_STAGE} == {
        k: v for k, v in compiled.items() if k != FINGERPRINT_STAGE}


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
        if name == FINGERPRINT_STAGE:
            assert shlex.split(st["cmd"])[:5] == ["python", "-m", "sferd.pipeline.fingerprints", "--out", "results/code"]
            assert st["params"] == [{"params.sha256.json": [name]}] and order[0] == name  # first: every stage needs it
        else:
            assert shlex.split(st["cmd"]) == ["python", "-m", "sferd.pipeline.launch", "--params", "params.json", name]
            # DVC tracks each stage's own digest (its params.json section, hashed: dvcfile.py)
            assert st["params"] == [{"params.sha256.json": [name]}]
        for out in st.get("outs", []) + st.get("metrics", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path not in produced, f"{path} declared by {produced.get(path)} and {name}"
            produced[path] = name
    for name, st in dvc.items():
        for dep in st["deps"]:
            if dep.startswith("sferd/"):  # source files: deps of the fingerprint stage only
                assert name == FINGERPRINT_STAGE and (ROOT / dep).is_file(), (name, dep)
                continue
            if dep.startswith("assets/"):  # fixed inputs committed to git (the versioned feature weights)
                assert (ROOT / dep).is_file(), dep
                continue
            assert dep in produced, f"{name} depends on {dep}, which no stage produces"
            assert order.index(produced[dep]) < order.index(name), f"{dep} is produced after {name}"


def test_expected_stage_list():
    _, stages, _ = _compile("specs/quickstart.yaml")
    names = [s.name for s in stages]
    kinds = {s.name: s.kind for s in stages}
    assert names[:3] == ["digits-data", "digits-features", "digits-teacher"]
    halvings = [f"s{k:04d}" for k in (8, 4, 2, 1)]
    # two chains: PD (shared by the predictor-only row) and guided SFERD-PD (shared by the guidance-only row)
    assert [n for n in names if re.fullmatch(r"digits-pd-s\d{4}", n)] == [f"digits-pd-{h}" for h in halvings]
    assert [n for n in names if re.fullmatch(r"digits-sferd-s\d{4}", n)] == [f"digits-sferd-{h}" for h in halvings]
    assert not any(re.fullmatch(r"digits-sferd-(ag|sgp)-s\d{4}", n) for n in names)
    for k in (1, 2, 4, 8):
        for method in ("sferd", "sferd-sgp"):  # the rows with a predictor: stage (b) then (c) per evaluated K
            pred, prior = f"digits-{method}-s{k:04d}-predictor", f"digits-{method}-s{k:04d}-prior"
            assert kinds[pred] == "predictor" and kinds[prior] == "prior"
            assert names.index(pred) < names.index(prior) < names.index(f"digits-{method}-s{k:04d}-fid")
            assert kinds[f"digits-{method}-s{k:04d}-fid"] == "fid_sferd"
        for method in ("pd", "sferd-ag"):
            assert kinds[f"digits-{method}-s{k:04d}-fid"] == "fid"
    assert not any(n.startswith(("digits-pd-s0001-pre", "digits-sferd-ag-s0001-pre")) for n in names)
    assert "digits-heldout-fid" in names and "digits-noise-fid" in names
    assert names[-1] == "quickstart-render"


def test_sferd_stages_are_wired_to_the_right_chain():
    """Stage (b) trains on the frozen S_K with T_2K as teacher: the guided chain for SFERD, the PD chain with a
    plain teacher for the predictor-only row; T_2K of the first halving's student is the original teacher."""
    _, stages, _ = _compile("specs/quickstart.yaml")
    by = {s.name: s.params for s in stages}
    full = by["digits-sferd-s0004-predictor"]
    assert full["student"]["checkpoint"] == "results/digits-sferd-s0004/model.pt"
    assert full["teacher"]["checkpoint"] == "results/digits-sferd-s0008/model.pt"
    assert full["guidance"] is not None
    sgp = by["digits-sferd-sgp-s0004-predictor"]
    assert sgp["student"]["checkpoint"] == "results/digits-pd-s0004/model.pt"
    assert sgp["teacher"]["checkpoint"] == "results/digits-pd-s0008/model.pt"
    assert sgp["guidance"] is None
    assert by["digits-sferd-s0008"]["guidance"] is not None and by["digits-pd-s0008"]["guidance"] is None
    ag_fid = by["digits-sferd-ag-s0002-fid"]["source"]
    assert ag_fid["checkpoint"] == "results/digits-sferd-s0002/model.pt"


def test_code_deps_are_specific():
    """A stage depends on the modules it imports, not the whole package (a CLI edit must not retrain)."""
    _, _, files = _compile("specs/quickstart.yaml")
    dvc = YAML(typ="safe").load(files["dvc.yaml"])["stages"]
    code = _code_sets(files)
    # each stage depends on its kinds' fingerprint files and on no source file directly
    assert [d for d in dvc["digits-teacher"]["deps"] if d.startswith(("sferd/", "results/code/"))] == [
        fingerprint_path("teacher")]
    assert fingerprint_path("distill") in dvc["digits-pd-chain"]["deps"]  # the bundle of the PD halvings
    assert fingerprint_path("render") in dvc["quickstart-render"]["deps"]
    # the fingerprint stage covers each of those files' sources, and only the files that kind imports
    outs = dvc[FINGERPRINT_STAGE]["outs"]
    assert {fingerprint_path(k) for k in ("teacher", "distill", "render")} <= set(outs)
    teacher = code["teacher"]
    assert "sferd/methods/teacher.py" in teacher
    assert "sferd/nn/unet.py" in teacher
    assert "sferd/cli.py" not in teacher
    assert "sferd/report/table.py" not in teacher
    assert "sferd/methods/pd.py" not in teacher
    assert "sferd/methods/pd.py" in code["distill"]
    assert "sferd/nn/unet.py" not in code["render"]
    assert "sferd/report/templates/table.md.j2" in code["render"]
    assert set(dvc[FINGERPRINT_STAGE]["deps"]) == {f for files in code.values() for f in files} | {
        "sferd/pipeline/codedeps.py", "sferd/pipeline/fingerprints.py"}


def test_pd_param_change_touches_only_pd_sections(tmp_path):
    """A learning rate given on the PD block alone (overriding the shared anchor) re-parameterises the PD
    halvings and nothing upstream or in the guided chain."""
    src = (ROOT / "specs/quickstart.yaml").read_text()
    changed = tmp_path / "q.yaml"
    anchor = "    label: PD\n"
    assert src.count(anchor) == 1
    changed.write_text(src.replace(anchor, anchor + "    lr: 3.0e-4\n"))
    base = {s.name: s.params for s in build_graph(load_spec(ROOT / "specs/quickstart.yaml"), spec_path="specs/quickstart.yaml")}
    new = {s.name: s.params for s in build_graph(load_spec(changed), spec_path="specs/quickstart.yaml")}
    differ = {n for n in base if n in new and base[n] != new[n]}
    pd_chain = {n for n in base if re.fullmatch(r"digits-pd-s\d{4}", n)}
    assert pd_chain <= differ
    untouched = {n for n in base if re.fullmatch(r"digits-(data|features|teacher|sferd-s\d{4}.*|sferd-ag-.*|teacher-.*)", n)}
    assert untouched and not (differ & untouched), sorted(differ & untouched)
    # the predictor-only row no longer shares the PD chain: it gets its own halvings
    assert "digits-sferd-sgp-s0001" in new and "digits-sferd-sgp-s0001" not in base


def test_ablation_pipeline_shares_the_quickstart_stages(tmp_path, monkeypatch):
    """Identical stages compile once, into the root pipeline; the ablation's own file holds only its chains, and
    every dependency it has is produced by a stage in one of the two files."""
    import shutil

    from typer.testing import CliRunner

    from sferd.cli import app

    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    # compiling the ablation alone still finds the quickstart's stages in specs/ and leaves them to the root
    r = runner.invoke(app, ["compile", "specs/quickstart-ablation.yaml"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "dvc.yaml").exists()
    abl = YAML(typ="safe").load((tmp_path / "stages/quickstart-ablation/dvc.yaml").read_text())["stages"]
    assert runner.invoke(app, ["compile"]).exit_code == 0
    root = YAML(typ="safe").load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert not set(abl) & set(root)
    root_params = json.loads((tmp_path / "params.json").read_text())
    in_root = set(root) | {p["name"] for st in root_params.values() if st.get("kind") == "bundle" for p in st["parts"]}
    for shared in ("digits-data", "digits-teacher", "digits-pd-s0004", "digits-pd-s0004-fid", "digits-teacher-s0004-fid"):
        assert shared in in_root and shared not in abl
    # one guided halving per ψ, branched off PD's 8-step student (a root stage)
    assert [n for n in abl if re.fullmatch(r"digits-psi-\dp\d-s\d{4}", n)] == [
        f"digits-psi-{v}-s0004" for v in ("0p8", "0p9", "1p0", "1p1", "1p2")
    ]
    assert all(abl[f"digits-psi-{v}-s0004"]["deps"][-1] == "results/digits-pd-s0008" for v in ("0p8", "1p2"))
    produced = {}
    for name, st in [*root.items(), *abl.items()]:
        for out in st.get("outs", []) + st.get("metrics", []):
            produced[out if isinstance(out, str) else next(iter(out))] = name
    for name, st in abl.items():
        assert st["wdir"] == "../.." and st["params"] == [{"stages/quickstart-ablation/params.sha256.json": [name]}]
        for dep in st["deps"]:
            assert dep in produced, f"{name}: nothing produces {dep}"  # code too: the root's fingerprint files
    render = json.loads((tmp_path / "stages/quickstart-ablation/params.json").read_text())["quickstart-ablation-render"]
    assert [r["label"] for r in render["rows"] if r["steps"] == 4][:3] == ["Teacher (DDIM, no distillation)", "PD (no guidance)", "ψ = 0.8"]


def test_same_stage_name_with_other_params_in_another_pipeline_is_an_error(tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from sferd.cli import app

    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    abl = tmp_path / "specs/quickstart-ablation.yaml"
    text = abl.read_text()
    assert "    lr: 4.0e-4\n" in text
    abl.write_text(text.replace("    lr: 4.0e-4\n", "    lr: 2.0e-4\n", 1))  # the PD chain, with another lr
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["compile"])
    assert r.exit_code == 1
    # one error, at the ablation's PD method, naming where the quickstart defines the same stage (its own PD method)
    # and the first parameter that differs, so either file can be fixed without a search
    [error, count] = r.stderr.splitlines()
    assert count == "1 error"
    here, there = _name_position(abl.read_text(), "pd"), _name_position((tmp_path / "specs/quickstart.yaml").read_text(), "pd")
    assert error == (f"specs/quickstart-ablation.yaml:{here[0]}:{here[1]}: error: methods.0.name: stage digits-pd-s0008 "
                     f"is also defined by specs/quickstart.yaml:{there[0]}:{there[1]} (methods.0.name) with different "
                     "parameters: params.training.lr is 0.0004 there, 0.0002 here (specs that define the same stage "
                     "must give it the same settings)")
    assert not (tmp_path / "dvc.yaml").exists()


def _name_position(text: str, name: str) -> tuple[int, int]:
    """1-based line and column of the value of the first `name: <name>` line of a method."""
    i = text.index(f"\n    name: {name}\n") + len("\n    name: ")
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


def test_docstring_only_package_inits_are_not_deps(tmp_path):
    from sferd.pipeline.codedeps import module_closure

    pkg = tmp_path / "sferd"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "__init__.py").write_text('__version__ = "1"\n')
    (pkg / "a/__init__.py").write_text('"""Only a docstring."""\n')
    (pkg / "b/__init__.py").write_text('"""Docstring, then code."""\nLIMIT = 3\n')
    (pkg / "a/x.py").write_text("from sferd.b import y\n")
    (pkg / "b/y.py").write_text("X = 1\n")
    files = module_closure(str(tmp_path), "sferd.a.x")
    assert files == ("sferd/a/x.py", "sferd/b/__init__.py", "sferd/b/y.py")


def test_code_fingerprint_follows_the_stage_code_only(tmp_path):
    """A training stage resumes only under the code that wrote its state: the runner stamps this fingerprint
    into the config, and it changes exactly when one of the stage's code deps changes."""
    import shutil

    from sferd.pipeline.codedeps import code_fingerprint, stage_code

    shutil.copytree(ROOT / "sferd", tmp_path / "sferd", ignore=shutil.ignore_patterns("__pycache__"))
    root = str(tmp_path)
    before = code_fingerprint(root, "teacher")
    assert "sferd/pipeline/codedeps.py" in stage_code(root, "teacher")  # the runner imports it
    (tmp_path / "sferd/cli.py").write_text((tmp_path / "sferd/cli.py").read_text() + "\n# unrelated\n")
    assert code_fingerprint(root, "teacher") == before
    p = tmp_path / "sferd/methods/teacher.py"
    p.write_text(p.read_text() + "\n# a change to the training code\n")
    assert code_fingerprint(root, "teacher") != before


def test_digest_file_holds_the_hash_of_each_stage_section():
    """params.sha256.json: one entry per stage, the SHA-256 of that stage's params in canonical JSON, computed here
    with hashlib from the section itself; a change of any value changes only that stage's digest."""
    import hashlib

    _, _, files = _compile("specs/quickstart.yaml")
    params, digests = json.loads(files["params.json"]), json.loads(files["params.sha256.json"])
    assert set(digests) == set(params)
    for name, section in params.items():
        canonical = json.dumps(section, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert digests[name] == hashlib.sha256(canonical.encode()).hexdigest(), name
    committed = json.loads((ROOT / "params.sha256.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in committed.items() if k != FINGERPRINT_STAGE} == {
        k: v for k, v in digests.items() if k != FINGERPRINT_STAGE}


def test_runner_refuses_params_its_digest_does_not_describe(tmp_path, monkeypatch, capsys):
    """DVC decides by the digest: a hand-edited params.json must not run under the old digest (DVC would record
    results of one config as another's)."""
    from sferd.pipeline.run import main
    from sferd.util.params_digest import params_digest

    monkeypatch.chdir(tmp_path)
    section = {"kind": "nothing-that-exists", "x": 1}
    (tmp_path / "params.json").write_text(json.dumps({"s": {**section, "x": 2}}))
    (tmp_path / "params.sha256.json").write_text(json.dumps({"s": params_digest(section)}))
    assert main(["--params", "params.json", "s"]) == 1
    err = capsys.readouterr().err
    assert "disagree about stage 's'" in err and "sferd-spec compile" in err
    (tmp_path / "params.sha256.json").write_text("{not json")
    assert main(["--params", "params.json", "s"]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    # the digest of what is there: the check passes and the runner goes on to the (unknown) kind
    (tmp_path / "params.sha256.json").write_text(json.dumps({"s": params_digest({**section, "x": 2})}))
    try:
        main(["--params", "params.json", "s"])
    except ModuleNotFoundError as e:
        assert "nothing-that-exists" in str(e)
    assert "disagree" not in capsys.readouterr().err


def test_plain_stages_do_not_depend_on_the_peer_methods_code():
    """Code deps follow imports: PD/SFERD halvings and the DDIM FID stages must not import CFD, D-ODE, gDDIM or CLD
    code, or an edit of a peer method would re-run every paper-scale halving and 50k-sample FID."""
    _, _, files = _compile("specs/quickstart-peers.yaml")
    code = json.loads(files["stages/quickstart-peers/params.json"])[FINGERPRINT_STAGE]["stage_code"]
    peers = ("sferd/methods/cfd.py", "sferd/nn/classifiers.py", "sferd/diffusion/dode.py", "sferd/diffusion/gddim.py",
             "sferd/diffusion/cld.py", "sferd/diffusion/samplers.py", "sferd/methods/cld_teacher.py")
    for kind in ("teacher", "distill", "predictor", "prior", "fid", "fid_sferd"):
        assert not set(peers) & set(code[kind]), (kind, sorted(set(peers) & set(code[kind])))
    assert "sferd/methods/cfd.py" in code["distill_cfd"] and "sferd/diffusion/dode.py" in code["fid_solver"]
    assert "sferd/diffusion/cld.py" in code["fid_cld"]


def test_first_difference_of_two_stage_params_names_the_path_and_both_values():
    from sferd.cli import _first_difference

    a = {"training": {"lr": 4e-4, "steps": [8, 4]}, "seed": 0}
    assert _first_difference(a, a) is None
    assert _first_difference(a, {**a, "training": {"lr": 2e-4, "steps": [8, 4]}}) == ("params.training.lr", "0.0004", "0.0002")
    assert _first_difference(a, {**a, "training": {"lr": 4e-4, "steps": [8, 2]}}) == ("params.training.steps.1", "4", "2")
    assert _first_difference(a, {**a, "training": {"lr": 4e-4, "steps": [8]}}) == ("params.training.steps", "[8, 4]", "[8]")
    assert _first_difference(a, {**a, "extra": "x"}) == ("params.extra", "not set", "'x'")
    assert _first_difference({**a, "extra": "x"}, a) == ("params.extra", "'x'", "not set")
