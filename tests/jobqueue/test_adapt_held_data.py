"""``adapt`` with idle jobs whose workers hold results a client keeps (issue 18), fast.

The batch system is the in-memory fake of ``test_cluster_fake`` (jobs RUNNING
at once, no process started); the jobs' workers are real in-process workers on
loopback, registered under the names the jobs' workers would have
(``hpc-worker-<job id>-<i>``), so the cluster assigns them to the jobs.  Their
memory limits are bookkeeping only (no spilling, no pausing), which lets a test
choose whether the held data fits in the workers that would stay.  The real
SLURM version of the scenario is in ``test_slurm_cluster``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter

import pytest
from cluster.runtime import Client, Worker

from tests.helpers import gen_test, until

from .test_cluster_fake import FakeSlurm, cluster

pytestmark = pytest.mark.timeout(60)

MB = 1_000_000

#: ``{i: times blob(i) ran}`` (the workers run in this process).
EXECUTIONS: Counter = Counter()
_executions_lock = threading.Lock()


def blob(i: int) -> bytes:
    """One megabyte that only ``i`` makes (counted in :data:`EXECUTIONS`)."""
    with _executions_lock:
        EXECUTIONS[i] += 1
    return i.to_bytes(4, "big") * (MB // 4)


def expected(i: int) -> bytes:
    return i.to_bytes(4, "big") * (MB // 4)


@contextlib.asynccontextmanager
async def three_jobs_holding_results(memory_limit: int, per_job: dict[str, int]):
    """A cluster of 3 fake jobs of 2 in-process workers, and results held on them.

    Yields ``(cluster, fake, client, futures)``; ``per_job`` gives each job's
    number of 1 MB results per worker.
    """
    EXECUTIONS.clear()
    fake = FakeSlurm(start_state="RUNNING")
    async with cluster(fake, asynchronous=True, processes=2, security=False) as c:
        await c.scale(jobs=3)
        assert list(c.jobs) == list(per_job)
        workers = [Worker(c.scheduler_address, name=name, nthreads=1, memory_limit=memory_limit,
                          memory_target_fraction=False, memory_spill_fraction=False,
                          memory_pause_fraction=False)
                   for jid in per_job for name in c.spec.worker_names(jid)]
        try:
            await asyncio.gather(*(w._start() for w in workers))
            await until(lambda: len(c.workers) == 6, 10, what="the six workers in their jobs")
            async with Client(c.scheduler_address, asynchronous=True) as client:
                futures = []
                for w in workers:
                    jid = c.workers[w.name]
                    for _ in range(per_job[jid]):
                        futures.append(client.submit(blob, len(futures), workers=[w.address],
                                                     pure=False))
                await client.gather(futures)
                yield c, fake, client, futures
        finally:
            await asyncio.gather(*(w.close() for w in workers))


@gen_test(timeout=45)
async def test_idle_jobs_holding_results_are_closed_together_and_their_data_moves():
    per_job = {"101": 3, "102": 1, "103": 2}  # results per worker
    async with three_jobs_holding_results(100 * MB, per_job) as (c, fake, client, futures):
        adaptive = c.adapt(minimum=2, maximum=6, interval="50ms", wait_count=2)
        state = c.scheduler.state
        await until(lambda: len(state.workers) == 2 and [j.id for j in c.jobs.values()
                                                          if j.state.active] == ["101"],
                    20, what="adapt to keep only job 101")
        # The two jobs holding the least data went, in ONE retirement, data first.
        closing = [m for _, m in adaptive.log if m.startswith("closing")]
        assert len(closing) == 1, closing
        assert closing[0].startswith("closing idle jobs 102, 103 (4 workers); ")
        assert closing[0].endswith("of data on them moves to the workers that stay first")
        assert [c[1:] for c in fake.named("scancel")] == [["102", "103"]]
        stay = {a for a, ws in state.workers.items() if str(ws.name).startswith("hpc-worker-101-")}
        assert set(state.workers) == stay
        assert {ts.key for ts in state.tasks.values()} == {f.key for f in futures}
        assert all(ts.state == "memory" and {ws.address for ws in ts.who_has} <= stay
                   for ts in state.tasks.values())
        # Every result is there, and none was computed twice.
        assert await client.gather(futures) == [expected(i) for i in range(len(futures))]
        assert EXECUTIONS == Counter(range(len(futures)))
        assert not any(m for _, m in adaptive.log if m.startswith("keeping"))


@gen_test(timeout=45)
async def test_idle_jobs_whose_data_would_not_fit_stay_and_the_log_says_why():
    # 6 MB held needs 12 MB of limits: of 15 MB, one worker could go, but not a whole job.
    per_job = {"101": 1, "102": 1, "103": 1}
    async with three_jobs_holding_results(2_500_000, per_job) as (c, fake, client, futures):
        adaptive = c.adapt(minimum=2, maximum=6, interval="50ms", wait_count=2)
        await until(lambda: any(m.startswith("keeping") for _, m in adaptive.log), 10,
                    what="the adaptive log to say why the idle jobs stay")
        (message,) = [m for _, m in adaptive.log]
        # But for the data, 4 workers could go (the minimum keeps the other 2).
        assert message.startswith("keeping 4 idle workers that could go: the "), message
        assert "would not fit" in message and "memory_ratio=2" in message
        squeues = len(fake.named("squeue"))
        await until(lambda: len(fake.named("squeue")) >= squeues + 10, 10,
                    what="ten more steps of the cluster")
        assert not fake.named("scancel")
        assert len(c.scheduler.state.workers) == 6
        # Once the client lets go of most results, the data fits: two jobs go.
        keep = futures[:1]  # on job 101
        futures.clear()
        await until(lambda: len(c.scheduler.state.workers) == 2 and fake.named("scancel"), 20,
                    what="adapt to close two jobs once the data fits")
        assert [c[1:] for c in fake.named("scancel")] == [["102", "103"]]
        assert await client.gather(keep) == [expected(0)]
        assert EXECUTIONS == Counter(range(6))
