"""Read spec YAML keeping line/column, and turn Pydantic errors into `file:line:col` issues.

Why ruamel.yaml (round-trip mode) and not PyYAML:

* YAML 1.2. PyYAML implements YAML 1.1, where `on`, `yes`, `off`, `no` are booleans (a dataset called
  `no` or a flag written `on` silently changes type) and `1e-4` is a *string* because 1.1 floats need a
  dot in the mantissa — exactly how learning rates are written. In 1.2 `1e-4` is a float and `on` a string.
* Duplicate keys are errors. PyYAML keeps the last value without a word, so `lr:` written twice in a
  method block would silently drop one of them.
* Positions. The round-trip loader records the 0-based (line, column) of every key, value and sequence
  item (`CommentedMap.lc`, `CommentedSeq.lc`), which is what lets a Pydantic error at
  `('methods', 0, 'pd', 'lr')` be printed as `specs/x.yaml:14:7`.

The round-trip document is used for positions only. Validation runs on a plain-Python copy
(`to_plain`): ruamel's scalar subclasses are not always equivalent to the builtins they extend — an
anchored `&a true` loads as `ScalarBoolean`, which is an `int` (strict Pydantic rejects it as a bool, lax
Pydantic accepts it as the integer 1), and `Any`/`dict` fields would otherwise keep CommentedMap,
ScalarFloat and friends inside the validated model, leaking YAML styling into whatever is dumped later.
"""

from __future__ import annotations

import datetime
import errno
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer, ComposerError
from ruamel.yaml.constructor import ConstructorError, DuplicateKeyError, RoundTripConstructor
from ruamel.yaml.error import YAMLError
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarbool import ScalarBoolean

from sferd.spec import limits

__all__ = ["SpecIssue", "SpecError", "read_yaml", "locate", "load_model", "validate_document", "issue_at", "to_plain"]

Loc = tuple[Any, ...]


# --------------------------------------------------------------------------------------------- issues


@dataclass(frozen=True, order=True)
class SpecIssue:
    """One located problem. Field order is the sort order: file, then line, then column."""

    path: str
    line: int
    col: int
    loc: str
    message: str

    def format(self) -> str:
        # gcc-style "file:line:col: error: ..." so editors and CI log viewers make it clickable. One issue is one
        # line whatever a message or a key holds (a key may be any string the user wrote): control characters are
        # escaped and every part is bounded.
        where = f"{_one_line(self.loc, limits.MAX_ECHO * 2)}: " if self.loc else ""
        return (f"{_one_line(self.path, limits.MAX_ECHO * 4)}:{self.line}:{self.col}: error: "
                f"{where}{_one_line(self.message, limits.MAX_MESSAGE)}")


def _one_line(text: str, limit: int) -> str:
    return limits.shorten(limits.CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text)), limit)


class SpecError(Exception):
    """Every problem found in one or more spec files; the CLI prints `issues`, never a traceback."""

    def __init__(self, issues: Iterable[SpecIssue]):
        self.issues: list[SpecIssue] = sorted(issues)
        super().__init__("\n".join(i.format() for i in self.issues))

    def __reduce__(self):
        # The default reduce would call SpecError(message_string); keep the issues across pickling
        # (multiprocessing, pytest-xdist).
        return (type(self), (self.issues,))


# ------------------------------------------------------------------------------------------- reading


class _Constructor(RoundTripConstructor):
    """Round-trip constructor whose failures always carry a position.

    Stock ruamel raises a bare ValueError/KeyError for scalars that match a type's pattern but not its
    value range (`2024-13-45` as a timestamp, `!!int abc`, `!!bool maybe`) and silently wraps unknown
    tags (`!foo`, `!!python/object`) in TaggedScalar objects that Pydantic then reports as a puzzling
    type error. Both become located ConstructorErrors here.
    """

    def construct_non_recursive_object(self, node: Any, tag: str | None = None) -> Any:
        try:
            return super().construct_non_recursive_object(node, tag)
        except YAMLError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here comes from the user's text
            raise ConstructorError(
                None, None, f"cannot read {limits.echo(node.value)} as {_short_tag(node.tag)}: {limits.shorten(str(e))}", node.start_mark
            ) from e

    def construct_unknown_tag(self, node: Any) -> Any:
        raise ConstructorError(
            None, None, f"unsupported YAML tag {_short_tag(node.tag)} (specs use plain YAML values)",
            node.start_mark,
        )


# ruamel dispatches on a class-level table (the None entry handles unknown tags); add_constructor copies
# the table for the subclass, so the stock RoundTripConstructor is left untouched.
_Constructor.add_constructor(None, _Constructor.construct_unknown_tag)


def _short_tag(tag: Any) -> str:
    text = str(getattr(tag, "value", tag))
    return "!!" + text[len("tag:yaml.org,2002:"):] if text.startswith("tag:yaml.org,2002:") else text


_DIRECTIVE = re.compile(r"%YAML\s+(\S+)")


def _version_issue(text: str, shown: str) -> SpecIssue | None:
    """Reject a `%YAML 1.1` directive before parsing.

    ruamel honours the directive: `on` becomes True again and `1e-4` triggers a warning on stderr. It
    also leaks: the YAML object keeps version 1.1 for later loads. Specs promise 1.2 semantics, so a
    document asking for anything else is an error. Directives can only precede the document, with
    nothing but comments and blank lines between them, so scanning those lines is exact.
    """
    for n, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith("%"):
            return None
        m = _DIRECTIVE.match(line)
        if m and m.group(1) != "1.2":
            return SpecIssue(
                shown, n + 1, 1, "",
                f"sferd specs are YAML 1.2 (`on` is a string, `1e-4` a float); remove `%YAML {m.group(1)}` "
                "[yaml_version]",
            )
    return None


def _yaml_error_issue(e: YAMLError, shown: str) -> SpecIssue:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    if isinstance(e, DuplicateKeyError):
        # problem_mark is the second occurrence; the text already quotes both values.
        return SpecIssue(shown, line, col, "", f"{e.problem} [duplicate_key]")
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    cmark = getattr(e, "context_mark", None)
    if problem is None:
        return SpecIssue(shown, line, col, "", f"{context or str(e).strip()} [yaml_syntax]")
    if str(problem).startswith("maximum depth of data structure exceeded"):
        return SpecIssue(shown, line, col, "", f"nested deeper than {limits.MAX_DEPTH} levels [too_deep]")
    if problem == "but found another document":
        return SpecIssue(shown, line, col, "", "a spec file holds one YAML document; found a second [yaml_syntax]")
    if str(problem).endswith("]"):  # our own composer's problems carry their code
        return SpecIssue(shown, line, col, "", str(problem))
    kind = "yaml_value" if isinstance(e, ConstructorError) else "yaml_syntax"
    msg = problem
    if context and cmark is not None and (cmark.line, cmark.column) != (line - 1, col - 1):
        # "expected ',' or ']'" alone does not say which bracket is unclosed; the context mark does.
        msg += f" ({context} at {cmark.line + 1}:{cmark.column + 1})"
    elif context:
        msg += f" ({context})"
    return SpecIssue(shown, line, col, "", f"{msg} [{kind}]")


class _Composer(Composer):
    """Composer that bounds the document's size and refuses a reused anchor.

    Depth is bounded by ruamel's own `max_depth` (set in `read_yaml`). A reused anchor (`&a` twice) is only a
    warning in ruamel, printed raw on stderr, and which of the two values a later `*a` means then depends on
    order: an error here, located at the second one.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None and type(event).__name__ != "AliasEvent" and anchor in self.anchors:
            first = self.anchors[anchor].start_mark
            raise ComposerError(
                None, None, f"anchor &{limits.shorten(anchor)} is defined twice (first at {first.line + 1}:"
                f"{first.column + 1}); give each anchor its own name [duplicate_anchor]", event.start_mark,
            )
        self._sferd_nodes = getattr(self, "_sferd_nodes", 0) + 1
        if self._sferd_nodes > limits.MAX_NODES:
            raise ComposerError(None, None, f"the document holds more than {limits.MAX_NODES} values; a spec is "
                                "far smaller [too_large]", event.start_mark)
        return super().compose_node(parent, index)


# Characters YAML 1.2 allows in a stream (§5.1); ruamel stops at any other with an unlocated ReaderError.
_NON_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of character `index` of `text`."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _text_issue(text: str, shown: str) -> SpecIssue | None:
    """Problems visible in the raw text, found before ruamel sees it.

    * a character YAML does not allow (ruamel reports it by byte offset only);
    * flow collections (`[[[[…`) nested deeper than the limit: ruamel's scanner looks ahead over every open
      bracket for each token, so 5,000 of them take seconds before any depth limit can act. The count skips
      quoted text and comments; a bracket inside a plain scalar counts too, which errs on the side of refusing
      a document no real spec resembles.
    """
    m = _NON_PRINTABLE.search(text)
    if m is not None:
        line, col = _position(text, m.start())
        return SpecIssue(shown, line, col, "", f"character {m.group()!r} is not allowed in YAML (write it as an "
                         "escape inside double quotes if a value really needs it) [yaml_character]")
    depth, quote, comment, prev = 0, "", False, "\n"
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if comment:
            comment = c != "\n"
        elif quote:
            if quote == '"' and c == "\\":
                i += 1  # the escaped character cannot end the string
            elif c == quote:
                quote = ""
        elif c in "'\"" and (prev in " \t\n[{,:-?" or prev == "\n"):
            quote = c
        elif c == "#" and prev in " \t\n":
            comment = True
        elif c in "[{":
            depth += 1
            if depth > limits.MAX_DEPTH:
                line, col = _position(text, i)
                return SpecIssue(shown, line, col, "", f"nested deeper than {limits.MAX_DEPTH} levels [too_deep]")
        elif c in "]}":
            depth = max(depth - 1, 0)
        prev = c
        i += 1
    return None


def _read_bounded(path: Path, shown: str) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_BYTES.

    Opened non-blocking and checked with fstat on the open descriptor: a FIFO would block `open` and `read`
    forever, `/dev/zero` never ends, and a check by name before opening could see another file than the one read.
    """
    def fail(message: str) -> SpecError:
        return SpecError([SpecIssue(shown, 1, 1, "", message)])

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise fail("file not found [file_not_found]") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        if isinstance(e, OSError) and e.errno == errno.ELOOP:
            raise fail("cannot read file: a loop of symbolic links [os_error]") from None
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise fail(f"cannot read file: {limits.shorten(reason)} [os_error]") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise fail("not a regular file (a spec is a YAML file, not a device, pipe or folder) [not_a_file]")
        if info.st_size > limits.MAX_BYTES:
            raise fail(f"{info.st_size} bytes: a spec file holds at most {limits.MAX_BYTES} [too_large]")
        chunks, size = [], 0
        while size <= limits.MAX_BYTES:  # the size can change between fstat and read
            chunk = os.read(fd, limits.MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limits.MAX_BYTES:
            raise fail(f"more than {limits.MAX_BYTES} bytes: a spec file holds at most that [too_large]")
        return b"".join(chunks)
    except OSError as e:
        raise fail(f"cannot read file: {limits.shorten(e.strerror or str(e))} [os_error]") from None
    finally:
        os.close(fd)


def read_yaml(path: str | Path, *, display_path: str | None = None) -> Any:
    """Load one YAML document in round-trip mode; the result is a CommentedMap with positions.

    Every problem that stops us from getting a top-level mapping of plain values (`check_values`) raises
    SpecError; nothing here raises anything else, whatever the file holds.
    """
    shown = display_path if display_path is not None else str(path)
    return _parse(_read_bounded(Path(path), shown), shown)


@lru_cache(maxsize=16)
def _parse(data: bytes, shown: str) -> Any:
    """The document in `data`, parsed once per process: one command reads a spec once per scale profile and once
    more as another spec's base or context, and ruamel is slow (pure Python). Keyed by the bytes, so an edited
    file is parsed again; callers treat the document as read-only (validation runs on a `to_plain` copy).
    A SpecError is not cached (lru_cache does not keep exceptions), so a broken file is simply parsed again."""
    try:
        # utf-8-sig drops a BOM, which would otherwise shift every column of line 1.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start
        line = data.count(b"\n", 0, start) + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise SpecError([SpecIssue(shown, line, col, "", "file is not UTF-8 text [encoding]")]) from None

    early = _version_issue(text, shown) or _text_issue(text, shown)
    if early is not None:
        raise SpecError([early])

    # A fresh YAML object per file: ruamel keeps a %YAML version across loads on the same instance.
    yaml = YAML(typ="rt")
    yaml.Constructor = _Constructor
    yaml.Composer = _Composer
    yaml.max_depth = limits.MAX_DEPTH
    yaml.allow_duplicate_keys = False  # the default, stated because the module's promise depends on it
    try:
        with warnings.catch_warnings():
            # any warning ruamel would print raw on stderr becomes a located error instead
            warnings.simplefilter("error")
            doc = yaml.load(text)
    except ReaderError as e:  # the text check above finds these first; kept in case ruamel disagrees
        line, col = _position(text, min(max(int(e.position or 0), 0), len(text)))
        raise SpecError([SpecIssue(shown, line, col, "", "character not allowed in YAML [yaml_character]")]) from None
    except YAMLError as e:
        raise SpecError([_yaml_error_issue(e, shown)]) from None
    except Warning as w:
        raise SpecError([SpecIssue(shown, 1, 1, "", f"{_one_line(str(w).strip(), limits.MAX_MESSAGE)} [yaml_warning]")]) from None

    if doc is None:
        raise SpecError([SpecIssue(shown, 1, 1, "", "empty document: expected a mapping of spec fields [empty_document]")])
    if not isinstance(doc, CommentedMap):
        lc = getattr(doc, "lc", None)
        line, col = (lc.line + 1, lc.col + 1) if lc is not None and lc.line is not None else (1, 1)
        raise SpecError([SpecIssue(shown, line, col, "",
                                   f"the top level must be a mapping, not {_written_as(doc)} [not_a_mapping]")])
    issues = check_values(doc, shown)
    if issues:
        raise SpecError(issues)
    return doc


def check_values(doc: CommentedMap, shown: str) -> list[SpecIssue]:
    """Specs hold JSON's values only: mappings keyed by names or integers, lists, strings, finite numbers in int64,
    booleans and null.

    YAML can say more (dates, sets, binary, mappings or lists as keys, recursive aliases), and none of it has a
    meaning in a spec: it would reach the models as types they never see, or crash whatever serialises the spec
    later. Also bounds the document *after* alias expansion, which is what validation walks.
    """
    issues: list[SpecIssue] = []
    sizes: dict[int, int] = {}  # expanded value count per container, so each shared alias is counted once
    open_: set[int] = set()  # containers on the current path: a second visit is a recursive alias

    def where(container: Any, key: Any, which: str = "value") -> tuple[int, int]:
        pos = _pos(container, key, which) if container is not None else None
        if pos is None:
            lc = getattr(container, "lc", None)
            pos = (lc.line, lc.col) if lc is not None and lc.line is not None else (0, 0)
        return pos[0] + 1, pos[1] + 1

    def add(container: Any, key: Any, message: str, which: str = "value") -> None:
        line, col = where(container, key, which)
        issues.append(SpecIssue(shown, line, col, "", message))

    def scalar(value: Any, container: Any, key: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, int):
            if abs(value) > limits.MAX_INT:
                add(container, key, f"{limits.echo(value)} is too large (integers in a spec stay within ±(2**63 − 1)) "
                    "[int_range]")
        elif isinstance(value, float):
            if not math.isfinite(value):
                add(container, key, "numbers must be finite (an .inf, .nan or a float beyond ~1.8e308 is not) "
                    "[finite_number]")
        elif isinstance(value, str):
            if len(value) > limits.MAX_STRING:
                add(container, key, f"a string of {len(value)} characters; at most {limits.MAX_STRING} [string_too_long]")
            elif limits.CONTROL.search(value.replace("\n", "").replace("\t", "")):
                add(container, key, f"{limits.echo(value)} holds a control character [control_character]")
        else:
            add(container, key, f"a YAML {type(value).__name__} value has no meaning in a spec: use a string, number, "
                "boolean, null, list or mapping [yaml_type]")

    def visit(node: Any, container: Any, key: Any) -> int:
        if not isinstance(node, (CommentedMap, CommentedSeq)):
            scalar(node, container, key)
            return 1
        if id(node) in open_:
            add(container, key, "an alias that contains itself [recursive_alias]")
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if type(node) not in (CommentedMap, CommentedSeq):  # !!omap, !!pairs
            add(container, key, f"a YAML {type(node).__name__} has no meaning in a spec: use a mapping or list "
                "[yaml_type]")
            return 1
        open_.add(id(node))
        total = 1
        if isinstance(node, CommentedMap):
            for k in list(node.keys()):
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    add(node, k, f"a mapping key must be a name or an integer, not a {type(k).__name__} [key_type]",
                        "key")
                    continue
                if isinstance(k, int):
                    scalar(k, node, k)
                total += visit(node[k], node, k)
                if total > limits.MAX_NODES:
                    break
        else:
            for i, item in enumerate(node):
                total += visit(item, node, i)
                if total > limits.MAX_NODES:
                    break
        open_.discard(id(node))
        sizes[id(node)] = total
        if total > limits.MAX_NODES and not issues:
            add(container, key, f"more than {limits.MAX_NODES} values once aliases are expanded [too_large]")
        return total

    visit(doc, None, None)
    return issues[:20]  # a hostile document can hold thousands of the same mistake


def to_plain(node: Any, _memo: dict[int, Any] | None = None) -> Any:
    """Deep copy of a round-trip document using only builtin types (dict, list, str, int, float, bool).

    Aliases keep sharing one converted object (and cyclic aliases terminate) thanks to the memo.
    Merge keys (`<<: *base`) are resolved, since CommentedMap.items() includes merged entries.
    """
    memo = {} if _memo is None else _memo
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, Mapping):
        out: dict[Any, Any] = {}
        memo[id(node)] = out
        for k, v in node.items():
            out[to_plain(k, memo)] = to_plain(v, memo)
        return out
    if isinstance(node, (list, CommentedSeq)):
        seq: list[Any] = []
        memo[id(node)] = seq
        seq.extend(to_plain(v, memo) for v in node)
        return seq
    if isinstance(node, AbstractSet):  # !!set loads as CommentedSet
        return {to_plain(v, memo) for v in node}
    if isinstance(node, tuple):  # flow sequences used as keys load as tuples
        return tuple(to_plain(v, memo) for v in node)
    # Order matters: ScalarBoolean and bool are ints, and bool cannot be subclassed.
    if isinstance(node, ScalarBoolean):
        return bool(node)
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node  # dates, timestamps, bytes: already usable as they are


# ------------------------------------------------------------------------------------------ locating


def walk(doc: Any, loc: Loc) -> tuple[list[tuple[Any, Any]], list[bool], bool]:
    """Follow `loc` through the document (round-trip or plain: mappings and lists of either kind).

    Returns the steps taken as (container, key-or-index) pairs, which loc parts matched, and whether
    the loc asked for a mapping *key* (Pydantic's `[key]` marker after a dict-key error). Parts that are
    not keys of the current mapping / indices of the current sequence are skipped: they are Pydantic's
    own labels (discriminated-union tags such as 'pd', 'function-after[...]', union member names like
    'int'), or a field the document does not contain (missing, or defaulted).
    """
    steps: list[tuple[Any, Any]] = []
    matched: list[bool] = []
    at_key = False
    node = doc
    for part in loc:
        matched.append(False)
        if part == "[key]" and steps:
            at_key = True
            continue
        if isinstance(node, Mapping):
            try:
                found = part in node
            except TypeError:  # unhashable part
                found = False
            if found:
                steps.append((node, part))
                matched[-1] = True
                node = node[part]
                continue
        elif isinstance(node, list) and isinstance(part, int) and not isinstance(part, bool):
            if 0 <= part < len(node):
                steps.append((node, part))
                matched[-1] = True
                node = node[part]
                continue
    return steps, matched, at_key


def _pos(container: Any, key: Any, which: str) -> tuple[int, int] | None:
    """0-based position of a key ('key') or of its value ('value') in its container, if recorded.

    Merged keys (`<<: *base`) and programmatically added entries have no record: None.
    """
    try:
        if isinstance(container, CommentedSeq):
            line, col = container.lc.item(key)
        elif which == "key":
            line, col = container.lc.key(key)
        else:
            line, col = container.lc.value(key)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if line is None or col is None:
        return None
    return line, col


def _first_key(node: CommentedMap) -> tuple[int, int] | None:
    # lc.data is keyed in document order and holds only keys written in this mapping (not merged ones).
    for entry in (node.lc.data or {}).values():  # an empty flow mapping `{}` records no keys (data is None)
        return entry[0], entry[1]
    if node.lc.line is not None:
        return node.lc.line, node.lc.col
    return None


def _resolve(doc: Any, loc: Loc, kind: str) -> tuple[int, int, list[bool]]:
    """1-based (line, col) for an error of `kind` at `loc`, plus which loc parts exist in the document."""
    steps, matched, at_key = walk(doc, loc)
    node = steps[-1][0][steps[-1][1]] if steps else doc

    pos: tuple[int, int] | None = None
    if kind == "missing":
        # The field is absent, so point at whatever holds the mapping that lacks it.
        if not steps:
            return 1, 1, matched
        pos = _pos(*steps[-1], "key")
    elif steps and (kind == "extra_forbidden" or at_key):
        pos = _pos(*steps[-1], "key")
    elif isinstance(node, CommentedMap):
        # An error on a whole mapping is a model/dict validator's verdict: point at its first key,
        # the line where that block's content starts (for block mappings this is also lc.value).
        pos = _first_key(node)
    elif steps:
        pos = _pos(*steps[-1], "value")

    # Fall back to the nearest enclosing entry that has a recorded position.
    i = len(steps) - 1
    while pos is None and i >= 0:
        pos = _pos(*steps[i], "key" if i < len(steps) - 1 else "value")
        i -= 1
    if pos is None:
        return 1, 1, matched
    return pos[0] + 1, pos[1] + 1, matched


def locate(doc: Any, loc: tuple[str | int, ...], *, kind: str) -> tuple[int, int]:
    """Map a Pydantic error `loc` of error type `kind` to a 1-based (line, col) in the round-trip document.

    * extra_forbidden: the offending key;
    * missing: the key (or list item) holding the mapping that lacks the field; 1:1 at top level;
    * anything else: the value (a mapping's first key for errors on a whole mapping, e.g. model validators).
    """
    line, col, _ = _resolve(doc, tuple(loc), kind)
    return line, col


def _dotted(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts)


def issue_at(doc: Any, loc: tuple, message: str, *, path: str, kind: str = "value_error") -> SpecIssue:
    """An issue for a rule checked outside Pydantic, located like a Pydantic error.

    `loc` is printed as given: callers pass real field paths, and a field that is not written in the
    file (a default) must still be named; its position falls back to the enclosing block.
    """
    line, col, _ = _resolve(doc, tuple(loc), kind)
    return SpecIssue(path, line, col, _dotted(loc), message)


# -------------------------------------------------------------------------------------------- models


def _discriminator_field(err: Mapping[str, Any]) -> str | None:
    """Field name of a discriminated union from Pydantic's ctx (`"'kind'"`); None for callable ones."""
    text = str((err.get("ctx") or {}).get("discriminator", ""))
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    return None


# Pydantic errors that say "not a mapping" in Python's words ("a valid dictionary or instance of TeacherSpec": the
# model's class name, which a spec never shows). Said in YAML's words, with what was written instead.
_NOT_A_MAPPING = ("model_type", "model_attributes_type", "dict_type")


def _written_as(node: Any) -> str | None:
    """What kind of YAML value `node` is, in a spec writer's words (None for a mapping)."""
    if isinstance(node, Mapping):
        return None
    if isinstance(node, (list, CommentedSeq)):
        return "a list"
    if node is None:
        return "null"
    # before numbers: ruamel keeps an anchored boolean (`&x true`) as a ScalarBoolean, a subclass of int
    if isinstance(node, (bool, ScalarBoolean)):
        return "a boolean"
    if isinstance(node, (int, float)):
        return "a number"
    if isinstance(node, str):
        return "a string"
    if isinstance(node, (datetime.date, datetime.datetime)):  # ruamel reads 2024-01-01 as a timestamp
        return "a date"
    return f"a {type(node).__name__}"


def _choice_message(err: Mapping[str, Any], written: Any) -> str:
    """An unknown discriminator value, said one way whichever union reports it: "Input should be 'pd', 'sferd' or …
    (got 'pdx')". Pydantic's union_tag_invalid says "Input tag 'pdx' found using 'kind' does not match any of the
    expected tags: …"; the models' UNKNOWN_CHOICE errors already list the values like Pydantic's literal errors."""
    kind = err["type"]
    if kind == "union_tag_invalid":
        tags = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected_tags", "")))
        head = f"Input should be {limits.one_of(tags)}" if tags else str(err["msg"])
    else:
        head = str(err["msg"])
    return f"{head} (got {limits.echo(to_plain(written))}) [{kind}]"


def _issue_from_error(doc: Any, shown: str, err: Mapping[str, Any]) -> SpecIssue:
    loc: Loc = tuple(err["loc"])
    kind: str = err["type"]
    message = f"{err['msg']} [{kind}]"

    field = _discriminator_field(err)
    if field is not None:
        # A discriminated union's tag (Pydantic's union_tag_* errors, and the models' own UNKNOWN_CHOICE errors of
        # unions whose tag a function picks). Pydantic reports these at the list item; the user has to fix the
        # discriminator field itself, so name it: a bad value points at the value, an absent one is reported like a
        # missing field.
        steps, _, _ = walk(doc, loc)
        node = steps[-1][0][steps[-1][1]] if steps else doc
        if isinstance(node, CommentedMap):
            if kind != "union_tag_not_found" and field in node:
                message = _choice_message(err, node[field])
                loc, kind = loc + (field,), "value_error"
            elif kind == "union_tag_not_found" and field not in node:
                loc, kind = loc + (field,), "missing"
    elif kind in _NOT_A_MAPPING:
        steps, _, _ = walk(doc, loc)
        written = _written_as(steps[-1][0][steps[-1][1]]) if steps else None
        message = (f"Input should be a mapping (a block of `key: value` fields)"
                   f"{', not ' + written if written else ''} [{kind}]")

    line, col, matched = _resolve(doc, loc, kind)
    last = len(loc) - 1
    shown_loc = [
        part for i, part in enumerate(loc)
        if matched[i]
        # The missing field is not in the document, so walk skipped it; it is the point of the message.
        or (i == last and kind == "missing")
        # Keep Pydantic's marker: "updates_override.a.[key]" says the key, not its value, is wrong.
        or (i == last and part == "[key]")
    ]
    return SpecIssue(shown, line, col, _dotted(shown_loc), message)


def validate_document(
    plain: Any,
    model: type[BaseModel],
    *,
    where: Callable[[Loc], tuple[Any, str, Loc]],
    context: dict | None = None,
) -> BaseModel:
    """Validate an already-read plain document. `where(loc)` gives, for an error at `loc`, the round-trip document
    and file it belongs to and the loc to look up there (a spec that extends another has fields from two files; a
    value a scale profile wrote is located at the profile's entry)."""
    try:
        return model.model_validate(plain, context=context)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        issues = []
        for err in errors:
            doc, shown, loc = where(tuple(err["loc"]))
            issues.append(_issue_from_error(doc, shown, {**err, "loc": loc}))
        raise SpecError(issues) from None


def load_model(
    path: str | Path,
    model: type[BaseModel],
    *,
    display_path: str | None = None,
    context: dict | None = None,
) -> BaseModel:
    """Read `path` and validate it as `model`; raise SpecError with one located issue per Pydantic error."""
    shown = display_path if display_path is not None else str(path)
    doc = read_yaml(path, display_path=shown)
    return validate_document(to_plain(doc), model, where=lambda loc: (doc, shown, loc), context=context)
