"""Server behaviours that dask.distributed users rely on (issue 13): a retired
worker stays gone, ``restart`` without nannies says why it cannot work, the
bound port of a random-port server, a worker's default name.

Real servers on 127.0.0.1; nothing sleeps to synchronise.
"""

from __future__ import annotations

import pytest
from cluster.runtime.errors import ClusterTimeoutError
from cluster.runtime.utils import parse_address, parse_host_port

from cluster import Scheduler, Worker
from tests.helpers import gen_cluster, gen_test, until


def inc(x):
    return x + 1


@gen_test(timeout=30)
async def test_retire_workers_default_closes_the_worker():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        held = c.submit(inc, 1, workers=[a.address])
        assert await held == 2
        info = await s.retire_workers(workers=[a.address])  # close_workers=False, the default
        assert set(info) == {a.address}
        # Removed and closed: a worker only dropped used to register again and take tasks.
        await until(lambda: a.status == "closed", timeout=10, what="the retired worker to close")
        assert set(s.workers) == {b.address}
        futures = [c.submit(inc, i, pure=False) for i in range(10)]
        assert await c.gather(futures) == list(range(1, 11))
        assert all(s.tasks[f.key].who_has == {s.workers[b.address]} for f in futures)
        assert await held == 2  # its data moved to b first
        assert set(s.workers) == {b.address}


@gen_test(timeout=30)
async def test_restart_without_nannies_raises_saying_why():
    async with gen_cluster(nworkers=2) as (c, s, workers):
        with pytest.raises(ClusterTimeoutError, match="no nanny") as info:
            await c.restart(timeout=1)
        assert all(w.address in str(info.value) for w in workers)
        await until(lambda: all(w.status == "closed" for w in workers), timeout=10,
                    what="the workers without nanny to close")


@gen_test(timeout=30)
async def test_port_is_the_bound_port_after_a_random_one():
    async with Scheduler(port=0, dashboard_address=None) as s:
        assert s.port != 0
        assert s.port == parse_host_port(parse_address(s.address)[1])[1]
        async with Worker(s.address, nthreads=1, port=0) as w:
            assert w.port != 0
            assert w.port == parse_host_port(parse_address(w.address)[1])[1]


@gen_test(timeout=30)
async def test_worker_name_defaults_to_its_address():
    async with Scheduler(port=0, dashboard_address=None) as s:
        async with Worker(s.address, nthreads=1) as w, Worker(s.address, nthreads=1, name="named") as v:
            assert w.name == w.address
            assert s.workers[w.address].name == w.address
            assert v.name == "named" and s.workers[v.address].name == "named"
