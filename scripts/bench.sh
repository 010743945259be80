#!/usr/bin/env bash
# Benchmarks: this runtime against dask.distributed and mpi4py.futures in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test bench
exec .venv/bin/python -m bench "$@"
