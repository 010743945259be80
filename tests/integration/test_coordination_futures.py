"""Variable, Queue, published datasets and fire_and_forget on a real cluster (issue 13):
from clients and from inside tasks (``get_client()``), sync and async clients,
futures kept alive by what holds them, timeouts, a dataset published by a client
that then closes.

Worker processes (``LocalCluster``) unless the test says otherwise; nothing
sleeps to synchronise (tasks that must wait, wait on a Variable or a Queue).
"""

from __future__ import annotations

import pytest

from cluster import Client, Future, LocalCluster, Queue, Variable, fire_and_forget, get_client, wait
from tests.helpers import gen_cluster, gen_test, until, until_sync

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- task functions


def inc(x):
    return x + 1


def read_variable_future(name: str) -> int:
    """Inside a task: the future stored in Variable ``name`` (attached to the worker's client)."""
    f = Variable(name).get(timeout=30)
    assert isinstance(f, Future) and f.client is get_client()
    return f.result(timeout=30)


def store_in_variable(name: str, value) -> str:
    v = Variable(name)
    v.set(value)
    return v.name


def submit_and_store(name: str, x: int) -> None:
    """Inside a task: submit a task and store its future; the task's own reference then goes."""
    Variable(name).set(get_client().submit(inc, x, pure=False))


def produce(q: Queue, n: int) -> int:
    for i in range(n):
        q.put(i)
    return n


def consume(q: Queue, n: int) -> list:
    return [q.get(timeout=30) for _ in range(n)]


def put_future_in_queue(name: str, x: int) -> None:
    Queue(name).put(get_client().submit(inc, x, pure=False))


def wait_for_gate_then_report(gate: str, done: str, value) -> None:
    """Blocks until Variable ``gate`` is set, then sets Variable ``done``."""
    Variable(gate).get(timeout=60)
    Variable(done).set(value)


def on_scheduler(key, dask_scheduler=None) -> str | None:
    ts = dask_scheduler.tasks.get(key)
    return None if ts is None else ts.state


def wanted_by(key, dask_scheduler=None) -> list:
    ts = dask_scheduler.tasks.get(key)
    return [] if ts is None else sorted(cs.client_key for cs in ts.who_wants)


@pytest.fixture
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster:
        yield cluster


@pytest.fixture
def c(cluster):
    with Client(cluster) as client:
        yield client


# ----------------------------------------------------------------------------- Variable


def test_variable_values_and_futures_between_client_and_tasks(c):
    v = Variable("x")
    v.set(c.submit(inc, 1))
    assert v.get().result(timeout=30) == 2
    assert c.submit(read_variable_future, "x").result(timeout=30) == 2
    # Set from a task, read here.
    assert c.submit(store_in_variable, "y", {"a": [1, 2]}).result(timeout=30) == "y"
    assert Variable("y").get(timeout=10) == {"a": [1, 2]}
    # A future made inside a task, stored there, outlives the task and its client's reference.
    c.submit(submit_and_store, "z", 10).result(timeout=30)
    z = Variable("z").get(timeout=10)
    assert z.client is c and z.result(timeout=30) == 11
    # A Variable pickles by name into tasks.
    assert c.submit(lambda var: var.get(timeout=10), Variable("y")).result(timeout=30) == {"a": [1, 2]}


def test_variable_get_times_out_and_waits_for_set(c):
    with pytest.raises(TimeoutError):
        Variable("never").get(timeout=0.2)
    with pytest.raises(TimeoutError):
        Variable("never").get(timeout="100ms")
    # A task blocked in get() is released by a set() from the client.
    waiting = c.submit(lambda: Variable("later").get(timeout=60) * 2)
    assert not waiting.done()
    Variable("later").set(21)
    assert waiting.result(timeout=30) == 42


def test_variable_keeps_its_future_alive_until_deleted(c):
    v = Variable("held")
    f = c.submit(inc, 41, pure=False)
    key = f.key
    v.set(f)
    f.result(timeout=30)
    del f
    until_sync(lambda: c.run_on_scheduler(wanted_by, key) == ["variable-held"],
               timeout=10, what="only the variable holds the key")
    assert c.run_on_scheduler(on_scheduler, key) == "memory"
    assert v.get().result(timeout=30) == 42
    # The future we just got is ours; once it is dropped and the variable deleted, the data goes.
    v.delete()
    until_sync(lambda: c.run_on_scheduler(on_scheduler, key) is None, timeout=10,
               what="the key to be forgotten")
    with pytest.raises(TimeoutError):
        v.get(timeout=0.1)


# ----------------------------------------------------------------------------- Queue


def test_queue_between_tasks_and_client(c):
    q = Queue("work")
    producer = c.submit(produce, q, 5)
    assert [q.get(timeout=30) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert producer.result(timeout=30) == 5
    for i in range(3):
        q.put(i * 10)
    assert q.qsize() == 3
    assert c.submit(consume, q, 3).result(timeout=30) == [0, 10, 20]
    assert q.qsize() == 0
    for i in range(4):
        q.put(i)
    assert q.get(batch=2) == [0, 1]
    assert q.get(batch=True) == [2, 3]
    assert q.get(batch=True) == []


def test_queue_timeouts_and_maxsize(c):
    q = Queue("bounded", maxsize=2)
    with pytest.raises(TimeoutError):
        q.get(timeout=0.1)
    q.put(1)
    q.put(2)
    with pytest.raises(TimeoutError):
        q.put(3, timeout=0.1)
    assert q.qsize() == 2
    # A task blocked in put() on the full queue goes on when the client makes room.
    blocked = c.submit(lambda queue: queue.put(3, timeout=60), q)
    assert q.get(timeout=10) == 1
    blocked.result(timeout=30)
    assert q.get(batch=2, timeout=10) == [2, 3]
    with pytest.raises(TimeoutError):
        q.get(batch=2, timeout=0.1)
    with pytest.raises(ValueError, match="maxsize"):
        Queue("bad", maxsize=-1)


def test_queued_futures_stay_alive_and_are_handed_over(c):
    q = Queue("futures")
    c.submit(put_future_in_queue, "futures", 1).result(timeout=30)
    f = c.submit(inc, 100, pure=False)
    key = f.key
    q.put(f)
    del f
    until_sync(lambda: c.run_on_scheduler(wanted_by, key) == ["queue-futures"], timeout=10,
               what="only the queue holds the key")
    first, second = q.get(timeout=10), q.get(timeout=10)
    assert isinstance(first, Future) and first.client is c
    assert (first.result(timeout=30), second.result(timeout=30)) == (2, 101)
    assert c.run_on_scheduler(wanted_by, key) == [c.id]


# ----------------------------------------------------------------------------- datasets


def test_dataset_outlives_the_client_that_published_it(cluster, c):
    with Client(cluster, set_as_default=False) as publisher:
        f = publisher.submit(inc, 1, pure=False)
        key = f.key
        publisher.publish_dataset(f, name="one")
        publisher.publish_dataset(two=[1, 2], three="x")
        with pytest.raises(KeyError, match="Dataset one already exists"):
            publisher.publish_dataset(3, name="one")
    until_sync(lambda: c.run_on_scheduler(wanted_by, key) == ["published-one"], timeout=10,
               what="only the dataset holds the key once its publisher closed")
    assert sorted(c.list_datasets()) == ["one", "three", "two"]
    got = c.get_dataset("one")
    assert got.client is c and got.result(timeout=30) == 2
    assert c.get_dataset("two") == [1, 2]
    with pytest.raises(KeyError, match="Dataset 'nope' not found"):
        c.get_dataset("nope")
    assert c.get_dataset("nope", default=None) is None
    # The mapping.
    c.datasets["four"] = 4
    assert "four" in c.datasets and c.datasets["four"] == 4 and len(c.datasets) == 4
    assert sorted(c.datasets) == ["four", "one", "three", "two"]
    del c.datasets["four"]
    assert "four" not in c.datasets
    c.publish_dataset(5, name="one", override=True)
    assert c.get_dataset("one") == 5
    del got
    until_sync(lambda: c.run_on_scheduler(on_scheduler, key) is None, timeout=10,
               what="the overridden dataset's future to be freed")
    c.unpublish_dataset("one")
    assert "one" not in c.list_datasets()


# ----------------------------------------------------------------------------- fire_and_forget


def test_fire_and_forget_runs_after_every_client_left(cluster, c):
    with Client(cluster, set_as_default=False) as other:
        f = other.submit(wait_for_gate_then_report, "gate", "done", "ran", pure=False)
        key = f.key
        fire_and_forget([{"task": f}])
        del f
    assert c.run_on_scheduler(on_scheduler, key) == "processing"
    Variable("gate").set(True)
    assert Variable("done").get(timeout=30) == "ran"
    # Done: let go of, so its memory is freed.
    until_sync(lambda: c.run_on_scheduler(on_scheduler, key) is None, timeout=10,
               what="the finished fire-and-forget task to be forgotten")


# ----------------------------------------------------------------------------- async clients


@gen_test(timeout=60)
async def test_async_client_variable_queue_datasets_fire_and_forget():
    async with gen_cluster(nworkers=2, nthreads=2) as (c, s, workers):
        v = Variable("av", client=c)
        await v.set(c.submit(inc, 1))
        f = await v.get(timeout=5)
        assert isinstance(f, Future) and await f == 2
        with pytest.raises(TimeoutError):
            await Variable("none", client=c).get(timeout=0.1)
        # Tasks in worker threads read the variable through their worker's client.
        assert await c.submit(read_variable_future, "av") == 2
        await v.delete()

        q = Queue("aq", client=c, maxsize=1)
        await q.put(c.submit(inc, 2))
        with pytest.raises(TimeoutError):
            await q.put(0, timeout=0.1)
        assert await q.qsize() == 1
        assert await (await q.get(timeout=5)) == 3
        assert await q.get(batch=True) == []

        await c.publish_dataset(c.submit(inc, 3), name="ads")
        assert await c.list_datasets() == ["ads"]
        assert await (await c.get_dataset("ads")) == 4
        await c.unpublish_dataset("ads")

        g = c.submit(inc, 4, pure=False)
        key = g.key
        fire_and_forget(g)
        await wait(g)
        del g
        await until(lambda: key not in s.tasks, timeout=10, what="fire-and-forget key freed")
        assert not s.state.clients["fire-and-forget"].wants_what


def test_published_persisted_dask_collection_for_another_client(cluster, c):
    da = pytest.importorskip("dask.array")
    with Client(cluster, set_as_default=False) as publisher:
        x = publisher.persist(da.arange(20, chunks=5))
        publisher.publish_dataset(arr=x)
        publisher.datasets["nested"] = {"a": [publisher.submit(sum, [1, 2])]}
        del x
    until_sync(lambda: publisher.id not in c.run_on_scheduler(all_wanters), timeout=10,
               what="the publisher to be gone")
    y = c.get_dataset("arr")
    assert int(y.sum().compute()) == sum(range(20))
    assert c.get_dataset("nested")["a"][0].result(timeout=30) == 3
    assert {"published-arr", "published-nested"} <= set(c.run_on_scheduler(all_wanters))


def all_wanters(dask_scheduler=None) -> list:
    return sorted({cs.client_key for ts in dask_scheduler.tasks.values() for cs in ts.who_wants})
