"""The little MPI the launcher needs: find the job, exchange a few bytes, end without hanging.

Theory of operation
-------------------
MPI only *starts* the cluster and *ends* the job; all the cluster's own traffic
goes over its TCP connections.  So the launcher needs six operations, every
one of them non-blocking and polled from the main thread against a deadline,
so that no rank can wait forever on a rank that died or hangs:

1. ``Idup`` of ``COMM_WORLD``, so that our collectives never match a user's;
2. ``Iallgather`` of every rank's processor name (is the job on one node?);
3. ``Ibcast`` of the scheduler's address from rank 0 (no shared file system
   needed);
4. the *done* barrier ``B1``: every rank but the scheduler's posts it as
   soon as it has the address; rank 0 posts it once its scheduler has closed.
   So ``B1`` completes on a worker rank exactly when the scheduler closed on
   purpose -- a one-bit broadcast that needs no message.  A worker whose
   scheduler disappears *without* ``B1`` completing knows that something
   went wrong;
5. the *final* barrier ``B2``, posted by every rank when it has cleaned up,
   waited for with a deadline by :meth:`Job.finish`;
6. an ``Ibcast`` of rank 0's exit status, right after ``B2``: when it is
   non-zero, every rank exits with it.

Every rank posts the same collectives in the same order (1-6), as MPI
requires.  A deadline that passes means that some rank died or hangs: the
rank that notices calls ``MPI_Abort``, which makes ``mpiexec`` kill the whole
job and return -- never a rank left waiting in a collective or in
``MPI_Finalize``.

A job whose ranks all reached the end is *not* aborted to carry a non-zero
status: every rank finalises MPI and exits normally, all with rank 0's
status (6), and the launchers return exactly it -- MPICH's ``mpiexec`` ORs
its ranks' statuses, Open MPI's returns the first non-zero one, Slurm's
``srun`` the highest.  ``MPI_Abort`` would give the same status under
``mpiexec`` but 137 under ``srun`` (the other ranks' SIGKILL), a banner under
Open MPI, and under MPICH a shared-memory segment left in ``/dev/shm`` for
every aborted job.

Whether we run under MPI at all is decided from the environment that MPI
launchers set (``PMI_RANK``, ``PMIX_RANK``, ``OMPI_COMM_WORLD_SIZE``, ...)
before ``mpi4py`` is imported, since importing it initialises MPI.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

#: Environment variables that MPI launchers (hydra, Open MPI, Slurm's PMI/PMIx,
#: MVAPICH) set for each rank; any one of them means "we are a rank of a job".
MPI_ENVIRONMENT_MARKERS = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_FD",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
)

#: Prefixes of the variables a rank removes before it starts worker processes,
#: so that a task that imports mpi4py initialises a singleton MPI instead of
#: trying to join the launcher's job through a file descriptor it does not have.
RANK_ENVIRONMENT_PREFIXES = ("PMI_", "PMIX_", "OMPI_COMM_WORLD_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID")

#: Bytes per processor name in the all-gather (MPI_MAX_PROCESSOR_NAME is 128 in MPICH).
NAME_BYTES = 256

#: Bytes of the broadcast payload (the scheduler's address as JSON, or an error).
BCAST_BYTES = 8192


class MPITimeout(Exception):
    """A collective did not complete within its deadline (some rank died or hangs)."""


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a rank started by an MPI launcher (from its environment)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in MPI_ENVIRONMENT_MARKERS)


#: Environment variables that hold this process's rank, by launcher.
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def env_rank(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's rank as its MPI launcher set it in the environment (``None``: unknown)."""
    environ = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def get_world(environ: Mapping[str, str] | None = None) -> Any | None:
    """``MPI.COMM_WORLD`` if we run under an MPI launcher and mpi4py imports, else ``None``.

    Importing mpi4py initialises MPI, so it is only imported when the
    environment says that a launcher started us; and only once the other
    ranks of this node are about to do the same, since ``MPI_Init`` spins
    while it waits for them (see :mod:`cluster.hpc.rendezvous`).
    """
    if not launched_by_mpi(environ):
        return None
    if "mpi4py.MPI" not in sys.modules and importlib.util.find_spec("mpi4py") is not None:
        from .rendezvous import wait_for_local_ranks

        logger.debug("rendezvous of the node's ranks before MPI_Init: %s",
                     wait_for_local_ranks(environ=environ))
    try:
        from mpi4py import MPI
    except ImportError as e:
        logger.warning("started by an MPI launcher but mpi4py cannot be imported (%s); "
                       "running without MPI", e)
        return None
    return MPI.COMM_WORLD


def scrub_rank_environment(environ: dict[str, str] | None = None) -> list[str]:
    """Remove the launcher's per-rank variables (MPI has read them); return their names."""
    environ = os.environ if environ is None else environ
    names = [k for k in environ if k.startswith(RANK_ENVIRONMENT_PREFIXES)]
    for k in names:
        del environ[k]
    return names


def flush_output() -> None:
    """Flush stdout, stderr and the logging handlers (before an abort or ``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # nothing to do about a broken handler here
            pass


#: Longest sleep between two ``Test()`` calls of a collective in its first
#: :data:`FAST_POLL_PERIOD` seconds.  A non-blocking collective only makes
#: progress while its ranks call into MPI, and one of log2(N) rounds may wait
#: for a rank's next ``Test()``: with 50 ms between calls, each start-up step
#: took ~0.3 s at N=16; with 3 ms, ~0.02 s.
FAST_POLL_DELAY = 0.003

#: Seconds a collective is polled every :data:`FAST_POLL_DELAY` at most; after
#: that (a rank is slow to start, or hangs) every :data:`SLOW_POLL_DELAY`, to
#: leave the CPU to the ranks still working.
FAST_POLL_PERIOD = 5.0

#: Longest sleep between two ``Test()`` calls of a long wait.
SLOW_POLL_DELAY = 0.05


def wait_request(request: Any, timeout: float | None, interrupted: Callable[[], bool] | None = None) -> bool:
    """Poll ``request.Test()`` until it completes; ``False`` after ``timeout`` seconds.

    The sleeps between polls double from 1 ms up to :data:`FAST_POLL_DELAY`,
    and after :data:`FAST_POLL_PERIOD` seconds up to :data:`SLOW_POLL_DELAY`.

    Args:
        request: an ``MPI.Request`` of a non-blocking operation.
        timeout: seconds (``None``: no deadline).
        interrupted: polled too; when it returns true we give up early.

    Returns:
        Whether the request completed.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    delay = 0.001
    while True:
        if request.Test():
            return True
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if interrupted is not None and interrupted():
            return False
        time.sleep(delay)  # polling interval of a non-blocking MPI request
        cap = FAST_POLL_DELAY if now - start < FAST_POLL_PERIOD else SLOW_POLL_DELAY
        delay = min(delay * 2, cap)


class Job:
    """This rank's view of the MPI job: the launcher's collectives, each with a deadline.

    Use :meth:`start` (not the constructor), then, in this order on every
    rank: :meth:`allgather_names`, :meth:`bcast`, :meth:`post_done`,
    :meth:`finish`.

    Attributes:
        world: ``MPI.COMM_WORLD``.
        comm: our private duplicate of it.
        rank / size: of this process in ``world``.
    """

    def __init__(self, world: Any, comm: Any):
        self.world = world
        self.comm = comm
        self.rank: int = world.Get_rank()
        self.size: int = world.Get_size()
        self._done_request: Any | None = None
        self._finished = False

    @classmethod
    def start(cls, world: Any, timeout: float) -> Job:
        """Duplicate ``world`` for our own collectives.

        Raises:
            MPITimeout: not every rank joined within ``timeout`` seconds.
        """
        comm, request = world.Idup()
        if not wait_request(request, timeout):
            raise MPITimeout(f"not every rank started within {timeout:g}s (MPI_Comm_idup)")
        return cls(world, comm)

    def allgather_names(self, timeout: float) -> list[str]:
        """``MPI.Get_processor_name()`` of every rank, by rank.

        Raises:
            MPITimeout: not every rank took part within ``timeout`` seconds.
        """
        from mpi4py import MPI

        name = MPI.Get_processor_name().encode()[:NAME_BYTES]
        send = bytearray(NAME_BYTES)
        send[:len(name)] = name
        recv = bytearray(NAME_BYTES * self.size)
        request = self.comm.Iallgather([send, MPI.BYTE], [recv, MPI.BYTE])
        if not wait_request(request, timeout):
            raise MPITimeout(f"not every rank sent its processor name within {timeout:g}s")
        return [bytes(recv[i * NAME_BYTES:(i + 1) * NAME_BYTES]).rstrip(b"\0").decode(errors="replace")
                for i in range(self.size)]

    def bcast(self, payload: dict | None, timeout: float) -> dict:
        """Broadcast a small JSON-able dict from rank 0 (others pass ``None``).

        Raises:
            MPITimeout: rank 0 did not send within ``timeout`` seconds.
            ValueError: the payload is too big or not JSON.
        """
        from mpi4py import MPI

        buf = bytearray(BCAST_BYTES)
        if self.rank == 0:
            data = json.dumps(payload).encode()
            if len(data) > BCAST_BYTES:
                raise ValueError(f"broadcast payload of {len(data)} bytes is over {BCAST_BYTES}")
            buf[:len(data)] = data
        request = self.comm.Ibcast([buf, MPI.BYTE], root=0)
        if not wait_request(request, timeout):
            raise MPITimeout(f"rank 0 did not send the scheduler's address within {timeout:g}s")
        return json.loads(bytes(buf).rstrip(b"\0").decode())

    def post_done(self) -> None:
        """Post the *done* barrier ``B1`` (once): rank 0 when its scheduler has closed, others at once."""
        if self._done_request is None:
            self._done_request = self.comm.Ibarrier()

    def done(self) -> bool:
        """Whether ``B1`` completed: every rank posted it, so rank 0's scheduler has closed."""
        return self._done_request is not None and bool(self._done_request.Test())

    def abort(self, status: int) -> None:
        """End the whole job now with ``status`` (``MPI_Abort``); does not return."""
        status = status if 0 < status < 256 else 1
        logger.debug("rank %d: MPI_Abort(%d)", self.rank, status)
        flush_output()
        self.world.Abort(status)
        os._exit(status)  # pragma: no cover - MPI_Abort does not return

    def finish(self, status: int, timeout: float) -> int:
        """Meet every rank at the final barrier ``B2`` and learn rank 0's status.

        Args:
            status: this rank's exit status.
            timeout: seconds to wait for the other ranks.

        Returns:
            The status this rank should exit with, after finalising MPI
            normally: rank 0's status when it is non-zero (so that every
            launcher returns exactly it), else ``status``.  When a rank does
            not arrive in time, the job is aborted instead (with ``status``,
            or 1).
        """
        if self._finished:
            return status
        self._finished = True
        self.post_done()  # in case this rank never got that far
        final = self.comm.Ibarrier()
        if not wait_request(final, timeout):
            logger.error("rank %d: not every rank finished within %.0fs of this one; aborting the "
                         "MPI job with status %d", self.rank, timeout, status or 1)
            self.abort(status or 1)
        # Every rank posted B1 before B2, so B1 completes too (it may take a progress call).
        if not wait_request(self._done_request, 5.0):  # pragma: no cover
            logger.error("rank %d: the done barrier did not complete; aborting", self.rank)
            self.abort(status or 1)
        return self._job_status(status, timeout) or status

    def _job_status(self, status: int, timeout: float) -> int:
        """Rank 0's ``status``, broadcast to every rank (after ``B2``: every rank is there)."""
        from mpi4py import MPI

        buf = bytearray(int(status).to_bytes(4, "little", signed=True) if self.rank == 0 else 4)
        request = self.comm.Ibcast([buf, MPI.BYTE], root=0)
        if not wait_request(request, timeout):  # pragma: no cover - every rank passed B2
            logger.error("rank %d: rank 0's exit status did not arrive within %.0fs; aborting",
                         self.rank, timeout)
            self.abort(status or 1)
        return int.from_bytes(buf, "little", signed=True)
