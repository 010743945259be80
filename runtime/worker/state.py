"""The worker's pure state machine.

Theory of operation
-------------------
The scheduler sends ``compute_task`` (with where each dependency lives) and
``free_keys``.  For each task the worker

1. marks dependencies it lacks as ``fetch`` and groups them by the peer that
   holds them; at most ``transfer_incoming_count_limit`` peers are asked at
   once (``GatherDep``), each for a batch of keys up to
   ``transfer_message_bytes_limit``;
2. once every dependency is in memory, puts the task in ``ready`` (a heap by
   priority) or ``constrained`` (when it needs abstract resources);
3. keeps up to ``nthreads`` tasks ``executing`` (``Execute``), and reports
   ``task_finished`` / ``task_erred``.

A task the scheduler releases while it runs or while its data is in flight is
``cancelled``: the thread cannot be stopped, so its result is discarded when
it arrives, unless the scheduler asks for the task again first.

States::

    released -> waiting -> ready | constrained -> executing -> memory | error
    released -> fetch -> flight -> memory        (dependencies)
    fetch -> missing (no known holder)           executing/flight -> cancelled

Events in, instructions out: the IO shell (:class:`cluster.runtime.worker.Worker`)
runs ``Execute`` in its thread pool, ``GatherDep`` over the network, and sends
the ``...Msg`` instructions to the scheduler.  The data itself lives in
``self.data`` (a mapping owned by the shell and passed in).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, MutableMapping
from typing import Any

from ..errors import InvalidTransition
from ..statemachine import Instruction, TransitionLog
from ..utils import key_split
from .events import (  # noqa: F401  (re-exported)
    AcquireReplicasEvent,
    AddKeysMsg,
    ComputeTaskEvent,
    Execute,
    ExecuteFailureEvent,
    ExecuteSuccessEvent,
    FreeKeysEvent,
    GatherDep,
    GatherDepFailureEvent,
    GatherDepNetworkFailureEvent,
    GatherDepSuccessEvent,
    LongRunningMsg,
    MissingDataMsg,
    PauseEvent,
    RefreshWhoHasEvent,
    ReleaseWorkerDataMsg,
    RemoveReplicasEvent,
    RescheduleEvent,
    RescheduleMsg,
    SecedeEvent,
    StateMachineEvent,
    TaskErredMsg,
    TaskFinishedMsg,
    UnpauseEvent,
    UpdateDataEvent,
)
from .validation import validate_state

logger = logging.getLogger(__name__)

Key = Hashable

# ----------------------------------------------------------------------------- task record


class TaskState:
    """One task (or dependency) as this worker sees it."""

    __slots__ = (
        "key", "prefix", "state", "run_spec", "priority", "dependencies", "dependents",
        "waiting_for_data", "who_has", "coming_from", "nbytes", "type", "duration",
        "resource_restrictions", "exception", "traceback", "startstops", "previous",
        "next", "done", "long_running", "report",
    )

    def __init__(self, key: Key):
        self.key = key
        self.prefix = key_split(key)
        self.state = "released"
        self.run_spec: bytes | None = None
        self.priority: tuple = ()
        self.dependencies: set[TaskState] = set()
        self.dependents: set[TaskState] = set()
        self.waiting_for_data: set[TaskState] = set()
        self.who_has: set[str] = set()
        self.coming_from: str | None = None
        self.nbytes = -1
        self.type = ""
        self.duration = 0.5
        self.resource_restrictions: dict | None = None
        self.exception: Any = None
        self.traceback = ""
        self.startstops: list = []
        self.previous: str | None = None  # state before "cancelled"
        self.next: str | None = None  # what to become when a cancelled run ends
        self.done = False
        self.long_running = False
        self.report = False

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state}>"

    def __lt__(self, other: TaskState) -> bool:
        return self.priority < other.priority

    def is_task(self) -> bool:
        return self.run_spec is not None


class WorkerStateMachine:
    """The worker's state and its transition table (no IO).

    Args:
        address: our own address (to skip ourselves when fetching).
        nthreads: how many tasks may execute at once.
        data: the mapping that holds results (owned by the shell).
        resources: abstract resources this worker has, e.g. ``{"GPU": 2}``.
        validate: check invariants after every step.
        transfer_incoming_count_limit: peers fetched from at once.
        transfer_message_bytes_limit: bytes asked of one peer in one request.
        clock: time source (injected for tests).
    """

    def __init__(self, address: str = "", nthreads: int = 1,
                 data: MutableMapping | None = None, resources: dict | None = None,
                 validate: bool = False, transfer_incoming_count_limit: int = 4,
                 transfer_message_bytes_limit: int = 50_000_000,
                 clock: Callable[[], float] = time.time,
                 transition_log_length: int = 100_000):
        self.address = address
        self.nthreads = nthreads
        self.data: MutableMapping = data if data is not None else {}
        self.total_resources = dict(resources or {})
        self.available_resources = dict(resources or {})
        self.validate = validate
        self.transfer_incoming_count_limit = transfer_incoming_count_limit
        self.transfer_message_bytes_limit = transfer_message_bytes_limit
        self.clock = clock
        self.tasks: dict[Key, TaskState] = {}
        self.ready: list[TaskState] = []
        self.constrained: list[TaskState] = []
        self.executing: set[TaskState] = set()
        self.long_running: set[TaskState] = set()
        self.data_needed: dict[str, list[TaskState]] = defaultdict(list)
        self.in_flight_workers: dict[str, set[TaskState]] = {}
        self.in_flight_tasks: set[TaskState] = set()
        self.missing_dep_flight: set[TaskState] = set()
        self.comm_nbytes = 0
        self._flight_nbytes: dict[TaskState, int] = {}
        self.executed_count = 0
        self.running = True
        self.log = TransitionLog(transition_log_length)
        self.stimulus_log: list[str] = []
        self.TRANSITIONS: dict[tuple[str, str], Callable] = {
            ("released", "waiting"): self._released_waiting,
            ("released", "fetch"): self._released_fetch,
            ("released", "memory"): self._any_memory,
            ("released", "forgotten"): self._released_forgotten,
            ("waiting", "ready"): self._waiting_ready,
            ("waiting", "constrained"): self._waiting_constrained,
            ("waiting", "released"): self._generic_released,
            ("waiting", "error"): self._any_error,
            ("ready", "executing"): self._ready_executing,
            ("ready", "released"): self._ready_released,
            ("constrained", "executing"): self._ready_executing,
            ("constrained", "released"): self._constrained_released,
            ("executing", "memory"): self._executing_memory,
            ("executing", "error"): self._executing_error,
            ("executing", "released"): self._executing_cancelled,
            ("executing", "rescheduled"): self._executing_rescheduled,
            ("executing", "long-running"): self._executing_long_running,
            ("long-running", "memory"): self._executing_memory,
            ("long-running", "error"): self._executing_error,
            ("long-running", "released"): self._executing_cancelled,
            ("long-running", "rescheduled"): self._executing_rescheduled,
            ("fetch", "flight"): self._fetch_flight,
            ("fetch", "missing"): self._fetch_missing,
            ("fetch", "released"): self._fetch_released,
            ("fetch", "memory"): self._any_memory,
            ("missing", "fetch"): self._missing_fetch,
            ("missing", "released"): self._missing_released,
            ("missing", "memory"): self._any_memory,
            ("flight", "memory"): self._flight_memory,
            ("flight", "fetch"): self._flight_fetch,
            ("flight", "missing"): self._flight_missing,
            ("flight", "waiting"): self._flight_waiting,
            ("flight", "released"): self._flight_cancelled,
            ("flight", "error"): self._flight_error,
            ("cancelled", "released"): self._cancelled_released,
            ("cancelled", "waiting"): self._cancelled_resume,
            ("cancelled", "fetch"): self._cancelled_resume,
            ("memory", "released"): self._memory_released,
            ("error", "released"): self._error_released,
        }

    # ------------------------------------------------------------------ entry point

    def handle(self, *events: StateMachineEvent) -> list[Instruction]:
        """Apply events in order; return the instructions they produce."""
        out: list[Instruction] = []
        for ev in events:
            self.stimulus_log.append(ev.stimulus_id)
            if len(self.stimulus_log) > 10_000:
                del self.stimulus_log[:5_000]
            recs, instructions = getattr(self, ev.handler)(ev)
            out.extend(instructions)
            out.extend(self._transitions(recs, ev.stimulus_id))
            out.extend(self._ensure_communicating(ev.stimulus_id))
            out.extend(self._ensure_computing(ev.stimulus_id))
        if self.validate:
            validate_state(self)
        return out

    def story(self, *keys: Key) -> list[tuple]:
        """Every recorded transition that touches one of ``keys``."""
        return self.log.story(*keys)

    # ------------------------------------------------------------------ transitions

    def _transition(self, ts: TaskState, finish: str, stimulus_id: str, **kwargs) -> tuple[dict, list]:
        start = ts.state
        if start == finish:
            return {}, []
        func = self.TRANSITIONS.get((start, finish))
        if func is not None:
            recs, instrs = func(ts, stimulus_id, **kwargs)
        elif (start, "released") in self.TRANSITIONS and (
            finish == "forgotten" or ("released", finish) in self.TRANSITIONS
        ):
            # Two steps through "released", each logged.
            recs, instrs = self.TRANSITIONS[(start, "released")](ts, stimulus_id)
            recs.pop(ts, None)
            self._log(ts, start, recs, stimulus_id)
            start = ts.state
            if start == "released":
                second = self._released_forgotten if finish == "forgotten" else self.TRANSITIONS[("released", finish)]
                recs2, instrs2 = second(ts, stimulus_id, **kwargs)
                recs = {**recs, **recs2}
                instrs = instrs + instrs2
                recs_logged = recs2
            else:
                recs_logged = {}
            self._log(ts, start, recs_logged, stimulus_id)
            return recs, instrs
        else:
            raise InvalidTransition(ts.key, start, finish, tuple(self.log.story(ts.key)))
        self._log(ts, start, recs, stimulus_id)
        return recs, instrs

    def _log(self, ts: TaskState, start: str, recs: dict, stimulus_id: str) -> None:
        if ts.state != start:
            self.log.append(ts.key, start, ts.state,
                            {getattr(k, "key", k): (v[0] if isinstance(v, tuple) else v) for k, v in recs.items()},
                            stimulus_id, self.clock())

    def _transitions(self, recs: dict, stimulus_id: str) -> list[Instruction]:
        out: list[Instruction] = []
        recs = dict(recs)
        while recs:
            ts, finish = recs.popitem()
            if isinstance(finish, tuple):
                finish, kwargs = finish
            else:
                kwargs = {}
            new, instrs = self._transition(ts, finish, stimulus_id, **kwargs)
            out.extend(instrs)
            recs.update(new)
        return out

    def _ensure_task(self, key: Key, priority: tuple = ()) -> TaskState:
        ts = self.tasks.get(key)
        if ts is None:
            ts = self.tasks[key] = TaskState(key)
            ts.priority = priority
        return ts

    # ------------------------------------------------------------------ handlers

    def _handle_compute_task(self, ev: ComputeTaskEvent) -> tuple[dict, list]:
        ts = self.tasks.get(ev.key)
        recs: dict = {}
        instrs: list = []
        if ts is not None and ts.state == "memory":
            # Already have it (e.g. fetched as a dependency): report at once.
            instrs.append(TaskFinishedMsg(ev.stimulus_id, ts.key, ts.nbytes, ts.type, []))
            return recs, instrs
        if ts is not None and ts.state in ("executing", "long-running", "waiting", "ready", "constrained"):
            return recs, instrs  # duplicate request
        ts = self._ensure_task(ev.key)
        ts.run_spec = ev.run_spec
        ts.priority = ev.priority
        ts.duration = ev.duration
        ts.resource_restrictions = ev.resource_restrictions
        ts.report = ev.report
        for dep_key, holders in ev.who_has.items():
            dts = self._ensure_task(dep_key, ev.priority)
            self._add_holders(dts, holders)
            if ev.nbytes.get(dep_key, -1) >= 0 and dts.nbytes < 0:
                dts.nbytes = ev.nbytes[dep_key]
            ts.dependencies.add(dts)
            dts.dependents.add(ts)
        if ts.state == "flight":
            # Already on its way as a dependency: report it when it lands.
            return recs, instrs
        recs[ts] = "waiting"  # from fetch/missing this passes through released
        return recs, instrs

    def _handle_free_keys(self, ev: FreeKeysEvent) -> tuple[dict, list]:
        recs: dict = {}
        freed = {self.tasks[k] for k in ev.keys if k in self.tasks}
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            # A dependency still needed by a task here that has not started must
            # stay (a running task already holds its inputs).
            if any(d.state in ("waiting", "ready", "constrained") and d not in freed for d in ts.dependents):
                if ts.state in ("executing", "long-running", "waiting", "ready", "constrained"):
                    recs[ts] = "released"
                continue
            recs[ts] = "forgotten"
        return recs, []

    def _handle_execute_success(self, ev: ExecuteSuccessEvent) -> tuple[dict, list]:
        ts = self.tasks.get(ev.key)
        if ts is None:
            return {}, []
        ts.startstops.append(("compute", ev.start, ev.stop))
        ts.nbytes = ev.nbytes
        ts.type = ev.type
        ts.done = True
        if ts.state == "cancelled":
            return {ts: "released"}, []  # nobody wants this result any more
        return {ts: ("memory", {"value": ev.value})}, []

    def _handle_execute_failure(self, ev: ExecuteFailureEvent) -> tuple[dict, list]:
        ts = self.tasks.get(ev.key)
        if ts is None:
            return {}, []
        ts.startstops.append(("compute", ev.start, ev.stop))
        ts.exception = ev.exception
        ts.traceback = ev.traceback
        ts.done = True
        if ts.state == "cancelled":
            return {ts: "released"}, []
        return {ts: "error"}, []

    def _handle_reschedule(self, ev: RescheduleEvent) -> tuple[dict, list]:
        ts = self.tasks.get(ev.key)
        if ts is None:
            return {}, []
        ts.done = True
        if ts.state == "cancelled":
            return {ts: "released"}, []
        return {ts: "rescheduled"}, []

    def _handle_secede(self, ev: SecedeEvent) -> tuple[dict, list]:
        ts = self.tasks.get(ev.key)
        if ts is None or ts.state != "executing":
            return {}, []
        return {ts: ("long-running", {"compute_duration": ev.compute_duration})}, []

    def _handle_gather_dep_success(self, ev: GatherDepSuccessEvent) -> tuple[dict, list]:
        recs: dict = {}
        instrs: list = []
        for ts in self._landed(ev.worker):
            if ts.state == "cancelled":
                recs[ts] = "released"
            elif ts.key in ev.data:
                if ev.nbytes.get(ts.key, -1) >= 0:
                    ts.nbytes = ev.nbytes[ts.key]
                recs[ts] = ("memory", {"value": ev.data[ts.key]})
            else:
                # The peer did not have it after all: tell the scheduler.
                ts.who_has.discard(ev.worker)
                instrs.append(MissingDataMsg(ev.stimulus_id, ts.key, ev.worker))
                recs[ts] = self._not_fetched(ts)
        return recs, instrs

    def _landed(self, worker: str) -> set[TaskState]:
        """The keys of the transfer from ``worker`` that just ended, no longer in flight."""
        keys = self.in_flight_workers.pop(worker, set())
        for ts in keys:
            self.in_flight_tasks.discard(ts)
            self.comm_nbytes -= self._flight_nbytes.pop(ts, 0)
            ts.coming_from = None
        return keys

    def _not_fetched(self, ts: TaskState) -> str:
        """Where a key goes when a transfer did not bring it."""
        if ts.state == "cancelled":
            return "released"
        if ts.run_spec is not None:
            return "waiting"  # we were asked to compute it meanwhile: do so
        return "fetch" if ts.who_has else "missing"

    def _handle_gather_dep_network_failure(self, ev: GatherDepNetworkFailureEvent) -> tuple[dict, list]:
        recs: dict = {}
        instrs: list = []
        keys = self._landed(ev.worker)
        # The peer is unreachable: forget it as a holder of everything.
        for ts in self.tasks.values():
            ts.who_has.discard(ev.worker)
        self.data_needed.pop(ev.worker, None)
        for ts in keys:
            instrs.append(MissingDataMsg(ev.stimulus_id, ts.key, ev.worker))
            recs[ts] = self._not_fetched(ts)
        for ts in self.tasks.values():
            if ts.state == "fetch" and not ts.who_has:
                recs[ts] = "missing"
        return recs, instrs

    def _handle_gather_dep_failure(self, ev: GatherDepFailureEvent) -> tuple[dict, list]:
        recs: dict = {}
        for ts in self._landed(ev.worker):
            ts.exception = ev.exception
            ts.traceback = ev.traceback
            recs[ts] = "released" if ts.state == "cancelled" else "error"
            # Tasks here that needed it cannot run: they fail with the same error.
            for dts in ts.dependents:
                if dts.state == "waiting":
                    dts.exception = ev.exception
                    dts.traceback = ev.traceback
                    recs[dts] = "error"
        return recs, []

    def _handle_update_data(self, ev: UpdateDataEvent) -> tuple[dict, list]:
        recs: dict = {}
        for key, value in ev.data.items():
            ts = self._ensure_task(key)
            ts.nbytes = ev.nbytes.get(key, -1)
            if ts.state in ("executing", "long-running", "flight"):
                continue
            if ts.state == "memory":
                self.data[key] = value  # a newer value for the same key
                continue
            recs[ts] = ("memory", {"value": value})
        return recs, []

    def _handle_refresh_who_has(self, ev: RefreshWhoHasEvent) -> tuple[dict, list]:
        recs: dict = {}
        for key, holders in ev.who_has.items():
            ts = self.tasks.get(key)
            if ts is None:
                continue
            holders = {w for w in holders if w != self.address}
            ts.who_has &= holders
            self._add_holders(ts, holders)
            if ts.state == "missing" and ts.who_has:
                recs[ts] = "fetch"
            elif ts.state == "fetch" and not ts.who_has:
                recs[ts] = "missing"
        return recs, []

    def _handle_pause(self, ev: PauseEvent) -> tuple[dict, list]:
        self.running = False
        return {}, []

    def _handle_unpause(self, ev: UnpauseEvent) -> tuple[dict, list]:
        self.running = True  # handle() then starts ready tasks again
        return {}, []

    def _handle_remove_replicas(self, ev: RemoveReplicasEvent) -> tuple[dict, list]:
        recs: dict = {}
        instrs: list = []
        kept: list = []
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state != "memory":
                continue
            if any(d.state in ("waiting", "ready", "constrained") for d in ts.dependents):
                # Still needed here: keep it, and have the scheduler count it again
                # (it may have stopped counting it: missing-data from a peer).
                kept.append(key)
                continue
            recs[ts] = "forgotten" if not ts.dependents else "released"
            instrs.append(ReleaseWorkerDataMsg(ev.stimulus_id, key))
        if kept:
            instrs.append(AddKeysMsg(ev.stimulus_id, kept))
        return recs, instrs

    def _handle_acquire_replicas(self, ev: AcquireReplicasEvent) -> tuple[dict, list]:
        recs: dict = {}
        for key, holders in ev.who_has.items():
            ts = self._ensure_task(key, (1,))
            self._add_holders(ts, holders)
            if ev.nbytes.get(key, -1) >= 0:
                ts.nbytes = ev.nbytes[key]
            if ts.state == "released":
                recs[ts] = "fetch"
        return recs, []

    def _add_holders(self, ts: TaskState, holders: Iterable[str]) -> None:
        """Learn more peers that hold ``ts``; a key waiting to be fetched queues for them too."""
        for w in holders:
            if w != self.address and w not in ts.who_has:
                ts.who_has.add(w)
                if ts.state == "fetch":
                    heapq.heappush(self.data_needed[w], ts)

    # ------------------------------------------------------------------ scheduling within the worker

    def _ensure_computing(self, stimulus_id: str) -> list[Instruction]:
        if not self.running:
            return []
        out: list[Instruction] = []
        while len(self.executing) < self.nthreads:
            if self.constrained and self._resources_available(self.constrained[0]) and (
                not self.ready or self.constrained[0].priority <= self.ready[0].priority
            ):
                ts = heapq.heappop(self.constrained)
            elif self.ready:
                ts = heapq.heappop(self.ready)
                if ts.state != "ready":
                    continue
            else:
                break
            if ts.state not in ("ready", "constrained"):
                continue
            _, instrs = self._transition(ts, "executing", stimulus_id)
            out.extend(instrs)
        return out

    def _resources_available(self, ts: TaskState) -> bool:
        return all(self.available_resources.get(r, 0) >= q for r, q in (ts.resource_restrictions or {}).items())

    def _ensure_communicating(self, stimulus_id: str) -> list[Instruction]:
        out: list[Instruction] = []
        if not self.data_needed:
            return out
        for worker in list(self.data_needed):
            if len(self.in_flight_workers) >= self.transfer_incoming_count_limit:
                break
            if worker in self.in_flight_workers:
                continue
            heap = self.data_needed[worker]
            batch: set[TaskState] = set()
            total = 0
            while heap:
                ts = heapq.heappop(heap)
                if ts.state != "fetch" or worker not in ts.who_has:
                    continue
                nb = max(ts.nbytes, 0)
                if batch and total + nb > self.transfer_message_bytes_limit:
                    heapq.heappush(heap, ts)
                    break
                batch.add(ts)
                total += nb
            if not heap:
                del self.data_needed[worker]
            if not batch:
                continue
            for ts in batch:
                self._transition(ts, "flight", stimulus_id, worker=worker)
            self.in_flight_workers[worker] = batch
            out.append(GatherDep(stimulus_id, worker, {ts.key for ts in batch}, total))
        return out

    # ------------------------------------------------------------------ transition functions

    def _released_waiting(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "waiting"
        ts.done = False
        ts.exception = None
        ts.traceback = ""
        recs: dict = {}
        ts.waiting_for_data = set()
        for dts in ts.dependencies:
            if dts.state != "memory":
                ts.waiting_for_data.add(dts)
                if dts.state in ("released", "cancelled"):
                    recs[dts] = "fetch"  # a cancelled run or transfer simply resumes
        if not ts.waiting_for_data:
            recs[ts] = "constrained" if ts.resource_restrictions else "ready"
        return recs, []

    def _released_fetch(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        if not ts.who_has:
            ts.state = "missing"
            return {}, [MissingDataMsg(stimulus_id, ts.key, None)]
        ts.state = "fetch"
        for w in ts.who_has:
            heapq.heappush(self.data_needed[w], ts)
        return {}, []

    def _missing_fetch(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "released"
        return self._released_fetch(ts, stimulus_id)

    def _fetch_missing(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "missing"
        return {}, [MissingDataMsg(stimulus_id, ts.key, None)]

    def _flight_missing(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "missing"
        return {}, []

    def _flight_waiting(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        # The transfer failed, but the scheduler asked us to compute the key.
        ts.state = "released"
        return self._released_waiting(ts, stimulus_id)

    def _flight_fetch(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "released"
        return self._released_fetch(ts, stimulus_id)

    def _fetch_flight(self, ts: TaskState, stimulus_id: str, worker: str = "") -> tuple[dict, list]:
        ts.state = "flight"
        ts.coming_from = worker
        self.in_flight_tasks.add(ts)
        self._flight_nbytes[ts] = n = max(ts.nbytes, 0)
        self.comm_nbytes += n
        return {}, []

    def _fetch_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        # The heap entries are dropped lazily when popped.
        return self._generic_released(ts, stimulus_id)

    def _missing_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        return self._generic_released(ts, stimulus_id)

    def _flight_cancelled(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.previous = "flight"
        ts.state = "cancelled"
        return {}, []

    def _flight_memory(self, ts: TaskState, stimulus_id: str, value: Any = None) -> tuple[dict, list]:
        recs, _ = self._put_in_memory(ts, value)
        if ts.run_spec is not None:  # the scheduler asked us to compute it meanwhile
            return recs, [TaskFinishedMsg(stimulus_id, ts.key, ts.nbytes, ts.type, [])]
        return recs, [AddKeysMsg(stimulus_id, [ts.key])]

    def _flight_error(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        return self._to_error(ts, stimulus_id)

    def _any_memory(self, ts: TaskState, stimulus_id: str, value: Any = None) -> tuple[dict, list]:
        recs, _ = self._put_in_memory(ts, value)
        return recs, []

    def _put_in_memory(self, ts: TaskState, value: Any) -> tuple[dict, list]:
        self.data[ts.key] = value
        ts.state = "memory"
        recs: dict = {}
        for dts in ts.dependents:
            if ts in dts.waiting_for_data:
                dts.waiting_for_data.discard(ts)
                if not dts.waiting_for_data and dts.state == "waiting":
                    recs[dts] = "constrained" if dts.resource_restrictions else "ready"
        return recs, []

    def _waiting_ready(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "ready"
        heapq.heappush(self.ready, ts)
        return {}, []

    def _waiting_constrained(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "constrained"
        heapq.heappush(self.constrained, ts)
        return {}, []

    def _ready_executing(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        for r, q in (ts.resource_restrictions or {}).items():
            self.available_resources[r] = self.available_resources.get(r, 0) - q
        ts.state = "executing"
        self.executing.add(ts)
        return {}, [Execute(stimulus_id, ts.key)]

    def _ready_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        return self._generic_released(ts, stimulus_id)

    def _constrained_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        if ts in self.constrained:
            self.constrained.remove(ts)
            heapq.heapify(self.constrained)
        return self._generic_released(ts, stimulus_id)

    def _stop_executing(self, ts: TaskState) -> None:
        self.executing.discard(ts)
        self.long_running.discard(ts)
        for r, q in (ts.resource_restrictions or {}).items():
            self.available_resources[r] = self.available_resources.get(r, 0) + q

    def _executing_memory(self, ts: TaskState, stimulus_id: str, value: Any = None) -> tuple[dict, list]:
        self._stop_executing(ts)
        self.executed_count += 1
        recs, _ = self._put_in_memory(ts, value)
        return recs, [TaskFinishedMsg(stimulus_id, ts.key, ts.nbytes, ts.type, list(ts.startstops))]

    def _executing_error(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        self._stop_executing(ts)
        self.executed_count += 1
        return self._to_error(ts, stimulus_id)

    def _to_error(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "error"
        return {}, [TaskErredMsg(stimulus_id, ts.key, ts.exception, ts.traceback, list(ts.startstops))]

    def _any_error(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        return self._to_error(ts, stimulus_id)

    def _executing_rescheduled(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        self._stop_executing(ts)
        recs, instrs = self._generic_released(ts, stimulus_id)
        return recs, [*instrs, RescheduleMsg(stimulus_id, ts.key)]

    def _executing_long_running(self, ts: TaskState, stimulus_id: str, compute_duration: float = 0.0) -> tuple[dict, list]:
        ts.state = "long-running"
        ts.long_running = True
        self.executing.discard(ts)
        self.long_running.add(ts)
        return {}, [LongRunningMsg(stimulus_id, ts.key, compute_duration)]

    def _executing_cancelled(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.previous = ts.state
        ts.state = "cancelled"
        return {}, []

    def _cancelled_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        if ts.previous in ("executing", "long-running"):
            if not ts.done:
                # The thread is still running: keep its slot until it comes back.
                return {}, []
            self._stop_executing(ts)
        elif ts.previous == "flight" and ts.coming_from is not None:
            return {}, []  # the transfer is still under way
        ts.previous = None
        recs, instrs = self._generic_released(ts, stimulus_id)
        if not ts.dependents:
            recs[ts] = "forgotten"
        return recs, instrs

    def _cancelled_resume(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        """Asked for again before the cancelled run ended: let it go on."""
        prev = ts.previous
        ts.previous = None
        ts.state = prev or "released"
        if prev in ("executing", "long-running"):
            if ts.done:  # pragma: no cover - result already handled
                ts.state = "released"
                return {ts: "waiting"}, []
        return {}, []

    def _memory_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        self.data.pop(ts.key, None)
        return self._generic_released(ts, stimulus_id)

    def _error_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.exception = None
        ts.traceback = ""
        return self._generic_released(ts, stimulus_id)

    def _generic_released(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "released"
        ts.done = False
        ts.coming_from = None
        ts.startstops = []
        ts.waiting_for_data = set()
        self.data.pop(ts.key, None)
        recs: dict = {}
        for dts in ts.dependencies:
            if not any(d.state in ("waiting", "ready", "constrained", "executing", "long-running")
                       for d in dts.dependents if d is not ts):
                if dts.state in ("fetch", "flight", "missing") and dts.run_spec is None:
                    recs[dts] = "released"
        return recs, []

    def _released_forgotten(self, ts: TaskState, stimulus_id: str) -> tuple[dict, list]:
        ts.state = "forgotten"
        self.tasks.pop(ts.key, None)
        recs: dict = {}
        for dts in ts.dependencies:
            dts.dependents.discard(ts)
            if not dts.dependents and dts.state in ("released", "fetch", "missing", "flight") and dts.run_spec is None:
                recs[dts] = "forgotten"
        for dts in ts.dependents:
            dts.dependencies.discard(ts)
            dts.waiting_for_data.discard(ts)
        ts.dependencies.clear()
        return recs, []
