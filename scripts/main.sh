#!/usr/bin/env bash
# The main job on the embedded default: set up .venv and run the example
# script, whose Client() starts a local cluster of worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python examples/quickstart.py "$@"
