"""Hostile specs (issue 10): one test per class of attack, each through the real CLI in a throw-away repository.

Every case asserts the located error (file:line:col of the offending text, counted from the spec itself), that
the CLI exits 1 with no traceback, and that nothing was written: the repository and a folder outside it are
byte-for-byte what they were.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sferd.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "tests/specs/tiny.yaml").read_text(encoding="utf-8")
# tiny.yaml as a spec with its own pipeline folder
EVIL = (TINY.replace("name: tiny\n", "name: evil\n").replace("pipeline: .\n", "pipeline: stages/evil\n")
        .replace("  id: tiny\n", "  id: evil\n"))
LOCATED = re.compile(r"^(?P<path>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error: ")
runner = CliRunner()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with the package (linked, never written), tiny.yaml (owner of the root pipeline, whose stages
    EVIL shares) and table1 (owner of stages/table1 and, through its smoke profile, stages/table1-smoke);
    `outside` is a folder beside it that nothing may touch."""
    root = tmp_path / "repo"
    (root / "specs").mkdir(parents=True)
    (root / "sferd").symlink_to(ROOT / "sferd", target_is_directory=True)
    (root / "specs/root.yaml").write_text(TINY)
    (root / "specs/table1.yaml").write_bytes((ROOT / "specs/table1.yaml").read_bytes())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("untouched\n")
    monkeypatch.chdir(root)
    return root


def _snapshot(top: Path) -> dict[str, object]:
    """Every path under `top` with its content (files), target (symlinks) or kind; the linked package is skipped."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(top).as_posix()
            if rel == "repo/sferd":
                continue
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = p.read_bytes()
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "other"
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


def _at(text: str, needle: str, prefix: str = "") -> tuple[int, int]:
    """1-based line and column where `needle` starts in `text` (its first occurrence right after `prefix`)."""
    i = text.index(prefix + needle) + len(prefix)
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


def _errors(stderr: str) -> list[str]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and re.fullmatch(r"\d+ errors?", lines[-1]), stderr
    for ln in lines[:-1]:
        assert LOCATED.match(ln), f"unlocated error line: {ln!r}"
    assert "Traceback" not in stderr
    return lines[:-1]


def _refused(repo: Path, text: str | bytes, where: tuple[int, int] | None, fragment: str,
             *, name: str = "evil.yaml") -> list[str]:
    """Write the spec, run validate and compile on it; both must exit 1 with a located error at `where` (None: 1:1)
    holding `fragment`, and leave the repository and its surroundings untouched."""
    spec = repo / "specs" / name
    spec.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    before = _snapshot(repo.parent)
    rel = f"specs/{name}"
    found = []
    for args in (["validate", rel], ["compile", rel]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.exit_code, r.output, r.exception)
        errors = _errors(r.stderr)
        line, col = where or (1, 1)
        mine = [e for e in errors if e.startswith(f"{rel}:{line}:{col}: error: ")]
        assert any(fragment in e for e in mine), (args, errors)
        found = errors
    assert _snapshot(repo.parent) == before, "a refused spec changed files"
    return found


# ------------------------------------------------------------------------------------ 1. commands through pipeline


@pytest.mark.parametrize("value", [
    "'stages/x;touch /tmp/owned;#'",
    "'stages/$(touch owned)'",
    "'stages/`touch owned`'",
    "'stages/a b'",
    '"stages/x\\n"',
    '"stages/x\\ntouch owned"',
    "'stages/x&&id'",
    "'stages/x|id'",
    "'stages/X'",
])
def test_pipeline_cannot_carry_a_command(repo, value):
    text = EVIL.replace("pipeline: stages/evil\n", f"pipeline: {value}\n")
    _refused(repo, text, _at(text, value, "pipeline: "), "is not a pipeline folder")
    assert not Path("owned").exists()


def test_every_compiled_command_is_exactly_the_launcher_argv(repo):
    """The committed specs compile to commands that a shell splits into exactly the launcher's argv."""
    import shlex

    from ruamel.yaml import YAML

    (repo / "specs/evil.yaml").write_text(EVIL)
    r = runner.invoke(app, ["compile", "specs/evil.yaml"])
    assert r.exit_code == 0, r.output
    for folder, params in ((repo / "stages/evil", "stages/evil/params.json"),):
        stages = YAML(typ="safe").load((folder / "dvc.yaml").read_text())["stages"]
        assert stages
        for name, st in stages.items():
            if name == "code-fingerprints":  # the code fingerprint stage: stage-kind identifiers only
                assert shlex.split(st["cmd"])[:5] == ["python", "-m", "sferd.pipeline.fingerprints", "--out", "results/code"]
                assert all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in shlex.split(st["cmd"])[5:])
                continue
            assert shlex.split(st["cmd"]) == ["python", "-m", "sferd.pipeline.launch", "--params", params, name]


# ------------------------------------------------------------------- 2. writes outside the repository or into others


@pytest.mark.parametrize("value", ["./", "./stages/table1", ".git/hooks", "/tmp/x", "stages/../..", "stages/a/b",
                                   "stages", "stages/", "results", "'..'", "stages/evil/."])
def test_pipeline_aliases_and_escapes_are_refused(repo, value):
    text = EVIL.replace("pipeline: stages/evil\n", f"pipeline: {value}\n")
    _refused(repo, text, _at(text, value, "pipeline: "), "is not a pipeline folder")


@pytest.mark.parametrize("value, owner", [
    (".", "specs/root.yaml"),                    # the root pipeline would become this spec's
    ("stages/table1", "specs/table1.yaml"),
    ("stages/table1-smoke", "specs/table1.yaml"),  # table1's smoke profile compiles there
])
def test_another_specs_pipeline_folder_is_refused(repo, value, owner):
    text = EVIL.replace("pipeline: stages/evil\n", f"pipeline: {value}\n")
    # the folder's owner compiled first (before a second spec claims its folder): its files must survive
    r = runner.invoke(app, ["compile", owner])
    assert r.exit_code == 0, r.output
    (repo / "specs/evil.yaml").write_text(text)
    before = _snapshot(repo.parent)
    r = runner.invoke(app, ["compile", "specs/evil.yaml"])
    assert r.exit_code == 1, r.output
    [error] = _errors(r.stderr)
    line, col = _at(text, value, "pipeline: ")
    assert error.startswith(f"specs/evil.yaml:{line}:{col}: error: pipeline: ") and f"belongs to {owner}" in error
    assert _snapshot(repo.parent) == before


@pytest.mark.parametrize("how", ["folder-link", "stages-link", "file-link", "file-in-the-way", "dir-in-the-way"])
def test_compile_never_writes_through_a_symlink_or_over_a_non_file(repo, how):
    outside = repo.parent / "outside"
    (repo / "specs/evil.yaml").write_text(EVIL)
    if how == "folder-link":
        (repo / "stages").mkdir()
        (repo / "stages/evil").symlink_to(outside, target_is_directory=True)
    elif how == "stages-link":
        (repo / "stages").symlink_to(outside, target_is_directory=True)
    elif how == "file-link":
        (repo / "stages/evil").mkdir(parents=True)
        (repo / "stages/evil/dvc.yaml").symlink_to(outside / "keep.txt")
    elif how == "file-in-the-way":
        (repo / "stages").mkdir()
        (repo / "stages/evil").write_text("a file where the pipeline folder would go\n")
    else:
        (repo / "stages/evil/params.json").mkdir(parents=True)
    before = _snapshot(repo.parent)
    r = runner.invoke(app, ["compile", "specs/evil.yaml"])
    assert r.exit_code == 1, r.output
    errors = _errors(r.stderr)
    line, col = _at(EVIL, "stages/evil\n")
    assert all(e.startswith(f"specs/evil.yaml:{line}:{col}: error: pipeline: ") for e in errors), errors
    assert any(("symbolic link" in e) or ("is not a" in e) for e in errors), errors
    assert _snapshot(repo.parent) == before  # nothing at all: not even the files that were safe to write


# ----------------------------------------------------------------------------------- 3. names are matched whole


@pytest.mark.parametrize("old, new, needle, message", [
    ("name: evil\n", 'name: "evil\\n"\n', '"evil\\n"', "must match"),
    ("  id: evil\n", '  id: "evil\\n"\n', '"evil\\n"', "must match"),
    ("  - kind: pd\n", '  - kind: pd\n    name: "pd\\n"\n', '"pd\\n"', "must match"),
    ("  - kind: pd\n", '  - kind: pd\n    name: "pd\\r"\n', '"pd\\r"', "control character"),
    # a step or seed tag, or a fixed stage's stem: the names of other stages (<dataset>-teacher-s0002-fid)
    ("  - kind: pd\n", "  - kind: pd\n    name: pd-s0004\n", "pd-s0004", "step or seed tag"),
    ("  - kind: pd\n", "  - kind: pd\n    name: pd-seed0001\n", "pd-seed0001", "step or seed tag"),
    ("  - kind: pd\n", "  - kind: pd\n    name: teacher\n", "teacher", "name of a fixed stage"),
])
def test_names_must_match_whole(repo, old, new, needle, message):
    text = EVIL.replace(old, new, 1)
    _refused(repo, text, _at(text, needle, "id: " if "id:" in new else "name: "), message)


def test_a_scale_name_with_a_newline_is_refused(repo):
    text = EVIL + 'scales:\n  "smoke\\n":\n    description: x\n    set: {teacher.updates: 2}\n'
    _refused(repo, text, _at(text, '"smoke\\n":'), "must match")


# ------------------------------------------------------------------------------- 4. tracebacks and hangs


def test_huge_integers_and_huge_counts(repo):
    text = EVIL.replace("    start_steps: 4\n", f"    start_steps: {'9' * 400}\n", 1)
    _refused(repo, text, _at(text, "9" * 400), "too large")
    text = EVIL.replace("    num_res_blocks: 1\n", "    num_res_blocks: 1000000000\n")
    _refused(repo, text, _at(text, "1000000000"), "less than or equal to 32")


@pytest.mark.parametrize("depth, flow", [(250, False), (250, True), (5000, True)])
def test_deep_nesting_is_refused_quickly(repo, depth, flow):
    if flow:
        text = EVIL + "extra: " + "[" * depth + "]" * depth + "\n"
        where = (text.count("\n"), len("extra: ") + 25)  # the 25th bracket opens level 25
    else:
        text = EVIL + "extra:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(depth)) + " " * (depth + 1) + "a: 1\n"
        # ruamel counts every node, keys included: the document's mapping is level 1, `extra`'s level 2, so the key
        # of the 23rd nested mapping (line `extra` + 23, indented by 23) is the first node at level 25
        line = text.splitlines().index("extra:") + 1 + 23
        where = (line, 24)
    t0 = time.perf_counter()
    errors = _refused(repo, text, where, "nested deeper than")
    assert time.perf_counter() - t0 < 10, "refusing a deep document must not take seconds per command"
    assert len(errors) == 1


@pytest.mark.parametrize("fragment, needle, message", [
    ("{a: 1}: 2\n", "{a: 1}", "a mapping key must be a name or an integer"),
    ("[7, 9]: 2\n", "[7, 9]", "a mapping key must be a name or an integer"),
    ("? !!set {a}\n: 1\n", "!!set", "unhashable key"),
])
def test_non_scalar_keys(repo, fragment, needle, message):
    text = EVIL + fragment
    _refused(repo, text, _at(text, needle), message)


def test_extends_with_a_nul_byte_or_a_symlink_loop(repo):
    text = EVIL.replace("name: evil\n", 'name: evil\nextends: "a\\0.yaml"\n')
    _refused(repo, text, _at(text, '"a\\0.yaml"'), "control character")
    (repo / "specs/loop.yaml").symlink_to("loop.yaml")
    text = EVIL.replace("name: evil\n", "name: evil\nextends: loop.yaml\n")
    _refused(repo, text, _at(text, "loop.yaml"), "loop.yaml")


# Both commands in one fresh interpreter, with a timeout: a FIFO or /dev/zero read naively blocks or never ends.
_BOTH = (
    "import sys\nfrom sferd.cli import app\n"
    "for command in ('validate', 'compile'):\n"
    "    try:\n        app([command, sys.argv[1]])\n    except SystemExit as e:\n        print(e.code)\n"
)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "folder", "too-large"])
def test_specials_as_the_spec_end_quickly(repo, kind):
    if kind == "dev-zero":
        target = "/dev/zero"
    elif kind == "fifo":
        os.mkfifo(repo / "specs/pipe.yaml")
        target = "specs/pipe.yaml"
    elif kind == "folder":
        target = "specs"
    else:
        (repo / "specs/big.yaml").write_text(EVIL + "description: " + "x" * 70_000 + "\n")
        target = "specs/big.yaml"
    before = _snapshot(repo.parent)
    r = subprocess.run([sys.executable, "-c", _BOTH, target], cwd=repo, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.split() == ["1", "1"], (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 4 and lines[1] == lines[3] == "1 error", r.stderr
    for error in (lines[0], lines[2]):
        assert error.startswith(f"{target}:1:1: error: "), error
    assert _snapshot(repo.parent) == before


@pytest.mark.parametrize("value", ["stages/" + "a" * 300, '"stages/a\\0b"', "stages/evil/dvc.yaml"])
def test_impossible_pipeline_names(repo, value):
    text = EVIL.replace("pipeline: stages/evil\n", f"pipeline: {value}\n")
    _refused(repo, text, _at(text, value), "")


# ------------------------------------------------------------------------------- 5. scale profiles


def _with_profile(entries: str) -> str:
    return EVIL + "scales:\n  small:\n    description: a smaller run\n    set:\n" + entries


@pytest.mark.parametrize("entries, needle, message", [
    ("      teacher.updates: 2024-01-01\n", "2024-01-01", "date"),
    ("      teacher.updates: !!set {a}\n", "!!set", "CommentedSet"),
    ("      methods.0.lr: 0.1\n      methods.00.lr: 0.2\n", "methods.00.lr", "is not a path"),
    ("      methods.\uff10.lr: 0.1\n", "methods.\uff10.lr", "is not a path"),
    ("      methods.\u0660.lr: 0.1\n", "methods.\u0660.lr", "is not a path"),
    # errors about a value the profile writes point at that value
    ("      methods.*.lr: 0.1\n      methods.0.lr: 0.2\n", "0.2", "which methods.*.lr also sets"),
    ("      reported: []\n", "[]", "cannot set 'reported'"),
    ("      reported.0.values.1: 0.5\n", "0.5", "cannot set 'reported'"),
    ("      table.title: Better\n", "Better", "cannot set 'table'"),
    ("      teacher.updates: '2000'\n", "'2000'", "valid integer"),
    ("      teacher.lr: .inf\n", ".inf", "finite"),
])
def test_profiles_are_validated_like_the_spec(repo, entries, needle, message):
    text = _with_profile(entries)
    _refused(repo, text, _at(text, needle), message)


def test_reported_rows_are_the_same_at_every_scale(repo):
    text = EVIL.replace("table:\n", "reported:\n  - system: PD\n    source: paper\n    values: {1: 9.12}\ntable:\n")
    text += "scales:\n  small:\n    description: a smaller run\n    set: {teacher.updates: 2}\n"
    (repo / "specs/evil.yaml").write_text(text)
    from sferd.spec import load_spec

    assert load_spec("specs/evil.yaml", scale="small").reported == load_spec("specs/evil.yaml").reported


# ------------------------------------------------------------------------------- 6. no silent coercion


@pytest.mark.parametrize("old, new, needle, message", [
    ("seed: 0\n", "seed: true\n", "true", "valid integer"),
    ("  batch_size: 32\n", "  batch_size: true\n", "true", "valid integer"),
    ("  updates: 40\n  batch_size: 32\n", "  updates: '40'\n  batch_size: 32\n", "'40'", "valid integer"),
    ("  id: digits-8x8\n", "  id: digits-8x8\n  random_flip: 'yes'\n", "'yes'", "valid boolean"),
    ("  lr: 1.0e-3\n", "  lr: .inf\n", ".inf", "finite"),
    ("  lr: 1.0e-3\n", "  lr: 1e400\n", "1e400", "finite"),
    ("      blur_kernel_size: 7\n", "      blur_kernel_size: 7\n      threshold: .inf\n", ".inf", "finite"),
    ("      blur_kernel_size: 7\n", "      blur_kernel_size: 7\n      threshold: .nan\n", ".nan", "finite"),
    ("seed: 0\n", "seed: 18446744073709551616\n", "18446744073709551616", "too large"),
    ("seed: 0\n", "seed: 576460752303423488\n", "576460752303423488", "less than 576460752303423488"),
    ("  num_samples: 64\n", "  num_samples: 64\n  sample_seed_start: 576460752303423480\n", "576460752303423480",
     "below 2**59"),
    ("  lr: 1.0e-3\n", "  lr: 10.0\n", "10.0", "less than or equal to 1"),
    ("  updates: 40\n  batch_size: 32\n", "  updates: 40.0\n  batch_size: 32\n", "40.0", "valid integer"),
    ("  ema_decay: 0.9\n", "  ema_decay: '0.9'\n", "'0.9'", "valid number"),
])
def test_no_silent_coercion(repo, old, new, needle, message):
    assert old in EVIL
    text = EVIL.replace(old, new, 1)
    _refused(repo, text, _at(text, needle, new[:new.index(needle)].split("\n")[-1]), message)


def test_seed_bound_is_what_the_runtime_accepts():
    """The largest seed a spec admits, after the offsets the stages add, is still accepted by torch."""
    torch = pytest.importorskip("torch")
    from sferd.spec.models import MAX_STEPS, SEED_LIMIT

    g = torch.Generator()
    g.manual_seed(16 * (SEED_LIMIT - 1) + 15)        # per-sample noise streams (sferd.diffusion.sampler)
    g.manual_seed(SEED_LIMIT - 1 + 100 * MAX_STEPS + 2)  # training generators (pipeline stages)
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        g.manual_seed(2**64)  # the bound is real: beyond it the runtime refuses


# ------------------------------------------------------------------------------- 7. every message is located


def test_a_control_character_is_reported_where_it_is(repo):
    lines = EVIL.splitlines(keepends=True)
    lines[9] = lines[9].rstrip("\n") + "\x07\n"
    text = "".join(lines)
    [error] = _refused(repo, text, (10, len(lines[9]) - 1), "is not allowed in YAML")


def test_a_reused_anchor_is_a_located_error_not_a_warning(repo):
    text = EVIL.replace("  updates: 40\n  batch_size: 32\n", "  updates: &n 40\n  batch_size: 32\n").replace(
        "    updates_per_halving: 10\n", "    updates_per_halving: &n 10\n", 1)
    spec = repo / "specs/evil.yaml"
    spec.write_text(text)
    r = subprocess.run([sys.executable, "-W", "default", "-m", "sferd.cli", "validate", "specs/evil.yaml"], cwd=repo,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1
    [error] = _errors(r.stderr)
    line, col = _at(text, "&n 10")
    assert error.startswith(f"specs/evil.yaml:{line}:{col}: error: ") and "defined twice" in error
    assert "Warning" not in r.stderr


# ------------------------------------------------------------------------------- 8. bounded cost


@pytest.mark.parametrize("count", [5_000, 100_000])
def test_a_huge_list_is_refused_in_well_under_a_second(repo, count):
    text = EVIL.replace("  teacher_steps: [2]\n", "  teacher_steps: [" + ", ".join(["2"] * count) + "]\n")
    spec = repo / "specs/evil.yaml"
    spec.write_text(text)
    t0 = time.perf_counter()
    r = runner.invoke(app, ["validate", "specs/evil.yaml"])
    elapsed = time.perf_counter() - t0
    assert r.exit_code == 1
    [error] = _errors(r.stderr)
    assert "values" in error or "bytes" in error
    assert elapsed < 2.0, f"{elapsed:.2f} s"  # ~0.3 s measured on a busy 2-core machine


def test_a_spec_that_expands_to_too_many_stages_is_refused(repo):
    """Each list is within its bound, but seeds × methods × steps would make a pipeline of ~800 stages."""
    text = EVIL.replace("seed: 0\n", "seed: 0\nseeds: [" + ", ".join(map(str, range(16))) + "]\n").replace(
        "  student_steps: [1, 2]", "  student_steps: [1, 2, 4, 8, 16, 32, 64, 128]").replace(
        "start_steps: 4\n", "start_steps: 256\n")
    _refused(repo, text, _at(text, "[0, 1,", "seeds: "), "at most 400")


def test_an_echoed_value_is_truncated(repo):
    name = "x" * 8_000 + "!"
    text = EVIL.replace("name: evil\n", f"name: {name}\n")
    errors = _refused(repo, text, _at(text, name), "more characters")
    assert all(len(e) < 600 for e in errors)


# ------------------------------------------------------------------------------- internal errors


def test_an_internal_error_is_one_line_and_exit_3(repo, monkeypatch):
    import sferd.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    (repo / "specs/evil.yaml").write_text(EVIL)
    monkeypatch.setattr(cli, "_load_checked", broken)
    r = runner.invoke(app, ["validate", "specs/evil.yaml"])
    assert r.exit_code == 3
    assert r.stderr.count("\n") == 1 and "internal error (RuntimeError)" in r.stderr and "--debug" in r.stderr
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["--debug", "validate", "specs/evil.yaml"])
    assert isinstance(r.exception, RuntimeError)  # --debug lets it through, with its traceback


# ------------------------------------------------------------------------------- containment of compiled files


def test_compiled_files_stay_in_their_own_pipeline_folder(tmp_path, monkeypatch):
    """Compiling every committed spec (and table1 at its smoke scale) writes only inside the repository, each
    pipeline's files in the folder of the one spec that owns it, and nothing anywhere else."""
    from sferd.spec import load_spec

    repo = tmp_path / "repo"
    (repo / "specs").mkdir(parents=True)
    (repo / "sferd").symlink_to(ROOT / "sferd", target_is_directory=True)
    (tmp_path / "outside").mkdir()
    for p in (ROOT / "specs").glob("*.yaml"):
        (repo / "specs" / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(repo)
    before = _snapshot(tmp_path)
    assert runner.invoke(app, ["compile"]).exit_code == 0
    r = runner.invoke(app, ["compile", "specs/table1.yaml", "--scale", "smoke"])
    assert r.exit_code == 0, r.output

    owners: dict[str, str] = {}  # pipeline folder → the one spec compiled into it
    for p in sorted((repo / "specs").glob("*.yaml")):
        spec = load_spec(p)
        assert spec.pipeline not in owners, f"{p.name} and {owners.get(spec.pipeline)} share {spec.pipeline}"
        owners[spec.pipeline] = p.name
    owners["stages/table1-smoke"] = "table1.yaml (smoke)"
    after = _snapshot(tmp_path)
    written = {k for k in after if after[k] != before.get(k)}
    assert not any(k.startswith("outside") for k in written)
    for rel in sorted(written):
        assert rel.startswith("repo/"), rel
        path = rel[len("repo/"):]
        if after[rel] == "dir":
            continue
        assert not (repo / path).is_symlink()
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        assert path == "specs/spec.schema.json" or (folder in owners and path.rsplit("/", 1)[-1] in
                                                    ("dvc.yaml", "params.json", "params.sha256.json")), path
    compiled = {k[len("repo/"):].rsplit("/", 1)[0] if "/" in k[len("repo/"):] else "."
                for k in written if k.endswith("/dvc.yaml") or k == "repo/dvc.yaml"}
    assert compiled == set(owners)  # every pipeline written, each into its owner's folder only


# ------------------------------------------------------------------- a network the stages could not build (review)


@pytest.mark.parametrize("line,fragment", [("    num_heads: 3\n", "num_heads=3 must divide the 16 channels"),
                                           ("    head_channels: 7\n", "head_channels=7 must divide the 16 channels")])
def test_attention_heads_that_do_not_split_the_channels_are_refused(repo, line, fragment):
    """Validated before any compute: otherwise `plan` ended in an internal error and the teacher stage in a
    traceback when it built the U-Net."""
    text = EVIL.replace("    norm_groups: 4\n", "    norm_groups: 4\n" + line, 1)
    _refused(repo, text, _at(text, line.split(":")[1].strip(), line.split(":")[0] + ": "), fragment)


# ---------------------------------------------------------------- text that would break the rendered Markdown table

REPORTED = '''reported:
  - system: "PD, paper"
    source: "Salimans & Ho, Table 2"
    method: pd
    values: {1: 9.12, 2: null}
    reason: "not transcribed"
'''
BROKEN_ROW = "one\\n| 9.99 | forged |"  # a YAML escape: the value holds a line break, then a forged table row


@pytest.mark.parametrize("old, key", [
    ("    label: SFERD-PD\n", "label"),                    # a method's row label
    ("  title: Tiny\n", "title"),                          # the table's heading
    ('  - system: "PD, paper"\n', "system"),               # a reported row's label
    ('    source: "Salimans & Ho, Table 2"\n', "source"),
    ('    reason: "not transcribed"\n', "reason"),
])
def test_table_text_with_a_line_break_is_refused_where_it_is(repo, old, key):
    text = (EVIL + REPORTED)
    assert text.count(old) == 1, old
    indent = old[: len(old) - len(old.lstrip(" -"))]
    text = text.replace(old, f'{indent}{key}: "{BROKEN_ROW}"\n')
    _refused(repo, text, _at(text, f'"{BROKEN_ROW}"', f"{key}: "), "holds a line break: text shown in a rendered table is one line")


def test_a_tab_in_a_row_label_is_refused(repo):
    text = EVIL.replace("    label: SFERD-PD\n", '    label: "SFERD\\tPD"\n')
    _refused(repo, text, _at(text, '"SFERD\\tPD"', "label: "), "holds a tab")


def test_a_pipe_in_table_text_is_accepted_and_escaped_in_the_table(repo):
    """`|` is ordinary text a researcher may want (`A | B`): valid, and the rendered row keeps its columns."""
    text = (EVIL.replace("    label: SFERD-PD\n", '    label: "SFERD | PD"\n')
            .replace("  title: Tiny\n", '  title: "Tiny | table"\n') + REPORTED.replace("Table 2", "Table 2 | v3"))
    (repo / "specs/evil.yaml").write_text(text)
    r = runner.invoke(app, ["validate", "specs/evil.yaml"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["render", "specs/evil.yaml"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("# Tiny | table\n")
    assert "| SFERD \\| PD | missing | missing |" in r.stdout
    assert "| PD, paper | 9.12 | n/t | Salimans & Ho, Table 2 \\| v3 (not transcribed) |" in r.stdout
