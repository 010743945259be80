"""hpc-cluster: run Python work on HPC machines.

``from cluster import Client, LocalCluster, Scheduler, Worker`` gives the
distributed runtime, ``SLURMCluster``, ``PBSCluster`` and ``SGECluster`` workers in batch
jobs; ``python -m cluster`` is the command line.
"""

import os as _os
from concurrent.futures import CancelledError

# Installed, runtime/, hpc/, jobqueue/ and templates/ are our subpackages
# (cluster/runtime, ...: see pyproject.toml).  In the source tree they sit
# beside this directory: look for them there too.  Only a directory that holds
# our own pyproject.toml next to a runtime/ package qualifies.
_tree = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "runtime"))
        and _os.path.isfile(_os.path.join(_tree, "runtime", "__init__.py"))
        and _os.path.isfile(_os.path.join(_tree, "pyproject.toml"))):
    __path__.append(_tree)
del _tree

__version__ = "0.1.0"

#: Imported on first use, so that ``python -m cluster worker`` (what every batch
#: job runs) does not load jinja2 and the job-queue layer.
_JOBQUEUE = ("JobQueueCluster", "PBSCluster", "SGECluster", "SLURMCluster")


#: Taken from :mod:`cluster.runtime` on first use (PEP 562), which imports only the
#: module that defines each: ``python -m cluster`` under MPI imports what each
#: rank's role needs, not the whole runtime.
_RUNTIME = (
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Client", "ClusterError", "Event", "Future",
    "KilledWorker", "LocalCluster", "Lock", "Nanny", "NannyPlugin", "Reschedule", "Scheduler", "SchedulerPlugin",
    "Security", "Semaphore", "Worker", "WorkerPlugin", "as_completed", "default_client", "futures_of",
    "get_client", "get_current_task", "get_task_stream", "performance_report",
    "get_worker", "progress", "rejoin", "secede", "wait", "worker_client",
    "Queue", "Variable", "fire_and_forget",
)


def __getattr__(name: str):
    if name in _JOBQUEUE:
        from . import jobqueue

        return getattr(jobqueue, name)
    if name in _RUNTIME:
        from . import runtime

        value = getattr(runtime, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_RUNTIME) | set(_JOBQUEUE))


__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "CancelledError",
    "Client",
    "ClusterError",
    "Event",
    "Future",
    "KilledWorker",
    "JobQueueCluster",
    "LocalCluster",
    "Lock",
    "Nanny",
    "NannyPlugin",
    "PBSCluster",
    "Queue",
    "Reschedule",
    "SGECluster",
    "SLURMCluster",
    "Scheduler",
    "SchedulerPlugin",
    "Security",
    "Semaphore",
    "Variable",
    "Worker",
    "WorkerPlugin",
    "__version__",
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
