"""Losing workers costs time, not results: kill -9, lifetimes, SIGTERM, spilling, restart.

Real worker processes (LocalCluster) on loopback.  The decisions behind these
(what is recomputed, what a retirement copies, when it is refused) are tested
without sockets in tests/unit/test_scenarios*.py; what stays here is the IO:
process death, signals, disk.
"""

from __future__ import annotations

import os
import signal

import pytest

from cluster import Client, LocalCluster, wait
from tests.helpers import until_sync


def slowinc(x, delay=0.005):
    import time

    time.sleep(delay)  # the work itself, not synchronisation
    return x + 1


def add(a, b):
    return a + b


def pid():
    return os.getpid()


def blob(i, size=10_000_000):
    return bytes([i % 256]) * size


def worker_pids(client):
    return client.run(pid)


@pytest.mark.timeout(180)
def test_kill_9_worker_during_graph_with_dependencies():
    """(a) SIGKILL a worker in the middle of a 2,000-task graph: every result is right."""
    with LocalCluster(n_workers=3, threads_per_worker=1) as cluster, Client(cluster) as c:
        leaves = c.map(slowinc, range(1000), delay=0.002)
        layer = leaves
        while len(layer) > 1:  # a tree of ~1,000 more tasks with dependencies
            layer = [c.submit(add, layer[i], layer[i + 1]) if i + 1 < len(layer) else layer[i]
                     for i in range(0, len(layer), 2)]
        total = layer[0]
        victim_addr, victim_pid = next(iter(worker_pids(c).items()))
        # Wait until the victim holds results, then kill it mid-graph.
        until_sync(lambda: len(c.has_what().get(victim_addr, [])) > 50, timeout=60,
                   what="the victim to hold results")
        os.kill(victim_pid, signal.SIGKILL)
        assert total.result(timeout=120) == sum(range(1, 1001))
        assert c.gather(leaves) == list(range(1, 1001))
        assert victim_addr not in c.scheduler_info()["workers"]


@pytest.mark.timeout(180)
def test_lifetime_with_stagger_under_steady_load():
    """(d) 3 workers with a short, staggered lifetime retire under a steady stream of tasks;
    every future completes with the right value."""
    with LocalCluster(n_workers=3, threads_per_worker=1, lifetime="2s", lifetime_stagger="0.5s") as cluster, \
            Client(cluster) as c:
        original = set(c.scheduler_info()["workers"])
        futures = []
        # Keep tasks flowing until every original worker has retired at least once,
        # starting replacements as old workers go (as an adaptive cluster would).
        while original & set(c.scheduler_info()["workers"]):
            batch = [c.submit(slowinc, len(futures) + k, delay=0.01, pure=False) for k in range(20)]
            futures.extend(batch)
            while not all(f.done() for f in batch):
                cluster.scale(3)  # replaces retired workers
                try:
                    wait(batch, timeout=0.5)
                except TimeoutError:
                    pass
        results = c.gather(futures)
        assert results == [k + 1 for k in range(len(futures))]
        assert not original & set(c.scheduler_info()["workers"])
        assert len(futures) >= 20


@pytest.mark.timeout(120)
def test_spill_holds_five_times_the_limit():
    """(c) a worker with a 100 MB limit holds 500 MB of results on disk and gives them all back."""
    # No nanny: at a 100 MB limit the interpreter alone is a third of it, and the
    # nanny's terminate threshold (95%) is not what this test is about.
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="100MB", nanny=False) as cluster, \
            Client(cluster) as c:
        futures = c.map(blob, range(50))  # 50 x 10 MB
        wait(futures, timeout=90)

        def spilled():
            from cluster import get_worker

            data = get_worker().data
            return len(data.disk), data.disk_total, data.memory_total

        (n_disk, disk_bytes, mem_bytes), = c.run(spilled).values()
        assert n_disk >= 40
        assert disk_bytes >= 400_000_000
        assert mem_bytes <= 100_000_000
        for i, f in enumerate(futures):  # one at a time: each comes back from disk intact
            assert f.result(timeout=30) == blob(i)
        def storage_files():
            from cluster import get_worker

            return sorted(os.listdir(os.path.join(get_worker().local_directory, "storage")))

        assert list(c.run(storage_files).values())[0]
        del futures, f
        until_sync(lambda: list(c.run(storage_files).values())[0] == [], timeout=30,
                   what="spill files removed when their keys are released")


@pytest.mark.timeout(60)
def test_sigterm_to_worker_process_retires_gracefully():
    """SIGTERM to a worker process moves its unique data away before it exits: nothing recomputed."""
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        pids = worker_pids(c)
        victim_addr, victim_pid = next(iter(pids.items()))
        futures = c.map(blob, range(10), size=1000, workers=[victim_addr])
        wait(futures, timeout=30)
        os.kill(victim_pid, signal.SIGTERM)
        until_sync(lambda: victim_addr not in c.scheduler_info()["workers"], timeout=30,
                   what="the worker to retire")
        assert c.gather(futures) == [blob(i, 1000) for i in range(10)]
        stories = [c.story(f) for f in futures]
        for f, story in zip(futures, stories, strict=True):
            assert len([e for e in story if e[0] == f.key and e[1:3] == ("processing", "memory")]) == 1


@pytest.mark.timeout(60)
def test_client_restart_through_nannies():
    """Client.restart() restarts every worker process and cancels every future."""
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        assert all(type(w).__name__ == "Nanny" for w in cluster.workers.values())
        before = worker_pids(c)
        f = c.submit(slowinc, 1)
        assert f.result(timeout=30) == 2
        c.restart()
        after = worker_pids(c)
        assert len(after) == 2
        assert not set(before.values()) & set(after.values())
        assert f.cancelled()
        assert c.submit(slowinc, 10).result(timeout=30) == 11


@pytest.mark.timeout(60)
def test_crashed_worker_process_comes_back_under_nanny():
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, Client(cluster) as c:
        (addr, worker_pid), = worker_pids(c).items()
        os.kill(worker_pid, signal.SIGKILL)

        def replaced() -> bool:
            workers = c.scheduler_info()["workers"]
            return len(workers) == 1 and addr not in workers

        until_sync(replaced, timeout=30, what="a new worker process")
        assert list(worker_pids(c).values()) != [worker_pid]
        assert c.submit(slowinc, 1).result(timeout=30) == 2
