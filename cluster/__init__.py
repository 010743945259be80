"""hpc-cluster: run Python work on HPC machines.

``from cluster import Client, LocalCluster, Scheduler, Worker`` gives the
distributed runtime, ``SLURMCluster`` and ``PBSCluster`` workers in batch
jobs; ``python -m cluster`` is the command line.
"""

from concurrent.futures import CancelledError

from jobqueue import JobQueueCluster, PBSCluster, SLURMCluster
from runtime import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Client,
    ClusterError,
    Future,
    KilledWorker,
    LocalCluster,
    Nanny,
    Reschedule,
    Scheduler,
    SchedulerPlugin,
    Worker,
    WorkerPlugin,
    as_completed,
    default_client,
    get_current_task,
    get_worker,
    secede,
    wait,
)

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "CancelledError",
    "Client",
    "ClusterError",
    "Future",
    "KilledWorker",
    "JobQueueCluster",
    "LocalCluster",
    "Nanny",
    "PBSCluster",
    "Reschedule",
    "SLURMCluster",
    "Scheduler",
    "SchedulerPlugin",
    "Worker",
    "WorkerPlugin",
    "__version__",
    "as_completed",
    "default_client",
    "get_current_task",
    "get_worker",
    "secede",
    "wait",
]
