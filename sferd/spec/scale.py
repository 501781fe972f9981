"""Scale profiles: run a spec's pipeline at another size without writing a second spec.

A spec may define named profiles under `scales:`, each a description and a `set:` mapping of dotted paths to
values (`teacher.updates: 30`, `methods.*.start_steps: 16`, `features: {...}`). `--scale NAME` on the CLI loads
the spec with those values replaced before validation, so a scaled spec is checked by exactly the same rules.

A scaled run must never be mistaken for (or collide with) the spec's real one, so the profile name is appended to
the pipeline folder, the table id and every stage name (`cifar10-smoke-teacher`), and the rendered table says
which scale it was run at and what the profile changed.
"""

from __future__ import annotations

import copy
from typing import Any

from sferd.spec.loader import walk

PathPart = str | int

# Top-level fields a profile may not set: the spec's identity, the machinery that selects the profile itself, and
# what a published number means: the table and the paper's reported rows are the same at every scale.
FIXED = ("schema_version", "name", "description", "extends", "pipeline", "scales", "scale", "table", "reported")


def parse_path(key: str) -> list[str]:
    """The parts of a `set:` key; the key already matched models.SET_PATH_RE, so an index-like part is a canonical
    ASCII integer and each concrete path has exactly one spelling."""
    return key.split(".")


def _index(part: str) -> int | None:
    return int(part) if part.isascii() and part.isdigit() else None


def _targets(node: Any, parts: list[str], at: tuple[PathPart, ...] = ()) -> list[tuple[PathPart, ...]]:
    """Concrete paths `parts` names in `node` (`*` expands over a list). Raise ValueError if one does not exist."""
    if not parts:
        return [at]
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head == "*":
            if not node:
                raise ValueError(f"{'.'.join(map(str, at))} is an empty list: `*` sets nothing")
            return [t for i, item in enumerate(node) for t in _targets(item, rest, (*at, i))]
        index = _index(head)
        if index is not None and index < len(node):
            return _targets(node[index], rest, (*at, index))
        raise ValueError(f"{'.'.join(map(str, at)) or 'the spec'} is a list of {len(node)}: use an index or `*`, "
                         f"not {head!r}")
    if isinstance(node, dict):
        # keys of integer-keyed mappings (updates_override: {2: 100000}) are YAML integers
        key: PathPart = head if _index(head) is None else _index(head)
        if key in node:
            return _targets(node[key], rest, (*at, key))
        if not rest:  # a field the spec leaves at its default (or a block it omits) may be set
            return [(*at, key)]
        raise ValueError(f"the spec has no {'.'.join(map(str, (*at, head)))}")
    raise ValueError(f"{'.'.join(map(str, at))} is a value, not a block: cannot set {'.'.join(parts)} inside it")


def _assign(doc: dict, path: tuple[PathPart, ...], value: Any) -> None:
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = copy.deepcopy(value)


def scaled_pipeline(pipeline: str, spec_name: str, scale: str) -> str:
    """The pipeline folder of a spec loaded at profile `scale`: beside the spec's own, never the root."""
    return f"stages/{spec_name}-{scale}" if pipeline in ("", ".") else f"{pipeline}-{scale}"


def apply_scale(plain: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[tuple, str], list[tuple[str, str]]]:
    """The spec at scale `name`, which concrete path each `set:` key wrote (for locating errors), and problems
    (dotted key, message) with the profile itself. The `scales` block must already be validated."""
    scales = plain.get("scales") or {}
    if name not in scales:
        return plain, {}, [("", f"no scale profile {name!r} (this spec defines: {sorted(scales) or 'none'})")]
    out = copy.deepcopy(plain)
    written: dict[tuple, str] = {}
    inside: dict[tuple, str] = {}  # every proper prefix of a written path → a key that wrote below it
    problems: list[tuple[str, str]] = []
    for key, value in scales[name]["set"].items():
        key = str(key)
        if parse_path(key)[0] in FIXED:
            problems.append((key, f"a scale profile cannot set {parse_path(key)[0]!r} (the scaled run's pipeline, "
                                  "table and stage names are derived from the spec's own, and the paper's reported "
                                  "numbers are the same at every scale)"))
            continue
        try:
            paths = _targets(out, parse_path(key))
        except ValueError as e:
            problems.append((key, str(e)))
            continue
        for path in paths:
            # Two keys reaching one value (`methods.*.lr` and `methods.0.lr`, or a block and a field inside it):
            # YAML order would silently decide which wins.
            clash = next((written[path[:k]] for k in range(1, len(path) + 1) if written.get(path[:k], key) != key),
                         None) or (inside[path] if inside.get(path, key) != key else None)
            if clash is not None:
                problems.append((key, f"sets {'.'.join(map(str, path))}, which {clash} also sets: set each value once"))
                break
            _assign(out, path, value)
            written[path] = key
            for k in range(1, len(path)):
                inside.setdefault(path[:k], key)
    # the scaled run's own namespace: never the real run's pipeline, table or stage names
    out["pipeline"] = scaled_pipeline(out.get("pipeline", ""), str(out.get("name", "spec")), name)
    if isinstance(out.get("table"), dict) and "id" in out["table"]:
        out["table"]["id"] = f"{out['table']['id']}-{name}"
    out["scale"] = name
    return out, written, problems


def override_for(plain: Any, loc: tuple, written: dict[tuple, str]) -> str | None:
    """The `set:` key whose value an error at `loc` is about, if the profile wrote that part of the spec.

    Pydantic locs carry labels that are not in the document (a discriminated union's tag: `methods.0.pd.lr`), so
    the loc is first reduced to the parts that exist in the scaled document."""
    steps, _, _ = walk(plain, loc)
    concrete = [key for _, key in steps]
    for k in range(len(concrete), 0, -1):
        if tuple(concrete[:k]) in written:
            return written[tuple(concrete[:k])]
    return None
