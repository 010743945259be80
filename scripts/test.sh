#!/usr/bin/env bash
# The project's whole test suite: set up .venv, lint, then run pytest.
# README.md gives this command and .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
