#!/usr/bin/env bash
# The main job: set up .venv, then run the example script on a 4-rank MPI job
# (rank 0: scheduler + the script's client, ranks 1-3: nanny-managed workers).
# MPI traffic stays on loopback here; on a cluster run the same
# `mpirun -n N python -m cluster script.py` without these variables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HYDRA_IFACE=lo HYDRA_LAUNCHER=fork UCX_NET_DEVICES=lo
exec .venv/bin/mpiexec -n "${NRANKS:-4}" .venv/bin/python -m cluster examples/quickstart.py "$@"
