"""The scheduler's extension seam (runtime.scheduler.extensions), without sockets."""

import asyncio

import pytest
from cluster.runtime.extensions import DEFAULT_EXTENSIONS
from cluster.runtime.scheduler import extensions
from cluster.runtime.scheduler.events import AddWorkerEvent, UpdateGraphEvent
from cluster.runtime.scheduler.server import Scheduler

pytestmark = pytest.mark.timeout(30)


class Counter:
    """A toy extension: one operation and every hook."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.value = 0
        self.seen: list = []
        self.handlers = {"counter_add": self.add}

    def add(self, n: int = 1) -> int:
        self.value += n
        return self.value

    def remove_client(self, client):
        self.seen.append(("client", client))

    def remove_worker(self, worker):
        self.seen.append(("worker", worker))

    async def close(self):
        self.seen.append(("close",))


class Broken:
    handlers: dict = {}

    def __init__(self, scheduler):
        pass

    def remove_client(self, client):
        raise RuntimeError("boom")


def test_extension_handlers_installed_and_named():
    s = Scheduler(extensions={"counter": Counter}, dashboard_address=None)
    ext = s.extensions["counter"]
    assert isinstance(ext, Counter) and ext.scheduler is s
    assert s.handlers["counter_add"](2) == 2


def test_extensions_replace_the_defaults():
    s = Scheduler(extensions={}, dashboard_address=None)
    assert s.extensions == {}
    s = Scheduler(dashboard_address=None)
    assert set(s.extensions) == set(DEFAULT_EXTENSIONS)


def test_extension_claiming_a_taken_operation_is_refused():
    class Greedy:
        def __init__(self, scheduler):
            self.handlers = {"gather": lambda: None}

    with pytest.raises(ValueError, match="'gather'"):
        Scheduler(extensions={"greedy": Greedy}, dashboard_address=None)
    with pytest.raises(TypeError, match="extensions"):
        Scheduler(extensions=[Counter], dashboard_address=None)


def test_hooks_reach_extensions_and_a_failing_one_is_contained(caplog):
    s = Scheduler(extensions={"broken": Broken, "counter": Counter}, dashboard_address=None)
    s.remove_client("c1")
    assert ("client", "c1") in s.extensions["counter"].seen
    assert "failed in remove_client" in caplog.text
    asyncio.run(s.close())
    assert ("close",) in s.extensions["counter"].seen


def test_hold_keys_keeps_a_key_past_its_client():
    s = Scheduler(extensions={}, dashboard_address=None, validate=True)
    st = s.state
    st.handle(AddWorkerEvent("tcp://127.0.0.1:1", 1, "w", stimulus_id="w"))
    st.handle(UpdateGraphEvent("c", {"x": b"spec"}, ["x"], stimulus_id="g"))
    extensions.hold_keys(s, "variable-v", ["x", "unknown"])
    assert {cs.client_key for cs in st.tasks["x"].who_wants} == {"c", "variable-v"}
    s.remove_client("c")
    assert "x" in st.tasks
    extensions.release_keys(s, "variable-v", ["x"])
    assert "x" not in st.tasks
