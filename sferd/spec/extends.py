"""`extends: other.yaml`: a spec that takes its experiment set-up from another spec.

Ablations share their base's data, teacher and (usually) evaluation protocol; writing those blocks again in
every ablation file would let them drift apart silently. A spec with `extends` inherits every *set-up* field it
does not write itself (`INHERITED`) from the named spec, whole: a field is taken from one file or the other,
never merged key by key, so where a value comes from is always one look away. The identity of the experiment
(name, pipeline, table, reported numbers, description) is never inherited.

One level only: the base may not itself extend a spec. The base must be valid on its own (its errors are reported
in its file); a semantic clash between an inherited field and this spec's own fields is reported at `extends:`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

from sferd.spec.limits import echo
from sferd.spec.loader import SpecError, SpecIssue, issue_at, read_yaml, to_plain
from sferd.spec.models import EXTENDS_RE

# Set-up fields a spec may take from its base. Everything else is the extending spec's own.
INHERITED = ("seed", "seeds", "precision", "stage_granularity", "dataset", "features", "teacher", "methods", "evaluation")


@dataclass(frozen=True)
class SpecLayers:
    """A spec's round-trip document, plus its base's when it extends one, and which top-level fields come from
    the base."""

    doc: CommentedMap
    shown: str
    base_doc: CommentedMap | None = None
    base_shown: str | None = None
    inherited: frozenset[str] = frozenset()
    base_path: Path | None = None

    def where(self, loc: tuple) -> tuple[Any, str, tuple]:
        """The document and file an error at `loc` belongs to (and the loc to look up there)."""
        if loc and loc[0] in self.inherited and self.base_doc is not None:
            return self.base_doc, self.base_shown or "", loc
        return self.doc, self.shown, loc

    def plain(self) -> dict[str, Any]:
        out = to_plain(self.doc)
        if self.base_doc is not None:
            for key in self.inherited:
                out[key] = to_plain(self.base_doc[key])
        return out

    def issue(self, loc: tuple, message: str):
        """A semantic problem (check_spec). One in an inherited field is the extending spec's to fix (the base is
        valid on its own; it is this spec's other fields that clash with it), so it points at `extends:`."""
        if loc and loc[0] in self.inherited:
            where = issue_at(self.doc, ("extends",), message, path=self.shown)
            dotted = ".".join(map(str, loc))
            return SpecIssue(where.path, where.line, where.col, f"{dotted} (inherited from {self.base_shown})", message)
        doc, shown, loc = self.where(loc)
        return issue_at(doc, loc, message, path=shown)


def read_spec_layers(path: str | Path, *, shown: str) -> SpecLayers:
    doc = read_yaml(path, display_path=shown)
    if "extends" not in doc:
        return SpecLayers(doc, shown)
    value = doc["extends"]

    def fail(message: str) -> SpecError:
        return SpecError([issue_at(doc, ("extends",), message, path=shown)])

    if not isinstance(value, str) or not EXTENDS_RE.fullmatch(value):
        # the pattern also keeps out NUL bytes, newlines and absolute paths
        raise fail("`extends` takes the path of another spec file, relative to this one (e.g. table2.yaml): "
                   "file-name characters [A-Za-z0-9_.-] and `/`, ending in .yaml")
    base_path = Path(path).parent / value
    base_shown = posixpath.normpath(posixpath.join(posixpath.dirname(shown), value))
    try:
        exists = base_path.is_file()
        same = exists and base_path.resolve(strict=True) == Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a name longer than the file system allows; a loop of symlinks
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "a loop of symbolic links"
        raise fail(f"cannot use {echo(value)}: {reason}") from None
    if not exists:
        raise fail(f"no spec file {base_shown} to extend")
    if same:
        raise fail("a spec cannot extend itself")
    base_doc = read_yaml(base_path, display_path=base_shown)
    if "extends" in base_doc:
        raise fail(f"{base_shown} itself extends {base_doc['extends']}: extend that spec directly (one level only)")
    inherited = frozenset(k for k in INHERITED if k in base_doc and k not in doc)
    return SpecLayers(doc, shown, base_doc, base_shown, inherited, base_path)
