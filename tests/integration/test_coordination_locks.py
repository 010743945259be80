"""Lock, Semaphore and Event on a real cluster (issue 13): from clients and from tasks,
sync and async, across worker processes, with timeouts and dying holders.

Worker processes (``LocalCluster``) unless the test says otherwise; nothing
sleeps to synchronise (tasks sleep only as the work that a lock protects).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest
from cluster.runtime.extensions import DEFAULT_EXTENSIONS
from cluster.runtime.extensions.semaphore import SemaphoreExtension

from cluster import Client, Event, LocalCluster, Lock, Semaphore, get_worker
from tests.helpers import gen_cluster, gen_test, until, until_sync

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- task functions


def append_under_lock(path: str, i: int, lock: Lock | None = None) -> int:
    """Write a begin/end pair of lines to ``path`` under the lock; the worker's pid."""
    lock = lock or Lock("shared-file")
    with lock:
        for tag in ("begin", "end"):
            with open(path, "a") as f:
                f.write(f"{tag} {i} {os.getpid()}\n")
            time.sleep(0.01)  # the work under the lock: a window another writer would hit
    return os.getpid()


def count_active(directory: str, i: int, sem: Semaphore) -> int:
    """Under the semaphore: how many tasks are inside it (each marks itself with a file)."""
    with sem:
        mark = os.path.join(directory, f"active-{i}")
        open(mark, "w").close()
        try:
            time.sleep(0.02)  # the work under the semaphore
            return len([n for n in os.listdir(directory) if n.startswith("active-")])
        finally:
            os.remove(mark)


def wait_for_event(name: str, timeout: float) -> tuple[bool, bool]:
    ev = Event(name)
    return ev.wait(timeout), ev.is_set()


def hold_lock_until_told(pid_file: str) -> str:
    """Take lock "L" (with no lease expiry: only the holder's death frees it), say so, wait."""
    lock = Lock("L", lease_timeout=float("inf"))
    lock.acquire()
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    Event("release-L").wait(60)
    lock.release()
    return "released"


def acquire_lock(timeout: float) -> tuple[bool, str]:
    lock = Lock("L")
    got = lock.acquire(timeout=timeout)
    if got:
        lock.release()
    return got, get_worker().address


def waiters_of(name: str, dask_scheduler=None) -> int:
    sem = dask_scheduler.extensions["semaphores"].semaphores.get(name)
    return 0 if sem is None else len(sem.waiters)


def hold_semaphore(sem: Semaphore, seconds: float) -> int:
    """Hold a lease for ``seconds`` (longer than its lease timeout): refreshes keep it."""
    with sem:
        time.sleep(seconds)  # the work under the semaphore
        return sem.get_value()


def check_blocks(lines: list[str]) -> set[str]:
    """Each begin line is followed by the end line of the same writer; the pids seen."""
    assert len(lines) % 2 == 0, lines
    pids = set()
    for begin, end in zip(lines[::2], lines[1::2], strict=True):
        b, e = begin.split(), end.split()
        assert (b[0], e[0]) == ("begin", "end") and b[1:] == e[1:], f"interleaved: {begin!r} {end!r}"
        pids.add(b[2])
    return pids


# ----------------------------------------------------------------------------- tests


def test_lock_gives_mutual_exclusion_across_worker_processes(tmp_path):
    path = str(tmp_path / "shared.txt")
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        futures = c.map(append_under_lock, [path] * 16, range(16))
        pids = set(c.gather(futures))
        # The lock pickled into tasks re-attaches by name: the same lock.
        passed = Lock("shared-file")
        more = c.map(append_under_lock, [path] * 4, range(16, 20), lock=passed)
        pids |= set(c.gather(more))
        assert passed.locked() is False
    with open(path) as f:
        lines = f.read().splitlines()
    assert len(lines) == 40
    assert check_blocks(lines) == {str(p) for p in pids}
    assert len(pids) == 2  # both worker processes took part


def test_semaphore_bounds_concurrency_of_tasks(tmp_path):
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        sem = Semaphore(max_leases=2, name="two")
        seen = c.gather(c.map(count_active, [str(tmp_path)] * 12, range(12), sem=sem))
        assert 1 <= max(seen) <= 2
        assert sem.get_value() == 0
        with pytest.raises(ValueError, match="Inconsistent max leases"):
            Semaphore(max_leases=3, name="two")


def test_lock_and_semaphore_from_a_sync_client():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        lock, other = Lock("x"), Lock("x", client=c)
        assert lock.acquire() is True and lock.locked() is True
        start = time.monotonic()
        assert other.acquire(timeout=0.3) is False
        assert time.monotonic() - start >= 0.25  # it did wait for its timeout
        assert other.acquire(blocking=False) is False
        assert lock.release() is True
        with pytest.raises(RuntimeError, match="Released too often"):
            lock.release()
        with other:
            assert lock.locked()
        assert not lock.locked()

        sem = Semaphore(max_leases=2)
        assert sem.acquire() and sem.acquire(timeout="100ms")
        assert sem.get_value() == 2
        assert sem.acquire(timeout=0) is False
        assert sem.release() and sem.release()
        with pytest.raises(RuntimeError, match="Released too often"):
            sem.release()
        sem.close()

        # A client that goes away loses its locks: the next waiter proceeds.
        with Client(cluster, set_as_default=False) as c2:
            assert Lock("y", client=c2).acquire()
            assert Lock("y").locked()
        assert Lock("y").acquire(timeout=10)


def test_lock_of_a_killed_worker_is_released_to_the_next_waiter(tmp_path):
    pid_file = str(tmp_path / "holder.pid")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        # Restricted to a: when a dies the holder is not run again elsewhere.
        holder = c.submit(hold_lock_until_told, pid_file, workers=[a], allow_other_workers=False)
        until_sync(lambda: os.path.exists(pid_file), timeout=30, what="the holder to take the lock")
        waiter = c.submit(acquire_lock, 60, workers=[b], allow_other_workers=False)
        until_sync(lambda: c.run_on_scheduler(waiters_of, "L") == 1, timeout=30,
                   what="the waiter to queue for the lock")
        with open(pid_file) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        assert waiter.result(timeout=30) == (True, b)
        # The lease goes when the holder's client or its worker goes, whichever the
        # scheduler hears of first: the worker's removal may come just after.
        until_sync(lambda: a not in c.scheduler_info()["workers"], timeout=30,
                   what="the killed worker to be removed")
        assert not holder.done()
        Event("release-L").set()


def test_event_between_client_and_tasks():
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        go = Event("go")
        waiting = c.map(wait_for_event, ["go"] * 3, [60] * 3, pure=False)
        until_sync(lambda: c.run_on_scheduler(event_waiters, "go") == 3, timeout=30,
                   what="the tasks to wait")
        assert not go.is_set()
        go.set()
        assert c.gather(waiting) == [(True, True)] * 3
        go.clear()
        assert c.submit(wait_for_event, "go", 0.2).result(timeout=30) == (False, False)
        assert go.wait(timeout=0.1) is False


def event_waiters(name: str, dask_scheduler=None) -> int:
    ev = dask_scheduler.extensions["events"].events.get(name)
    return 0 if ev is None else len(ev.waiters)


@gen_test(timeout=60)
async def test_async_client_lock_semaphore_and_event(tmp_path):
    async with gen_cluster(nworkers=2, nthreads=2) as (c, s, workers):
        lock = Lock("a", client=c)
        async with lock:
            assert await lock.locked()
            assert await Lock("a", client=c).acquire(timeout=0.1) is False
        assert not await lock.locked()

        sem = await Semaphore(max_leases=1, name="s", client=c)
        assert await sem.acquire() is True
        blocked = asyncio.ensure_future(Semaphore(1, "s", client=c).acquire(timeout=30))
        await until(lambda: len(s.extensions["semaphores"].semaphores["s"].waiters) == 1,
                    what="the second acquire to queue")
        assert not blocked.done()
        assert await sem.release() is True
        assert await blocked is True

        ev = Event("e", client=c)
        waiters = c.map(wait_for_event, ["e"] * 2, [30] * 2, pure=False)
        assert await ev.wait(timeout=0.05) is False
        await ev.set()
        assert await c.gather(waiters) == [(True, True)] * 2
        assert await ev.is_set()
        # Tasks on in-process workers use the lock through their worker's client.
        path = str(tmp_path / "shared.txt")
        await c.gather(c.map(append_under_lock, [path] * 6, range(6)))
        with open(path) as f:
            assert len(check_blocks(f.read().splitlines())) == 1  # one process: in-process workers


@pytest.mark.timeout(90)
def test_leases_are_refreshed_while_held_and_expire_when_the_holder_hangs(tmp_path):
    """A holder whose process is stopped (SIGSTOP: its connections stay up) stops refreshing:
    its lease expires and the next waiter proceeds; a live holder keeps its lease past the timeout."""
    fast = functools.partial(SemaphoreExtension, lease_validation_interval=0.1)
    pid_file = str(tmp_path / "holder.pid")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      scheduler_kwargs={"extensions": {**DEFAULT_EXTENSIONS, "semaphores": fast}}) as cluster, \
            Client(cluster) as c:
        sem = Semaphore(max_leases=1, name="short", lease_timeout=0.6)
        # Held for 3 lease timeouts by a live task: refreshed, never lost.
        assert c.submit(hold_semaphore, sem, 1.8).result(timeout=30) == 1
        assert sem.get_value() == 0

        a, b = sorted(c.scheduler_info()["workers"])
        c.submit(hold_lock_until_told, pid_file, workers=[a], allow_other_workers=False)
        until_sync(lambda: os.path.exists(pid_file), timeout=30, what="the holder to take the lock")
        with open(pid_file) as f:
            pid = int(f.read())
        # Lock "L" was registered without expiry by its holder: use one that expires.
        c.run_on_scheduler(set_lease_timeout, "L", 0.6)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert c.submit(acquire_lock, 30, workers=[b]).result(timeout=30) == (True, b)
        finally:
            os.kill(pid, signal.SIGCONT)
        Event("release-L").set()


def set_lease_timeout(name: str, seconds: float, dask_scheduler=None) -> None:
    dask_scheduler.extensions["semaphores"].semaphores[name].lease_timeout = seconds


@gen_test(timeout=60)
async def test_waits_end_cleanly_when_the_requester_goes_or_the_scheduler_closes():
    from cluster.runtime import Scheduler
    from cluster.runtime.errors import CommClosedError

    async with Scheduler(dashboard_address=None) as s:
        sems = s.extensions["semaphores"]
        async with Client(s.address, asynchronous=True) as c:
            holder = Lock("a", client=c)
            assert await holder.acquire()

            # A caller that gives up (here: cancelled by its own deadline) withdraws its request.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(Lock("a", client=c).acquire(), 0.2)
            await until(lambda: not sems.semaphores["a"].waiters, what="the request to be withdrawn")

            # A client that goes away while waiting: its request goes with it.
            async with Client(s.address, asynchronous=True, set_as_default=False) as c2:
                waiting = asyncio.ensure_future(Lock("a", client=c2).acquire())
                await until(lambda: len(sems.semaphores["a"].waiters) == 1, what="c2 to queue")
            with pytest.raises(CommClosedError):
                await waiting
            assert not sems.semaphores["a"].waiters
            assert await holder.release() is True
            assert await holder.locked() is False  # nobody gone was given the lock

            # The scheduler closing ends every wait with an error, promptly.
            assert await holder.acquire()
            waits = [asyncio.ensure_future(Lock("a", client=c).acquire()),
                     asyncio.ensure_future(Event("never", client=c).wait())]
            await until(lambda: sems.semaphores["a"].waiters and s.extensions["events"].events,
                        what="both waits to arrive")
            await s.close()
            for w in waits:
                with pytest.raises(CommClosedError):
                    await w
