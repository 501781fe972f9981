"""Experiment specs: Pydantic models, YAML loading with positions, semantic checks. Imports no torch."""

from __future__ import annotations

from pathlib import Path

from sferd.spec.checks import check_spec
from sferd.spec.extends import read_spec_layers
from sferd.spec.loader import SpecError, validate_document
from sferd.spec.models import Spec

__all__ = ["Spec", "SpecError", "load_spec"]


def load_spec(path: str | Path, *, display_path: str | None = None) -> Spec:
    """Load (with the spec it `extends`, if any) and fully validate a spec; raise SpecError with every located
    problem."""
    shown = display_path or str(path)
    layers = read_spec_layers(path, shown=shown)
    spec = validate_document(layers.plain(), Spec, where=layers.where)
    problems = check_spec(spec)
    if problems:
        raise SpecError(layers.issue(loc, msg) for loc, msg in problems)
    return spec
