"""Records and messages of the scheduler's state machine.

``TaskState``, ``WorkerState`` and ``ClientState`` are flat ``__slots__``
records (a scheduler may hold millions); the ``...Msg`` dataclasses are the
instructions :class:`cluster.runtime.scheduler.state.SchedulerState` returns, routed by
the IO shell to a worker's or a client's stream.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from ..statemachine import Instruction, Msg
from ..utils import key_split

Key = Hashable

_intern = sys.intern


# ----------------------------------------------------------------------------- messages


@dataclass(slots=True)
class ComputeTaskMsg(Msg):
    op = "compute_task"
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
    op = "free_keys"
    route = "worker"
    worker: str
    keys: list


@dataclass(slots=True)
class RemoveReplicasMsg(Msg):
    """Drop these replicas: the scheduler no longer counts them (a worker that still
    needs one answers ``add_keys``, and it is counted again)."""

    op = "remove_replicas"
    route = "worker"
    worker: str
    keys: list


@dataclass(slots=True)
class RefreshWhoHasMsg(Msg):
    op = "refresh_who_has"
    route = "worker"
    worker: str
    who_has: dict


@dataclass(slots=True)
class AcquireReplicasMsg(Msg):
    op = "acquire_replicas"
    route = "worker"
    worker: str
    who_has: dict
    nbytes: dict


@dataclass(slots=True)
class KeyInMemoryMsg(Msg):
    op = "key_in_memory"
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
    op = "task_erred"
    route = "client"
    client: str
    key: Key
    exception: Any
    traceback: str
    worker: str


@dataclass(slots=True)
class CancelledKeyMsg(Msg):
    op = "cancelled_key"
    route = "client"
    client: str
    key: Key
    reason: str


@dataclass(slots=True)
class LostDataMsg(Msg):
    op = "lost_data"
    route = "client"
    client: str
    key: Key


# ----------------------------------------------------------------------------- records


class _View(frozenset):
    """What a set attribute of a record reads as while it is not a ``set`` in its slot.

    A lazily made set attribute is stored as ``None`` while empty and, for
    ``who_has`` and ``who_wants``, as the bare element while it has one. A
    read through the public name then gets a ``frozenset`` of the members
    (``len``, ``in``, iteration, comparisons and set algebra are frozenset's
    own), made on each read and held by nobody. Its mutating methods put a
    real set in the record's slot and change that, so that code outside the
    scheduler's state machine (which uses the slots directly) may still write
    ``ts.who_has.add(ws)``.
    """

    __slots__ = ("_owner", "_slot")

    def __repr__(self) -> str:
        return repr(set(self))

    def _real(self) -> set:
        s = getattr(self._owner, self._slot)
        if s is None:
            s = set()
            setattr(self._owner, self._slot, s)
        elif type(s) is not set:
            s = {s}
            setattr(self._owner, self._slot, s)
        return s

    def add(self, item: Any) -> None:
        self._real().add(item)

    def update(self, *others: Iterable) -> None:
        self._real().update(*others)

    def _empty(self) -> bool:
        return getattr(self._owner, self._slot) is None

    def remove(self, item: Any) -> None:
        if self._empty():
            raise KeyError(item)
        self._real().remove(item)

    def discard(self, item: Any) -> None:
        if not self._empty():
            self._real().discard(item)

    def clear(self) -> None:
        if not self._empty():
            setattr(self._owner, self._slot, None)

    def pop(self) -> Any:
        if self._empty():
            raise KeyError("pop from an empty set")
        return self._real().pop()


def _lazy_set(slot: str, doc: str) -> property:
    """A set attribute stored in ``slot`` as ``None`` while empty (see :class:`_View`)."""

    def get(self):
        s = getattr(self, slot)
        if s is None:
            s = _View()
        elif type(s) is set:
            return s
        else:  # one bare member
            s = _View((s,))
        s._owner = self
        s._slot = slot
        return s

    def put(self, value) -> None:
        # A set is kept as given (the caller may go on using it); anything else is copied.
        if not isinstance(value, set):
            value = set(value) if value else None
        setattr(self, slot, value)

    return property(get, put, doc=doc)


def lazy_add(ts: TaskState, slot: str, item: Any) -> None:
    """Add ``item`` to one of the lazily made sets of ``ts`` (``"_waiters"``...)."""
    s = getattr(ts, slot)
    if s is None:
        setattr(ts, slot, {item})
    else:
        s.add(item)


def lazy_discard(ts: TaskState, slot: str, item: Any) -> None:
    """Discard ``item`` from one of the lazily made sets of ``ts``; an emptied set goes."""
    s = getattr(ts, slot)
    if s is not None:
        s.discard(item)
        if not s:
            setattr(ts, slot, None)


# ``who_has`` and ``who_wants`` (workers and clients: equal only to themselves) hold
# one member bare, without a set: a result held by one client on one worker, the
# common case, then costs no container at all (two sets were 432 bytes and two
# more objects for the garbage collector to walk on every full collection).


def members(s: Any) -> Any:
    """The members of a ``_who_has`` or ``_who_wants`` slot, to iterate."""
    if s is None:
        return ()
    if type(s) is set:
        return s
    return (s,)


def one_has(s: Any, item: Any) -> bool:
    """Whether the ``_who_has`` or ``_who_wants`` slot value ``s`` holds ``item``."""
    return s is item or (type(s) is set and item in s)


def one_add(ts: TaskState, slot: str, item: Any) -> bool:
    """Add ``item`` to ``ts``'s ``_who_has`` or ``_who_wants``; False if it was there."""
    s = getattr(ts, slot)
    if s is None:
        setattr(ts, slot, item)
    elif s is item:
        return False
    elif type(s) is set:
        if item in s:
            return False
        s.add(item)
    else:
        setattr(ts, slot, {s, item})
    return True


def one_discard(ts: TaskState, slot: str, item: Any) -> bool:
    """Discard ``item`` from ``ts``'s ``_who_has`` or ``_who_wants``; False if it was not there."""
    s = getattr(ts, slot)
    if s is item:
        setattr(ts, slot, None)
        return True
    if type(s) is set and item in s:
        s.discard(item)
        if len(s) <= 1:
            setattr(ts, slot, next(iter(s)) if s else None)
        return True
    return False


class TaskState:
    """One task as the scheduler sees it (flat, ``__slots__``: millions may exist).

    Its seven set attributes (``dependencies``, ``dependents``, ``waiting_on``,
    ``waiters``, ``who_wants``, ``who_has``, ``erred_on``) are stored in the
    slots of the same name with a leading underscore, as ``None`` while empty
    (an empty set is 216 bytes, and most tasks of a large graph have five of
    them empty); ``_who_has`` and ``_who_wants`` hold a single member bare
    (see :func:`members`). The scheduler's state machine uses those slots
    directly; the public names read as sets for everyone else (see
    :class:`_View`). The prefix and the type name are interned: one string
    for all the tasks of a prefix.
    """

    __slots__ = (
        "key", "prefix", "state", "run_spec", "priority", "_dependencies", "_dependents",
        "_waiting_on", "_waiters", "_who_wants", "_who_has", "processing_on", "nbytes", "type",
        "retries", "suspicious", "exception", "traceback", "exception_blame", "_erred_on",
        "worker_restrictions", "host_restrictions", "resource_restrictions",
        "loose_restrictions", "long_running", "rootish", "__weakref__",
    )

    _dependencies: set[TaskState] | None
    _dependents: set[TaskState] | None
    _waiting_on: set[TaskState] | None
    _waiters: set[TaskState] | None
    _who_wants: set[ClientState] | ClientState | None
    _who_has: set[WorkerState] | WorkerState | None
    _erred_on: set[str] | None

    dependencies = _lazy_set("_dependencies", "The tasks whose results this one reads.")
    dependents = _lazy_set("_dependents", "The tasks that read this one's result.")
    waiting_on = _lazy_set("_waiting_on", "Dependencies not in memory yet (while waiting).")
    waiters = _lazy_set("_waiters", "Dependents that still need this one's result.")
    who_wants = _lazy_set("_who_wants", "The clients that hold a future of this task.")
    who_has = _lazy_set("_who_has", "The workers that hold this task's result.")
    erred_on = _lazy_set("_erred_on", "Addresses of the workers where it failed or died.")

    def __init__(self, key: Key, run_spec: Any, prefix: str | None = None):
        self.key = key
        prefix = prefix if prefix is not None else key_split(key)
        self.prefix = _intern(prefix) if type(prefix) is str else prefix
        self.state = "released"
        self.run_spec = run_spec
        self.priority: tuple = ()
        self._dependencies = None
        self._dependents = None
        self._waiting_on = None
        self._waiters = None
        self._who_wants = None
        self._who_has = None
        self.processing_on: WorkerState | None = None
        self.nbytes = -1
        self.type: str | None = None
        self.retries = 0
        self.suspicious = 0
        self.exception: Any = None
        self.traceback: str | None = None
        self.exception_blame: TaskState | None = None
        self._erred_on = None
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
