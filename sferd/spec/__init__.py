"""Experiment specs: Pydantic models, YAML loading with positions, semantic checks. Imports no torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sferd.spec.checks import check_spec
from sferd.spec.extends import SpecLayers, read_spec_layers
from sferd.spec.loader import SpecError, SpecIssue, validate_document
from sferd.spec.models import ScalesBlock, Spec
from sferd.spec.scale import apply_scale, override_for

__all__ = ["Spec", "SpecError", "load_spec", "spec_issue"]


def load_spec(path: str | Path, *, display_path: str | None = None, scale: str | None = None) -> Spec:
    """Load (with the spec it `extends`, if any, at scale profile `scale`, if given) and fully validate a spec;
    raise SpecError with every located problem."""
    shown = display_path or str(path)
    layers = read_spec_layers(path, shown=shown)
    if layers.base_path is not None:
        load_spec(layers.base_path, display_path=layers.base_shown)  # its own errors, in its own file
    plain = layers.plain()
    if "scale" in layers.doc:
        raise SpecError([layers.issue(("scale",), "`scale` is set by `--scale NAME` on the command line, not in a spec")])
    relocate = _no_relocation
    if scale is not None:
        plain, relocate = _at_scale(layers, plain, scale)
    spec = validate_document(plain, Spec, where=lambda loc: layers.where(relocate(loc)))
    problems = check_spec(spec)
    if problems:
        raise SpecError(layers.issue(relocate(loc), msg) for loc, msg in problems)
    return spec


def _no_relocation(loc: tuple) -> tuple:
    return loc


def _at_scale(layers: SpecLayers, plain: dict, scale: str) -> tuple[dict, Callable[[tuple], tuple]]:
    """The plain spec with profile `scale` applied, and the loc mapping that points an error in a value the profile
    wrote at its `set:` entry."""
    # the profile itself first: applying a malformed one would fail with a traceback, not a located error
    validate_document({"scales": plain.get("scales") or {}}, ScalesBlock, where=layers.where)
    scaled, written, bad = apply_scale(plain, scale)
    if bad:
        raise SpecError(layers.issue(("scales", scale, "set", key) if key else ("scales",), f"scale {scale!r}: {msg}")
                        for key, msg in bad)

    def relocate(loc: tuple) -> tuple:
        key = override_for(scaled, loc, written)
        return loc if key is None else ("scales", scale, "set", key)

    return scaled, relocate


def spec_issue(path: str | Path, loc: tuple, message: str, *, display_path: str | None = None) -> SpecIssue:
    """A located issue about a spec that loaded (a problem found after validation: compile's checks of pipeline
    folders and stage names), at `loc`, which may be a field the spec inherits."""
    shown = display_path or str(path)
    try:
        layers = read_spec_layers(path, shown=shown)
    except SpecError:  # changed since it was loaded: still name the file and the field
        return SpecIssue(shown, 1, 1, ".".join(map(str, loc)), message)
    return layers.issue(loc, message)
