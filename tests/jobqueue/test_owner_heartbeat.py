"""A frozen owner's jobs end by themselves (issue 15, part 4), on the REAL SLURM.

The owner of a cluster is a subprocess (``OWNER`` below): it starts a
SLURMCluster with a short ``death_timeout``, runs two jobs, prints their ids
and waits.  The test freezes it with SIGSTOP -- its sockets stay open, so no
connection breaks -- and checks that the jobs leave ``squeue`` within the
timeout (plus the probe period and the job's teardown): their workers noticed
that the scheduler stopped answering, closed, and the job scripts ended.
Whatever happens, the owner is resumed and killed and the jobs cancelled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import Slurm, wait_until

pytestmark = pytest.mark.timeout(120)

DEATH_TIMEOUT = 10.0
#: The probe period (a quarter of the timeout), the job's teardown, squeue's view.
SLACK = 15.0

OWNER = """\
import signal, sys
from cluster.jobqueue import SLURMCluster

signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
with SLURMCluster(cores=1, memory="1GB", processes=1, queue=sys.argv[1], walltime="00:10:00",
                  death_timeout="{death}s", status_interval=0.5, log_directory=sys.argv[2],
                  shared_temp_directory=sys.argv[2],
                  scheduler_options={{"host": "127.0.0.1"}}) as cluster:
    cluster.scale(2)
    cluster.wait_for_workers(2, timeout=60)
    print(" ".join(cluster.jobs), flush=True)
    signal.pause()
"""


def test_jobs_of_a_frozen_owner_leave_the_queue(slurm: Slurm, tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(death=DEATH_TIMEOUT),
                              slurm.partition, str(tmp_path)],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    ids: list[str] = []
    try:
        line = owner.stdout.readline()  # blocks until the owner has its two workers
        ids = line.split()
        assert len(ids) == 2, f"the owner printed {line!r} (exit status {owner.poll()})"
        assert set(ids) <= set(slurm.jobs())
        os.kill(owner.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        wait_until(lambda: not set(ids) & set(slurm.jobs()), DEATH_TIMEOUT + SLACK,
                   lambda: f"the frozen owner's jobs to leave squeue: {slurm.jobs()}")
        took = time.monotonic() - frozen_at
        assert took >= DEATH_TIMEOUT - 1, f"the jobs ended after {took:.1f}s, before the timeout"
        outputs = "".join(p.read_text() for p in (tmp_path).glob("*.err"))
        assert "has not answered" in outputs, outputs
    finally:
        if owner.poll() is None:
            os.kill(owner.pid, signal.SIGCONT)
            owner.kill()
        owner.wait(timeout=30)
        owner.stdout.close()
        slurm.cancel(ids)
        slurm.wait_gone(ids)
