"""The digest of a stage's resolved params: what DVC tracks instead of the params themselves (sferd/pipeline/dvcfile.py
writes it, sferd/pipeline/run.py checks it before a stage runs)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def params_digest(params: Any) -> str:
    """SHA-256 of the params in one canonical JSON spelling (sorted keys, no spaces): equal params, equal digest,
    whatever the order or layout they were written in."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
