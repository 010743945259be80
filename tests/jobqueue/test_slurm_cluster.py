"""SLURMCluster against the REAL single-node SLURM 22.05 of ``scripts/slurm.sh``.

Real ``sbatch``/``squeue``/``scancel``, real jobs started by slurmd running
``python -m cluster worker``, a real scheduler in this process on 127.0.0.1.
Skipped without SLURM unless ``CLUSTER_REQUIRE_SLURM=1`` (then they fail).
The ``slurm`` fixture (conftest.py) fails a test that leaves a job in squeue.

Facts of this SLURM that the timings below rely on (scripts/slurm/README.md):
jobs start 0.2-1 s after sbatch; 8 one-CPU jobs run at once; a job is killed
0-30 s after its walltime (SIGTERM, SIGKILL 5 s later, state TIMEOUT).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

import pytest
from cluster.jobqueue import JobState, SLURMCluster, SubmitError
from cluster.runtime.errors import ClusterTimeoutError

from cluster import Client

from .conftest import Slurm
from .conftest import wait_until as wait

pytestmark = pytest.mark.timeout(180)




def make(slurm: Slurm, tmp_path, **kwargs) -> SLURMCluster:
    kwargs.setdefault("cores", 1)
    kwargs.setdefault("memory", "1GB")
    kwargs.setdefault("processes", 1)
    kwargs.setdefault("walltime", "00:10:00")
    return SLURMCluster(queue=slurm.partition, log_directory=str(tmp_path / "logs"),
                        status_interval=0.5, scheduler_options={"host": "127.0.0.1"}, **kwargs)


def active_ids(cluster: SLURMCluster) -> list[str]:
    return [jid for jid, j in cluster.jobs.items() if j.state.active]


def slowinc(x: int, delay: float = 0.1) -> int:
    import time

    time.sleep(delay)
    return x + 1


def test_scale_to_two_jobs_run_work_and_scale_down(slurm: Slurm, tmp_path):
    with make(slurm, tmp_path, cores=2, memory="2GB", processes=2) as cluster:
        cluster.scale(jobs=2)
        ids = list(cluster.jobs)
        assert len(ids) == 2
        wait(lambda: set(ids) <= set(slurm.jobs()), 10, "the jobs in squeue")
        cluster.wait_for_workers(4, timeout=60)
        assert {jid: len(j.workers) for jid, j in cluster.jobs.items()} == {ids[0]: 2, ids[1]: 2}
        assert {j.state for j in cluster.jobs.values()} == {JobState.RUNNING}
        assert set(cluster.workers) == {f"hpc-worker-{jid}-{i}" for jid in ids for i in (0, 1)}
        with Client(cluster) as client:
            futures = client.map(slowinc, range(100), delay=0.01)
            assert client.gather(futures) == list(range(1, 101))
            cluster.scale(jobs=1)
            gone = wait(lambda: [j for j in ids if not cluster.jobs[j].state.active], 60,
                        lambda: f"one job to end: {cluster.jobs}")
            slurm.wait_gone(gone)  # gone from squeue too
            assert client.gather(futures) == list(range(1, 101))  # its data moved first
            assert len(active_ids(cluster)) == 1
            assert len(client.scheduler_info()["workers"]) == 2
        assert cluster.jobs[gone[0]].state == JobState.CANCELLED
    assert not set(ids) & set(slurm.jobs())


def test_adapt_up_and_down_under_load(slurm: Slurm, tmp_path):
    with make(slurm, tmp_path) as cluster:
        cluster.adapt(minimum=0, maximum=4, interval="500ms", wait_count=2, target_duration="1s")
        with Client(cluster) as client:
            futures = client.map(slowinc, range(60), delay=0.5)
            most = 0
            while not all(f.done() for f in futures):
                most = max(most, len(active_ids(cluster)))
                assert most <= 4
                time.sleep(0.1)  # sampling the job count while the work runs
            assert client.gather(futures) == list(range(1, 61))
            assert most >= 3, f"adapt never went above {most} jobs"
            del futures  # the results were the only thing keeping workers busy
            wait(lambda: not active_ids(cluster), 60,
                 lambda: f"adapt to close every job: {cluster.jobs}")
        submitted = list(cluster.jobs)
        assert len(submitted) <= 4  # pending jobs counted: no over-submission
        assert {j.state for j in cluster.jobs.values()} <= {JobState.CANCELLED, JobState.DONE}
        slurm.wait_gone(submitted)


# Issue 18's scenario, shrunk for CI (96 tasks of 1.5 s there): more jobs than the
# minimum start for a burst whose results the client keeps, then everything idles.
HELD_TASKS = 64
HELD_DELAY = 1.0
HELD_BYTES = 2_000_000


def held_result(i: int, delay: float, runs: str) -> bytes:
    """Sleep, leave one file per execution in ``runs``, return 2 MB that only ``i`` makes."""
    import os
    import time
    import uuid

    time.sleep(delay)
    with open(os.path.join(runs, f"{i}-{uuid.uuid4().hex}"), "w"):
        pass
    return i.to_bytes(4, "big") * (HELD_BYTES // 4)


def test_adapt_gives_idle_jobs_back_while_the_client_holds_their_results(slurm: Slurm, tmp_path):
    """Issue 18: held results do not pin jobs; their data moves, nothing is recomputed."""
    runs = tmp_path / "runs"
    runs.mkdir()
    with make(slurm, tmp_path, cores=2, memory="2GB", processes=2) as cluster:
        adaptive = cluster.adapt(minimum=2, maximum=6, interval="1s")
        state = cluster.scheduler.state
        with Client(cluster) as client:
            futures = client.map(held_result, range(HELD_TASKS), delay=HELD_DELAY, runs=str(runs))
            most = 0

            def burst_done() -> bool:
                nonlocal most
                most = max(most, len(active_ids(cluster)))
                assert most <= 3
                return all(f.done() for f in futures)

            wait(burst_done, 120, lambda: f"the burst to finish: {cluster.jobs}")
            idle_at = time.monotonic()
            assert most == 3, f"adapt never went above {most} jobs"  # more than the minimum's 1
            held = sum(ws.nbytes for ws in state.workers.values())
            assert held >= HELD_TASKS * HELD_BYTES

            def at_minimum() -> bool:
                return len(active_ids(cluster)) == 1 and len(state.workers) == 2

            wait(at_minimum, 30, lambda: f"2 workers in 1 job: {len(state.workers)} workers, "
                                         f"jobs {cluster.jobs}, log {list(adaptive.log)}")
            settled = time.monotonic() - idle_at
            closed = [jid for jid, j in cluster.jobs.items() if not j.state.active]
            assert len(closed) == len(cluster.jobs) - 1 >= 2, cluster.jobs
            assert all(cluster.jobs[j].state == JobState.CANCELLED for j in closed), cluster.jobs
            slurm.wait_gone(closed)
            # Everything the client holds is on the two workers that stayed.
            assert sum(ws.nbytes for ws in state.workers.values()) >= HELD_TASKS * HELD_BYTES
            results = client.gather(futures)
            assert all(r == i.to_bytes(4, "big") * (HELD_BYTES // 4) for i, r in enumerate(results))
            executions = Counter(name.split("-")[0] for name in os.listdir(runs))
            assert executions == Counter({str(i): 1 for i in range(HELD_TASKS)})  # no recomputation
            messages = [m for _, m in adaptive.log]
            assert any(m.startswith("closing idle job") and "moves to the workers that stay" in m
                       for m in messages), messages
            logging.getLogger(__name__).info("settled at the minimum %.1fs after going idle",
                                             settled)
        ids = list(cluster.jobs)
    assert not set(ids) & set(slurm.jobs())  # close() left the queue empty


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_walltime_retires_workers_before_the_kill_and_replaces_them(slurm: Slurm, tmp_path):
    """Two jobs of 2 minutes under a steady stream of tasks: nothing lost, nothing killed."""
    with make(slurm, tmp_path, walltime="00:02:00") as cluster:
        life = cluster.spec.lifetime
        assert (life.lifetime, life.stagger, life.margin) == (75, 15, 30)
        cluster.scale(2)
        first = list(cluster.jobs)
        cluster.wait_for_workers(2, timeout=60)
        with Client(cluster) as client:
            futures = []
            deadline = time.monotonic() + 200
            while any(cluster.jobs[j].state.active for j in first) or len(
                    [j for j in cluster.jobs.values() if j.state == JobState.RUNNING and j.workers]) < 2:
                futures.append(client.submit(slowinc, len(futures), 0.05, pure=False))
                assert time.monotonic() < deadline, cluster.jobs
                time.sleep(0.1)  # the pace of the task stream, not synchronisation
            assert client.gather(futures) == [i + 1 for i in range(len(futures))]
        states = {j: cluster.jobs[j] for j in first}
        assert {j.state for j in states.values()} == {JobState.DONE}, states
        assert {j.native_state for j in states.values()} == {"COMPLETED"}, states  # not TIMEOUT
        assert len(cluster.jobs) >= 4  # each replaced
        assert len(futures) > 500


def test_close_leaves_squeue_empty(slurm: Slurm, tmp_path):
    cluster = make(slurm, tmp_path)
    try:
        cluster.scale(3)
        ids = list(cluster.jobs)
        cluster.wait_for_workers(2, timeout=60)
    finally:
        cluster.close()
    assert not set(ids) & set(slurm.jobs())
    assert {j.state for j in cluster.jobs.values()} == {JobState.CANCELLED}


def test_failing_sbatch_gives_the_typed_error(slurm: Slurm, tmp_path):
    with SLURMCluster(cores=1, memory="1GB", queue="nonexistent", status_interval=0.5,
                      scheduler_options={"host": "127.0.0.1"}) as cluster:
        with pytest.raises(SubmitError) as info:
            cluster.scale(1)
    e = info.value
    assert e.argv[0] == "sbatch" and e.returncode == 1
    assert "invalid partition specified: nonexistent" in e.stderr
    assert "invalid partition specified: nonexistent" in str(e)
    assert cluster.jobs == {}


def test_workers_connect_over_tls_by_default(slurm: Slurm, tmp_path):
    with make(slurm, tmp_path, shared_temp_directory=str(tmp_path / "shared")) as cluster:
        path = cluster.credentials_file
        assert cluster.scheduler_address.startswith("tls://")
        assert f"--tls-credentials {path}" in cluster.job_script()
        assert "BEGIN" not in cluster.job_script()
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        addresses = list(cluster.scheduler.state.workers)
        assert addresses and all(a.startswith("tls://") for a in addresses), addresses
        with Client(cluster) as client:
            assert client.submit(slowinc, 1, 0).result(timeout=30) == 2
    assert not (tmp_path / "shared" / "hpc-cluster-credentials" / os.path.basename(path)).exists()


def test_security_false_gives_plain_tcp_workers(slurm: Slurm, tmp_path):
    with make(slurm, tmp_path, security=False) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        assert "--tls" not in cluster.job_script()
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        addresses = list(cluster.scheduler.state.workers)
        assert addresses and all(a.startswith("tcp://") for a in addresses), addresses


def test_wait_for_workers_logs_jobs_and_their_states(slurm: Slurm, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("cluster.jobqueue.core.WAIT_LOG_INTERVAL", 0.2)
    caplog.set_level(logging.INFO, logger="cluster.jobqueue.core")
    # A job held until an hour from now stays PENDING with SLURM's reason BeginTime.
    with make(slurm, tmp_path, job_extra_directives=["--begin=now+3600"]) as held:
        held.scale(1)
        (jid,) = held.jobs
        with pytest.raises(ClusterTimeoutError, match=rf"job {jid} PENDING \(BeginTime\)"):
            held.wait_for_workers(1, timeout=3)
        assert held.jobs[jid].reason == "BeginTime"
    assert f"waiting for 1 worker (0 connected): job {jid} PENDING (BeginTime)" in caplog.text
    caplog.clear()
    with make(slurm, tmp_path) as cluster:
        cluster.scale(1)
        (jid,) = cluster.jobs
        cluster.wait_for_workers(1, timeout=60)
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert waits and all(f"waiting for 1 worker (0 connected): job {jid} " in m for m in waits)
    assert f"SLURM job {jid}: 1/1 workers connected" in caplog.text
    assert "1 worker connected after" in caplog.text
