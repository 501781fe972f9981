"""Spec errors speak the spec's language: what the user wrote (`kind:`, `architecture:`, the field path, "a
mapping", "a list"), never the Python classes behind it (`TeacherSpec`, `TrainedClassifierSpec`,
`CLDTeacherSpec`) or a function Pydantic chose a union member with (`_teacher_kind()`).

Targeted cases assert the exact position (counted from the spec text) and wording; a sweep then breaks every block
of the committed specs (a list or a scalar where a mapping belongs, an unknown or missing `kind`/`architecture`)
and checks that no message names an internal class.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from sferd.spec import SpecError, load_spec
from sferd.spec import models

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "tests/specs/tiny.yaml").read_text(encoding="utf-8")
PEERS = (ROOT / "specs/quickstart-peers.yaml").read_text(encoding="utf-8")

# every Pydantic model of the spec package, and the functions that pick a union member
INTERNAL_NAMES = sorted({name for name, obj in vars(models).items()
                         if isinstance(obj, type) and issubclass(obj, BaseModel)} | {"_teacher_kind", "_classifier_kind"})
MAPPING = "Input should be a mapping (a block of `key: value` fields)"


def _at(text: str, needle: str, prefix: str = "") -> tuple[int, int]:
    """1-based line and column where `needle` starts in `text` (its first occurrence right after `prefix`)."""
    i = text.index(prefix + needle) + len(prefix)
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


def _issues(tmp_path: Path, text: str, name: str = "s.yaml") -> list:
    """The issues of spec `text` written as tmp_path/name (beside a copy of every committed spec it may extend)."""
    for p in (ROOT / "specs").glob("*.yaml"):
        if not (tmp_path / p.name).exists():
            shutil.copy(p, tmp_path / p.name)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as e:
        load_spec(path, display_path=name)
    return e.value.issues


def _issues_if_any(tmp_path: Path, text: str, name: str) -> list:
    """Like _issues, but a spec that loads gives [] (an optional block may be null; a defaulted `kind` left out)."""
    try:
        return _issues(tmp_path, text, name)
    except pytest.fail.Exception:
        return []


def _no_internal_names(issues) -> None:
    for i in issues:
        line = i.format()
        leaked = [n for n in INTERNAL_NAMES if re.search(rf"\b{n}\b", line)]
        assert not leaked, f"message names {leaked}: {line}"
        assert "instance of" not in line and "function-" not in line and "()" not in line, line


def _one(issues, line: int, col: int):
    found = [i for i in issues if (i.line, i.col) == (line, col)]
    assert len(found) == 1, [i.format() for i in issues]
    return found[0]


def test_class_names_are_known():
    # the sweep's list is not empty by accident: the models it must never name are in it
    assert {"TeacherSpec", "ExternalTeacherSpec", "TrainedClassifierSpec", "PretrainedClassifierSpec",
            "CLDTeacherSpec", "GuidanceSpec", "PDMethod", "Spec"} <= set(INTERNAL_NAMES)


# --------------------------------------------------------------------------------------- not a mapping


@pytest.mark.parametrize("block, value, written", [
    ("teacher", "[1]", "a list"),
    ("teacher", "foo", "a string"),
    ("teacher", "null", "null"),
    ("dataset", "digits-8x8", "a string"),
    ("features", "3", "a number"),
    ("evaluation", "true", "a boolean"),
    ("evaluation", "&flag true", "a boolean"),  # ruamel keeps an anchored boolean as a ScalarBoolean, an int
    ("features", "&n 3", "a number"),
    ("table", "[tiny]", "a list"),
])
def test_a_block_written_as_something_else_says_so_in_yaml_words(tmp_path, block, value, written):
    start = TINY.index(f"\n{block}:\n") + 1
    end = TINY.index("\n", start)
    # the block's own lines stay, under a key nobody expects, so the only other error is that key
    text = TINY[:start] + f"{block}: {value}\nunused_{block}:" + TINY[end:]
    issues = _issues(tmp_path, text)
    line, col = _at(text, value, f"{block}: ")
    issue = _one(issues, line, col)
    assert issue.loc == block
    assert issue.message == f"{MAPPING}, not {written} [model_type]"
    _no_internal_names(issues)


@pytest.mark.parametrize("old, new, needle, loc", [
    # a CLD row's teacher block (CLDTeacherSpec)
    ("    teacher: &cld\n", "    teacher: 3\n    unused: &cld\n", "3", "methods.9.teacher"),
    # CFD's classifier (a union chosen by `architecture`: TrainedClassifierSpec when it is not `pretrained`)
    ("    classifier:\n      architecture: digits-cnn\n",
     "    classifier: [digits-cnn]\n    unused:\n      architecture: digits-cnn\n", "[digits-cnn]", "methods.2.classifier"),
    ("    guidance:\n", "    guidance: on\n    unused:\n", "on", "methods.1.guidance"),
    ("calibration: {teacher_sampler: ddim, factor: 10, batch_size: 256, seed: 1000}", "calibration: ddim",
     "ddim", "methods.7.calibration"),
])
def test_a_method_block_written_as_something_else(tmp_path, old, new, needle, loc):
    assert PEERS.count(old) == 1, old
    text = PEERS.replace(old, new)
    issues = _issues(tmp_path, text)
    line, col = _at(text, needle, new.split(needle)[0].lstrip())
    issue = _one(issues, line, col)
    assert issue.loc == loc and issue.message.startswith(MAPPING + ", not "), issue.format()
    _no_internal_names(issues)


def test_a_method_written_as_a_string(tmp_path):
    text = TINY.replace("  - kind: pd\n", "  - pd\n  - kind: pd\n")
    issues = _issues(tmp_path, text)
    line, col = _at(text, "pd\n", "  - ")
    issue = _one(issues, line, col)
    assert issue.loc == "methods.0" and issue.message == f"{MAPPING}, not a string [model_attributes_type]"


# ------------------------------------------------------------------------- discriminators chosen by a function


def test_unknown_teacher_kind_points_at_the_value_and_lists_the_kinds(tmp_path):
    text = TINY.replace("teacher:\n", "teacher:\n  kind: pretrained\n")
    [issue] = _issues(tmp_path, text)
    assert (issue.line, issue.col) == _at(text, "pretrained", "  kind: ")
    assert issue.loc == "teacher.kind"
    assert issue.message == "Input should be 'train' or 'external' (got 'pretrained') [unknown_choice]"


@pytest.mark.parametrize("value", ["vgg16", "3", "[resnet18]", "Pretrained"])
def test_unknown_classifier_architecture_lists_every_architecture_including_pretrained(tmp_path, value):
    text = PEERS.replace("      architecture: digits-cnn\n", f"      architecture: {value}\n")
    [issue] = _issues(tmp_path, text)
    assert (issue.line, issue.col) == _at(text, value, "architecture: ")
    assert issue.loc == "methods.2.classifier.architecture"
    written = {"vgg16": "'vgg16'", "3": "3", "[resnet18]": "['resnet18']", "Pretrained": "'Pretrained'"}[value]
    assert issue.message == ("Input should be 'digits-cnn', 'resnet18', 'densenet201' or 'pretrained' "
                             f"(got {written}) [unknown_choice]")


@pytest.mark.parametrize("old, new, needle, loc, message", [
    ("  - kind: cld\n", "  - kind: cldx\n", "cldx", "methods.0.kind",
     "Input should be 'pd', 'sferd', 'solver', 'cld' or 'cfd' (got 'cldx') [union_tag_invalid]"),
    ("sampler: {kind: euler}", "sampler: {kind: heun}", "heun", "methods.4.sampler.kind",
     "Input should be 'gddim' or 'euler' (got 'heun') [union_tag_invalid]"),
    ("sampler: {kind: euler}", "sampler: {kind: [euler]}", "[euler]", "methods.4.sampler.kind",
     "Input should be 'gddim' or 'euler' (got ['euler']) [union_tag_invalid]"),
])
def test_unknown_method_or_sampler_kind_reads_like_the_other_choices(tmp_path, old, new, needle, loc, message):
    """Pydantic's own tag error ("Input tag 'cldx' found using 'kind' does not match any of the expected tags") is
    said like the teacher's and the classifier's: the values a spec may write, and what it wrote."""
    cld = (ROOT / "tests/specs/tiny-cld.yaml").read_text(encoding="utf-8")
    (tmp_path / "tiny.yaml").write_text(TINY, encoding="utf-8")
    text = cld.replace(old, new, 1)
    [issue] = _issues(tmp_path, text)
    assert (issue.line, issue.col) == _at(text, needle, "kind: ")  # at the value
    assert issue.loc == loc and issue.message == message


def test_missing_classifier_architecture_is_a_missing_field(tmp_path):
    text = PEERS.replace("      architecture: digits-cnn\n", "")
    [issue] = _issues(tmp_path, text)
    assert issue.loc == "methods.2.classifier.architecture" and issue.message == "Field required [missing]"
    assert (issue.line, issue.col) == _at(text, "classifier:\n      seed: 1")


def test_a_pretrained_classifier_still_reports_its_own_fields(tmp_path):
    text = PEERS.replace("      architecture: digits-cnn\n      seed: 1\n", "      architecture: pretrained\n"
                         "      seed: 1\n")
    issues = _issues(tmp_path, text)
    assert {i.loc for i in issues if i.message == "Field required [missing]"} == {
        f"methods.2.classifier.{k}" for k in ("base", "path", "sha256")}
    _no_internal_names(issues)


# --------------------------------------------------------------------------------------------- the sweep


def _mapping_paths(node, path=()):
    """Paths (keys and indices) of every mapping inside `node`, outermost first, each once (aliases: first use)."""
    seen: set[int] = set()
    out = []

    def visit(n, p):
        if isinstance(n, CommentedMap):
            if id(n) in seen:
                return
            seen.add(id(n))
            if p:
                out.append(p)
            for k in list(n.keys()):
                visit(n[k], p + (k,))
        elif isinstance(n, CommentedSeq):
            for i, x in enumerate(n):
                visit(x, p + (i,))

    visit(node, path)
    return out


def _mutated(text: str, path: tuple, change) -> str:
    yaml = YAML(typ="rt")
    doc = yaml.load(text)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    change(parent, path[-1])
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["quickstart-peers.yaml", "cfd-cifar10.yaml", "table1.yaml"])
def test_sweep_no_message_names_an_internal_class(tmp_path, name):
    text = (ROOT / "specs" / name).read_text(encoding="utf-8")
    doc = YAML(typ="rt").load(text)
    replacements = [[1], "x", 3, None]
    checked = 0
    for n, path in enumerate(_mapping_paths(doc)):
        value = replacements[n % len(replacements)]

        def replace(parent, key, value=value):
            parent[key] = value

        issues = _issues_if_any(tmp_path, _mutated(text, path, replace), f"broken-{name}")
        _no_internal_names(issues)
        checked += bool(issues)
        node = doc
        for k in path:
            node = node[k]
        for field in ("kind", "architecture"):
            if field not in node:
                continue
            for change in (lambda m, k, f=field: m[k].__setitem__(f, "bogus"),
                           lambda m, k, f=field: m[k].__delitem__(f)):
                try:
                    broken = _mutated(text, path, change)
                except KeyError:  # the field is merged in (`<<:`), not written here
                    continue
                issues = _issues_if_any(tmp_path, broken, f"broken-{name}")
                _no_internal_names(issues)
                checked += bool(issues)
    assert checked >= 15
