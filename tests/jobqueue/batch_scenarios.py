"""End-to-end scenarios every batch system's cluster must pass (real jobs, real workers).

test_pbs_cluster.py and test_sge_cluster.py run them against real batch
commands; each passes a ``make(**options)`` that builds its cluster and an
``in_queue()`` that lists the job ids its batch system still shows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from cluster.jobqueue import JobQueueCluster, JobState

from cluster import Client

from .conftest import wait_until as wait

MakeCluster = Callable[..., JobQueueCluster]


def slowinc(x: int, delay: float = 0.1) -> int:
    import time

    time.sleep(delay)
    return x + 1


def active(cluster: JobQueueCluster) -> list[str]:
    return [jid for jid, j in cluster.jobs.items() if j.state.active]


def scale_adapt_close(make: MakeCluster, in_queue: Callable[[], set[str]],
                      cancelled: JobState = JobState.CANCELLED) -> None:
    """scale to 2 jobs, compute, scale to 1 (its data moves first), adapt under load, close.

    Checks: real workers named after their jobs, TLS, nothing lost when a job
    goes, adapt grows and shrinks in whole jobs, ``close()`` leaves the queue empty.
    ``cancelled``: the state the batch system reports for a cancelled job.
    """
    with make() as cluster:
        cluster.scale(jobs=2)
        ids = list(cluster.jobs)
        assert len(ids) == 2
        cluster.wait_for_workers(2, timeout=60)
        assert set(cluster.workers) == {f"hpc-worker-{jid}" for jid in ids}
        assert all(a.startswith("tls://") for a in cluster.scheduler.state.workers)
        assert {cluster.jobs[j].state for j in ids} == {JobState.RUNNING}
        with Client(cluster) as client:
            futures = client.map(slowinc, range(50), delay=0.01)
            assert client.gather(futures) == list(range(1, 51))
            cluster.scale(jobs=1)
            gone = wait(lambda: [j for j in ids if not cluster.jobs[j].state.active], 60,
                        lambda: f"one job to end: {cluster.jobs}")
            assert cluster.jobs[gone[0]].state == cancelled
            assert client.gather(futures) == list(range(1, 51))  # its data moved first
            cluster.adapt(minimum=0, maximum=2, interval="500ms", wait_count=2,
                          target_duration="1s")
            work = client.map(slowinc, range(40), delay=0.4)
            most = 0
            while not all(f.done() for f in work):
                most = max(most, len(active(cluster)))
                assert most <= 2
                time.sleep(0.1)  # sampling the job count while the work runs
            assert client.gather(work) == list(range(1, 41))
            assert most == 2, f"adapt never went above {most} jobs"
            del work, futures
            wait(lambda: not active(cluster), 60, lambda: f"adapt to close every job: {cluster.jobs}")
        every = list(cluster.jobs)
    assert not set(every) & in_queue(), "close() left jobs in the queue"
    assert {j.state for j in cluster.jobs.values()} <= {JobState.CANCELLED, JobState.DONE}


def walltime_retirement(make: MakeCluster, walltime: str, deadline: float) -> JobQueueCluster:
    """A short walltime under a steady task stream: workers retire before it, a replacement
    job takes over, no task is lost and the first job ends by itself (not killed)."""
    with make(walltime=walltime) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        (first,) = cluster.jobs
        with Client(cluster) as client:
            futures = []
            end = time.monotonic() + deadline
            while cluster.jobs[first].state.active:
                futures.append(client.submit(slowinc, len(futures), 0.02, pure=False))
                assert time.monotonic() < end, cluster.jobs
                time.sleep(0.2)  # the pace of the task stream, not synchronisation
            assert client.gather(futures) == [i + 1 for i in range(len(futures))]
        assert cluster.jobs[first].state == JobState.DONE, cluster.jobs  # by itself
        assert len(cluster.jobs) >= 2  # replaced before it left
    return cluster


COMPUTE = """\
import json, sys
from cluster import Client

def square(x):
    return x * x

with Client() as client:
    total = client.submit(sum, client.map(square, range(50))).result()
    workers = len(client.scheduler_info()["workers"])
with open(sys.argv[1], "w") as f:
    json.dump({"total": total, "workers": workers, "argv": sys.argv[2:]}, f)
"""


def read_result(path) -> dict:
    return json.loads(path.read_text())
