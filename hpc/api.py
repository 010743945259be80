"""``hpc.initialize()``: turn ``mpirun -n N python myscript.py`` into a cluster (as dask-mpi's).

Theory of operation
-------------------
Every rank runs the user's script and calls :func:`initialize` near its top.
There the ranks take their roles (:func:`cluster.hpc.roles.role` with
``initialize=True``): rank 0 runs the scheduler, rank 1 is the client, ranks 2
and up run one worker each.  They share the machinery of the launcher
(:mod:`cluster.hpc.ranks`, :mod:`cluster.hpc.mpi`):

* the scheduler and worker ranks serve inside ``initialize()`` and never
  return from it: once the cluster has shut down they ``sys.exit()`` with
  their status (or return ``False`` with ``exit=False``);
* the client rank receives the scheduler's address over MPI, waits (up to a
  deadline) until the workers have registered, sets
  ``CLUSTER_SCHEDULER_ADDRESS`` so that a plain ``Client()`` connects to the
  cluster, and returns ``True``: the rest of the script is the client.  An
  ``atexit`` hook, run when the script ends (normally, by ``sys.exit`` or by
  an uncaught exception), closes the scheduler with ``close_workers=True``
  and meets the other ranks at the final barrier; the script's own exit
  status then becomes the rank's.

The client rank leaves the signal handlers to the user's script; the server
ranks handle SIGTERM/SIGINT like the launcher's.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from typing import Any

from cluster.runtime.client import ENV_ADDRESS
from cluster.runtime.core import ConnectionPool
from cluster.runtime.errors import ClusterError
from cluster.runtime.loop import run
from cluster.runtime.security import local_credentials, register_local_credentials

from .mpi import Job, MPITimeout, get_world, scrub_rank_environment
from .ranks import (
    EXIT_FAILURE,
    FINISH_MARGIN,
    FINISH_TIMEOUT,
    ClusterOptions,
    SignalCatcher,
    default_nthreads,
    job_security,
    serve_scheduler,
    serve_worker,
)
from .roles import RoleOptions, expected_workers, role

logger = logging.getLogger(__name__)

_client_job: Job | None = None


def initialize(interface: str | None = None, nthreads: int | None = 1, local_directory: str | None = None,
               memory_limit: Any = "auto", nanny: bool = True, protocol: str | None = None,
               scheduler_port: int = 0, scheduler_file: str | None = None, name: str | None = None,
               resources: dict[str, float] | None = None, death_timeout: float = 20.0,
               startup_timeout: float = 120.0, exit: bool = True) -> bool:
    """Make this MPI job a cluster: rank 0 the scheduler, rank 1 the client, the others workers.

    Args:
        interface: network interface every server listens on (``"ib0"``);
            default: loopback when the whole job is on one node, else the
            node's routable address.
        nthreads: threads per worker (``None``: the node's cores shared among its workers).
        local_directory: where the workers put their files.
        memory_limit: per-worker memory limit (``"auto"``, ``"4GB"``, 0 for none).
        nanny: supervise each worker with a nanny that restarts it when it dies.
        protocol: ``"tcp"`` (``None``: the default).
        scheduler_port: the scheduler's port (0: any free port).
        scheduler_file: the scheduler also writes its address there.
        name: prefix of the workers' names (default: the bare rank, ``"2"``).
        resources: abstract resources of every worker, e.g. ``{"GPU": 1}``.
        death_timeout: seconds a worker rank tolerates an unreachable scheduler.
        startup_timeout: seconds for every rank to start and the workers to register.
        exit: on the scheduler and worker ranks, ``sys.exit()`` once the
            cluster has shut down (else return ``False``).

    Returns:
        ``True`` on the client rank (rank 1), which goes on with the script.
        The other ranks return ``False`` only with ``exit=False``.

    Raises:
        RuntimeError: not running under an MPI launcher, or the scheduler
            did not start (on the client rank).
        ValueError: fewer than 3 MPI ranks.
    """
    global _client_job
    if _client_job is not None:
        return True
    world = get_world()
    if world is None:
        raise RuntimeError("hpc.initialize() needs an MPI job: run the script with "
                           "'mpiexec -n 3 python script.py' or more ranks (and mpi4py installed)")
    opts = ClusterOptions(nthreads=nthreads, memory_limit=memory_limit, local_directory=local_directory,
                          interface=interface, protocol=protocol, scheduler_port=scheduler_port,
                          scheduler_file=scheduler_file, name=name, nanny=nanny,
                          resources=dict(resources or {}), death_timeout=float(death_timeout),
                          startup_timeout=float(startup_timeout))
    role_options = RoleOptions(initialize=True, name=name)
    me = role(world.Get_rank(), world.Get_size(), role_options)  # ValueError: too few ranks
    try:
        job = Job.start(world, opts.startup_timeout)
        names = job.allgather_names(opts.startup_timeout)
    except MPITimeout as e:
        logger.error("rank %d: %s; aborting the MPI job", world.Get_rank(), e)
        world.Abort(EXIT_FAILURE)
        raise  # pragma: no cover - MPI_Abort does not return
    workers = expected_workers(job.size, role_options)
    if me.is_client:
        return _become_client(job, opts, set(workers.values()))
    signals = SignalCatcher().install()
    try:
        if me.is_scheduler:
            status = serve_scheduler(job, opts, names, set(workers.values()), signals, announce=False)
        else:
            local = sum(1 for r in workers if names[r] == names[job.rank])
            status = _serve_worker_rank(job, opts, me.name, local, signals)
    except MPITimeout as e:
        logger.error("rank %d: %s; aborting the MPI job", job.rank, e)
        job.abort(EXIT_FAILURE)
        raise  # pragma: no cover
    finally:
        signals.restore()
    if exit:
        sys.exit(status)
    return False


def _serve_worker_rank(job: Job, opts: ClusterOptions, name: str, local_workers: int,
                       signals: SignalCatcher) -> int:
    info = job.bcast(None, opts.startup_timeout)
    if "address" not in info:
        return job.finish(0, FINISH_TIMEOUT + FINISH_MARGIN)  # rank 0 reports the error
    scrub_rank_environment()
    nthreads = opts.nthreads or default_nthreads(local_workers)
    return serve_worker(job, info["address"], name, nthreads, opts, signals,
                        security=job_security(info))


def _become_client(job: Job, opts: ClusterOptions, worker_names: set[str]) -> bool:
    global _client_job
    try:
        info = job.bcast(None, opts.startup_timeout)
    except MPITimeout as e:
        logger.error("rank %d: %s; aborting the MPI job", job.rank, e)
        job.abort(EXIT_FAILURE)
    job.post_done()
    _client_job = job
    address = info.get("address")
    atexit.register(_shutdown_at_exit, job, address)
    if address is None:
        raise RuntimeError(f"hpc.initialize(): {info.get('error', 'the scheduler did not start')}")
    os.environ[ENV_ADDRESS] = address
    security = job_security(info)
    if security is not None:
        # Client() in this process finds the job's credentials by the address;
        # they never leave the process.
        register_local_credentials(address, security)
    missing = run(_wait_for_workers(address, worker_names, opts.startup_timeout))
    if missing:
        logger.warning("workers %s did not register within %.0fs; going on without them",
                       sorted(missing), opts.startup_timeout)
    return True


async def _wait_for_workers(address: str, names: set[str], timeout: float) -> set[str]:
    """The names among ``names`` with no registered worker after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    rpc = ConnectionPool(timeout=min(10.0, timeout), **_connection_args(address))
    missing = set(names)
    try:
        while True:
            try:
                info = await rpc.call(address, "identity")
                missing = names - {str(w.get("name")) for w in info.get("workers", {}).values()}
            except (OSError, ClusterError) as e:
                logger.info("scheduler %s not answering yet: %r", address, e)
            if not missing or time.monotonic() >= deadline:
                return missing
            await asyncio.sleep(0.05)
    finally:
        await rpc.close()


def _connection_args(address: str) -> dict[str, Any]:
    security = local_credentials(address)
    return security.get_connection_args("client") if security is not None else {}


async def _close_scheduler(address: str) -> None:
    rpc = ConnectionPool(timeout=10.0, **_connection_args(address))
    try:
        await asyncio.wait_for(rpc.call(address, "close", close_workers=True), 20.0)
    except (OSError, ClusterError, asyncio.TimeoutError) as e:
        logger.info("closing the scheduler %s: %r", address, e)
    finally:
        await rpc.close()


def _shutdown_at_exit(job: Job, address: str | None) -> None:
    """On the client rank at exit: close the cluster, then meet the other ranks at the end."""
    if address is not None:
        try:
            run(_close_scheduler(address))
        except Exception as e:
            logger.error("could not close the scheduler %s: %r", address, e)
    # Our own exit status is not known here; the interpreter exits with it after
    # MPI_Finalize, and mpiexec reports it.
    job.finish(0, FINISH_TIMEOUT + FINISH_MARGIN)
