"""Server behaviour over loopback: shutdown, heartbeats, idle close, task context,
start-up failures and option checks, secede, Reschedule, scheduler files,
reconnection after a broken stream, and release of data on client close.

Everything runs on real sockets on 127.0.0.1.  Tasks that must block do so on a
``threading.Event`` kept in a module-level registry (in-process workers import
this module, so they see the same objects); nothing here sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid

import psutil
import pytest
from cluster.runtime.errors import ConnectionTimeoutError

from cluster import (
    Client,
    LocalCluster,
    Reschedule,
    Scheduler,
    Worker,
    get_current_task,
    get_worker,
    secede,
)
from tests.helpers import gen_cluster, gen_test, until, until_sync

#: Events that tasks on in-process workers wait on or set, by name.
EVENTS: dict[str, threading.Event] = {}
#: How many times a task ran, by name (in-process workers only).
CALLS: dict[str, int] = {}


def new_event() -> str:
    name = f"ev-{uuid.uuid4().hex}"
    EVENTS[name] = threading.Event()
    return name


def inc(x):
    return x + 1


def wait_for_event(name, timeout=10.0):
    """Block until ``EVENTS[name]`` is set; return whether it was."""
    return EVENTS[name].wait(timeout)


def seceding_waiter(name, timeout=10.0):
    secede()
    return EVENTS[name].wait(timeout)


def set_event(name):
    EVENTS[name].set()
    return "set"


def task_context(_=None):
    w = get_worker()
    return get_current_task(), w.address, id(w)


def worker_address_in_run():
    return get_worker().address


def get_worker_or_error():
    try:
        get_worker()
    except ValueError as e:
        return str(e)
    return "no error"


def reschedule_once(name):
    CALLS[name] = CALLS.get(name, 0) + 1
    if CALLS[name] == 1:
        raise Reschedule()
    return 42


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def hold_for(seconds: float, check, what: str) -> None:
    """Poll ``check()`` (which asserts) for ``seconds``: a condition that must *stay* true."""
    start = time.monotonic()

    def pred():
        check()
        return time.monotonic() - start >= seconds

    await until(pred, timeout=seconds + 5, interval=0.02, what=what)


def worker_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


# ----------------------------------------------------------------------------- shutdown


@gen_test(timeout=20)
async def test_client_shutdown_closes_scheduler_and_workers():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        assert await c.submit(inc, 1) == 2
        await c.shutdown()
        await asyncio.wait_for(s.finished(), 5)
        assert s.status == "closed"
        await until(lambda: all(w.status == "closed" for w in workers), timeout=5,
                    what="workers closed after Client.shutdown()")
        assert c.status == "closed"


@pytest.mark.timeout(60)
def test_client_shutdown_sync_stops_worker_processes():
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    try:
        pids = {w.pid for w in cluster.workers.values()}
        assert len(pids) == 2 and pids <= {p.pid for p in worker_children()}
        client = Client(cluster.scheduler_address)
        assert client.submit(inc, 10).result(timeout=10) == 11
        client.shutdown()
        assert client.status == "closed"
        until_sync(lambda: not (pids & {p.pid for p in worker_children()}), timeout=15,
                   what="worker processes gone after Client.shutdown()")
        until_sync(lambda: cluster.scheduler.status == "closed", timeout=5,
                   what="scheduler closed")
    finally:
        cluster.close()
    assert worker_children() == []


@pytest.mark.timeout(60)
def test_client_shutdown_of_local_cluster_then_cluster_close():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True)
    with cluster:
        client = Client(cluster)
        assert client.submit(inc, 1).result(timeout=10) == 2
        client.shutdown()
        until_sync(lambda: worker_children() == [], timeout=15,
                   what="worker processes gone after Client.shutdown()")
        assert cluster.status == "closed"
    # Closing an already shut-down cluster still lets the shared loop thread go.
    until_sync(lambda: not any(t.name == "cluster-event-loop" for t in threading.enumerate()),
               timeout=5, what="the shared event-loop thread to stop")


# ----------------------------------------------------------------------------- worker_ttl


@gen_test(timeout=20)
async def test_worker_ttl_removes_silent_worker_keeps_live_one():
    async with Scheduler(worker_ttl="300ms", validate=True) as s:
        t0 = time.monotonic()  # before the silent worker's registration, its last sign of life
        async with Worker(s.address, nthreads=1, name="live", heartbeat_interval="50ms") as live, \
                Worker(s.address, nthreads=1, name="silent", heartbeat_interval="10s") as silent:
            assert {live.address, silent.address} <= set(s.workers)
            live_stream = s.stream_comms[live.address]
            await until(lambda: silent.address not in s.workers, timeout=3,
                        what="silent worker removed by worker_ttl")
            assert 0.3 <= time.monotonic() - t0 < 3  # not before its TTL ran out
            # Removed means asked to close, too.
            await until(lambda: silent.status == "closed", timeout=5,
                        what="silent worker closed")
            assert silent.address not in s.workers

            def live_stays():
                assert live.address in s.workers, "live worker was removed"
                assert s.stream_comms[live.address] is live_stream, "live worker re-registered"
                assert live.status == "running"

            await hold_for(1.0, live_stays, "live worker to outlast several TTLs")
            async with Client(s.address, asynchronous=True) as c:
                assert await c.submit(inc, 1, workers=[live.address]) == 2


# ----------------------------------------------------------------------------- idle_timeout


@gen_test(timeout=20)
async def test_idle_timeout_closes_idle_scheduler():
    s = await Scheduler(idle_timeout="300ms")
    try:
        t0 = time.monotonic()
        await asyncio.wait_for(s.finished(), 5)
        elapsed = time.monotonic() - t0
        assert s.status == "closed"
        assert 0.25 <= elapsed < 5
    finally:
        await s.close()


# ----------------------------------------------------------------------------- task context


@gen_test(timeout=20)
async def test_get_current_task_and_get_worker_inside_task():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        by_address = {w.address: w for w in workers}
        fut = c.submit(task_context, key="ctx-task")
        key, addr, ident = await fut
        assert key == "ctx-task" == fut.key
        assert addr in by_address
        assert ident == id(by_address[addr])  # the very Worker object, not a copy
        assert s.tasks["ctx-task"].who_has == {s.workers[addr]}
        keys = [f"ctx-{i}" for i in range(6)]
        results = await c.gather(c.map(task_context, range(6), key=keys))
        assert [k for k, _, _ in results] == keys
        for _, addr, ident in results:
            assert ident == id(by_address[addr])
        # Client.run also runs with the worker as context ...
        assert await c.run(worker_address_in_run) == {a: a for a in by_address}
        # ... but a thread of the loop's default executor is no task.
        loop = asyncio.get_running_loop()
        assert "outside a task" in await loop.run_in_executor(None, get_worker_or_error)
        assert get_current_task() is None
        with pytest.raises(ValueError, match="outside a task"):
            get_worker()
    assert get_current_task() is None
    with pytest.raises(ValueError, match="outside a task"):
        get_worker()


# ----------------------------------------------------------------------------- start-up failures


@gen_test(timeout=20)
async def test_worker_death_timeout_without_scheduler():
    address = f"tcp://127.0.0.1:{free_port()}"
    w = Worker(address, nthreads=1, death_timeout="1s")
    t0 = time.monotonic()
    with pytest.raises(ConnectionTimeoutError) as info:
        await w
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 5, elapsed
    assert info.value.address == address
    assert address in str(info.value)
    assert w.status == "closed"
    for listener in w.listeners:  # it listened before connecting: that port is shut again
        host, port = listener.contact_address.rsplit("/", 1)[-1].rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 1):
            pass
    if w.local_directory:
        assert not os.path.exists(w.local_directory)
    assert w.pool is None or not any(t.is_alive() for t in w.pool.threads)


@gen_test(timeout=20)
async def test_scheduler_interface_lo_listens_on_loopback():
    if "lo" not in psutil.net_if_addrs():
        pytest.skip("no 'lo' interface")
    async with Scheduler(interface="lo") as s:
        assert s.address.startswith("tcp://127.0.0.1:")
        async with Worker(s.address, nthreads=1) as w, Client(s.address, asynchronous=True) as c:
            assert w.address.startswith("tcp://127.0.0.1:")
            assert await c.submit(inc, 2) == 3


@gen_test(timeout=20)
async def test_scheduler_unknown_interface():
    s = Scheduler(interface="nosuch0")
    with pytest.raises(ValueError) as info:
        await s
    msg = str(info.value)
    assert "nosuch0" in msg
    for name in psutil.net_if_addrs():
        assert name in msg
    assert s.status == "closed"


@pytest.mark.timeout(10)
def test_scheduler_bad_protocol():
    with pytest.raises(ValueError, match="udp") as info:
        Scheduler(protocol="udp")
    assert "tcp" in str(info.value) and "inproc" in str(info.value)


@pytest.mark.timeout(10)
def test_scheduler_unknown_keyword():
    with pytest.raises(TypeError, match="unknown_kw"):
        Scheduler(unknown_kw=1)


@pytest.mark.timeout(10)
def test_worker_bad_memory_limit():
    with pytest.raises(ValueError, match="lots"):
        Worker("tcp://127.0.0.1:8786", nthreads=1, memory_limit="lots")


@pytest.mark.timeout(10)
def test_worker_negative_nthreads():
    with pytest.raises(ValueError, match="nthreads"):
        Worker("tcp://127.0.0.1:8786", nthreads=-1)


@pytest.mark.timeout(10)
def test_worker_zero_nthreads():
    with pytest.raises(ValueError, match="nthreads"):
        Worker("tcp://127.0.0.1:8786", nthreads=0)


@pytest.mark.timeout(10)
def test_local_cluster_negative_workers():
    threads0 = {t.ident for t in threading.enumerate()}
    with pytest.raises(ValueError, match="n_workers"):
        LocalCluster(n_workers=-1)
    assert {t.ident for t in threading.enumerate()} <= threads0


# ----------------------------------------------------------------------------- secede


@gen_test(timeout=20)
async def test_secede_lets_another_task_run():
    ev = new_event()
    try:
        async with gen_cluster(nworkers=1, nthreads=1) as (c, s, (w,)):
            first = c.submit(seceding_waiter, ev, 10, key="seceder")
            ws = s.workers[w.address]
            await until(lambda: "seceder" in {ts.key for ts in ws.long_running}, timeout=5,
                        what="scheduler to mark the task long-running")
            await until(lambda: "seceder" in w.tasks and w.tasks["seceder"].state == "long-running",
                        timeout=5, what="worker to mark the task long-running")
            assert s.tasks["seceder"].state == "processing"
            assert w.tasks["seceder"] in w.state.long_running
            assert len(w.pool.threads) == 2  # the seceded one and its replacement
            assert not first.done()
            second = c.submit(set_event, ev, key="setter")
            assert await second == "set"
            assert await first is True
            assert not ws.long_running
            # The seceded thread ends with its task: the pool is back to one thread.
            await until(lambda: len(w.pool.threads) == 1 and not w.state.long_running, timeout=5,
                        what="the seceded thread to leave the pool")
            assert w.executing_count == 0
    finally:
        EVENTS[ev].set()


# ----------------------------------------------------------------------------- Reschedule


@pytest.mark.parametrize("nworkers", [1, 2])
@gen_test(timeout=20)
async def test_reschedule_places_task_again(nworkers):
    name = f"resched-{uuid.uuid4().hex}"
    async with gen_cluster(nworkers=nworkers) as (c, s, workers):
        fut = c.submit(reschedule_once, name, key="resched")
        assert await fut == 42
        assert CALLS[name] == 2
        moves = [(start, finish) for key, start, finish, *_ in s.story("resched") if key == "resched"]
        assert moves[0] == ("released", "waiting")
        i = moves.index(("processing", "released"))
        assert [f for _, f in moves[:i]].count("processing") == 1  # first placement
        rest = moves[i + 1:]
        assert rest[0] == ("released", "waiting")
        assert [f for _, f in rest].count("processing") == 1  # placed again
        assert moves[-1] == ("processing", "memory")
        assert s.tasks["resched"].state == "memory"
        holders = [w for w in workers if "resched" in w.data]
        assert len(holders) == 1 and holders[0].data["resched"] == 42
        # The client's story (over RPC) tells the same.
        story = await c.rpc.call(s.address, "story", keys_list=["resched"])
        assert [tuple(e[1:3]) for e in story if e[0] == "resched"] == moves


# ----------------------------------------------------------------------------- scheduler_file


@gen_test(timeout=20)
async def test_scheduler_file_roundtrip(tmp_path):
    path = tmp_path / "sub" / "dir" / "scheduler.json"
    async with Scheduler(scheduler_file=str(path)) as s:
        assert path.exists()
        info = json.loads(path.read_text())
        assert info["address"] == s.address
        assert info["id"] == s.id
        assert not list(path.parent.glob("*.tmp"))
        # A plain tcp:// scheduler file needs the opt-out of TLS (security=False).
        async with Worker(scheduler_file=str(path), nthreads=1, security=False) as w, \
                Client(scheduler_file=str(path), asynchronous=True, security=False) as c:
            assert w.scheduler_addr == s.address
            assert c.scheduler_address == s.address
            assert set(s.workers) == {w.address}
            assert await c.submit(inc, 41) == 42
    assert not path.exists()


@gen_test(timeout=20)
async def test_worker_and_client_wait_for_scheduler_file(tmp_path):
    path = tmp_path / "scheduler.json"
    w = Worker(scheduler_file=str(path), nthreads=1, security=False)
    c = Client(scheduler_file=str(path), asynchronous=True, timeout=10, security=False)
    w_start = asyncio.ensure_future(w._start())
    c_start = asyncio.ensure_future(c._start())
    try:
        def not_yet():
            assert not w_start.done() and not c_start.done(), "started without a scheduler file"

        await hold_for(0.3, not_yet, "worker and client to wait for the file")
        async with Scheduler(scheduler_file=str(path)) as s:
            await asyncio.wait_for(asyncio.gather(w_start, c_start), 5)
            assert set(s.workers) == {w.address}
            assert c.scheduler_address == s.address
            assert await c.submit(inc, 1) == 2
            await c.close()
            await w.close()
        assert not path.exists()
    finally:
        for t in (w_start, c_start):
            t.cancel()
        await asyncio.gather(w_start, c_start, return_exceptions=True)
        await c.close()
        await w.close()


# ----------------------------------------------------------------------------- broken stream


@gen_test(timeout=20)
async def test_worker_reconnects_after_stream_breaks():
    async with gen_cluster(nworkers=1) as (c, s, (w,)):
        before = c.submit(inc, 1)
        assert await before == 2
        old = s.stream_comms[w.address]
        old.abort()
        await until(lambda: w.address in s.workers and s.stream_comms.get(w.address) not in (None, old),
                    timeout=5, what="worker to reconnect")
        assert w.status == "running"
        assert not s.stream_comms[w.address].closed
        futs = [c.submit(inc, i, workers=[w.address]) for i in range(10, 15)]
        assert await c.gather(futs) == list(range(11, 16))
        assert all(s.tasks[f.key].who_has == {s.workers[w.address]} for f in futs)
        # The result held before the break is known (again) and can be fetched both ways.
        await until(lambda: s.tasks[before.key].state == "memory", timeout=5,
                    what="the earlier result back in memory")
        assert s.tasks[before.key].who_has == {s.workers[w.address]}
        assert await c.gather(before, direct=False) == 2


@gen_test(timeout=20)
async def test_worker_reconnects_while_task_runs():
    ev = new_event()
    try:
        async with gen_cluster(nworkers=1) as (c, s, (w,)):
            fut = c.submit(wait_for_event, ev, 10, pure=False)
            await until(lambda: fut.key in w.tasks and w.tasks[fut.key].state == "executing",
                        timeout=5, what="the task to execute")
            old = s.stream_comms[w.address]
            old.abort()
            await until(lambda: w.address in s.workers and s.stream_comms.get(w.address) not in (None, old),
                        timeout=5, what="worker to reconnect")
            EVENTS[ev].set()
            assert await fut is True
            assert s.tasks[fut.key].state == "memory"
            moves = [(a, b) for k, a, b, *_ in s.story(fut.key) if k == fut.key]
            assert ("processing", "released") in moves  # the break sent it back ...
            assert moves[-1] == ("processing", "memory")  # ... and it finished once re-placed
            assert await c.submit(inc, 5) == 6
    finally:
        EVENTS[ev].set()


@gen_test(timeout=20)
async def test_worker_without_reconnect_closes_when_stream_breaks():
    async with gen_cluster(nworkers=2, worker_kwargs={"reconnect": False}) as (c, s, (a, b)):
        assert await c.submit(inc, 1, workers=[a.address]) == 2
        s.stream_comms[a.address].abort()
        await until(lambda: a.status == "closed", timeout=5, what="worker closed")
        await until(lambda: a.address not in s.workers, timeout=5, what="worker removed")
        assert b.status == "running" and b.address in s.workers
        assert await c.submit(inc, 5) == 6


# ----------------------------------------------------------------------------- client close


@gen_test(timeout=20)
async def test_client_close_releases_its_data():
    async with gen_cluster(nworkers=2, client=False) as (_, s, workers):
        c = await Client(s.address, asynchronous=True)
        try:
            futs = c.map(inc, range(10))
            x = c.submit(sum, futs)
            assert await x == sum(range(1, 11))
            assert s.tasks
            assert any(w.data for w in workers)
        finally:
            await c.close()
        await until(lambda: not s.tasks, timeout=5, what="scheduler forgets the client's tasks")
        await until(lambda: not any(w.data for w in workers), timeout=5,
                    what="workers drop the client's data")
        assert not s.clients


@gen_test(timeout=20)
async def test_client_disconnect_without_close_releases_its_data():
    async with gen_cluster(nworkers=2, client=False) as (_, s, workers):
        c = await Client(s.address, asynchronous=True)
        try:
            futs = c.map(inc, range(5))
            assert await c.gather(futs) == list(range(1, 6))
            c.scheduler_comm.abort()  # no close-client message: the connection just breaks
            await until(lambda: not s.clients, timeout=5, what="scheduler drops the client")
            await until(lambda: not s.tasks, timeout=5, what="its tasks released")
            await until(lambda: not any(w.data for w in workers), timeout=5,
                        what="workers drop its data")
            await until(lambda: c.status == "disconnected", timeout=5, what="client notices")
        finally:
            await c.close()


# ----------------------------------------------------------------------------- state-machine failure


@gen_test(timeout=30)
async def test_worker_closes_when_its_state_machine_fails():
    """With validation off (as in production) a failing worker state machine is not
    swallowed: the worker tells the scheduler and closes, so the two never diverge."""
    from cluster.runtime.core import Status

    class Broken:
        stimulus_id = "broken-event"
        handler = "no_such_handler"

    async with Scheduler(validate=True) as s:
        w = await Worker(s.address, validate=False)
        try:
            await until(lambda: w.address in s.state.workers, what="worker registered")
            w.handle_stimulus(Broken())
            await until(lambda: w.status == Status.closed, what="worker closed")
            await until(lambda: w.address not in s.state.workers, what="scheduler forgot it")
        finally:
            await w.close()


@gen_test(timeout=30)
async def test_story_joins_scheduler_and_worker_by_stimulus_id():
    """The scheduler keeps the worker's stimulus_id, so a task's story can be followed
    from one process's log into the other's."""
    async with gen_cluster(nworkers=1) as (c, s, (w,)):
        f = c.submit(sum, [1, 2], key="joined")
        assert await f == 3
        story = s.state.story("joined")
        worker_ids = {entry[4] for entry in w.state.story("joined")}
        # The scheduler's move to memory carries the id of the worker's own stimulus
        # (its execution finishing), not one the scheduler made up.
        (to_memory,) = [entry for entry in story if entry[2] == "memory"]
        assert to_memory[4] in worker_ids, (story, worker_ids)


@gen_test(timeout=30)
async def test_results_wait_for_the_next_while_the_worker_is_busy(monkeypatch):
    # A busy worker's results wait (up to RESULT_COALESCE) to leave together; an
    # idle worker's leave at once. With a hold of a minute: the short task's result
    # reaches the scheduler only with the blocked task's, the moment that one ends.
    from cluster.runtime.worker import server as worker_server

    monkeypatch.setattr(worker_server, "RESULT_COALESCE", 60.0)
    async with gen_cluster(nworkers=1, nthreads=2) as (c, s, (w,)):
        ev = new_event()
        blocked = c.submit(wait_for_event, ev, key="blocked")
        await until(lambda: "blocked" in w.state.tasks and w.state.tasks["blocked"].state == "executing",
                    what="blocked task running")
        short = c.submit(inc, 1, key="short")
        await until(lambda: "short" in w.state.tasks and w.state.tasks["short"].state == "memory",
                    what="short task done on the worker")
        # Held in the worker's stream (a plain send leaves by the end of the loop's turn).
        assert [m["key"] for m in w.batched_stream.buffer if m["op"] == "task_finished"] == ["short"]
        assert s.tasks["short"].state == "processing"
        EVENTS[ev].set()
        assert await asyncio.wait_for(c.gather([short, blocked]), 10) == [2, True]
        # Idle again: a lone result leaves at once, not after the minute.
        assert await asyncio.wait_for(c.submit(inc, 10), 10) == 11
