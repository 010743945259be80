"""Pure state-machine tests for :class:`cluster.runtime.scheduler.state.SchedulerState`.

No sockets, no event loop, no threads: the machine is driven through its
stimulus methods and :meth:`SchedulerState.handle`, time comes from a fake
clock, and every test checks the returned instructions and the task states.
Run specs are opaque to the scheduler, so placeholders stand in for them.
"""

from __future__ import annotations

import pytest
from cluster.runtime.errors import (
    InvalidStateError,
    InvalidTransition,
    KilledWorker,
    ScatteredDataLost,
)
from cluster.runtime.scheduler import stimuli, validation
from cluster.runtime.scheduler.events import (
    AddKeysEvent,
    AddWorkerEvent,
    CancelEvent,
    CancelKeyEvent,
    ClientReleasesKeysEvent,
    HeartbeatEvent,
    LongRunningEvent,
    MissingDataEvent,
    ReleaseWorkerDataEvent,
    RemoveClientEvent,
    RemoveWorkerEvent,
    RescheduleEvent,
    TaskErredEvent,
    TaskFinishedEvent,
    UpdateDataEvent,
    UpdateGraphEvent,
)
from cluster.runtime.scheduler.state import (
    BANDWIDTH,
    DEFAULT_TASK_DURATION,
    SATURATION_SECONDS,
    CancelledKeyMsg,
    ComputeTaskMsg,
    FreeKeysMsg,
    KeyInMemoryMsg,
    LostDataMsg,
    RefreshWhoHasMsg,
    SchedulerState,
    TaskErredClientMsg,
)

A = "tcp://10.0.0.1:1001"
B = "tcp://10.0.0.2:1002"
C = "tcp://10.0.0.3:1003"
SPEC = b"spec"
TSPEC = ("f", "a")


# ----------------------------------------------------------------------------- helpers


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make_state(**kwargs) -> SchedulerState:
    return SchedulerState(validate=True, clock=FakeClock(), **kwargs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock) -> SchedulerState:
    return SchedulerState(validate=True, clock=clock)


def of_type(msgs, cls) -> list:
    return [m for m in msgs if isinstance(m, cls)]


def computes(msgs) -> dict:
    """``{key: worker}`` of the ComputeTaskMsg instructions in ``msgs``."""
    return {m.key: m.worker for m in of_type(msgs, ComputeTaskMsg)}


def compute_order(msgs) -> list:
    return [m.key for m in of_type(msgs, ComputeTaskMsg)]


def freed(msgs) -> set:
    """``{(worker, key)}`` of the FreeKeysMsg instructions in ``msgs``."""
    return {(m.worker, k) for m in of_type(msgs, FreeKeysMsg) for k in m.keys}


def states(state: SchedulerState) -> dict:
    return {k: ts.state for k, ts in state.tasks.items()}


def logged_pairs(state: SchedulerState) -> set:
    return {(e[1], e[2]) for e in state.log.entries}


def where(state: SchedulerState, key) -> str:
    ws = state.tasks[key].processing_on
    assert ws is not None, f"{key!r} is not processing"
    return ws.address


def holders(state: SchedulerState, key) -> set:
    return {ws.address for ws in state.tasks[key].who_has}


def finish(state: SchedulerState, key, nbytes: int = 1, **kwargs) -> list:
    return state.handle(TaskFinishedEvent(key, where(state, key), nbytes=nbytes, **kwargs))


# ----------------------------------------------------------------------------- transition-table coverage
#
# Each scenario drives a fresh machine and returns it; the transition log then
# tells which (start, finish) table entries the scenario exercised.  The
# coverage test fails when the table gains an entry that no scenario reaches.


def scenario_compute_and_release():
    s = make_state()
    s.handle(AddWorkerEvent(A))
    s.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    assert states(s) == {"x": "processing", "y": "waiting"}
    finish(s, "x")
    assert states(s) == {"x": "memory", "y": "processing"}
    finish(s, "y")
    assert states(s) == {"x": "released", "y": "memory"}
    s.handle(ClientReleasesKeysEvent(["y"], "c"))
    assert s.tasks == {}
    return s


def scenario_no_worker_then_worker():
    s = make_state()
    s.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A]}))
    assert states(s) == {"x": "no-worker"}
    s.handle(AddWorkerEvent(A))
    assert where(s, "x") == A
    return s


def scenario_cancel_in_each_state():
    s = make_state()
    s.handle(UpdateGraphEvent("c", {"q": SPEC, "n": SPEC, "w": SPEC}, ["q", "n", "w"],
                   dependencies={"w": ["q"]}, restrictions={"n": [A]}))
    assert states(s) == {"q": "queued", "n": "no-worker", "w": "waiting"}
    s.handle(CancelEvent(["w", "q", "n"], "c"))
    assert s.tasks == {} and not s.unrunnable
    return s


def scenario_erred_and_resubmitted():
    s = make_state()
    s.handle(AddWorkerEvent(A))
    s.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"], dependencies={"y": ["x"]}))
    s.handle(TaskErredEvent("x", A, exception=ValueError("boom"), traceback="tb"))
    assert states(s) == {"x": "erred", "y": "erred"}
    s.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    assert states(s) == {"x": "processing", "y": "waiting"}
    return s


def scenario_external_data():
    s = make_state()
    s.handle(AddWorkerEvent(A))
    s.handle(UpdateDataEvent({"s": [A]}, {"s": 8}, client="c"))
    s.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    assert states(s) == {"s": "memory", "x": "processing", "y": "waiting"}
    s.handle(UpdateDataEvent({"y": [A]}, {"y": 8}, client="c"))
    assert s.tasks["y"].state == "memory"
    return s


def scenario_scattered_data_lost():
    s = make_state()
    s.handle(AddWorkerEvent(A))
    s.handle(UpdateDataEvent({"s": [A]}, {"s": 8}, client="c"))
    s.handle(UpdateGraphEvent("c", {"t": SPEC}, ["t"], dependencies={"t": ["s"]}, resources={"t": {"GPU": 1}}))
    assert states(s) == {"s": "memory", "t": "no-worker"}
    s.handle(RemoveWorkerEvent(A))
    assert states(s) == {"s": "erred", "t": "erred"}
    return s


def scenario_worker_dies_while_processing():
    s = make_state()
    s.handle(AddWorkerEvent(A))
    s.handle(AddWorkerEvent(B))
    s.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    first = where(s, "x")
    s.handle(RemoveWorkerEvent(first))
    assert where(s, "x") not in (first, None)
    return s


def scenario_queued_task_failed_directly():
    # No stimulus moves a queued task to erred (queued tasks have neither
    # dependencies nor restrictions), so the entry is exercised through the
    # public ``transitions`` entry point.
    s = make_state()
    s.handle(UpdateGraphEvent("c", {"q": SPEC}, ["q"]))
    s.tasks["q"].exception = RuntimeError("stop")
    out = s.transitions({"q": "erred"}, "test-erred")
    assert s.tasks["q"].state == "erred"
    assert [m.key for m in of_type(out, TaskErredClientMsg)] == ["q"]
    return s


SCENARIOS = {
    "compute_and_release": (scenario_compute_and_release, {
        ("released", "waiting"), ("waiting", "queued"), ("queued", "processing"),
        ("processing", "memory"), ("waiting", "processing"), ("memory", "released"),
        ("released", "forgotten"),
    }),
    "no_worker_then_worker": (scenario_no_worker_then_worker, {
        ("waiting", "no-worker"), ("no-worker", "processing"),
    }),
    "cancel_in_each_state": (scenario_cancel_in_each_state, {
        ("waiting", "released"), ("queued", "released"), ("no-worker", "released"),
        ("released", "forgotten"),
    }),
    "erred_and_resubmitted": (scenario_erred_and_resubmitted, {
        ("processing", "erred"), ("waiting", "erred"), ("erred", "released"),
    }),
    "external_data": (scenario_external_data, {
        ("released", "memory"), ("waiting", "memory"),
    }),
    "scattered_data_lost": (scenario_scattered_data_lost, {
        ("memory", "released"), ("released", "erred"), ("no-worker", "erred"),
    }),
    "worker_dies_while_processing": (scenario_worker_dies_while_processing, {
        ("processing", "released"), ("released", "waiting"),
    }),
    "queued_task_failed_directly": (scenario_queued_task_failed_directly, {
        ("queued", "erred"),
    }),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_logs_expected_transitions(name):
    func, expected = SCENARIOS[name]
    s = func()
    seen = logged_pairs(s)
    assert expected <= seen, f"missing: {sorted(expected - seen)}"
    # Only moves of the table are ever logged (two-step moves log both halves).
    assert seen <= set(s.TRANSITIONS), f"not in table: {sorted(seen - set(s.TRANSITIONS))}"
    # Every log entry is a well-formed (key, start, finish, recs, stimulus_id, time).
    for entry in s.log.entries:
        assert len(entry) == 6
        assert isinstance(entry[3], dict)
        assert entry[5] == 1000.0


def test_transition_table_fully_covered():
    table = set(make_state().TRANSITIONS)
    seen: set = set()
    for func, _ in SCENARIOS.values():
        seen |= logged_pairs(func())
    assert table - seen == set(), f"table entries without a test: {sorted(table - seen)}"
    declared = set().union(*(expected for _, expected in SCENARIOS.values()))
    assert table - declared == set(), f"no scenario declares: {sorted(table - declared)}"


# ----------------------------------------------------------------------------- machinery


@pytest.mark.parametrize("setup_state, finish", [
    ("memory", "queued"),
    ("memory", "no-worker"),
    ("erred", "processing"),
    ("processing", "queued"),
    ("queued", "no-worker"),
])
def test_invalid_transition_raises_and_changes_nothing(state, setup_state, finish):
    state.handle(AddWorkerEvent(A))
    if setup_state == "queued":
        state.handle(RemoveWorkerEvent(A))
        state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    else:
        state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    if setup_state == "memory":
        state.handle(TaskFinishedEvent("x", A, nbytes=4))
    elif setup_state == "erred":
        state.handle(TaskErredEvent("x", A, exception=ValueError("e")))
    assert state.tasks["x"].state == setup_state
    n_entries = len(state.log.entries)
    with pytest.raises(InvalidTransition) as info:
        state.transition("x", finish, "bad-move")
    err = info.value
    assert (err.key, err.start, err.finish) == ("x", setup_state, finish)
    assert err.story == tuple(state.story("x")) and err.story
    assert repr(finish) in str(err)
    assert state.tasks["x"].state == setup_state
    assert len(state.log.entries) == n_entries
    validation.validate_state(state)


def test_transition_to_current_state_is_a_noop(state):
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    n = len(state.log.entries)
    assert state.transition("x", "queued") == {}
    assert state.transition("unknown", "waiting") == {}
    assert len(state.log.entries) == n


def test_story_records_moves_with_stimulus_and_time(state, clock):
    state.handle(AddWorkerEvent(A))
    clock.t = 5.0
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]},
                       stimulus_id="ug-1"))
    clock.t = 7.5
    state.handle(TaskFinishedEvent("x", A, nbytes=3, stimulus_id="done-x"))
    story = state.story("x")
    assert [(e[0], e[1], e[2]) for e in story] == [
        ("y", "released", "waiting"),  # touches x through its recommendations
        ("x", "released", "waiting"),
        ("x", "waiting", "queued"),
        ("x", "queued", "processing"),
        ("x", "processing", "memory"),
    ]
    assert [e[4] for e in story] == ["ug-1"] * 4 + ["done-x"]
    assert [e[5] for e in story] == [5.0] * 4 + [7.5]
    assert story[0][3] == {"x": "waiting"}
    assert story[-1][3] == {"y": "processing"}
    # A TaskState works as well as its key; several keys merge in log order.
    assert state.story(state.tasks["x"]) == story
    assert state.transition_story("x") == story
    both = state.story("x", "y")
    assert set(map(id, story)) < set(map(id, both))
    assert both[-1][:3] == ("y", "waiting", "processing")
    assert state.story("nothing") == []
    assert state.transition_counter == len(state.log.entries)


def test_transition_log_is_bounded():
    s = SchedulerState(validate=True, clock=FakeClock(), transition_log_length=3)
    s.handle(AddWorkerEvent(A))
    s.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    s.handle(TaskFinishedEvent("x", A))
    assert len(s.log.entries) == 3
    assert s.transition_counter == 4
    assert s.log.entries[-1][1:3] == ("processing", "memory")


def _corrupt_processing_on(s):
    s.tasks["x"].processing_on = None


def _corrupt_occupancy(s):
    s.workers[A].occupancy += 5.0


def _corrupt_total_nthreads(s):
    s.total_nthreads += 1


def _corrupt_who_has(s):
    s.tasks["q"].who_has.add(s.workers[A])


def _corrupt_unrunnable(s):
    s.unrunnable.add(s.tasks["q"])


def _corrupt_wants_what(s):
    next(iter(s.tasks["x"].who_wants)).wants_what.clear()


def _corrupt_has_what(s):
    s.workers[A].has_what[s.tasks["q"]] = None


def _corrupt_waiting_on(s):
    s.tasks["y"].waiting_on.add(s.tasks["q"])


@pytest.mark.parametrize("corrupt", [
    _corrupt_processing_on, _corrupt_occupancy, _corrupt_total_nthreads, _corrupt_who_has,
    _corrupt_unrunnable, _corrupt_wants_what, _corrupt_has_what, _corrupt_waiting_on,
])
def test_validate_state_detects_corruption(state, corrupt):
    state.handle(AddWorkerEvent(A, nthreads=1))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "x2": SPEC, "q": SPEC, "y": SPEC}, ["x", "x2", "q", "y"],
                       dependencies={"y": ["x"]}))
    assert states(state) == {"x": "processing", "x2": "processing", "q": "queued", "y": "waiting"}
    validation.validate_state(state)
    corrupt(state)
    with pytest.raises(InvalidStateError):
        validation.validate_state(state)


def test_validate_runs_after_every_stimulus(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    state.workers[A].occupancy = 99.0
    with pytest.raises(InvalidStateError, match="occupancy"):
        state.handle(AddWorkerEvent(B))
    # InvalidStateError is an AssertionError, so plain ``assert``-style handlers catch it too.
    assert issubclass(InvalidStateError, AssertionError)


def test_validate_task_names_the_task(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    ts = state.tasks["x"]
    ts.state = "memory"  # claimed in memory, held nowhere
    with pytest.raises(InvalidStateError, match="'x'"):
        validation.validate_task(state, ts)


def test_add_worker_rejects_duplicate_address_and_name(state):
    state.handle(AddWorkerEvent(A, name="alice"))
    with pytest.raises(ValueError, match="already registered"):
        state.handle(AddWorkerEvent(A))
    with pytest.raises(ValueError, match="alice"):
        state.handle(AddWorkerEvent(B, name="alice"))
    assert list(state.workers) == [A]
    assert state.total_nthreads == 1
    assert state.aliases == {"alice": A}


def test_remove_unknown_worker_or_client_is_a_noop(state):
    assert state.handle(RemoveWorkerEvent(B)) == []
    assert state.handle(RemoveClientEvent("ghost")) == []
    assert state.handle(ClientReleasesKeysEvent(["x"], "ghost")) == []
    assert state.handle(CancelEvent(["x"], "ghost")) == []


def test_handle_dispatches_events(state):
    out = state.handle(
        AddWorkerEvent(A, nthreads=2),
        UpdateGraphEvent("c", {"x": SPEC, "y": TSPEC}, ["y"], dependencies={"y": ["x"]}),
    )
    assert computes(out) == {"x": A}
    out = state.handle(TaskFinishedEvent("x", A, nbytes=7, type="int"))
    assert computes(out) == {"y": A}
    (msg,) = of_type(out, ComputeTaskMsg)
    assert msg.run_spec == TSPEC
    assert msg.who_has == {"x": [A]} and msg.nbytes == {"x": 7}
    out = state.handle(TaskErredEvent("y", A, exception=ValueError("bad"), traceback="tb"))
    (err,) = of_type(out, TaskErredClientMsg)
    assert (err.client, err.key, err.traceback, err.worker) == ("c", "y", "tb", A)
    assert isinstance(err.exception, ValueError)
    assert freed(out) == {(A, "x")}  # y's input is no longer needed
    # The wire form drops the routing field and names the operation.
    wire = err.to_wire()
    assert wire["op"] == "task_erred" and "client" not in wire and wire["key"] == "y"
    out = state.handle(ClientReleasesKeysEvent(["y"], "c"))
    assert state.tasks == {}
    # x was freed already; y was never in memory, but A keeps its error until told
    assert freed(out) == {(A, "y")}


def test_handle_more_events(state):
    state.handle(AddWorkerEvent(A), AddWorkerEvent(B, nthreads=2))
    out = state.handle(UpdateDataEvent({"s": [A]}, {"s": 10}, client="c"))
    assert holders(state, "s") == {A}
    out = state.handle(AddKeysEvent(B, ["s", "ghost"]))
    assert freed(out) == {(B, "ghost")}
    assert holders(state, "s") == {A, B}
    out = state.handle(MissingDataEvent("s", errant_worker=A, worker=C))
    assert holders(state, "s") == {B}
    assert of_type(out, RefreshWhoHasMsg) == []  # C is no worker of ours
    state.handle(UpdateGraphEvent("c", {"t": SPEC}, ["t"], restrictions={"t": [A]}))
    assert where(state, "t") == A
    out = state.handle(LongRunningEvent("t", A, compute_duration=3.0))
    assert state.tasks["t"].long_running and state.task_duration["t"] == 3.0
    out = state.handle(RescheduleEvent("t", A))
    assert freed(out) == {(A, "t")} and computes(out) == {"t": A}
    assert not state.tasks["t"].long_running
    out = state.handle(CancelEvent(["t"], "c"))
    assert [m.key for m in of_type(out, CancelledKeyMsg)] == ["t"]
    out = state.handle(RemoveWorkerEvent(B))
    (err,) = of_type(out, TaskErredClientMsg)
    assert isinstance(err.exception, ScatteredDataLost)


# ----------------------------------------------------------------------------- root tasks and the queue


def test_root_tasks_queue_until_workers_have_room(state):
    keys = [f"t{i}" for i in range(5)]
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    assert out == []
    assert set(states(state).values()) == {"queued"}
    out = state.handle(AddWorkerEvent(A, nthreads=1))
    # Two tasks per thread while durations are unknown.
    assert compute_order(out) == ["t0", "t1"]
    assert states(state) == {"t0": "processing", "t1": "processing",
                             "t2": "queued", "t3": "queued", "t4": "queued"}
    out = state.handle(TaskFinishedEvent("t0", A))
    assert compute_order(out) == ["t2"]
    assert [m.key for m in of_type(out, KeyInMemoryMsg)] == ["t0"]


def test_queue_is_spread_over_workers(state):
    state.handle(AddWorkerEvent(A, nthreads=1))
    state.handle(AddWorkerEvent(B, nthreads=1))
    keys = [f"t{i}" for i in range(6)]
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    placed = computes(out)
    assert len(placed) == 4
    assert sorted(placed.values()) == [A, A, B, B]
    assert compute_order(out) == keys[:4]  # highest priority first
    assert len(state.workers[A].processing) == len(state.workers[B].processing) == 2


def test_new_worker_takes_from_queue(state):
    state.handle(AddWorkerEvent(A, nthreads=1))
    keys = [f"t{i}" for i in range(4)]
    state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    out = state.handle(AddWorkerEvent(B, nthreads=1))
    assert computes(out) == {"t2": B, "t3": B}


def test_short_tasks_fill_workers_beyond_two_per_thread(state):
    state.handle(AddWorkerEvent(A, nthreads=1))
    state.handle(UpdateGraphEvent("c", {("inc", 0): SPEC}, [("inc", 0)]))
    state.handle(TaskFinishedEvent(("inc", 0), A, startstops=[("compute", 0.0, 0.001)]))
    assert state.task_duration["inc"] == pytest.approx(0.001)
    keys = [("inc", i) for i in range(1, 101)]
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    n = len(computes(out))
    assert 2 < n < 100
    ws = state.workers[A]
    assert ws.occupancy == pytest.approx(n * 0.001)
    assert ws.occupancy >= SATURATION_SECONDS - 1e-9
    assert ws in state.saturated
    assert sum(1 for ts in state.tasks.values() if ts.state == "queued") == 100 - n


def test_user_priority_first_then_submission_order(state):
    # Arriving at different times with fifo_timeout 0: each graph is a later generation.
    state.handle(UpdateGraphEvent("c", {"a1": SPEC, "a2": SPEC}, ["a1", "a2"], user_priority=0, now=1.0))
    state.handle(UpdateGraphEvent("c", {"b1": SPEC}, ["b1"], user_priority=10, now=2.0))
    state.handle(UpdateGraphEvent("c", {"lo": SPEC, "hi": SPEC}, ["lo", "hi"], user_priority={"hi": 5},
                                  now=3.0))
    assert state.tasks["b1"].priority < state.tasks["hi"].priority < state.tasks["a1"].priority
    assert state.tasks["a1"].priority < state.tasks["a2"].priority < state.tasks["lo"].priority
    out = state.handle(AddWorkerEvent(A, nthreads=1))
    assert compute_order(out) == ["b1", "hi"]
    msgs = {m.key: m for m in of_type(out, ComputeTaskMsg)}
    assert msgs["b1"].priority == state.tasks["b1"].priority
    order = []
    for _ in range(3):
        done = next(ts.key for ts in state.workers[A].processing)
        order += compute_order(state.handle(TaskFinishedEvent(done, A)))
    assert order == ["a1", "a2", "lo"]


# ----------------------------------------------------------------------------- placement


def test_dependent_goes_to_worker_with_most_data(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    state.handle(UpdateDataEvent({"big": [A], "small": [B]}, {"big": 10**9, "small": 10}, client="c"))
    ts_big = state.tasks["big"]
    assert state.workers[A].nbytes == 10**9
    out = state.handle(UpdateGraphEvent("c", {"z": SPEC}, ["z"], dependencies={"z": ["big", "small"]}))
    assert computes(out) == {"z": A}
    (msg,) = of_type(out, ComputeTaskMsg)
    assert msg.who_has == {"big": [A], "small": [B]}
    assert msg.nbytes == {"big": 10**9, "small": 10}
    z = state.tasks["z"]
    assert state.placement.get_comm_cost(z, state.workers[A]) == pytest.approx(10 / BANDWIDTH)
    assert state.placement.get_comm_cost(z, state.workers[B]) == pytest.approx(10**9 / BANDWIDTH)
    assert state.placement.get_comm_cost(z, state.workers[C]) == pytest.approx((10**9 + 10) / BANDWIDTH)
    # The expected duration sent along includes the transfer.
    assert msg.duration == pytest.approx(DEFAULT_TASK_DURATION + 10 / BANDWIDTH)
    assert ts_big.get_nbytes() == 10**9


def test_worker_objective_weighs_queue_and_transfer(state):
    state.handle(AddWorkerEvent(A, nthreads=2))
    state.handle(AddWorkerEvent(B, nthreads=1))
    state.handle(UpdateDataEvent({"d": [B]}, {"d": 2 * 10**8}, client="c"))
    state.handle(UpdateGraphEvent("c", {"z": SPEC}, ["z"], dependencies={"z": ["d"]},
                       restrictions={"z": [A, B]}))
    z = state.tasks["z"]
    wa, wb = state.workers[A], state.workers[B]
    # z went to B (no transfer); now B is busy.
    assert z.processing_on is wb
    assert state.placement.worker_objective(z, wa) == (wa.occupancy / 2 + 2.0, wa.nbytes)
    assert state.placement.worker_objective(z, wb) == (wb.occupancy + 0.0, wb.nbytes)
    assert state.placement.get_task_duration(z) == DEFAULT_TASK_DURATION
    assert state.placement.get_task_duration(z, default=9.0) == 9.0


def test_data_holder_preferred_even_when_busier(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    state.handle(UpdateGraphEvent("c", {"r1": SPEC, "r2": SPEC}, ["r1", "r2"], restrictions={"r1": [A], "r2": [A]}))
    state.handle(UpdateDataEvent({"d": [A]}, {"d": 1}, client="c"))
    assert state.workers[A].occupancy > 0
    out = state.handle(UpdateGraphEvent("c", {"z": SPEC}, ["z"], dependencies={"z": ["d"]}))
    assert computes(out) == {"z": A}


def test_dependent_of_replicated_data_goes_to_least_busy_holder(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    state.handle(UpdateGraphEvent("c", {"r1": SPEC}, ["r1"], restrictions={"r1": [A]}))
    state.handle(UpdateDataEvent({"d": [A, B]}, {"d": 100}, client="c"))
    out = state.handle(UpdateGraphEvent("c", {"z": SPEC}, ["z"], dependencies={"z": ["d"]}))
    assert computes(out) == {"z": B}


def test_worker_restrictions(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"],
                             restrictions={"x": [B], "y": [B]}))
    assert computes(out) == {"x": B, "y": B}
    assert state.tasks["x"].worker_restrictions == {B}
    assert state.tasks["x"].host_restrictions is None


def test_worker_restriction_by_name(state):
    state.handle(AddWorkerEvent(A, name="alice"))
    state.handle(AddWorkerEvent(B, name="bob"))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": ["bob"]}))
    assert computes(out) == {"x": B}
    assert state.tasks["x"].worker_restrictions == {B}


def test_host_restrictions(state):
    state.handle(AddWorkerEvent(A, host="node1"))
    state.handle(AddWorkerEvent(B, host="node2"))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": ["node2"]}))
    assert computes(out) == {"x": B}
    assert state.tasks["x"].host_restrictions == {"node2"}
    assert state.host_info["node2"] == {"addresses": {B}, "nthreads": 1}


def test_host_restriction_waits_for_worker_on_that_host(state):
    state.handle(AddWorkerEvent(A, host="node1"))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": ["node9"]}))
    assert out == [] and state.tasks["x"].state == "no-worker"
    assert state.tasks["x"] in state.unrunnable
    out = state.handle(AddWorkerEvent(B, host="node9"))
    assert computes(out) == {"x": B}
    assert not state.unrunnable


def test_resource_restrictions(state):
    state.handle(AddWorkerEvent(A, resources={"GPU": 1}))
    state.handle(AddWorkerEvent(B, resources={"GPU": 4}))
    state.handle(AddWorkerEvent(C))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"],
                             resources={"x": {"GPU": 2}, "y": {"GPU": 1}}))
    placed = computes(out)
    assert placed["x"] == B
    assert placed["y"] in (A, B)
    msg = next(m for m in of_type(out, ComputeTaskMsg) if m.key == "x")
    assert msg.resource_restrictions == {"GPU": 2}
    assert state.placement.valid_workers(state.tasks["x"]) == {state.workers[B]}
    assert state.placement.valid_workers(state.tasks["y"]) == {state.workers[A], state.workers[B]}


def test_resource_and_worker_restrictions_intersect(state):
    state.handle(AddWorkerEvent(A, resources={"GPU": 1}))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [B]}, resources={"x": {"GPU": 1}}))
    assert state.tasks["x"].state == "no-worker"
    assert state.placement.valid_workers(state.tasks["x"]) == set()


def test_unrestricted_task_has_no_valid_worker_set(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    assert state.placement.valid_workers(state.tasks["x"]) is None


def test_loose_restrictions_fall_back_to_any_worker(state):
    state.handle(AddWorkerEvent(A))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"],
                             restrictions={"x": [B], "y": [B]}, loose_restrictions=["x"]))
    assert computes(out) == {"x": A}
    assert state.tasks["x"].loose_restrictions
    assert not state.tasks["y"].loose_restrictions
    assert state.tasks["y"].state == "no-worker"


def test_loose_restrictions_prefer_the_named_worker(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [B]},
                             loose_restrictions=["x"]))
    assert computes(out) == {"x": B}


def test_loose_resource_restrictions_still_need_the_resource(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B, resources={"GPU": 1}))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [C]},
                             resources={"x": {"GPU": 1}}, loose_restrictions=["x"]))
    assert computes(out) == {"x": B}


def test_no_worker_until_suitable_worker_joins(state):
    state.handle(AddWorkerEvent(A))
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], resources={"x": {"GPU": 1}}))
    assert out == []
    assert state.tasks["x"].state == "no-worker"
    out = state.handle(AddWorkerEvent(B))  # still no GPU
    assert out == [] and state.tasks["x"].state == "no-worker"
    out = state.handle(AddWorkerEvent(C, resources={"GPU": 2}))
    assert computes(out) == {"x": C}
    assert state.tasks["x"] not in state.unrunnable
    assert [e[1:3] for e in state.story("x")][-1] == ("no-worker", "processing")


def test_dependent_with_no_workers_left_waits_in_no_worker(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateDataEvent({"d": [A]}, {"d": 5}, client="c"))
    state.handle(UpdateGraphEvent("c", {"z": SPEC}, ["z"], dependencies={"z": ["d"]},
                       restrictions={"z": [B]}))
    assert state.tasks["z"].state == "no-worker"
    out = state.handle(AddWorkerEvent(B))
    assert computes(out) == {"z": B}
    (msg,) = of_type(out, ComputeTaskMsg)
    assert msg.who_has == {"d": [A]}


# ----------------------------------------------------------------------------- results, errors, retries


def test_results_are_reported_to_every_wanting_client(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c1", {"x": SPEC}, ["x"]))
    state.handle(UpdateGraphEvent("c2", {"x": SPEC}, ["x"]))
    out = state.handle(TaskFinishedEvent("x", A, nbytes=12, type="numpy.ndarray"))
    msgs = of_type(out, KeyInMemoryMsg)
    assert {m.client for m in msgs} == {"c1", "c2"}
    assert all(m.key == "x" and m.type == "numpy.ndarray" and m.workers == [A] for m in msgs)
    ts = state.tasks["x"]
    assert (ts.nbytes, ts.type, ts.suspicious) == (12, "numpy.ndarray", 0)
    assert state.workers[A].nbytes == 12


def test_resubmitting_a_computed_key_reports_it_without_recomputing(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c1", {"x": SPEC}, ["x"]))
    state.handle(TaskFinishedEvent("x", A, nbytes=1, type="int"))
    out = state.handle(UpdateGraphEvent("c2", {"x": SPEC}, ["x"]))
    assert computes(out) == {}
    (msg,) = of_type(out, KeyInMemoryMsg)
    assert (msg.client, msg.key, msg.type, msg.workers) == ("c2", "x", "int", [A])
    assert {cs.client_key for cs in state.tasks["x"].who_wants} == {"c1", "c2"}


def test_dependencies_are_released_once_no_longer_needed(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC, "z": SPEC}, ["z"],
                       dependencies={"y": ["x"], "z": ["x", "y"]}))
    finish(state, "x")
    out = finish(state, "y")
    assert freed(out) == set()  # z still needs x
    assert computes(out) == {"z": A}
    out = finish(state, "z")
    assert freed(out) == {(A, "x"), (A, "y")}
    assert states(state) == {"x": "released", "y": "released", "z": "memory"}
    assert state.workers[A].has_what == {state.tasks["z"]: None}


def test_task_erred_reports_exception_and_traceback(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    out = state.handle(TaskErredEvent("x", A, exception=ZeroDivisionError("1/0"), traceback="TB"))
    (msg,) = of_type(out, TaskErredClientMsg)
    assert (msg.client, msg.key, msg.traceback, msg.worker) == ("c", "x", "TB", A)
    assert isinstance(msg.exception, ZeroDivisionError)
    ts = state.tasks["x"]
    assert ts.state == "erred" and ts.exception_blame is ts and ts.erred_on == {A}
    assert freed(out) == set()  # the worker already dropped a failed task
    assert state.workers[A].processing == {}


def test_task_erred_from_wrong_worker_or_state_is_ignored(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A]}))
    assert state.handle(TaskErredEvent("x", B, exception=ValueError())) == []
    assert state.handle(TaskErredEvent("nope", A, exception=ValueError())) == []
    assert state.tasks["x"].state == "processing"


def test_retries_resend_the_task_then_fail(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], retries={"x": 2}))
    assert state.tasks["x"].retries == 2
    for left in (1, 0):
        out = state.handle(TaskErredEvent("x", A, exception=ValueError("flaky")))
        assert computes(out) == {"x": A}
        assert of_type(out, TaskErredClientMsg) == []
        assert state.tasks["x"].retries == left
        assert state.tasks["x"].state == "processing"
    out = state.handle(TaskErredEvent("x", A, exception=ValueError("flaky"), traceback="tb"))
    (msg,) = of_type(out, TaskErredClientMsg)
    assert str(msg.exception) == "flaky"
    assert state.tasks["x"].state == "erred"
    assert ("released", "waiting") in [e[1:3] for e in state.story("x")[4:]]


def test_erred_propagates_to_dependents_with_blame(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC, "z": SPEC, "ok": SPEC}, ["z", "y", "ok"],
                       dependencies={"y": ["x"], "z": ["y"]}))
    exc = KeyError("bad")
    out = state.handle(TaskErredEvent("x", A, exception=exc, traceback="tb-x"))
    msgs = {m.key: m for m in of_type(out, TaskErredClientMsg)}
    assert set(msgs) == {"y", "z"}  # x itself is not wanted by the client
    for m in msgs.values():
        assert m.exception is exc and m.traceback == "tb-x" and m.worker == A
    x = state.tasks["x"]
    assert state.tasks["y"].exception_blame is x
    assert state.tasks["z"].exception_blame is x
    assert states(state) == {"x": "erred", "y": "erred", "z": "erred", "ok": "processing"}


def test_submitting_a_dependent_of_an_erred_task_fails_immediately(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    state.handle(TaskErredEvent("x", A, exception=ValueError("v")))
    out = state.handle(UpdateGraphEvent("c", {"y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    (msg,) = of_type(out, TaskErredClientMsg)
    assert msg.key == "y" and str(msg.exception) == "v"
    assert state.tasks["y"].exception_blame is state.tasks["x"]


def test_missing_dependency_errs(state):
    state.handle(AddWorkerEvent(A))
    out = state.handle(UpdateGraphEvent("c", {"y": SPEC}, ["y"], dependencies={"y": ["nope"]}))
    (msg,) = of_type(out, TaskErredClientMsg)
    assert msg.key == "y" and isinstance(msg.exception, KeyError)
    assert computes(out) == {}
    assert state.tasks["y"].exception_blame is state.tasks["nope"]
    assert state.tasks["nope"].state == "erred"


def test_resubmitting_an_erred_task_retries_it_and_its_dependents(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    state.handle(TaskErredEvent("x", A, exception=ValueError()))
    assert states(state) == {"x": "erred", "y": "erred"}
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y", "x"], dependencies={"y": ["x"]}))
    # The client's resubmission reports y's old error before retrying x.
    assert computes(out) == {"x": A}
    assert states(state) == {"x": "processing", "y": "waiting"}
    assert state.tasks["x"].exception is None and state.tasks["x"].exception_blame is None
    out = finish(state, "x")
    assert computes(out) == {"y": A}


# ----------------------------------------------------------------------------- worker loss


def test_remove_worker_reschedules_processing_tasks(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A, B]}))
    first = where(state, "x")
    other = B if first == A else A
    out = state.handle(RemoveWorkerEvent(first))
    assert computes(out) == {"x": other}
    assert freed(out) == set()  # nothing is sent to the dead worker
    ts = state.tasks["x"]
    assert ts.suspicious == 1 and ts.erred_on == {first}
    assert first not in state.idle and state.total_nthreads == 1
    finish(state, "x")
    assert state.tasks["x"].suspicious == 0


def test_safe_remove_does_not_count_against_the_task(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    first = where(state, "x")
    state.handle(RemoveWorkerEvent(first, safe=True))
    assert state.tasks["x"].suspicious == 0
    assert state.tasks["x"].state == "processing"


def test_remove_last_worker_requeues_root_tasks(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    out = state.handle(RemoveWorkerEvent(A))
    assert out == []
    assert state.tasks["x"].state == "queued"
    assert state.workers == {} and state.host_info == {} and state.total_nthreads == 0
    out = state.handle(AddWorkerEvent(B))
    assert computes(out) == {"x": B}


def test_killed_worker_after_allowed_failures():
    s = make_state(allowed_failures=1)
    for w in (A, B, C):
        s.handle(AddWorkerEvent(w))
    s.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"], dependencies={"y": ["x"]}))
    w1 = where(s, "x")
    out = s.handle(RemoveWorkerEvent(w1))
    w2 = where(s, "x")
    assert w2 != w1 and of_type(out, TaskErredClientMsg) == []
    out = s.handle(RemoveWorkerEvent(w2))
    msgs = {m.key: m for m in of_type(out, TaskErredClientMsg)}
    assert set(msgs) == {"x", "y"}
    exc = msgs["x"].exception
    assert isinstance(exc, KilledWorker)
    assert (exc.task, exc.last_worker, exc.allowed_failures) == ("x", w2, 1)
    assert msgs["y"].exception is exc
    assert s.tasks["x"].erred_on == {w1, w2}
    assert states(s) == {"x": "erred", "y": "erred"}
    assert computes(out) == {}


def test_allowed_failures_zero_fails_on_first_death():
    s = make_state(allowed_failures=0)
    s.handle(AddWorkerEvent(A))
    s.handle(AddWorkerEvent(B))
    s.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    out = s.handle(RemoveWorkerEvent(where(s, "x")))
    (msg,) = of_type(out, TaskErredClientMsg)
    assert isinstance(msg.exception, KilledWorker)


def test_remove_worker_recomputes_lost_results(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"], dependencies={"y": ["x"]},
                       restrictions={"x": [A]}, loose_restrictions=["x"]))
    finish(state, "x", nbytes=50)
    assert where(state, "y") == A
    out = state.handle(RemoveWorkerEvent(A))
    assert [m.key for m in of_type(out, LostDataMsg)] == ["x"]
    assert computes(out) == {"x": B}  # recomputed from its recipe
    assert states(state) == {"x": "processing", "y": "waiting"}
    assert state.tasks["y"].waiting_on == {state.tasks["x"]}
    out = finish(state, "x", nbytes=50)
    assert computes(out) == {"y": B}
    (msg,) = of_type(out, ComputeTaskMsg)
    assert msg.who_has == {"x": [B]}
    out = finish(state, "y")
    assert [m.key for m in of_type(out, KeyInMemoryMsg)] == ["y"]


def test_remove_worker_recomputes_input_of_waiting_task(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "z": SPEC, "y": SPEC}, ["y"],
                       dependencies={"y": ["x", "z"]}, restrictions={"x": [A], "z": [B]},
                       loose_restrictions=["x"]))
    finish(state, "x")
    assert state.tasks["y"].waiting_on == {state.tasks["z"]}
    out = state.handle(RemoveWorkerEvent(A))
    assert computes(out) == {"x": B}
    assert state.tasks["y"].waiting_on == {state.tasks["x"], state.tasks["z"]}
    finish(state, "z")
    out = finish(state, "x")
    assert computes(out) == {"y": B}


def test_remove_worker_keeps_results_with_other_replicas(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A]}))
    finish(state, "x")
    state.handle(AddKeysEvent(B, ["x"]))
    out = state.handle(RemoveWorkerEvent(A))
    assert out == []
    assert state.tasks["x"].state == "memory" and holders(state, "x") == {B}


def test_scattered_data_lost_with_its_only_worker(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateDataEvent({"s": [A]}, {"s": 100}, client="c"))
    state.handle(UpdateGraphEvent("c", {"t": SPEC}, ["t"], dependencies={"t": ["s"]}, restrictions={"t": [B]}))
    assert where(state, "t") == B
    out = state.handle(RemoveWorkerEvent(A))
    errs = {m.key: m for m in of_type(out, TaskErredClientMsg)}
    assert set(errs) == {"s", "t"}
    assert isinstance(errs["s"].exception, ScatteredDataLost)
    assert errs["s"].exception.key == "s"
    assert errs["t"].exception is errs["s"].exception
    assert [m.key for m in of_type(out, LostDataMsg)] == ["s"]
    assert freed(out) == {(B, "t")}  # stop computing t where it runs
    assert states(state) == {"s": "erred", "t": "erred"}
    assert state.tasks["t"].exception_blame is state.tasks["s"]


def test_missing_data_for_scattered_key_errs(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateDataEvent({"s": [A]}, {"s": 1}, client="c"))
    out = state.handle(MissingDataEvent("s", errant_worker=A))
    (msg,) = of_type(out, TaskErredClientMsg)
    assert isinstance(msg.exception, ScatteredDataLost)
    assert state.tasks["s"].state == "erred"
    assert state.workers[A].has_what == {}


def test_missing_data_with_other_replicas_refreshes_who_has(state):
    for w in (A, B, C):
        state.handle(AddWorkerEvent(w))
    state.handle(UpdateDataEvent({"s": [A, B]}, {"s": 1}, client="c"))
    out = state.handle(MissingDataEvent("s", errant_worker=A, worker=C))
    (msg,) = of_type(out, RefreshWhoHasMsg)
    assert (msg.worker, msg.who_has) == (C, {"s": [B]})
    assert holders(state, "s") == {B}
    assert state.handle(MissingDataEvent("unknown", errant_worker=A)) == []


def test_missing_data_of_wanted_result_recomputes_it(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"], dependencies={"y": ["x"]},
                       restrictions={"x": [A], "y": [B]}))
    finish(state, "x")
    assert where(state, "y") == B
    out = state.handle(MissingDataEvent("x", errant_worker=A, worker=B))
    assert [m.key for m in of_type(out, LostDataMsg)] == ["x"]
    assert freed(out) == {(B, "y")}
    assert computes(out) == {"x": A}
    assert states(state) == {"x": "processing", "y": "waiting"}


# ----------------------------------------------------------------------------- releasing and forgetting


def test_client_releases_keys_frees_data_and_forgets(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A]}))
    finish(state, "x", nbytes=10)
    state.handle(AddKeysEvent(B, ["x"]))
    out = state.handle(ClientReleasesKeysEvent(["x"], "c"))
    assert freed(out) == {(A, "x"), (B, "x")}
    assert of_type(out, LostDataMsg) == []
    assert state.tasks == {}
    assert state.clients["c"].wants_what == set()
    assert state.workers[A].nbytes == state.workers[B].nbytes == 0
    assert [e[1:3] for e in state.story("x")][-2:] == [("memory", "released"), ("released", "forgotten")]


def test_releasing_a_processing_task_tells_its_worker(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    out = state.handle(ClientReleasesKeysEvent(["x"], "c"))
    assert freed(out) == {(A, "x")}
    assert state.tasks == {} and state.workers[A].processing == {}
    # The result arriving late is dropped on the worker.
    out = state.handle(TaskFinishedEvent("x", A, nbytes=1))
    assert freed(out) == {(A, "x")}
    assert state.tasks == {}


def test_key_wanted_by_another_client_survives_release(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c1", {"x": SPEC}, ["x"]))
    state.handle(UpdateGraphEvent("c2", {"x": SPEC}, ["x"]))
    finish(state, "x")
    out = state.handle(ClientReleasesKeysEvent(["x"], "c1"))
    assert out == []
    assert {cs.client_key for cs in state.tasks["x"].who_wants} == {"c2"}


def test_released_dependency_stays_until_dependent_is_done(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"], dependencies={"y": ["x"]}))
    finish(state, "x")
    out = state.handle(ClientReleasesKeysEvent(["x"], "c"))
    assert out == [] and state.tasks["x"].state == "memory"  # y still needs it
    out = finish(state, "y")
    assert freed(out) == {(A, "x")}
    assert states(state) == {"x": "released", "y": "memory"}
    state.handle(ClientReleasesKeysEvent(["y"], "c"))
    assert state.tasks == {}


def test_release_of_all_keys_forgets_whole_graph(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC, "z": SPEC}, ["y", "z"],
                       dependencies={"y": ["x"], "z": ["x"]}))
    finish(state, "x")
    finish(state, "y")
    out = state.handle(ClientReleasesKeysEvent(["y", "z"], "c"))
    assert state.tasks == {}
    assert (A, "z") in freed(out) and (A, "y") in freed(out) and (A, "x") in freed(out)
    assert state.workers[A].processing == {} and state.workers[A].has_what == {}


def test_remove_client_forgets_its_tasks(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "q": SPEC, "r": SPEC}, ["x", "q", "r"]))
    finish(state, "x")
    out = state.handle(RemoveClientEvent("c"))
    assert state.tasks == {} and "c" not in state.clients
    assert (A, "x") in freed(out)


def test_release_worker_data(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateDataEvent({"s": [A, B]}, {"s": 1}, client="c"))
    assert state.handle(ReleaseWorkerDataEvent("s", A)) == []
    assert holders(state, "s") == {B}
    out = state.handle(ReleaseWorkerDataEvent("s", B))
    assert [m.key for m in of_type(out, LostDataMsg)] == ["s"]


# ----------------------------------------------------------------------------- cancel


def test_cancel_processing_task(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    out = state.handle(CancelEvent(["x"], "c"))
    (msg,) = of_type(out, CancelledKeyMsg)
    assert (msg.client, msg.key, msg.reason) == ("c", "x", "cancelled")
    assert freed(out) == {(A, "x")}
    assert state.tasks == {} and state.clients["c"].wants_what == set()
    assert state.workers[A].occupancy == 0


def test_cancel_cascades_to_dependents(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC, "z": SPEC}, ["x", "y", "z"],
                       dependencies={"y": ["x"], "z": ["y"]}))
    out = state.handle(CancelKeyEvent("x", "c"))
    assert {m.key for m in of_type(out, CancelledKeyMsg)} == {"x", "y", "z"}
    assert state.tasks == {}


def test_cancel_memory_task_frees_data(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    finish(state, "x")
    out = state.handle(CancelEvent(["x"], "c"))
    assert freed(out) == {(A, "x")}
    assert of_type(out, LostDataMsg) == []  # nobody wants it any more
    assert state.tasks == {}


def test_cancel_shared_key_without_force_only_drops_interest(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c1", {"x": SPEC}, ["x"]))
    state.handle(UpdateGraphEvent("c2", {"x": SPEC}, ["x"]))
    out = state.handle(CancelEvent(["x"], "c1"))
    assert [(m.client, m.key) for m in of_type(out, CancelledKeyMsg)] == [("c1", "x")]
    assert freed(out) == set()
    assert state.tasks["x"].state == "processing"
    assert {cs.client_key for cs in state.tasks["x"].who_wants} == {"c2"}


def test_cancel_shared_key_with_force_cancels_for_everyone(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c1", {"x": SPEC}, ["x"]))
    state.handle(UpdateGraphEvent("c2", {"x": SPEC}, ["x"]))
    out = state.handle(CancelEvent(["x"], "c1", force=True))
    assert {(m.client, m.key) for m in of_type(out, CancelledKeyMsg)} == {("c1", "x"), ("c2", "x")}
    assert freed(out) == {(A, "x")}
    assert state.tasks == {}
    assert state.clients["c2"].wants_what == set()


# ----------------------------------------------------------------------------- load tracking


def test_idle_and_saturated_sets(state):
    state.handle(AddWorkerEvent(A, nthreads=2))
    ws = state.workers[A]
    assert state.idle == {A: ws} and state.saturated == set()
    state.handle(UpdateGraphEvent("c", {"t0": SPEC}, ["t0"]))
    assert state.idle == {A: ws} and state.saturated == set()  # 1 of 2 threads busy
    state.handle(UpdateGraphEvent("c", {"t1": SPEC}, ["t1"]))
    assert state.idle == {} and state.saturated == set()  # all threads busy, room to queue
    keys = [f"t{i}" for i in range(2, 6)]
    state.handle(UpdateGraphEvent("c", dict.fromkeys(keys, SPEC), keys))
    assert len(ws.processing) == 4  # two per thread
    assert state.idle == {} and state.saturated == {ws}
    assert ws.occupancy == pytest.approx(4 * DEFAULT_TASK_DURATION)
    for _ in range(2):
        done = next(iter(ws.processing)).key
        state.handle(TaskFinishedEvent(done, A))
    assert len(ws.processing) == 4 and state.saturated == {ws}
    while ws.processing:
        done = next(iter(ws.processing)).key
        state.handle(TaskFinishedEvent(done, A))
    assert state.idle == {A: ws} and state.saturated == set()
    assert ws.occupancy == 0


def test_check_idle_saturated_respects_status(state):
    state.handle(AddWorkerEvent(A))
    ws = state.workers[A]
    ws.status = "paused"
    state.placement.check_idle_saturated(ws)
    assert A not in state.idle and ws not in state.saturated
    ws.status = "running"
    state.placement.check_idle_saturated(ws)
    assert state.idle == {A: ws}


def test_task_duration_learned_from_startstops(state):
    state.handle(AddWorkerEvent(A, nthreads=4))
    k0, k1, k2 = ("inc", 0), ("inc", 1), ("inc", 2)
    out = state.handle(UpdateGraphEvent("c", {k0: SPEC}, [k0]))
    assert of_type(out, ComputeTaskMsg)[0].duration == DEFAULT_TASK_DURATION
    state.handle(TaskFinishedEvent(k0, A, startstops=[("transfer", 0.0, 5.0), ("compute", 10.0, 12.0)]))
    assert state.task_duration == {"inc": 2.0}
    out = state.handle(UpdateGraphEvent("c", {k1: SPEC}, [k1]))
    assert of_type(out, ComputeTaskMsg)[0].duration == 2.0
    assert state.workers[A].processing[state.tasks[k1]] == 2.0
    state.handle(TaskFinishedEvent(k1, A, startstops=[("compute", 0.0, 4.0)]))
    assert state.task_duration["inc"] == pytest.approx(3.0)  # moving average
    out = state.handle(UpdateGraphEvent("c", {k2: SPEC, "other": SPEC}, [k2, "other"]))
    durations = {m.key: m.duration for m in of_type(out, ComputeTaskMsg)}
    assert durations == {k2: pytest.approx(3.0), "other": DEFAULT_TASK_DURATION}


def test_long_running_task_frees_its_slot(state):
    state.handle(AddWorkerEvent(A, nthreads=1))
    state.handle(UpdateGraphEvent("c", {"t0": SPEC, "t1": SPEC, "t2": SPEC}, ["t0", "t1", "t2"]))
    ws = state.workers[A]
    assert len(ws.processing) == 2 and state.tasks["t2"].state == "queued"
    out = state.handle(LongRunningEvent("t0", A, compute_duration=7.0))
    assert computes(out) == {"t2": A}
    ts = state.tasks["t0"]
    assert ts.long_running and ts in ws.long_running
    assert ws.processing[ts] == 0.0
    assert state.task_duration["t0"] == 7.0
    out = finish(state, "t0")
    assert not ws.long_running and not ts.long_running
    assert state.handle(LongRunningEvent("t0", A)) == []  # no longer processing
    assert state.handle(LongRunningEvent("t1", B)) == []  # unknown worker


# ----------------------------------------------------------------------------- reschedule, stray results, external data


def test_reschedule_root_task(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    assert state.handle(RescheduleEvent("x", worker=B)) == []  # not where it runs
    assert state.handle(RescheduleEvent("nope")) == []
    out = state.handle(RescheduleEvent("x", A))
    assert freed(out) == {(A, "x")}
    assert computes(out) == {"x": A}
    assert [e[1:3] for e in state.story("x")][-4:] == [
        ("processing", "released"), ("released", "waiting"),
        ("waiting", "queued"), ("queued", "processing"),
    ]
    finish(state, "x")
    assert state.handle(RescheduleEvent("x")) == []  # only processing tasks move


def test_result_from_wrong_worker_is_freed(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A]}))
    out = state.handle(TaskFinishedEvent("x", B, nbytes=1))
    assert out == [FreeKeysMsg("task_finished", B, ["x"])]
    assert where(state, "x") == A
    assert state.handle(TaskFinishedEvent("x", C)) == []  # unknown worker
    state.handle(TaskFinishedEvent("x", A, nbytes=1))
    # A duplicate result once in memory is kept as a replica.
    assert state.handle(TaskFinishedEvent("x", B, nbytes=1)) == []
    assert holders(state, "x") == {A, B}


def test_update_data_scatters_new_keys_and_adds_replicas(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    out = state.handle(UpdateDataEvent({"s": [A]}, {"s": 64}, client="c", types={"s": "bytes"}))
    assert of_type(out, ComputeTaskMsg) == []
    ts = state.tasks["s"]
    assert (ts.state, ts.run_spec, ts.nbytes, ts.type) == ("memory", None, 64, "bytes")
    assert {cs.client_key for cs in ts.who_wants} == {"c"}
    assert state.handle(UpdateDataEvent({"s": [B]}, {"s": 64})) == []
    assert holders(state, "s") == {A, B}
    assert state.workers[B].nbytes == 64


def test_update_data_satisfies_a_waiting_dependent(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC, "z": SPEC}, ["z"],
                       dependencies={"y": ["x"], "z": ["y"]}, restrictions={"x": [A]}))
    assert states(state) == {"x": "processing", "y": "waiting", "z": "waiting"}
    # y's value arrives from outside before x is even done.
    out = state.handle(UpdateDataEvent({"y": [B]}, {"y": 3}, client="c"))
    assert computes(out) == {"z": B}
    assert of_type(out, ComputeTaskMsg)[0].who_has == {"y": [B]}
    assert state.tasks["y"].state == "memory" and not state.tasks["y"].waiting_on
    assert state.tasks["x"].waiters == set()
    # x finishing late is no longer needed by anyone.
    out = finish(state, "x")
    assert freed(out) == {(A, "x")}
    assert state.tasks["x"].state == "released"


def test_add_keys_records_replicas_and_frees_stale_ones(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A]}))
    finish(state, "x", nbytes=5)
    out = state.handle(AddKeysEvent(B, ["x", "gone"]))
    assert out == [FreeKeysMsg("add_keys", B, ["gone"])]
    assert holders(state, "x") == {A, B}
    assert state.handle(AddKeysEvent(C, ["x"])) == []


def test_reconnecting_worker_brings_its_data(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    finish(state, "x", nbytes=5)
    state.handle(AddWorkerEvent(B, keys=["x", "unknown"]))
    assert holders(state, "x") == {A, B}


def test_worker_heartbeat_uses_clock(state, clock):
    state.handle(AddWorkerEvent(A))
    clock.advance(30)
    assert state.handle(HeartbeatEvent(A, metrics={"cpu": 5})) == []
    assert state.workers[A].last_seen == clock.t
    assert state.workers[A].metrics == {"cpu": 5}
    assert state.handle(HeartbeatEvent(B)) == []  # an unknown worker: ignored
    assert B not in state.workers


# ----------------------------------------------------------------------------- bugs found and fixed


def test_no_worker_dependent_survives_losing_its_input(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]},
                       resources={"y": {"GPU": 1}}))
    finish(state, "x")
    assert state.tasks["y"].state == "no-worker"
    state.handle(RemoveWorkerEvent(A))
    assert states(state) == {"x": "queued", "y": "waiting"}
    out = state.handle(AddWorkerEvent(B, resources={"GPU": 1}))
    assert computes(out) == {"x": B}
    out = finish(state, "x")
    assert computes(out) == {"y": B}


def test_loose_restricted_task_leaves_no_worker_when_any_worker_joins(state):
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [C]},
                             loose_restrictions=["x"]))
    assert out == [] and state.tasks["x"].state == "no-worker"
    out = state.handle(AddWorkerEvent(A))
    assert computes(out) == {"x": A}


def test_update_data_for_processing_key(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"], restrictions={"x": [A]}))
    out = state.handle(UpdateDataEvent({"x": [B]}, {"x": 4}, client="c"))
    assert freed(out) == {(A, "x")}
    assert state.tasks["x"].state == "memory"
    assert holders(state, "x") == {B}


def test_remove_worker_recomputes_unwanted_input_of_running_task(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]},
                       restrictions={"x": [A]}, loose_restrictions=["x"]))
    finish(state, "x", nbytes=10)
    assert where(state, "y") == A
    out = state.handle(RemoveWorkerEvent(A))
    assert computes(out) == {"x": B}
    assert states(state) == {"x": "processing", "y": "waiting"}
    out = finish(state, "x")
    assert computes(out) == {"y": B}


def test_missing_data_recomputes_unwanted_input_of_running_task(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]},
                       restrictions={"x": [A], "y": [B]}))
    finish(state, "x")
    out = state.handle(MissingDataEvent("x", errant_worker=A, worker=B))
    assert computes(out) == {"x": A}
    assert states(state) == {"x": "processing", "y": "waiting"}


def test_reschedule_keeps_dependencies(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    finish(state, "x", nbytes=10)
    out = state.handle(RescheduleEvent("y"))
    assert [d.key for d in state.tasks["y"].dependencies] == ["x"]
    assert "x" in state.tasks and state.tasks["x"].state == "memory"
    last = of_type(out, ComputeTaskMsg)[-1]
    assert last.key == "y" and last.who_has == {"x": [A]}


def test_retry_keeps_dependencies(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["y"], dependencies={"y": ["x"]},
                       retries={"y": 1}))
    finish(state, "x", nbytes=10)
    out = state.handle(TaskErredEvent("y", A, exception=ValueError()))
    assert (A, "x") not in freed(out)
    assert [d.key for d in state.tasks["y"].dependencies] == ["x"]
    last = of_type(out, ComputeTaskMsg)[-1]
    assert last.key == "y" and last.who_has == {"x": [A]}


def test_cancel_keeps_input_needed_by_another_client(state):
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c1", {"x": SPEC}, ["x"]))
    state.handle(UpdateGraphEvent("c2", {"y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    out = state.handle(CancelEvent(["x"], "c1"))
    assert [(m.client, m.key) for m in of_type(out, CancelledKeyMsg)] == [("c1", "x")]
    assert state.tasks["y"].dependencies == {state.tasks["x"]}
    out = finish(state, "x")
    assert computes(out) == {"y": A}
    out = finish(state, "y")
    assert [m.client for m in of_type(out, KeyInMemoryMsg)] == ["c2"]


def test_unknown_dependency_computed_once_submitted(state):
    state.handle(AddWorkerEvent(A))
    out = state.handle(UpdateGraphEvent("c", {"y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    assert states(state) == {"y": "erred", "x": "erred"}
    (err,) = of_type(out, TaskErredClientMsg)
    assert err.key == "y" and isinstance(err.exception, KeyError) and "'x'" in str(err.exception)
    # Through the transition table, so the story says how x and y failed.
    assert ("x", "released", "erred") in {e[:3] for e in state.story("x")}
    assert ("y", "released", "erred") in {e[:3] for e in state.story("y")}
    out = state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    assert of_type(out, TaskErredClientMsg) == []
    assert computes(out) == {"x": A}


def test_killed_worker_not_overridden_by_lost_input():
    s = make_state(allowed_failures=0)
    s.handle(AddWorkerEvent(A))
    s.handle(AddWorkerEvent(B))
    s.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC}, ["x", "y"], dependencies={"y": ["x"]},
                   restrictions={"x": [A], "y": [A]}, loose_restrictions=["x", "y"]))
    finish(s, "x")
    out = s.handle(RemoveWorkerEvent(A))
    errs = {m.key: m for m in of_type(out, TaskErredClientMsg)}
    assert set(errs) == {"y"}
    assert isinstance(errs["y"].exception, KilledWorker)
    assert s.tasks["y"].state == "erred"


def test_update_data_with_unknown_workers_leaves_no_task(state):
    state.handle(AddWorkerEvent(A))
    out = state.handle(UpdateDataEvent({"s": [C]}, {"s": 1}, client="c"))
    assert out == []
    assert "s" not in state.tasks


# ----------------------------------------------------------------------------- graphs from broken peers


def test_released_error_is_dropped_on_the_worker_where_it_failed(state):
    """A worker keeps a failed task's error until the scheduler forgets the task."""
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    state.handle(TaskErredEvent("x", A, exception=ValueError("bad"), traceback="tb"))
    assert states(state) == {"x": "erred"}
    out = state.handle(ClientReleasesKeysEvent(["x"], "c"))
    assert state.tasks == {}
    assert freed(out) == {(A, "x")}


def test_released_error_of_a_departed_worker_is_not_sent_anywhere(state):
    state.handle(AddWorkerEvent(A))
    state.handle(AddWorkerEvent(B))
    state.handle(UpdateGraphEvent("c", {"x": SPEC}, ["x"]))
    w = where(state, "x")
    state.handle(TaskErredEvent("x", w, exception=ValueError("bad")))
    state.handle(RemoveWorkerEvent(w))
    out = state.handle(ClientReleasesKeysEvent(["x"], "c"))
    assert freed(out) == set()


@pytest.mark.parametrize("dependencies", [
    {"x": ["x"]},                                   # itself
    {"x": ["y"], "y": ["x"]},                       # two new tasks
    {"x": ["y"], "y": ["z"], "z": ["x"]},           # three
])
def test_check_graph_refuses_cycles_among_new_tasks(state, dependencies):
    tasks = {k: SPEC for k in ("x", "y", "z")}
    with pytest.raises(ValueError, match="cycle"):
        stimuli.check_graph(state, tasks, dependencies)
    assert state.tasks == {}


def test_check_graph_refuses_a_cycle_through_an_existing_task(state):
    """A placeholder for an unknown dependency gets its recipe, with an edge back to the
    task that waits on it."""
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"y": SPEC}, ["y"], dependencies={"y": ["x"]}))
    assert states(state) == {"x": "erred", "y": "erred"}  # x is unknown: a placeholder
    with pytest.raises(ValueError, match="cycle"):
        stimuli.check_graph(state, {"x": SPEC}, {"x": ["y"]})
    stimuli.check_graph(state, {"x": SPEC}, {"x": []})  # its recipe alone is fine


def test_check_graph_accepts_diamonds_and_long_chains(state):
    stimuli.check_graph(state, {k: SPEC for k in "abcd"}, {"d": ["b", "c"], "b": ["a"], "c": ["a"]})
    n = 20_000  # deeper than the recursion limit: the walk is iterative
    stimuli.check_graph(state, {i: SPEC for i in range(n)}, {i: [i - 1] for i in range(1, n)})


def test_update_graph_keeps_only_tasks_someone_needs(state):
    """Tasks neither wanted nor needed by a wanted task would never be released."""
    state.handle(AddWorkerEvent(A))
    state.handle(UpdateGraphEvent("c", {"x": SPEC, "y": SPEC, "orphan": SPEC, "orphan-dep": SPEC},
                       ["y"], dependencies={"y": ["x"], "orphan": ["orphan-dep"]}))
    assert set(state.tasks) == {"x", "y"}
    state.handle(UpdateGraphEvent("c", {"z": SPEC}, []))
    assert set(state.tasks) == {"x", "y"}


def test_cancel_a_chain_longer_than_the_recursion_limit(state):
    state.handle(AddWorkerEvent(A))
    n = 5000
    state.handle(UpdateGraphEvent("c", {i: SPEC for i in range(n)}, list(range(n)),
                       dependencies={i: [i - 1] for i in range(1, n)}))
    out = state.handle(CancelEvent([0], "c"))
    assert state.tasks == {}
    assert len(of_type(out, CancelledKeyMsg)) == n
