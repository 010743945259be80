"""Tests that run *inside* an MPI job (pytest-mpi): every rank runs every test.

Run them as::

    mpiexec -n 2 python -m mpi4py -m pytest --with-mpi --timeout=60 -p no:cacheprovider \\
        tests/mpi/test_with_mpi.py

(``scripts/test.sh`` does, with MPICH and with Open MPI, on loopback only).
Without ``--with-mpi`` pytest-mpi skips them, and this module imports nothing
that initialises MPI, so a plain ``pytest`` run collects it harmlessly.

Every rank runs the same collectives in the same order, whatever happens on
it: a test's body runs in :func:`on_every_rank`, which catches a rank's
failure, gathers every rank's outcome (non-blocking, against a deadline) and
then fails the test on *every* rank if *any* rank failed, naming the rank and
its error.  So a failing assertion on one rank never leaves the other waiting
in a collective; and when a rank really is gone or stuck (the deadline
passes), the job is aborted rather than left hanging.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster.hpc.launcher import run_mpi
from cluster.hpc.mpi import (
    RANK_ENVIRONMENT_PREFIXES,
    Job,
    MPITimeout,
    env_rank,
    flush_output,
    get_world,
    launched_by_mpi,
    wait_request,
)
from cluster.hpc.ranks import ClusterOptions
from cluster.hpc.roles import RoleOptions, expected_workers, role, scheduler_host

from cluster import hpc

pytestmark = pytest.mark.mpi(min_size=2)

#: Seconds a rank waits for the others at a test's collectives before it gives up.
DEADLINE = 45.0

#: Bytes per rank in the outcome all-gather.
OUTCOME_BYTES = 16384


#: pytest's configuration, for :func:`_abort` to write past output capturing.
_config: pytest.Config | None = None


@pytest.fixture
def world(pytestconfig):
    """``MPI.COMM_WORLD`` (imported here: importing mpi4py.MPI initialises MPI)."""
    global _config
    from mpi4py import MPI

    _config = pytestconfig
    return MPI.COMM_WORLD


@pytest.fixture
def job(world) -> Job:
    """A fresh :class:`cluster.hpc.mpi.Job` (our own duplicate of the world) for one test."""
    try:
        return Job.start(world, DEADLINE)
    except MPITimeout as e:
        _abort(world, f"the ranks did not meet at the start of the test: {e}")


def _abort(world: Any, why: str) -> None:
    """A rank is gone or stuck: end the whole job (status 1) instead of hanging in a collective.

    Also what happens when a rank fails between two collectives of a test's
    body: the other rank's next collective cannot match any more.
    """
    capture = _config.pluginmanager.getplugin("capturemanager") if _config is not None else None
    if capture is not None:  # pytest holds fd 1 and 2 while a test runs: say it on the real ones
        capture.suspend_global_capture(in_=False)
    sys.stderr.write(f"\nrank {world.Get_rank()}: {why}; aborting the MPI job\n")
    flush_output()
    world.Abort(1)


def allgather_json(comm: Any, value: Any, timeout: float = DEADLINE) -> list[Any]:
    """Every rank's JSON-able ``value``, by rank (a non-blocking all-gather with a deadline)."""
    from mpi4py import MPI

    data = json.dumps(value).encode()
    if len(data) > OUTCOME_BYTES:
        data = json.dumps({"error": f"value of {len(data)} bytes is too big to gather"}).encode()
    send = bytearray(OUTCOME_BYTES)
    send[:len(data)] = data
    recv = bytearray(OUTCOME_BYTES * comm.Get_size())
    request = comm.Iallgather([send, MPI.BYTE], [recv, MPI.BYTE])
    if not wait_request(request, timeout):
        _abort(comm, f"not every rank reached the end of the test within {timeout:g}s")
    chunks = (recv[i * OUTCOME_BYTES:(i + 1) * OUTCOME_BYTES] for i in range(comm.Get_size()))
    return [json.loads(bytes(c).rstrip(b"\0").decode()) for c in chunks]


def on_every_rank(job: Job, body: Callable[[], Any]) -> list[Any]:
    """Run ``body`` on this rank, then agree with the others on the outcome.

    Returns:
        Every rank's return value of ``body`` (JSON-able), by rank, when every
        rank succeeded; otherwise the test fails on every rank with each
        failed rank's traceback.
    """
    try:
        outcome = {"ok": True, "value": body()}
    except BaseException as e:  # noqa: B036 - reported on every rank, below
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome = {"ok": False, "error": "".join(traceback.format_exception(e))[-4000:]}
    outcomes = allgather_json(job.comm, outcome)
    failed = [(rank, o["error"]) for rank, o in enumerate(outcomes) if not o["ok"]]
    if failed:
        pytest.fail("\n".join(f"--- rank {rank} failed:\n{error}" for rank, error in failed),
                    pytrace=False)
    return [o["value"] for o in outcomes]


# ----------------------------------------------------------------------------- the environment


def test_the_launcher_environment_is_recognised(job):
    def body():
        assert launched_by_mpi()
        assert env_rank() == job.rank, "the launcher's rank variable and MPI disagree"
        world = get_world()
        assert world is not None and world.Get_rank() == job.rank and world.Get_size() == job.size
        return {"pid": os.getpid(), "host": socket.gethostname()}

    values = on_every_rank(job, body)
    assert len({v["pid"] for v in values}) == job.size  # one process per rank


# ----------------------------------------------------------------------------- hpc.mpi.Job


def test_processor_names_and_roles_agree(job):
    def body():
        from mpi4py import MPI

        names = job.allgather_names(DEADLINE)
        assert names == [MPI.Get_processor_name()] * job.size  # one node
        me = role(job.rank, job.size)
        assert me.is_scheduler == (job.rank == 0) and me.is_worker == (job.rank > 0)
        assert expected_workers(job.size) == {r: str(r) for r in range(1, job.size)}
        script = role(job.rank, job.size, RoleOptions(script=True))
        assert script.runs_script == (job.rank == 0)
        # Every rank on this node: the scheduler listens on loopback.
        assert scheduler_host(job.size, names) == "127.0.0.1"
        return {"names": names, "role": me.kind.value}

    values = on_every_rank(job, body)
    assert all(v["names"] == values[0]["names"] for v in values)
    assert [v["role"] for v in values] == ["scheduler"] + ["worker"] * (job.size - 1)


def test_broadcast_from_rank0(job):
    payload = {"address": "tcp://127.0.0.1:8786", "nested": [1, 2, {"x": "é"}]}

    def body():
        got = job.bcast(payload if job.rank == 0 else None, DEADLINE)
        assert got == payload
        return got

    assert on_every_rank(job, body) == [payload] * job.size


def test_broadcast_payload_too_big_is_refused_before_sending(job):
    def body():
        if job.rank == 0:  # the check comes before the collective: nothing is posted
            with pytest.raises(ValueError, match="over"):
                job.bcast({"x": "y" * 10000}, DEADLINE)
        # The communicator is still usable: a real broadcast goes through.
        return job.bcast({"ok": 1} if job.rank == 0 else None, DEADLINE)

    assert on_every_rank(job, body) == [{"ok": 1}] * job.size


def test_done_barrier_completes_only_once_rank0_posts_it(job):
    """The *done* barrier is the one-bit "the scheduler closed" broadcast of :mod:`cluster.hpc.mpi`."""
    from mpi4py import MPI

    def body():
        if job.rank != 0:
            job.post_done()  # a worker rank posts it at once
            assert not job.done(), "done before rank 0 posted it"
            # Tell rank 0 that we looked; only then does it post.
            request = job.comm.Isend([bytearray(b"1"), MPI.BYTE], dest=0, tag=7)
            assert wait_request(request, DEADLINE), "rank 0 did not receive"
        else:
            assert not job.done()  # not posted here yet
            for source in range(1, job.size):
                buf = bytearray(1)
                request = job.comm.Irecv([buf, MPI.BYTE], source=source, tag=7)
                assert wait_request(request, DEADLINE), f"no word from rank {source}"
            job.post_done()
        assert wait_request(job._done_request, DEADLINE), "the done barrier did not complete"
        assert job.done()
        return True

    on_every_rank(job, body)


def test_finish_keeps_each_ranks_status_when_rank0s_is_zero(job):
    def body():
        return job.finish(0 if job.rank == 0 else 4, DEADLINE)

    assert on_every_rank(job, body) == [0] + [4] * (job.size - 1)


def test_finish_gives_every_rank_rank0s_nonzero_status_without_aborting(job):
    """So that every launcher returns exactly it (MPICH ORs the statuses, srun takes the highest);
    and no ``MPI_Abort``: this pytest job goes on."""
    def body():
        return job.finish(3 if job.rank == 0 else 143, DEADLINE)

    assert on_every_rank(job, body) == [3] * job.size


def test_initialize_needs_three_ranks(job):
    """``hpc.initialize()`` refuses, on every rank alike and before any collective, a job of 2."""
    if job.size >= 3:
        pytest.skip("needs a job of fewer than 3 ranks")

    def body():
        with pytest.raises(ValueError, match="at least 3 MPI ranks"):
            hpc.initialize(nthreads=1, memory_limit=0)
        return True

    on_every_rank(job, body)


# ----------------------------------------------------------------------------- a cluster across the ranks


SCRIPT = textwrap.dedent("""
    import json, os, sys

    from cluster import Client


    def where(x):
        return x * x, os.getpid(), os.getppid()


    with Client() as client:
        results = client.gather(client.map(where, range(30)))
        workers = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
    with open(sys.argv[1], "w") as f:
        json.dump({"squares": [r[0] for r in results], "pids": sorted({r[1] for r in results}),
                   "ppids": sorted({r[2] for r in results}), "workers": workers}, f)
    sys.exit(int(sys.argv[2]))
""")


def _run_launcher(world, job: Job, monkeypatch, nanny: bool, exit_status: int) -> list[Any]:
    """``run_mpi`` on every rank with :data:`SCRIPT`; every rank's status and the script's result."""
    # run_mpi removes the launcher's per-rank variables on a worker rank (for its
    # worker processes): put them back afterwards for the next tests.
    for name in [k for k in os.environ if k.startswith(RANK_ENVIRONMENT_PREFIXES)]:
        monkeypatch.setenv(name, os.environ[name])
    opts = ClusterOptions(nthreads=1, memory_limit=0, nanny=nanny, death_timeout=20.0,
                          startup_timeout=DEADLINE)

    def body():
        with tempfile.TemporaryDirectory(prefix="hpc-with-mpi-") as tmp:
            out = Path(tmp) / "result.json"
            script = Path(tmp) / "work.py"
            script.write_text(SCRIPT)
            status = run_mpi(world, opts, str(script), [str(out), str(exit_status)])
            return {"status": status,
                    "result": json.loads(out.read_text()) if job.rank == 0 else None}

    return on_every_rank(job, body)


@pytest.mark.parametrize("nanny", [True, False], ids=["nanny", "no-nanny"])
def test_launcher_script_mode_across_the_ranks(job, world, monkeypatch, nanny):
    """The launcher's own ``run_mpi`` in this pytest job: rank 0 runs the scheduler and a script
    that computes on the cluster, every other rank a worker; every rank checks the outcome."""
    pids = allgather_json(job.comm, os.getpid())
    outcomes = _run_launcher(world, job, monkeypatch, nanny, 0)
    assert [o["status"] for o in outcomes] == [0] * job.size
    result = outcomes[0]["result"]
    assert result["squares"] == [x * x for x in range(30)]
    assert result["workers"] == [str(r) for r in range(1, job.size)]
    workers = pids[1:]
    if nanny:  # tasks ran in the nannies' worker processes, children of the worker ranks
        assert set(result["ppids"]) <= set(workers) and not set(result["pids"]) & set(pids)
    else:  # tasks ran in the worker ranks themselves
        assert set(result["pids"]) <= set(workers)


def test_launcher_script_exit_status_is_every_ranks(job, world, monkeypatch):
    """A script that exits 3 ends the job cleanly -- no ``MPI_Abort``, this pytest job goes
    on -- with 3 on every rank, so that ``mpiexec`` (or ``srun``) returns exactly 3."""
    outcomes = _run_launcher(world, job, monkeypatch, True, 3)
    assert [o["status"] for o in outcomes] == [3] * job.size
    assert outcomes[0]["result"]["squares"] == [x * x for x in range(30)]
