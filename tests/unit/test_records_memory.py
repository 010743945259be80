"""Memory of the scheduler's task records (issue 14): empty sets cost nothing.

``TaskState`` keeps its seven set attributes as ``None`` until something is
put in them; the public names still read and write like sets. These tests
check both halves: what a record allocates (``tracemalloc``, ``sys.getsizeof``)
and that code outside the state machine sees the same sets as before. Pure
state machine, no sockets.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

import pytest
from cluster.runtime.scheduler.events import (
    AddWorkerEvent,
    ClientReleasesKeysEvent,
    TaskFinishedEvent,
    UpdateGraphEvent,
)
from cluster.runtime.scheduler.records import ComputeTaskMsg, TaskState
from cluster.runtime.scheduler.state import SchedulerState

pytestmark = pytest.mark.timeout(60)

SETS = ("dependencies", "dependents", "waiting_on", "waiters", "who_wants", "who_has", "erred_on")
A = "tcp://127.0.0.1:40001"
B = "tcp://127.0.0.1:40002"
SPEC = (b"f", b"a")


def run_to_end(state: SchedulerState, msgs: list, nbytes: int = 8) -> None:
    """Finish every task the instructions start, and what that starts, until none is left."""
    while msgs:
        todo, msgs = msgs, []
        for m in todo:
            if isinstance(m, ComputeTaskMsg):
                msgs.extend(state.handle(TaskFinishedEvent(
                    m.key, m.worker, nbytes=nbytes, type="".join(("in", "t")),
                    startstops=(("compute", 1.0, 1.001),))))


@pytest.fixture
def state() -> SchedulerState:
    s = SchedulerState(validate=True, clock=lambda: 1000.0)
    s.handle(AddWorkerEvent(A, nthreads=1), AddWorkerEvent(B, nthreads=1))
    return s


def test_new_record_allocates_no_set():
    keys = [f"inc-{i:032x}" for i in range(2000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        records = [TaskState(k, SPEC) for k in keys]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_record = grown / len(records)
    # The record itself (about 250 bytes) and its list slot; one empty set alone is 216.
    assert per_record < sys.getsizeof(records[0]) + 64, per_record
    assert all(getattr(records[0], "_" + name) is None for name in SETS)


def test_empty_attributes_read_as_empty_sets():
    ts = TaskState("x-1", SPEC)
    for name in SETS:
        v = getattr(ts, name)
        assert v == set() and not v and len(v) == 0 and list(v) == []
        assert "y" not in v and v <= {1} and v | {1} == {1}
        assert repr(v) == "set()"
    with pytest.raises(KeyError):
        ts.waiters.remove("y")
    with pytest.raises(KeyError):
        ts.waiters.pop()
    ts.waiters.discard("y")
    ts.waiters.clear()
    assert ts._waiters is None


def test_writes_through_the_public_names_stick():
    ts = TaskState("x-1", SPEC)
    ts.who_has.add("w")
    assert ts.who_has == {"w"} and ts._who_has == {"w"}
    ts.waiting_on.update(["a", "b"])
    assert ts.waiting_on == {"a", "b"}
    ts.who_has.discard("w")
    assert ts.who_has == set()
    mine = {"d"}
    ts.dependencies = mine
    assert ts.dependencies is mine  # a set is kept as given
    ts.dependents = ["e"]
    assert ts.dependents == {"e"}
    ts.dependents = ()
    assert ts._dependents is None


def test_prefix_and_type_are_shared_strings(state):
    keys = ["".join(("noop-", f"{i:032x}")) for i in range(20)]
    run_to_end(state, state.handle(UpdateGraphEvent("c", {k: SPEC for k in keys}, keys=keys)))
    tss = [state.tasks[k] for k in keys]
    assert {ts.state for ts in tss} == {"memory"}
    assert len({id(ts.prefix) for ts in tss}) == 1 and tss[0].prefix == "noop"
    assert len({id(ts.type) for ts in tss}) == 1 and tss[0].type == "int"


def test_held_results_hold_only_the_sets_they_need(state):
    keys = [f"noop-{i}" for i in range(50)]
    run_to_end(state, state.handle(UpdateGraphEvent("c", {k: SPEC for k in keys}, keys=keys)))
    for k in keys:
        ts = state.tasks[k]
        assert ts.state == "memory"
        assert {name for name in SETS if getattr(ts, "_" + name) is not None} == {"who_wants", "who_has"}
        assert len(ts.who_has) == 1 and next(iter(ts.who_has)) in ts.who_has
    # Nothing is logged per transition that recommended nothing but one shared dict.
    empties = {id(e[3]) for e in state.log.entries if not e[3]}
    assert len(empties) == 1


def test_sets_of_a_graph_go_back_to_none_once_done(state):
    """A chain a -> b -> c: while running the sets exist, once done they are gone."""
    tasks = {"a": SPEC, "b": SPEC, "c": SPEC}
    deps = {"b": ["a"], "c": ["b"]}
    msgs = state.handle(UpdateGraphEvent("client", tasks, keys=["c"], dependencies=deps))
    a, b, c = (state.tasks[k] for k in "abc")
    assert b.waiting_on == {a} and a.waiters == {b} and a.dependents == {b}
    assert c.dependencies == {b}
    run_to_end(state, msgs)
    assert c.state == "memory"
    # a and b stay released (c still lists b as its input); what held them is gone.
    assert a.state == b.state == "released"
    for ts in (a, b, c):
        assert ts._waiting_on is None and ts._waiters is None
    assert a._who_has is None and b._who_has is None
    state.handle(ClientReleasesKeysEvent(["c"], "client"))
    assert state.tasks == {}
    assert all(getattr(c, "_" + name) is None for name in ("who_wants", "waiters", "dependencies"))


def test_release_and_rerun_keep_the_states_right(state):
    """Through the public names as the rest of the codebase reads them."""
    tasks = {"x": SPEC, "y": SPEC}
    run_to_end(state, state.handle(UpdateGraphEvent("client", tasks, keys=["x", "y"],
                                                    dependencies={"y": ["x"]})))
    x, y = state.tasks["x"], state.tasks["y"]
    assert x.state == y.state == "memory"
    assert x.dependents == {y} and y.dependencies == {x} and x.waiters == set()
    state.handle(ClientReleasesKeysEvent(["x"], "client"))
    assert x.who_wants == set() and x.state == "released"
    state.handle(ClientReleasesKeysEvent(["y"], "client"))
    assert state.tasks == {}


def test_one_holder_is_kept_bare_and_more_make_a_set(state):
    keys = ["k"]
    run_to_end(state, state.handle(UpdateGraphEvent("c", {"k": SPEC}, keys=keys)))
    ts = state.tasks["k"]
    first = next(iter(ts.who_has))
    assert ts._who_has is first and type(ts._who_wants) is not set  # bare: no container
    other = state.workers[B if first.address == A else A]
    state._add_replica(ts, other)
    assert ts._who_has == {first, other} and ts.who_has == {first, other}
    assert other.has_what == {ts: None} and first.has_what == {ts: None}
    state._add_replica(ts, other)  # twice: counted once
    assert len(ts.who_has) == 2 and other.nbytes == 8
    state._remove_replica(ts, first)
    assert ts._who_has is other and first.has_what == {}
    state._remove_replica(ts, first)  # not there: nothing changes
    assert ts._who_has is other and other.nbytes == 8


def test_bare_member_reads_and_writes_through_the_public_name():
    ts = TaskState("x-1", SPEC)
    w1, w2 = object(), object()
    ts._who_has = w1
    view = ts.who_has
    assert view == {w1} and w1 in view and len(view) == 1 and list(view) == [w1]
    ts.who_has.add(w2)
    assert ts._who_has == {w1, w2}
    ts._who_has = w1
    ts.who_has.discard(w1)
    assert not ts.who_has and ts._who_has == set()
    ts._who_has = w1
    ts.who_has.clear()
    assert ts._who_has is None
    ts._who_has = w1
    with pytest.raises(KeyError):
        ts.who_has.remove(w2)
    assert ts.who_has.pop() is w1 and not ts.who_has
