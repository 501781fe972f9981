"""Which source files a stage imports, found statically (DESIGN.md step 3: deps on the code a stage uses).

A stage depends on its runner module and on the `sferd` modules that module imports, transitively —
never on the whole package, or any CLI edit would retrain every model (conventions.md §6). Imports are read
from the AST (including imports inside functions, where heavy modules are imported lazily), so the result
needs no torch and is the same on every machine.
"""

from __future__ import annotations

import ast
import hashlib
import re
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


# --- code deps through one fingerprint file per stage kind ------------------------------------------------------
# Listing every stage's ~30 source files as DVC deps made DVC build ~5,500 dep entries (and dvc.lock repeat each
# with its md5) for a no-op `dvc repro`. Instead one stage (`code-fingerprints`, compiled by dvcfile.py) depends
# on the union of the source files and writes one small file per stage kind; every other stage depends on its
# kind's file. DVC compares dep contents, so a file edit re-runs exactly the stages whose kind's closure holds it.

FINGERPRINT_STAGE = "code-fingerprints"
FINGERPRINT_DIR = "results/code"
_KIND = re.compile(r"[a-z][a-z0-9_]*")  # a module name under sferd.pipeline.stages
_OUT_DIR = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
USAGE = "usage: python -m sferd.pipeline.codedeps --out DIR KIND [KIND ...]"


def fingerprint_path(kind: str) -> str:
    """The repo-relative file a stage of this kind depends on instead of its source files."""
    return f"{FINGERPRINT_DIR}/{kind}.sha256"


def fingerprint_text(root: str, kind: str) -> str:
    """What `fingerprint_path(kind)` holds: one `sha256  path` line per file of `stage_code` (so a diff of two
    versions names the file that changed), then the kind's `code_fingerprint` (the runner's `code_sha256`)."""
    lines = [f"{hashlib.sha256((Path(root) / rel).read_bytes()).hexdigest()}  {rel}" for rel in stage_code(root, kind)]
    return "\n".join([*lines, f"code_fingerprint {code_fingerprint(root, kind)}"]) + "\n"


def fingerprint_argv(kinds: list[str] | tuple[str, ...]) -> list[str]:
    """The fingerprint stage's command. DVC runs it through a shell, so it is built from full-matched identifiers
    only (and `shlex.join`ed by the caller: `shlex.split` gives back exactly this list)."""
    bad = [k for k in kinds if not _KIND.fullmatch(k)]
    if bad or not kinds:
        raise ValueError(f"refusing to put stage kinds {bad or kinds!r} into a command")
    return ["python", "-m", "sferd.pipeline.codedeps", "--out", FINGERPRINT_DIR, *sorted(set(kinds))]


class _Usage(Exception):
    pass


def _parse(argv: list[str]) -> tuple[str, list[str]]:
    # hand-rolled rather than argparse: a usage error is one line on stderr (argparse prints the usage block too)
    if len(argv) < 3 or argv[0] != "--out":
        raise _Usage(USAGE)
    out, kinds = argv[1], argv[2:]
    if not _OUT_DIR.fullmatch(out) or ".." in out.split("/"):
        raise _Usage(f"--out {out!r}: not a relative folder inside the repository")
    bad = [k for k in kinds if not _KIND.fullmatch(k)]
    if bad:
        raise _Usage(f"{bad[0]!r} is not a stage kind name ([a-z][a-z0-9_]*)")
    return out, kinds


def main(argv: list[str] | None = None, *, root: str = ".") -> int:
    """Write `<out>/<kind>.sha256` for every KIND, each atomically. Exit 0 ok; 1 a kind with no stage module or an
    unreadable source (one line on stderr); 2 usage; 3 an unexpected error (a bug), in one line."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    try:
        out, kinds = _parse(argv)
    except _Usage as e:
        print(f"sferd.pipeline.codedeps: error: {e}", file=sys.stderr)
        return 2
    try:
        rootp = Path(root)
        missing = [k for k in kinds if _module_file(rootp, f"sferd.pipeline.stages.{k}") is None]
        if missing:
            print(f"sferd.pipeline.codedeps: error: no stage kind {missing[0]!r} (no sferd/pipeline/stages/"
                  f"{missing[0]}.py under {rootp.resolve()}); run from the repository root", file=sys.stderr)
            return 1
        # every text first, then the writes: a source that cannot be read leaves no file half-updated
        texts = {k: fingerprint_text(root, k) for k in sorted(set(kinds))}
        from sferd.util.artifacts import atomic_write_text

        for k, text in texts.items():
            atomic_write_text(rootp / out / f"{k}.sha256", text)
    except (OSError, SyntaxError) as e:
        where = getattr(e, "filename", None) or ""
        print(f"sferd.pipeline.codedeps: error: {where + ': ' if where else ''}{getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line, exit 3 (the CLI's convention), never a traceback
        print(f"sferd.pipeline.codedeps: internal error ({type(e).__name__}: {e}); this is a bug", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
