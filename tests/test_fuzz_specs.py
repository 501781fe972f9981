"""Property test (issue 10): `validate` and `compile` on random mutations of every committed spec.

Whatever the mutation (a hostile value anywhere, a key removed or added, a profile entry, raw text spliced into
the file), the CLI must: let no exception escape, exit only 0, 1 or 2 (never 3, an internal error), print every
error as `file:line:col: error: …`, write only the spec's own pipeline files and the schema, and compile every
stage command so that `shlex.split` gives back exactly the launcher's argv.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML
from typer.testing import CliRunner

from sferd.cli import app
from sferd.spec.loader import read_yaml, to_plain

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(p for p in (ROOT / "specs").glob("*.yaml"))
TEXTS = {p.name: p.read_text(encoding="utf-8") for p in SPECS}
PLAIN = {p.name: to_plain(read_yaml(p)) for p in SPECS}
LOCATED = re.compile(r"[^\n]+?:\d+:\d+: error: .*")
COUNT = re.compile(r"\d+ errors?")
runner = CliRunner()

# Values a hostile author would try: wrong types, out-of-range and non-finite numbers, names with a newline, shell
# syntax, path aliases, NUL and other control characters, huge strings, YAML-looking strings.
HOSTILE_STRINGS = [
    "pd\n", "stages/x;touch /tmp/owned;#", "stages/$(id)", "stages/`id`", "stages/a b", "./", ".", "..", ".git/hooks",
    "/tmp", "stages/table1", "stages/table2", "stages/table1-smoke", "a\x00b", "\x07", "2024-01-01", "yes", "on",
    "1e400", ".inf", "x" * 300, "teacher", "pd-s0004", "pd-seed0001", "methods.00.lr", "methods.\uff10.lr", "*", "",
    "digits-8x8", "cifar10-32x32", "fp32", "bf16", "sferd", "pd", "table1.yaml", "quickstart.yaml", "../x.yaml",
]
SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 4, 8, 16, 2**31, 2**59, 2**63 - 1, 2**63, 2**64, 10**400, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_STRINGS),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-3, 20), st.sampled_from(HOSTILE_STRINGS)), inner,
                      max_size=4),
    max_leaves=8,
)
PROFILE_KEYS = st.one_of(
    st.sampled_from(["teacher.updates", "methods.*.lr", "methods.0.lr", "methods.00.lr", "methods.\uff10.lr",
                     "reported", "reported.0.values.1", "table.title", "precision", "evaluation.num_samples",
                     "methods.*.name", "seed", "pipeline", "dataset", "features", "teacher.model.channel_mult.0",
                     "methods.1.updates_override.2", "evaluation.teacher_steps.*", "nosuch.x", "*"]),
    st.text(max_size=16),
)
# Raw text spliced into the file: YAML features outside the JSON model and syntax that breaks parsers.
FRAGMENTS = [
    "&a", "*a", "*nosuch", "!!set {a}", "!!binary aGk=", "!!python/object:os.system x", "!foo x", "{a: 1}: 2",
    "[1, 2]: 3", "? [a]\n: 1", "<<: *a", "[" * 30, "{" * 30, "\t", "\x07", "\ufeff", "%YAML 1.1\n---", "---\na: 1",
    "...", "'unclosed", '"\\x00"', "2024-01-01", ".nan", "-.inf", "0x10", "0o17", "1_000", "~", "- - - -", ": :",
    "key: &x 1\nother: &x 2",
]


def _paths(node, at=()):
    """Every (path) to a value in a plain document."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*at, k))
            out.extend(_paths(v, (*at, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*at, i))
            out.extend(_paths(v, (*at, i)))
    return out


def _get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


def _dump(doc) -> str:
    import io

    yaml = YAML(typ="safe")  # libyaml's emitter when present: the pure-Python one would dominate the run
    yaml.default_flow_style = False
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()


def _tweak(value):
    """Another value of the same type, of the size a spec would hold."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.sampled_from([1, 2, 4, 8, 16, 32, 64, 3, value * 2, max(value // 2, 1)])
    if isinstance(value, float):
        return st.floats(min_value=1e-6, max_value=1.0)
    if isinstance(value, str):
        return st.sampled_from(["a", "pd2", "x-y", "fp32", "bf16", value + "-b", "stages/fuzz", value.upper()])
    if isinstance(value, list) and value:
        return st.just(value[:-1])
    return st.just(value)


@st.composite
def mutated_specs(draw):
    """(file name, text, its base's name or None) for one mutation of a committed spec."""
    import copy

    name = draw(st.sampled_from(sorted(TEXTS)))
    how = draw(st.sampled_from(["values", "values", "profile", "text"]))
    if how == "text":
        text = TEXTS[name]
        for _ in range(draw(st.integers(1, 3))):
            lines = text.splitlines(keepends=True)
            k = draw(st.integers(0, len(lines)))
            piece = draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=20)))
            if draw(st.booleans()) and k < len(lines) and ":" in lines[k]:  # replace a value
                key = lines[k].split(":", 1)[0]
                lines[k] = f"{key}: {piece}\n"
            else:
                indent = draw(st.sampled_from(["", "  ", "    "]))
                lines.insert(k, f"{indent}{piece}\n")
            text = "".join(lines)
    else:
        doc = copy.deepcopy(PLAIN[name])
        for _ in range(draw(st.integers(1, 3))):
            if how == "profile":
                scales = doc.setdefault("scales", {})
                if not isinstance(scales, dict):
                    break
                profile = scales.setdefault("smoke", {"description": "fuzzed", "set": {}})
                if not isinstance(profile, dict) or not isinstance(profile.get("set"), dict):
                    break
                profile["set"][draw(PROFILE_KEYS)] = draw(VALUES)
                continue
            paths = _paths(doc)
            path = paths[draw(st.integers(0, len(paths) - 1))]
            parent, key = _get(doc, path[:-1]), path[-1]
            op = draw(st.sampled_from(["tweak", "tweak", "tweak", "replace", "replace", "delete", "add"]))
            if op == "tweak":  # a plausible edit of the same type: keeps enough specs valid to compile
                parent[key] = draw(_tweak(parent[key]))
            elif op == "replace":
                parent[key] = draw(VALUES)
            elif op == "delete":
                del parent[key]
            elif isinstance(parent, dict):
                parent[draw(st.one_of(st.text(max_size=8), st.sampled_from(HOSTILE_STRINGS)))] = draw(VALUES)
            else:
                parent.append(draw(VALUES))
        text = _dump(doc)
    base = PLAIN[name].get("extends")
    return name, text, base if isinstance(base, str) else None


def _snapshot(top: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for fname in filenames:
            p = Path(dirpath) / fname
            out[p.relative_to(top).as_posix()] = ("link:" + os.readlink(p)) if p.is_symlink() else p.read_bytes()
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


def _check(case) -> None:
    name, text, base = case
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        repo, outside = top / "repo", top / "outside"
        (repo / "specs").mkdir(parents=True)
        outside.mkdir()
        (outside / "keep.txt").write_text("untouched\n")
        (repo / "sferd").symlink_to(ROOT / "sferd", target_is_directory=True)
        if base is not None and base in TEXTS:
            (repo / "specs" / base).write_text(TEXTS[base], encoding="utf-8")
        (repo / "specs" / name).write_bytes(text.encode("utf-8", "surrogatepass"))
        rel = f"specs/{name}"
        before = _snapshot(top)
        with contextlib.chdir(repo):
            for args in (["validate", rel], ["compile", rel]):
                r = runner.invoke(app, args)
                assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception), text)
                assert r.exit_code in (0, 1, 2), (args, r.exit_code, r.output, text)
                for line in r.stderr.splitlines():
                    assert LOCATED.fullmatch(line) or COUNT.fullmatch(line), (args, line, text)
                assert "Traceback" not in r.output
                if r.exit_code == 0 and args[0] == "validate":
                    assert not r.stderr
            after = _snapshot(top)
            changed = {k for k in after if after[k] != before.get(k)} | (set(before) - set(after))
            if r.exit_code != 0:
                assert not changed, changed
                return
            from sferd.spec import load_spec

            pipeline = load_spec(rel).pipeline
            folder = "" if pipeline == "." else f"{pipeline}/"
            allowed = {f"repo/{folder}dvc.yaml", f"repo/{folder}params.json", f"repo/{folder}params.sha256.json",
                       "repo/specs/spec.schema.json"}
            assert changed <= allowed, changed
            params = f"{folder}params.json"
            stages = YAML(typ="safe").load((repo / folder / "dvc.yaml").read_text())["stages"]
            for stage, entry in stages.items():
                if stage == "code-fingerprints":  # the code fingerprint stage: stage-kind identifiers only
                    argv = shlex.split(entry["cmd"])
                    assert argv[:5] == ["python", "-m", "sferd.pipeline.fingerprints", "--out", "results/code"]
                    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in argv[5:])
                    continue
                assert shlex.split(entry["cmd"]) == ["python", "-m", "sferd.pipeline.launch", "--params", params,
                                                     stage]


FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_N", 200)))
@given(mutated_specs())
def test_validate_and_compile_survive_mutations(case):
    _check(case)


@pytest.mark.slow
@settings(FUZZ, max_examples=2000, derandomize=False)
@given(mutated_specs())
def test_validate_and_compile_survive_many_mutations(case):
    _check(case)

