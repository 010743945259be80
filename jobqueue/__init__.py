"""Batch-queue clusters: workers in SLURM or PBS jobs, scaled by hand or with the load.

``SLURMCluster(cores=8, memory="16GB", walltime="01:00:00").adapt(maximum_jobs=10)``
starts a scheduler in this process and submits jobs whose workers connect to it.

Modules: :mod:`~jobqueue.core` (the cluster: start, status, scale, adapt, close),
:mod:`~jobqueue.job` (options, lifetimes, job scripts), :mod:`~jobqueue.adaptive`
(pure scaling decisions), :mod:`~jobqueue.tracking` (jobs and their workers),
:mod:`~jobqueue.commands` (the one subprocess seam), :mod:`~jobqueue.states`,
:mod:`~jobqueue.units`, :mod:`~jobqueue.errors`, :mod:`~jobqueue.system` (a batch
system's commands and outputs) and one small module per batch system
(:mod:`~jobqueue.slurm`, :mod:`~jobqueue.pbs`).  :mod:`~jobqueue.submit` submits one
MPI job running a script under the MPI launcher (``python -m cluster submit``,
:func:`submit_mpi_job`).  Templates live in the ``templates`` package.
"""

from .adaptive import Decision, JobView, Observation, ScalingPolicy
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
from .pbs import PBSCluster
from .slurm import SLURMCluster
from .states import JobState, JobStatus
from .submit import MPIJob, mpi_job_script, submit_mpi_job, submit_mpi_job_async
from .system import BatchSystem
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
    "PBSCluster",
    "SLURMCluster",
    "ScalingPolicy",
    "StatusError",
    "SubmitError",
    "TemplateError",
    "mpi_job_script",
    "run_command",
    "submit_mpi_job",
    "submit_mpi_job_async",
]
