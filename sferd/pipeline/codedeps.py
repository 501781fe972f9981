"""Which source files a stage imports, found statically (DESIGN.md step 3: deps on the code a stage uses).

A stage depends on its runner module and on the `sferd` modules that module imports, transitively —
never on the whole package, or any CLI edit would retrain every model (conventions.md §6). Imports are read
from the AST (including imports inside functions, where heavy modules are imported lazily), so the result
needs no torch and is the same on every machine.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "sferd"


def _module_file(root: Path, module: str) -> Path | None:
    base = root / Path(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path, module: str) -> set[str]:
    return set(_imports_cached(str(path), module))


@lru_cache(maxsize=None)
def _imports_cached(path_str: str, module: str) -> frozenset[str]:
    """One parse per file per process: every stage kind's closure walks the same core modules."""
    path = Path(path_str)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_pkg else 0)
                base = ".".join(parts[:keep])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            # `from sferd.diffusion import schedule` imports a submodule
            found.update(f"{mod}.{a.name}" for a in node.names)
    return frozenset(m for m in found if m == PACKAGE or m.startswith(PACKAGE + "."))


@lru_cache(maxsize=None)
def module_closure(root: str, module: str) -> tuple[str, ...]:
    """Repo-relative files of `module` and every sferd module it imports (sorted, posix paths)."""
    rootp = Path(root)
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = _module_file(rootp, mod)
        if path is None:
            continue
        seen[mod] = path
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = mod.split(".")
        todo.extend(".".join(parts[:k]) for k in range(1, len(parts)))
        todo.extend(_imports(path, mod))
    # sferd/__init__.py only carries the version string; depending on it would retrain everything on a bump.
    # A package __init__ holding nothing but its docstring cannot change what a stage computes; leaving it out
    # keeps dvc.lock (parsed several times per `dvc repro`) smaller. Once such a file gains code it becomes a
    # dep again, `sferd-spec compile --check` reports dvc.yaml stale, and the recompiled stages re-run.
    files = {p.relative_to(rootp).as_posix() for m, p in seen.items() if m != PACKAGE and not _docstring_only(p)}
    return tuple(sorted(files))


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return path.name == "__init__.py" and not body


# Every stage command runs the launcher, which hands the stage to the runner; both import closures are every
# stage's code deps.
LAUNCHER = "sferd.pipeline.launch"
RUNNER = "sferd.pipeline.run"
# Non-Python files a stage kind reads (templates), which the import scan cannot see.
DATA_DEPS: dict[str, tuple[str, ...]] = {"render": ("sferd/report/templates/table.md.j2",)}


# Modules that decide *how* a stage runs on this machine (process count, runtime settings, progress output), never
# what it computes: results do not depend on them (DESIGN.md "Scale"), so they are not code deps. Editing the
# launcher must not re-run, or restart the training of, every stage of every pipeline.
OPERATIONAL = frozenset({"sferd/pipeline/launch.py", "sferd/util/runtime.py", "sferd/util/progress.py"})


def stage_code(root: str, kind: str) -> tuple[str, ...]:
    """Every source file a stage of this kind runs that can change its results: its DVC code deps."""
    files = (set(module_closure(root, LAUNCHER)) | set(module_closure(root, RUNNER))
             | set(module_closure(root, f"sferd.pipeline.stages.{kind}"))) - OPERATIONAL
    return tuple(sorted(files | set(DATA_DEPS.get(kind, ()))))


def code_fingerprint(root: str, kind: str) -> str:
    """SHA-256 over the stage's code deps (paths and contents). The runner adds it to the stage's config, so a
    training stage resumes its saved state only under the code that wrote it: after a code change DVC re-runs
    the stage and it trains again instead of re-saving its old final state."""
    h = hashlib.sha256()
    for rel in stage_code(root, kind):
        h.update(rel.encode() + b"\0" + (Path(root) / rel).read_bytes() + b"\0")
    return h.hexdigest()
