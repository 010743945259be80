"""SLURMCluster, PBSCluster, SGECluster: :class:`~cluster.jobqueue.core.JobQueueCluster` with its system filled in.

Each takes every argument of :class:`~cluster.jobqueue.core.JobQueueCluster` (the
dask-jobqueue options) plus its batch system's own options
(:mod:`cluster.jobqueue.systems`).
"""

from __future__ import annotations

from .core import JobQueueCluster
from .systems import PBS, SGE, SLURM


class SLURMCluster(JobQueueCluster):
    """Workers in SLURM batch jobs, each ``sbatch`` job running ``processes`` workers.

    Also takes ``job_cpu`` (``--cpus-per-task`` of each job, default ``cores``)
    and ``job_mem`` (``--mem``, default ``memory``, written in MiB).

    Example::

        cluster = SLURMCluster(cores=8, memory="16GB", processes=2, queue="normal",
                               walltime="01:00:00", interface="ib0")
        cluster.adapt(maximum_jobs=20)
        client = Client(cluster)

    Raises:
        ValueError: an option is missing or has a bad value (named in the message).
    """

    default_system = SLURM


class PBSCluster(JobQueueCluster):
    """Workers in PBS batch jobs (OpenPBS, PBS Pro, Torque), each ``qsub`` job running ``processes`` workers.

    Also takes ``resource_spec`` (the ``-l`` request, default
    ``select=1:ncpus=<cores>:mem=<memory>``; Torque sites often want
    ``nodes=1:ppn=<cores>``) and ``project`` (the other name of ``account``,
    ``#PBS -A``).  PBS jobs do not inherit the submitting shell's environment:
    load modules or activate an environment in ``job_script_prologue``, or
    pass ``job_extra_directives=["-V"]``.

    Raises:
        ValueError: an option is missing or has a bad value (named in the message).
    """

    default_system = PBS


class SGECluster(JobQueueCluster):
    """Workers in Grid Engine batch jobs, each ``qsub`` job running ``processes`` workers.

    Also takes ``project`` (``#$ -P``), ``resource_spec`` (``#$ -l``, e.g.
    ``"h_vmem=16G"``; default none) and ``parallel_environment`` (the job's
    cores are its slots, ``#$ -pe smp <cores>``; default ``"smp"``, ``None``
    for no such line).  ``walltime`` is ``-l h_rt``; jobs start in the
    directory they were submitted from (``-cwd``).

    Example::

        cluster = SGECluster(cores=8, memory="16GB", queue="all.q", project="bio",
                             walltime="02:00:00", resource_spec="h_vmem=2G")
        cluster.scale(jobs=4)

    Raises:
        ValueError: an option is missing or has a bad value (named in the message).
    """

    default_system = SGE


__all__ = ["PBSCluster", "SGECluster", "SLURMCluster"]
