"""Tasks that submit tasks (issue 13): ``get_client``, ``worker_client``,
``secede``/``rejoin``, ``get_worker``; futures made in tasks and returned from
them; a recursive fan-out six levels deep on one-thread workers.

Worker processes (``LocalCluster(n_workers=2, threads_per_worker=1)``) unless
the test says otherwise; nothing sleeps to synchronise.
"""

from __future__ import annotations

import os
import threading

import pytest

from cluster import (
    Client,
    Future,
    LocalCluster,
    get_client,
    get_worker,
    rejoin,
    secede,
    worker_client,
)
from tests.helpers import gen_cluster, gen_test


def inc(x):
    return x + 1


def fib(n):
    if n < 2:
        return n
    with worker_client() as c:
        a, b = c.submit(fib, n - 1), c.submit(fib, n - 2)
        return a.result() + b.result()


def tree(depth):
    """A binary tree of tasks ``depth`` levels deep; the number of leaves."""
    if depth == 0:
        return 1
    with worker_client() as c:
        return sum(c.gather([c.submit(tree, depth - 1, pure=False) for _ in range(2)]))


def client_identity(_):
    c = get_client()
    return get_worker().address, id(c), c.scheduler_address, os.getpid()


def make_futures(n):
    c = get_client()
    return [c.submit(inc, i, pure=False) for i in range(n)]


def total(values):
    return sum(values)


def secede_wait_rejoin(x):
    worker = get_worker()
    secede()
    value = get_client().submit(inc, x, pure=False).result()
    rejoin()
    # Back in the pool: as many pool threads as the worker has.
    return value, len(worker.pool.threads), worker.nthreads


def outside_task_errors():
    out = []
    try:
        with worker_client():
            pass
    except ValueError as e:
        out.append(str(e))
    return out


@pytest.fixture
def cluster_client():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


@pytest.mark.timeout(120)
def test_recursive_fan_out_six_levels_does_not_deadlock(cluster_client):
    c = cluster_client
    assert c.submit(fib, 6).result(timeout=90) == 8
    assert c.submit(tree, 6).result(timeout=90) == 64


@pytest.mark.timeout(60)
def test_get_client_is_one_per_worker_and_default_outside(cluster_client):
    c = cluster_client
    assert get_client() is c
    out = c.gather(c.map(client_identity, range(8)), )
    by_worker: dict[str, set] = {}
    for address, client_id, scheduler_address, pid in out:
        assert pid != os.getpid()
        assert scheduler_address == c.scheduler_address
        by_worker.setdefault(address, set()).add(client_id)
    assert all(len(ids) == 1 for ids in by_worker.values())
    # The workers' clients are clients of the scheduler like ours.
    assert len(c.scheduler_info()["workers"]) == 2


@pytest.mark.timeout(60)
def test_futures_made_in_tasks_and_returned_stay_valid(cluster_client):
    c = cluster_client
    outer = c.submit(make_futures, 5)
    inner = outer.result(timeout=30)
    assert all(isinstance(f, Future) and f.client is c for f in inner)
    assert c.gather(inner) == [1, 2, 3, 4, 5]
    # Passed on to another task they are values again.
    assert c.submit(total, inner).result(timeout=30) == 15
    del outer  # the task's own reference goes; ours keeps the data
    assert [f.result(timeout=30) for f in inner] == [1, 2, 3, 4, 5]


@pytest.mark.timeout(60)
def test_secede_then_rejoin_takes_a_pool_place_again(cluster_client):
    c = cluster_client
    assert c.submit(secede_wait_rejoin, 1).result(timeout=30) == (2, 1, 1)
    assert c.gather(c.map(inc, range(10))) == list(range(1, 11))


@pytest.mark.timeout(30)
def test_outside_a_task():
    assert outside_task_errors() and "inside a task" in outside_task_errors()[0]
    rejoin()  # nothing to rejoin: no effect
    with pytest.raises(ValueError, match="no running Client"):
        get_client()


def blocking_with_client(name):
    """Submits through the worker's client, then holds the thread until released."""
    c = get_client()
    assert c.submit(inc, 1, pure=False).result(timeout=10) == 2
    return EVENTS[name].wait(10)


EVENTS: dict[str, threading.Event] = {}


@gen_test(timeout=60)
async def test_in_process_worker_closes_its_task_client():
    EVENTS["go"] = threading.Event()
    EVENTS["go"].set()
    try:
        async with gen_cluster(nworkers=2, nthreads=1) as (c, s, workers):
            assert await c.submit(fib, 5) == 5
            assert await c.submit(blocking_with_client, "go") is True
            clients = [w.__dict__.get("_task_client") for w in workers]
            assert any(cl is not None and cl.status == "running" for cl in clients)
            # Worker clients are clients of the scheduler.
            assert len(s.clients) >= 2
        assert all(cl is None or cl.status == "closed" for cl in clients)
    finally:
        EVENTS.clear()
