"""The distributed engine: Scheduler, Worker, Client, LocalCluster.

Knows nothing of MPI or batch systems (see ``hpc`` and ``jobqueue``).
"""

#: Where each public name lives, imported on first use (PEP 562): a worker
#: process or an MPI rank imports only what its role needs.
_LAZY = {
    "Client": ".client", "default_client": ".client",
    "ClusterError": ".errors", "ClusterTimeoutError": ".errors", "CommClosedError": ".errors",
    "ConnectionTimeoutError": ".errors", "FutureCancelledError": ".errors",
    "KilledWorker": ".errors", "RemoteTraceback": ".errors", "ScatteredDataLost": ".errors",
    "TaskSerializationError": ".errors",
    "Event": ".extensions.event", "Lock": ".extensions.lock", "Semaphore": ".extensions.semaphore",
    "Queue": ".extensions.queue", "Variable": ".extensions.variable",
    "fire_and_forget": ".extensions.fire_and_forget",
    "Reschedule": ".execution", "get_current_task": ".execution",
    "get_worker": ".execution", "secede": ".execution", "rejoin": ".execution",
    "get_client": ".task_client", "worker_client": ".task_client",
    "get_task_stream": ".dashboard.task_stream", "performance_report": ".dashboard.report",
    "ALL_COMPLETED": ".futures", "FIRST_COMPLETED": ".futures", "FIRST_EXCEPTION": ".futures",
    "Future": ".futures", "as_completed": ".futures", "futures_of": ".futures", "wait": ".futures",
    "LocalCluster": ".local",
    "Nanny": ".nanny",
    "Scheduler": ".scheduler",
    "NannyPlugin": ".plugins", "SchedulerPlugin": ".plugins", "WorkerPlugin": ".plugins",
    "Security": ".security",
    "Worker": ".worker",
}


# Eager: ``runtime.progress`` is also a submodule, whose import would bind the
# package attribute to the module instead (and it is light: futures and utils).
from .progress import progress  # noqa: E402
from .utils import lazy_attributes  # noqa: E402

__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Client",
    "ClusterError",
    "ClusterTimeoutError",
    "CommClosedError",
    "ConnectionTimeoutError",
    "Event",
    "Future",
    "FutureCancelledError",
    "KilledWorker",
    "LocalCluster",
    "Lock",
    "Nanny",
    "NannyPlugin",
    "Queue",
    "RemoteTraceback",
    "Reschedule",
    "ScatteredDataLost",
    "Scheduler",
    "SchedulerPlugin",
    "Security",
    "Semaphore",
    "TaskSerializationError",
    "Variable",
    "Worker",
    "WorkerPlugin",
    "as_completed",
    "default_client",
    "fire_and_forget",
    "futures_of",
    "get_client",
    "get_current_task",
    "get_task_stream",
    "get_worker",
    "performance_report",
    "progress",
    "rejoin",
    "secede",
    "wait",
    "worker_client",
]
