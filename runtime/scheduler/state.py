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
that load follows real progress; so is a *root-ish* task, one of a large group
of siblings that together read only a few inputs (chunks sliced from one
array; see :meth:`Placement.mark_rootish`).  This is what keeps a
reduction over more data than the workers' memory streaming: the inputs are
made only as fast as the reductions consume them, in priority order (a dask
graph's priorities are :func:`dask.order.order`'s).  A task with dependencies
or restrictions goes
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
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ..errors import InvalidStateError, InvalidTransition, ScatteredDataLost
from ..statemachine import Msg, TransitionLog
from . import validation
from .placement import (  # noqa: F401  (re-exported)
    BANDWIDTH,
    DEFAULT_TASK_DURATION,
    MAX_TASKS_PER_THREAD,
    SATURATION_SECONDS,
    Placement,
)
from .records import (  # noqa: F401  (re-exported)
    AcquireReplicasMsg,
    CancelledKeyMsg,
    ClientState,
    ComputeTaskMsg,
    FreeKeysMsg,
    KeyInMemoryMsg,
    LostDataMsg,
    RefreshWhoHasMsg,
    TaskErredClientMsg,
    TaskState,
    WorkerState,
)
from .records import lazy_add as _add
from .records import lazy_discard as _discard
from .records import members as _members
from .records import one_add as _one_add
from .records import one_discard as _one_discard
from .stimuli import HANDLERS

logger = logging.getLogger(__name__)

Key = Hashable

_intern = sys.intern
#: The recommendations logged for a transition that made none (shared: never mutated).
_NO_RECS: dict = {}


# ----------------------------------------------------------------------------- the machine


#: The pseudo-client of ``fire_and_forget`` (:mod:`cluster.runtime.extensions.fire_and_forget`): the
#: tasks it holds are let go of when they finish or fail.
FIRE_AND_FORGET = "fire-and-forget"


class SchedulerState:
    """The scheduler's state and its transition table (no IO).

    Args:
        validate: check every invariant after each step (on in all tests).
        allowed_failures: how many workers may die while running a task before
            it fails with :class:`KilledWorker`.
        clock: source of time, injected so that tests control it.
        transition_log_length: entries kept for ``story``.
        worker_ttl: seconds without a heartbeat after which a tick removes a worker.
        idle_timeout: seconds without work after which a tick asks to close.
    """

    def __init__(self, validate: bool = False, allowed_failures: int = 3,
                 clock: Callable[[], float] = time.monotonic,
                 transition_log_length: int = 100_000, worker_ttl: float | None = None,
                 idle_timeout: float | None = None):
        self.validate = validate
        self.allowed_failures = allowed_failures
        self.clock = clock
        #: Remove a worker not heard from for this long (seconds; ``None``: never).
        self.worker_ttl = worker_ttl
        #: Ask to close after this long without work (seconds; ``None``: never).
        self.idle_timeout = idle_timeout
        #: When the scheduler last had work, on the clock of :class:`TickEvent`.
        self.last_activity: float | None = None
        #: A graph arrived since the last tick (counts as activity then).
        self._new_work = False
        self._last_reevaluation: float | None = None
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
        #: Graphs that arrive within their ``fifo_timeout`` of the start of the current
        #: generation share it (their tasks interleave by graph order); later ones
        #: start a new generation, which runs after (dask's ``fifo_timeout``).
        self.generation = 0
        self._generation_time: float | None = None
        self._queue_counter = itertools.count()
        self._instructions: list[Msg] = []
        #: Which worker runs a task, and when (a part with its own methods).
        self.placement = Placement(self)
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
        if ts is None:
            return {}
        start = ts.state
        if start == finish:
            return {}
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
            # _log, inlined: this runs a few times per task.
            self.transition_counter += 1
            self.log.entries.append((key, start, ts.state, dict(recs) if recs else _NO_RECS,
                                      stimulus_id, self.clock()))
        if self.validate and ts.state != "forgotten":
            validation.validate_task(self, ts)
        return recs

    def _log(self, ts: TaskState, start: str, finish: str, recs: dict, stimulus_id: str) -> None:
        self.transition_counter += 1
        # Most transitions recommend nothing: they share one empty dict (never mutated).
        self.log.append(ts.key, start, finish, dict(recs) if recs else _NO_RECS, stimulus_id,
                        self.clock())

    def transitions(self, recommendations: dict[Key, str], stimulus_id: str = "") -> list[Msg]:
        """Carry out recommendations and their consequences until none are left.

        Returns the instructions produced (and clears the pending list).
        """
        if recommendations:
            recs = dict(recommendations)
            transition = self.transition
            while recs:
                key, finish = recs.popitem()
                new = transition(key, finish, stimulus_id)
                if new:
                    recs.update(new)
        if self.queued:
            self.placement.fill_workers(stimulus_id)
        if self.validate:
            validation.validate_state(self)
        out, self._instructions = self._instructions, []
        return out

    def story(self, *keys: Key) -> list[tuple]:
        """Every recorded transition that touches one of ``keys``."""
        return self.log.story(*keys)

    transition_story = story

    def handle(self, *events: Any) -> list:
        """The one way in: each event (see :mod:`cluster.runtime.scheduler.events`) goes to its
        handler in :data:`cluster.runtime.scheduler.stimuli.HANDLERS`; the instructions come out.

        Raises:
            TypeError: an object that is not a scheduler event.
        """
        out: list = []
        for ev in events:
            handler = HANDLERS.get(type(ev))
            if handler is None:
                raise TypeError(f"not a scheduler event: {ev!r}")
            out.extend(handler(self, ev))
        return out

    # ------------------------------------------------------------------ replicas

    def _add_replica(self, ts: TaskState, ws: WorkerState) -> None:
        if _one_add(ts, "_who_has", ws):
            ws.has_what[ts] = None
            ws.nbytes += ts.get_nbytes()

    def _remove_replica(self, ts: TaskState, ws: WorkerState) -> None:
        if _one_discard(ts, "_who_has", ws):
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
            self.placement.check_idle_saturated(ws)
        return ws

    def _report_memory(self, ts: TaskState, stimulus_id: str, data: bytes | None = None) -> None:
        wanters = ts._who_wants
        if not wanters:
            return
        workers = [ws.address for ws in _members(ts._who_has)]
        for cs in _members(wanters):
            self._instructions.append(KeyInMemoryMsg(stimulus_id, cs.client_key, ts.key, ts.type or "",
                                                     workers, data))

    def _free_everywhere(self, ts: TaskState, stimulus_id: str) -> None:
        for ws in list(_members(ts._who_has)):
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
        ts._waiting_on = None
        deps = ts._dependencies
        if deps:
            for dts in deps:
                if dts.state == "erred":
                    ts.exception_blame = dts.exception_blame or dts
                    recs[ts.key] = "erred"
                    return recs
            waiting_on = None
            for dts in deps:
                _add(dts, "_waiters", ts)
                if dts.state != "memory":
                    if waiting_on is None:
                        waiting_on = ts._waiting_on = set()
                    waiting_on.add(dts)
                    if dts.state == "released":
                        recs[dts.key] = "waiting"
            if waiting_on:
                return recs
        recs[ts.key] = self.placement.ready_target(ts)
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
        ws = worker or self.placement.decide_worker(ts)
        if ws is None:
            # No valid worker: the state does not change; park it instead.
            return {} if ts.state == "queued" else {ts.key: "no-worker"}
        if ts.state == "no-worker":
            self.unrunnable.discard(ts)
        ts.state = "processing"
        ts.processing_on = ws
        deps = ts._dependencies
        duration = self.task_duration.get(ts.prefix, DEFAULT_TASK_DURATION)
        if deps:
            duration += self.placement.get_comm_cost(ts, ws)
        ws.processing[ts] = duration
        ws.occupancy += duration
        self.placement.check_idle_saturated(ws)
        who_has = {}
        nbytes = {}
        if deps:
            for dts in deps:
                who_has[dts.key] = [w.address for w in _members(dts._who_has)]
                nbytes[dts.key] = dts.get_nbytes()
        self._instructions.append(ComputeTaskMsg(
            stimulus_id, ws.address, ts.key, ts.run_spec, ts.priority, who_has, nbytes,
            duration, ts.resource_restrictions, bool(ts._who_wants),
        ))
        return {}

    def _processing_memory(self, ts: TaskState, stimulus_id: str, worker: WorkerState | None = None,
                           nbytes: int = -1, type: str = "", data: bytes | None = None) -> dict:
        ws = self._remove_from_processing(ts)
        ws = worker or ws
        recs: dict[Key, str] = {}
        ts.state = "memory"
        ts.nbytes = nbytes
        # One string per type name, not one per task (each message decodes its own).
        ts.type = _intern(type) if type.__class__ is str else type
        ts.suspicious = 0
        if ws is not None:
            self._add_replica(ts, ws)
        self._let_go_fire_and_forget(ts)
        self._memory_consequences(ts, recs)
        self._report_memory(ts, stimulus_id, data)
        return recs

    def _let_go_fire_and_forget(self, ts: TaskState) -> bool:
        """The task finished or failed: if ``fire_and_forget`` held it, it holds it no more
        (dask's meaning: its result is kept only if someone else wants it).

        Returns:
            Whether it was held so.
        """
        cs = self.clients.get(FIRE_AND_FORGET)
        if cs is None or not _one_discard(ts, "_who_wants", cs):
            return False
        cs.wants_what.discard(ts)
        return True

    def _unblock_dependents(self, ts: TaskState, recs: dict) -> None:
        """``ts`` is in memory: dependents that waited only on it are ready."""
        for dts in ts._dependents or ():
            waiting_on = dts._waiting_on
            if waiting_on is not None and ts in waiting_on:
                waiting_on.discard(ts)
                if not waiting_on:
                    dts._waiting_on = None
                    if dts.state == "waiting":
                        recs[dts.key] = self.placement.ready_target(dts)

    def _memory_consequences(self, ts: TaskState, recs: dict) -> None:
        self._unblock_dependents(ts, recs)
        for dts in ts._dependencies or ():
            _discard(dts, "_waiters", ts)
            if not dts._waiters and not dts._who_wants and dts.state == "memory":
                recs[dts.key] = "released"
        if not ts._waiters and not ts._who_wants:
            recs[ts.key] = "released" if ts._dependents else "forgotten"

    def _to_memory_external(self, ts: TaskState, stimulus_id: str, workers: Iterable[WorkerState] = ()) -> dict:
        """Data put there from outside (scatter) or found again."""
        if ts.state == "waiting":
            for dts in ts._dependencies or ():
                _discard(dts, "_waiters", ts)
            ts._waiting_on = None
        ts.state = "memory"
        for ws in workers:
            self._add_replica(ts, ws)
        recs: dict[Key, str] = {}
        self._unblock_dependents(ts, recs)
        self._report_memory(ts, stimulus_id)
        return recs

    def _processing_released(self, ts: TaskState, stimulus_id: str) -> dict:
        ws = self._remove_from_processing(ts)
        if ws is not None and ws.address in self.workers:
            self._instructions.append(FreeKeysMsg(stimulus_id, ws.address, [ts.key]))
        return self._released_common(ts)

    def _released_common(self, ts: TaskState) -> dict:
        ts.state = "released"
        deps = ts._dependencies or ()
        for dts in deps:
            _discard(dts, "_waiters", ts)
        ts._waiting_on = None
        recs: dict[Key, str] = {}
        if ts._who_wants or ts._waiters:
            # Still needed: it goes back to waiting and needs its inputs again.
            recs[ts.key] = "waiting"
            return recs
        if not ts._dependents:
            recs[ts.key] = "forgotten"
        for dts in deps:
            # Inputs nobody else waits for stop using memory or workers; they are
            # forgotten once their last dependent is.
            if not dts._waiters and not dts._who_wants and dts.state in (
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
        for cs in _members(ts._who_wants):
            self._instructions.append(LostDataMsg(stimulus_id, cs.client_key, ts.key))
        for dts in ts._dependents or ():
            if dts.state == "waiting":
                _add(dts, "_waiting_on", ts)
            elif dts.state in ("processing", "no-worker", "queued"):
                # Its input is gone: place it again once the input is back.
                recs[dts.key] = "waiting"
        recs.update(self._released_common(ts))
        return recs

    def _erred_released(self, ts: TaskState, stimulus_id: str) -> dict:
        ts.exception = None
        ts.traceback = None
        ts.exception_blame = None
        # A worker where it failed keeps the error until told to drop it.
        for address in ts._erred_on or ():
            if address in self.workers:
                self._instructions.append(FreeKeysMsg(stimulus_id, address, [ts.key]))
        ts._erred_on = None
        recs = self._released_common(ts)
        for dts in ts._dependents or ():
            if dts.state == "erred":
                recs[dts.key] = "released"
        return recs

    def _released_forgotten(self, ts: TaskState, stimulus_id: str) -> dict:
        if ts._dependents or ts._who_wants or ts._waiters:
            return {}  # needed again since this was recommended: stay released
        recs: dict[Key, str] = {}
        for dts in ts._dependencies or ():
            _discard(dts, "_dependents", ts)
            _discard(dts, "_waiters", ts)
            if not dts._dependents and not dts._who_wants:
                recs[dts.key] = "forgotten"
        for dts in ts._dependents or ():  # pragma: no cover - forgotten only without dependents
            _discard(dts, "_dependencies", ts)
        for cs in _members(ts._who_wants):
            cs.wants_what.discard(ts)
        ts._who_wants = None
        ts._dependencies = None
        ts.state = "forgotten"
        self.unrunnable.discard(ts)
        del self.tasks[ts.key]
        return recs

    def _erred_common(self, ts: TaskState, stimulus_id: str) -> dict:
        ts.state = "erred"
        if ts.exception_blame is None:
            ts.exception_blame = ts
        blame = ts.exception_blame
        worker = next(iter(blame._erred_on)) if blame._erred_on else ""
        for cs in _members(ts._who_wants):
            self._instructions.append(TaskErredClientMsg(
                stimulus_id, cs.client_key, ts.key, blame.exception, blame.traceback or "", worker))
        recs: dict[Key, str] = {}
        if self._let_go_fire_and_forget(ts) and not ts._who_wants and not ts._dependents:
            recs[ts.key] = "forgotten"
        for dts in ts._dependents or ():
            if dts.state in ("waiting", "queued", "no-worker", "released", "processing"):
                dts.exception_blame = blame
                recs[dts.key] = "erred"
        for dts in ts._dependencies or ():
            _discard(dts, "_waiters", ts)
            if not dts._waiters and not dts._who_wants and dts.state == "memory":
                recs[dts.key] = "released"
        ts._waiting_on = None
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
