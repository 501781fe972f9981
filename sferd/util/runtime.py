"""Machine-local runtime settings: how many processes run a stage and how fast they go, never what they compute.

Read from `SFERD_*` environment variables and from a git-ignored `sferd.local.toml` in the directory stages run
in (the repository root: every compiled stage sets `wdir` to it); an environment variable wins over the file, key
by key. See `sferd.local.toml.example` for every key.

These settings must never reach a stage's params, its result key or its resume key: the same `dvc.lock` is then
valid on a laptop CPU, one GPU or eight. Whatever changes results (precision, global batch, seeds) lives in the
spec instead. `micro_batch` only splits the spec's global batch into accumulation steps; `tf32` and `compile`
are throughput switches whose float differences stay within the tolerance the training tests state.

Kept free of heavy imports (no torch, and tomllib only when the file exists): the launcher reads these settings
before every stage, and the quickstart runs ~50 stages.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing typing costs the launcher milliseconds on every stage
    from typing import Any, Callable, Literal, Mapping

from sferd.util.errors import StageError

LOCAL_FILE = "sferd.local.toml"
ENV_PREFIX = "SFERD_"


class RuntimeSettingsError(StageError):
    """A bad runtime setting; one line naming where it came from, the key and the allowed values. A StageError, so
    a stage that reads the settings itself fails the way every user-facing stage failure does."""


@dataclass(frozen=True)
class Runtime:
    """Resolved runtime settings. `nproc_per_node` may stay the string "gpu" (one process per visible CUDA
    device, or 1 without CUDA) until `procs_per_node()` resolves it: counting devices imports torch, which the
    launcher avoids whenever the answer cannot matter."""

    nproc_per_node: int | Literal["gpu"] = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous; required when nnodes > 1
    rdzv_id: str = "sferd"
    micro_batch: int | None = None  # per-process micro-batch for gradient accumulation; global batch unchanged
    tf32: bool = False
    compile: bool = False
    loader_workers: int = 0

    def procs_per_node(self) -> int:
        if self.nproc_per_node != "gpu":
            return self.nproc_per_node
        import torch  # only here: the one setting that needs it

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1

    def as_env(self) -> dict[str, str]:
        """These settings as the environment variables that reproduce them exactly (None → unset is left out),
        with "gpu" resolved: what the launcher hands to every rank so that all of them see the same values."""
        env = {}
        for f in fields(self):
            value = self.procs_per_node() if f.name == "nproc_per_node" else getattr(self, f.name)
            if value is not None:
                env[ENV_PREFIX + f.name.upper()] = str(int(value)) if isinstance(value, bool) else str(value)
        return env


# ------------------------------------------------------------------------------------------------ validators
# Each takes an already-typed value (TOML's own types, or text converted by `_from_text`) and returns it, or
# raises ValueError; ALLOWED says what is accepted, in the words every error message uses.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # TOML `true` must not pass as 1


def _positive(v: Any) -> int:
    if not (_is_int(v) and v >= 1):
        raise ValueError
    return v


def _nproc(v: Any) -> int | str:
    return v if v == "gpu" else _positive(v)


def _non_negative(v: Any) -> int:
    if not (_is_int(v) and v >= 0):
        raise ValueError
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError
    return v


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def _endpoint(v: Any) -> str:
    m = _HOST_PORT.match(v) if isinstance(v, str) else None
    if not (m and 1 <= int(m.group(2)) <= 65535):
        raise ValueError
    return v


def _rdzv_id(v: Any) -> str:
    if not (isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", v)):
        raise ValueError
    return v


SETTINGS: "dict[str, tuple[Callable[[Any], Any], str]]" = {
    "nproc_per_node": (_nproc, 'an integer >= 1, or "gpu" (one process per CUDA device, 1 without CUDA)'),
    "nnodes": (_positive, "an integer >= 1"),
    "rdzv_endpoint": (_endpoint, "host:port (port 1-65535), e.g. node0:29400"),
    "rdzv_id": (_rdzv_id, "letters, digits, '.', '_' or '-'"),
    "micro_batch": (_positive, "an integer >= 1 (leave unset for no gradient accumulation)"),
    "tf32": (_bool, "true or false"),
    "compile": (_bool, "true or false"),
    "loader_workers": (_non_negative, "an integer >= 0"),
}
assert list(SETTINGS) == [f.name for f in fields(Runtime)]

_TRUE_FALSE = {"1": True, "true": True, "0": False, "false": False}


def _from_text(key: str, text: str) -> Any:
    """An environment variable's text as the value TOML would have given: strict, so a typo cannot pass."""
    validator = SETTINGS[key][0]
    if validator is _bool:
        if text not in _TRUE_FALSE:
            raise ValueError
        return _TRUE_FALSE[text]
    if validator in (_positive, _non_negative) or (validator is _nproc and text != "gpu"):
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError
        return int(text)
    return text


def _key_line(text: str, key: str) -> int | None:
    """The line of a top-level `key = …` (tomllib reports no positions for valid documents)."""
    k = re.escape(key)
    pattern = re.compile(rf"""\s*\[*\s*(?:{k}|"{k}"|'{k}')\s*[=.\]]""")  # `key =`, `key.x =` or `[key]`
    return next((n for n, line in enumerate(text.splitlines(), 1) if pattern.match(line)), None)


def _toml(value: Any) -> str:
    """A value as it is written in TOML, for messages."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value) if isinstance(value, str) else f"<{type(value).__name__}>"


def _read_file(path: Path) -> dict[str, tuple[Any, str]]:
    """{key: (value, where)} from the local file; {} when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeSettingsError(f"{path}: cannot read runtime settings: {e}") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
        raise RuntimeSettingsError(f"{where}: invalid TOML: {msg[: m.start()] if m else msg}") from None
    out = {}
    for key, value in doc.items():
        line = _key_line(text, key)
        where = f"{path}:{line}" if line else str(path)
        if key not in SETTINGS:
            raise RuntimeSettingsError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(SETTINGS)}")
        validator, allowed = SETTINGS[key]
        try:
            out[key] = (validator(value), where)
        except ValueError:
            raise RuntimeSettingsError(f"{where}: {key} = {_toml(value)} is not allowed; expected {allowed}") from None
    return out


def runtime_settings(root: Path | None = None, env: Mapping[str, str] | None = None) -> Runtime:
    """The runtime settings for stages run in `root` (default: the current directory, which DVC sets to the
    repository root) under environment `env` (default: os.environ). Raises RuntimeSettingsError."""
    env = os.environ if env is None else env
    path = (Path(root) if root is not None else Path()) / LOCAL_FILE
    found = _read_file(path)
    for key, (validator, allowed) in SETTINGS.items():
        name = ENV_PREFIX + key.upper()
        text = env.get(name, "")
        if text == "":  # unset and empty alike: `SFERD_MICRO_BATCH= dvc repro` turns accumulation off
            continue
        try:
            found[key] = (validator(_from_text(key, text)), name)
        except ValueError:
            raise RuntimeSettingsError(f"{name}={text!r} is not allowed; expected {allowed}") from None
    values = {k: v for k, (v, _) in found.items()}
    runtime = Runtime(**values)
    if runtime.nnodes > 1 and runtime.rdzv_endpoint is None:
        where = found["nnodes"][1]
        raise RuntimeSettingsError(
            f"{where}: nnodes = {runtime.nnodes} needs rdzv_endpoint (host:port on the first node, the same on every "
            f"node): set {ENV_PREFIX}RDZV_ENDPOINT or rdzv_endpoint in {LOCAL_FILE}")
    return runtime


def apply_backend_flags(rt: Runtime, device) -> None:
    """The runtime's TF32 choice on a CUDA device, for every stage kind (training and sampling alike): torch's
    own default lets cuDNN convolutions run in TF32, which would make `tf32 = false` untrue for sampling. cuDNN's
    autotuner stays off: it may pick other kernels from run to run. Nothing to do on the CPU."""
    if getattr(device, "type", str(device)) != "cuda":
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = rt.tf32
    torch.backends.cudnn.allow_tf32 = rt.tf32
    torch.backends.cudnn.benchmark = False
