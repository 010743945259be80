"""Time as an event: worker TTL, idle timeout and the load re-estimate decided in the
pure scheduler state from :class:`TickEvent` (no sockets, no waiting: the clock is
whatever the test says it is)."""

from __future__ import annotations

from cluster.runtime.scheduler.events import (
    AddWorkerEvent,
    HeartbeatEvent,
    TaskFinishedEvent,
    TickEvent,
    UpdateGraphEvent,
)
from cluster.runtime.scheduler.records import CloseScheduler, ComputeTaskMsg, RemoveWorker
from cluster.runtime.scheduler.state import SchedulerState
from cluster.runtime.scheduler.stimuli import REEVALUATE_OCCUPANCY_INTERVAL

A = "tcp://10.0.0.1:1001"
B = "tcp://10.0.0.2:1002"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def of_type(out, cls) -> list:
    return [i for i in out if isinstance(i, cls)]


def test_silent_worker_is_removed_after_ttl_live_one_kept():
    clock = Clock()
    state = SchedulerState(validate=True, clock=clock, worker_ttl=10.0)
    state.handle(AddWorkerEvent(A), AddWorkerEvent(B))
    assert state.handle(TickEvent(105.0)) == []
    clock.t = 108.0
    state.handle(HeartbeatEvent(B))
    out = state.handle(TickEvent(111.0))
    assert [(i.worker, i.reason) for i in of_type(out, RemoveWorker)] == [
        (A, "missed its heartbeat for 11.0s")]


def test_no_ttl_never_removes():
    state = SchedulerState(validate=True, clock=Clock())
    state.handle(AddWorkerEvent(A))
    assert of_type(state.handle(TickEvent(1e9)), RemoveWorker) == []


def test_idle_timeout_counts_from_the_last_work():
    state = SchedulerState(validate=True, clock=Clock(), idle_timeout=60.0)
    state.handle(AddWorkerEvent(A))
    assert state.handle(TickEvent(0.0)) == []  # the first tick starts the count
    assert state.handle(TickEvent(50.0)) == []
    state.handle(UpdateGraphEvent("c", {"t": (b"f", b"a")}, ["t"]))
    assert state.handle(TickEvent(70.0)) == []  # a graph arrived: not idle at 70
    assert state.tasks["t"].state == "processing"
    assert state.handle(TickEvent(200.0)) == []  # still running: busy
    state.handle(TaskFinishedEvent("t", A))
    assert state.handle(TickEvent(210.0)) == []
    assert state.handle(TickEvent(259.0)) == []  # last seen busy at 200
    (close,) = of_type(state.handle(TickEvent(261.0)), CloseScheduler)
    assert close.reason == "idle for 61s"


def test_occupancy_is_reestimated_on_schedule():
    state = SchedulerState(validate=True, clock=Clock())
    state.handle(AddWorkerEvent(A, nthreads=1))
    keys = [f"inc-{i:08x}" for i in range(3)]  # prefix 'inc'

    state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, (b"f", b"a")), keys))
    ws = state.workers[A]
    before = ws.occupancy
    # Learn that 'inc' tasks take far less than the default guess.
    state.task_duration["inc"] = 0.001
    state.handle(TickEvent(0.0))
    assert ws.occupancy == before  # not due yet
    out = state.handle(TickEvent(REEVALUATE_OCCUPANCY_INTERVAL + 1))
    assert ws.occupancy < before
    # The worker has room again: the queued task goes to it.
    assert [m.key for m in of_type(out, ComputeTaskMsg)] == [keys[2]]
