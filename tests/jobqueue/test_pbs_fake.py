"""PBSCluster against a FAKE OpenPBS (``tests/jobqueue/fake_pbs.py``), for OpenPBS's output shapes only.

The real end-to-end PBS tests are ``test_pbs_cluster.py``: they run against
the Torque-style ``qsub``/``qstat``/``qdel`` of Debian's ``slurm-wlm-torque``
(started by ``scripts/pbs.sh``).  No installable system prints OpenPBS's own
formats (``qstat -x -F json``, ``select=`` chunks), and no OpenPBS server can
run here, so those shapes are covered by this fake: ``fake_pbs.py``
provides ``qsub``/``qstat``/``qdel`` with OpenPBS's output formats that really
run each job script as a background process on this machine (walltime
enforced with SIGTERM then SIGKILL, ``qdel`` likewise).  So these tests run
PBSCluster's real job scripts, real ``python -m cluster worker`` processes
and a real in-process scheduler on loopback; only the batch server is fake.
The job script and the command/parse/state seam are also checked against
recorded OpenPBS and Torque outputs in ``test_commands.py``.

The jobs' processes are not children of pytest (the fake ``qsub`` detaches
them), so the ``fake_pbs`` fixture checks itself that none is left.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cluster.jobqueue import JobState, PBSCluster

from cluster import Client

from . import fake_pbs as pbs_server
from .conftest import wait_until as _wait

pytestmark = pytest.mark.timeout(120)


def _processes_with(marker: str) -> list[int]:
    """Processes (other than this one) whose environment holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found




@pytest.fixture
def fake_pbs(tmp_path, monkeypatch):
    """qsub/qstat/qdel of the fake PBS on PATH; afterwards, no job process may be left."""
    state = tmp_path / "pbs"
    bin_dir = tmp_path / "bin"
    pbs_server.install(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PBS_DIR", str(state))
    yield state
    marker = f"FAKE_PBS_DIR={state}"
    try:
        _wait(lambda: not pbs_server.leftovers(state) and not _processes_with(marker), 20,
              "the fake PBS jobs' processes to exit")
    except AssertionError:
        left, procs = pbs_server.leftovers(state), _processes_with(marker)
        pbs_server.kill_all(state)
        pytest.fail(f"fake PBS jobs left running: moms={left} processes={procs}")


def inc(x: int) -> int:
    return x + 1


def test_pbs_cluster_end_to_end(fake_pbs: Path, tmp_path):
    with PBSCluster(cores=2, memory="2GB", processes=2, walltime="00:10:00",
                    log_directory=str(tmp_path / "logs"), status_interval=0.5,
                    scheduler_options={"host": "127.0.0.1"}) as cluster:
        script = cluster.job_script()
        assert "#PBS -l select=1:ncpus=2:mem=1908mb" in script
        cluster.scale(4)
        assert len(cluster.jobs) == 2
        cluster.wait_for_workers(4, timeout=60)
        # Secure by default: the jobs' workers got the credentials file and speak TLS.
        assert f"--tls-credentials {cluster.credentials_file}" in script
        assert all(a.startswith("tls://") for a in cluster.scheduler.state.workers)
        jobs = cluster.jobs
        assert {j.state for j in jobs.values()} == {JobState.RUNNING}
        assert {jid: len(j.workers) for jid, j in jobs.items()} == {"1.fakepbs": 2, "2.fakepbs": 2}
        assert cluster.workers == {"hpc-worker-1.fakepbs-0": "1.fakepbs",
                                   "hpc-worker-1.fakepbs-1": "1.fakepbs",
                                   "hpc-worker-2.fakepbs-0": "2.fakepbs",
                                   "hpc-worker-2.fakepbs-1": "2.fakepbs"}
        with Client(cluster) as client:
            futures = client.map(inc, range(200))
            assert client.gather(futures) == list(range(1, 201))
            # Scale down by one job: its two workers retire (data moves), then it is cancelled.
            cluster.scale(2)
            _wait(lambda: sum(j.state.active for j in cluster.jobs.values()) == 1, 60,
                  "one job left")
            assert client.gather(futures) == list(range(1, 201))  # nothing lost
            assert len(client.scheduler_info()["workers"]) == 2
        gone = [j for j in cluster.jobs.values() if not j.state.active]
        assert len(gone) == 1 and gone[0].state == JobState.CANCELLED
        assert fake_pbs_state(fake_pbs, gone[0].id) == "F"
    assert {fake_pbs_state(fake_pbs, jid) for jid in ("1.fakepbs", "2.fakepbs")} == {"F"}
    assert not fake_pbs.joinpath("1.fakepbs", "walltime-killed").exists()
    assert not Path(cluster.credentials_file).exists()


def fake_pbs_state(state: Path, job_id: str) -> str:
    return (state / job_id / "state").read_text().strip()


def test_walltime_lifetime_replaces_jobs_before_the_kill(fake_pbs: Path):
    """A 40 s walltime: workers retire at 20-30 s, a replacement comes first, no task is lost."""
    with PBSCluster(cores=1, memory="1GB", processes=1, walltime="00:00:40", status_interval=0.5,
                    scheduler_options={"host": "127.0.0.1"}) as cluster:
        life = cluster.spec.lifetime
        assert (life.lifetime, life.stagger, life.margin) == (25, 5, 10)
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        with Client(cluster) as client:
            futures = []
            deadline = time.monotonic() + 100
            # A steady stream of tasks until the first job has ended by itself.
            while cluster.jobs["1.fakepbs"].state.active:
                futures.append(client.submit(inc, len(futures), pure=False))
                assert time.monotonic() < deadline, cluster.jobs
                time.sleep(0.2)  # the pace of the task stream, not synchronisation
            assert client.gather(futures) == [i + 1 for i in range(len(futures))]
            first = cluster.jobs["1.fakepbs"]
            assert first.state == JobState.DONE  # ended by itself, not cancelled
            assert len(cluster.jobs) >= 2  # its replacement was submitted
            assert any(j.state == JobState.RUNNING and j.workers
                       for j in list(cluster.jobs.values())[1:])
    for job in fake_pbs.iterdir():
        if job.is_dir():
            assert not (job / "walltime-killed").exists(), f"{job.name} was killed at its walltime"
