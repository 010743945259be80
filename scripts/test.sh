#!/usr/bin/env bash
# The project's whole test suite: set up .venv (and .venv-ompi, Open MPI's),
# lint, run pytest, then run the pytest-mpi tests inside 2-rank MPI jobs, under
# MPICH and under Open MPI.  Every test run goes ahead even when an earlier
# one failed (CI shows every failure at once); the script then exits with the
# first failure's status.
# README.md gives this command and .ci/run runs it; extra arguments go to the
# main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup-openmpi.sh
# Real batch systems for tests/jobqueue -- a single-node SLURM, the Torque-style
# PBS commands on it (slurm-wlm-torque), a single-node Grid Engine -- and
# headless Chromium for the status-page test: installed from Debian packages
# and started here, and required (a missing one fails those tests instead of
# skipping them).  One `apt-get update` first, so that a fresh machine finds
# the packages.
if [ "$(id -u)" = 0 ]; then
    apt-get update -q -o DPkg::Lock::Timeout=300 >/dev/null 2>&1 || echo "test.sh: apt-get update failed" >&2
fi
bash scripts/slurm.sh start
bash scripts/pbs.sh start >/dev/null
bash scripts/gridengine.sh start
bash scripts/browser.sh
export CLUSTER_REQUIRE_SLURM=1 CLUSTER_REQUIRE_PBS=1 CLUSTER_REQUIRE_SGE=1 CLUSTER_REQUIRE_BROWSER=1
.venv/bin/ruff check .

status=0
run() {
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
    fi
}

run .venv/bin/python -m pytest "$@"

# tests/mpi/test_with_mpi.py runs inside the MPI job: every rank runs every
# test (the main run above skips them: no --with-mpi).  Each venv's mpiexec
# with the same venv's python, by full path; loopback only; `timeout` bounds
# the whole job in case a rank hangs where pytest-timeout cannot reach it.
with_mpi=(-m mpi4py -m pytest --with-mpi --timeout=60 -p no:cacheprovider --color=no -q
          tests/mpi/test_with_mpi.py)
echo "=== pytest-mpi tests under MPICH (mpiexec -n 2)"
run env HYDRA_IFACE=lo HYDRA_LAUNCHER=fork UCX_NET_DEVICES=lo FI_TCP_IFACE=lo \
    timeout -k 10 300 .venv/bin/mpiexec -n 2 .venv/bin/python "${with_mpi[@]}"
echo "=== pytest-mpi tests under Open MPI (mpiexec -n 2)"
run env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe OMPI_MCA_btl_tcp_if_include=lo \
    timeout -k 10 300 .venv-ompi/bin/mpiexec -n 2 .venv-ompi/bin/python "${with_mpi[@]}"
exit "$status"
