"""Loopback tests of the scheduler's cluster-wide operations (:mod:`cluster.runtime.scheduler.ops`)
and the worker's side of them: retiring, replicating, rebalancing, plugins,
graceful close, lifetimes, memory pause, addresses and proxies.

A validating scheduler and in-process workers on 127.0.0.1 (``gen_cluster``);
waiting is done with ``until`` (polling with a deadline), never with sleeps.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from cluster.runtime import Client

import cluster
from cluster import Worker, wait
from tests.helpers import gen_cluster, gen_test, until

# ----------------------------------------------------------------------------- task functions
# Module level, so that they pickle by reference (the workers are in this process).

#: How often each (tag, i) was computed, across all in-process workers.
CALLS: Counter = Counter()
_CALLS_LOCK = threading.Lock()


def counted_blob(tag, i, size=20_000):
    """``size`` bytes (too big to travel with task-finished), counting each computation."""
    with _CALLS_LOCK:
        CALLS[(tag, i)] += 1
    return bytes([i % 256]) * size


def inc(x):
    return x + 1


def holders_of(s, key) -> set:
    ts = s.tasks.get(key)
    return {ws.address for ws in ts.who_has} if ts is not None else set()


# ----------------------------------------------------------------------------- plugins

#: Worker plugin calls: (hook, worker address, plugin tag).
WORKER_PLUGIN_CALLS: list = []


class RecordingWorkerPlugin(cluster.WorkerPlugin):
    name = "recording"

    def __init__(self, tag):
        self.tag = tag

    def setup(self, worker):
        WORKER_PLUGIN_CALLS.append(("setup", worker.address, self.tag))

    def teardown(self, worker):
        WORKER_PLUGIN_CALLS.append(("teardown", worker.address, self.tag))


class RecordingSchedulerPlugin(cluster.SchedulerPlugin):
    """Records every hook call in ``self.calls`` (registered in-process, not pickled)."""

    def __init__(self):
        self.calls: list = []
        self.started_with = None
        self.closed = False

    async def start(self, scheduler):
        self.started_with = scheduler

    async def close(self):
        self.closed = True

    def add_worker(self, scheduler, worker):
        self.calls.append(("add_worker", worker))

    def remove_worker(self, scheduler, worker):
        self.calls.append(("remove_worker", worker))

    def add_client(self, scheduler, client):
        self.calls.append(("add_client", client))

    def remove_client(self, scheduler, client):
        self.calls.append(("remove_client", client))

    def update_graph(self, scheduler, client, keys, **kwargs):
        self.calls.append(("update_graph", client, tuple(keys)))

    def transition(self, key, start, finish, *args, **kwargs):
        self.calls.append(("transition", key, start, finish))

    def hooks(self, name) -> list:
        return [c for c in self.calls if c[0] == name]


class FakeProc:
    """Stands in for ``psutil.Process``: reports whatever rss the test sets."""

    def __init__(self, rss: int):
        self.rss = rss

    def memory_info(self):
        return self


# ----------------------------------------------------------------------------- retiring


@gen_test(timeout=20)
async def test_client_retire_workers_moves_data_and_closes_worker():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        futures = [c.submit(counted_blob, "retire", i, workers=[a.address]) for i in range(4)]
        await wait(futures)
        assert all(holders_of(s, f.key) == {a.address} for f in futures)
        retired = await c.retire_workers(workers=[a.address])
        assert list(retired) == [a.address]
        assert retired[a.address]["name"] == "w0"
        assert a.address not in s.workers
        assert all(holders_of(s, f.key) == {b.address} for f in futures)
        await until(lambda: a.status == "closed", timeout=5, what="the retired worker to close")
        # (direct=False: see test_gather_after_retirement_does_not_wait_for_connect_timeout)
        assert await c.gather(futures, direct=False) == [bytes([i]) * 20_000 for i in range(4)]
        assert all(CALLS[("retire", i)] == 1 for i in range(4))


@gen_test(timeout=20)
async def test_rpc_retire_workers_by_name():
    async with gen_cluster(nworkers=3) as (c, s, (a, b, w2)):
        f = c.submit(counted_blob, "by-name", 0, workers=[b.address])
        await f
        retired = await c.rpc.call(s.address, "retire_workers", names=["w1"], close_workers=True)
        assert list(retired) == [b.address]
        assert set(s.workers) == {a.address, w2.address}
        assert holders_of(s, f.key) and b.address not in holders_of(s, f.key)
        await until(lambda: b.status == "closed", timeout=5, what="w1 to close")
        assert await c.gather(f, direct=False) == bytes([0]) * 20_000
        assert CALLS[("by-name", 0)] == 1
        # Unknown names retire nothing.
        assert await c.rpc.call(s.address, "retire_workers", names=["nobody"]) == {}
        assert set(s.workers) == {a.address, w2.address}


@gen_test(timeout=20)
async def test_gather_after_retirement_does_not_wait_for_connect_timeout():
    async with gen_cluster(nworkers=2, client=False) as (_, s, (a, b)):
        async with Client(s.address, asynchronous=True, timeout="2s") as c:
            f = c.submit(counted_blob, "direct", 9, workers=[a.address])
            await wait([f])
            assert await c.retire_workers(workers=[a.address])
            await until(lambda: a.status == "closed", timeout=5, what="the retired worker to close")
            assert holders_of(s, f.key) == {b.address}
            start = time.monotonic()
            assert await c.gather(f) == bytes([9]) * 20_000  # direct from the workers
            assert time.monotonic() - start < 1.0


# ----------------------------------------------------------------------------- replicate / rebalance


@gen_test(timeout=20)
async def test_replicate_up_then_down():
    async with gen_cluster(nworkers=3) as (c, s, workers):
        f = c.submit(counted_blob, "replicate", 1, workers=[workers[0].address])
        await f
        assert len(holders_of(s, f.key)) == 1
        await c.replicate([f], n=2)
        assert len(holders_of(s, f.key)) == 2
        who_has = await c.who_has([f])
        assert len(who_has[f.key]) == 2
        assert sum(f.key in w.data for w in workers) == 2
        await c.replicate([f], n=1)
        await until(lambda: sum(f.key in w.data for w in workers) == 1, timeout=5,
                    what="the extra replica to be dropped on its worker")
        await until(lambda: len(holders_of(s, f.key)) == 1, timeout=5,
                    what="the scheduler to forget the dropped replica")
        (holder,) = holders_of(s, f.key)
        assert any(w.address == holder and f.key in w.data for w in workers)
        assert await f == bytes([1]) * 20_000
        assert CALLS[("replicate", 1)] == 1


@gen_test(timeout=20)
async def test_rebalance_evens_bytes_between_workers():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        futures = [c.submit(counted_blob, "rebalance", i, workers=[a.address]) for i in range(6)]
        await wait(futures)
        assert len(a.data) == 6 and len(b.data) == 0
        before = s.workers[a.address].nbytes
        assert before > 0 and s.workers[b.address].nbytes == 0
        result = await c.rebalance()
        assert result == {"status": "OK", "moved": 3}
        await until(lambda: len(a.data) == 3 and len(b.data) == 3, timeout=5,
                    what="the moved keys to be dropped from the sender")
        await until(lambda: s.workers[a.address].nbytes == s.workers[b.address].nbytes, timeout=5,
                    what="the scheduler to see even bytes")
        assert s.workers[a.address].nbytes == before // 2
        assert all(len(holders_of(s, f.key)) == 1 for f in futures)
        assert await c.gather(futures) == [bytes([i]) * 20_000 for i in range(6)]
        assert all(CALLS[("rebalance", i)] == 1 for i in range(6))
        # Balanced now: nothing more moves.
        assert await c.rebalance() == {"status": "OK", "moved": 0}


# ----------------------------------------------------------------------------- plugins


@gen_test(timeout=20)
async def test_worker_plugin_setup_on_present_and_joining_workers_teardown_on_close():
    WORKER_PLUGIN_CALLS.clear()
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        replies = await c.register_worker_plugin(RecordingWorkerPlugin("t1"))
        assert set(replies) == {a.address, b.address}
        assert all(r == {"status": "OK"} for r in replies.values())
        assert sorted(WORKER_PLUGIN_CALLS) == sorted([("setup", a.address, "t1"), ("setup", b.address, "t1")])
        late = Worker(s.address, nthreads=1, validate=True, name="late")
        try:
            await late
            await until(lambda: ("setup", late.address, "t1") in WORKER_PLUGIN_CALLS, timeout=5,
                        what="the plugin to be set up on the worker that joined later")
            assert "recording" in late.plugins
        finally:
            await late.close()
        assert ("teardown", late.address, "t1") in WORKER_PLUGIN_CALLS
        assert not any(h == "teardown" for h, addr, _ in WORKER_PLUGIN_CALLS if addr != late.address)
    # gen_cluster closed a and b.
    assert ("teardown", a.address, "t1") in WORKER_PLUGIN_CALLS
    assert ("teardown", b.address, "t1") in WORKER_PLUGIN_CALLS


@gen_test(timeout=20)
async def test_worker_plugin_replaced_by_name():
    WORKER_PLUGIN_CALLS.clear()
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        await c.register_worker_plugin(RecordingWorkerPlugin("v1"))
        await c.register_worker_plugin(RecordingWorkerPlugin("v2"))
        assert WORKER_PLUGIN_CALLS == [("setup", a.address, "v1"), ("teardown", a.address, "v1"),
                                       ("setup", a.address, "v2")]
        assert a.plugins["recording"].tag == "v2"


@gen_test(timeout=20)
async def test_scheduler_plugin_hooks_and_removal():
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        plugin = RecordingSchedulerPlugin()
        # dask's async registration: returns once the (async) start has run.
        assert await s.register_scheduler_plugin(plugin, name="rec") == "OK"
        assert plugin.started_with is s
        assert s.plugins["rec"] is plugin

        late = Worker(s.address, nthreads=1, validate=True, name="late")
        try:
            await late
            await until(lambda: ("add_worker", late.address) in plugin.calls, timeout=5,
                        what="the add_worker hook")
            async with Client(s.address, asynchronous=True) as c2:
                assert ("add_client", c2.id) in plugin.calls
                f = c2.submit(inc, 1, key="plugged")
                assert await f == 2
                assert ("update_graph", c2.id, ("plugged",)) in plugin.calls
                await until(lambda: ("transition", "plugged", "processing", "memory") in plugin.calls,
                            timeout=5, what="the transition hook")
                moves = [(st, fi) for h, k, st, fi in plugin.hooks("transition") if k == "plugged"]
                assert moves[0] == ("released", "waiting")
            await until(lambda: ("remove_client", c2.id) in plugin.calls, timeout=5,
                        what="the remove_client hook")
        finally:
            await late.close()
        await until(lambda: ("remove_worker", late.address) in plugin.calls, timeout=5,
                    what="the remove_worker hook")

        assert s.remove_plugin(plugin) == "OK"
        assert "rec" not in s.plugins
        n = len(plugin.calls)
        assert await c.submit(inc, 10, key="unplugged") == 11
        assert len(plugin.calls) == n
        try:
            s.remove_plugin(name="rec")
        except ValueError as e:
            assert "rec" in str(e)
        else:  # pragma: no cover
            raise AssertionError("removing an unknown plugin must raise ValueError")


@gen_test(timeout=20)
async def test_scheduler_plugin_added_late_sees_only_new_transitions():
    async with gen_cluster(nworkers=1) as (c, s, _):
        before = c.submit(inc, 1, key="before")  # held, so it makes no transitions later
        assert await before == 2
        plugin = RecordingSchedulerPlugin()
        s.add_plugin(plugin)
        assert await c.submit(inc, 2, key="after") == 3
        await until(lambda: ("transition", "after", "processing", "memory") in plugin.calls, timeout=5,
                    what="the transition hook for the new task")
        assert not [call for call in plugin.hooks("transition") if call[1] == "before"]


@gen_test(timeout=20)
async def test_add_plugin_is_synchronous_as_dasks():
    # A preload's dask_setup(scheduler) calls scheduler.add_plugin(p) without awaiting.
    async with gen_cluster(nworkers=1) as (c, s, _):
        plugin = RecordingSchedulerPlugin()
        assert s.add_plugin(plugin, name="sync") is None
        assert s.plugins["sync"] is plugin  # registered at once
        await until(lambda: plugin.started_with is s, what="its async start, run on the loop")
        assert await c.submit(inc, 3, key="seen") == 4
        assert ("update_graph", c.id, ("seen",)) in plugin.calls
        replacement = RecordingSchedulerPlugin()
        s.add_plugin(replacement, name="sync")
        await until(lambda: plugin.closed and replacement.started_with is s,
                    what="the replaced plugin closed, the new one started")


def test_add_plugin_with_async_start_needs_a_loop():
    s = cluster.Scheduler(dashboard_address=None)
    with pytest.raises(RuntimeError, match="async def"):
        s.add_plugin(RecordingSchedulerPlugin(), name="no-loop")
    plain = cluster.SchedulerPlugin()  # the base class's start does nothing: no loop needed
    s.add_plugin(plain, name="plain")
    assert s.plugins["plain"] is plain


@gen_test(timeout=20)
async def test_scheduler_plugin_closed_with_the_scheduler():
    plugin = RecordingSchedulerPlugin()
    async with gen_cluster(nworkers=1) as (c, s, _):
        s.add_plugin(plugin, name="closing")
        assert not plugin.closed
    assert s.status == "closed"
    assert plugin.closed


@gen_test(timeout=20)
async def test_register_scheduler_plugin_from_client():
    async with gen_cluster(nworkers=1) as (c, s, _):
        assert await c.register_scheduler_plugin(RecordingSchedulerPlugin(), name="remote") == "OK"
        plugin = s.plugins["remote"]
        assert isinstance(plugin, RecordingSchedulerPlugin) and plugin.started_with is s
        assert await c.submit(inc, 5, key="remote-key") == 6
        assert ("update_graph", c.id, ("remote-key",)) in plugin.calls
        # idempotent: a second registration under the same name keeps the first.
        assert await c.register_scheduler_plugin(RecordingSchedulerPlugin(), name="remote",
                                                 idempotent=True) == "OK"
        assert s.plugins["remote"] is plugin


# ----------------------------------------------------------------------------- graceful close, lifetime


@gen_test(timeout=20)
async def test_close_gracefully_moves_unique_data_without_recomputation():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        futures = [c.submit(counted_blob, "graceful", i, workers=[a.address]) for i in range(5)]
        await wait(futures)
        assert await a.close_gracefully() == "OK"
        assert a.status == "closed"
        await until(lambda: a.address not in s.workers, timeout=5, what="the scheduler to drop the worker")
        assert all(holders_of(s, f.key) == {b.address} for f in futures)
        assert all(f.key in b.data for f in futures)
        assert await c.gather(futures, direct=False) == [bytes([i]) * 20_000 for i in range(5)]
        assert all(CALLS[("graceful", i)] == 1 for i in range(5))
        for f in futures:
            computed = [e for e in s.story(f.key) if e[0] == f.key and e[1:3] == ("processing", "memory")]
            assert len(computed) == 1


@gen_test(timeout=20)
async def test_worker_lifetime_retires_and_moves_data():
    async with gen_cluster(nworkers=1) as (c, s, (stay,)):
        short = Worker(s.address, nthreads=1, validate=True, name="short",
                       lifetime="1s", lifetime_stagger="0.2s")
        try:
            await short
            f = c.submit(counted_blob, "lifetime", 7, workers=[short.address])
            await f
            assert holders_of(s, f.key) == {short.address}
            await until(lambda: short.status == "closed", timeout=5, what="the worker to reach its lifetime")
            await until(lambda: short.address not in s.workers, timeout=5, what="the scheduler to drop it")
            assert holders_of(s, f.key) == {stay.address}
            assert f.key in stay.data
            assert await c.gather(f, direct=False) == bytes([7]) * 20_000
            assert CALLS[("lifetime", 7)] == 1
        finally:
            await short.close()


@gen_test(timeout=30)
async def test_sole_worker_at_its_lifetime_waits_for_a_replacement_and_hands_over_its_data():
    async with gen_cluster(nworkers=0) as (c, s, _):
        old = Worker(s.address, nthreads=1, validate=True, name="old", lifetime="0.5s")
        new = None
        try:
            await old
            f = c.submit(counted_blob, "handover", 3, workers=[old.address])
            await f
            # Its lifetime ends with nobody to take the data: it stops taking tasks and waits.
            await until(lambda: s.workers[old.address].status == "closing_gracefully", timeout=5,
                        what="the worker to start retiring")
            assert old.status != "closed" and holders_of(s, f.key) == {old.address}
            new = await Worker(s.address, nthreads=1, validate=True, name="new")
            await until(lambda: old.status == "closed", timeout=10, what="the old worker to hand over and close")
            assert holders_of(s, f.key) == {new.address} and f.key in new.data
            assert await c.gather(f, direct=False) == bytes([3]) * 20_000
            assert CALLS[("handover", 3)] == 1
        finally:
            await old.close()
            if new is not None:
                await new.close()


@gen_test(timeout=20)
async def test_retire_without_recipient_refuses_at_once_by_default():
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        f = c.submit(counted_blob, "refuse", 1)
        await f
        start = time.monotonic()
        assert await c.retire_workers(workers=[a.address]) == {}
        assert time.monotonic() - start < 5
        assert s.workers[a.address].status == "running" and holders_of(s, f.key) == {a.address}
        # With a wait and still nobody joining: refused when the wait is over, the worker kept.
        assert await c.rpc.call(s.address, "retire_workers", workers=[a.address],
                                wait_for_recipient=0.3) == {}
        assert s.workers[a.address].status == "running"
        assert await c.submit(inc, 1) == 2


# ----------------------------------------------------------------------------- memory pause


@gen_test(timeout=20)
async def test_memory_pause_and_resume():
    limit = 1_000_000_000
    async with gen_cluster(nworkers=0) as (c, s, _):
        w = Worker(s.address, nthreads=1, validate=True, name="mem", memory_limit=limit,
                   memory_target_fraction=False, memory_spill_fraction=False,
                   memory_pause_fraction=0.5, memory_monitor_interval="1h")
        try:
            await w
            assert s.workers[w.address].status == "running"
            await w.memory_monitor(FakeProc(int(0.9 * limit)))
            assert w.paused and w.state.running is False
            await until(lambda: s.workers[w.address].status == "paused", timeout=5,
                        what="the scheduler to see the pause")
            f = c.submit(inc, 41, key="while-paused")
            await until(lambda: "while-paused" in s.tasks, timeout=5, what="the task to reach the scheduler")
            assert s.tasks["while-paused"].state == "queued"
            assert not s.workers[w.address].processing
            assert w.state.executed_count == 0 and not w.state.executing
            # Still above the threshold: stays paused.
            await w.memory_monitor(FakeProc(int(0.6 * limit)))
            assert w.paused
            await w.memory_monitor(FakeProc(int(0.1 * limit)))
            assert not w.paused and w.state.running
            await until(lambda: s.workers[w.address].status == "running", timeout=5,
                        what="the scheduler to see the worker resume")
            assert await f == 42
            assert w.state.executed_count == 1
        finally:
            await w.close()


# ----------------------------------------------------------------------------- addresses, proxies, sizing


@gen_test(timeout=20)
async def test_coerce_address():
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        assert s.coerce_address("127.0.0.1:8786") == "tcp://127.0.0.1:8786"
        assert s.coerce_address("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
        assert s.coerce_address(("127.0.0.1", 8786)) == "tcp://127.0.0.1:8786"
        assert s.coerce_address("w0") == a.address
        assert s.coerce_address(a.address) == a.address
        try:
            s.coerce_address(12345)
        except ValueError:
            pass
        else:  # pragma: no cover
            raise AssertionError("coerce_address(12345) must raise ValueError")


@gen_test(timeout=20)
async def test_proxy_to_worker():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        f = c.submit(counted_blob, "proxy", 3, workers=[a.address])
        await f
        keys = await c.rpc.call(s.address, "proxy", msg={"op": "keys"}, worker=a.address)
        assert keys == [f.key]
        assert await c.rpc.call(s.address, "proxy", msg={"op": "keys"}, worker="w1") == []


@gen_test(timeout=20)
async def test_get_worker_service_addr():
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        assert s.get_worker_service_addr(a.address, "nanny") is None
        assert s.get_worker_service_addr(a.address, "nanny", protocol=True) is None
        assert s.get_worker_service_addr(a.address, "dashboard") is None
        assert s.get_worker_service_addr("tcp://127.0.0.1:1", "nanny") is None


@gen_test(timeout=20)
async def test_workers_to_close_and_adaptive_target_rpcs():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        assert await c.rpc.call(s.address, "adaptive_target") == 0
        assert sorted(await c.rpc.call(s.address, "workers_to_close")) == sorted([a.address, b.address])
        f = c.submit(counted_blob, "sizing", 1, workers=[a.address])
        await f
        # a holds data: b is the cheaper one to close, and one worker is still wanted.
        assert await c.rpc.call(s.address, "workers_to_close", n=1) == [b.address]
        assert await c.rpc.call(s.address, "workers_to_close", n=1, attribute="name") == ["w1"]
        assert await c.rpc.call(s.address, "workers_to_close", target=2) == []
        assert await c.rpc.call(s.address, "adaptive_target") == 1
        assert await c.rpc.call(s.address, "adaptive_target", target_duration="10s") == 1
