"""The message specs (:mod:`cluster.runtime.messages`): every stream operation has one, what our
own code sends passes, and the shapes the fuzz found are refused, naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cluster.runtime import messages
from cluster.runtime.graph import graph_msg, merge_messages
from cluster.runtime.scheduler import events
from cluster.runtime.scheduler.server import Scheduler
from cluster.runtime.scheduler.state import SchedulerState
from cluster.runtime.worker.events import (
    AddKeysMsg,
    LongRunningMsg,
    MissingDataMsg,
    ReleaseWorkerDataMsg,
    RescheduleMsg,
    TaskErredMsg,
    TaskFinishedMsg,
)

RECIPE = (b"function", b"arguments")


def check(specs, msg: dict, context=None) -> None:
    """Check ``msg`` as the server does: against a spec table, or by decoding it into
    its event (a table of :mod:`cluster.runtime.scheduler.events`)."""
    msg = dict(msg)
    op = msg.pop("op")
    if specs is WORKER or specs is CLIENT:
        ev = events.decode(specs[op], msg, "peer", lambda op: f"{op}-1", context)
        assert getattr(ev, specs[op].PEER) == "peer"
        return
    messages.check_message(specs, op, msg, context)


WORKER = events.WORKER_STREAM
CLIENT = events.CLIENT_STREAM


def test_every_stream_operation_has_a_spec():
    """A new operation without a spec would reach the state unchecked."""
    s = Scheduler(dashboard_address=None)
    assert s.worker_ops is WORKER
    assert set(s.client_ops) == set(CLIENT) | {"close_client"}
    assert set(s.stream_handlers) == set(messages.SCHEDULER_STREAM_OPENINGS)
    assert set(messages.SCHEDULER_REQUESTS) <= set(s.handlers)


@pytest.mark.parametrize("msg", [
    TaskFinishedMsg("s", "k", 28, "int", [("compute", 1.0, 2.5)]).to_wire() | {"data": b"x"},
    TaskFinishedMsg("s", ("k", 1), np.int64(28), "int", []).to_wire(),
    TaskErredMsg("s", "k", ValueError("x"), "Traceback ...", [("compute", 1, 2)]).to_wire(),
    TaskErredMsg("s", "k", None, None, []).to_wire(),
    AddKeysMsg("s", ["a", ("b", 2), 3, 4.5, b"c"]).to_wire(),
    MissingDataMsg("s", "k", "tcp://127.0.0.1:1").to_wire(),
    MissingDataMsg("s", "k", None).to_wire(),
    ReleaseWorkerDataMsg("s", "k").to_wire(),
    RescheduleMsg("s", "k").to_wire(),
    LongRunningMsg("s", "k", 0.25).to_wire(),
    {"op": "heartbeat", "metrics": {"memory": 1, "time": 2.0, "anything": {"nested": 1}}},
    {"op": "worker_status_change", "status": "paused"},
    {"op": "worker_closing", "reason": "lifetime"},
])
def test_what_workers_send_passes(msg):
    check(WORKER, msg)


@pytest.mark.parametrize("options", [
    {},
    {"workers": "tcp://127.0.0.1:1", "allow_other_workers": True},
    {"workers": ["w0", 3], "resources": {"GPU": 1, "MEM": 0.5}, "retries": 2, "priority": -1.5},
])
def test_what_clients_send_passes(options):
    defaults = {"workers": None, "resources": None, "retries": None, "priority": 0,
                "allow_other_workers": False}
    pieces = {"x": (RECIPE, ()), ("y", 0): (RECIPE, ("x",))}
    msg = graph_msg(pieces, list(pieces), **(defaults | options))
    check(CLIENT, msg, SchedulerState())
    check(CLIENT, {**msg, "graph_starts": [0, 1], "fifo_timeout": 0.1}, SchedulerState())
    check(CLIENT, {"op": "client_releases_keys", "keys": ["x"]})


@pytest.mark.parametrize("op, msg, field", [
    ("register_worker", {"address": "tcp://h:1", "nthreads": {}}, "nthreads"),
    ("register_worker", {"address": "tcp://h:1", "nthreads": 0}, "nthreads"),
    ("register_worker", {"address": "tcp://h:1", "name": ["unhashable"]}, "name"),
    ("register_worker", {"address": "tcp://h:1", "resources": {"GPU": "1"}}, "resources"),
    ("register_worker", {"address": 5}, "address"),
    ("register_worker", {"nthreads": 1}, "missing field 'address'"),
    ("register_worker", {"address": "tcp://h:1", "bogus": 1}, "unexpected field 'bogus'"),
    ("register_client", {}, "missing field 'client'"),
    ("register_client", {"client": 7}, "client"),
])
def test_bad_stream_openings_are_refused_naming_the_field(op, msg, field):
    with pytest.raises(TypeError, match=field):
        messages.check_message(messages.SCHEDULER_STREAM_OPENINGS, op, msg)


@pytest.mark.parametrize("msg, field", [
    ({"op": "update_graph", "tasks": {"k": "not a recipe"}}, "tasks"),
    ({"op": "update_graph", "tasks": {("k", frozenset([1])): RECIPE}}, "tasks"),
    ({"op": "update_graph", "tasks": {}, "keys": {"a": 1}}, "keys"),
    ({"op": "update_graph", "tasks": {}, "keys": [{"a": 1}]}, "keys"),
    ({"op": "update_graph", "tasks": {}, "dependencies": {"k": 5}}, "dependencies"),
    ({"op": "update_graph", "tasks": {}, "retries": {"k": -1}}, "retries"),
    ({"op": "update_graph", "tasks": {}, "user_priority": math.nan}, "user_priority"),
    ({"op": "update_graph", "tasks": {}, "client": "someone else"}, "unexpected field 'client'"),
    ({"op": "update_graph", "tasks": {}, "now": 1.0}, "unexpected field 'now'"),  # the scheduler's clock
    ({"op": "update_graph", "tasks": {}, "fifo_timeout": -1}, "fifo_timeout"),
    ({"op": "update_graph", "tasks": {}, "fifo_timeout": math.inf}, "fifo_timeout"),
    ({"op": "update_graph", "tasks": {}, "graph_starts": [0, -3]}, "graph_starts"),
    ({"op": "client_releases_keys", "keys": "abc"}, "keys"),
])
def test_bad_client_messages_are_refused_naming_the_field(msg, field):
    with pytest.raises(TypeError, match=field):
        check(CLIENT, msg, SchedulerState())


def test_a_cyclic_graph_is_refused_as_a_value_error():
    msg = {"op": "update_graph", "tasks": {"a": RECIPE, "b": RECIPE}, "keys": ["a"],
           "dependencies": {"a": ["b"], "b": ["a"]}}
    with pytest.raises(ValueError, match="'update_graph' message: the graph has a cycle"):
        check(CLIENT, msg, SchedulerState())
    # Without a state to check against, only the types are checked.
    check(CLIENT, msg)


@pytest.mark.parametrize("msg, field", [
    ({"op": "task_finished", "key": "k", "nbytes": "28"}, "nbytes"),
    ({"op": "task_finished", "nbytes": 28}, "missing field 'key'"),
    ({"op": "task_finished", "key": "k", "startstops": [("compute", 1.0)]}, "startstops"),
    ({"op": "task_finished", "key": "k", "startstops": [("compute", 1.0, math.inf)]}, "startstops"),
    ({"op": "task_finished", "key": "k", "worker": "tcp://h:1"}, "unexpected field 'worker'"),
    ({"op": "long_running", "key": "k", "compute_duration": math.nan}, "compute_duration"),
    ({"op": "add_keys", "keys": [["a"]]}, "keys"),
    ({"op": "heartbeat", "metrics": [1, 2]}, "metrics"),
    ({"op": "worker_status_change", "status": "asleep"}, "status"),
    ({"op": "worker_status_change"}, "missing field 'status'"),
])
def test_bad_worker_messages_are_refused_naming_the_field(msg, field):
    with pytest.raises(TypeError, match=field):
        check(WORKER, msg)


def test_non_string_field_names_and_hostile_reprs_do_not_break_the_check():
    class BadRepr:
        def __repr__(self):
            raise RuntimeError("no")

    with pytest.raises(TypeError, match="unexpected field 3"):
        events.decode(WORKER["add_keys"], {3: 1}, "w", str)
    with pytest.raises(TypeError, match="keys.*BadRepr"):
        events.decode(WORKER["add_keys"], {"keys": BadRepr()}, "w", str)
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert messages.short_repr(deep).startswith("[[[")
    assert len(messages.short_repr(list(range(10**6)))) <= 80


def test_every_message_to_a_worker_is_decoded_into_its_event_field_for_field():
    """What the scheduler sends a worker (its ...Msg) and the event the worker builds from
    it (runtime.worker.events.decode) name the same fields: one definition of the message."""
    import dataclasses

    from cluster.runtime.scheduler import records
    from cluster.runtime.worker import events as wev

    sent = {cls.op: cls for cls in vars(records).values()
            if isinstance(cls, type) and issubclass(cls, records.Msg) and cls.route == "worker"}
    assert set(wev.FROM_SCHEDULER) <= set(sent)
    for op, event in wev.FROM_SCHEDULER.items():
        msg_fields = {f.name for f in dataclasses.fields(sent[op])} - {"worker"}
        assert msg_fields == {f.name for f in dataclasses.fields(event)}, op
    msg = records.ComputeTaskMsg("s-1", "w", "k", b"spec", [0, 1], None, None, 0.5, None).to_wire()
    ev = wev.decode(msg.pop("op"), msg)
    assert ev == wev.ComputeTaskEvent("s-1", "k", b"spec", (0, 1), {}, {}, 0.5, None, False)
    with pytest.raises(TypeError):
        wev.decode("free_keys", {"keys": ["a"], "bogus": 1})


def _graph(keys, fifo=0.1, **options):
    pieces = {k: (RECIPE, ()) for k in keys}
    return graph_msg(pieces, list(keys), None, None, None, 0, False, fifo, **options)


def test_merged_messages_keep_each_graphs_order_and_batches_apart():
    a, b, c = _graph(["a0", "a1"]), _graph(["b0"]), _graph(["c0", "c1", "c2"])
    release = {"op": "client_releases_keys", "keys": ["old"]}
    out = merge_messages([(a, True), (b, True), (release, True), (c, True)])
    assert [m["op"] for m in out] == ["update_graph", "client_releases_keys", "update_graph"]
    assert list(out[0]["tasks"]) == ["a0", "a1", "b0"] and out[0]["graph_starts"] == [0, 2]
    assert out[0]["keys"] == ["a0", "a1", "b0"] and "graph_starts" not in out[2]
    check(CLIENT, out[0], SchedulerState())
    # map(batch_size=...) batches, and graphs of different fifo_timeout, stay apart.
    batches = [(_graph([f"x{i}"]), False) for i in range(3)]
    assert len(merge_messages(batches)) == 3
    assert len(merge_messages([(_graph(["p"], fifo=0.1), True), (_graph(["q"], fifo=60.0), True)])) == 2
    releases = [({"op": "client_releases_keys", "keys": [k]}, True) for k in "xyz"]
    assert merge_messages(releases) == [{"op": "client_releases_keys", "keys": ["x", "y", "z"]}]
