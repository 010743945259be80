"""Pure tests of the elasticity planning of :class:`SchedulerState`
(:mod:`cluster.runtime.scheduler.elastic`): worker status, graceful retirement,
choosing workers to close, adaptive sizing, replication, rebalancing,
occupancy re-evaluation and restart.

No sockets, no event loop: a validating ``SchedulerState`` with a fake clock is
driven through its stimulus methods, and ``validate_state()`` is called after
the steps under test.  Run specs are opaque bytes to the scheduler.
"""

from __future__ import annotations

import pytest
from cluster.runtime.scheduler import elastic, validation
from cluster.runtime.scheduler.events import (
    AddKeysEvent,
    AddWorkerEvent,
    ClientReleasesKeysEvent,
    LongRunningEvent,
    RemoveWorkerEvent,
    RestartEvent,
    TaskFinishedEvent,
    UpdateDataEvent,
    UpdateGraphEvent,
    WorkerStatusEvent,
)
from cluster.runtime.scheduler.state import (
    DEFAULT_TASK_DURATION,
    AcquireReplicasMsg,
    CancelledKeyMsg,
    ComputeTaskMsg,
    FreeKeysMsg,
    KeyInMemoryMsg,
    LostDataMsg,
    SchedulerState,
    TaskErredClientMsg,
)

pytestmark = pytest.mark.timeout(10)

A = "tcp://10.0.0.1:1001"
B = "tcp://10.0.0.2:1002"
C = "tcp://10.0.0.3:1003"
D = "tcp://10.0.0.4:1004"
SPEC = b"spec"


# ----------------------------------------------------------------------------- helpers


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_state(**kwargs) -> SchedulerState:
    return SchedulerState(validate=True, clock=FakeClock(), **kwargs)


@pytest.fixture
def state() -> SchedulerState:
    return make_state()


def of_type(msgs, cls) -> list:
    return [m for m in msgs if isinstance(m, cls)]


def computes(msgs) -> dict:
    """``{key: worker}`` of the ComputeTaskMsg instructions in ``msgs``."""
    return {m.key: m.worker for m in of_type(msgs, ComputeTaskMsg)}


def acquires(msgs) -> dict:
    """``{worker: {key: holders}}`` of the AcquireReplicasMsg instructions in ``msgs``."""
    out: dict = {}
    for m in of_type(msgs, AcquireReplicasMsg):
        assert m.worker not in out, f"two AcquireReplicasMsg for {m.worker}"
        out[m.worker] = {k: sorted(v) for k, v in m.who_has.items()}
    return out


def where(state: SchedulerState, key) -> str:
    ws = state.tasks[key].processing_on
    assert ws is not None, f"{key!r} is not processing"
    return ws.address


def holders(state: SchedulerState, key) -> set:
    return {ws.address for ws in state.tasks[key].who_has}


def finish(state: SchedulerState, key, nbytes: int = 1, **kwargs) -> list:
    return state.handle(TaskFinishedEvent(key, where(state, key), nbytes=nbytes, **kwargs))


def put(state: SchedulerState, key, workers, nbytes: int, client: str = "c") -> None:
    """Data that entered from outside, held by ``workers`` and wanted by ``client``."""
    state.handle(UpdateDataEvent({key: list(workers)}, {key: nbytes}, client=client))
    assert state.tasks[key].state == "memory"


def compute_on(state: SchedulerState, key, worker: str, nbytes: int, client: str = "c") -> None:
    """A task computed on ``worker`` (so it has a recipe and can be recomputed)."""
    state.handle(UpdateGraphEvent(client, {key: SPEC}, [key], restrictions={key: [worker]}))
    assert where(state, key) == worker
    finish(state, key, nbytes=nbytes)
    assert holders(state, key) == {worker}


# ----------------------------------------------------------------------------- set_worker_status


def test_set_worker_status_rejects_unknown_status(state):
    state.handle(AddWorkerEvent(A))
    with pytest.raises(ValueError, match="'running', 'paused', 'closing_gracefully'"):
        state.handle(WorkerStatusEvent(A, "sleeping"))
    assert state.workers[A].status == "running"
    # Checked before looking the worker up.
    with pytest.raises(ValueError):
        state.handle(WorkerStatusEvent("tcp://nowhere:1", "busy"))


def test_set_worker_status_on_unknown_worker_or_same_status_is_a_noop(state):
    state.handle(AddWorkerEvent(A))
    assert state.handle(WorkerStatusEvent("tcp://nowhere:1", "paused")) == []
    assert state.handle(WorkerStatusEvent(A, "running")) == []
    assert state.workers[A].status == "running"


def test_paused_worker_gets_no_new_tasks(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    assert state.handle(WorkerStatusEvent(A, "paused")) == []
    assert state.workers[A].status == "paused"
    assert A not in state.idle
    out = state.handle(UpdateGraphEvent("c", {f"x-{i}": SPEC for i in range(6)}, [f"x-{i}" for i in range(6)]))
    assert set(computes(out).values()) == {B}
    assert not state.workers[A].processing
    validation.validate_state(state)


def test_paused_worker_back_to_running_takes_from_the_queue(state):
    state.handle(AddWorkerEvent(A))
    state.handle(WorkerStatusEvent(A, "paused"))
    keys = [f"x-{i}" for i in range(3)]
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    assert computes(out) == {}
    assert {state.tasks[k].state for k in keys} == {"queued"}
    out = state.handle(WorkerStatusEvent(A, "running"))
    placed = computes(out)
    assert placed and set(placed.values()) == {A}
    assert A in state.idle or state.workers[A].processing
    validation.validate_state(state)


def test_task_with_dependency_on_paused_worker_runs_elsewhere(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    compute_on(state, "x", A, nbytes=10)
    state.handle(WorkerStatusEvent(A, "paused"))
    out = state.handle(UpdateGraphEvent("c", {"y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    assert computes(out) == {"y": B}
    (msg,) = of_type(out, ComputeTaskMsg)
    assert msg.who_has == {"x": [A]}  # a paused worker still serves its data
    validation.validate_state(state)


def test_restricted_task_waits_for_paused_worker(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(WorkerStatusEvent(A, "paused"))
    out = state.handle(UpdateGraphEvent("c", {"r": SPEC}, ["r"], restrictions={"r": [A]}))
    assert computes(out) == {}
    assert state.tasks["r"].state == "no-worker"
    validation.validate_state(state)


def test_restricted_task_runs_when_paused_worker_resumes(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(WorkerStatusEvent(A, "paused"))
    state.handle(UpdateGraphEvent("c", {"r": SPEC}, ["r"], restrictions={"r": [A]}))
    assert state.tasks["r"].state == "no-worker"
    out = state.handle(WorkerStatusEvent(A, "running"))
    assert computes(out) == {"r": A}


def test_retiring_wins_over_pausing(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    elastic.retire_plan(state, [A])
    assert state.handle(WorkerStatusEvent(A, "paused")) == []
    assert state.workers[A].status == "closing_gracefully"


# ----------------------------------------------------------------------------- retire_plan


def test_retire_plan_marks_workers_closing_and_they_get_no_new_tasks(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    out, plan = elastic.retire_plan(state, [A])
    assert (out, plan) == ([], {})
    assert state.workers[A].status == "closing_gracefully"
    assert A not in state.idle and state.workers[A] not in state.saturated
    keys = [f"x-{i}" for i in range(8)]
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    assert computes(out) and A not in set(computes(out).values())
    assert not state.workers[A].processing
    # Strictly restricted to the retiring worker: waits instead of running there.
    out = state.handle(UpdateGraphEvent("c", {"r": SPEC}, ["r"], restrictions={"r": [A]}))
    assert computes(out) == {}
    assert state.tasks["r"].state == "no-worker"
    # Loosely restricted: runs elsewhere.
    out = state.handle(UpdateGraphEvent("c", {"l": SPEC}, ["l"], restrictions={"l": [A]}, loose_restrictions=["l"]))
    assert computes(out).get("l") in (B, C)
    validation.validate_state(state)


def test_retire_plan_moves_only_keys_held_solely_by_retiring_workers(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    compute_on(state, "big", B, nbytes=500)  # B holds more data than C
    compute_on(state, "only-a", A, nbytes=100)
    compute_on(state, "shared", A, nbytes=100)
    state.handle(AddKeysEvent(B, ["shared"]))
    assert holders(state, "shared") == {A, B}
    out, plan = elastic.retire_plan(state, [A], stimulus_id="retire-1")
    assert plan == {"only-a": C}  # to the running worker with the least data
    assert acquires(out) == {C: {"only-a": [A]}}
    (msg,) = of_type(out, AcquireReplicasMsg)
    assert msg.stimulus_id == "retire-1" and msg.nbytes == {"only-a": 100}
    validation.validate_state(state)


def test_retire_plan_spreads_keys_over_recipients_by_load(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    compute_on(state, "on-b", B, nbytes=50)
    compute_on(state, "x", A, nbytes=100)
    compute_on(state, "y", A, nbytes=100)
    out, plan = elastic.retire_plan(state, [A])
    # x goes to C (0 bytes); then C holds 100 and B only 50, so y goes to B.
    assert plan == {"x": C, "y": B}
    assert acquires(out) == {C: {"x": [A]}, B: {"y": [A]}}


def test_retire_plan_of_several_workers_moves_keys_they_share(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    compute_on(state, "ab", A, nbytes=10)
    state.handle(AddKeysEvent(B, ["ab"]))
    compute_on(state, "b", B, nbytes=10)
    out, plan = elastic.retire_plan(state, [A, B])
    assert plan == {"ab": C, "b": C}
    assert acquires(out) == {C: {"ab": [A, B], "b": [B]}}
    assert {state.workers[w].status for w in (A, B)} == {"closing_gracefully"}


def test_retire_plan_never_sends_data_to_paused_or_retiring_workers(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    state.handle(WorkerStatusEvent(B, "paused"))
    compute_on(state, "x", A, nbytes=10)
    out, plan = elastic.retire_plan(state, [A])
    assert plan == {"x": C}
    assert set(acquires(out)) == {C}


def test_retire_plan_without_recipients_maps_keys_to_empty_string(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    compute_on(state, "x", A, nbytes=10)
    state.handle(WorkerStatusEvent(B, "paused"))
    out, plan = elastic.retire_plan(state, [A])
    assert plan == {"x": ""}
    assert of_type(out, AcquireReplicasMsg) == []
    # Nothing was lost meanwhile.
    assert state.tasks["x"].state == "memory" and holders(state, "x") == {A}
    validation.validate_state(state)


def test_retire_then_safe_remove_loses_nothing_and_is_not_suspicious():
    state = make_state(allowed_failures=0)
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    compute_on(state, "x", A, nbytes=100)
    state.handle(UpdateGraphEvent("c", {"busy": SPEC}, ["busy"], restrictions={"busy": [A]}, loose_restrictions=["busy"]))
    assert where(state, "busy") == A
    out, plan = elastic.retire_plan(state, [A])
    recipient = plan["x"]
    assert recipient in (B, C)
    # The recipient fetched it.
    assert state.handle(AddKeysEvent(recipient, ["x"])) == []
    assert holders(state, "x") == {A, recipient}
    out = state.handle(RemoveWorkerEvent(A, safe=True))
    assert of_type(out, LostDataMsg) == []
    assert of_type(out, TaskErredClientMsg) == []  # no KilledWorker, though allowed_failures=0
    assert "x" not in computes(out)  # not recomputed
    assert state.tasks["x"].state == "memory" and holders(state, "x") == {recipient}
    # The task that was running there is placed again without counting against it.
    ts = state.tasks["busy"]
    assert ts.suspicious == 0 and ts.erred_on == set()
    assert computes(out) == {"busy": where(state, "busy")}
    assert where(state, "busy") in (B, C)
    validation.validate_state(state)


def test_unsafe_remove_of_retiring_worker_still_counts():
    """Contrast: a worker dying while retiring is an ordinary death."""
    state = make_state(allowed_failures=0)
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"busy": SPEC}, ["busy"], restrictions={"busy": [A]}, loose_restrictions=["busy"]))
    elastic.retire_plan(state, [A])
    out = state.handle(RemoveWorkerEvent(A))
    (msg,) = of_type(out, TaskErredClientMsg)
    assert msg.key == "busy"


def test_dependent_of_data_on_retiring_worker_runs_elsewhere(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    compute_on(state, "x", A, nbytes=10)
    elastic.retire_plan(state, [A])
    out = state.handle(UpdateGraphEvent("c", {"y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    assert computes(out) == {"y": B}


def test_retired_worker_can_be_set_running_again(state):
    state.handle(AddWorkerEvent(A))
    elastic.retire_plan(state, [A])
    out = state.handle(UpdateGraphEvent("c", {"q": SPEC}, ["q"]))
    assert state.tasks["q"].state == "queued" and computes(out) == {}
    out = state.handle(WorkerStatusEvent(A, "running"))
    assert computes(out) == {"q": A}


# ----------------------------------------------------------------------------- workers_to_close


def test_workers_to_close_idle_and_least_data_first(state):
    for w in (A, B, C, D):
        state.handle(AddWorkerEvent(w))
    put(state, "b", [B], 300)
    put(state, "c", [C], 100)
    state.handle(UpdateGraphEvent("c", {"busy": SPEC}, ["busy"], restrictions={"busy": [D]}))
    assert elastic.workers_to_close(state, memory_ratio=0) == [A, C, B]  # D is busy
    assert elastic.workers_to_close(state, memory_ratio=0, n=1) == [A]
    assert elastic.workers_to_close(state, memory_ratio=0, n=2) == [A, C]
    assert elastic.workers_to_close(state, memory_ratio=0, n=0) == []
    assert elastic.workers_to_close(state, memory_ratio=0, attribute="name") == [A, C, B]


def test_workers_to_close_idle_before_busy(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "a", [A], 10_000)  # A holds a lot, but B is busy
    state.handle(UpdateGraphEvent("c", {"busy": SPEC}, ["busy"], restrictions={"busy": [B]}))
    assert elastic.workers_to_close(state, memory_ratio=0, n=1) == [A]


def test_workers_to_close_target_and_minimum(state):
    for w in (A, B, C, D):
        state.handle(AddWorkerEvent(w))
    assert len(elastic.workers_to_close(state, target=3)) == 1
    assert len(elastic.workers_to_close(state, target=1)) == 3
    assert elastic.workers_to_close(state, target=4) == []
    assert elastic.workers_to_close(state, target=10) == []
    assert len(elastic.workers_to_close(state, minimum=3)) == 1
    assert len(elastic.workers_to_close(state, n=3, minimum=2)) == 2
    # Retiring workers are not counted nor proposed again.
    elastic.retire_plan(state, [A])
    assert A not in elastic.workers_to_close(state)
    assert len(elastic.workers_to_close(state, target=2)) == 1


def test_workers_to_close_attribute_name(state):
    state.handle(AddWorkerEvent(A, name="alice"))
    state.handle(AddWorkerEvent(B, name="bob"))
    put(state, "b", [B], 10)
    assert elastic.workers_to_close(state, memory_ratio=0, n=1, attribute="name") == ["alice"]


def test_workers_to_close_keeps_enough_memory(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w, memory_limit=100))
    put(state, "x", [C], 60)
    # 300 bytes of limits for 60 bytes: closing A leaves 200 >= 2 * 60, closing
    # B as well would leave 100 < 120.
    assert elastic.workers_to_close(state) == [A]
    assert elastic.workers_to_close(state, memory_ratio=1) == [A, B]
    assert elastic.workers_to_close(state, memory_ratio=4) == []


def test_workers_to_close_groups_closed_whole(state):
    state.handle(AddWorkerEvent(A, host="h1"))
    state.handle(AddWorkerEvent(B, host="h1"))
    state.handle(AddWorkerEvent(C, host="h2"))
    state.handle(AddWorkerEvent(D, host="h2"))
    put(state, "c", [C], 10)
    state.handle(UpdateGraphEvent("c", {"busy": SPEC}, ["busy"], restrictions={"busy": [D]}))

    def by_host(ws):
        return ws.host

    # h2 has a busy worker: the whole group stays.
    assert sorted(elastic.workers_to_close(state, memory_ratio=0, key=by_host)) == [A, B]
    assert elastic.workers_to_close(state, memory_ratio=0, key=by_host, minimum=3) == []


def test_workers_to_close_groups_respect_n_and_target(state):
    for w, h in ((A, "h1"), (B, "h1"), (C, "h2"), (D, "h2")):
        state.handle(AddWorkerEvent(w, host=h))

    def by_host(ws):
        return ws.host

    # "at most n workers" / "down to target workers": no 2-worker group fits.
    assert elastic.workers_to_close(state, memory_ratio=0, key=by_host, n=1) == []
    assert elastic.workers_to_close(state, memory_ratio=0, key=by_host, target=3) == []


# ----------------------------------------------------------------------------- adaptive_target


def test_adaptive_target_zero_without_work(state):
    assert elastic.adaptive_target(state) == 0
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    assert elastic.adaptive_target(state) == 0


def test_adaptive_target_grows_with_queued_work():
    state = make_state()
    keys = [f"x-{i}" for i in range(10)]
    state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    assert {ts.state for ts in state.tasks.values()} == {"queued"}
    # 10 tasks of 0.5 s expected each: 5 s of work.
    assert elastic.adaptive_target(state, target_duration=5) == 1
    assert elastic.adaptive_target(state, target_duration=1) == 5
    # Never more workers than tasks.
    assert elastic.adaptive_target(state, target_duration=0.01) == 10
    state.handle(AddWorkerEvent(A))
    assert len(state.workers[A].processing) == 2  # the rest stays queued
    assert elastic.adaptive_target(state, target_duration=1) == 5


def test_adaptive_target_grows_with_task_durations():
    state = make_state()
    state.handle(AddWorkerEvent(A))
    first = ("slow", 0)
    state.handle(UpdateGraphEvent("c", {first: SPEC}, [first]))
    state.handle(TaskFinishedEvent(first, A, nbytes=1, startstops=[("compute", 0.0, 4.0)]))
    assert state.task_duration["slow"] == 4.0
    state.handle(ClientReleasesKeysEvent([first], "c"))
    assert not state.workers[A].has_what and state.tasks == {}
    keys = [("slow", i) for i in range(1, 5)]
    state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    # 4 tasks of 4 s: 16 s of work; in 5 s that needs 4 workers.
    assert elastic.adaptive_target(state, target_duration=5) == 4
    # The same number of quick tasks needs fewer workers.
    state.task_duration["slow"] = 0.1
    elastic.reevaluate_occupancy(state)
    assert elastic.adaptive_target(state, target_duration=5) == 1


def test_adaptive_target_doubles_under_memory_pressure(state):
    state.handle(AddWorkerEvent(A, memory_limit=100))
    state.handle(AddWorkerEvent(B, memory_limit=100))
    put(state, "x", [A], 50)
    assert elastic.adaptive_target(state) == 1  # no work: B may go, x fits in A with headroom
    put(state, "y", [B], 80)  # 130 > 60% of 200
    assert elastic.adaptive_target(state) == 4


def test_adaptive_target_never_below_busy_workers(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    state.handle(UpdateGraphEvent("c", {"t": SPEC, "u": SPEC}, ["t", "u"], restrictions={"t": [A], "u": [B]}))
    assert elastic.adaptive_target(state) == 2  # C may go, A and B run work
    state.handle(UpdateGraphEvent("c", {"v": SPEC}, ["v"], restrictions={"v": [C]}))
    assert elastic.adaptive_target(state) == 3


def test_adaptive_target_ignores_retiring_workers(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "a", [A], 1)
    elastic.retire_plan(state, [A])
    assert elastic.adaptive_target(state) == 0


# ----------------------------------------------------------------------------- idle workers holding data


MB = 1_000_000


def job_of(ws) -> str:
    """Workers named ``<job>-<i>`` belong to ``<job>`` (as batch-job workers are named)."""
    return str(ws.name).rsplit("-", 1)[0]


def held_results_on_three_jobs(state: SchedulerState, per_worker: dict[str, int]) -> dict[str, list[str]]:
    """Issue 18's scenario: 3 jobs of 2 idle workers (1 GB limit each) whose results a client holds.

    ``per_worker`` gives each worker's number of 2 MB results; returns ``{job: [addresses]}``.
    """
    jobs: dict[str, list[str]] = {}
    for i, (address, count) in enumerate(per_worker.items()):
        job = f"job{i // 2}"
        state.handle(AddWorkerEvent(address, name=f"{job}-{i % 2}", memory_limit=1000 * MB))
        jobs.setdefault(job, []).append(address)
        for k in range(count):
            compute_on(state, f"r-{address}-{k}", address, 2 * MB)
    return jobs


SIX = [f"tcp://10.0.1.{i}:100{i}" for i in range(6)]


def test_idle_workers_holding_results_may_go_down_to_one(state):
    held_results_on_three_jobs(state, dict.fromkeys(SIX, 16))  # 96 results, 192 MB
    sizing = elastic.adaptive_sizing(state)
    # 192 MB need 384 MB of limits: one worker of 1 GB is enough room.
    assert (sizing.target, sizing.work, sizing.busy, sizing.kept_for_data) == (1, 0, 0, 0)
    assert elastic.adaptive_target(state) == 1
    assert (sizing.stored, sizing.limit) == (192 * MB, 6000 * MB)


def test_jobs_holding_the_least_data_are_closed_first_and_one_is_left(state):
    counts = [20, 20, 4, 4, 12, 12]
    jobs = held_results_on_three_jobs(state, dict(zip(SIX, counts, strict=True)))
    closing = elastic.workers_to_close(state, key=job_of)
    # job1 (16 results) then job2 (24); job0 is left to take the data.
    assert closing == jobs["job1"] + jobs["job2"]
    assert elastic.workers_to_close(state, key=job_of, attribute="name") == [
        "job1-0", "job1-1", "job2-0", "job2-1"]


def test_retiring_jobs_together_moves_each_key_once_to_the_workers_that_stay(state):
    jobs = held_results_on_three_jobs(state, dict(zip(SIX, [20, 20, 4, 4, 12, 12], strict=True)))
    closing = elastic.workers_to_close(state, key=job_of)
    unique = {ts.key for a in closing for ts in state.workers[a].has_what}
    msgs, plan = elastic.retire_plan(state, closing)
    stay = set(jobs["job0"])
    assert set(plan) == unique and len(unique) == 32
    assert set(plan.values()) == stay  # nothing lands on a worker that goes
    moved = [k for m in of_type(msgs, AcquireReplicasMsg) for k in m.who_has]
    assert sorted(moved, key=str) == sorted(unique, key=str)  # each key once
    assert {m.worker for m in of_type(msgs, AcquireReplicasMsg)} == stay
    # Spread by load: the two staying workers end up even.
    per = {w: sum(1 for r in plan.values() if r == w) for w in stay}
    assert sorted(per.values()) == [16, 16]
    # Once the copies landed, the retired workers go safely and nothing is lost.
    for worker, keys in acquires(msgs).items():
        for key in keys:
            state.handle(AddKeysEvent(worker, [key]))
    for a in closing:
        state.handle(RemoveWorkerEvent(a, safe=True))
    validation.validate_state(state)
    assert all(state.tasks[k].state == "memory" and holders(state, k) <= stay for k in unique)
    assert elastic.adaptive_target(state) == 1


def test_idle_workers_whose_data_does_not_fit_are_kept_and_counted(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w, memory_limit=100))
    for w in (A, B, C):
        put(state, f"x-{w}", [w], 40)
    # 120 bytes need 240 of limits: closing any worker leaves only 200.
    sizing = elastic.adaptive_sizing(state)
    assert (sizing.target, sizing.work, sizing.kept_for_data) == (3, 0, 2)
    assert elastic.workers_to_close(state) == []
    # A looser rule lets two of them go (one must stay to take the data).
    loose = elastic.adaptive_sizing(state, memory_ratio=1)
    assert (loose.target, loose.kept_for_data) == (2, 1)
    assert elastic.adaptive_target(state, memory_ratio=0) == 1
    assert elastic.adaptive_sizing(state, memory_ratio=0).kept_for_data == 0


def test_the_last_worker_holding_data_is_never_closed(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "a", [A], 10)
    put(state, "b", [B], 20)
    # No memory limits: the ratio rule cannot speak, but the data needs somewhere to go.
    assert elastic.workers_to_close(state) == [A]
    assert elastic.workers_to_close(state, memory_ratio=0) == [A]
    assert elastic.adaptive_target(state) == 1
    state.handle(ClientReleasesKeysEvent(["a", "b"], "c"))
    assert sorted(elastic.workers_to_close(state)) == sorted([A, B])
    assert elastic.adaptive_target(state) == 0


def test_a_job_with_one_busy_worker_stays_while_its_idle_sibling_holds_data(state):
    jobs = held_results_on_three_jobs(state, dict.fromkeys(SIX[:4], 1))
    busy = jobs["job0"][0]
    state.handle(UpdateGraphEvent("c", {"t": SPEC}, ["t"], restrictions={"t": [busy]}))
    assert elastic.workers_to_close(state, key=job_of) == jobs["job1"]
    assert elastic.adaptive_sizing(state).busy == 1
    # The lone busy worker is kept; its idle sibling may go on its own (ungrouped count).
    assert elastic.adaptive_target(state) == 1


# ----------------------------------------------------------------------------- replicate_plan


def test_replicate_plan_makes_n_copies_on_least_loaded_workers(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    put(state, "x", [A], 10)
    put(state, "load", [B], 1000)
    out, drops = elastic.replicate_plan(state, ["x"], n=2, stimulus_id="rep")
    assert drops == {}
    assert acquires(out) == {C: {"x": [A]}}
    assert of_type(out, AcquireReplicasMsg)[0].nbytes == {"x": 10}
    out, drops = elastic.replicate_plan(state, ["x"])  # n=None: every worker
    assert drops == {} and acquires(out) == {B: {"x": [A]}, C: {"x": [A]}}
    # Plans do not change the state until the workers report.
    assert holders(state, "x") == {A}
    validation.validate_state(state)


def test_replicate_plan_n_larger_than_cluster_is_capped(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "x", [A], 10)
    out, drops = elastic.replicate_plan(state, ["x"], n=10)
    assert acquires(out) == {B: {"x": [A]}} and drops == {}


def test_replicate_plan_drops_extra_replicas_from_most_loaded(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    put(state, "x", [A, B, C], 10)
    put(state, "heavy", [C], 1000)
    put(state, "medium", [B], 500)
    out, drops = elastic.replicate_plan(state, ["x"], n=1)
    assert out == []
    assert drops == {C: ["x"], B: ["x"]}
    out, drops = elastic.replicate_plan(state, ["x"], n=2)
    assert out == [] and drops == {C: ["x"]}
    out, drops = elastic.replicate_plan(state, ["x"], n=3)
    assert out == [] and drops == {}


def test_replicate_plan_only_uses_running_workers(state):
    for w in (A, B, C, D):
        state.handle(AddWorkerEvent(w))
    put(state, "x", [A], 10)
    state.handle(WorkerStatusEvent(B, "paused"))
    elastic.retire_plan(state, [C])
    out, drops = elastic.replicate_plan(state, ["x"], n=4)
    assert acquires(out) == {D: {"x": [A]}} and drops == {}


def test_replicate_plan_restricted_to_workers_and_skips_unknown_keys(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    put(state, "x", [A, B], 10)
    state.handle(UpdateGraphEvent("c", {"pending": SPEC}, ["pending"], restrictions={"pending": [A]}))
    out, drops = elastic.replicate_plan(state, ["x", "pending", "unknown"], n=1, workers=[C])
    # Replicas outside the pool are not dropped; keys not in memory are skipped.
    assert acquires(out) == {C: {"x": [A, B]}} and drops == {}


def test_replicate_plan_never_drops_the_last_replica(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "x", [A, B], 10)
    try:
        _, drops = elastic.replicate_plan(state, ["x"], n=0)
    except ValueError:
        return
    dropped = {w for w, keys in drops.items() if "x" in keys}
    assert dropped != {A, B}, "every replica of x would be dropped"


# ----------------------------------------------------------------------------- rebalance_plan


def test_rebalance_plan_moves_largest_keys_to_the_emptiest_worker(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    for key, nbytes in (("k40", 40), ("k30", 30), ("k20", 20), ("k10", 10)):
        put(state, key, [A], nbytes)
    out, drops = elastic.rebalance_plan(state, stimulus_id="rb")
    # Mean 50: k40 fits on B, k30 and k20 would overshoot, k10 fills it up.
    assert acquires(out) == {B: {"k40": [A], "k10": [A]}}
    assert of_type(out, AcquireReplicasMsg)[0].nbytes == {"k40": 40, "k10": 10}
    assert {w: sorted(ks) for w, ks in drops.items()} == {A: ["k10", "k40"]}
    validation.validate_state(state)


def test_rebalance_plan_many_senders_and_receivers(state):
    for w in (A, B, C, D):
        state.handle(AddWorkerEvent(w))
    for i in range(4):
        put(state, f"a{i}", [A], 10)
        put(state, f"b{i}", [B], 10)
    out, drops = elastic.rebalance_plan(state)
    moved_to = acquires(out)
    assert set(moved_to) == {C, D}
    assert {w: len(ks) for w, ks in moved_to.items()} == {C: 2, D: 2}
    assert {w: len(ks) for w, ks in drops.items()} == {A: 2, B: 2}
    # Every drop has a copy planned elsewhere.
    copied = {k for ks in moved_to.values() for k in ks}
    assert copied == {k for ks in drops.values() for k in ks}


def test_rebalance_plan_no_move_when_balanced(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "a", [A], 50)
    put(state, "b", [B], 50)
    assert elastic.rebalance_plan(state) == ([], {})


def test_rebalance_plan_does_not_overshoot_the_mean(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "huge", [A], 1000)  # cannot be split: moving it only swaps the imbalance
    assert elastic.rebalance_plan(state) == ([], {})


def test_rebalance_plan_needs_two_running_workers(state):
    state.handle(AddWorkerEvent(A))
    put(state, "a", [A], 50)
    assert elastic.rebalance_plan(state) == ([], {})
    state.handle(AddWorkerEvent(B))
    state.handle(WorkerStatusEvent(B, "paused"))
    assert elastic.rebalance_plan(state) == ([], {})


def test_rebalance_plan_only_given_keys(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    put(state, "x1", [A], 10)
    put(state, "x2", [A], 10)
    put(state, "other", [A], 1000)
    out, drops = elastic.rebalance_plan(state, keys=["x1", "x2"])
    assert len(acquires(out)[B]) == 1
    assert "other" not in acquires(out)[B]
    assert len(drops[A]) == 1


# ----------------------------------------------------------------------------- reevaluate_occupancy


def test_reevaluate_occupancy_uses_current_task_durations(state):
    state.handle(AddWorkerEvent(A, nthreads=2))
    f1, f2 = ("f", 1), ("f", 2)
    state.handle(UpdateGraphEvent("c", {f1: SPEC, f2: SPEC}, [f1, f2]))
    ws = state.workers[A]
    assert ws.occupancy == pytest.approx(2 * DEFAULT_TASK_DURATION)
    state.task_duration["f"] = 3.0
    elastic.reevaluate_occupancy(state)
    assert ws.occupancy == pytest.approx(6.0)
    assert set(ws.processing.values()) == {3.0}
    validation.validate_state(state)
    # A seceded (long-running) task no longer counts.
    state.handle(LongRunningEvent(f1, A))
    elastic.reevaluate_occupancy(state)
    assert ws.processing[state.tasks[f1]] == 0.0
    assert ws.occupancy == pytest.approx(3.0)
    validation.validate_state(state)


def test_reevaluate_occupancy_includes_transfer_cost(state):
    from cluster.runtime.scheduler.state import BANDWIDTH

    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    compute_on(state, "x", A, nbytes=int(BANDWIDTH))  # one second to move
    state.handle(UpdateGraphEvent("c", {"y": SPEC}, ["y"], dependencies={"y": ["x"]}, restrictions={"y": [B]}))
    state.task_duration["y"] = 2.0
    elastic.reevaluate_occupancy(state)
    assert state.workers[B].occupancy == pytest.approx(3.0)
    validation.validate_state(state)


# ----------------------------------------------------------------------------- _restart_state


def test_restart_state_forgets_everything_and_cancels_client_keys(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c1", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    state.handle(UpdateGraphEvent("c2", {"y": SPEC, "q-1": SPEC, "q-2": SPEC, "q-3": SPEC, "q-4": SPEC, "q-5": SPEC},
                       ["y", "q-1", "q-2", "q-3", "q-4", "q-5"]))
    state.handle(UpdateGraphEvent("c2", {"r": SPEC}, ["r"], restrictions={"r": ["tcp://gone:1"]}))
    finish(state, "x")
    put(state, "s", [B], 5, client="c1")
    states_before = {ts.state for ts in state.tasks.values()}
    assert {"memory", "processing", "queued", "no-worker"} <= states_before
    out = state.handle(RestartEvent("restart-1"))
    # Through the transition table: workers are told to drop what they held or ran.
    assert {type(m) for m in out} <= {CancelledKeyMsg, FreeKeysMsg}
    out = [m for m in out if isinstance(m, CancelledKeyMsg)]
    assert {(m.client, m.key) for m in out} == {
        ("c1", "y"), ("c1", "s"), ("c2", "y"), ("c2", "r"),
        ("c2", "q-1"), ("c2", "q-2"), ("c2", "q-3"), ("c2", "q-4"), ("c2", "q-5"),
    }
    assert {m.stimulus_id for m in out} == {"restart-1"} and {m.reason for m in out} == {"restart"}
    assert state.tasks == {} and state.queued == [] and state.unrunnable == set()
    story = state.story("x", "y", "s")
    assert {e[0] for e in story if e[2] == "forgotten"} == {"x", "y", "s"}
    for ws in state.workers.values():
        assert not ws.processing and not ws.has_what and ws.nbytes == 0 and ws.occupancy == 0
        assert ws.address in state.idle
    assert all(not cs.wants_what for cs in state.clients.values())
    validation.validate_state(state)
    # The machine works normally afterwards.
    out = state.handle(UpdateGraphEvent("c1", {"x": SPEC}, ["x"]))
    assert set(computes(out)) == {"x"}
    out = finish(state, "x")
    assert [m.key for m in of_type(out, KeyInMemoryMsg)] == ["x"]
