"""PBSCluster and PBS MPI jobs against REAL Torque-style PBS commands.

``qsub``/``qstat``/``qdel`` are those of Debian's slurm-wlm-torque (installed
by ``scripts/pbs.sh``): real programs that submit to the real SLURM of
``scripts/slurm.sh``, whose ``sbatch`` honours the scripts' ``#PBS`` lines
(``-N``, ``-l walltime=``, ``-l select=1:ncpus=..:mem=..``, ``-l nodes=1:ppn=N``)
and kills a job at its walltime.  So these are real jobs running our job
scripts and real workers; what is PBS-specific in our code (directives, the
Torque ``qstat`` table, its exit statuses, ``PBS_JOBID``) meets a real
implementation.  What it cannot show is OpenPBS's own output shapes (ids cut
to 15 characters, "Job has finished" on stderr, ``qstat -x``): those are
checked in test_commands.py and test_pbs_fake.py (a fake qsub, saying so).
Skipped without the commands unless ``CLUSTER_REQUIRE_PBS=1`` (CI: then they fail).
"""

from __future__ import annotations

import pytest
from cluster.jobqueue import JobState, PBSCluster, submit_mpi_job

from . import batch_scenarios as scenario
from .conftest import Pbs
from .test_submit import MPICH_ENV, MPIEXEC

pytestmark = pytest.mark.timeout(150)


def make(**kwargs) -> PBSCluster:
    kwargs.setdefault("walltime", "00:10:00")
    return PBSCluster(cores=1, memory="1GB", processes=1, status_interval=0.5,
                      scheduler_options={"host": "127.0.0.1"}, **kwargs)


def test_scale_adapt_and_close(pbs: Pbs):
    script = make(asynchronous=True).job_script(scheduler_address="tls://127.0.0.1:1")
    assert "#PBS -l select=1:ncpus=1:mem=954mb" in script
    # Torque's qstat shows a deleted job as C (completed), as slurm-wlm-torque's does.
    scenario.scale_adapt_close(make, lambda: set(pbs.slurm.jobs()), cancelled=JobState.DONE)


def test_walltime_retires_workers_before_the_kill(pbs: Pbs):
    # slurm-wlm-torque rounds walltimes up to whole minutes: one minute here, margin 15 s.
    cluster = scenario.walltime_retirement(make, "00:01:00", deadline=100)
    first = next(iter(cluster.jobs.values()))
    assert first.native_state == "C"


@pytest.mark.timeout(120)
def test_mpi_job_with_torque_resources(pbs: Pbs, tmp_path):
    """`-l nodes=1:ppn=3` (Torque's form: slurm-wlm-torque refuses select=3): 3 ranks compute."""
    (tmp_path / "compute.py").write_text(scenario.COMPUTE)
    env = dict(e.split("=", 1) for e in MPICH_ENV[1::2])
    job = submit_mpi_job("compute.py", [str(tmp_path / "result.json"), "a b"], system="pbs",
                         ntasks=3, walltime="00:05:00", launcher=str(MPIEXEC), env=env,
                         resource_spec="nodes=1:ppn=3")
    assert "#PBS -l nodes=1:ppn=3" in job.script
    assert job.wait(timeout=90, poll_interval=0.5) is JobState.DONE, job
    assert scenario.read_result(tmp_path / "result.json") == {
        "total": sum(x * x for x in range(50)), "workers": 2, "argv": ["a b"]}
