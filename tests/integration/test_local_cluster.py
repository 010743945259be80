"""LocalCluster and the synchronous Client, with real worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import traceback

import pytest
from cluster.runtime.errors import RemoteTraceback

from cluster import Client, LocalCluster, Scheduler, Worker, get_worker
from tests.helpers import gen_test, socket_link, until_sync

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    """``Client()`` must start its own cluster, not find one a launcher advertised."""
    monkeypatch.delenv("CLUSTER_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.delenv("CLUSTER_SCHEDULER_FILE", raising=False)


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def noop(x):
    return x


def worker_info(_=None):
    w = get_worker()
    return w.address, os.getpid()


class ProcessError(Exception):
    """Defined at module level: the worker processes import it by reference."""


def fail_in_process(msg):
    raise ProcessError(msg)


def tree_sum(c, futures):
    """Pairwise reduction of futures on the cluster."""
    while len(futures) > 1:
        nxt = [c.submit(add, futures[i], futures[i + 1]) for i in range(0, len(futures) - 1, 2)]
        if len(futures) % 2:
            nxt.append(futures[-1])
        futures = nxt
    return futures[0]


def n_workers(c):
    return len(c.scheduler_info()["workers"])


def test_local_cluster_processes_compute():
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        assert cluster.processes
        assert c.cluster is cluster
        assert n_workers(c) == 2
        assert c.submit(inc, 1).result() == 2
        assert c.gather(c.map(add, range(5), range(5))) == [0, 2, 4, 6, 8]
        pids = c.run(os.getpid)
        assert len(pids) == 2 and len(set(pids.values())) == 2
        assert os.getpid() not in pids.values()
        # a task runs in one of those processes, on the worker it says it is
        addr, pid = c.submit(worker_info, 0, pure=False).result()
        assert pids[addr] == pid
        assert c.nthreads() == dict.fromkeys(pids, 1)


def test_local_cluster_binds_loopback():
    # TLS by default (see tests/integration/test_tls.py), loopback either way.
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, Client(cluster) as c:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert c.scheduler_address == cluster.scheduler_address
        assert cluster.scheduler.listen_address.startswith("tls://127.0.0.1:")
        workers = c.scheduler_info()["workers"]
        assert workers and all(a.startswith("tls://127.0.0.1:") for a in workers)


def test_client_in_the_clusters_process_talks_through_memory():
    """Client(cluster) and Client(its address) in the scheduler's process reach it over
    an inproc link (no socket, no TLS record per message); what they show is the TLS
    address.  Once the scheduler closes, its address leads nowhere in-process."""
    from cluster.runtime.comm import inproc

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        for make in (lambda: Client(cluster), lambda: Client(address)):
            with make() as c:
                assert c._link.startswith("inproc://"), c._link
                assert c.scheduler_address == address and address in repr(c)
                assert c.scheduler_info()["address"] == address
                assert c.submit(inc, 1, pure=False).result() == 2
                with pytest.raises(ProcessError, match="boom"):
                    c.submit(fail_in_process, "boom").result()
                assert sum(c.gather(c.map(inc, range(100)))) == sum(range(1, 101))
                # the client's RPCs (here: run on the workers) go the same way
                assert list(c.run(os.getpid).values()) != [os.getpid()]
        # Without the in-process twin the client uses TLS, as a remote one does.
        with socket_link(), Client(cluster) as c:
            assert c._link == address
            assert c.submit(inc, 2, pure=False).result() == 3
        # Credentials given explicitly are used: over the socket, authenticated.
        with Client(address, security=cluster.security) as c:
            assert c._link == address
            assert c.submit(inc, 3, pure=False).result() == 4
    assert inproc.alias_of(address) is None


def test_scale_up_and_down():
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, Client(cluster) as c:
        assert n_workers(c) == 1
        cluster.scale(3)
        until_sync(lambda: n_workers(c) == 3, what="3 workers")
        assert len(cluster.workers) == 3
        fs = c.map(inc, range(12))
        assert c.gather(fs) == list(range(1, 13))
        pids = set(c.run(os.getpid).values())
        assert len(pids) == 3
        cluster.scale(1)
        until_sync(lambda: n_workers(c) == 1, what="1 worker")
        assert len(cluster.workers) == 1
        # the results held by removed workers are recomputed on demand
        assert c.gather(fs) == list(range(1, 13))
        assert c.submit(inc, 100).result() == 101
        with pytest.raises(ValueError):
            cluster.scale(-1)


def test_client_without_address_starts_and_stops_a_cluster():
    with Client(n_workers=2, threads_per_worker=1) as c:
        cluster = c.cluster
        assert c._link.startswith("inproc://")  # its own cluster: through memory
        assert isinstance(cluster, LocalCluster)
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert n_workers(c) == 2
        assert c.submit(inc, 41).result() == 42
        pids = set(c.run(os.getpid).values())
        assert os.getpid() not in pids
    assert c.status == "closed"
    assert cluster.status == "closed"
    assert cluster.workers == {}
    # the worker processes are gone (the leak fixture also checks)
    import psutil

    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


def test_processes_false():
    with Client(processes=False) as c:
        cluster = c.cluster
        assert not cluster.processes
        assert all(isinstance(w, Worker) for w in cluster.workers.values())
        pids = c.run(os.getpid)
        assert set(pids.values()) == {os.getpid()}
        assert c.submit(inc, 1).result() == 2
        fs = c.map(inc, range(10))
        assert c.submit(sum, fs).result() == 55
    assert cluster.status == "closed"

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False) as cluster, \
            Client(cluster) as c:
        assert c.nthreads() == {w.address: 2 for w in cluster.workers.values()}
        addr, pid = c.submit(worker_info, pure=False).result()
        assert pid == os.getpid() and addr in c.nthreads()


def test_scheduler_file_with_local_cluster(tmp_path):
    path = tmp_path / "sched" / "scheduler.json"
    with LocalCluster(n_workers=1, threads_per_worker=1,
                      scheduler_kwargs={"scheduler_file": str(path)}) as cluster:
        assert path.exists()
        info = json.loads(path.read_text())
        assert info["address"] == cluster.scheduler_address
        with Client(scheduler_file=str(path)) as c:
            assert c.scheduler_address == cluster.scheduler_address
            assert c.submit(inc, 1).result() == 2
    assert not path.exists()


@gen_test(timeout=30)
async def test_scheduler_file_async(tmp_path):
    path = tmp_path / "scheduler.json"
    async with Scheduler(scheduler_file=str(path)) as s:
        info = json.loads(path.read_text())
        assert info["address"] == s.address
        async with Worker(scheduler_file=str(path), nthreads=1, security=False) as w, \
                Client(scheduler_file=str(path), asynchronous=True, security=False) as c:
            assert w.scheduler_addr == s.address
            assert await c.submit(inc, 1) == 2
            assert set(s.workers) == {w.address}
    assert not path.exists()


def test_exception_through_processes():
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        addrs = set(c.scheduler_info()["workers"])
        f = c.submit(fail_in_process, "from a child process")
        with pytest.raises(ProcessError, match="from a child process") as info:
            f.result()
        assert type(info.value) is ProcessError
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "fail_in_process" in cause.text
        assert cause.worker in addrs and cause.worker in str(cause)
        assert isinstance(f.exception(), ProcessError)
        assert "in fail_in_process" in "".join(traceback.format_tb(f.traceback()))
        g = c.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            g.result()
        assert "ZeroDivisionError" in g.traceback_text


def test_bench_noop_map_and_tree_reduction_on_two_processes():
    """The benchmark's noop_map and tree_reduce workloads (bench/run_client.py), with 10 tasks."""
    from bench import workloads as w

    n = 10
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        futures = c.map(w.noop, range(n), pure=False)
        out = c.gather(futures)
        assert out == [None] * n
        assert len({f.key for f in futures}) == n

        level = c.map(w.leaf, range(n), pure=False)
        leaves = list(level)
        ntasks = len(level)
        while len(level) > 1:
            nxt = [c.submit(w.add, level[i], level[i + 1], pure=False)
                   for i in range(0, len(level) - 1, 2)]
            ntasks += len(nxt)
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        assert level[0].result() == n * (n - 1) // 2
        assert ntasks == 2 * n - 1
        assert c.gather(leaves) == list(range(n))
        # ran in the two worker processes, not here
        pids = {c.submit(w.getpid, pure=False, workers=[a]).result()
                for a in c.scheduler_info()["workers"]}
        assert len(pids) == 2 and os.getpid() not in pids
        # the same reduction written with the helper, bigger
        assert tree_sum(c, c.map(inc, range(100))).result() == sum(range(1, 101))
