"""Graph translation (runtime.collections.translate_graph) and dask-scheduler registration,
without sockets: a client-like object stands in for the Client."""

from __future__ import annotations

import pickle

import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

from cluster.runtime import collections as rc  # noqa: E402
from cluster.runtime.comm.serialize import dumps_function  # noqa: E402
from cluster.runtime.execution import TaskRef as OurRef  # noqa: E402
from dask._task_spec import Alias, DataNode, Task, TaskRef  # noqa: E402
from dask.order import order  # noqa: E402


def inc(x):
    return x + 1


def add(x, y):
    return x + y


class StubClient:
    """What translate_graph uses of a Client: its futures and its function pickler."""

    def __init__(self, held=()):
        self.futures = {k: object() for k in held}

    def _serialize_function(self, func):
        return dumps_function(func)


def run_recipe(recipe, values):
    """Do what a worker does with a recipe: unpickle, put the values for the refs, call."""
    func_b, args_b = recipe
    func = pickle.loads(func_b)
    args, kwargs = pickle.loads(args_b)
    node, refs = args
    assert all(isinstance(r, OurRef) for r in refs.values())
    return func(node, {k: values[k] for k in refs}, **kwargs)


def translate(dsk, keys, held=(), **kw):
    return rc.translate_graph(StubClient(held), dsk, keys, **kw)


LEGACY = {
    "a": 1,
    "b": (inc, "a"),
    ("c", 0): (add, "a", "b"),
    ("c", 1): (add, ("c", 0), 10),
    "unused": (inc, 100),
}


def test_one_message_with_the_culled_graph():
    sub = translate(LEGACY, [("c", 1), ["b"]])
    msg = sub.msg
    assert msg["op"] == "update_graph"
    assert sub.wanted == [("c", 1), "b"] and msg["keys"] == [("c", 1), "b"]
    assert set(msg["tasks"]) == {"a", "b", ("c", 0), ("c", 1)}  # "unused" culled
    deps = {k: set(v) for k, v in msg["dependencies"].items()}
    assert deps == {"b": {"a"}, ("c", 0): {"a", "b"}, ("c", 1): {("c", 0)}}
    assert msg["restrictions"] == {} and msg["retries"] == {} and msg["user_priority"] == {}


def test_tasks_sent_in_dask_order():
    x = da.ones((40, 40), chunks=10)
    y = (x + x.T).sum()
    dsk = dict(y.__dask_graph__())
    (key,) = [y.__dask_keys__()] if not isinstance(y.__dask_keys__(), list) else y.__dask_keys__()
    sub = translate(y, [key])
    converted = rc._materialize(y)
    prio = order(converted)
    sent = list(sub.msg["tasks"])
    assert sent == sorted(sent, key=prio.__getitem__)
    assert len(sent) <= len(dsk)


def test_recipes_run_the_nodes_as_dask_defines_them():
    msg = translate(LEGACY, [("c", 1)]).msg
    values = {}
    for key, recipe in msg["tasks"].items():  # dependencies first: dask's order
        values[key] = run_recipe(recipe, values)
    assert values == {"a": 1, "b": 2, ("c", 0): 3, ("c", 1): 13}


def test_task_spec_nodes_aliases_and_literals():
    dsk = {
        "x": DataNode("x", [1, 2, 3]),
        "y": Task("y", sum, TaskRef("x")),
        "z": Alias("z", "y"),
        "lit": "a string",
    }
    msg = translate(dsk, ["z", "lit"]).msg
    values = {}
    for key, recipe in msg["tasks"].items():
        values[key] = run_recipe(recipe, values)
    assert values["z"] == 6 and values["lit"] == "a string"


def test_keys_held_as_futures_are_dependencies_not_tasks():
    dsk = {"y": Task("y", inc, TaskRef("x")), "z": Task("z", add, TaskRef("y"), TaskRef("x"))}
    msg = translate(dsk, ["z"], held=["x"]).msg
    assert set(msg["tasks"]) == {"y", "z"}
    assert set(msg["dependencies"]["y"]) == {"x"}
    # every wanted key already a future: nothing to send
    sub = translate({}, ["x"], held=["x"])
    assert sub.msg is None and sub.wanted == ["x"]


def test_missing_dependency_refused_naming_the_key():
    dsk = {"y": Task("y", inc, TaskRef("nowhere")), "z": Task("z", inc, TaskRef("y"))}
    with pytest.raises(ValueError, match="nowhere"):
        translate(dsk, ["z"])


def test_cycle_refused_naming_a_key():
    dsk = {"a": (inc, "b"), "b": (inc, "c"), "c": (inc, "a"), "out": (inc, "a")}
    with pytest.raises(ValueError, match=r"cycle.*'[abc]'"):
        translate(dsk, ["out"])


def test_unknown_output_key_refused():
    with pytest.raises(ValueError, match="'missing'"):
        translate(LEGACY, ["b", "missing"])


def test_annotations_become_per_key_fields():
    ann = {
        "priority": {"b": 5},
        "retries": {"b": 2, "a": 0},
        "resources": {"b": {"GPU": 1}},
        "workers": {"b": ["tcp://10.0.0.1:1"], ("c", 0): "tcp://10.0.0.2:2"},
        "allow_other_workers": {"b": True},
    }
    msg = translate(LEGACY, [("c", 1)], annotations=ann).msg
    assert msg["user_priority"] == {"b": 5}
    assert msg["retries"] == {"b": 2}
    assert msg["resources"] == {"b": {"GPU": 1}}
    assert msg["restrictions"] == {"b": ["tcp://10.0.0.1:1"], ("c", 0): ["tcp://10.0.0.2:2"]}
    assert msg["loose_restrictions"] == ["b"]


def test_dask_annotate_context_and_options_apply_to_every_task():
    with dask.annotate(retries=3):
        msg = translate(LEGACY, ["b"]).msg
    assert msg["retries"] == {"a": 3, "b": 3}
    msg = translate(LEGACY, ["b"], workers="tcp://10.0.0.1:1", allow_other_workers=True,
                    priority=7, resources={"MEM": 2}).msg
    assert msg["restrictions"] == {"a": ["tcp://10.0.0.1:1"], "b": ["tcp://10.0.0.1:1"]}
    assert sorted(msg["loose_restrictions"]) == ["a", "b"]
    assert msg["user_priority"] == {"a": 7, "b": 7}
    assert msg["resources"] == {"a": {"MEM": 2}, "b": {"MEM": 2}}


def test_unsupported_annotation_refused_by_name():
    with pytest.raises(ValueError, match="'colour'.*accepted"):
        translate(LEGACY, ["b"], annotations={"colour": {"b": "blue"}})
    # those meant for dask's own schedulers are dropped silently
    assert translate(LEGACY, ["b"], annotations={"fuse": {"b": False}}).msg is not None


def test_bad_annotation_values_refused():
    with pytest.raises((TypeError, ValueError)):
        translate(LEGACY, ["b"], annotations={"retries": {"b": "many"}})
    with pytest.raises((TypeError, ValueError)):
        translate(LEGACY, ["b"], annotations={"resources": {"b": ["GPU"]}})


def test_unpicklable_task_refused_naming_the_key():
    import threading

    lock = threading.Lock()
    with pytest.raises(TypeError, match="'locked'"):
        translate({"locked": (id, lock)}, ["locked"])


def test_not_a_graph_refused():
    with pytest.raises(TypeError, match="dask graph"):
        translate(42, ["x"])


# ----------------------------------------------------------------------------- registration


class FakeClient:
    asynchronous = False

    def __init__(self, name):
        self.name = name

    def get(self, dsk, keys, **kwargs):  # pragma: no cover - never called
        raise AssertionError(self.name)


def test_registrations_stack_and_unwind_to_dasks_own_setting():
    before = (dask.config.get("scheduler", None), dask.config.get("dataframe.shuffle.method", None))
    a, b = FakeClient("a"), FakeClient("b")
    rc.register_as_dask_scheduler(a)
    try:
        assert dask.config.get("scheduler") == a.get
        assert dask.config.get("dataframe.shuffle.method") == "tasks"
        rc.register_as_dask_scheduler(b)
        assert dask.config.get("scheduler") == b.get
        rc.register_as_dask_scheduler(a)
        assert dask.config.get("scheduler") == a.get
        rc.unregister_as_dask_scheduler(a)  # the last registration of a
        assert dask.config.get("scheduler") == b.get
        rc.unregister_as_dask_scheduler(b)
        assert dask.config.get("scheduler") == a.get
    finally:
        rc.unregister_as_dask_scheduler(a, everywhere=True)
        rc.unregister_as_dask_scheduler(b, everywhere=True)
    assert (dask.config.get("scheduler", None), dask.config.get("dataframe.shuffle.method", None)) == before


def test_closing_a_client_drops_all_its_registrations():
    before = dask.config.get("scheduler", None)
    a, b = FakeClient("a"), FakeClient("b")
    rc.register_as_dask_scheduler(b)
    rc.register_as_dask_scheduler(a)
    rc.register_as_dask_scheduler(a)
    try:
        rc.unregister_as_dask_scheduler(a, everywhere=True)
        assert dask.config.get("scheduler") == b.get
    finally:
        rc.unregister_as_dask_scheduler(b, everywhere=True)
    assert dask.config.get("scheduler", None) == before
    rc.unregister_as_dask_scheduler(a)  # not registered: nothing happens
    assert dask.config.get("scheduler", None) == before
