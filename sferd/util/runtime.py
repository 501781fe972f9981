"""Placeholder until the launcher branch lands: machine-local runtime settings from the environment only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Runtime:
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str = "sferd"
    micro_batch: int | None = None
    tf32: bool = False
    compile: bool = False
    loader_workers: int = 0


def runtime_settings(root: Path | None = None, env: dict[str, str] | None = None) -> Runtime:
    env = dict(os.environ if env is None else env)
    mb = env.get("SFERD_MICRO_BATCH")
    return Runtime(micro_batch=int(mb) if mb else None, tf32=env.get("SFERD_TF32") == "1",
                   compile=env.get("SFERD_COMPILE") == "1", loader_workers=int(env.get("SFERD_LOADER_WORKERS") or 0))
