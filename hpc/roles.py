"""Which part of the cluster each MPI rank plays, and where the scheduler listens.

Theory of operation
-------------------
Every rank of an MPI job runs the same command line; what a rank does is a
pure function of its rank, the world size and the launch options, so that all
ranks agree without talking to each other:

* **launcher, service mode** (``python -m cluster`` with no script): rank 0
  runs the scheduler, every other rank runs one worker;
* **launcher, script mode** (``python -m cluster script.py ...``): the same,
  and rank 0 also runs the user's script as the cluster's client;
* **initialize()** (``mpirun -n N python myscript.py`` calling
  :func:`cluster.hpc.initialize`, as in dask-mpi): rank 0 runs the scheduler, rank 1
  returns from ``initialize()`` and goes on with the user's script as the
  client, ranks 2 and up run one worker each.

Workers are named after their rank (``"3"``, or ``"<prefix>-3"`` with a name
prefix) so that logs, ``client.scheduler_info()`` and the MPI rank of a
process tell the same story, and a nanny's restarted worker keeps its name.

:func:`scheduler_host` decides, just as purely, where the scheduler listens:
on an explicitly given interface or host, else on loopback when every rank
runs on this node, else on this node's routable address (``None``: the caller
looks it up).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Kind",
    "Role",
    "RoleOptions",
    "expected_workers",
    "role",
    "scheduler_host",
    "worker_name",
    "worker_ranks",
]


class Kind(str, enum.Enum):
    """What a rank runs."""

    SCHEDULER = "scheduler"
    CLIENT = "client"
    WORKER = "worker"


@dataclass(frozen=True)
class RoleOptions:
    """The launch options that decide the roles.

    Attributes:
        script: launcher script mode (rank 0 also runs the user's script).
        initialize: :func:`cluster.hpc.initialize` mode (rank 1 is the client).
        name: prefix of the workers' names (``None``: the bare rank).
    """

    script: bool = False
    initialize: bool = False
    name: str | None = None


@dataclass(frozen=True)
class Role:
    """The role of one rank.

    Attributes:
        kind: what the rank runs.
        rank: the rank in ``MPI.COMM_WORLD``.
        size: the world size.
        name: the worker's name (``None`` unless ``kind`` is ``WORKER``).
        runs_script: this rank runs the user's script (launcher script mode on
            rank 0; the client rank of ``initialize()``).
    """

    kind: Kind
    rank: int
    size: int
    name: str | None = None
    runs_script: bool = False

    @property
    def is_scheduler(self) -> bool:
        return self.kind is Kind.SCHEDULER

    @property
    def is_worker(self) -> bool:
        return self.kind is Kind.WORKER

    @property
    def is_client(self) -> bool:
        return self.kind is Kind.CLIENT


def _check(rank: int, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r}: expected a positive integer (the MPI world size)")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank={rank!r}: expected an integer from 0 to {size - 1} (size={size})")


def worker_name(rank: int, prefix: str | None = None) -> str:
    """The name of the worker on ``rank``: ``"3"``, or ``"<prefix>-3"``."""
    return f"{prefix}-{rank}" if prefix else str(rank)


def role(rank: int, size: int, options: RoleOptions | None = None) -> Role:
    """The role of ``rank`` in a world of ``size`` ranks.

    Args:
        rank: the rank (0 to ``size - 1``).
        size: the MPI world size.
        options: launch mode and worker name prefix (default: service mode).

    Returns:
        The :class:`Role` of that rank.

    Raises:
        ValueError: ``rank`` or ``size`` is out of range, or
            ``options.initialize`` with fewer than 3 ranks (a scheduler, a
            client and at least one worker are needed).
    """
    options = options or RoleOptions()
    _check(rank, size)
    if options.initialize:
        if options.script:
            raise ValueError("RoleOptions: script and initialize modes exclude each other")
        if size < 3:
            raise ValueError(f"initialize() needs at least 3 MPI ranks (scheduler, client, one "
                             f"worker); this job has {size}")
        if rank == 0:
            return Role(Kind.SCHEDULER, rank, size)
        if rank == 1:
            return Role(Kind.CLIENT, rank, size, runs_script=True)
        return Role(Kind.WORKER, rank, size, name=worker_name(rank, options.name))
    if rank == 0:
        return Role(Kind.SCHEDULER, rank, size, runs_script=options.script)
    return Role(Kind.WORKER, rank, size, name=worker_name(rank, options.name))


def worker_ranks(size: int, options: RoleOptions | None = None) -> list[int]:
    """The ranks that run a worker.

    Raises:
        ValueError: as :func:`role`.
    """
    return [r for r in range(size) if role(r, size, options).is_worker]


def expected_workers(size: int, options: RoleOptions | None = None) -> dict[int, str]:
    """``{rank: worker name}`` of every worker rank.

    Raises:
        ValueError: as :func:`role`.
    """
    return {r: role(r, size, options).name for r in worker_ranks(size, options)}


def scheduler_host(size: int, processor_names: Sequence[str], host: str | None = None,
                   interface_address: str | None = None) -> str | None:
    """Where the scheduler listens.

    Args:
        size: the MPI world size.
        processor_names: ``MPI.Get_processor_name()`` of every rank (may be
            empty when ``size`` is 1).
        host: the host given with ``--host``, if any.
        interface_address: the address of the interface given with
            ``--interface``, if any.

    Returns:
        ``interface_address`` if given, else ``host`` if given, else
        ``"127.0.0.1"`` when the job has one rank or every rank runs on the
        same node, else ``None``: this node's routable address (the caller
        looks it up), since workers on other nodes must reach the scheduler.

    Raises:
        ValueError: ``processor_names`` does not have one name per rank.
    """
    if interface_address:
        return interface_address
    if host:
        return host
    if size <= 1:
        return "127.0.0.1"
    if len(processor_names) != size:
        raise ValueError(f"processor_names: expected {size} names (one per rank), "
                         f"got {len(processor_names)}")
    if len(set(processor_names)) == 1:
        return "127.0.0.1"
    return None
