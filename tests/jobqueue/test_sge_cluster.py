"""SGECluster and Grid Engine MPI jobs against the REAL single-node Grid Engine 8.1.9.

``scripts/gridengine.sh`` installs and starts ``sge_qmaster`` and
``sge_execd`` (queue ``all.q`` with 8 slots, parallel environment ``smp``).
Real ``qsub``/``qstat``/``qdel``/``qacct``, real jobs running our job scripts
(``#$ -pe smp``, ``-l h_rt``, ``-cwd``), real workers on 127.0.0.1.  Skipped
without Grid Engine unless ``CLUSTER_REQUIRE_SGE=1`` (CI: then they fail).
The ``sge`` fixture fails a test that leaves a job in qstat.
"""

from __future__ import annotations

import os

import pytest
from cluster.jobqueue import JobState, SGECluster, submit_mpi_job
from cluster.jobqueue.submit_cli import main as submit_main

from . import batch_scenarios as scenario
from .conftest import Sge, run
from .test_submit import MPICH_ENV, MPIEXEC

pytestmark = pytest.mark.timeout(150)


def make(**kwargs) -> SGECluster:
    kwargs.setdefault("walltime", "00:10:00")
    # Grid Engine jobs do not inherit the submitter's environment: the tasks'
    # functions live in this repository's tests package, named like a user's PYTHONPATH.
    return SGECluster(cores=1, memory="1GB", processes=1, queue="all.q", status_interval=0.5,
                      scheduler_options={"host": "127.0.0.1"},
                      env={"PYTHONPATH": os.environ["PYTHONPATH"]}, **kwargs)


def test_scale_adapt_and_close(sge: Sge):
    script = make(asynchronous=True).job_script(scheduler_address="tls://127.0.0.1:1")
    assert "#$ -pe smp 1\n" in script and "#$ -l h_rt=00:10:00\n" in script
    assert '--name "hpc-worker-${JOB_ID}"' in script
    scenario.scale_adapt_close(make, lambda: set(sge.jobs()))


def test_walltime_retires_workers_before_the_kill(sge: Sge):
    cluster = scenario.walltime_retirement(make, "00:00:50", deadline=90)
    first = next(iter(cluster.jobs))
    # Grid Engine's accounting: the job ended by itself, its script exited 0 (not h_rt's kill).
    acct = run(["qacct", "-j", first]).stdout
    assert "failed       0" in acct and "exit_status  0" in acct, acct


@pytest.mark.timeout(120)
def test_mpi_submit_runs_and_reports_the_exit_code(sge: Sge, tmp_path, capsys):
    """`python -m cluster submit --system sge`: 3 ranks in `-pe smp 3`; a failing script's code."""
    (tmp_path / "compute.py").write_text(scenario.COMPUTE)
    status = submit_main(["--system", "sge", "-n", "3", "--walltime", "00:05:00", "--queue",
                          sge.queue, "--launcher", str(MPIEXEC), *MPICH_ENV, "--wait",
                          "--poll-interval", "0.5", "compute.py", str(tmp_path / "result.json")])
    out, err = capsys.readouterr()
    assert status == 0, err
    job_id = out.strip()
    assert f"sge job {job_id} done (exit code 0)" in err
    assert scenario.read_result(tmp_path / "result.json")["workers"] == 2
    (tmp_path / "fail.py").write_text("import sys\nfrom cluster import Client\n"
                                      "with Client():\n    pass\nsys.exit(3)\n")
    env = dict(e.split("=", 1) for e in MPICH_ENV[1::2])
    job = submit_mpi_job("fail.py", system="sge", ntasks=2, walltime="00:05:00",
                         launcher=str(MPIEXEC), env=env)
    assert "#$ -pe smp 2\n" in job.script
    assert job.wait(timeout=90, poll_interval=0.5) is JobState.FAILED
    assert (job.exit_code, job.returncode) == (3, 3)
