"""Batch-queue clusters: workers in SLURM, PBS or Grid Engine jobs, scaled by hand or with the load.

``SLURMCluster(cores=8, memory="16GB", walltime="01:00:00").adapt(maximum_jobs=10)``
starts a scheduler in this process and submits jobs whose workers connect to it.

Modules: :mod:`~cluster.jobqueue.core` (the cluster: start, status, scale, adapt, close),
:mod:`~cluster.jobqueue.job` (options, lifetimes, job scripts), :mod:`~cluster.jobqueue.adaptive`
(pure scaling decisions), :mod:`~cluster.jobqueue.tracking` (jobs and their workers),
:mod:`~cluster.jobqueue.commands` (the one subprocess seam), :mod:`~cluster.jobqueue.states`,
:mod:`~cluster.jobqueue.units`, :mod:`~cluster.jobqueue.errors`, :mod:`~cluster.jobqueue.plumbing` (sync/async),
:mod:`~cluster.jobqueue.config` (options from the configuration: ``jobqueue.<config_name>.*``),
and one module per batch system in :mod:`~cluster.jobqueue.systems` (``slurm``, ``pbs``,
``sge``: everything about that system), which a cluster holds as a part
(:mod:`~cluster.jobqueue.clusters`: ``SLURMCluster``, ``PBSCluster``, ``SGECluster``).
:mod:`~cluster.jobqueue.submit` submits one MPI job running a script under the MPI
launcher (``python -m cluster submit``, :func:`submit_mpi_job`).  Templates live
in the ``templates`` package.
"""

from .adaptive import Decision, JobView, Observation, ScalingPolicy
from .clusters import PBSCluster, SGECluster, SLURMCluster
from .commands import CommandResult, run_command
from .core import Adaptive, JobQueueCluster
from .errors import (
    CancelError,
    CommandError,
    CommandNotFoundError,
    CommandTimeoutError,
    JobIdNotFoundError,
    JobQueueError,
    StatusError,
    SubmitError,
    TemplateError,
)
from .states import JobState, JobStatus
from .submit import MPIJob, mpi_job_script, submit_mpi_job, submit_mpi_job_async
from .systems import PBS, SGE, SLURM, SYSTEMS, BatchSystem
from .tracking import JobInfo

__all__ = [
    "Adaptive",
    "BatchSystem",
    "CancelError",
    "CommandError",
    "CommandNotFoundError",
    "CommandResult",
    "CommandTimeoutError",
    "Decision",
    "JobIdNotFoundError",
    "JobInfo",
    "JobQueueCluster",
    "JobQueueError",
    "JobState",
    "JobStatus",
    "JobView",
    "MPIJob",
    "Observation",
    "PBS",
    "PBSCluster",
    "SGE",
    "SGECluster",
    "SLURM",
    "SLURMCluster",
    "SYSTEMS",
    "ScalingPolicy",
    "StatusError",
    "SubmitError",
    "TemplateError",
    "mpi_job_script",
    "run_command",
    "submit_mpi_job",
    "submit_mpi_job_async",
]
