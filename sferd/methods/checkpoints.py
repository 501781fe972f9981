"""Resumable training state that survives SIGKILL at any moment, kept out of the stage's DVC outputs.

Where: `.sferd/scratch/<stage>/` under the repository (git- and DVC-ignored). Not in the stage's output folder:
DVC would cache the state with the final weights, and a kill during a write would leave a temporary file among
the outputs and change their hash in dvc.lock. Outputs are therefore not `persist`ed; DVC may delete them before
a re-run, the scratch folder survives.

How: `state-<update>.pt`, written to a temporary file in the same folder, fsynced, renamed into place, the folder
fsynced; then all but the newest two are removed. A kill leaves at worst a stray temporary file (removed on the
next start) and never a half-written `state-*.pt` under its final name. Should a state file still be unreadable
(a truncated copy, a disk error), loading says so in one line and falls back to the previous one.

What resumes: a state whose resume key equals the stage's. The key hashes the stage's resolved params and code,
minus operational settings (checkpoint interval; process count and micro-batch never enter params at all), so
changing how often a stage checkpoints or on how many GPUs it runs never throws work away — and the *content* of
every file the stage reads (its teacher, student or predictor checkpoint, its data split): a halving killed
mid-way must not resume against a teacher that was retrained in between, although its params are the same.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

SCRATCH_ROOT = Path(".sferd") / "scratch"
KEEP = 2
LOCK = "lock"
_STATE = re.compile(r"state-(\d{10})\.pt")

# Operational params: how a stage runs, not what it computes (dotted paths into the stage's params).
OPERATIONAL = ("training.checkpoint_every_updates", "checkpoint_every_updates")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_fingerprints(params: dict[str, Any], root: Path | str = ".") -> dict[str, str]:
    """SHA-256 of every input the stage reads: each `checkpoint` path anywhere in its params, and the files of each
    `inputs` entry (a file, or a split folder's files). Missing inputs are left out: the stage fails on them anyway.
    Hashing a 15.7 GB split costs seconds next to hours of training."""
    paths: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "checkpoint" and isinstance(v, str):
                    paths.add(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in params.items() if k != "outputs"})
    paths.update(v for v in (params.get("inputs") or {}).values() if isinstance(v, str))
    out: dict[str, str] = {}
    for rel in sorted(paths):
        p = Path(root) / rel
        files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            out[f.relative_to(root).as_posix() if Path(root) in f.parents else str(f)] = _file_sha256(f)
    return out


def resume_key(params: dict[str, Any], inputs: dict[str, str] | None = None) -> str:
    """SHA-256 of the params (incl. the code fingerprint the runner adds) without the operational settings, and of
    the inputs' content (`input_fingerprints`)."""
    p = copy.deepcopy(params)
    p["__inputs__"] = dict(sorted((inputs or {}).items()))
    for dotted in OPERATIONAL:
        *parents, leaf = dotted.split(".")
        node: Any = p
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    blob = json.dumps(p, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointStore:
    """The scratch folder of one stage: save, list, load with fallback, clear."""

    def __init__(self, stage: str, root: Path | str = "."):
        self.dir = Path(root) / SCRATCH_ROOT / stage
        self.label = stage

    def clean_temporaries(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.glob(".tmp-*"):
                p.unlink(missing_ok=True)

    def steps(self) -> list[int]:
        """Updates of the saved states, newest first."""
        if not self.dir.is_dir():
            return []
        found = [int(m.group(1)) for p in self.dir.iterdir() if (m := _STATE.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def path(self, step: int) -> Path:
        return self.dir / f"state-{step:010d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> None:
        import torch

        from sferd.util.errors import StageError

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.dir)
        except OSError as e:
            raise StageError(f"cannot write training state in {self.dir}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(step))
        except OSError as e:  # a full disk, a permission: one line; the previous states are untouched
            raise StageError(f"cannot write training state {self.path(step)}: {e.strerror or e}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(self.dir)
        for old in self.steps()[KEEP:]:
            self.path(old).unlink(missing_ok=True)

    def load_latest(self, key: str) -> dict[str, Any] | None:
        """The newest readable state saved under `key`; None when there is none. States of another key are
        removed (they belong to another config or code and would never resume)."""
        import torch

        for step in self.steps():
            path = self.path(step)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "step" not in state or "key" not in state:
                    raise ValueError("not a training state")
            except Exception as e:  # noqa: BLE001 - any unreadable file: report in one line, use the previous one
                reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                print(f"{self.label}: {path} is unreadable ({reason}); falling back to the previous state",
                      file=sys.stderr)
                # set aside, so the pruning of the newest two keeps two *good* states
                path.replace(path.with_name(path.name + ".corrupt"))
                continue
            if state["key"] != key:
                print(f"{self.label}: saved state is for another config or code; starting over", file=sys.stderr)
                self.clear()
                return None
            return state
        return None

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.is_file() and p.name != LOCK:
                    p.unlink(missing_ok=True)

    def lock(self) -> None:
        """Hold an exclusive lock on this stage's scratch folder for the life of the process: a second run of the
        same stage (an orphaned torchrun, a second `dvc repro` elsewhere in this clone) refuses instead of pruning
        this one's states and overwriting its outputs."""
        import fcntl

        from sferd.util.errors import StageError

        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / LOCK, "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise StageError(f"another run of stage {self.label} holds {self.dir / LOCK}: wait for it or stop it "
                             "first") from None

    def unlock(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()
