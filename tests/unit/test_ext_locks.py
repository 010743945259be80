"""Semaphores, locks and events as scheduler extensions, without sockets.

Each test builds a ``Scheduler(extensions=...)`` object (not started) and
drives the extensions' handlers and hooks directly on an event loop; lease
expiry runs on an injected clock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import pickle

import pytest
from cluster.runtime.errors import CommClosedError
from cluster.runtime.extensions import DEFAULT_EXTENSIONS
from cluster.runtime.extensions.event import Event, EventExtension
from cluster.runtime.extensions.lock import Lock
from cluster.runtime.extensions.semaphore import Semaphore, SemaphoreExtension
from cluster.runtime.scheduler.server import Scheduler

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock=None, **kwargs):
    """A scheduler with only our extensions; ``(scheduler, semaphores, events)``."""
    factory = functools.partial(SemaphoreExtension, clock=clock or Clock(), **kwargs)
    s = Scheduler(extensions={"semaphores": factory, "events": EventExtension}, dashboard_address=None)
    return s, s.extensions["semaphores"], s.extensions["events"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def settle():
    """Let every ready task run (handlers waiting on futures resume)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_defaults_installed_with_dask_defaults():
    assert {"semaphores", "events"} <= set(DEFAULT_EXTENSIONS)
    s = Scheduler(dashboard_address=None)
    sem = s.extensions["semaphores"]
    assert (sem.lease_timeout, sem.lease_validation_interval) == (30.0, 10.0)
    assert {"semaphore_acquire", "semaphore_release", "event_wait", "event_set"} <= set(s.handlers)


def test_bad_scheduler_settings_are_refused():
    with pytest.raises(ValueError, match="lease_timeout='soon'"):
        make(lease_timeout="soon")
    with pytest.raises(ValueError, match="lease_validation_interval=0"):
        make(lease_validation_interval=0)
    assert make(lease_timeout="inf")[1].lease_timeout == math.inf


def test_register_acquire_release_value():
    s, ext, _ = make()

    async def main():
        h = s.handlers
        assert h["semaphore_register"](name="db", max_leases=2) == {"max_leases": 2, "lease_timeout": 30.0}
        assert h["semaphore_register"](name="db", max_leases=2)["max_leases"] == 2  # idempotent
        with pytest.raises(ValueError, match="Inconsistent max leases"):
            h["semaphore_register"](name="db", max_leases=3)
        with pytest.raises(ValueError, match="max_leases=0"):
            h["semaphore_register"](name="other", max_leases=0)
        assert await h["semaphore_acquire"](name="db", lease_id="a", client="c1")
        assert await h["semaphore_acquire"](name="db", lease_id="a", client="c1")  # a retry: same lease
        assert await h["semaphore_acquire"](name="db", lease_id="b", client="c2")
        assert h["semaphore_value"](name="db") == 2
        assert not await h["semaphore_acquire"](name="db", lease_id="c", client="c3", timeout=0)
        assert h["semaphore_release"](name="db", lease_id="a") is True
        assert h["semaphore_value"](name="db") == 1
        assert h["semaphore_value"](name="never-made") == 0
        with pytest.raises(RuntimeError, match="not known"):
            await h["semaphore_acquire"](name="never-made", lease_id="x")

    run(main())


def test_waiters_are_served_in_order_without_polling():
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        assert await ext.acquire("L", "a", client="c1")
        b = asyncio.ensure_future(ext.acquire("L", "b", client="c2"))
        c = asyncio.ensure_future(ext.acquire("L", "c", client="c3"))
        await settle()
        assert not b.done() and not c.done()
        assert [w.lease_id for w in ext.semaphores["L"].waiters] == ["b", "c"]
        ext.release("L", "a")
        assert await b is True
        await settle()
        assert not c.done()
        ext.release("L", "b")
        assert await c is True
        assert list(ext.semaphores["L"].leases) == ["c"]

    run(main())


def test_timeout_returns_false_and_leaves_no_waiter():
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        await ext.acquire("L", "a")
        assert await ext.acquire("L", "b", timeout=0.05) is False
        assert not ext.semaphores["L"].waiters
        ext.release("L", "a")
        assert list(ext.semaphores["L"].leases) == []  # the timed-out request got nothing
        with pytest.raises(ValueError, match="timeout=-1"):
            await ext.acquire("L", "c", timeout=-1)

    run(main())


def test_release_of_a_lease_not_held_is_refused_and_logged(caplog):
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        with caplog.at_level(logging.WARNING):
            assert ext.release("L", "nobody") is False
        assert "not held" in caplog.text

    run(main())


def test_release_of_a_waiting_lease_withdraws_the_request():
    """The client gave up (its reply was lost): the queued request must not get the lease later."""
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        await ext.acquire("L", "a")
        b = asyncio.ensure_future(ext.acquire("L", "b"))
        await settle()
        assert ext.release("L", "b") is False
        assert await b is False
        ext.release("L", "a")
        assert ext.get_value("L") == 0

    run(main())


def test_cancelled_acquire_gives_back_a_lease_granted_meanwhile():
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        await ext.acquire("L", "a")
        b = asyncio.ensure_future(ext.acquire("L", "b"))
        await settle()
        ext.release("L", "a")  # grants "b" ...
        b.cancel()  # ... whose handler is cancelled before it can answer
        with pytest.raises(asyncio.CancelledError):
            await b
        assert ext.get_value("L") == 0

    run(main())


def test_leases_of_a_client_that_goes_are_released_and_its_waiters_fail():
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        await ext.acquire("L", "a", client="gone")
        own_wait = asyncio.ensure_future(ext.acquire("L", "a2", client="gone"))
        other = asyncio.ensure_future(ext.acquire("L", "b", client="stays"))
        await settle()
        s.remove_client("gone")  # through the scheduler's hook
        with pytest.raises(CommClosedError, match="client gone went away"):
            await own_wait
        assert await other is True
        assert list(ext.semaphores["L"].leases) == ["b"]

    run(main())


def test_leases_of_a_worker_that_goes_are_released():
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        await ext.acquire("L", "a", client="worker-client", worker="tcp://127.0.0.1:1")
        other = asyncio.ensure_future(ext.acquire("L", "b", client="c", worker="tcp://127.0.0.1:2"))
        await settle()
        ext.remove_worker("tcp://127.0.0.1:2")  # the waiter's worker: it fails, nothing released
        with pytest.raises(CommClosedError):
            await other
        assert list(ext.semaphores["L"].leases) == ["a"]
        third = asyncio.ensure_future(ext.acquire("L", "c", client="c"))
        await settle()
        ext.remove_worker("tcp://127.0.0.1:1")
        assert await third is True
        assert list(ext.semaphores["L"].leases) == ["c"]

    run(main())


def test_leases_not_refreshed_expire_on_the_injected_clock():
    clock = Clock()
    s, ext, _ = make(clock, lease_timeout="30s")

    async def main():
        ext.register("S", 2)
        ext.register("forever", 1, lease_timeout=math.inf)
        ext.register("short", 1, lease_timeout="1s")
        await ext.acquire("S", "a")
        await ext.acquire("S", "b")
        await ext.acquire("forever", "f")
        await ext.acquire("short", "s")
        waiter = asyncio.ensure_future(ext.acquire("S", "c"))
        await settle()
        clock.now += 20
        assert ext.refresh_leases("S", ["a", "unknown"]) == ["unknown"]
        assert sorted(ext.validate_leases()) == [("short", "s")]
        clock.now += 15  # "b" last seen 35 s ago, "a" 15 s ago
        assert ext.validate_leases() == [("S", "b")]
        assert await waiter is True  # the expired lease went to the next in line
        assert sorted(ext.semaphores["S"].leases) == ["a", "c"]
        clock.now += 1e6
        assert ("forever", "f") not in ext.validate_leases()
        assert ext.refresh_leases("S", ["b"]) == ["b"]  # the holder learns it lost it

    run(main())


def test_scheduler_close_fails_waiters_and_close_semaphore_too():
    s, ext, _ = make()

    async def main():
        ext.register("L", 1)
        ext.register("M", 1)
        await ext.acquire("L", "a")
        await ext.acquire("M", "a")
        on_l = asyncio.ensure_future(ext.acquire("L", "b"))
        on_m = asyncio.ensure_future(ext.acquire("M", "b"))
        await settle()
        ext.close_semaphore("M")
        with pytest.raises(RuntimeError, match="'M' was closed"):
            await on_m
        assert "M" not in ext.semaphores
        await s.close()
        with pytest.raises(CommClosedError, match="closing"):
            await on_l

    run(main())


# ----------------------------------------------------------------------------- events


def test_event_set_wakes_every_waiter_and_clear_resets():
    s, _, ev = make()

    async def main():
        h = s.handlers
        assert h["event_is_set"](name="e") is False
        waiters = [asyncio.ensure_future(h["event_wait"](name="e", client=f"c{i}")) for i in range(3)]
        await settle()
        assert not any(w.done() for w in waiters)
        h["event_set"](name="e")
        assert await asyncio.gather(*waiters) == [True, True, True]
        assert h["event_is_set"](name="e") is True
        assert await h["event_wait"](name="e", timeout=0) is True
        h["event_clear"](name="e")
        assert h["event_is_set"](name="e") is False
        assert await h["event_wait"](name="e", timeout=0.05) is False
        assert ev.events == {}  # clear and unwaited: forgotten

    run(main())


def test_event_waits_fail_when_their_client_goes_or_the_scheduler_closes():
    s, _, ev = make()

    async def main():
        gone = asyncio.ensure_future(ev.event_wait("e", client="gone"))
        stays = asyncio.ensure_future(ev.event_wait("e", client="stays"))
        await settle()
        s.remove_client("gone")
        with pytest.raises(CommClosedError):
            await gone
        assert not stays.done()
        await s.close()
        with pytest.raises(CommClosedError, match="closing"):
            await stays
        assert ev.events == {}

    run(main())


def test_event_bad_arguments_are_refused():
    s, _, ev = make()

    async def main():
        with pytest.raises(TypeError, match="name"):
            ev.event_set(name=None)
        with pytest.raises(ValueError, match="timeout='later'"):
            await ev.event_wait("e", timeout="later")

    run(main())


# ----------------------------------------------------------------------------- the handles, offline


class NoClient:
    """Stands for a client: the handles below must not talk to it."""

    asynchronous = False
    id = "fake"

    def sync(self, *args, **kwargs):  # pragma: no cover - failing is the test
        raise AssertionError("the scheduler was asked")


def test_semaphore_refuses_what_does_not_apply():
    with pytest.raises(ValueError, match="scheduler_rpc=.*only None"):
        Semaphore(scheduler_rpc=object(), client=NoClient())
    with pytest.raises(ValueError, match="loop=.*only None"):
        Lock("x", loop=object(), client=NoClient())
    with pytest.raises(ValueError, match="max_leases=0"):
        Semaphore(max_leases=0, client=NoClient())
    with pytest.raises(ValueError, match="lease_timeout='x'"):
        Semaphore(lease_timeout="x", register=False, client=NoClient())
    sem = Semaphore(2, name="s", register=False, client=NoClient())
    with pytest.raises(RuntimeError, match="Released too often"):
        sem.release()
    lock = Lock.__new__(Lock)
    Semaphore._setup(lock, "l", 1, None, NoClient())
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(blocking=False, timeout=1)


def test_handles_pickle_by_name():
    sem = Semaphore(3, name="s", register=False, client=NoClient(), lease_timeout="5s")
    back = pickle.loads(pickle.dumps(sem))
    assert (type(back), back.name, back.max_leases, back._lease_timeout) == (Semaphore, "s", 3, 5.0)
    assert back._client is None and not back._leases  # attaches on first use; holds nothing
    lock = Lock.__new__(Lock)
    Semaphore._setup(lock, "l", 1, None, NoClient())
    back = pickle.loads(pickle.dumps(lock))
    assert (type(back), back.name, back.max_leases) == (Lock, "l", 1)
    ev = pickle.loads(pickle.dumps(Event("e", client=NoClient())))
    assert (type(ev), ev.name, ev._client) == (Event, "e", None)
    assert Semaphore(register=False, client=NoClient()).name.startswith("semaphore-")
    assert Event(client=NoClient()).name.startswith("event-")
