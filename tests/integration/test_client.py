"""Loopback tests of the Client API: a validating scheduler, in-process workers
on 127.0.0.1 and an asynchronous client talking over real TCP sockets (also to the
scheduler in its own process: ``tests.helpers.socket_link``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import pathlib
import sys
import threading
import traceback
import types
import uuid
from contextlib import contextmanager

import pytest
from cluster.runtime.errors import ClusterError, RemoteTraceback, TaskError, TaskSerializationError
from cluster.runtime.execution import picklable_exception

from cluster import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    CancelledError,
    Client,
    Future,
    LocalCluster,
    Scheduler,
    SchedulerPlugin,
    Worker,
    as_completed,
    get_worker,
    wait,
)
from tests.helpers import gen_cluster, gen_test, until, until_sync

# ----------------------------------------------------------------------------- task functions
# Module level, so that they pickle by reference (the workers are in this process).


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def add_kw(x, y=0, z=0):
    return x + y + z


def where_am_i(*_):
    return get_worker().address


def div_zero(x):
    return x / 0


class CustomError(Exception):
    """A task exception type defined at module level (pickles by reference)."""


def raise_custom(msg):
    raise CustomError(msg)


class UnpicklableError(Exception):
    """Holds a lock: neither pickle nor cloudpickle can serialise it."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable(msg):
    raise UnpicklableError(msg)


class UnloadableError(Exception):
    """Pickles, but unpickling calls ``__init__`` with the wrong arguments."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_unloadable():
    raise UnloadableError(1, 2)


def nested_sum(items, mapping):
    (a, (b, c)) = items
    return a + b + c + sum(mapping.values())


def flaky(path, fail_times):
    """Fail the first ``fail_times`` calls (counted in a file), then return the call number."""
    p = pathlib.Path(path)
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    if n <= fail_times:
        raise ValueError(f"attempt {n} fails")
    return n


_order = itertools.count()


def record_order(i):
    return next(_order)


def gpu_task(i):
    w = get_worker()
    return w.address, w.state.available_resources.get("GPU")


def import_value(modname):
    import importlib

    return importlib.import_module(modname).VALUE


def identity(*args, **kwargs):
    return args, kwargs


# Blocking tasks wait on a named event of this process (the workers run here).
_events: dict[str, threading.Event] = {}


def block(name, value=None):
    if not _events[name].wait(30):
        raise RuntimeError(f"event {name} never set")
    return value


def block_then_fail(name):
    block(name)
    raise ValueError("late failure")


@contextmanager
def event():
    """A named event for ``block``; always set on exit so no task thread stays behind."""
    name = f"ev-{uuid.uuid4().hex}"
    _events[name] = threading.Event()
    try:
        yield name
    finally:
        _events.pop(name).set()


def release(name):
    _events[name].set()


# Tasks that only finish if all of them run at the same time.
_barriers: dict[str, threading.Barrier] = {}


def meet(name, i):
    _barriers[name].wait(3)  # BrokenBarrierError if the others never arrive
    return get_worker().address


async def scatter(c, *args, **kwargs):
    """``c.scatter`` with a deadline: on loopback it takes milliseconds, not seconds."""
    return await asyncio.wait_for(c.scatter(*args, **kwargs), 3)




# ----------------------------------------------------------------------------- submit


def read_file(path):
    with open(path) as f:
        return f.read()


@gen_test(timeout=20)
async def test_failed_pure_task_runs_again_when_submitted_again(tmp_path):
    """A failed key is not a cached failure: submitting it again runs it again, also
    while a future of the first failure is still held."""
    path = tmp_path / "input.txt"
    async with gen_cluster() as (c, s, workers):
        first = c.submit(read_file, str(path))
        with pytest.raises(FileNotFoundError):
            await first
        path.write_text("here now")
        again = c.submit(read_file, str(path))
        assert again.key == first.key
        assert await again == "here now"


@gen_test(timeout=20)
async def test_submit_key_and_purity():
    async with gen_cluster() as (c, s, workers):
        f = c.submit(inc, 1, key="my-key")
        assert f.key == "my-key"
        assert await f == 2

        a = c.submit(inc, 10)
        b = c.submit(inc, 10)
        assert a.key == b.key
        assert a.key.startswith("inc-")
        assert c.submit(inc, 11).key != a.key
        assert await a == 11 and await b == 11

        p = c.submit(inc, 10, pure=False)
        q = c.submit(inc, 10, pure=False)
        assert len({p.key, q.key, a.key}) == 3
        assert await p == await q == 11

        kw = c.submit(add_kw, 1, y=2, z=3)
        assert await kw == 6
        assert kw.key != c.submit(add_kw, 1, y=3, z=2).key


@gen_test(timeout=20)
async def test_submit_workers_restriction():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        fs = [c.submit(where_am_i, i, workers=[b.address]) for i in range(6)]
        assert set(await c.gather(fs)) == {b.address}
        # by worker name, and a single string instead of a list
        fs = [c.submit(where_am_i, i, workers="w0", pure=False) for i in range(6)]
        assert set(await c.gather(fs)) == {a.address}
        assert all(s.tasks[f.key].worker_restrictions == {a.address} for f in fs)


@gen_test(timeout=20)
async def test_submit_allow_other_workers():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        gone = "tcp://127.0.0.1:9"  # no worker there
        strict = c.submit(where_am_i, 1, workers=[gone])
        loose = c.submit(where_am_i, 2, workers=[gone], allow_other_workers=True)
        assert await loose in {w.address for w in workers}
        await until(lambda: strict.key in s.tasks and s.tasks[strict.key].state == "no-worker",
                    what="strictly restricted task parked as no-worker")
        assert not strict.done()
        await c.cancel([strict])


@gen_test(timeout=20)
async def test_submit_resources():
    async with Scheduler(validate=True) as s, \
            Worker(s.address, nthreads=2, resources={"GPU": 1}, validate=True, name="gpu") as gpu, \
            Worker(s.address, nthreads=2, validate=True, name="cpu") as cpu, \
            Client(s.address, asynchronous=True) as c:
        fs = [c.submit(gpu_task, i, resources={"GPU": 1}) for i in range(6)]
        results = await c.gather(fs)
        # all on the worker that has the resource, one at a time (the GPU is in use while running)
        assert {addr for addr, _ in results} == {gpu.address}
        assert {free for _, free in results} == {0}
        assert gpu.state.available_resources == {"GPU": 1}
        # unconstrained work may go anywhere, including the CPU-only worker
        assert await c.submit(where_am_i, "x", workers=[cpu.address]) == cpu.address
        # a resource nobody has leaves the task unrunnable
        tpu = c.submit(gpu_task, "tpu", resources={"TPU": 1})
        await until(lambda: tpu.key in s.tasks and s.tasks[tpu.key].state == "no-worker",
                    what="task needing a missing resource parked as no-worker")
        await c.cancel([tpu])


@gen_test(timeout=20)
async def test_submit_retries(tmp_path):
    async with gen_cluster() as (c, s, workers):
        ok = c.submit(flaky, str(tmp_path / "ok"), 2, retries=2)
        assert await ok == 3  # failed twice, the third run succeeded
        assert (tmp_path / "ok").read_text() == "3"

        bad = c.submit(flaky, str(tmp_path / "bad"), 3, retries=1)
        with pytest.raises(ValueError, match="attempt 2 fails"):
            await bad
        assert (tmp_path / "bad").read_text() == "2"  # one run plus one retry

        none = c.submit(flaky, str(tmp_path / "none"), 1)
        with pytest.raises(ValueError, match="attempt 1 fails"):
            await none


@gen_test(timeout=20)
async def test_submit_priority_on_one_thread():
    async with gen_cluster(nworkers=1, nthreads=1) as (c, s, (w,)):
        with event() as ev:
            blocker = c.submit(block, ev)
            await until(lambda: len(w.state.executing) == 1, what="blocker running")
            low = c.map(record_order, range(5), priority=-1)
            high = c.map(record_order, range(5, 10), priority=10)
            await until(lambda: all(f.key in s.tasks for f in low + high), what="graph arrived")
            release(ev)
            await blocker
            lows = await c.gather(low)
            highs = await c.gather(high)
        assert max(highs) < min(lows), (highs, lows)
        assert highs == sorted(highs)  # equal priority keeps submission order
        assert lows == sorted(lows)


@gen_test(timeout=20)
async def test_burst_spreads_over_idle_workers():
    async with gen_cluster(nworkers=2, nthreads=1) as (c, s, (a, b)):
        name = f"barrier-{uuid.uuid4().hex}"
        _barriers[name] = threading.Barrier(2)
        try:
            fs = c.map(meet, [name] * 2, range(2))

            def placed():
                tss = [s.tasks.get(f.key) for f in fs]
                return all(ts is not None and (ts.processing_on is not None or ts.state == "memory")
                           for ts in tss)

            await until(placed, what="both tasks placed")
            on = [s.tasks[f.key].processing_on for f in fs]
            if all(on):  # both still running: they must be on different workers
                assert {ws.address for ws in on} == {a.address, b.address}
            assert set(await c.gather(fs)) == {a.address, b.address}
        finally:
            _barriers.pop(name).abort()
            await wait(fs)


@gen_test(timeout=20)
async def test_restriction_to_worker_name_that_joins_later():
    async with gen_cluster(nworkers=1) as (c, s, workers):
        f = c.submit(where_am_i, "late", workers=["later"])
        await until(lambda: f.key in s.tasks and s.tasks[f.key].state == "no-worker",
                    what="no worker named 'later' yet")
        async with Worker(s.address, nthreads=1, name="later", validate=True) as w:
            assert await asyncio.wait_for(f.result(), 2) == w.address


# ----------------------------------------------------------------------------- map


@gen_test(timeout=20)
async def test_map_iterables_keys_kwargs():
    async with gen_cluster() as (c, s, workers):
        fs = c.map(add, [1, 2, 3], [10, 20, 30])
        assert await c.gather(fs) == [11, 22, 33]
        assert len({f.key for f in fs}) == 3
        # shortest iterable wins, as with the builtin map
        assert await c.gather(c.map(add, [1, 2, 3], [10, 20])) == [11, 22]

        fs = c.map(inc, [1, 2], key=["first", "second"])
        assert [f.key for f in fs] == ["first", "second"]
        assert await c.gather(fs) == [2, 3]

        with pytest.raises(ValueError):
            c.map(inc, [1, 2], key=["only-one"])

        fs = c.map(add_kw, [1, 2], y=100, z=1000)
        assert await c.gather(fs) == [1101, 1102]

        fs = c.map(inc, range(3), key="prefix")
        assert all(f.key.startswith("prefix-") for f in fs)
        assert await c.gather(fs) == [1, 2, 3]

        fs = c.map(inc, range(3), pure=False)
        fs2 = c.map(inc, range(3), pure=False)
        assert not {f.key for f in fs} & {f.key for f in fs2}
        assert await c.gather(fs2) == [1, 2, 3]


class GraphSizes(SchedulerPlugin):
    """Records the number of keys of each update_graph the scheduler handles."""

    def __init__(self):
        self.sizes: list[int] = []

    def update_graph(self, scheduler, client, keys, **kwargs):
        self.sizes.append(len(keys))


@gen_test(timeout=20)
async def test_map_batch_size_sends_batches():
    async with gen_cluster() as (c, s, workers):
        plugin = GraphSizes()
        s.add_plugin(plugin)
        batched = c.map(inc, range(10), batch_size=3)
        assert await c.gather(batched) == list(range(1, 11))
        assert plugin.sizes == [3, 3, 3, 1]
        # without batch_size, one map is one message; so are submits made together
        # (``batched`` stays referenced: releasing it would go out between them)
        plugin.sizes.clear()
        fs = c.map(inc, range(100, 110))
        gs = [c.submit(inc, i) for i in range(200, 203)]
        assert await c.gather(fs + gs) == list(range(101, 111)) + [201, 202, 203]
        assert plugin.sizes == [13]
        # a batch size above the length: one batch; key lists and prefixes follow the batches
        plugin.sizes.clear()
        named = c.map(inc, [1, 2], key=["b-one", "b-two"], batch_size=5)
        hs = c.map(inc, range(5), key="pre", batch_size=2)
        assert [f.key for f in named] == ["b-one", "b-two"]
        assert all(h.key.startswith("pre-") for h in hs)
        assert await c.gather(named + hs) == [2, 3, 1, 2, 3, 4, 5]
        assert plugin.sizes == [2, 2, 2, 1]
        del fs, gs, batched


@gen_test(timeout=20)
async def test_map_refuses_bad_batch_size_and_actors():
    async with gen_cluster() as (c, s, workers):
        for bad, exc in ((0, ValueError), (-2, ValueError), (1.5, TypeError), ("3", TypeError),
                         (True, TypeError)):
            with pytest.raises(exc, match="batch_size"):
                c.map(inc, range(3), batch_size=bad)
        with pytest.raises(ValueError, match="actors"):
            c.map(inc, range(3), actors=True)
        assert not s.tasks  # nothing reached the scheduler
        assert await c.gather(c.map(inc, range(3), batch_size=1)) == [1, 2, 3]


@gen_test(timeout=20)
async def test_fifo_timeout_reaches_the_scheduler():
    async with gen_cluster() as (c, s, workers):
        # Two maps sent in one tick leave as one message; each keeps its own order,
        # and both are of one generation (interleaved, as dask's fifo_timeout).
        a = c.map(inc, range(3), key=[f"a-{i}" for i in range(3)])
        b = c.map(inc, range(2), key=[f"b-{i}" for i in range(2)])
        assert await c.gather(a + b) == [1, 2, 3, 1, 2]
        prio = {k: s.tasks[k].priority for k in ("a-0", "a-1", "a-2", "b-0", "b-1")}
        assert [p[2] for p in prio.values()] == [0, 1, 2, 0, 1]
        assert len({p[1] for p in prio.values()}) == 1
        assert prio["b-0"] < prio["a-1"]
        # fifo_timeout=0 after the generation began: a later generation, run after.
        gen = prio["a-0"][1]
        await until(lambda: time_since_generation(s) > 0)
        d = c.submit(inc, 10, key="d", fifo_timeout=0)
        assert await d == 11
        assert s.tasks["d"].priority[1] > gen
        for bad in ("soon", -1, [1]):
            with pytest.raises(ValueError, match="fifo_timeout"):
                c.submit(inc, 1, fifo_timeout=bad)
            with pytest.raises(ValueError, match="fifo_timeout"):
                c.map(inc, [1], fifo_timeout=bad)
        with pytest.raises(ValueError, match="fifo_timeout"):
            s.update_graph(client=c.id, tasks={}, fifo_timeout="later")
        with pytest.raises(ValueError, match="actors"):
            s.update_graph(client=c.id, tasks={}, actors=True)


def time_since_generation(s) -> float:
    import time
    return time.monotonic() - s.state._generation_time


# ----------------------------------------------------------------------------- futures as arguments


@gen_test(timeout=20)
async def test_futures_as_arguments_nested():
    async with gen_cluster() as (c, s, workers):
        x = c.submit(inc, 1)  # 2
        y = c.submit(inc, 2)  # 3
        z = c.submit(add, x, y)
        assert await z == 5
        n = c.submit(nested_sum, [x, (y, 10)], {"a": x, "b": y})
        assert await n == 2 + 3 + 10 + 2 + 3
        kw = c.submit(add_kw, x, y=y, z=x)
        assert await kw == 7
        args, kwargs = await c.submit(identity, {x, 1}, key_=[{"k": (y,)}])
        assert args == ({2, 1},)
        assert kwargs == {"key_": [{"k": (3,)}]}
        # the dependency edges reached the scheduler
        assert {d.key for d in s.tasks[n.key].dependencies} == {x.key, y.key}


# ----------------------------------------------------------------------------- gather


@gen_test(timeout=20)
async def test_gather_structures_and_errors():
    async with gen_cluster() as (c, s, workers):
        a, b = c.submit(inc, 1), c.submit(inc, 2)
        assert await c.gather([a, b]) == [2, 3]
        assert await c.gather((a, b)) == (2, 3)
        assert await c.gather({"a": a, "b": b}) == {"a": 2, "b": 3}
        assert await c.gather(a) == 2
        assert await c.gather([a, [b, {"x": a}], 7]) == [2, [3, {"x": 2}], 7]
        # through the scheduler instead of straight from the workers
        assert await c.gather([a, b], direct=False) == [2, 3]

        bad = c.submit(div_zero, 1)
        with pytest.raises(ZeroDivisionError):
            await c.gather([a, bad])
        assert await c.gather([a, bad, b], errors="skip") == [2, 3]
        assert await c.gather({"a": a, "bad": bad}, errors="skip") == {"a": 2}
        with pytest.raises(ValueError):
            c.gather([a], errors="ignore")


# ----------------------------------------------------------------------------- scatter


@gen_test(timeout=20)
async def test_scatter_forms():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        addrs = {w.address for w in workers}
        fs = await scatter(c, [1, 2, 3])
        assert isinstance(fs, list) and all(isinstance(f, Future) for f in fs)
        assert await c.gather(fs) == [1, 2, 3]
        assert all(f.status == "finished" for f in fs)

        d = await scatter(c, {"x": 10, "y": 20})
        assert set(d) == {"x", "y"} and d["x"].key == "x"
        assert await d["x"] == 10
        assert await c.submit(add, d["x"], d["y"]) == 30

        single = await scatter(c, 5)
        assert isinstance(single, Future)
        assert await c.submit(inc, single) == 6
        again = await scatter(c, 5)
        assert again.key == single.key  # hashed by content

        t = await scatter(c, (7, 8))
        assert isinstance(t, tuple) and await c.gather(t) == (7, 8)

        # scattered data lives on the workers, not in the scheduler
        assert any(single.key in w.data for w in workers)
        assert s.tasks[single.key].run_spec is None
        assert {ws.address for ws in s.tasks[single.key].who_has} <= addrs


@gen_test(timeout=20)
async def test_scatter_broadcast_and_direct():
    async with gen_cluster(nworkers=3) as (c, s, workers):
        addrs = {w.address for w in workers}
        f = await scatter(c, 42, broadcast=True)
        who_has = await c.who_has([f])
        assert set(who_has[f.key]) == addrs
        assert all(w.data[f.key] == 42 for w in workers)
        # every worker can use it without a transfer
        fs = [c.submit(add, f, i, workers=[a]) for i, a in enumerate(sorted(addrs))]
        assert await c.gather(fs) == [42, 43, 44]

        direct = await scatter(c, [100, 200], direct=True)
        assert await c.gather(direct) == [100, 200]
        who_has = await c.who_has(direct)
        assert all(len(who_has[g.key]) == 1 and who_has[g.key][0] in addrs for g in direct)
        assert await c.submit(add, *direct) == 300

        both = await scatter(c, {"bc": 1}, broadcast=True, direct=True)
        assert set((await c.who_has([both["bc"]]))["bc"]) == addrs

        target = sorted(addrs)[0]
        placed = await scatter(c, [1, 2, 3], workers=[target])
        who_has = await c.who_has(placed)
        assert all(who_has[g.key] == [target] for g in placed)


# ----------------------------------------------------------------------------- Future API


@gen_test(timeout=20)
async def test_future_result_timeout_and_status():
    async with gen_cluster() as (c, s, workers):
        with event() as ev:
            f = c.submit(block, ev, 7)
            with pytest.raises(TimeoutError):
                await f.result(timeout=0.2)
            assert not f.done()
            assert f.status == "pending"
            release(ev)
            assert await f.result(timeout=10) == 7
            assert f.done() and f.status == "finished"
            assert await f.exception() is None
            assert await f.traceback() is None
            assert not f.cancelled()


@gen_test(timeout=20)
async def test_future_exception_and_traceback():
    async with gen_cluster() as (c, s, workers):
        f = c.submit(div_zero, 1)
        exc = await f.exception()
        assert isinstance(exc, ZeroDivisionError)
        tb = await f.traceback()  # a traceback object, as in dask.distributed
        assert isinstance(tb, types.TracebackType)
        assert "in div_zero" in "".join(traceback.format_tb(tb))
        assert "ZeroDivisionError" in f.traceback_text
        assert f.done() and f.status == "error"


@gen_test(timeout=20)
async def test_future_cancel():
    async with gen_cluster() as (c, s, workers):
        with event() as ev:
            f = c.submit(block, ev)
            await until(lambda: f.key in s.tasks, what="task known to the scheduler")
            await f.cancel()
            assert f.cancelled() and f.done()
            with pytest.raises(CancelledError):
                await f
            with pytest.raises(concurrent.futures.CancelledError):
                await f.result()
            with pytest.raises(CancelledError):
                await f.exception()
            await until(lambda: f.key not in s.tasks, what="cancelled key forgotten")


@gen_test(timeout=20)
async def test_cancel_finished_future():
    async with gen_cluster() as (c, s, workers):
        f = c.submit(inc, 1)
        assert await f == 2
        await f.cancel()
        assert f.cancelled() and f.status == "cancelled"
        with pytest.raises(CancelledError):
            await f
        await until(lambda: f.key not in s.tasks and all(f.key not in w.data for w in workers),
                    what="cancelled data released")
        g = c.submit(inc, 1)  # the same pure task again: computed anew
        assert await asyncio.wait_for(g.result(), 5) == 2


@gen_test(timeout=20)
async def test_pending_future_after_client_close():
    async with gen_cluster(client=False) as (_, s, workers):
        c = await Client(s.address, asynchronous=True)
        with event() as ev:
            f = c.submit(block, ev)
            await until(lambda: f.key in s.tasks, what="task submitted")
            await c.close()
            with pytest.raises((CancelledError, ClusterError)):
                await asyncio.wait_for(f.result(), 2)


@gen_test(timeout=20)
async def test_client_cancel_dependents():
    async with gen_cluster() as (c, s, workers):
        other = c.submit(inc, 100)
        assert await other == 101
        with event() as ev:
            x = c.submit(block, ev, 1)
            y = c.submit(inc, x)
            await until(lambda: y.key in s.tasks, what="graph arrived")
            await c.cancel([x])
            assert x.cancelled()
            await until(lambda: y.cancelled(), what="dependent cancelled too")
            with pytest.raises(CancelledError):
                await y
            await until(lambda: x.key not in s.tasks and y.key not in s.tasks,
                        what="cancelled keys forgotten")
            assert await other == 101


@gen_test(timeout=20)
async def test_add_done_callback_called_once():
    async with gen_cluster() as (c, s, workers):
        calls: list = []
        late: list = []
        with event() as ev:
            f = c.submit(block, ev, 3)
            f.add_done_callback(lambda fut: calls.append((fut, threading.current_thread().name)))
            release(ev)
            assert await f == 3
        # registered after completion: called promptly too
        f.add_done_callback(late.append)
        await until(lambda: calls and late, what="callbacks ran")
        # callbacks run in order on one thread: the late one ran after the first, once
        assert len(calls) == 1 and len(late) == 1
        assert calls[0][0] is f and late[0] is f
        assert calls[0][1] != threading.current_thread().name


# ----------------------------------------------------------------------------- remote exceptions


@gen_test(timeout=20)
async def test_remote_exception_same_type_with_remote_traceback():
    async with gen_cluster() as (c, s, workers):
        addrs = {w.address for w in workers}
        f = c.submit(div_zero, 1)
        with pytest.raises(ZeroDivisionError) as info:
            await f
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "div_zero" in cause.text
        assert cause.worker in addrs
        assert cause.worker in str(cause)

        g = c.submit(raise_custom, "custom message")
        with pytest.raises(CustomError, match="custom message") as info:
            await g
        assert type(info.value) is CustomError
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "raise_custom" in cause.text and "CustomError" in cause.text
        assert cause.worker in addrs and cause.worker in str(cause)
        # a dependent of a failed task fails with the same exception
        h = c.submit(inc, g)
        with pytest.raises(CustomError):
            await h


@gen_test(timeout=20)
async def test_unpicklable_exception_becomes_task_error():
    async with gen_cluster() as (c, s, workers):
        f = c.submit(raise_unpicklable, "holds a lock")
        with pytest.raises(TaskError) as info:
            await f
        assert "UnpicklableError" in info.value.type_name
        assert "holds a lock" in str(info.value)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise_unpicklable" in info.value.__cause__.text

        # Whether UnloadableError survives a pickle round trip depends on the process:
        # tblib's pickling support (which importing dask installs) rebuilds exceptions
        # without calling __init__.  It reaches the client as itself when it survives,
        # else as a TaskError naming it.
        survives = not isinstance(picklable_exception(UnloadableError(1, 2)), TaskError)
        g = c.submit(raise_unloadable)
        with pytest.raises(UnloadableError if survives else TaskError) as info:
            await g
        assert survives or "UnloadableError" in info.value.type_name


# ----------------------------------------------------------------------------- wait and as_completed


@gen_test(timeout=20)
async def test_wait_return_when_and_timeout():
    async with gen_cluster(nworkers=2, nthreads=2) as (c, s, workers):
        fs = c.map(inc, range(5))
        done, not_done = await wait(fs)
        assert done == set(fs) and not not_done
        done, not_done = await wait(fs, return_when=ALL_COMPLETED)
        assert done == set(fs)

        with event() as ev:
            slow = c.submit(block, ev, 1)
            quick = c.submit(inc, 1)
            done, not_done = await wait([slow, quick], return_when=FIRST_COMPLETED)
            assert quick in done and slow in not_done

            with pytest.raises(TimeoutError):
                await wait([slow, quick], timeout=0.2)

            bad = c.submit(div_zero, 1)
            done, not_done = await wait([slow, bad], return_when=FIRST_EXCEPTION)
            assert bad in done and slow in not_done

            with pytest.raises(ValueError):
                wait([slow], return_when="SOMETIMES")
            release(ev)
            done, not_done = await wait([slow, quick, bad], timeout=10)
            assert done == {slow, quick, bad} and not not_done


@gen_test(timeout=20)
async def test_as_completed_async():
    async with gen_cluster(nworkers=2, nthreads=2) as (c, s, workers):
        with event() as ev:
            slow = c.submit(block, ev, "slow")
            fast = c.map(inc, range(4))
            seen = []
            ac = as_completed(fast + [slow])
            async for f in ac:
                seen.append(f)
                if len(seen) == 4:
                    assert slow not in seen  # it cannot finish before we release it
                    release(ev)
            assert seen[-1] is slow
            assert set(seen) == set(fast) | {slow}

        fs = c.map(inc, range(3))
        results = {}
        ac = as_completed(fs[:1], with_results=True)
        ac.add(fs[1])
        ac.update(fs[2:])
        assert ac.count() == 3
        async for f, r in ac:
            results[f.key] = r
        assert sorted(results.values()) == [1, 2, 3]
        assert ac.is_empty()

        bad = c.submit(div_zero, 1)
        collected = [pair async for pair in as_completed([bad], with_results=True, raise_errors=False)]
        assert collected[0][0] is bad and isinstance(collected[0][1], ZeroDivisionError)
        with pytest.raises(ZeroDivisionError):
            async for _ in as_completed([bad], with_results=True):
                pass


@pytest.mark.timeout(60)
def test_as_completed_and_wait_sync():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False) as lc, Client(lc) as c:
        fs = c.map(inc, range(10))
        ac = as_completed(fs[:5])
        for f in fs[5:]:
            ac.add(f)
        got = [f.result() for f in ac]
        assert sorted(got) == list(range(1, 11))

        pairs = list(as_completed(c.map(add, range(3), range(3)), with_results=True))
        assert sorted(r for _, r in pairs) == [0, 2, 4]

        done, not_done = wait(fs, timeout=10)
        assert done == set(fs) and not not_done
        f = c.submit(div_zero, 1)
        done, _ = wait([f], return_when=FIRST_EXCEPTION)
        assert f in done
        with pytest.raises(ZeroDivisionError):
            f.result()
        assert "in div_zero" in "".join(traceback.format_tb(f.traceback()))
        assert isinstance(f.exception(), ZeroDivisionError)

        with event() as ev:
            slow = c.submit(block, ev, "sync")
            with pytest.raises(TimeoutError):
                slow.result(timeout=0.2)
            calls = []
            slow.add_done_callback(lambda fut: calls.append(fut.status))
            release(ev)
            assert slow.result(timeout=10) == "sync"
        until_sync(lambda: calls, what="done callback")
        assert calls == ["finished"]

        batches = list(as_completed(c.map(inc, range(20, 26))).batches())
        assert sorted(g.result() for b in batches for g in b) == list(range(21, 27))


@pytest.mark.timeout(60)
def test_blocking_result_on_the_clients_loop_is_refused():
    """result() of a blocking client, called on that client's own loop, would wait
    for the loop it blocks: refused at once, as every blocking call there is."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as lc, Client(lc) as c:
        with event() as ev:
            f = c.submit(block, ev, 1)

            async def on_loop():
                return f.result()

            with pytest.raises(RuntimeError, match="event loop"):
                c.sync(on_loop)
            release(ev)
            assert f.result(timeout=10) == 1
        # done, value sent along: read without the loop, also from another thread
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda x: c.submit(inc, x).result(timeout=10), range(20))) == \
                list(range(1, 21))


@pytest.mark.timeout(60)
def test_sync_timeout_message():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as lc, Client(lc) as c:
        with event() as ev:
            f = c.submit(block, ev, 1)
            with pytest.raises(TimeoutError) as info:
                f.result(timeout=0.2)
            with pytest.raises(TimeoutError) as info2:
                wait([f], timeout=0.2)
            release(ev)
            assert f.result() == 1
        assert "0.2" in str(info.value) and "None" not in str(info.value)
        assert "0.2" in str(info2.value) and "None" not in str(info2.value)


# ----------------------------------------------------------------------------- cluster information


@gen_test(timeout=20)
async def test_who_has_has_what_nthreads_scheduler_info():
    async with gen_cluster(nworkers=2, nthreads=2) as (c, s, (a, b)):
        x = c.submit(inc, 1, workers=[a.address])
        y = c.submit(inc, 2, workers=[b.address])
        await wait([x, y])
        who_has = await c.who_has([x, y])
        assert who_has == {x.key: [a.address], y.key: [b.address]}
        assert set(await c.who_has()) >= {x.key, y.key}
        has_what = await c.has_what()
        assert set(has_what) == {a.address, b.address}
        assert x.key in has_what[a.address] and y.key in has_what[b.address]
        assert (await c.has_what([a.address])) == {a.address: [x.key]}
        assert await c.nthreads() == {a.address: 2, b.address: 2}
        assert await c.ncores([b.address]) == {b.address: 2}
        info = await c.scheduler_info()
        assert info["address"] == s.address
        assert set(info["workers"]) == {a.address, b.address}
        assert info["workers"][a.address]["nthreads"] == 2
        assert info["workers"][b.address]["name"] == "w1"


@gen_test(timeout=20)
async def test_run_on_error():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        returned = await c.run(div_zero, 1, on_error="return")
        assert set(returned) == {w.address for w in workers}
        assert all(isinstance(e, ZeroDivisionError) for e in returned.values())
        assert await c.run(div_zero, 1, on_error="ignore") == {}
        with pytest.raises(ZeroDivisionError):
            await c.run(div_zero, 1)


@gen_test(timeout=20)
async def test_run_and_run_on_scheduler():
    async with gen_cluster(nworkers=3) as (c, s, workers):
        addrs = [w.address for w in workers]
        result = await c.run(where_am_i)
        assert result == {a: a for a in addrs}
        subset = await c.run(add, 1, 2, workers=addrs[:2])
        assert subset == {addrs[0]: 3, addrs[1]: 3}
        assert await c.run(add_kw, 1, y=2) == {a: 3 for a in addrs}

        assert await c.run_on_scheduler(add, 20, 22) == 42

        def scheduler_address(*_):
            return "scheduler", len(_)

        assert await c.run_on_scheduler(scheduler_address, 1, 2) == ("scheduler", 2)


@gen_test(timeout=20)
async def test_upload_file(tmp_path):
    modname = f"uploaded_{uuid.uuid4().hex[:12]}"
    path = tmp_path / f"{modname}.py"
    path.write_text("VALUE = 'from an uploaded module'\n")
    try:
        async with gen_cluster(nworkers=2) as (c, s, workers):
            replies = await c.upload_file(str(path))
            assert set(replies) == {w.address for w in workers}
            assert all(r["status"] == "OK" for r in replies.values())
            for w in workers:
                assert (pathlib.Path(w.local_directory) / "uploads" / path.name).read_text() == path.read_text()
            fs = [c.submit(import_value, modname, workers=[w.address], pure=False) for w in workers]
            assert await c.gather(fs) == ["from an uploaded module"] * 2
    finally:
        sys.modules.pop(modname, None)


# ----------------------------------------------------------------------------- data lifetime and transfer


@gen_test(timeout=20)
async def test_dropping_last_future_releases_data():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        f = c.submit(inc, 41)
        g = c.submit(inc, 41)  # same key: two futures, one reference each
        assert await f == 42
        key = f.key
        assert key in s.tasks and any(key in w.data for w in workers)
        del f
        gc.collect()
        # still referenced by g: nothing is released
        assert await g == 42
        assert key in s.tasks
        del g
        gc.collect()
        await until(lambda: key not in s.tasks and all(key not in w.data for w in workers),
                    what="released everywhere")
        assert key not in c.futures and key not in c.refcount


@gen_test(timeout=20)
async def test_dependency_fetched_worker_to_worker():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        x = c.submit(inc, 1, workers=[a.address])
        await x
        assert x.key in a.data and x.key not in b.data
        y = c.submit(inc, x, workers=[b.address])
        assert await y == 3
        # b fetched x from a (peer to peer) and told the scheduler (add-keys)
        await until(lambda: {ws.address for ws in s.tasks[x.key].who_has} == {a.address, b.address},
                    what="scheduler learned of b's replica")
        assert b.data[x.key] == 2
        states = [(start, finish) for key, start, finish, *_ in b.story(x.key) if key == x.key]
        assert ("fetch", "flight") in states and ("flight", "memory") in states
        # x was computed once (on a); b's copy is a transfer, not a recomputation
        assert len([e for e in s.story(x.key) if e[0] == x.key and e[2] == "processing"]) == 1
        # x was never computed on b
        assert ("ready", "executing") not in states
        assert any(e[0] == x.key and e[2] == "memory" for e in a.story(x.key))


# ----------------------------------------------------------------------------- errors at submit


@gen_test(timeout=20)
async def test_unpicklable_argument_raises_at_submit():
    async with gen_cluster() as (c, s, workers):
        lock = threading.Lock()
        with pytest.raises(TaskSerializationError) as info:
            c.submit(identity, 1, lock)
        msg = str(info.value)
        assert "argument 1" in msg and "lock" in msg and "identity" in msg
        assert isinstance(info.value, TypeError)
        with pytest.raises(TaskSerializationError, match="keyword argument 'flag'"):
            c.submit(identity, 1, flag=lock)
        # nothing was sent; the client still works
        assert await c.submit(inc, 1) == 2
        assert not any(k.startswith("identity-") for k in s.tasks)


@gen_test(timeout=20)
async def test_future_from_other_client_rejected():
    async with gen_cluster() as (c, s, workers):
        async with Client(s.address, asynchronous=True, set_as_default=False) as c2:
            f = c.submit(inc, 1)
            with pytest.raises(ValueError, match="another client"):
                c2.submit(inc, f)
            with pytest.raises(ValueError):
                c2.map(add, [f], [1])
            with pytest.raises(ValueError):
                c2.submit(nested_sum, [f, (1, 2)], {})
            assert await c2.submit(inc, 10) == 11
            assert await f == 2


@gen_test(timeout=20)
async def test_wrong_key_type():
    async with gen_cluster() as (c, s, workers):
        for bad in (object(), ["a", "list"], {"a": 1}, True, ("ok", object())):
            with pytest.raises(TypeError):
                c.submit(inc, 1, key=bad)
        with pytest.raises(TypeError):
            c.map(inc, [1], key=[object()])
        with pytest.raises(TypeError):
            await c.scatter({object(): 1})
        with pytest.raises(TypeError):
            c.submit(42)
        assert await c.submit(inc, 1, key=("tuple", 1)) == 2
        assert await c.submit(inc, 2, key=7) == 3
