"""Pure tests of the memory-management events of :class:`cluster.runtime.worker.state.WorkerStateMachine`:
pausing and resuming, dropping replicas the scheduler has elsewhere
(``RemoveReplicasEvent``) and fetching replicas it asks for
(``AcquireReplicasEvent``).

No sockets, no threads: a validating ``WorkerStateMachine`` is fed events through
``state.handle`` and the returned instructions, task states and ``state.data``
are checked.
"""

from __future__ import annotations

import pytest
from cluster.runtime.worker.state import (
    AcquireReplicasEvent,
    AddKeysMsg,
    ComputeTaskEvent,
    Execute,
    ExecuteSuccessEvent,
    GatherDep,
    GatherDepSuccessEvent,
    MissingDataMsg,
    PauseEvent,
    ReleaseWorkerDataMsg,
    RemoveReplicasEvent,
    TaskFinishedMsg,
    UnpauseEvent,
    UpdateDataEvent,
    WorkerStateMachine,
)
from cluster.runtime.worker.validation import validate_state

pytestmark = pytest.mark.timeout(10)

SELF = "tcp://127.0.0.1:1"
A = "tcp://10.0.0.1:9000"
B = "tcp://10.0.0.2:9000"


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def new_state(**kwargs) -> WorkerStateMachine:
    kwargs.setdefault("nthreads", 1)
    return WorkerStateMachine(address=SELF, validate=True, clock=FakeClock(), **kwargs)


def compute(key, *, priority=(0,), who_has=None, nbytes=None, sid=None):
    return ComputeTaskEvent(sid or f"compute-{key}", key, b"run-spec", tuple(priority),
                            dict(who_has or {}), dict(nbytes or {}), 0.5, None)


def success(key, value=None, *, nbytes=8, sid=None):
    return ExecuteSuccessEvent(sid or f"success-{key}", key, value if value is not None else f"value-{key}",
                               1.0, 2.0, nbytes, "str")


def gathered(worker, data, *, sid=None):
    return GatherDepSuccessEvent(sid or f"gathered-{worker}", worker, dict(data), {k: 10 for k in data})


def executes(instructions) -> list:
    return [i.key for i in instructions if type(i) is Execute]


def of(instructions, cls) -> list:
    return [i for i in instructions if type(i) is cls]


def st(state: WorkerStateMachine, key) -> str:
    ts = state.tasks.get(key)
    return ts.state if ts is not None else "forgotten"


# ----------------------------------------------------------------------------- pause / unpause


def test_pause_stops_starting_new_tasks_and_unpause_starts_them():
    state = new_state(nthreads=2)
    assert state.handle(PauseEvent("pause")) == []
    assert state.running is False
    instrs = state.handle(compute("x", priority=(1,)), compute("y", priority=(0,)))
    assert executes(instrs) == []
    assert st(state, "x") == "ready" and st(state, "y") == "ready"
    assert not state.executing
    instrs = state.handle(UnpauseEvent("unpause"))
    assert sorted(executes(instrs)) == ["x", "y"]
    assert executes(instrs)[0] == "y"  # by priority
    assert {st(state, "x"), st(state, "y")} == {"executing"}
    assert {i.stimulus_id for i in instrs} == {"unpause"}
    validate_state(state)


def test_pause_lets_running_task_finish_but_starts_no_other():
    state = new_state(nthreads=1)
    assert executes(state.handle(compute("x", priority=(0,)), compute("y", priority=(1,)))) == ["x"]
    state.handle(PauseEvent("pause"))
    instrs = state.handle(success("x", 1, sid="done-x"))
    assert of(instrs, TaskFinishedMsg) == [TaskFinishedMsg("done-x", "x", 8, "str", [("compute", 1.0, 2.0)])]
    assert executes(instrs) == []
    assert st(state, "x") == "memory" and st(state, "y") == "ready"
    assert executes(state.handle(UnpauseEvent("unpause"))) == ["y"]
    validate_state(state)


def test_paused_worker_still_fetches_dependencies_but_does_not_run():
    state = new_state()
    state.handle(PauseEvent("pause"))
    instrs = state.handle(compute("z", who_has={"d": [A]}, nbytes={"d": 5}))
    assert of(instrs, GatherDep) == [GatherDep("compute-z", A, {"d"}, 5)]
    instrs = state.handle(gathered(A, {"d": "D"}))
    assert executes(instrs) == [] and st(state, "z") == "ready"
    assert executes(state.handle(UnpauseEvent("unpause"))) == ["z"]


def test_unpause_when_not_paused_changes_nothing():
    state = new_state()
    state.handle(compute("x"))
    assert state.handle(UnpauseEvent("unpause")) == []
    assert st(state, "x") == "executing"


# ----------------------------------------------------------------------------- RemoveReplicasEvent


def test_remove_replicas_drops_data_not_needed_locally():
    state = new_state()
    state.handle(UpdateDataEvent("scatter", {"a": 1, "b": 2}, {"a": 28, "b": 28}))
    instrs = state.handle(RemoveReplicasEvent("rm", ["a"]))
    assert instrs == [ReleaseWorkerDataMsg("rm", "a")]
    assert "a" not in state.data and st(state, "a") == "forgotten"
    assert state.data == {"b": 2} and st(state, "b") == "memory"
    validate_state(state)


def test_remove_replicas_of_computed_result():
    state = new_state()
    state.handle(compute("x"))
    state.handle(success("x", 42))
    assert state.data == {"x": 42}
    instrs = state.handle(RemoveReplicasEvent("rm", ["x"]))
    assert of(instrs, ReleaseWorkerDataMsg) == [ReleaseWorkerDataMsg("rm", "x")]
    assert state.data == {} and st(state, "x") == "forgotten"


def test_remove_replicas_keeps_data_a_waiting_task_needs():
    state = new_state()
    state.handle(UpdateDataEvent("scatter", {"x": "X"}, {"x": 1}))
    # y needs x (here) and d (still to be fetched): y waits.
    state.handle(compute("y", who_has={"x": [SELF], "d": [A]}))
    assert st(state, "y") == "waiting" and st(state, "x") == "memory"
    instrs = state.handle(RemoveReplicasEvent("rm", ["x"]))
    assert of(instrs, ReleaseWorkerDataMsg) == [] and of(instrs, AddKeysMsg) == [AddKeysMsg("rm", ["x"])]
    assert state.data == {"x": "X"} and st(state, "x") == "memory"
    # y still runs with it once d arrives.
    instrs = state.handle(gathered(A, {"d": "D"}))
    assert executes(instrs) == ["y"]
    validate_state(state)


def test_remove_replicas_keeps_data_a_ready_task_needs():
    state = new_state(nthreads=1)
    state.handle(UpdateDataEvent("scatter", {"x": "X"}, {"x": 1}))
    state.handle(compute("busy", priority=(0,)))  # occupies the only thread
    state.handle(compute("y", priority=(1,), who_has={"x": [SELF]}))
    assert st(state, "y") == "ready"
    # Kept, and the scheduler is told to count it again (it may have stopped:
    # a peer reported it missing after a network failure).
    assert state.handle(RemoveReplicasEvent("rm", ["x"])) == [AddKeysMsg("rm", ["x"])]
    assert state.data["x"] == "X"


def test_remove_replicas_releases_input_whose_dependents_are_done():
    state = new_state()
    state.handle(UpdateDataEvent("scatter", {"x": "X"}, {"x": 1}))
    state.handle(compute("y", who_has={"x": [SELF]}))
    state.handle(success("y", "Y"))
    assert st(state, "y") == "memory"
    instrs = state.handle(RemoveReplicasEvent("rm", ["x"]))
    assert instrs == [ReleaseWorkerDataMsg("rm", "x")]
    assert "x" not in state.data and st(state, "x") in ("released", "forgotten")
    assert state.data == {"y": "Y"}
    validate_state(state)


def test_remove_replicas_ignores_keys_not_in_memory():
    state = new_state()
    state.handle(compute("x"))  # executing
    state.handle(AcquireReplicasEvent("acq", {"f": [A]}, {}))  # in flight
    instrs = state.handle(RemoveReplicasEvent("rm", ["x", "f", "unknown"]))
    assert instrs == []
    assert st(state, "x") == "executing" and st(state, "f") == "flight"


# ----------------------------------------------------------------------------- AcquireReplicasEvent


def test_acquire_replicas_fetches_and_reports_add_keys():
    state = new_state()
    instrs = state.handle(AcquireReplicasEvent("acq", {"r1": [A], "r2": [A], "r3": [B]}, {"r1": 10, "r2": 20}))
    gathers = {g.worker: g for g in of(instrs, GatherDep)}
    assert set(gathers) == {A, B}
    assert gathers[A].keys == {"r1", "r2"} and gathers[A].total_nbytes == 30
    assert gathers[B].keys == {"r3"}
    assert {st(state, k) for k in ("r1", "r2", "r3")} == {"flight"}
    instrs = state.handle(gathered(A, {"r1": 1, "r2": 2}, sid="got-a"))
    assert {m.stimulus_id for m in of(instrs, AddKeysMsg)} == {"got-a"}
    reported = sorted(k for m in of(instrs, AddKeysMsg) for k in m.keys)
    assert reported == ["r1", "r2"]
    assert executes(instrs) == []  # replicas are data, not tasks to run
    instrs = state.handle(gathered(B, {"r3": 3}, sid="got-b"))
    assert instrs == [AddKeysMsg("got-b", ["r3"])]
    assert state.data == {"r1": 1, "r2": 2, "r3": 3}
    assert state.comm_nbytes == 0
    validate_state(state)


def test_acquire_replica_already_held_does_nothing():
    state = new_state()
    state.handle(UpdateDataEvent("scatter", {"r": "R"}, {"r": 1}))
    assert state.handle(AcquireReplicasEvent("acq", {"r": [A]}, {"r": 1})) == []
    assert state.data == {"r": "R"} and st(state, "r") == "memory"


def test_acquire_replica_tries_another_holder_when_the_first_lacks_it():
    state = new_state()
    instrs = state.handle(AcquireReplicasEvent("acq", {"r": [A]}, {"r": 10}))
    (g,) = of(instrs, GatherDep)
    assert g.worker == A
    state.handle(AcquireReplicasEvent("acq2", {"r": [B]}, {}))  # a second holder is learnt meanwhile
    instrs = state.handle(gathered(A, {}, sid="empty"))
    assert of(instrs, MissingDataMsg) == [MissingDataMsg("empty", "r", A)]
    (g,) = of(instrs, GatherDep)
    assert g.worker == B
    instrs = state.handle(gathered(B, {"r": "R"}, sid="got"))
    assert instrs == [AddKeysMsg("got", ["r"])]
    assert state.data == {"r": "R"}
    validate_state(state)


def test_acquire_then_remove_replica_round_trip():
    state = new_state()
    state.handle(AcquireReplicasEvent("acq", {"r": [A]}, {"r": 10}))
    state.handle(gathered(A, {"r": "R"}))
    assert state.handle(RemoveReplicasEvent("rm", ["r"])) == [ReleaseWorkerDataMsg("rm", "r")]
    assert state.data == {} and state.tasks == {}
