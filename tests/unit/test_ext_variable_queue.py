"""The scheduler parts that hold futures (variables, queues, published datasets,
fire-and-forget), without sockets: handlers and hooks called directly on a
``Scheduler`` object, as tests/unit/test_scheduler_extensions.py does."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from cluster.runtime.errors import ClusterTimeoutError, CommClosedError
from cluster.runtime.extensions import holding
from cluster.runtime.extensions.datasets import PublishExtension
from cluster.runtime.extensions.fire_and_forget import HOLDER, FireAndForgetExtension
from cluster.runtime.extensions.queue import QueueExtension
from cluster.runtime.extensions.variable import VariableExtension
from cluster.runtime.scheduler.events import (
    AddWorkerEvent,
    TaskErredEvent,
    TaskFinishedEvent,
    UpdateGraphEvent,
)
from cluster.runtime.scheduler.server import Scheduler

pytestmark = pytest.mark.timeout(30)

W = "tcp://127.0.0.1:1"


def make_scheduler() -> Scheduler:
    s = Scheduler(extensions={"variables": VariableExtension, "queues": QueueExtension,
                              "publish": PublishExtension, "fire_and_forget": FireAndForgetExtension},
                  dashboard_address=None, validate=True)
    s.state.handle(AddWorkerEvent(W, 1, "w", stimulus_id="w"))
    return s


def submit(s: Scheduler, *keys, client: str = "c") -> None:
    s.state.handle(UpdateGraphEvent(client, {k: b"spec" for k in keys}, list(keys), stimulus_id=f"g-{keys}"))


def finish(s: Scheduler, key) -> None:
    s._send(s.state.handle(TaskFinishedEvent(key, W, nbytes=8, stimulus_id=f"done-{key}")))


def wanters(s: Scheduler, key) -> set:
    return {cs.client_key for cs in s.state.tasks[key].who_wants}


def data(value) -> dict:
    return holding.encode(value)


def fut(key) -> dict:
    return {"type": "Future", "key": key}


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- variables


def test_variable_get_waits_for_set_and_times_out():
    s = make_scheduler()
    v = s.extensions["variables"]

    async def main():
        getter = asyncio.ensure_future(v.get("x", client="c"))
        await asyncio.sleep(0)  # the getter is waiting on the scheduler's loop
        assert not getter.done()
        await v.set("x", data(41))
        record = await asyncio.wait_for(getter, 5)
        assert pickle.loads(record["data"]) == 41
        with pytest.raises(TimeoutError, match="'y'"):
            await v.get("y", timeout=0.05)
        with pytest.raises(ClusterTimeoutError):
            await v.get("y", timeout=0)
        assert not v._waiters  # timed-out waits leave nothing behind

    run(main())


def test_variable_holds_its_future_until_replaced_or_deleted():
    s = make_scheduler()
    v = s.extensions["variables"]
    submit(s, "x")

    async def main():
        await v.set("v", fut("x"))
        s.remove_client("c")
        assert "x" in s.state.tasks and wanters(s, "x") == {"variable-v"}
        await v.set("v", fut("x"))  # the same future again: still held
        assert wanters(s, "x") == {"variable-v"}
        await v.set("v", data(1))
        assert "x" not in s.state.tasks  # nobody holds it any more
        submit(s, "y", client="d")
        await v.set("v", fut("y"))
        s.remove_client("d")
        v.delete("v")
        assert "y" not in s.state.tasks
        assert "variable-v" not in s.state.clients  # the pseudo-client is gone too
        v.delete("never-set")  # harmless

    run(main())


def test_variable_get_hands_the_future_to_the_reader():
    s = make_scheduler()
    v = s.extensions["variables"]
    submit(s, "x")
    submit(s, client="reader")  # a connected client that wants nothing yet

    async def main():
        await v.set("v", fut("x"))
        record = await v.get("v", client="reader")
        assert record == fut("x")
        assert wanters(s, "x") == {"c", "variable-v", "reader"}
        await v.set("v", data(0))  # overwritten before the reader's own update-graph: kept
        assert wanters(s, "x") == {"c", "reader"}

    run(main())


def test_variable_nested_futures_are_held_and_unknown_ones_refused():
    s = make_scheduler()
    v = s.extensions["variables"]
    submit(s, "x")

    async def main():
        await v.set("v", {"type": "data", "data": pickle.dumps([1]), "keys": ["x"]})
        assert "variable-v" in wanters(s, "x")
        with pytest.raises(ClusterTimeoutError, match="gone"):
            await v.set("w", fut("gone"), timeout=0.05)
        with pytest.raises(TypeError, match="record"):
            await v.set("w", {"type": "msgpack", "value": 1})

    run(main())


def test_variable_waits_end_when_their_client_leaves_or_the_scheduler_closes():
    s = make_scheduler()
    v = s.extensions["variables"]

    async def main():
        a = asyncio.ensure_future(v.get("x", client="a"))
        b = asyncio.ensure_future(v.get("x", client="b"))
        await asyncio.sleep(0)
        s.remove_client("a")
        with pytest.raises(CommClosedError, match="client a left"):
            await a
        assert not b.done()
        await s.close()
        with pytest.raises(CommClosedError, match="closing"):
            await b

    run(main())


# ----------------------------------------------------------------------------- queues


def test_queue_fifo_qsize_and_batches():
    s = make_scheduler()
    q = s.extensions["queues"]

    async def main():
        for i in range(4):
            await q.put("q", data(i))
        assert q.qsize("q") == 4 and q.qsize("unknown") == 0
        assert pickle.loads((await q.get("q"))["data"]) == 0
        assert [pickle.loads(r["data"]) for r in await q.get("q", batch=2)] == [1, 2]
        assert [pickle.loads(r["data"]) for r in await q.get("q", batch=True)] == [3]
        assert await q.get("q", batch=True) == []  # does not wait
        # A batch that times out half-way puts back what it took, in order.
        await q.put("q", data("a"))
        await q.put("q", data("b"))
        with pytest.raises(TimeoutError):
            await q.get("q", batch=3, timeout=0.05)
        assert [pickle.loads(r["data"]) for r in await q.get("q", batch=2)] == ["a", "b"]
        with pytest.raises(ValueError, match="batch"):
            await q.get("q", batch=-1)
        with pytest.raises(ValueError, match="maxsize"):
            await q.put("other", data(1), maxsize=-2)

    run(main())


def test_queue_get_waits_for_put_and_maxsize_blocks_put():
    s = make_scheduler()
    q = s.extensions["queues"]

    async def main():
        getter = asyncio.ensure_future(q.get("q", client="c"))
        await asyncio.sleep(0)
        assert not getter.done()
        await q.put("q", data("first"))
        assert pickle.loads((await asyncio.wait_for(getter, 5))["data"]) == "first"

        await q.put("b", data(1), maxsize=1)
        with pytest.raises(TimeoutError, match="room"):
            await q.put("b", data(2), timeout=0.05)
        putter = asyncio.ensure_future(q.put("b", data(3), client="c"))
        await asyncio.sleep(0)
        assert not putter.done() and q.qsize("b") == 1
        await q.get("b")
        await asyncio.wait_for(putter, 5)
        assert [pickle.loads(r["data"]) for r in await q.get("b", batch=True)] == [3]

    run(main())


def test_queue_holds_queued_futures_counting_each_put():
    s = make_scheduler()
    q = s.extensions["queues"]
    submit(s, "x")
    submit(s, client="reader")

    async def main():
        await q.put("q", fut("x"))
        await q.put("q", fut("x"))
        s.remove_client("c")
        assert wanters(s, "x") == {"queue-q"}
        assert await q.get("q", client="reader") == fut("x")
        assert wanters(s, "x") == {"queue-q", "reader"}  # one still queued
        await q.get("q")
        assert wanters(s, "x") == {"reader"}
        assert "queue-q" not in s.state.clients
        s.remove_client("reader")
        assert "x" not in s.state.tasks

    run(main())


def test_queue_waits_end_when_their_client_leaves():
    s = make_scheduler()
    q = s.extensions["queues"]

    async def main():
        getter = asyncio.ensure_future(q.get("q", client="a"))
        await asyncio.sleep(0)
        s.remove_client("a")
        with pytest.raises(CommClosedError):
            await getter
        await q.put("q", data(1))  # not swallowed by the departed reader
        assert q.qsize("q") == 1

    run(main())


# ----------------------------------------------------------------------------- datasets


def test_publish_put_get_list_delete():
    s = make_scheduler()
    p = s.extensions["publish"]
    submit(s, "x")

    async def main():
        await p.put({"b": fut("x"), "a": data(1)}, client="c")
        assert p.list() == ["a", "b"]
        s.remove_client("c")
        assert wanters(s, "x") == {"published-b"}
        with pytest.raises(KeyError, match="Dataset b already exists"):
            await p.put({"c": data(2), "b": data(3)})
        assert p.list() == ["a", "b"]  # all or none: "c" was not published
        submit(s, "y", client="d")
        await p.put({"b": fut("y")}, override=True)
        s.remove_client("d")
        assert "x" not in s.state.tasks and wanters(s, "y") == {"published-b"}
        assert p.get("b") == fut("y") and p.get("nothing") is None
        p.delete("b")
        p.delete("b")  # twice: harmless
        assert "y" not in s.state.tasks and p.list() == ["a"]

    run(main())


# ----------------------------------------------------------------------------- fire and forget


def test_fire_and_forget_holds_until_done_then_frees():
    s = make_scheduler()
    ff = s.extensions["fire_and_forget"]
    ff.key_arrival_timeout = 0.05  # for "unknown" below
    submit(s, "x", "done")
    finish(s, "done")

    async def main():
        # A finished task is not held at all; an unknown key is skipped.
        assert await ff.hold(["x", "done", "unknown"], client="c") == ["x"]
        s.remove_client("c")
        assert "x" in s.state.tasks and "done" not in s.state.tasks
        assert wanters(s, "x") == {HOLDER}
        finish(s, "x")  # the state lets go of it in the transition to memory: freed at once
        assert "x" not in s.state.tasks
        assert not s.state.clients[HOLDER].wants_what

    run(main())


def test_fire_and_forget_lets_go_of_a_failed_task():
    s = make_scheduler()
    ff = s.extensions["fire_and_forget"]
    submit(s, "x")

    async def main():
        assert await ff.hold(["x"], client="c") == ["x"]
        s.remove_client("c")
        s._send(s.state.handle(TaskErredEvent("x", W, ValueError("boom"), "tb", stimulus_id="err-x")))
        assert "x" not in s.state.tasks

    run(main())


def test_hold_then_release_helpers_forget_an_empty_holder():
    s = make_scheduler()
    submit(s, "x")
    holding.hold(s, "holder", ["x"])
    holding.release(s, "holder", ["x"])
    assert "holder" not in s.state.clients and wanters(s, "x") == {"c"}
