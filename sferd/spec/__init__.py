"""Experiment specs: Pydantic models, YAML loading with positions, semantic checks. Imports no torch."""

from __future__ import annotations

from pathlib import Path

from sferd.spec.checks import check_spec
from sferd.spec.loader import SpecError, issue_at, load_model, read_yaml
from sferd.spec.models import Spec

__all__ = ["Spec", "SpecError", "load_spec"]


def load_spec(path: str | Path, *, display_path: str | None = None) -> Spec:
    """Load and fully validate a spec; raise SpecError with every located problem."""
    shown = display_path or str(path)
    spec = load_model(path, Spec, display_path=shown)
    problems = check_spec(spec)
    if problems:
        doc = read_yaml(path, display_path=shown)
        issues = sorted(issue_at(doc, loc, msg, path=shown) for loc, msg in problems)
        err = SpecError(issues)
        raise err
    return spec
