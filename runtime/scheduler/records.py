"""Records and messages of the scheduler's state machine.

``TaskState``, ``WorkerState`` and ``ClientState`` are flat ``__slots__``
records (a scheduler may hold millions); the ``...Msg`` dataclasses are the
instructions :class:`runtime.scheduler.state.SchedulerState` returns, routed by
the IO shell to a worker's or a client's stream.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ..statemachine import Instruction, Msg
from ..utils import key_split

Key = Hashable


# ----------------------------------------------------------------------------- messages


@dataclass(slots=True)
class ComputeTaskMsg(Msg):
    op = "compute-task"
    route = "worker"
    worker: str
    key: Key
    run_spec: bytes | None
    priority: tuple
    who_has: dict
    nbytes: dict
    duration: float
    resource_restrictions: dict | None
    #: A client wants this result: the worker may send a small one along.
    report: bool = False


@dataclass(slots=True)
class FreeKeysMsg(Msg):
    op = "free-keys"
    route = "worker"
    worker: str
    keys: list


@dataclass(slots=True)
class RemoveReplicasMsg(Msg):
    """Drop these replicas: the scheduler no longer counts them (a worker that still
    needs one answers ``add-keys``, and it is counted again)."""

    op = "remove-replicas"
    route = "worker"
    worker: str
    keys: list


@dataclass(slots=True)
class RefreshWhoHasMsg(Msg):
    op = "refresh-who-has"
    route = "worker"
    worker: str
    who_has: dict


@dataclass(slots=True)
class AcquireReplicasMsg(Msg):
    op = "acquire-replicas"
    route = "worker"
    worker: str
    who_has: dict
    nbytes: dict


@dataclass(slots=True)
class KeyInMemoryMsg(Msg):
    op = "key-in-memory"
    route = "client"
    client: str
    key: Key
    type: str
    workers: list
    #: The pickled value, when the worker sent a small result along.
    data: bytes | None = None


@dataclass(slots=True)
class RemoveWorker(Instruction):
    """Remove a worker (for the shell: it also closes the worker's stream).

    ``safe``: the worker left on purpose (its tasks do not count as failures);
    ``close``: ask it to close (not when it said it is closing).
    """

    worker: str
    reason: str
    safe: bool = False
    close: bool = True


@dataclass(slots=True)
class CloseScheduler(Instruction):
    """Close the scheduler (idle for longer than ``idle_timeout``)."""

    reason: str


@dataclass(slots=True)
class TaskErredClientMsg(Msg):
    op = "task-erred"
    route = "client"
    client: str
    key: Key
    exception: Any
    traceback: str
    worker: str


@dataclass(slots=True)
class CancelledKeyMsg(Msg):
    op = "cancelled-key"
    route = "client"
    client: str
    key: Key
    reason: str


@dataclass(slots=True)
class LostDataMsg(Msg):
    op = "lost-data"
    route = "client"
    client: str
    key: Key


# ----------------------------------------------------------------------------- records


class TaskState:
    """One task as the scheduler sees it (flat, ``__slots__``: millions may exist)."""

    __slots__ = (
        "key", "prefix", "state", "run_spec", "priority", "dependencies", "dependents",
        "waiting_on", "waiters", "who_wants", "who_has", "processing_on", "nbytes", "type",
        "retries", "suspicious", "exception", "traceback", "exception_blame", "erred_on",
        "worker_restrictions", "host_restrictions", "resource_restrictions",
        "loose_restrictions", "long_running", "rootish", "__weakref__",
    )

    def __init__(self, key: Key, run_spec: bytes | None, prefix: str | None = None):
        self.key = key
        self.prefix = prefix if prefix is not None else key_split(key)
        self.state = "released"
        self.run_spec = run_spec
        self.priority: tuple = ()
        self.dependencies: set[TaskState] = set()
        self.dependents: set[TaskState] = set()
        self.waiting_on: set[TaskState] = set()
        self.waiters: set[TaskState] = set()
        self.who_wants: set[ClientState] = set()
        self.who_has: set[WorkerState] = set()
        self.processing_on: WorkerState | None = None
        self.nbytes = -1
        self.type: str | None = None
        self.retries = 0
        self.suspicious = 0
        self.exception: Any = None
        self.traceback: str | None = None
        self.exception_blame: TaskState | None = None
        self.erred_on: set[str] = set()
        self.worker_restrictions: set[str] | None = None
        self.host_restrictions: set[str] | None = None
        self.resource_restrictions: dict[str, float] | None = None
        self.loose_restrictions = False
        self.long_running = False
        #: One of many siblings reading a few shared inputs (e.g. the chunks read
        #: from one array): queued like tasks without inputs (see SchedulerState).
        self.rootish = False

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state}>"

    def __lt__(self, other: TaskState) -> bool:
        return self.priority < other.priority

    def get_nbytes(self) -> int:
        return self.nbytes if self.nbytes >= 0 else 0


class WorkerState:
    """One worker as the scheduler sees it."""

    __slots__ = (
        "address", "name", "nthreads", "memory_limit", "resources", "used_resources",
        "processing", "has_what", "nbytes", "occupancy", "status", "host", "pid", "nanny",
        "local_directory", "last_seen", "metrics", "services", "long_running", "executing",
        "__weakref__",
    )

    def __init__(self, address: str, nthreads: int = 1, name: Any = None, memory_limit: int = 0,
                 resources: dict | None = None, host: str = "", pid: int = 0,
                 nanny: str | None = None, local_directory: str = "", services: dict | None = None):
        self.address = address
        self.name = name if name is not None else address
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.resources = dict(resources or {})
        self.used_resources = {r: 0 for r in self.resources}
        self.processing: dict[TaskState, float] = {}
        self.has_what: dict[TaskState, None] = {}
        self.nbytes = 0
        self.occupancy = 0.0
        self.status = "running"
        self.host = host
        self.pid = pid
        self.nanny = nanny
        self.local_directory = local_directory
        self.last_seen = 0.0
        self.metrics: dict = {}
        self.services = dict(services or {})
        self.long_running: set[TaskState] = set()
        self.executing: dict = {}

    def __repr__(self) -> str:
        return f"<WorkerState {self.address!r} name={self.name!r} processing={len(self.processing)} memory={len(self.has_what)}>"

    def identity(self) -> dict:
        return {
            "type": "Worker",
            "id": self.name,
            "name": self.name,
            "host": self.host,
            "nthreads": self.nthreads,
            "memory_limit": self.memory_limit,
            "resources": dict(self.resources),
            "pid": self.pid,
            "nanny": self.nanny,
            "local_directory": self.local_directory,
            "last_seen": self.last_seen,
            "services": dict(self.services),
            "metrics": dict(self.metrics),
            "status": self.status,
            "processing": len(self.processing),
            "in_memory": len(self.has_what),
            "nbytes": self.nbytes,
        }


class ClientState:
    """One connected client and the keys it wants."""

    __slots__ = ("client_key", "wants_what", "last_seen", "__weakref__")

    def __init__(self, client_key: str):
        self.client_key = client_key
        self.wants_what: set[TaskState] = set()
        self.last_seen = 0.0

    def __repr__(self) -> str:
        return f"<ClientState {self.client_key!r} wants={len(self.wants_what)}>"
