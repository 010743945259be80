"""The scheduler's pure state machine.

Theory of operation
-------------------
``SchedulerState`` knows every task a client asked for, every worker and every
client, and moves tasks through the states::

    released -> waiting -> queued / no-worker / processing -> memory | erred -> forgotten

Events arrive as method calls (``update_graph``, ``stimulus_task_finished``,
``add_worker`` ...) or as event objects through :meth:`SchedulerState.handle`.
Each turns into *recommendations* ``{key: finish}`` that :meth:`transitions`
carries out through the single table :data:`SchedulerState.TRANSITIONS`, until
none are left; then workers with spare capacity are filled from the queue.
The result is a list of instructions (``ComputeTaskMsg`` to a worker,
``KeyInMemoryMsg`` to a client, ...) for the IO shell to send.  Nothing here
touches sockets, threads or the event loop; time comes from the injected
``clock``.

Scheduling policy: a ready task with no dependencies and no restrictions is
*queued* (ordered by priority) and handed to workers as they have room, so
that load follows real progress; a task with dependencies or restrictions goes
straight to the worker that minimises its expected start time (queue wait plus
the time to move the data it lacks).  A worker "has room" while it holds fewer
than two tasks per thread, or while the expected duration of what it holds is
below :data:`SATURATION_SECONDS` per thread: enough to hide a network round
trip for very short tasks without starving other workers of long ones.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidStateError, InvalidTransition, KilledWorker, ScatteredDataLost
from .statemachine import Msg, TransitionLog
from .utils import key_split

logger = logging.getLogger(__name__)

Key = Hashable

#: Expected duration of a task whose prefix we have never seen run.
DEFAULT_TASK_DURATION = 0.5
#: Expected queued work per worker thread below which it accepts more tasks.
SATURATION_SECONDS = 0.05
#: Never hold more than this many tasks per thread on one worker.
MAX_TASKS_PER_THREAD = 1000
#: Assumed network bandwidth (bytes/s) for transfer-cost estimates.
BANDWIDTH = 100e6


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
        "loose_restrictions", "long_running", "__weakref__",
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


# ----------------------------------------------------------------------------- the machine


class SchedulerState:
    """The scheduler's state and its transition table (no IO).

    Args:
        validate: check every invariant after each step (on in all tests).
        allowed_failures: how many workers may die while running a task before
            it fails with :class:`KilledWorker`.
        clock: source of time, injected so that tests control it.
        transition_log_length: entries kept for ``story``.
    """

    def __init__(self, validate: bool = False, allowed_failures: int = 3,
                 clock: Callable[[], float] = time.monotonic,
                 transition_log_length: int = 100_000):
        self.validate = validate
        self.allowed_failures = allowed_failures
        self.clock = clock
        self.tasks: dict[Key, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.clients: dict[str, ClientState] = {}
        self.aliases: dict[Any, str] = {}
        self.host_info: dict[str, dict] = {}
        self.unrunnable: set[TaskState] = set()
        self.queued: list[tuple[tuple, int, TaskState]] = []
        self.idle: dict[str, WorkerState] = {}
        self.saturated: set[WorkerState] = set()
        self.task_duration: dict[str, float] = {}
        self.total_nthreads = 0
        self.log = TransitionLog(transition_log_length)
        self.transition_counter = 0
        self._priority_counter = itertools.count()
        self._queue_counter = itertools.count()
        self._instructions: list[Msg] = []
        self.TRANSITIONS: dict[tuple[str, str], Callable] = {
            ("released", "waiting"): self._released_waiting,
            ("released", "forgotten"): self._released_forgotten,
            ("released", "erred"): self._released_erred,
            ("released", "memory"): self._to_memory_external,
            ("waiting", "processing"): self._ready_processing,
            ("waiting", "queued"): self._waiting_queued,
            ("waiting", "no-worker"): self._waiting_no_worker,
            ("waiting", "memory"): self._to_memory_external,
            ("waiting", "released"): self._waiting_released,
            ("waiting", "erred"): self._waiting_erred,
            ("queued", "processing"): self._ready_processing,
            ("queued", "released"): self._queued_released,
            ("queued", "erred"): self._queued_erred,
            ("no-worker", "processing"): self._ready_processing,
            ("no-worker", "released"): self._no_worker_released,
            ("no-worker", "erred"): self._no_worker_erred,
            ("processing", "memory"): self._processing_memory,
            ("processing", "erred"): self._processing_erred,
            ("processing", "released"): self._processing_released,
            ("memory", "released"): self._memory_released,
            ("erred", "released"): self._erred_released,
        }

    # ------------------------------------------------------------------ generic machinery

    def transition(self, key: Key, finish: str, stimulus_id: str = "", **kwargs) -> dict[Key, str]:
        """Move one task to ``finish``; return the follow-up recommendations.

        A move the table lacks goes through ``released`` when both halves exist
        (e.g. ``memory -> forgotten``); anything else raises.

        Raises:
            InvalidTransition: the table has no way from the current state.
        """
        ts = self.tasks.get(key)
        if ts is None or ts.state == finish:
            return {}
        start = ts.state
        func = self.TRANSITIONS.get((start, finish))
        if func is not None:
            recs = func(ts, stimulus_id, **kwargs)
        elif (start, "released") in self.TRANSITIONS and (
            ("released", finish) in self.TRANSITIONS or finish == "released"
        ):
            recs = self.TRANSITIONS[(start, "released")](ts, stimulus_id)
            recs.pop(key, None)  # superseded by the second half
            self._log(ts, start, "released", recs, stimulus_id)
            if ts.state != "released":  # pragma: no cover - defensive
                raise InvalidStateError(f"{ts!r} did not reach released")
            recs2 = self.TRANSITIONS[("released", finish)](ts, stimulus_id, **kwargs)
            recs = {**recs, **recs2}
            start = "released"
        else:
            raise InvalidTransition(key, start, finish, tuple(self.log.story(key)))
        if ts.state != start:
            self._log(ts, start, ts.state, recs, stimulus_id)
        if self.validate and ts.state != "forgotten":
            self.validate_task(ts)
        return recs

    def _log(self, ts: TaskState, start: str, finish: str, recs: dict, stimulus_id: str) -> None:
        self.transition_counter += 1
        self.log.append(ts.key, start, finish, dict(recs), stimulus_id, self.clock())

    def transitions(self, recommendations: dict[Key, str], stimulus_id: str = "") -> list[Msg]:
        """Carry out recommendations and their consequences until none are left.

        Returns the instructions produced (and clears the pending list).
        """
        recs = dict(recommendations)
        while recs:
            key, finish = recs.popitem()
            new = self.transition(key, finish, stimulus_id)
            recs.update(new)
        self._fill_workers(stimulus_id)
        if self.validate:
            self.validate_state()
        out, self._instructions = self._instructions, []
        return out

    def story(self, *keys: Key) -> list[tuple]:
        """Every recorded transition that touches one of ``keys``."""
        return self.log.story(*keys)

    transition_story = story

    def handle(self, *events: Any) -> list[Msg]:
        """Dispatch event objects (see :mod:`runtime.scheduler_events`) to their stimulus method."""
        out: list[Msg] = []
        for ev in events:
            handler = getattr(self, ev.handler)
            out.extend(handler(**ev.kwargs()))
        return out

    # ------------------------------------------------------------------ clients

    def add_client(self, client: str) -> ClientState:
        cs = self.clients.get(client)
        if cs is None:
            cs = self.clients[client] = ClientState(client)
        cs.last_seen = self.clock()
        return cs

    def remove_client(self, client: str, stimulus_id: str = "remove-client") -> list[Msg]:
        cs = self.clients.get(client)
        if cs is None:
            return []
        out = self.client_releases_keys([ts.key for ts in cs.wants_what], client, stimulus_id)
        del self.clients[client]
        return out

    def client_releases_keys(self, keys: Iterable[Key], client: str, stimulus_id: str = "client-releases") -> list[Msg]:
        """The client dropped its last future for these keys."""
        cs = self.clients.get(client)
        if cs is None:
            return []
        recs: dict[Key, str] = {}
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None or cs not in ts.who_wants:
                continue
            ts.who_wants.discard(cs)
            cs.wants_what.discard(ts)
            if not ts.who_wants:
                if not ts.dependents:
                    recs[key] = "forgotten"
                elif not ts.waiters and ts.state in ("memory", "erred"):
                    recs[key] = "released"
        return self.transitions(recs, stimulus_id)

    # ------------------------------------------------------------------ workers

    def add_worker(self, address: str, nthreads: int = 1, name: Any = None, memory_limit: int = 0,
                   resources: dict | None = None, host: str = "", pid: int = 0,
                   nanny: str | None = None, local_directory: str = "", services: dict | None = None,
                   keys: Iterable[Key] = (), nbytes: dict | None = None,
                   stimulus_id: str = "add-worker") -> list[Msg]:
        """A worker joined.  Tasks that had no worker get another chance.

        Raises:
            ValueError: the address or name is already taken.
        """
        if address in self.workers:
            raise ValueError(f"worker {address} is already registered")
        if name is not None and name in self.aliases and self.aliases[name] != address:
            raise ValueError(f"a worker named {name!r} is already registered at {self.aliases[name]}")
        ws = WorkerState(address, nthreads, name, memory_limit, resources, host, pid, nanny,
                         local_directory, services)
        ws.last_seen = self.clock()
        self.workers[address] = ws
        self.aliases[ws.name] = address
        self.total_nthreads += nthreads
        hi = self.host_info.setdefault(host, {"addresses": set(), "nthreads": 0})
        hi["addresses"].add(address)
        hi["nthreads"] += nthreads
        self.check_idle_saturated(ws)
        recs: dict[Key, str] = {}
        for key in keys:  # data the worker brings along (a reconnect)
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "memory":
                self._add_replica(ts, ws)
        for ts in list(self.unrunnable):
            valid = self.valid_workers(ts)
            if valid is None or ws in valid or (ts.loose_restrictions and not valid):
                recs[ts.key] = "processing"
        return self.transitions(recs, stimulus_id)

    def remove_worker(self, address: str, stimulus_id: str = "remove-worker", safe: bool = False) -> list[Msg]:
        """A worker left or died.

        Tasks it was running are rescheduled (after ``allowed_failures``
        deaths during one task, the task fails with :class:`KilledWorker`);
        results only it held are recomputed from their recipe.
        """
        ws = self.workers.pop(address, None)
        if ws is None:
            return []
        if self.aliases.get(ws.name) == address:
            del self.aliases[ws.name]
        self.total_nthreads -= ws.nthreads
        hi = self.host_info.get(ws.host)
        if hi is not None:
            hi["addresses"].discard(address)
            hi["nthreads"] -= ws.nthreads
            if not hi["addresses"]:
                del self.host_info[ws.host]
        self.idle.pop(address, None)
        self.saturated.discard(ws)
        recs: dict[Key, str] = {}
        killed: dict[Key, str] = {}
        for ts in list(ws.processing):
            if not safe:
                ts.suspicious += 1
                ts.erred_on.add(address)
            if ts.suspicious > self.allowed_failures:
                ts.exception = KilledWorker(ts.key, address, self.allowed_failures)
                ts.traceback = ""
                killed[ts.key] = "erred"
            else:
                recs[ts.key] = "released"  # and from there back to waiting
        # Fail the killers first, so that no later recommendation revives them.
        out = self.transitions(killed, stimulus_id) if killed else []
        for ts in list(ws.has_what):
            self._remove_replica(ts, ws)
            if not ts.who_has:
                if ts.run_spec is not None:
                    recs[ts.key] = "released"
                else:
                    ts.exception = ScatteredDataLost(ts.key)
                    ts.traceback = ""
                    recs[ts.key] = "erred"
        out.extend(self.transitions(recs, stimulus_id))
        return out

    def worker_heartbeat(self, address: str, metrics: dict | None = None) -> bool:
        ws = self.workers.get(address)
        if ws is None:
            return False
        ws.last_seen = self.clock()
        if metrics:
            ws.metrics = metrics
        return True

    def check_idle_saturated(self, ws: WorkerState) -> None:
        """Keep the ``idle`` and ``saturated`` sets up to date for one worker."""
        if ws.status != "running":
            self.idle.pop(ws.address, None)
            self.saturated.discard(ws)
            return
        if len(ws.processing) < ws.nthreads:
            self.idle[ws.address] = ws
        else:
            self.idle.pop(ws.address, None)
        if self._has_room(ws):
            self.saturated.discard(ws)
        else:
            self.saturated.add(ws)

    def _has_room(self, ws: WorkerState) -> bool:
        n = len(ws.processing) - len(ws.long_running)
        if n < 2 * ws.nthreads:
            return True
        return n < MAX_TASKS_PER_THREAD * ws.nthreads and ws.occupancy < SATURATION_SECONDS * ws.nthreads

    # ------------------------------------------------------------------ graphs

    def update_graph(self, client: str, tasks: dict[Key, bytes | None], keys: Iterable[Key],
                     dependencies: dict[Key, Iterable[Key]] | None = None,
                     restrictions: dict[Key, Iterable[str]] | None = None,
                     loose_restrictions: Iterable[Key] = (),
                     resources: dict[Key, dict] | None = None,
                     retries: dict[Key, int] | None = None,
                     user_priority: int | dict[Key, int] = 0,
                     stimulus_id: str = "update-graph") -> list[Msg]:
        """New work from a client: ``tasks`` maps keys to serialised recipes.

        ``keys`` are the keys the client holds futures for.  Recipes arrive as
        bytes and are forwarded to workers untouched.  A key already known
        keeps its state (so resubmitting the same pure task costs nothing).
        """
        cs = self.add_client(client)
        dependencies = dependencies or {}
        restrictions = restrictions or {}
        resources = resources or {}
        retries = retries or {}
        loose = set(loose_restrictions)
        new: list[TaskState] = []
        out: list[Msg] = []
        recs: dict[Key, str] = {}
        for key, spec in tasks.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, spec)
                new.append(ts)
            elif ts.run_spec is None and spec is not None and ts.state in ("released", "erred"):
                ts.run_spec = spec
                new.append(ts)
                if ts.state == "erred":  # an unknown dependency that now has a recipe
                    recs[key] = "released"
            elif ts.state == "erred" and ts.exception_blame is ts:
                # Resubmission of a failed task: try again.
                new.append(ts)
                recs[key] = "released"
        for ts in new:
            for dep_key in dependencies.get(ts.key, ()):
                dts = self.tasks.get(dep_key)
                if dts is None:
                    dts = self.tasks[dep_key] = TaskState(dep_key, None)
                    dts.exception = KeyError(f"dependency {dep_key!r} is not known to the scheduler")
                    dts.exception_blame = dts
                    dts.state = "erred"
                ts.dependencies.add(dts)
                dts.dependents.add(ts)
            r = restrictions.get(ts.key)
            if r:
                self._set_restrictions(ts, r)
                ts.loose_restrictions = ts.key in loose
            res = resources.get(ts.key)
            if res:
                ts.resource_restrictions = dict(res)
            ts.retries = int(retries.get(ts.key, 0))
            up = user_priority.get(ts.key, 0) if isinstance(user_priority, dict) else user_priority
            ts.priority = (-up, next(self._priority_counter))
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.who_wants.add(cs)
            cs.wants_what.add(ts)
            if ts.state == "memory":
                out.append(KeyInMemoryMsg(stimulus_id, client, ts.key, ts.type or "", [w.address for w in ts.who_has]))
            elif ts.state == "erred" and key not in recs:  # (else: being tried again)
                blame = ts.exception_blame or ts
                out.append(TaskErredClientMsg(stimulus_id, client, ts.key, blame.exception,
                                              blame.traceback or "", ""))
        for ts in new:
            if ts.state == "released" and ts.key not in recs:
                recs[ts.key] = "waiting"
        out.extend(self.transitions(recs, stimulus_id))
        return out

    def _set_restrictions(self, ts: TaskState, restrictions: Iterable[str]) -> None:
        workers: set[str] = set()
        hosts: set[str] = set()
        for r in restrictions:
            if r in self.workers or "://" in str(r):
                workers.add(r)
            elif r in self.aliases:
                workers.add(self.aliases[r])
            else:
                hosts.add(r)
        ts.worker_restrictions = workers or None
        ts.host_restrictions = hosts or None

    # ------------------------------------------------------------------ stimuli from workers

    def stimulus_task_finished(self, key: Key, worker: str, nbytes: int = -1, type: str = "",
                               startstops: Iterable = (), stimulus_id: str = "task-finished",
                               data: bytes | None = None) -> list[Msg]:
        """A worker computed ``key``; ``data`` is its pickled value if small (forwarded, not kept)."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ws is None:
            return []
        if ts is None or ts.state != "processing" or ts.processing_on is not ws:
            if ts is not None and ts.state == "memory":
                # A duplicate result (e.g. after a reschedule): keep the replica.
                self._add_replica(ts, ws)
                return []
            return [FreeKeysMsg(stimulus_id, worker, [key])]
        for action, start, stop in startstops:
            if action == "compute":
                self._record_duration(ts, stop - start)
        recs = self.transition(key, "memory", stimulus_id, worker=ws, nbytes=nbytes, type=type, data=data)
        return self.transitions(recs, stimulus_id)

    def _record_duration(self, ts: TaskState, duration: float) -> None:
        old = self.task_duration.get(ts.prefix)
        self.task_duration[ts.prefix] = duration if old is None else 0.5 * old + 0.5 * duration

    def stimulus_task_erred(self, key: Key, worker: str, exception: Any = None, traceback: str = "",
                            startstops: Iterable = (), stimulus_id: str = "task-erred") -> list[Msg]:
        """A task raised on a worker; retry it if it has retries left."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ts is None or ws is None or ts.state != "processing" or ts.processing_on is not ws:
            return []
        if ts.retries > 0:
            ts.retries -= 1
            return self.transitions({key: "waiting"}, stimulus_id)
        ts.exception = exception
        ts.traceback = traceback
        ts.erred_on.add(worker)
        return self.transitions({key: "erred"}, stimulus_id)

    def stimulus_missing_data(self, key: Key, errant_worker: str | None = None, worker: str | None = None,
                              stimulus_id: str = "missing-data") -> list[Msg]:
        """A worker could not get ``key`` from ``errant_worker``.  Recover."""
        ts = self.tasks.get(key)
        if ts is None:
            return []
        ews = self.workers.get(errant_worker) if errant_worker else None
        if ews is not None and ews in ts.who_has:
            self._remove_replica(ts, ews)
        if ts.state == "memory" and not ts.who_has:
            if ts.run_spec is None:
                ts.exception = ScatteredDataLost(key)
                ts.traceback = ""
                return self.transitions({key: "erred"}, stimulus_id)
            return self.transitions({key: "waiting"}, stimulus_id)
        if ts.state == "memory" and worker in self.workers:
            return [RefreshWhoHasMsg(stimulus_id, worker, {key: [w.address for w in ts.who_has]})]
        return []

    def add_keys(self, worker: str, keys: Iterable[Key], stimulus_id: str = "add-keys") -> list[Msg]:
        """A worker holds replicas of ``keys`` (fetched as dependencies)."""
        ws = self.workers.get(worker)
        if ws is None:
            return []
        stale = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "memory":
                self._add_replica(ts, ws)
            else:
                stale.append(key)
        return [FreeKeysMsg(stimulus_id, worker, stale)] if stale else []

    def release_worker_data(self, key: Key, worker: str, stimulus_id: str = "release-worker-data") -> list[Msg]:
        """A worker dropped its replica of ``key``."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ts is None or ws is None or ws not in ts.who_has:
            return []
        self._remove_replica(ts, ws)
        if not ts.who_has and ts.state == "memory":
            return self.transitions({key: "released"}, stimulus_id)
        return []

    def handle_long_running(self, key: Key, worker: str, compute_duration: float | None = None,
                            stimulus_id: str = "long-running") -> list[Msg]:
        """A task seceded from its worker's thread pool: it no longer counts as load."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ts is None or ws is None or ts.processing_on is not ws:
            return []
        if compute_duration is not None:
            self._record_duration(ts, compute_duration)
        ts.long_running = True
        ws.long_running.add(ts)
        ws.occupancy -= ws.processing[ts]
        ws.processing[ts] = 0.0
        self.check_idle_saturated(ws)
        return self.transitions({}, stimulus_id)

    def reschedule(self, key: Key, worker: str | None = None, stimulus_id: str = "reschedule") -> list[Msg]:
        """Send a processing task back to be placed again (e.g. it raised ``Reschedule``)."""
        ts = self.tasks.get(key)
        if ts is None or ts.state != "processing":
            return []
        if worker is not None and (ts.processing_on is None or ts.processing_on.address != worker):
            return []
        return self.transitions({key: "waiting"}, stimulus_id)

    # ------------------------------------------------------------------ stimuli from clients

    def stimulus_cancel(self, keys: Iterable[Key], client: str, force: bool = False,
                        stimulus_id: str = "cancel") -> list[Msg]:
        """Stop computing ``keys`` for ``client`` (and everything that depends on them)."""
        out: list[Msg] = []
        for key in keys:
            out.extend(self.cancel_key(key, client, force=force, stimulus_id=stimulus_id))
        return out

    def cancel_key(self, key: Key, client: str, force: bool = False, stimulus_id: str = "cancel") -> list[Msg]:
        """Cancel one key and its dependents for ``client``."""
        ts = self.tasks.get(key)
        cs = self.clients.get(client)
        if ts is None or cs is None:
            return []
        out: list[Msg] = []
        for dts in list(ts.dependents):
            out.extend(self.cancel_key(dts.key, client, force, stimulus_id))
        if force or ts.who_wants == {cs}:
            wanters = [c.client_key for c in ts.who_wants]
            for c in list(ts.who_wants):
                c.wants_what.discard(ts)
            ts.who_wants.clear()
            for c in wanters:
                out.append(CancelledKeyMsg(stimulus_id, c, key, "cancelled"))
            if not ts.dependents:
                out.extend(self.transitions({key: "forgotten"}, stimulus_id))
            elif not ts.waiters:
                # Kept for other dependents (of other clients) that are done with it.
                out.extend(self.transitions({key: "released"}, stimulus_id))
        elif cs in ts.who_wants:
            out.append(CancelledKeyMsg(stimulus_id, client, key, "cancelled"))
            out.extend(self.client_releases_keys([key], client, stimulus_id))
        return out

    # ------------------------------------------------------------------ data entering from outside

    def update_data(self, who_has: dict[Key, Iterable[str]], nbytes: dict[Key, int] | None = None,
                    client: str | None = None, types: dict[Key, str] | None = None,
                    stimulus_id: str = "update-data") -> list[Msg]:
        """Data was put on workers from outside (``scatter``)."""
        nbytes = nbytes or {}
        types = types or {}
        out: list[Msg] = []
        for key, workers in who_has.items():
            wss = [self.workers[w] for w in workers if w in self.workers]
            if not wss:
                continue
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, None)
                ts.priority = (0, next(self._priority_counter))
            if ts.state != "memory":
                if ts.state not in ("released", "waiting"):
                    recs = self.transition(key, "released", stimulus_id)
                    recs.pop(key, None)  # it goes to memory instead
                    out.extend(self.transitions(recs, stimulus_id))
                ts.nbytes = nbytes.get(key, -1)
                ts.type = types.get(key, "")
                recs = self.transition(key, "memory", stimulus_id, workers=wss)
                out.extend(self.transitions(recs, stimulus_id))
            else:
                for ws in wss:
                    self._add_replica(ts, ws)
            if client is not None:
                cs = self.add_client(client)
                ts.who_wants.add(cs)
                cs.wants_what.add(ts)
        if self.validate:
            self.validate_state()
        return out

    # ------------------------------------------------------------------ placement

    def valid_workers(self, ts: TaskState) -> set[WorkerState] | None:
        """Workers allowed to run ``ts``; ``None`` means any worker.

        Applies worker, host and resource restrictions.
        """
        s: set[WorkerState] | None = None
        if ts.worker_restrictions:
            s = {self.workers[w] for w in ts.worker_restrictions if w in self.workers}
        if ts.host_restrictions:
            hs = {self.workers[a] for h in ts.host_restrictions
                  for a in self.host_info.get(h, {}).get("addresses", ())}
            s = hs if s is None else s | hs
        if ts.resource_restrictions:
            rs = {ws for ws in self.workers.values()
                  if all(ws.resources.get(r, 0) >= q for r, q in ts.resource_restrictions.items())}
            s = rs if s is None else s & rs
        if s is None:
            return None
        return {ws for ws in s if ws.status == "running"}

    def _running_workers(self) -> list[WorkerState]:
        return [ws for ws in self.workers.values() if ws.status == "running"]

    def decide_worker(self, ts: TaskState) -> WorkerState | None:
        """The worker that should run ``ts``, or ``None`` if none can."""
        valid = self.valid_workers(ts)
        if valid is not None and not valid and ts.loose_restrictions:
            valid = None
            if ts.resource_restrictions:
                valid = {ws for ws in self._running_workers()
                         if all(ws.resources.get(r, 0) >= q for r, q in ts.resource_restrictions.items())}
        if valid is None:
            candidates: Iterable[WorkerState]
            holders = {ws for dts in ts.dependencies for ws in dts.who_has if ws.status == "running"}
            if holders and len(holders) < len(self.workers):
                candidates = holders
            else:
                candidates = self._running_workers()
        else:
            candidates = valid
        best = None
        best_obj = None
        for ws in candidates:
            obj = self.worker_objective(ts, ws)
            if best_obj is None or obj < best_obj:
                best, best_obj = ws, obj
        return best

    def worker_objective(self, ts: TaskState, ws: WorkerState) -> tuple:
        """Expected start time of ``ts`` on ``ws`` (queue wait + transfer), ties by stored bytes."""
        return (ws.occupancy / ws.nthreads + self.get_comm_cost(ts, ws), ws.nbytes)

    def get_comm_cost(self, ts: TaskState, ws: WorkerState) -> float:
        """Seconds to move the dependencies of ``ts`` that ``ws`` lacks."""
        nbytes = sum(dts.get_nbytes() for dts in ts.dependencies if ws not in dts.who_has)
        return nbytes / BANDWIDTH

    def get_task_duration(self, ts: TaskState, default: float = DEFAULT_TASK_DURATION) -> float:
        """Expected compute time of ``ts``, from what its prefix took before."""
        return self.task_duration.get(ts.prefix, default)

    def _ready_target(self, ts: TaskState) -> str:
        if not ts.dependencies and not (ts.worker_restrictions or ts.host_restrictions or ts.resource_restrictions):
            return "queued"
        return "processing"

    def _fill_workers(self, stimulus_id: str) -> None:
        """Hand queued tasks to workers with room, highest priority first."""
        queue = self.queued
        if not queue:
            return
        while queue:
            candidates = [ws for ws in self.workers.values() if ws.status == "running" and self._has_room(ws)]
            if not candidates:
                return
            progressed = False
            for ws in sorted(candidates, key=lambda w: w.occupancy / w.nthreads):
                while queue and self._has_room(ws):
                    _, _, ts = heapq.heappop(queue)
                    if ts.state != "queued":
                        continue
                    self.transition(ts.key, "processing", stimulus_id, worker=ws)
                    progressed = True
                    # Enough for now: spread the queue across workers.
                    if len(ws.processing) >= 2 * ws.nthreads and len(candidates) > 1:
                        break
            if not progressed:
                return

    # ------------------------------------------------------------------ replicas

    def _add_replica(self, ts: TaskState, ws: WorkerState) -> None:
        if ws not in ts.who_has:
            ts.who_has.add(ws)
            ws.has_what[ts] = None
            ws.nbytes += ts.get_nbytes()

    def _remove_replica(self, ts: TaskState, ws: WorkerState) -> None:
        if ws in ts.who_has:
            ts.who_has.discard(ws)
            del ws.has_what[ts]
            ws.nbytes -= ts.get_nbytes()

    def _remove_from_processing(self, ts: TaskState) -> WorkerState | None:
        ws = ts.processing_on
        if ws is None:
            return None
        ts.processing_on = None
        dur = ws.processing.pop(ts, 0.0)
        ws.occupancy -= dur
        if not ws.processing:
            ws.occupancy = 0.0  # drop float drift
        if ts.long_running:
            ws.long_running.discard(ts)
            ts.long_running = False
        if ws.address in self.workers:
            self.check_idle_saturated(ws)
        return ws

    def _report_memory(self, ts: TaskState, stimulus_id: str, data: bytes | None = None) -> None:
        workers = [ws.address for ws in ts.who_has]
        for cs in ts.who_wants:
            self._instructions.append(KeyInMemoryMsg(stimulus_id, cs.client_key, ts.key, ts.type or "",
                                                     workers, data))

    def _free_everywhere(self, ts: TaskState, stimulus_id: str) -> None:
        for ws in list(ts.who_has):
            self._remove_replica(ts, ws)
            self._instructions.append(FreeKeysMsg(stimulus_id, ws.address, [ts.key]))

    # ------------------------------------------------------------------ transition functions

    def _released_waiting(self, ts: TaskState, stimulus_id: str) -> dict:
        recs: dict[Key, str] = {}
        if ts.run_spec is None:
            ts.exception = ts.exception or ScatteredDataLost(ts.key)
            ts.traceback = ts.traceback or ""
            ts.state = "waiting"
            recs[ts.key] = "erred"
            return recs
        ts.state = "waiting"
        ts.waiting_on.clear()
        for dts in ts.dependencies:
            if dts.state == "erred":
                ts.exception_blame = dts.exception_blame or dts
                recs[ts.key] = "erred"
                return recs
        for dts in ts.dependencies:
            dts.waiters.add(ts)
            if dts.state != "memory":
                ts.waiting_on.add(dts)
                if dts.state == "released":
                    recs[dts.key] = "waiting"
        if not ts.waiting_on:
            recs[ts.key] = self._ready_target(ts)
        return recs

    def _waiting_queued(self, ts: TaskState, stimulus_id: str) -> dict:
        ts.state = "queued"
        heapq.heappush(self.queued, (ts.priority, next(self._queue_counter), ts))
        return {}

    def _waiting_no_worker(self, ts: TaskState, stimulus_id: str) -> dict:
        ts.state = "no-worker"
        self.unrunnable.add(ts)
        return {}

    def _ready_processing(self, ts: TaskState, stimulus_id: str, worker: WorkerState | None = None) -> dict:
        ws = worker or self.decide_worker(ts)
        if ws is None:
            # No valid worker: the state does not change; park it instead.
            return {} if ts.state == "queued" else {ts.key: "no-worker"}
        if ts.state == "no-worker":
            self.unrunnable.discard(ts)
        ts.state = "processing"
        ts.processing_on = ws
        duration = self.get_task_duration(ts) + self.get_comm_cost(ts, ws)
        ws.processing[ts] = duration
        ws.occupancy += duration
        self.check_idle_saturated(ws)
        who_has = {}
        nbytes = {}
        for dts in ts.dependencies:
            who_has[dts.key] = [w.address for w in dts.who_has]
            nbytes[dts.key] = dts.get_nbytes()
        self._instructions.append(ComputeTaskMsg(
            stimulus_id, ws.address, ts.key, ts.run_spec, ts.priority, who_has, nbytes,
            duration, ts.resource_restrictions, bool(ts.who_wants),
        ))
        return {}

    def _processing_memory(self, ts: TaskState, stimulus_id: str, worker: WorkerState | None = None,
                           nbytes: int = -1, type: str = "", data: bytes | None = None) -> dict:
        ws = self._remove_from_processing(ts)
        ws = worker or ws
        recs: dict[Key, str] = {}
        ts.state = "memory"
        ts.nbytes = nbytes
        ts.type = type
        ts.suspicious = 0
        if ws is not None:
            self._add_replica(ts, ws)
        self._memory_consequences(ts, recs)
        self._report_memory(ts, stimulus_id, data)
        return recs

    def _memory_consequences(self, ts: TaskState, recs: dict) -> None:
        for dts in ts.dependents:
            if ts in dts.waiting_on:
                dts.waiting_on.discard(ts)
                if not dts.waiting_on and dts.state == "waiting":
                    recs[dts.key] = self._ready_target(dts)
        for dts in ts.dependencies:
            dts.waiters.discard(ts)
            if not dts.waiters and not dts.who_wants and dts.state == "memory":
                recs[dts.key] = "released"
        if not ts.waiters and not ts.who_wants:
            recs[ts.key] = "released" if ts.dependents else "forgotten"

    def _to_memory_external(self, ts: TaskState, stimulus_id: str, workers: Iterable[WorkerState] = ()) -> dict:
        """Data put there from outside (scatter) or found again."""
        if ts.state == "waiting":
            for dts in ts.dependencies:
                dts.waiters.discard(ts)
            ts.waiting_on.clear()
        ts.state = "memory"
        for ws in workers:
            self._add_replica(ts, ws)
        recs: dict[Key, str] = {}
        for dts in ts.dependents:
            if ts in dts.waiting_on:
                dts.waiting_on.discard(ts)
                if not dts.waiting_on and dts.state == "waiting":
                    recs[dts.key] = self._ready_target(dts)
        self._report_memory(ts, stimulus_id)
        return recs

    def _processing_released(self, ts: TaskState, stimulus_id: str) -> dict:
        ws = self._remove_from_processing(ts)
        if ws is not None and ws.address in self.workers:
            self._instructions.append(FreeKeysMsg(stimulus_id, ws.address, [ts.key]))
        return self._released_common(ts)

    def _released_common(self, ts: TaskState) -> dict:
        ts.state = "released"
        for dts in ts.dependencies:
            dts.waiters.discard(ts)
        ts.waiting_on.clear()
        recs: dict[Key, str] = {}
        if ts.who_wants or ts.waiters:
            # Still needed: it goes back to waiting and needs its inputs again.
            recs[ts.key] = "waiting"
            return recs
        if not ts.dependents:
            recs[ts.key] = "forgotten"
        for dts in ts.dependencies:
            # Inputs nobody else waits for stop using memory or workers; they are
            # forgotten once their last dependent is.
            if not dts.waiters and not dts.who_wants and dts.state in (
                "memory", "erred", "waiting", "queued", "no-worker", "processing"
            ):
                recs[dts.key] = "released"
        return recs

    def _waiting_released(self, ts: TaskState, stimulus_id: str) -> dict:
        return self._released_common(ts)

    def _queued_released(self, ts: TaskState, stimulus_id: str) -> dict:
        # The heap entry is dropped lazily when popped.
        return self._released_common(ts)

    def _no_worker_released(self, ts: TaskState, stimulus_id: str) -> dict:
        self.unrunnable.discard(ts)
        return self._released_common(ts)

    def _memory_released(self, ts: TaskState, stimulus_id: str) -> dict:
        self._free_everywhere(ts, stimulus_id)
        recs: dict[Key, str] = {}
        for cs in ts.who_wants:
            self._instructions.append(LostDataMsg(stimulus_id, cs.client_key, ts.key))
        for dts in ts.dependents:
            if dts.state == "waiting":
                dts.waiting_on.add(ts)
            elif dts.state in ("processing", "no-worker"):
                # Its input is gone: place it again once the input is back.
                recs[dts.key] = "waiting"
        recs.update(self._released_common(ts))
        return recs

    def _erred_released(self, ts: TaskState, stimulus_id: str) -> dict:
        ts.exception = None
        ts.traceback = None
        ts.exception_blame = None
        recs = self._released_common(ts)
        for dts in ts.dependents:
            if dts.state == "erred":
                recs[dts.key] = "released"
        return recs

    def _released_forgotten(self, ts: TaskState, stimulus_id: str) -> dict:
        if ts.dependents or ts.who_wants or ts.waiters:
            return {}  # needed again since this was recommended: stay released
        recs: dict[Key, str] = {}
        for dts in ts.dependencies:
            dts.dependents.discard(ts)
            dts.waiters.discard(ts)
            if not dts.dependents and not dts.who_wants:
                recs[dts.key] = "forgotten"
        for dts in ts.dependents:  # pragma: no cover - forgotten only without dependents
            dts.dependencies.discard(ts)
        for cs in ts.who_wants:
            cs.wants_what.discard(ts)
        ts.who_wants.clear()
        ts.dependencies.clear()
        ts.state = "forgotten"
        self.unrunnable.discard(ts)
        del self.tasks[ts.key]
        return recs

    def _erred_common(self, ts: TaskState, stimulus_id: str) -> dict:
        ts.state = "erred"
        if ts.exception_blame is None:
            ts.exception_blame = ts
        blame = ts.exception_blame
        worker = next(iter(blame.erred_on), "") if blame.erred_on else ""
        for cs in ts.who_wants:
            self._instructions.append(TaskErredClientMsg(
                stimulus_id, cs.client_key, ts.key, blame.exception, blame.traceback or "", worker))
        recs: dict[Key, str] = {}
        for dts in ts.dependents:
            if dts.state in ("waiting", "queued", "no-worker", "released", "processing"):
                dts.exception_blame = blame
                recs[dts.key] = "erred"
        for dts in ts.dependencies:
            dts.waiters.discard(ts)
            if not dts.waiters and not dts.who_wants and dts.state == "memory":
                recs[dts.key] = "released"
        ts.waiting_on.clear()
        return recs

    def _processing_erred(self, ts: TaskState, stimulus_id: str) -> dict:
        ws = self._remove_from_processing(ts)
        if ws is not None and ws.address in self.workers and ts.exception_blame not in (None, ts):
            self._instructions.append(FreeKeysMsg(stimulus_id, ws.address, [ts.key]))
        return self._erred_common(ts, stimulus_id)

    def _waiting_erred(self, ts: TaskState, stimulus_id: str) -> dict:
        return self._erred_common(ts, stimulus_id)

    def _queued_erred(self, ts: TaskState, stimulus_id: str) -> dict:
        return self._erred_common(ts, stimulus_id)

    def _no_worker_erred(self, ts: TaskState, stimulus_id: str) -> dict:
        self.unrunnable.discard(ts)
        return self._erred_common(ts, stimulus_id)

    def _released_erred(self, ts: TaskState, stimulus_id: str) -> dict:
        return self._erred_common(ts, stimulus_id)

    # ------------------------------------------------------------------ validation

    def validate_task(self, ts: TaskState) -> None:
        """Check the invariants of one task's state.

        Raises:
            InvalidStateError: naming the task and the broken invariant.
        """
        def check(cond: bool, what: str) -> None:
            if not cond:
                raise InvalidStateError(f"{ts!r}: {what}; story={self.story(ts.key)[-5:]}")

        s = ts.state
        check(s in {"released", "waiting", "queued", "no-worker", "processing", "memory", "erred"},
              f"unknown state {s}")
        check(self.tasks.get(ts.key) is ts, "not in tasks")
        if s != "processing":
            check(ts.processing_on is None, "processing_on set outside processing")
        if s != "memory":
            check(not ts.who_has, "who_has set outside memory")
        if s == "waiting":
            check(ts.waiting_on <= ts.dependencies, "waiting_on not a subset of dependencies")
            check(all(d.state != "memory" for d in ts.waiting_on), "waiting on data in memory")
        if s in ("queued", "processing", "no-worker"):
            check(not ts.waiting_on, f"{s} with unmet dependencies")
            check(all(d.state == "memory" for d in ts.dependencies), f"{s} with a dependency not in memory")
        if s == "processing":
            ws = ts.processing_on
            check(ws is not None and ts in ws.processing, "not in its worker's processing")
            check(ws is not None and ws.address in self.workers, "processing on an unknown worker")
        if s == "memory":
            check(bool(ts.who_has), "in memory nowhere")
            check(all(ts in ws.has_what for ws in ts.who_has), "who_has/has_what disagree")
        if s == "no-worker":
            check(ts in self.unrunnable, "no-worker but not in unrunnable")
        if s == "erred":
            check(ts.exception_blame is not None, "erred without blame")
        for cs in ts.who_wants:
            check(ts in cs.wants_what, "who_wants/wants_what disagree")

    def validate_state(self) -> None:
        """Check every task, worker and client.

        Raises:
            InvalidStateError: naming what is broken.
        """
        for ts in self.tasks.values():
            self.validate_task(ts)
        for ws in self.workers.values():
            for ts in ws.processing:
                if ts.processing_on is not ws or ts.state != "processing":
                    raise InvalidStateError(f"{ws!r} lists {ts!r} as processing")
            for ts in ws.has_what:
                if ws not in ts.who_has:
                    raise InvalidStateError(f"{ws!r} lists {ts!r} in memory")
            occ = sum(ws.processing.values())
            if abs(occ - ws.occupancy) > 1e-6 * max(1.0, occ):
                raise InvalidStateError(f"{ws!r} occupancy {ws.occupancy} != {occ}")
        for ts in self.unrunnable:
            if ts.state != "no-worker":
                raise InvalidStateError(f"{ts!r} in unrunnable")
        nthreads = sum(ws.nthreads for ws in self.workers.values())
        if nthreads != self.total_nthreads:
            raise InvalidStateError(f"total_nthreads {self.total_nthreads} != {nthreads}")
