"""The distributed engine: Scheduler, Worker, Client, LocalCluster.

Knows nothing of MPI or batch systems (see ``hpc`` and ``jobqueue``).
"""

from .client import Client, default_client
from .errors import (
    ClusterError,
    ClusterTimeoutError,
    CommClosedError,
    ConnectionTimeoutError,
    FutureCancelledError,
    KilledWorker,
    RemoteTraceback,
    ScatteredDataLost,
    TaskSerializationError,
)
from .execution import Reschedule, WorkerPlugin, get_current_task, get_worker, secede
from .futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Future,
    as_completed,
    wait,
)
from .local import LocalCluster
from .nanny import Nanny
from .progress import progress
from .scheduler import Scheduler
from .scheduler_ops import SchedulerPlugin
from .security import Security
from .worker import Worker

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Client",
    "ClusterError",
    "ClusterTimeoutError",
    "CommClosedError",
    "ConnectionTimeoutError",
    "Future",
    "FutureCancelledError",
    "KilledWorker",
    "LocalCluster",
    "Nanny",
    "RemoteTraceback",
    "Reschedule",
    "ScatteredDataLost",
    "Scheduler",
    "SchedulerPlugin",
    "Security",
    "TaskSerializationError",
    "Worker",
    "WorkerPlugin",
    "as_completed",
    "default_client",
    "get_current_task",
    "get_worker",
    "progress",
    "secede",
    "wait",
]
