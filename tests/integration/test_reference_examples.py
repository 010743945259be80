"""The examples of the reference page "Python API (advanced)"
(/work/shared/reference/distributed-python-api.txt), run as written with two
substitutions: ``from cluster import ...`` for ``from dask.distributed import ...``
and ``asyncio.run(f(...))`` for ``asyncio.get_event_loop().run_until_complete(f(...))``.

Examples that wait on ``.finished()`` would run forever; a helper thread finds
their servers once they run, checks that they work (a client computes
``10 + 1`` through them), then closes them with ``await server.close()`` on
their own event loop, as the page suggests, so that the example returns.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Callable

import pytest

import cluster
from cluster import Client, LocalCluster, Scheduler, Worker
from tests.helpers import until_sync

pytestmark = pytest.mark.timeout(60)

REFERENCE = "/work/shared/reference/distributed-python-api.txt"

FULL_EXAMPLE = '''\
import asyncio
from cluster import Scheduler, Worker, Client

async def f():
    async with Scheduler() as s:
        async with Worker(s.address) as w1, Worker(s.address) as w2:
            async with Client(s.address, asynchronous=True) as client:
                future = client.submit(lambda x: x + 1, 10)
                result = await future
                print(result)

asyncio.run(f())
'''

SCHEDULER_EXAMPLE = '''\
import asyncio
from cluster import Scheduler, Worker

async def f():
    s = Scheduler()        # scheduler created, but not yet running
    s = await s            # the scheduler is running
    await s.finished()     # wait until the scheduler closes

asyncio.run(f())
'''

WORKER_EXAMPLE = '''\
import asyncio
from cluster import Scheduler, Worker

async def f(scheduler_address):
    w = await Worker(scheduler_address)
    await w.finished()

asyncio.run(f("tcp://127.0.0.1:8786"))
'''

MANY_IN_ONE_LOOP_EXAMPLE = '''\
import asyncio
from cluster import Scheduler, Worker

async def f():
    s = await Scheduler()
    w = await Worker(s.address)
    await w.finished()
    await s.finished()

asyncio.run(f())
'''

CONTEXT_MANAGER_EXAMPLE = '''\
import asyncio
from cluster import Scheduler, Worker

async def f():
    async with Scheduler() as s:
        async with Worker(s.address) as w:
            await w.finished()
            await s.finished()

asyncio.run(f())
'''

CONTEXT_MANAGER_CLIENT_EXAMPLE = '''\
import asyncio
from cluster import Scheduler, Worker, Client

async def f():
    async with Scheduler() as s:
        async with Worker(s.address) as w1, Worker(s.address) as w2:
            async with Client(s.address, asynchronous=True) as client:
                future = client.submit(lambda x: x + 1, 10)
                result = await future
                print(result)

asyncio.run(f())
'''

ALL_EXAMPLES = [FULL_EXAMPLE, SCHEDULER_EXAMPLE, WORKER_EXAMPLE, MANY_IN_ONE_LOOP_EXAMPLE,
                CONTEXT_MANAGER_EXAMPLE, CONTEXT_MANAGER_CLIENT_EXAMPLE]


# ----------------------------------------------------------------------------- machinery


def running(cls) -> list:
    """Running instances of ``cls`` in this process (the examples keep theirs to themselves)."""
    return [o for o in gc.get_objects() if isinstance(o, cls) and o.status == "running"]


def close_server(server, timeout: float = 10) -> None:
    """``await server.close()`` on the server's own event loop, from another thread."""
    asyncio.run_coroutine_threadsafe(server.close(), server.loop).result(timeout)


def close_everything_running() -> None:
    for server in running(Worker) + running(Scheduler):
        try:
            close_server(server)
        except Exception:  # noqa: BLE001 - best effort so that the example returns
            pass


def run_example(source: str, closer: Callable[[], None] | None = None) -> None:
    """Execute an example's source; ``closer`` runs meanwhile in a thread to end it."""
    errors: list[BaseException] = []
    thread = None
    if closer is not None:
        def target() -> None:
            try:
                closer()
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)
                close_everything_running()

        thread = threading.Thread(target=target, name="example-closer")
        thread.start()
    try:
        exec(compile(source, "<reference example>", "exec"), {"__name__": "__reference_example__"})
    finally:
        if thread is not None:
            thread.join(30)
    if errors:
        raise errors[0]


def inc(x):
    return x + 1


def check_and_close(n_workers: int, results: dict) -> None:
    """Wait for the example's scheduler and workers, compute through them, close them."""
    until_sync(lambda: len(running(Scheduler)) == 1, interval=0.05, what="the example's scheduler")
    (s,) = running(Scheduler)
    until_sync(lambda: len(s.workers) == n_workers and len(running(Worker)) == n_workers,
               interval=0.05, what=f"{n_workers} workers registered")
    workers = running(Worker)
    with Client(s.address, set_as_default=False) as c:
        info = c.scheduler_info()
        results["address"] = info["address"]
        results["workers"] = set(info["workers"])
        if n_workers:
            results["value"] = c.submit(inc, 10).result(timeout=10)
    results["scheduler"] = s.address
    results["worker_addresses"] = {w.address for w in workers}
    for w in workers:
        close_server(w)
    close_server(s)


# ----------------------------------------------------------------------------- the examples


def test_examples_match_the_reference_page():
    if not os.path.exists(REFERENCE):
        pytest.skip(f"{REFERENCE} not available")
    with open(REFERENCE) as f:
        page = f.read()
    for source in ALL_EXAMPLES:
        original = source.replace("from cluster import", "from dask.distributed import").replace(
            "asyncio.run(f(", "asyncio.get_event_loop().run_until_complete(f(")
        assert original in page, original


def test_full_example(capsys):
    run_example(FULL_EXAMPLE)
    assert capsys.readouterr().out == "11\n"
    assert running(Scheduler) == [] and running(Worker) == []


def test_scheduler_example_closed_from_another_task():
    results: dict = {}
    run_example(SCHEDULER_EXAMPLE, lambda: check_and_close(0, results))
    assert results["address"] == results["scheduler"]
    assert results["address"].startswith("tcp://127.0.0.1:")
    assert results["workers"] == set()
    assert running(Scheduler) == []


def test_worker_example():
    with LocalCluster(n_workers=0, processes=False) as lc:
        address = lc.scheduler_address
        results: dict = {}

        def closer() -> None:
            until_sync(lambda: len(lc.scheduler.workers) == 1, interval=0.05, what="the example's worker")
            (w,) = running(Worker)
            with Client(lc, set_as_default=False) as c:
                results["value"] = c.submit(inc, 10).result(timeout=10)
                results["workers"] = set(c.scheduler_info()["workers"])
            results["worker"] = w.address
            close_server(w)

        # the page assumes a scheduler on port 8786; we use the one just started on a free port
        run_example(WORKER_EXAMPLE.replace("tcp://127.0.0.1:8786", address), closer)
        assert results["value"] == 11
        assert results["workers"] == {results["worker"]}
        until_sync(lambda: not lc.scheduler.workers, what="worker gone from the scheduler")


def test_start_many_in_one_event_loop():
    results: dict = {}
    run_example(MANY_IN_ONE_LOOP_EXAMPLE, lambda: check_and_close(1, results))
    assert results["value"] == 11
    assert results["workers"] == results["worker_addresses"]
    assert running(Scheduler) == [] and running(Worker) == []


def test_context_managers():
    results: dict = {}
    run_example(CONTEXT_MANAGER_EXAMPLE, lambda: check_and_close(1, results))
    assert results["value"] == 11
    assert results["workers"] == results["worker_addresses"]
    assert running(Scheduler) == [] and running(Worker) == []


def test_context_managers_with_client(capsys):
    run_example(CONTEXT_MANAGER_CLIENT_EXAMPLE)
    assert capsys.readouterr().out == "11\n"
    assert running(Scheduler) == [] and running(Worker) == []


def test_nanny_substitution():
    if not hasattr(cluster, "Nanny"):
        pytest.skip("cluster.Nanny does not exist in this version: the reference page's "
                    "'replace Worker with Nanny' example cannot run")
    source = MANY_IN_ONE_LOOP_EXAMPLE.replace(
        "from cluster import Scheduler, Worker", "from cluster import Scheduler, Worker, Nanny"
    ).replace("w = await Worker(s.address)", "w = await Nanny(s.address)")
    results: dict = {}

    def closer() -> None:
        until_sync(lambda: len(running(Scheduler)) == 1, interval=0.05, what="scheduler")
        (s,) = running(Scheduler)
        until_sync(lambda: len(s.workers) == 1, what="the nanny's worker")
        with Client(s.address, set_as_default=False) as c:
            results["value"] = c.submit(inc, 10).result(timeout=10)
        for n in running(cluster.Nanny):
            close_server(n)
        close_server(s)

    run_example(source, closer)
    assert results["value"] == 11
