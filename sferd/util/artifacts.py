"""Atomic, deterministic artifact I/O (DESIGN.md non-negotiables).

Every file is written to a temporary sibling and moved into place with os.replace, so a killed stage never
leaves a half-written file that DVC or a resume could mistake for a finished one. Checkpoints are plain
tensors + JSON-able config, read back with `torch.load(weights_only=True)` (no pickled code).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sferd.util.errors import StageError


def _tmp_for(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """Sorted keys, fixed indentation: the same content always gives the same bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, canonical_json(obj))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # uncompressed: fast, and byte-identical for identical arrays
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk: a rename is only durable once what it points at is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling; when the block ends normally its files are fsynced and it is renamed
    to `path` (replacing an older folder there), otherwise it is removed. A reader never sees a partial folder:
    only a complete new one, a complete old one or (for an instant while an old one is replaced) none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the finished folder private to its writer
    done = False
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        old = None
        if path.exists():  # rename() cannot replace a non-empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the old folder back rather than leave none
                os.replace(old / path.name, path)
                old.rmdir()
            raise
        fsync_path(path.parent)
        done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)


def producer_of(path: str | Path) -> str:
    """Stage that writes `path`: outputs live under results/<stage-name>/ by construction."""
    parts = Path(path).as_posix().split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "results" else ""


def read_npz(path: str | Path, *, produced_by: str = "") -> dict[str, np.ndarray]:
    path = Path(path)
    produced_by = produced_by or producer_of(path)
    if not path.is_file():
        hint = f" (produced by stage {produced_by}: run `dvc repro {produced_by}`)" if produced_by else ""
        raise StageError(f"{path} is missing{hint}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def torch_save(path: str | Path, obj: Any) -> None:
    """Atomic and byte-reproducible: torch.save names the zip's top folder after the file, so the temporary file
    gets the final name (inside a temporary folder) — otherwise equal weights would hash differently per run."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_dir.rmdir()


def torch_load(path: str | Path, *, produced_by: str = "") -> Any:
    import torch

    path = Path(path)
    produced_by = produced_by or producer_of(path)
    if not path.is_file():
        hint = f"; it is produced by stage {produced_by} (`dvc repro {produced_by}`)" if produced_by else ""
        raise StageError(f"checkpoint {path} is missing{hint}")
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fresh_dir(path: str | Path) -> Path:
    """Empty a stage's (non-persisted) output directory before writing into it."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def check_model_config(ckpt: dict, expected: dict, *, path: str, produced_by: str) -> None:
    """Refuse a checkpoint built for another network: shapes would mismatch or, worse, silently fit."""
    got = ckpt.get("config", {}).get("model")
    if got != expected:
        diff = sorted(k for k in set(got or {}) | set(expected) if (got or {}).get(k) != expected.get(k))
        raise StageError(
            f"{path} was trained with a different model config (differs in: {', '.join(diff) or 'everything'}); "
            f"re-run its stage: `dvc repro {produced_by}`"
        )
