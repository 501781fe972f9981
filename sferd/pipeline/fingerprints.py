"""Code deps through one fingerprint file per stage kind (DESIGN.md step 3), and the command that writes them.

Listing every stage's ~30 source files (codedeps.stage_code) as DVC deps made DVC build ~5,500 dep entries (and
dvc.lock repeat each with its md5) for a no-op `dvc repro`. Instead one stage (`code-fingerprints`, compiled by
dvcfile.py into one home pipeline) depends on the union of the source files and writes one small file per stage
kind; every other stage depends on its kinds' files. DVC compares dep contents, so a file edit re-runs exactly the
stages whose kind's closure holds it.

This lives apart from codedeps.py on purpose: codedeps.py is in every stage's import closure (the runner imports
it for `code_sha256`), so code here can change without moving any stage's code fingerprint or resume key. It is a
dep of the fingerprint stage itself (it decides what the files hold).

    python -m sferd.pipeline.fingerprints --out results/code KIND [KIND ...]
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from sferd.pipeline.codedeps import _module_file, code_fingerprint, stage_code

FINGERPRINT_STAGE = "code-fingerprints"
FINGERPRINT_DIR = "results/code"
_KIND = re.compile(r"[a-z][a-z0-9_]*")  # a module name under sferd.pipeline.stages
_OUT_DIR = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
USAGE = "usage: python -m sferd.pipeline.fingerprints --out DIR KIND [KIND ...]"


def fingerprint_path(kind: str, folder: str = FINGERPRINT_DIR) -> str:
    """The repo-relative file a stage of this kind depends on instead of its source files."""
    return f"{folder}/{kind}.sha256"


def fingerprint_text(root: str, kind: str) -> str:
    """What `fingerprint_path(kind)` holds: one `sha256  path` line per file of `stage_code` (so a diff of two
    versions names the file that changed), then the kind's `code_fingerprint` (the runner's `code_sha256`)."""
    lines = [f"{hashlib.sha256((Path(root) / rel).read_bytes()).hexdigest()}  {rel}" for rel in stage_code(root, kind)]
    return "\n".join([*lines, f"code_fingerprint {code_fingerprint(root, kind)}"]) + "\n"


def fingerprint_argv(kinds: list[str] | tuple[str, ...], out: str = FINGERPRINT_DIR) -> list[str]:
    """The fingerprint stage's command. DVC runs it through a shell, so it is built from full-matched identifiers
    only (and `shlex.join`ed by the caller: `shlex.split` gives back exactly this list)."""
    bad = [k for k in kinds if not _KIND.fullmatch(k)]
    if bad or not kinds or not _OUT_DIR.fullmatch(out) or ".." in out.split("/"):
        raise ValueError(f"refusing to put stage kinds {bad or kinds!r} / folder {out!r} into a command")
    return ["python", "-m", "sferd.pipeline.fingerprints", "--out", out, *sorted(set(kinds))]


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
        print(f"sferd.pipeline.fingerprints: error: {e}", file=sys.stderr)
        return 2
    try:
        rootp = Path(root)
        missing = [k for k in kinds if _module_file(rootp, f"sferd.pipeline.stages.{k}") is None]
        if missing:
            print(f"sferd.pipeline.fingerprints: error: no stage kind {missing[0]!r} (no sferd/pipeline/stages/"
                  f"{missing[0]}.py under {rootp.resolve()}); run from the repository root", file=sys.stderr)
            return 1
        # every text first, then the writes: a source that cannot be read leaves no file half-updated
        texts = {k: fingerprint_text(root, k) for k in sorted(set(kinds))}
        from sferd.util.artifacts import atomic_write_text

        for k, text in texts.items():
            atomic_write_text(rootp / out / f"{k}.sha256", text)
    except (OSError, SyntaxError) as e:
        where = getattr(e, "filename", None) or ""
        print(f"sferd.pipeline.fingerprints: error: {where + ': ' if where else ''}{getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line, exit 3 (the CLI's convention), never a traceback
        print(f"sferd.pipeline.fingerprints: internal error ({type(e).__name__}: {e}); this is a bug", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
