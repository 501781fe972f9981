# Shared set-up for the README commands: a project virtual environment, installed from pyproject.toml,
# re-installed whenever pyproject.toml changes. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DVC_NO_ANALYTICS=1        # offline, DVC's telemetry daemon litters the temp folder
export PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
STAMP=".venv/.sferd-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "setting up .venv (first run: about 2 minutes)" >&2
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export VIRTUAL_ENV="$ROOT/.venv"
