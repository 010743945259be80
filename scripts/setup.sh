#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install the
# project with the extras given as arguments (default: test). Idempotent: a stamp
# of pyproject.toml and the extras skips the pip step when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${*:-test}"
extras="${extras// /,}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
stamp=".venv/.stamp-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/-}"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[${extras}]"
    rm -f .venv/.stamp-*
    touch "$stamp"
fi
