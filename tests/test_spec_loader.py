"""sferd.spec.loader: YAML 1.2 reading with positions, and Pydantic errors mapped to file:line:col.

Every position below was counted by hand from the YAML text (1-based); the tests assert exact
line/column so a locator that drifts by one key or one column fails.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Annotated, Literal, Union

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sferd.spec.loader import SpecError, SpecIssue, issue_at, load_model, locate, read_yaml, to_plain


# ------------------------------------------------------------------------------------------- models


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Net(_M):
    width: int = Field(gt=0)
    act: Literal["relu", "silu"] = "relu"

    @model_validator(mode="after")
    def _even_for_silu(self) -> "Net":
        if self.act == "silu" and self.width % 2:
            raise ValueError("silu needs an even width")
        return self


class PDMethod(_M):
    kind: Literal["pd"]
    lr: float = Field(gt=0)
    steps: int = Field(gt=0)


class SferdMethod(_M):
    kind: Literal["sferd"]
    lr: float = Field(gt=0)
    weight: float = 1.0


class Top(_M):
    name: str
    mode: Literal["fast", "slow"]
    lr: float
    flag: str = "off"
    net: Net
    methods: list[Annotated[Union[PDMethod, SferdMethod], Field(discriminator="kind")]] = []

    @model_validator(mode="after")
    def _fast_is_small(self) -> "Top":
        if self.mode == "fast" and self.net.width > 64:
            raise ValueError("fast mode needs net.width <= 64")
        return self


# A valid spec; tests edit single lines. Line numbers:   1..13
GOOD = """\
name: demo
mode: slow
lr: 1e-4
flag: on
net:
  width: 32
  act: relu
methods:
  - kind: pd
    lr: 5e-5
    steps: 4
  - kind: sferd
    lr: 1e-3
"""


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _issues(tmp_path: Path, text: str, model: type[BaseModel] = Top) -> list[tuple[int, int, str, str]]:
    p = _write(tmp_path, text)
    with pytest.raises(SpecError) as exc:
        load_model(p, model, display_path="specs/x.yaml")
    assert all(i.path == "specs/x.yaml" for i in exc.value.issues)
    return [(i.line, i.col, i.loc, i.message) for i in exc.value.issues]


def _replace(old: str, new: str) -> str:
    assert GOOD.count(old) == 1, old
    return GOOD.replace(old, new)


# --------------------------------------------------------------------------------------- valid input


def test_good_spec_loads_with_yaml12_scalars(tmp_path):
    top = load_model(_write(tmp_path, GOOD), Top)
    # YAML 1.2: `1e-4` is a float (PyYAML/1.1 would give the string "1e-4") ...
    assert top.lr == 1e-4 and type(top.lr) is float
    assert top.methods[0].lr == 5e-5
    # ... and `on` is a plain string (1.1 would make it True).
    assert top.flag == "on" and type(top.flag) is str
    assert [type(m).__name__ for m in top.methods] == ["PDMethod", "SferdMethod"]
    assert top.methods[1].weight == 1.0


def test_read_yaml_keeps_positions_and_yaml12_types(tmp_path):
    doc = read_yaml(_write(tmp_path, GOOD))
    assert isinstance(doc["lr"], float) and doc["lr"] == 1e-4
    assert doc["flag"] == "on"
    assert doc["net"].lc.key("width") == (5, 2)  # 0-based, straight from ruamel


def test_to_plain_uses_builtin_types_only(tmp_path):
    # An anchored `true` is ruamel's ScalarBoolean, an int subclass: strict Pydantic refuses it as a bool,
    # and `|` blocks are LiteralScalarString. Validation must see builtins.
    text = "a: &t true\nb: *t\nc: |\n  text\nd: 0x10\ne: [1e-4, {f: 2}]\n"
    plain = to_plain(read_yaml(_write(tmp_path, text)))
    assert plain == {"a": True, "b": True, "c": "text\n", "d": 16, "e": [1e-4, {"f": 2}]}
    assert type(plain) is dict and type(plain["e"]) is list and type(plain["e"][1]) is dict
    assert type(plain["a"]) is bool and type(plain["b"]) is bool
    assert type(plain["c"]) is str and type(plain["d"]) is int and type(plain["e"][0]) is float

    class Strict(BaseModel):
        model_config = ConfigDict(strict=True)
        a: bool

    assert load_model(_write(tmp_path, "a: &t true\n", "s.yaml"), Strict).a is True


def test_context_is_passed_to_validators(tmp_path):
    from pydantic import ValidationInfo, field_validator

    class WithContext(BaseModel):
        n: int

        @field_validator("n")
        @classmethod
        def _limit(cls, v: int, info: ValidationInfo) -> int:
            if v > info.context["limit"]:
                raise ValueError(f"above {info.context['limit']}")
            return v

    p = _write(tmp_path, "# c\nn: 5\n")
    assert load_model(p, WithContext, context={"limit": 9}).n == 5
    with pytest.raises(SpecError) as exc:
        load_model(p, WithContext, context={"limit": 3}, display_path="w.yaml")
    assert exc.value.issues == [SpecIssue("w.yaml", 2, 4, "n", "Value error, above 3 [value_error]")]


# ---------------------------------------------------------------------------------- pydantic errors


def test_unknown_key_points_at_the_key(tmp_path):
    text = _replace("  act: relu\n", "  act: relu\n  widht: 3\n")
    assert _issues(tmp_path, text) == [(8, 3, "net.widht", "Extra inputs are not permitted [extra_forbidden]")]


def test_wrong_type_points_at_the_value(tmp_path):
    text = _replace("  width: 32\n", "  width: many\n")
    assert _issues(tmp_path, text) == [
        (6, 10, "net.width", "Input should be a valid integer, unable to parse string as an integer [int_parsing]")
    ]


def test_bad_enum_value(tmp_path):
    [(line, col, loc, msg)] = _issues(tmp_path, _replace("mode: slow\n", "mode: medium\n"))
    assert (line, col, loc) == (2, 7, "mode")
    assert msg == "Input should be 'fast' or 'slow' [literal_error]"


def test_missing_field_points_at_the_parent_key(tmp_path):
    text = _replace("  width: 32\n", "")
    assert _issues(tmp_path, text) == [(5, 1, "net.width", "Field required [missing]")]


def test_missing_top_level_field_is_at_1_1(tmp_path):
    text = "# header comment\n" + _replace("name: demo\n", "")
    assert _issues(tmp_path, text) == [(1, 1, "name", "Field required [missing]")]


def test_missing_field_in_union_item_points_at_the_item(tmp_path):
    text = _replace("    steps: 4\n", "")
    assert _issues(tmp_path, text) == [(9, 5, "methods.0.steps", "Field required [missing]")]


def test_bad_value_in_union_item_has_no_tag_in_loc(tmp_path):
    # Pydantic's loc is ('methods', 1, 'sferd', 'lr'): the tag is not a key and must not be shown.
    text = _replace("    lr: 1e-3\n", "    lr: -1\n")
    assert _issues(tmp_path, text) == [(13, 9, "methods.1.lr", "Input should be greater than 0 [greater_than]")]


def test_unknown_key_in_union_item(tmp_path):
    text = _replace("    steps: 4\n", "    steps: 4\n    stpes: 8\n")
    assert _issues(tmp_path, text) == [(12, 5, "methods.0.stpes", "Extra inputs are not permitted [extra_forbidden]")]


def test_locate_skips_tag_parts(tmp_path):
    doc = read_yaml(_write(tmp_path, GOOD))
    assert locate(doc, ("methods", 0, "pd", "lr"), kind="greater_than") == (10, 9)
    assert locate(doc, ("methods", 1, "function-after[_x(), SferdMethod]", "lr"), kind="float_type") == (13, 9)
    assert locate(doc, ("methods", 0, "pd", "nope"), kind="extra_forbidden") == (9, 5)
    assert locate(doc, ("net", "depth"), kind="missing") == (5, 1)
    assert locate(doc, ("methods",), kind="too_short") == (9, 3)  # a block list's value: its first "-"


def test_unknown_discriminator_points_at_the_tag_value(tmp_path):
    text = _replace("  - kind: sferd\n", "  - kind: dpm\n")
    assert _issues(tmp_path, text) == [
        (12, 11, "methods.1.kind",
         "Input should be 'pd' or 'sferd' (got 'dpm') [union_tag_invalid]")
    ]


def test_absent_discriminator_is_reported_as_missing_kind(tmp_path):
    text = _replace("  - kind: sferd\n    lr: 1e-3\n", "  - lr: 1e-3\n")
    assert _issues(tmp_path, text) == [
        (12, 5, "methods.1.kind", "Unable to extract tag using discriminator 'kind' [union_tag_not_found]")
    ]


def test_model_validator_error_points_at_first_key_of_the_mapping(tmp_path):
    # Top-level validator: loc is (), the document's first key is on line 2 after a comment.
    text = "# header\n" + _replace("mode: slow\n", "mode: fast\n").replace("width: 32", "width: 128")
    assert _issues(tmp_path, text) == [(2, 1, "", "Value error, fast mode needs net.width <= 64 [value_error]")]


def test_nested_model_validator_error_points_at_first_key_of_the_block(tmp_path):
    text = _replace("  width: 32\n  act: relu\n", "  width: 33\n  act: silu\n")
    assert _issues(tmp_path, text) == [(6, 3, "net", "Value error, silu needs an even width [value_error]")]


def test_dict_key_error_points_at_the_key(tmp_path):
    class Counts(BaseModel):
        per_steps: dict[int, int]

    text = "per_steps:\n  4: 10\n  two: 20\n  8: x\n"
    assert _issues(tmp_path, text, Counts) == [
        (3, 3, "per_steps.two.[key]",
         "Input should be a valid integer, unable to parse string as an integer [int_parsing]"),
        (4, 6, "per_steps.8", "Input should be a valid integer, unable to parse string as an integer [int_parsing]"),
    ]


def test_merged_key_without_position_falls_back_to_enclosing_key(tmp_path):
    class Two(BaseModel):
        model_config = ConfigDict(extra="forbid")
        base: Net
        net: Net

    # `width` in `net` comes from the merge; ruamel records no position for it, so the error
    # lands on the `net:` key that contains it.
    text = "base: &b\n  width: -1\nnet:\n  <<: *b\n  act: silu\n"
    assert _issues(tmp_path, text, Two) == [
        (2, 10, "base.width", "Input should be greater than 0 [greater_than]"),
        (3, 1, "net.width", "Input should be greater than 0 [greater_than]"),
    ]


def test_several_errors_sorted_by_line(tmp_path):
    # Pydantic reports in field order (mode before net) and extras last; the issues come in file order.
    text = (
        "net:\n"               # 1
        "  width: 0\n"         # 2
        "extra: 1\n"           # 3
        "name: demo\n"         # 4
        "mode: medium\n"       # 5
        "lr: fast\n"           # 6
        "methods:\n"           # 7
        "  - kind: pd\n"       # 8
        "    lr: 0\n"          # 9
    )
    got = _issues(tmp_path, text)
    assert [(line, col, loc) for line, col, loc, _ in got] == [
        (2, 10, "net.width"),
        (3, 1, "extra"),
        (5, 7, "mode"),
        (6, 5, "lr"),
        (8, 5, "methods.0.steps"),
        (9, 9, "methods.0.lr"),
    ]


# ------------------------------------------------------------------------------------- YAML problems


def _read_issues(path: Path, display: str = "specs/x.yaml") -> list[tuple[int, int, str, str]]:
    with pytest.raises(SpecError) as exc:
        read_yaml(path, display_path=display)
    return [(i.line, i.col, i.loc, i.message) for i in exc.value.issues]


def test_syntax_error_uses_the_problem_mark(tmp_path):
    text = "name: demo\nmode: slow\n  lr: 1\n"
    assert _read_issues(_write(tmp_path, text)) == [(3, 5, "", "mapping values are not allowed here [yaml_syntax]")]


def test_syntax_error_names_the_unclosed_bracket(tmp_path):
    text = "name: demo\nnet: {width: 3\nlr: 1\n"
    assert _read_issues(_write(tmp_path, text)) == [
        (3, 3, "", "expected ',' or '}', but got ':' (while parsing a flow mapping at 2:6) [yaml_syntax]")
    ]


def test_duplicate_key_points_at_the_second_occurrence(tmp_path):
    text = _replace("  act: relu\n", "  act: relu\n  width: 64\n")
    [(line, col, loc, msg)] = _read_issues(_write(tmp_path, text))
    assert (line, col, loc) == (8, 3, "")
    assert msg.startswith('found duplicate key "width"') and msg.endswith("[duplicate_key]")


def test_duplicate_key_is_also_a_load_model_error(tmp_path):
    text = _replace("lr: 1e-4\n", "lr: 1e-4\nlr: 2e-4\n")
    assert [i[:2] for i in _issues(tmp_path, text)] == [(4, 1)]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_document(tmp_path, text):
    assert _read_issues(_write(tmp_path, text)) == [
        (1, 1, "", "empty document: expected a mapping of spec fields [empty_document]")
    ]


def test_top_level_list_is_rejected_at_its_start(tmp_path):
    text = "# a list, not a spec\n- name: demo\n- name: other\n"
    assert _read_issues(_write(tmp_path, text)) == [
        (2, 1, "", "the top level must be a mapping, not a list [not_a_mapping]")
    ]


@pytest.mark.parametrize("text, written", [
    ("just text\n", "a string"), ("1.5\n", "a number"), ("7\n", "a number"), ("true\n", "a boolean"),
    ("&x true\n", "a boolean"), ("2024-01-01\n", "a date"),
])
def test_top_level_scalar_is_rejected_in_yaml_words(tmp_path, text, written):
    """Not ruamel's class names (`a single ScalarFloat value`)."""
    assert _read_issues(_write(tmp_path, text)) == [
        (1, 1, "", f"the top level must be a mapping, not {written} [not_a_mapping]")
    ]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert _read_issues(missing, display="specs/nope.yaml") == [(1, 1, "", "file not found [file_not_found]")]
    with pytest.raises(SpecError) as exc:
        load_model(missing, Top, display_path="specs/nope.yaml")
    assert exc.value.issues[0].format() == "specs/nope.yaml:1:1: error: file not found [file_not_found]"


def test_display_path_defaults_to_the_given_path(tmp_path):
    p = tmp_path / "gone.yaml"
    with pytest.raises(SpecError) as exc:
        read_yaml(p)
    assert exc.value.issues[0].path == str(p)


def test_directory_is_a_located_error_not_a_traceback(tmp_path):
    [(line, col, _, msg)] = _read_issues(tmp_path)
    assert (line, col) == (1, 1) and msg.endswith("[not_a_file]")


def test_not_utf8_is_located(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"name: demo\nlabel: caf\xe9\n")
    assert _read_issues(p) == [(2, 11, "", "file is not UTF-8 text [encoding]")]


def test_multiple_documents_are_rejected(tmp_path):
    assert _read_issues(_write(tmp_path, "a: 1\n---\nb: 2\n")) == [
        (2, 1, "", "a spec file holds one YAML document; found a second [yaml_syntax]")
    ]


def test_yaml_11_directive_is_rejected(tmp_path):
    # ruamel would honour it: `on` would become True and `1e-4` would warn on stderr.
    text = "# old style\n%YAML 1.1\n---\nflag: on\n"
    [(line, col, _, msg)] = _read_issues(_write(tmp_path, text))
    assert (line, col) == (2, 1) and msg.endswith("[yaml_version]")
    # an explicit 1.2 directive is fine
    assert read_yaml(_write(tmp_path, "%YAML 1.2\n---\nflag: on\n", "ok.yaml")) == {"flag": "on"}


def test_bad_typed_scalar_is_located_not_a_traceback(tmp_path):
    # ruamel raises a bare ValueError for a date-shaped scalar with month 13.
    text = "name: demo\nwhen: 2024-13-01\n"
    assert _read_issues(_write(tmp_path, text)) == [
        (2, 7, "", "cannot read '2024-13-01' as !!timestamp: month must be in 1..12 [yaml_value]")
    ]


def test_unknown_tag_is_located(tmp_path):
    text = "name: demo\nnet:\n  width: !!python/object:os.system x\n"
    [(line, col, _, msg)] = _read_issues(_write(tmp_path, text))
    assert (line, col) == (3, 10) and "unsupported YAML tag !!python/object:os.system" in msg


# ------------------------------------------------------------------------------ issues and formatting


def test_format_with_and_without_loc():
    i = SpecIssue("specs/x.yaml", 14, 7, "methods.0.lr", "Input should be greater than 0 [greater_than]")
    assert i.format() == "specs/x.yaml:14:7: error: methods.0.lr: Input should be greater than 0 [greater_than]"
    j = SpecIssue("specs/x.yaml", 1, 1, "", "file not found [file_not_found]")
    assert j.format() == "specs/x.yaml:1:1: error: file not found [file_not_found]"


def test_spec_error_sorts_and_renders_issues():
    a = SpecIssue("b.yaml", 1, 1, "", "m")
    b = SpecIssue("a.yaml", 9, 2, "x", "m")
    c = SpecIssue("a.yaml", 3, 5, "y", "m")
    err = SpecError([a, b, c])
    assert err.issues == [c, b, a]
    assert str(err).splitlines() == [c.format(), b.format(), a.format()]
    assert pickle.loads(pickle.dumps(err)).issues == err.issues


def test_issue_at_uses_the_same_locator(tmp_path):
    doc = read_yaml(_write(tmp_path, GOOD))
    assert issue_at(doc, ("methods", 1, "lr"), "too fast", path="s.yaml") == SpecIssue(
        "s.yaml", 13, 9, "methods.1.lr", "too fast"
    )
    # a defaulted field is not in the file: the loc is kept, the position falls back to its list item
    assert issue_at(doc, ("methods", 1, "weight"), "unused", path="s.yaml") == SpecIssue(
        "s.yaml", 12, 5, "methods.1.weight", "unused"
    )
    # a whole block: its first key
    assert issue_at(doc, ("net",), "too big", path="s.yaml").format() == "s.yaml:6:3: error: net: too big"
