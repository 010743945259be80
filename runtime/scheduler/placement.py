"""Placement policy of the scheduler: which worker runs a task, and when.

:class:`Placement`, a part of :class:`~cluster.runtime.scheduler.state.SchedulerState` (pure, no IO); see
that module's docstring for the policy in words.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .records import TaskState, WorkerState, members, one_has

if TYPE_CHECKING:  # pragma: no cover
    from .state import SchedulerState

#: Expected duration of a task whose prefix we have never seen run.
DEFAULT_TASK_DURATION = 0.5
#: Expected queued work per worker thread below which it accepts more tasks.
SATURATION_SECONDS = 0.05
#: Never hold more than this many tasks per thread on one worker.
MAX_TASKS_PER_THREAD = 1000
#: A group of sibling tasks is root-ish above this many tasks (and twice the threads) ...
ROOTISH_MIN_GROUP = 8
#: ... when all of them together read at most this many inputs.
ROOTISH_MAX_INPUTS = 4
#: Assumed network bandwidth (bytes/s) for transfer-cost estimates.
BANDWIDTH = 100e6


def _load(ws: WorkerState) -> tuple[float, float]:
    """Order of the workers that get queued tasks first: fewest tasks, then least work per thread."""
    return (len(ws.processing) / ws.nthreads, ws.occupancy / ws.nthreads)


class Placement:
    """Which worker runs a task, and when: a part of :class:`SchedulerState`.

    Reads the state's workers, tasks and queue; changes only the queue and the
    ``idle``/``saturated`` sets, and moves tasks only through the state's
    transition table.

    Args:
        state: the state machine this placement serves.
    """

    def __init__(self, state: SchedulerState):
        self.state = state
        #: Running workers with room for more tasks (:meth:`has_room`), kept by
        #: :meth:`check_idle_saturated`, so that :meth:`fill_workers` looks at these
        #: rather than at every worker after each finished task.
        self.room: dict[str, WorkerState] = {}

    # ------------------------------------------------------------------ placement

    def valid_workers(self, ts: TaskState) -> set[WorkerState] | None:
        """Workers allowed to run ``ts``; ``None`` means any worker.

        Applies worker, host and resource restrictions.
        """
        s: set[WorkerState] | None = None
        if ts.worker_restrictions:
            s = {self.state.workers[w] for w in ts.worker_restrictions if w in self.state.workers}
        if ts.host_restrictions:
            # A name not known when the task arrived may be a worker that joined since.
            hs = {self.state.workers[a] for h in ts.host_restrictions
                  for a in self.state.host_info.get(h, {}).get("addresses", ())}
            hs.update(self.state.workers[self.state.aliases[h]] for h in ts.host_restrictions if h in self.state.aliases)
            s = hs if s is None else s | hs
        if ts.resource_restrictions:
            rs = {ws for ws in self.state.workers.values()
                  if all(ws.resources.get(r, 0) >= q for r, q in ts.resource_restrictions.items())}
            s = rs if s is None else s & rs
        if s is None:
            return None
        return {ws for ws in s if ws.status == "running"}

    def running_workers(self) -> list[WorkerState]:
        return [ws for ws in self.state.workers.values() if ws.status == "running"]

    def decide_worker(self, ts: TaskState) -> WorkerState | None:
        """The worker that should run ``ts``, or ``None`` if none can."""
        valid = self.valid_workers(ts)
        if valid is not None and not valid and ts.loose_restrictions:
            valid = None
            if ts.resource_restrictions:
                valid = {ws for ws in self.running_workers()
                         if all(ws.resources.get(r, 0) >= q for r, q in ts.resource_restrictions.items())}
        if valid is None:
            candidates: Iterable[WorkerState]
            holders = {ws for dts in ts._dependencies or () for ws in members(dts._who_has)
                       if ws.status == "running"}
            if holders and len(holders) < len(self.state.workers):
                candidates = holders
            else:
                candidates = self.running_workers()
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
        deps = ts._dependencies
        if not deps:
            return 0.0
        nbytes = sum(dts.get_nbytes() for dts in deps if not one_has(dts._who_has, ws))
        return nbytes / BANDWIDTH

    def get_task_duration(self, ts: TaskState, default: float = DEFAULT_TASK_DURATION) -> float:
        """Expected compute time of ``ts``, from what its prefix took before."""
        return self.state.task_duration.get(ts.prefix, default)

    def ready_target(self, ts: TaskState) -> str:
        if (ts.rootish or not ts._dependencies) and not (
                ts.worker_restrictions or ts.host_restrictions or ts.resource_restrictions):
            return "queued"
        return "processing"

    def mark_rootish(self, new: Iterable[TaskState]) -> None:
        """Mark the new tasks that are *root-ish*: many siblings (same prefix, more than
        :data:`ROOTISH_MIN_GROUP` and twice the cluster's threads) that together read
        at most :data:`ROOTISH_MAX_INPUTS` inputs, like chunks sliced from one array.

        They are queued like tasks without inputs, so that workers take them
        as they have room instead of all at once (what keeps a reduction over
        more data than the workers' memory streaming); their inputs are few,
        so placing them without regard to where the inputs are costs little.
        """
        threads = sum(ws.nthreads for ws in self.state.workers.values())
        groups: dict[str, list[TaskState]] = {}
        for ts in new:
            if ts._dependencies:
                groups.setdefault(ts.prefix, []).append(ts)
        for group in groups.values():
            if len(group) <= max(ROOTISH_MIN_GROUP, 2 * threads):
                continue
            inputs: set[TaskState] = set()
            for ts in group:
                inputs.update(ts._dependencies)
                if len(inputs) > ROOTISH_MAX_INPUTS:
                    break
            else:
                for ts in group:
                    ts.rootish = True

    def fill_workers(self, stimulus_id: str) -> None:
        """Hand queued tasks to workers with room, highest priority first."""
        state = self.state
        queue = state.queued
        workers = state.workers
        saturated = state.saturated
        has_room = self.has_room
        while queue:
            if len(saturated) >= len(workers):
                # ``saturated`` holds exactly the running workers without room
                # (validation checks it): all of them, so no candidate. This is
                # the common case, after each task that finishes.
                return
            # ``room`` rather than every worker: after a task finishes, usually only
            # its worker has room, and looking at all of them is O(workers) per task.
            candidates = [ws for ws in self.room.values() if ws.status == "running" and has_room(ws)]
            if not candidates:
                return
            # One task per worker per pass, least loaded first, so that a burst
            # spreads over idle workers instead of piling onto the first.
            if len(candidates) > 1:
                candidates.sort(key=_load)
            for ws in candidates:
                while queue:
                    _, _, ts = heapq.heappop(queue)
                    if ts.state == "queued":
                        break
                else:
                    return
                state.transition(ts.key, "processing", stimulus_id, worker=ws)

    def check_idle_saturated(self, ws: WorkerState) -> None:
        """Keep the ``idle`` and ``saturated`` sets up to date for one worker."""
        if ws.status != "running" or self.state.workers.get(ws.address) is not ws:
            self.forget_worker(ws)
            return
        if len(ws.processing) < ws.nthreads:
            self.state.idle[ws.address] = ws
        else:
            self.state.idle.pop(ws.address, None)
        if self.has_room(ws):
            self.state.saturated.discard(ws)
            self.room[ws.address] = ws
        else:
            self.state.saturated.add(ws)
            self.room.pop(ws.address, None)

    def forget_worker(self, ws: WorkerState) -> None:
        """Drop a worker that left or stopped running from ``idle``, ``saturated`` and ``room``."""
        self.state.idle.pop(ws.address, None)
        self.state.saturated.discard(ws)
        self.room.pop(ws.address, None)

    def has_room(self, ws: WorkerState) -> bool:
        n = len(ws.processing) - len(ws.long_running)
        if n < 2 * ws.nthreads:
            return True
        return n < MAX_TASKS_PER_THREAD * ws.nthreads and ws.occupancy < SATURATION_SECONDS * ws.nthreads
