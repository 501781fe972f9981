"""Where `sferd-spec compile` may write: plain files inside the repository, never through a symbolic link.

A spec decides the folder its pipeline is compiled into, and specs come from other people. The folder name is
already restricted to `.` or `stages/<name>` (sferd.spec.models.PIPELINE_RE); this module checks the file system
itself, so that a `stages/<name>` that is a symlink (to another spec's folder, to `.git/hooks`, out of the
repository) or a regular file where a folder should be is refused before anything is written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath


def write_problem(root: Path, rel: str) -> str | None:
    """Why `rel` (repo-relative, posix) must not be written under `root`; None if it may.

    Every existing component is checked with lstat, so no symlink is followed; missing components are created
    later as plain folders by the writer.
    """
    pure = PurePosixPath(rel)
    if not pure.parts or pure.is_absolute() or any(part in ("", ".", "..") for part in pure.parts):
        return f"{rel} is not a path inside the repository"
    node = root
    for k, part in enumerate(pure.parts):
        node = node / part
        shown = PurePosixPath(*pure.parts[: k + 1]).as_posix()
        try:
            info = os.lstat(node)
        except FileNotFoundError:
            return None  # this and everything below it will be created
        except OSError as e:
            return f"cannot check {shown}: {e.strerror or e}"
        if stat.S_ISLNK(info.st_mode):
            return f"{shown} is a symbolic link: compile never writes through one"
        last = k == len(pure.parts) - 1
        if not last and not stat.S_ISDIR(info.st_mode):
            return f"{shown} exists and is not a folder"
        if last and not stat.S_ISREG(info.st_mode):
            return f"{shown} exists and is not a regular file"
    return None
