"""The scheduler's cost per worker event does not grow with the number of workers (issue 14).

Socket-free: the pure :class:`SchedulerState` with 10 and with 1,000 registered
workers.  Instead of timing anything, the tests count what an event touches: full
scans of ``state.workers`` (a dict that counts its iterations) and calls of
``Placement.has_room`` (the per-worker test of where queued tasks may go).  A
heartbeat, a registration and a finished task must touch the same small number of
things whatever the number of workers; a tick (every 0.5 s) may visit each worker a
fixed number of times, which is O(1) per worker per interval.
"""

from __future__ import annotations

import pickle

import pytest
from cluster.runtime.scheduler.events import (
    AddWorkerEvent,
    HeartbeatEvent,
    TaskFinishedEvent,
    TickEvent,
    UpdateGraphEvent,
)
from cluster.runtime.scheduler.placement import Placement
from cluster.runtime.scheduler.records import ComputeTaskMsg
from cluster.runtime.scheduler.state import SchedulerState

pytestmark = pytest.mark.timeout(60)

SIZES = (10, 1000)


class CountingWorkers(dict):
    """``state.workers`` that counts full scans (iterating keys, values or items)."""

    scans = 0
    visited = 0

    def _scan(self, it):
        type(self).scans += 1
        for x in it:
            type(self).visited += 1
            yield x

    def __iter__(self):
        return self._scan(super().__iter__())

    def values(self):
        return self._scan(super().values())

    def items(self):
        return self._scan(super().items())

    def keys(self):
        return self._scan(super().keys())


class Counts:
    def __init__(self, monkeypatch):
        self.has_room = 0
        original = Placement.has_room

        def counting(placement, ws):
            self.has_room += 1
            return original(placement, ws)

        monkeypatch.setattr(Placement, "has_room", counting)

    def reset(self):
        self.has_room = 0
        CountingWorkers.scans = CountingWorkers.visited = 0


def addr(i: int) -> str:
    return f"tcp://127.0.0.1:{20000 + i}"


def make_state(n: int, counts: Counts) -> SchedulerState:
    state = SchedulerState(validate=False, clock=lambda: 100.0, worker_ttl=60.0)
    state.workers = CountingWorkers()
    state.handle(*[AddWorkerEvent(addr(i), nthreads=1) for i in range(n)])
    counts.reset()
    return state


def submit(state: SchedulerState, n_tasks: int) -> list[ComputeTaskMsg]:
    """A no-op map of ``n_tasks``; the compute messages the workers get at first."""
    recipe = pickle.dumps(len)
    tasks = {f"noop-{i}": (recipe, pickle.dumps(((i,), {}))) for i in range(n_tasks)}
    out = state.handle(UpdateGraphEvent("client-1", tasks, keys=list(tasks)))
    return [m for m in out if isinstance(m, ComputeTaskMsg)]


def finish(state: SchedulerState, msg: ComputeTaskMsg) -> list:
    return state.handle(TaskFinishedEvent(msg.key, msg.worker, nbytes=8, type="NoneType",
                                          startstops=(("compute", 1.0, 1.001),),
                                          stimulus_id=f"finished-{msg.key}"))


def costs(event_costs: dict) -> tuple:
    small, large = (event_costs[n] for n in SIZES)
    return small, large


@pytest.mark.parametrize("n", SIZES)
def test_heartbeat_touches_one_worker(monkeypatch, n):
    counts = Counts(monkeypatch)
    state = make_state(n, counts)
    for i in range(n):
        assert state.handle(HeartbeatEvent(addr(i), {"memory": 1, "executing": 0})) == []
    assert CountingWorkers.scans == 0 and counts.has_room == 0
    assert state.workers[addr(n - 1)].metrics == {"memory": 1, "executing": 0}


def test_registration_cost_does_not_grow_with_workers(monkeypatch):
    counts = Counts(monkeypatch)
    touched = {}
    for n in SIZES:
        state = make_state(n, counts)
        submit(state, 5 * n)  # a queue waiting: the newcomer must get work from it
        counts.reset()
        out = state.handle(AddWorkerEvent(addr(n), nthreads=1))
        # Only the newcomer hears anything (its first tasks); nothing goes to every worker.
        assert {m.worker for m in out} == {addr(n)} and len(out) == 2
        touched[n] = (CountingWorkers.visited, counts.has_room)
    (small_visits, small_room), (large_visits, large_room) = costs(touched)
    assert large_visits == small_visits and large_room == small_room, touched
    assert large_room <= 10, touched


def test_finished_task_with_a_queue_does_not_scan_the_workers(monkeypatch):
    """A no-op map longer than the workers can hold: each finished task hands the
    next queued one to the worker that finished, without looking at every worker."""
    counts = Counts(monkeypatch)
    touched = {}
    for n in SIZES:
        state = make_state(n, counts)
        first = submit(state, 4 * n)
        assert len(first) == 2 * n  # two per thread; the rest wait in the queue
        counts.reset()
        followups = []
        for msg in first[:20]:
            out = finish(state, msg)
            followups += [m for m in out if isinstance(m, ComputeTaskMsg)]
        assert len(followups) == 20 and all(
            m.worker == msg.worker for m, msg in zip(followups, first[:20], strict=True))
        touched[n] = (CountingWorkers.visited, counts.has_room)
    (small_visits, small_room), (large_visits, large_room) = costs(touched)
    assert large_visits == small_visits and large_room == small_room, touched
    assert large_room <= 20 * 5, touched


def test_room_follows_the_workers(monkeypatch):
    """The set of workers with room that placement keeps agrees with ``has_room``
    after work arrives, finishes and a worker leaves (it is what ``fill_workers`` reads)."""
    counts = Counts(monkeypatch)
    state = make_state(10, counts)

    def agrees():
        expected = {a for a, ws in dict.items(state.workers)
                    if ws.status == "running" and Placement.has_room(state.placement, ws)}
        return set(state.placement.room) == expected

    assert agrees() and len(state.placement.room) == 10
    first = submit(state, 40)
    assert agrees() and not state.placement.room  # everyone holds two
    finish(state, first[0])
    assert agrees()
    from cluster.runtime.scheduler.events import RemoveWorkerEvent

    state.handle(RemoveWorkerEvent(addr(3), "test-remove"))
    assert agrees() and addr(3) not in state.placement.room
    for msg in first[1:]:
        if msg.worker != addr(3) and msg.key in state.tasks and \
                state.tasks[msg.key].state == "processing":
            finish(state, msg)
    assert agrees()


@pytest.mark.parametrize("n", SIZES)
def test_tick_visits_each_worker_a_fixed_number_of_times(monkeypatch, n):
    counts = Counts(monkeypatch)
    state = make_state(n, counts)
    state.handle(TickEvent(100.0))
    state.handle(TickEvent(100.5))
    # At most two passes over the workers per tick (worker TTL, idle check):
    # O(1) per worker per tick, never O(workers) per worker.
    assert CountingWorkers.visited <= 2 * 2 * n and counts.has_room == 0


def test_identity_describes_only_the_workers_asked_for():
    """``identity(n_workers=0)`` (dask's argument) counts the workers without building
    a description of each: what a poll for "are they all here yet" needs at 1,000."""
    from cluster.runtime.scheduler import Scheduler

    s = Scheduler(dashboard_address=None)
    s.state.handle(*[AddWorkerEvent(addr(i), nthreads=2) for i in range(5)])
    assert s.identity(n_workers=0)["workers"] == {}
    assert s.identity(n_workers=0)["n_workers"] == 5
    two = s.identity(n_workers=2)
    assert list(two["workers"]) == [addr(0), addr(1)] and two["total_threads"] == 10
    assert list(s.identity()["workers"]) == [addr(i) for i in range(5)]
    assert s.identity()["workers"][addr(4)]["nthreads"] == 2
