"""Pure state-machine tests of :class:`cluster.runtime.worker.state.WorkerStateMachine`.

No sockets, no event loop, no threads: every test builds a validating
``WorkerStateMachine`` with a fake clock, feeds it events through ``state.handle`` and
checks the instructions that come out, the task states, ``state.data`` and the
transition log (``state.story``).

Each scenario is registered in ``SCENARIOS`` and runs as its own test; the two
coverage tests replay all of them and check that every entry of
``WorkerStateMachine.TRANSITIONS`` was exercised, so a new table entry without a
scenario fails.

The tests after the scenarios pin down bugs found (and fixed) while writing
them: cancelled tasks keeping their thread slot, new holders of a key being
used, missing data being reported, and the transition log's content.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cluster.runtime.errors import InvalidStateError, InvalidTransition
from cluster.runtime.worker.state import (
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
    RefreshWhoHasEvent,
    RescheduleEvent,
    RescheduleMsg,
    SecedeEvent,
    TaskErredMsg,
    TaskFinishedMsg,
    TaskState,
    UpdateDataEvent,
    WorkerStateMachine,
)
from cluster.runtime.worker.validation import validate_state

SELF = "tcp://127.0.0.1:1"
A = "tcp://10.0.0.1:9000"
B = "tcp://10.0.0.2:9000"
C = "tcp://10.0.0.3:9000"


# ----------------------------------------------------------------------------- helpers


class FakeClock:
    """A deterministic clock: every call returns one second more."""

    def __init__(self, start: float = 1000.0):
        self.t = start
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        self.t += 1.0
        return self.t


def new_state(**kwargs) -> WorkerStateMachine:
    kwargs.setdefault("nthreads", 1)
    return WorkerStateMachine(address=SELF, validate=True, clock=FakeClock(), **kwargs)


Factory = Callable[..., WorkerStateMachine]


def compute(key, *, priority=(0,), who_has=None, nbytes=None, resources=None, sid=None):
    return ComputeTaskEvent(
        sid or f"compute-{key}", key, b"run-spec", tuple(priority),
        dict(who_has or {}), dict(nbytes or {}), 0.5, resources,
    )


def free(*keys, sid=None):
    return FreeKeysEvent(sid or f"free-{'-'.join(map(str, keys))}", list(keys))


def success(key, value=None, *, nbytes=8, sid=None):
    return ExecuteSuccessEvent(sid or f"success-{key}", key, value if value is not None else f"value-{key}",
                               1.0, 2.0, nbytes, "str")


def failure(key, exc=None, *, sid=None):
    return ExecuteFailureEvent(sid or f"failure-{key}", key, exc if exc is not None else ValueError(key),
                               f"Traceback for {key}", 1.0, 2.0)


def gathered(worker, data, *, sid=None):
    return GatherDepSuccessEvent(sid or f"gathered-{worker}", worker, dict(data),
                                 {k: 10 for k in data})


def of(instructions, cls, **fields):
    """The instructions of type ``cls`` whose attributes equal ``fields``."""
    return [
        i for i in instructions
        if type(i) is cls and all(getattr(i, f) == v for f, v in fields.items())
    ]


def keys_of(instructions, cls) -> list:
    return [i.key for i in instructions if type(i) is cls]


def gather_deps(instructions) -> list[GatherDep]:
    return [i for i in instructions if type(i) is GatherDep]


def st(state: WorkerStateMachine, key) -> str:
    """The state of ``key``; "forgotten" when the worker no longer tracks it."""
    ts = state.tasks.get(key)
    return ts.state if ts is not None else "forgotten"


def story_pairs(state: WorkerStateMachine, key) -> list[tuple[str, str]]:
    return [(e[1], e[2]) for e in state.story(key) if e[0] == key]


def dedup(pairs: list) -> list:
    """``pairs`` without consecutive repeats."""
    return [p for i, p in enumerate(pairs) if i == 0 or pairs[i - 1] != p]


def log_pairs(state: WorkerStateMachine) -> set[tuple[str, str]]:
    return {(e[1], e[2]) for e in state.log.entries}


# ----------------------------------------------------------------------------- scenarios

#: name -> scenario(make) ; each scenario asserts as it goes and returns its state.
SCENARIOS: dict[str, Callable[[Factory], WorkerStateMachine]] = {}


def scenario(fn):
    SCENARIOS[fn.__name__.removeprefix("scenario_")] = fn
    return fn


@scenario
def scenario_compute_without_dependencies(make: Factory) -> WorkerStateMachine:
    state = make()
    instrs = state.handle(compute("x", sid="s-compute"))
    assert instrs == [Execute("s-compute", "x")]
    assert st(state, "x") == "executing"
    assert state.tasks["x"] in state.executing

    instrs = state.handle(success("x", 42, nbytes=28, sid="s-done"))
    assert instrs == [TaskFinishedMsg("s-done", "x", 28, "str", [("compute", 1.0, 2.0)])]
    assert st(state, "x") == "memory"
    assert state.data == {"x": 42}
    assert state.executing == set()
    assert state.executed_count == 1

    story = state.story("x")
    assert [(e[1], e[2]) for e in story] == [
        ("released", "waiting"), ("waiting", "ready"), ("ready", "executing"), ("executing", "memory"),
    ]
    assert [e[4] for e in story] == ["s-compute", "s-compute", "s-compute", "s-done"]
    # Times come from the injected clock, not time.time().
    times = [e[5] for e in story]
    assert times == sorted(times) and all(1000.0 < t < 2000.0 for t in times)
    return state


@scenario
def scenario_at_most_nthreads_rest_ready_by_priority(make: Factory) -> WorkerStateMachine:
    state = make(nthreads=2)
    instrs = state.handle(compute("a", priority=(0,)), compute("b", priority=(0,)))
    assert sorted(keys_of(instrs, Execute)) == ["a", "b"]

    instrs = state.handle(compute("c", priority=(5,)), compute("d", priority=(1,)),
                          compute("e", priority=(3,)))
    assert keys_of(instrs, Execute) == []
    assert {k: st(state, k) for k in "cde"} == {"c": "ready", "d": "ready", "e": "ready"}
    assert len(state.executing) == 2

    order = []
    for done in ["a", "b", "d", "e", "c"]:
        instrs = state.handle(success(done))
        assert len(state.executing) <= 2
        order += keys_of(instrs, Execute)
        assert keys_of(instrs, TaskFinishedMsg) == [done]
    assert order == ["d", "e", "c"]  # highest priority (smallest tuple) first
    assert all(st(state, k) == "memory" for k in "abcde")
    return state


@scenario
def scenario_dependencies_fetched_in_batches(make: Factory) -> WorkerStateMachine:
    state = make(transfer_incoming_count_limit=2, transfer_message_bytes_limit=100)
    who_has = {"x1": [A], "x2": [A], "x3": [A], "y": [B, SELF], "w": [C]}
    nbytes = {"x1": 40, "x2": 40, "x3": 40, "y": 10, "w": 10}
    instrs = state.handle(compute("z", who_has=who_has, nbytes=nbytes))
    assert st(state, "z") == "waiting"
    assert keys_of(instrs, Execute) == []
    assert state.tasks["y"].who_has == {B}  # never fetch from ourselves

    outstanding = gather_deps(instrs)
    assert len(outstanding) == 2  # transfer_incoming_count_limit
    all_requests: list[GatherDep] = list(outstanding)
    add_keys: list = []
    executes: list = []
    while outstanding:
        peers = [g.worker for g in outstanding]
        assert len(peers) == len(set(peers)) <= 2
        for g in outstanding:
            assert all(st(state, k) == "flight" for k in g.keys)
            assert g.total_nbytes == sum(nbytes[k] for k in g.keys)
            assert g.total_nbytes <= 100
        g = outstanding.pop(0)
        assert executes == []
        instrs = state.handle(gathered(g.worker, {k: f"data-{k}" for k in g.keys}))
        add_keys += [k for m in of(instrs, AddKeysMsg) for k in m.keys]
        executes += keys_of(instrs, Execute)
        new = gather_deps(instrs)
        all_requests += new
        outstanding += new

    assert executes == ["z"]
    assert st(state, "z") == "executing"
    assert sorted(add_keys) == sorted(who_has)
    by_peer: dict[str, list[set]] = {}
    for g in all_requests:
        by_peer.setdefault(g.worker, []).append(set(g.keys))
    assert sorted(len(b) for b in by_peer[A]) == [1, 2]  # 3 x 40 bytes, 100 per message
    assert set().union(*by_peer[A]) == {"x1", "x2", "x3"}
    assert by_peer[B] == [{"y"}] and by_peer[C] == [{"w"}]
    assert state.data == {k: f"data-{k}" for k in who_has}
    assert story_pairs(state, "x1") == [("released", "fetch"), ("fetch", "flight"), ("flight", "memory")]
    assert state.in_flight_workers == {} and state.in_flight_tasks == set()
    return state


@scenario
def scenario_network_failure_tries_other_holder(make: Factory) -> WorkerStateMachine:
    state = make()
    instrs = state.handle(compute("z", who_has={"x": [A, B]}, nbytes={"x": 10}))
    (g,) = gather_deps(instrs)
    first = g.worker
    other = B if first == A else A
    assert g.keys == {"x"}

    instrs = state.handle(GatherDepNetworkFailureEvent("net-fail", first, ["x"]))
    assert of(instrs, MissingDataMsg) == [MissingDataMsg("net-fail", "x", first)]
    assert [(g.worker, g.keys) for g in gather_deps(instrs)] == [(other, {"x"})]
    assert st(state, "x") == "flight"
    assert state.tasks["x"].who_has == {other}
    assert ("flight", "fetch") in story_pairs(state, "x")

    instrs = state.handle(gathered(other, {"x": 1}))
    assert keys_of(instrs, Execute) == ["z"]
    assert state.data == {"x": 1}
    return state


@scenario
def scenario_network_failure_missing_then_refresh(make: Factory) -> WorkerStateMachine:
    state = make(transfer_message_bytes_limit=100)
    instrs = state.handle(compute("z", who_has={"x": [A], "y": [A]}, nbytes={"x": 80, "y": 80}))
    (g,) = gather_deps(instrs)
    (in_flight,) = g.keys
    (queued,) = {"x", "y"} - g.keys
    assert st(state, in_flight) == "flight" and st(state, queued) == "fetch"

    instrs = state.handle(GatherDepNetworkFailureEvent("net-fail", A, [in_flight]))
    assert st(state, "x") == st(state, "y") == "missing"
    assert gather_deps(instrs) == []
    missing = {(m.key, m.errant_worker) for m in of(instrs, MissingDataMsg)}
    assert (in_flight, A) in missing
    assert {k for k, _ in missing} == {"x", "y"}
    assert st(state, "z") == "waiting"

    instrs = state.handle(RefreshWhoHasEvent("refresh", {"x": [B], "y": [B, SELF]}))
    assert st(state, "x") in ("fetch", "flight") and st(state, "y") in ("fetch", "flight")
    assert state.tasks["y"].who_has == {B}
    outstanding = gather_deps(instrs)
    assert [g.worker for g in outstanding] == [B]
    executes = []
    while outstanding:
        g = outstanding.pop()
        instrs = state.handle(gathered(g.worker, {k: k for k in g.keys}))
        outstanding += gather_deps(instrs)
        executes += keys_of(instrs, Execute)
    assert executes == ["z"]
    assert story_pairs(state, queued)[:3] == [("released", "fetch"), ("fetch", "missing"), ("missing", "fetch")]
    assert ("flight", "missing") in story_pairs(state, in_flight)
    return state


@scenario
def scenario_gather_dep_failure_errs_dependency(make: Factory) -> WorkerStateMachine:
    state = make()
    state.handle(compute("z", who_has={"x": [A]}))
    exc = RuntimeError("could not unpickle")
    instrs = state.handle(GatherDepFailureEvent("gd-fail", A, ["x"], exc, "tb"))
    msgs = {m.key: m for m in of(instrs, TaskErredMsg)}
    assert set(msgs) == {"x", "z"}  # the dependent fails with its input's error
    msg = msgs["x"]
    assert msg.key == "x" and msg.exception is exc and msg.traceback == "tb"
    assert msgs["z"].exception is exc
    assert st(state, "x") == "error"
    assert "x" not in state.data
    assert state.in_flight_tasks == set()

    state.handle(free("z"))
    assert st(state, "z") == "forgotten"
    state.handle(free("x"))
    assert st(state, "x") == "forgotten"
    assert ("error", "released") in story_pairs(state, "x")
    return state


@scenario
def scenario_execute_failure_reports_exception(make: Factory) -> WorkerStateMachine:
    state = make()
    state.handle(compute("x"))
    exc = ZeroDivisionError("boom")
    instrs = state.handle(failure("x", exc, sid="s-fail"))
    assert instrs == [TaskErredMsg("s-fail", "x", exc, "Traceback for x", [("compute", 1.0, 2.0)])]
    assert instrs[0].exception is exc
    assert st(state, "x") == "error"
    assert state.tasks["x"].exception is exc
    assert state.data == {} and state.executing == set()

    # Asked again (a retry): the error is cleared and it runs again.
    instrs = state.handle(compute("x", sid="s-retry"))
    assert instrs == [Execute("s-retry", "x")]
    assert state.tasks["x"].exception is None
    assert story_pairs(state, "x")[-4:] == [
        ("error", "released"), ("released", "waiting"), ("waiting", "ready"), ("ready", "executing"),
    ]
    instrs = state.handle(success("x", 7))
    assert keys_of(instrs, TaskFinishedMsg) == ["x"] and state.data == {"x": 7}
    return state


@scenario
def scenario_free_while_executing_discards_late_result(make: Factory) -> WorkerStateMachine:
    state = make(nthreads=1)
    state.handle(compute("x"), compute("y"))
    assert st(state, "x") == "executing" and st(state, "y") == "ready"

    instrs = state.handle(free("x"))
    assert instrs == []  # the thread cannot be stopped: y must wait for it
    assert st(state, "x") == "cancelled"
    assert st(state, "y") == "ready"

    instrs = state.handle(success("x", "late"))
    assert keys_of(instrs, TaskFinishedMsg) == []
    assert keys_of(instrs, Execute) == ["y"]
    assert "x" not in state.tasks and "x" not in state.data
    # (Duplicate consecutive entries are a separate bug, see test_no_duplicate_log_entries.)
    assert dedup(story_pairs(state, "x")) == [
        ("released", "waiting"), ("waiting", "ready"), ("ready", "executing"),
        ("executing", "cancelled"), ("cancelled", "released"), ("released", "forgotten"),
    ]
    return state


@scenario
def scenario_free_while_executing_discards_late_failure(make: Factory) -> WorkerStateMachine:
    state = make()
    state.handle(compute("x"))
    state.handle(free("x"))
    instrs = state.handle(failure("x"))
    assert instrs == []
    assert "x" not in state.tasks and state.executing == set()
    return state


@scenario
def scenario_compute_again_while_cancelled_resumes(make: Factory) -> WorkerStateMachine:
    state = make()
    state.handle(compute("x"))
    state.handle(free("x"))
    assert st(state, "x") == "cancelled"

    instrs = state.handle(compute("x", sid="again"))
    assert instrs == []  # still running: no second Execute
    assert st(state, "x") == "executing"
    assert ("cancelled", "executing") in story_pairs(state, "x")

    instrs = state.handle(success("x", 5))
    assert keys_of(instrs, TaskFinishedMsg) == ["x"]
    assert state.data == {"x": 5}
    return state


@scenario
def scenario_free_memory_key_deletes_data(make: Factory) -> WorkerStateMachine:
    state = make()
    state.handle(compute("x"), success("x", 1))
    assert state.data == {"x": 1}
    instrs = state.handle(free("x"))
    assert instrs == []
    assert state.data == {} and state.tasks == {}
    assert story_pairs(state, "x")[-2:] == [("memory", "released"), ("released", "forgotten")]
    return state


@scenario
def scenario_resources_limit_concurrency(make: Factory) -> WorkerStateMachine:
    state = make(nthreads=4, resources={"GPU": 2})
    gpu = {"GPU": 1}
    instrs = state.handle(
        compute("g1", priority=(1,), resources=gpu),
        compute("g2", priority=(2,), resources=gpu),
        compute("g3", priority=(3,), resources=gpu),
        compute("n1", priority=(4,)),
    )
    assert sorted(keys_of(instrs, Execute)) == ["g1", "g2", "n1"]
    assert st(state, "g3") == "constrained"
    assert state.available_resources == {"GPU": 0}
    assert len(state.executing) == 3 < state.nthreads

    instrs = state.handle(compute("g4", priority=(5,), resources=gpu))
    assert st(state, "g4") == "constrained" and instrs == []
    instrs = state.handle(free("g4"))
    assert st(state, "g4") == "forgotten"
    assert [ts.key for ts in state.constrained] == ["g3"]

    instrs = state.handle(success("g1"))
    assert keys_of(instrs, Execute) == ["g3"]
    assert state.available_resources == {"GPU": 0}
    state.handle(success("g2"), success("g3"), success("n1"))
    assert state.available_resources == {"GPU": 2}
    assert ("constrained", "executing") in story_pairs(state, "g3")
    assert ("constrained", "released") in story_pairs(state, "g4")
    return state


@scenario
def scenario_reschedule(make: Factory) -> WorkerStateMachine:
    state = make(nthreads=1)
    state.handle(compute("x"), compute("y"))
    instrs = state.handle(RescheduleEvent("resched", "x"))
    assert of(instrs, RescheduleMsg) == [RescheduleMsg("resched", "x")]
    assert keys_of(instrs, Execute) == ["y"]
    assert st(state, "x") == "released"
    assert state.tasks["x"] not in state.executing
    assert story_pairs(state, "x")[-1] == ("executing", "released")
    return state


@scenario
def scenario_secede_frees_a_thread(make: Factory) -> WorkerStateMachine:
    state = make(nthreads=1)
    state.handle(compute("x"), compute("y"))
    assert st(state, "y") == "ready"
    instrs = state.handle(SecedeEvent("secede", "x", 1.5))
    assert of(instrs, LongRunningMsg) == [LongRunningMsg("secede", "x", 1.5)]
    assert keys_of(instrs, Execute) == ["y"]
    assert st(state, "x") == "long-running"
    assert state.tasks["x"] in state.long_running and state.tasks["x"] not in state.executing

    instrs = state.handle(success("x", 1))
    assert keys_of(instrs, TaskFinishedMsg) == ["x"]
    assert state.long_running == set() and state.data == {"x": 1}
    assert ("long-running", "memory") in story_pairs(state, "x")
    return state


@scenario
def scenario_long_running_error_cancel_reschedule(make: Factory) -> WorkerStateMachine:
    state = make(nthreads=1)
    state.handle(compute("e"), SecedeEvent("s1", "e", 1.0))
    instrs = state.handle(failure("e"))
    assert keys_of(instrs, TaskErredMsg) == ["e"] and st(state, "e") == "error"

    state.handle(compute("c"), SecedeEvent("s2", "c", 1.0))
    assert state.handle(free("c")) == []
    assert st(state, "c") == "cancelled"
    instrs = state.handle(success("c"))
    assert keys_of(instrs, TaskFinishedMsg) == [] and "c" not in state.tasks

    state.handle(compute("r"), SecedeEvent("s3", "r", 1.0))
    instrs = state.handle(RescheduleEvent("resched", "r"))
    assert keys_of(instrs, RescheduleMsg) == ["r"] and st(state, "r") == "released"
    assert state.long_running == set() and state.executing == set()
    assert ("long-running", "error") in story_pairs(state, "e")
    assert ("long-running", "cancelled") in story_pairs(state, "c")
    assert ("long-running", "released") in story_pairs(state, "r")
    return state


@scenario
def scenario_update_data(make: Factory) -> WorkerStateMachine:
    state = make(transfer_incoming_count_limit=1)
    instrs = state.handle(UpdateDataEvent("scatter", {"s": 1}, {"s": 28}))
    assert instrs == []
    assert state.data == {"s": 1} and st(state, "s") == "memory"
    assert state.tasks["s"].nbytes == 28
    assert story_pairs(state, "s") == [("released", "memory")]

    # A dependency with no known holder is missing; one waits its turn in fetch.
    instrs = state.handle(compute("z", who_has={"m": [], "p": [A], "q": [B]}))
    assert of(instrs, MissingDataMsg) == [MissingDataMsg("compute-z", "m", None)]
    assert st(state, "m") == "missing"
    (g,) = gather_deps(instrs)
    (queued,) = {"p", "q"} - g.keys
    assert st(state, queued) == "fetch"

    instrs = state.handle(UpdateDataEvent("scatter2", {"m": "M", queued: "Q"}, {}))
    assert st(state, "m") == "memory" and st(state, queued) == "memory"
    assert keys_of(instrs, Execute) == []
    (flying,) = g.keys
    instrs = state.handle(gathered(g.worker, {flying: "F"}))
    assert keys_of(instrs, Execute) == ["z"]
    assert gather_deps(instrs) == []  # the queued key arrived by update-data
    assert ("missing", "memory") in story_pairs(state, "m")
    assert ("fetch", "memory") in story_pairs(state, queued)
    return state


@scenario
def scenario_acquire_replicas(make: Factory) -> WorkerStateMachine:
    state = make()
    instrs = state.handle(AcquireReplicasEvent("acquire", {"r": [A], "lonely": [SELF]}, {"r": 50}))
    assert of(instrs, GatherDep) == [GatherDep("acquire", A, {"r"}, 50)]
    assert of(instrs, MissingDataMsg) == [MissingDataMsg("acquire", "lonely", None)]
    assert st(state, "r") == "flight" and st(state, "lonely") == "missing"

    instrs = state.handle(gathered(A, {"r": "R"}, sid="got-r"))
    assert instrs == [AddKeysMsg("got-r", ["r"])]
    assert state.data == {"r": "R"} and st(state, "r") == "memory"

    # The scheduler now asks us to compute a key we already hold: answer at once.
    instrs = state.handle(compute("r", sid="compute-r"))
    assert instrs == [TaskFinishedMsg("compute-r", "r", 10, "", [])]
    assert st(state, "r") == "memory" and state.data == {"r": "R"}
    return state


@scenario
def scenario_compute_key_in_flight_reports_on_arrival(make: Factory) -> WorkerStateMachine:
    state = make()
    state.handle(AcquireReplicasEvent("acquire", {"r": [A]}, {}))
    assert st(state, "r") == "flight"
    assert state.handle(compute("r")) == []
    instrs = state.handle(gathered(A, {"r": 3}, sid="got"))
    assert instrs == [TaskFinishedMsg("got", "r", 10, "", [])]
    assert state.data == {"r": 3}
    return state


@scenario
def scenario_compute_key_whose_transfer_fails_computes_it(make: Factory) -> WorkerStateMachine:
    """A key asked for while in flight, whose holder then dies, is computed here instead
    (found by killing a worker mid-graph: the key used to stay 'missing' for ever)."""
    state = make()
    state.handle(AcquireReplicasEvent("acquire", {"r": [A]}, {}))
    assert st(state, "r") == "flight"
    assert state.handle(compute("r")) == []
    instrs = state.handle(GatherDepNetworkFailureEvent("dead", A, ["r"]))
    assert keys_of(instrs, Execute) == ["r"]
    assert st(state, "r") == "executing"
    assert ("flight", "waiting") in story_pairs(state, "r")
    instrs = state.handle(success("r", 4))
    assert keys_of(instrs, TaskFinishedMsg) == ["r"]
    return state


@scenario
def scenario_free_waiting_task_releases_its_fetches(make: Factory) -> WorkerStateMachine:
    state = make(transfer_incoming_count_limit=1)
    instrs = state.handle(compute("z", who_has={"m": [], "p": [A], "q": [B]}))
    (g,) = gather_deps(instrs)
    (flying,) = g.keys
    (queued,) = {"p", "q"} - g.keys
    assert st(state, "m") == "missing" and st(state, queued) == "fetch"

    instrs = state.handle(free("z"))
    assert instrs == []
    assert st(state, "z") == "forgotten"
    assert st(state, "m") == "forgotten" and st(state, queued) == "forgotten"
    assert st(state, flying) == "cancelled"  # the transfer cannot be called back

    instrs = state.handle(gathered(g.worker, {flying: "late"}))
    assert instrs == []  # no AddKeysMsg, and the other peer is not asked
    assert st(state, flying) == "forgotten" and state.data == {}
    assert state.tasks == {}
    assert story_pairs(state, "z")[-2:] == [("waiting", "released"), ("released", "forgotten")]
    assert ("fetch", "released") in story_pairs(state, queued)
    assert ("missing", "released") in story_pairs(state, "m")
    assert ("flight", "cancelled") in story_pairs(state, flying)
    return state


@scenario
def scenario_cancelled_flight_resumes_when_needed_again(make: Factory) -> WorkerStateMachine:
    state = make()
    instrs = state.handle(compute("z", who_has={"x": [A]}))
    assert [g.keys for g in gather_deps(instrs)] == [{"x"}]
    state.handle(free("z"))
    assert st(state, "x") == "cancelled"

    instrs = state.handle(compute("z", who_has={"x": [A]}, sid="again"))
    assert gather_deps(instrs) == []  # the first transfer is still under way
    assert st(state, "x") == "flight" and st(state, "z") == "waiting"

    instrs = state.handle(gathered(A, {"x": 1}, sid="got"))
    assert of(instrs, AddKeysMsg) == [AddKeysMsg("got", ["x"])]
    assert keys_of(instrs, Execute) == ["z"]
    assert ("cancelled", "flight") in story_pairs(state, "x")
    return state


@scenario
def scenario_free_ready_task(make: Factory) -> WorkerStateMachine:
    state = make(nthreads=1)
    state.handle(compute("a"), compute("b"))
    assert st(state, "b") == "ready"
    assert state.handle(free("b")) == []
    assert st(state, "b") == "forgotten"
    instrs = state.handle(success("a"))
    assert keys_of(instrs, Execute) == []  # the stale heap entry is skipped
    assert ("ready", "released") in story_pairs(state, "b")
    return state


@scenario
def scenario_failure_reported_for_waiting_task(make: Factory) -> WorkerStateMachine:
    state = make()
    state.handle(compute("z", who_has={"x": [A]}))
    exc = KeyError("stale")
    instrs = state.handle(failure("z", exc, sid="fail"))
    assert of(instrs, TaskErredMsg, key="z")[0].exception is exc
    assert st(state, "z") == "error"
    assert ("waiting", "error") in story_pairs(state, "z")
    return state


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(name):
    state = SCENARIOS[name](new_state)
    assert state.log.entries  # it did something
    validate_state(state)


# ----------------------------------------------------------------------------- table coverage

#: Table entries whose function lands in another state than the one asked for;
#: the log records the state reached, so this is how each one shows up there.
LOGGED_AS = {
    ("executing", "released"): ("executing", "cancelled"),
    ("long-running", "released"): ("long-running", "cancelled"),
    ("flight", "released"): ("flight", "cancelled"),
    ("executing", "rescheduled"): ("executing", "released"),
    ("long-running", "rescheduled"): ("long-running", "released"),
    ("cancelled", "waiting"): ("cancelled", "executing"),
    ("cancelled", "fetch"): ("cancelled", "flight"),
}
#: Other landings of table entries: ("released", "fetch") with no known holder.
ALSO_LOGGED = {("released", "missing")}


def test_transition_table_covered_by_logged_transitions():
    table = set(WorkerStateMachine().TRANSITIONS)
    assert set(LOGGED_AS) <= table
    seen: set[tuple[str, str]] = set()
    for name in sorted(SCENARIOS):
        seen |= log_pairs(SCENARIOS[name](new_state))
    uncovered = sorted(e for e in table if LOGGED_AS.get(e, e) not in seen)
    assert uncovered == [], f"table entries without a scenario: {uncovered}"
    # Every logged pair is explained by the table (no transition outside it).
    explained = {LOGGED_AS.get(e, e) for e in table} | ALSO_LOGGED
    assert sorted(seen - explained) == []


def test_transition_table_covered_by_calls():
    """Exact: every table function is called through its own entry at least once."""
    called: set[tuple[str, str]] = set()

    def instrumented(**kwargs) -> WorkerStateMachine:
        state = new_state(**kwargs)
        for entry, func in list(state.TRANSITIONS.items()):
            def wrapper(*args, _entry=entry, _func=func, **kw):
                called.add(_entry)
                return _func(*args, **kw)
            state.TRANSITIONS[entry] = wrapper
        return state

    for name in sorted(SCENARIOS):
        SCENARIOS[name](instrumented)
    missing = sorted(set(WorkerStateMachine().TRANSITIONS) - called)
    assert missing == [], f"table entries never exercised: {missing}"


# ----------------------------------------------------------------------------- errors and validation


def test_invalid_transition_for_missing_table_entry():
    state = new_state()
    del state.TRANSITIONS[("waiting", "ready")]
    with pytest.raises(InvalidTransition) as info:
        state.handle(compute("x"))
    err = info.value
    assert (err.key, err.start, err.finish) == ("x", "waiting", "ready")
    assert ("x", "released", "waiting") in [e[:3] for e in err.story]
    assert "'waiting' -> 'ready'" in str(err)


def test_invalid_transition_for_event_in_wrong_state():
    state = new_state(nthreads=1)
    state.handle(compute("a"), compute("b"))
    with pytest.raises(InvalidTransition) as info:
        state.handle(RescheduleEvent("bogus", "b"))  # b never started
    assert (info.value.start, info.value.finish) == ("ready", "rescheduled")


def _executing_x(state):
    state.handle(compute("x"))


def _memory_x(state):
    state.handle(compute("x"), success("x", 1))


def _flight_x(state):
    state.handle(compute("z", who_has={"x": [A]}))


CORRUPTIONS = {
    "memory-without-data": (_memory_x, lambda s: s.data.pop("x"), "in memory but not in data"),
    "data-without-memory": (_executing_x, lambda s: s.data.__setitem__("x", 1), "has data but is executing"),
    "executing-not-in-set": (_executing_x, lambda s: s.executing.clear(), "executing but not in executing"),
    "too-many-executing": (_executing_x, lambda s: setattr(s, "nthreads", 0), "1 tasks executing on 0 threads"),
    "flight-not-tracked": (_flight_x, lambda s: s.in_flight_tasks.clear(), "in flight but not in in_flight_tasks"),
    "ready-dep-not-in-memory": (
        lambda s: s.handle(UpdateDataEvent("u", {"x": 1}, {}), compute("z", who_has={"x": [A]}),
                           compute("y")),
        lambda s: (setattr(s.tasks["x"], "state", "fetch"), s.data.pop("x")),
        "with a dependency not in memory",
    ),
    "waiting-for-nothing": (
        _flight_x,
        lambda s: (s.tasks["z"].dependencies.clear(), s.tasks["z"].waiting_for_data.clear()),
        "waiting for nothing",
    ),
    "stale-executing-entry": (
        _memory_x, lambda s: s.executing.add(s.tasks["x"]), "in executing set",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_validate_state_detects_corruption(name):
    setup, corrupt, message = CORRUPTIONS[name]
    state = new_state()
    setup(state)
    validate_state(state)  # fine before
    corrupt(state)
    with pytest.raises(InvalidStateError, match=message):
        validate_state(state)
    # ... and handle() checks after every batch when validate=True.
    with pytest.raises(InvalidStateError, match=message):
        state.handle(free("no-such-key"))


def test_no_validation_when_disabled():
    state = WorkerStateMachine(address=SELF, nthreads=1, validate=False, clock=FakeClock())
    state.handle(compute("x"), success("x", 1))
    state.data.pop("x")
    assert state.handle(free("no-such-key")) == []  # not checked


def test_compute_task_is_idempotent_while_queued_or_running():
    state = new_state(nthreads=1)
    state.handle(compute("a"), compute("b"))
    assert state.handle(compute("a"), compute("b")) == []
    assert st(state, "a") == "executing" and st(state, "b") == "ready"
    assert len(state.ready) == 1


def test_messages_to_wire():
    msg = TaskErredMsg("sid", "x", ValueError("v"), "tb", [])
    wire = msg.to_wire()
    assert wire["op"] == "task_erred" and wire["key"] == "x" and wire["stimulus_id"] == "sid"
    assert MissingDataMsg("sid", "x", A).to_wire() == {
        "op": "missing_data", "stimulus_id": "sid", "key": "x", "errant_worker": A,
    }


# ----------------------------------------------------------------------------- known bugs


def test_second_free_of_cancelled_task_keeps_thread_slot():
    state = new_state(nthreads=1)
    state.handle(compute("x"), compute("y"))
    state.handle(free("x"))
    instrs = state.handle(free("x"))  # e.g. a duplicate free-keys
    # x's thread is still running: y must not start on a second thread.
    assert keys_of(instrs, Execute) == []
    assert st(state, "y") == "ready"
    assert state.tasks["x"] in state.executing


def test_resume_after_second_free_keeps_executing_set():
    state = new_state(nthreads=1)
    state.handle(compute("x"))
    state.handle(free("x"), free("x"))
    state.handle(compute("x"))  # raises InvalidStateError with validate=True
    assert st(state, "x") == "executing" and state.tasks["x"] in state.executing


def test_second_free_of_cancelled_task_keeps_resources():
    state = new_state(nthreads=2, resources={"GPU": 1})
    state.handle(compute("x", resources={"GPU": 1}), compute("y", resources={"GPU": 1}))
    state.handle(free("x"), free("x"))
    assert state.available_resources == {"GPU": 0}
    assert st(state, "y") == "constrained"


def test_refresh_who_has_of_queued_fetch_key():
    state = new_state(transfer_incoming_count_limit=1)
    instrs = state.handle(compute("z", who_has={"x": [A], "y": [B]}))
    (g,) = gather_deps(instrs)
    (queued,) = {"x", "y"} - g.keys
    assert st(state, queued) == "fetch"
    state.handle(RefreshWhoHasEvent("refresh", {queued: [C]}))  # old holder lost it
    instrs = state.handle(gathered(g.worker, {k: 1 for k in g.keys}))
    assert [(g2.worker, g2.keys) for g2 in gather_deps(instrs)] == [(C, {queued})]


def test_new_holder_of_queued_fetch_key_is_used_after_network_failure():
    state = new_state(transfer_message_bytes_limit=100)
    instrs = state.handle(compute("z1", who_has={"x": [A], "y": [A]}, nbytes={"x": 80, "y": 80}))
    (g,) = gather_deps(instrs)
    (queued,) = {"x", "y"} - g.keys
    instrs = state.handle(compute("z2", who_has={queued: [A, B]}))
    assert state.tasks[queued].who_has == {A, B}
    # The new, idle holder is asked at once instead of waiting behind A.
    assert [(g2.worker, g2.keys) for g2 in gather_deps(instrs)] == [(B, {queued})]
    state.handle(GatherDepNetworkFailureEvent("net", A, list(g.keys)))
    assert st(state, queued) == "flight"


def test_peer_without_the_key_reports_missing_data():
    state = new_state()
    state.handle(compute("z", who_has={"x": [A]}))
    instrs = state.handle(gathered(A, {}, sid="empty"))
    assert st(state, "x") == "missing"
    assert of(instrs, MissingDataMsg, key="x") == [MissingDataMsg("empty", "x", A)]


def test_cancelled_executing_task_needed_as_dependency():
    state = new_state(nthreads=2)
    state.handle(compute("x"))
    state.handle(free("x"))
    assert st(state, "x") == "cancelled"
    state.handle(compute("z", who_has={"x": [A]}))
    assert st(state, "z") == "waiting"
    instrs = state.handle(success("x", 1))
    # Today: x ends "released" (result dropped, nothing fetches it), z waits forever.
    # Either the late result is kept, or x is fetched from A; z must not be stranded.
    assert keys_of(instrs, Execute) == ["z"] or [g.keys for g in gather_deps(instrs)] == [{"x"}]


def test_free_dependency_with_its_executing_dependent():
    state = new_state()
    state.handle(UpdateDataEvent("u", {"x": 1}, {}), compute("z", who_has={"x": [A]}))
    assert st(state, "z") == "executing"
    state.handle(free("z", "x"))
    state.handle(success("z"))
    assert "x" not in state.data
    assert state.tasks == {}


def test_story_includes_recommendations_from_indirect_transitions():
    state = new_state()
    state.handle(compute("z", who_has={"x": [A]}))
    state.handle(free("z"))
    assert all(not isinstance(r, TaskState) for e in state.log.entries for r in e[3])
    assert any(e[0] == "z" and e[1:3] == ("waiting", "released") for e in state.story("x"))


def test_update_data_replaces_value_in_memory():
    state = new_state()
    state.handle(UpdateDataEvent("u1", {"s": 1}, {"s": 28}))
    state.handle(UpdateDataEvent("u2", {"s": "new"}, {"s": 52}))
    assert state.tasks["s"].nbytes == 52
    assert state.data == {"s": "new"}


def test_comm_nbytes_returns_to_zero():
    state = new_state()
    state.handle(AcquireReplicasEvent("acquire", {"x": [A]}, {}))  # size unknown: counted as 0
    assert state.comm_nbytes == 0
    state.handle(compute("z", who_has={"x": [A]}, nbytes={"x": 100}))
    state.handle(gathered(A, {"x": 1}))
    assert state.comm_nbytes == 0


def test_gather_dep_failure_errs_waiting_dependent():
    state = new_state()
    state.handle(compute("z", who_has={"x": [A]}))
    exc = RuntimeError("bad pickle")
    instrs = state.handle(GatherDepFailureEvent("gd-fail", A, ["x"], exc, "tb"))
    assert st(state, "z") == "error"
    assert of(instrs, TaskErredMsg, key="z")


def test_no_duplicate_log_entries():
    state = new_state()
    state.handle(compute("x"))
    state.handle(free("x"))
    assert story_pairs(state, "x")[3:] == [("executing", "cancelled")]
