"""``client.run(f)`` passes ``dask_worker`` and ``client.run_on_scheduler(f)``
passes ``dask_scheduler`` when ``f`` takes that parameter, as dask does
(issue 13): in worker processes and in-process, sync and ``async def``.
"""

from __future__ import annotations

import os

import pytest

from cluster import Client, LocalCluster
from tests.helpers import gen_cluster, gen_test


async def worker_name_async(dask_worker):
    return dask_worker.name


async def scheduler_workers_async(dask_scheduler):
    return sorted(dask_scheduler.workers)


def pid_and_worker(x, dask_worker=None):
    return x, os.getpid(), dask_worker.address


def no_server_parameter(x=1):
    return x


@pytest.mark.timeout(90)
def test_run_passes_servers_in_worker_processes():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        addresses = sorted(c.scheduler_info()["workers"])
        assert c.run(lambda dask_worker: dask_worker.address) == {a: a for a in addresses}
        names = c.run(worker_name_async)
        assert sorted(names) == addresses and all(n is not None for n in names.values())
        out = c.run(pid_and_worker, 7)
        assert {a: (x, w) for a, (x, _, w) in out.items()} == {a: (7, a) for a in addresses}
        assert os.getpid() not in {pid for _, pid, _ in out.values()}
        assert c.run(no_server_parameter, 5) == {a: 5 for a in addresses}
        assert c.run(lambda dask_worker: dask_worker.address, workers=addresses[:1]) == {addresses[0]: addresses[0]}
        assert c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.address) == cluster.scheduler_address
        assert c.run_on_scheduler(scheduler_workers_async) == addresses
        assert c.run_on_scheduler(no_server_parameter, 3) == 3


@gen_test(timeout=30)
async def test_run_passes_servers_in_process():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        by_address = {w.address: w for w in workers}
        # Results travel pickled even in-process: the objects are compared by id.
        assert await c.run(lambda dask_worker: id(dask_worker)) == {a: id(w) for a, w in by_address.items()}
        assert await c.run(worker_name_async) == {w.address: w.name for w in workers}
        assert await c.run_on_scheduler(lambda dask_scheduler: id(dask_scheduler)) == id(s)
        assert await c.run_on_scheduler(scheduler_workers_async) == sorted(by_address)
        # Given explicitly, the caller's value wins.
        assert await c.run_on_scheduler(lambda dask_scheduler=None: dask_scheduler, dask_scheduler=5) == 5
