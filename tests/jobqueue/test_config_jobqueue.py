"""Batch clusters configured by files and variables (jobqueue/config.py): dask-jobqueue's jobqueue.yaml.

Real files in a temporary $HOME and real variables (the ``config_home``
fixture of tests/unit/test_config.py); clusters are made with
``asynchronous=True`` and never awaited, so nothing starts and nothing is
submitted: ``job_script(scheduler_address=...)`` renders what would be.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
from cluster.jobqueue import PBSCluster, SGECluster, SLURMCluster
from cluster.jobqueue.job import DEFAULT_JOB_NAME, DEFAULT_WALLTIME
from cluster.jobqueue.systems.sge import DEFAULT_PARALLEL_ENVIRONMENT
from cluster.runtime import config
from cluster.runtime.config import ConfigWarning

from tests.unit import test_config

pytestmark = pytest.mark.timeout(60)

#: Temporary $HOME, /etc directories and environment (see tests/unit/test_config.py).
config_home = test_config.config_home

ADDRESS = "tls://127.0.0.1:8786"

#: The example of dask-jobqueue's configuration docs (NCAR's Cheyenne: PBS for
#: the machine, SLURM for the attached clusters), as the docs show it.
CHEYENNE = """\
distributed:
  scheduler:
    bandwidth: 1000000000     # GB MB/s estimated worker-worker bandwidth
  worker:
    memory:
      target: 0.90  # Avoid spilling to disk
      spill: False  # Avoid spilling to disk
      pause: 0.80  # fraction at which we pause worker threads
      terminate: 0.95 # fraction at which we terminate the worker
  comm:
    compression: null

jobqueue:
  pbs:
    name: dask-worker
    cores: 36                   # Total number of cores per job
    memory: '109 GB'            # Total amount of memory per job
    processes: 9                # Number of Python processes per job
    interface: ib0              # Network interface to use like eth0 or ib0
    queue: regular
    walltime: '00:30:00'
    resource-spec: select=1:ncpus=36:mem=109GB

  slurm:
    name: dask-worker

    # Dask worker options
    cores: 1                    # Total number of cores per job
    memory: '25 GB'             # Total amount of memory per job
    processes: 1                # Number of Python processes per job

    interface: ib0

    project: PXYZ123
    walltime: '00:30:00'
    job-extra: {-C geyser}
"""


def script(cluster) -> list[str]:
    return cluster.job_script(scheduler_address=ADDRESS).splitlines()


def test_dask_jobqueue_docs_example_makes_the_job_scripts(config_home):
    config_home.write(config_home.dask / "jobqueue.yaml", CHEYENNE)
    config.refresh()
    pbs = PBSCluster(asynchronous=True)
    lines = script(pbs)
    assert "#PBS -N dask-worker" in lines
    assert "#PBS -q regular" in lines
    assert "#PBS -l select=1:ncpus=36:mem=109GB" in lines
    assert "#PBS -l walltime=00:30:00" in lines
    command = next(line for line in lines if " -m cluster worker " in line)
    assert "--nworkers 9 --nthreads 4" in command
    assert "--memory-limit 12111111111" in command  # '109 GB' over 9 workers
    assert "--interface ib0" in command
    assert pbs.scheduler_options["interface"] == "ib0"  # as dask-jobqueue: the workers' network
    assert pbs.config_sources["queue"].startswith("jobqueue.pbs.queue in ")

    with pytest.warns(ConfigWarning, match="'job-extra' is dask-jobqueue's old name of "
                                           "'job-extra-directives'"):
        slurm = SLURMCluster(asynchronous=True)
    lines = script(slurm)
    assert "#SBATCH --account=PXYZ123" in lines  # project: the old name of account
    assert "#SBATCH -C geyser" in lines
    assert "#SBATCH --job-name=dask-worker" in lines
    assert "#SBATCH --cpus-per-task=1" in lines
    # The same file's distributed.worker.memory keys reach the workers' defaults.
    assert config.get("worker.memory.target") == 0.9
    assert config.get("worker.memory.spill") is False


def test_config_name_selects_a_section(config_home):
    config_home.write(config_home.ours / "jobqueue.yaml", """
jobqueue:
  slurm:
    cores: 4
    memory: 8GB
    queue: normal
  gpu:
    cores: 8
    memory: 64GB
    queue: gpu
    job-extra-directives: ["--gres=gpu:2"]
    job-cpu: 16
""")
    config.refresh()
    normal, gpu = SLURMCluster(asynchronous=True), SLURMCluster(config_name="gpu", asynchronous=True)
    assert "#SBATCH --partition=normal" in script(normal)
    lines = script(gpu)
    assert "#SBATCH --partition=gpu" in lines
    assert "#SBATCH --gres=gpu:2" in lines
    assert "#SBATCH --cpus-per-task=16" in lines
    assert "--gres=gpu:2" not in "\n".join(script(normal))
    assert gpu.spec.cores == 8 and gpu.spec.walltime == 1800  # built-in default where gpu is silent
    with pytest.raises(ValueError, match=r"config_name='bigmem': the configuration has no "
                                         r"jobqueue\.bigmem section \(it has: gpu, pbs, sge, slurm\)"):
        SLURMCluster(config_name="bigmem", asynchronous=True)


def test_precedence_of_the_sources_of_a_job_option(config_home):
    """dask's file < DASK_ variable < our file < HPC_CLUSTER__ variable < argument."""
    def queue_line(**kwargs):
        cluster = SLURMCluster(cores=2, memory="2GB", asynchronous=True, **kwargs)
        (line,) = [x for x in script(cluster) if x.startswith("#SBATCH --partition=")]
        return line.split("=", 1)[1], cluster.config_sources.get("queue")

    dask_file = config_home.write(config_home.dask / "jobqueue.yaml",
                                  "jobqueue: {slurm: {queue: from-dask-file}}\n")
    config.refresh()
    assert queue_line() == ("from-dask-file", f"jobqueue.slurm.queue in {dask_file}")
    config_home.env(DASK_JOBQUEUE__SLURM__QUEUE="from-dask-env")
    config.refresh()
    assert queue_line() == ("from-dask-env", "jobqueue.slurm.queue in $DASK_JOBQUEUE__SLURM__QUEUE")
    ours = config_home.write(config_home.ours / "q.yaml", "jobqueue: {slurm: {queue: from-our-file}}\n")
    config.refresh()
    assert queue_line() == ("from-our-file", f"jobqueue.slurm.queue in {ours}")
    config_home.env(HPC_CLUSTER__JOBQUEUE__SLURM__QUEUE="from-our-env")
    config.refresh()
    assert queue_line()[0] == "from-our-env"
    assert queue_line(queue="from-argument") == ("from-argument", None)


def test_keys_the_cluster_cannot_honour_are_named_in_a_warning(config_home):
    config_home.write(config_home.dask / "jobqueue.yaml", """
jobqueue:
  slurm:
    cores: 2
    memory: 2GB
    worker-command: my_own.worker
    resource-spec: select=1
    ncpus: 4
    mem: null
    lsf-units: []
    submit-command-extra: []
  pbs:
    cores: 2
    memory: 2GB
    worker-command: distributed.cli.dask_worker
    job-cpu: 3
""")
    config.refresh()
    with pytest.warns(ConfigWarning) as record:
        SLURMCluster(asynchronous=True)
    text = "\n".join(str(w.message) for w in record)
    for key in ("worker-command='my_own.worker'", "resource-spec='select=1'", "ncpus=4"):
        assert f"SLURMCluster cannot honour {key}" in text
    assert "mem=" not in text and "lsf-units" not in text  # empty: nothing to honour
    with pytest.warns(ConfigWarning) as record:
        PBSCluster(asynchronous=True)
    (only,) = [str(w.message) for w in record]
    assert "PBSCluster cannot honour job-cpu=3" in only  # dask's default worker-command: silent


def test_a_bad_configured_value_is_refused_naming_where_it_was_set(config_home):
    path = config_home.write(config_home.ours / "jobqueue.yaml",
                             "jobqueue:\n  slurm:\n    cores: 8\n    memory: 8GB\n    processes: 3\n")
    config.refresh()
    with pytest.raises(ValueError, match=f"processes=3.*processes is jobqueue.slurm.processes "
                                         f"in {path}"):
        SLURMCluster(asynchronous=True)
    assert SLURMCluster(processes=2, asynchronous=True).spec.processes == 2


def test_typo_in_our_jobqueue_section_warns(config_home):
    path = config_home.write(config_home.ours / "jobqueue.yaml",
                             "jobqueue:\n  sge:\n    queu: all.q\n    cores: 2\n    memory: 1GB\n")
    with pytest.warns(ConfigWarning, match=f"{path}: unknown configuration key 'jobqueue.sge.queu'"
                                           ".*did you mean jobqueue.sge.queue"):
        config.refresh()
    lines = script(SGECluster(asynchronous=True))
    assert not any("all.q" in line for line in lines)


def test_sge_options_from_the_configuration(config_home):
    config_home.env(HPC_CLUSTER__JOBQUEUE__SGE__CORES="4", HPC_CLUSTER__JOBQUEUE__SGE__MEMORY="4GB",
                    HPC_CLUSTER__JOBQUEUE__SGE__PROJECT="bio",
                    HPC_CLUSTER__JOBQUEUE__SGE__PARALLEL_ENVIRONMENT="mpi",
                    HPC_CLUSTER__JOBQUEUE__SGE__JOB_SCRIPT_PROLOGUE='["module load python"]')
    config.refresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines = script(SGECluster(asynchronous=True))
    assert "#$ -P bio" in lines and "#$ -pe mpi 4" in lines and "module load python" in lines


def test_built_in_defaults_are_the_constructors_defaults(config_home):
    slurm = dict(config.settings("jobqueue.slurm."))
    assert slurm["jobqueue.slurm.walltime"].value == DEFAULT_WALLTIME
    assert slurm["jobqueue.slurm.name"].value == DEFAULT_JOB_NAME
    assert config.get("jobqueue.sge.parallel-environment") == DEFAULT_PARALLEL_ENVIRONMENT
    params = inspect.signature(SLURMCluster).parameters
    assert repr(params["queue"].default) == "<from config>"
    cluster = SLURMCluster(cores=2, memory="2GB", asynchronous=True)
    assert cluster.config_sources == {}
    assert (cluster.spec.walltime, cluster.spec.job_name, cluster.spec.death_timeout,
            cluster.status_interval) == (1800, "hpc-worker", 180, 5)
