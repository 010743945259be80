"""Shared definitions: workloads, sizes, metrics, statistics and the result file.

Every benchmark child process (one per system and workload) writes its
progress to a JSON *result file* that the parent process reads, so whatever
was measured survives a crash or a timeout of the child.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass

SYSTEMS = ("ours", "ours-plain", "dask", "dask-tuned", "mpi")
SYSTEM_LABELS = {"ours": "ours (TLS)", "ours-plain": "ours (security=False)",
                 "dask": "dask.distributed", "dask-tuned": "dask tuned",
                 "mpi": "mpi4py.futures"}
#: Systems that run on a dask-style ``Client`` (bench/run_client.py).
CLIENT_SYSTEMS = ("ours", "ours-plain", "dask", "dask-tuned")

#: dask.distributed settings of the ``dask-tuned`` system, set as ``DASK_*``
#: environment variables of its child process, so the scheduler (in the client
#: process), the nannies and the worker processes all read them.  What each
#: does is in bench/README.md; the client's 10 ms, the scheduler's 5 ms and the
#: workers' 2 ms batching intervals are constants in distributed 2026.8
#: (``BatchedSend(interval=...)``), not settings, so no tuning reaches them.
DASK_TUNED = {
    "distributed.scheduler.worker-saturation": "inf",
    "distributed.admin.event-loop": "uvloop",
    "distributed.worker.profile.enabled": False,
}


def dask_env(config: dict) -> dict:
    """``DASK_*`` environment variables that set ``config`` (dotted keys)."""
    return {"DASK_" + "__".join(part.upper().replace("-", "_") for part in key.split(".")):
            str(value) for key, value in config.items()}

WORKLOADS = ("noop_map", "tree_reduce", "roundtrip", "transfer", "rss")

# Problem sizes: default and --quick.
SIZES = {
    "default": {
        "noop_tasks": 10_000,
        "tree_leaves": 10_000,
        "roundtrips": 200,
        "transfer_bytes": 200_000_000,
    },
    "quick": {
        "noop_tasks": 1_000,
        "tree_leaves": 1_000,
        "roundtrips": 50,
        "transfer_bytes": 10_000_000,
    },
}

N_WORKERS = 2
THREADS_PER_WORKER = 1


@dataclass(frozen=True)
class Metric:
    key: str
    workload: str
    label: str
    unit: str
    higher_is_better: bool


# The rows of the report, in order. ``startup`` is filled in by the parent.
METRICS = (
    Metric("noop_tasks_per_s", "noop_map", "no-op map ({noop_tasks} tasks)", "tasks/s", True),
    Metric("tree_tasks_per_s", "tree_reduce", "tree reduction ({tree_leaves} leaves, {tree_tasks} tasks)", "tasks/s", True),
    Metric("roundtrip_median_us", "roundtrip", "round trip, median ({roundtrips} sequential)", "µs", False),
    Metric("roundtrip_p99_us", "roundtrip", "round trip, p99 ({roundtrips} sequential)", "µs", False),
    Metric("noop_cpu_client_us", "noop_map", "no-op map: client + scheduler process CPU per task", "µs", False),
    Metric("noop_cpu_workers_us", "noop_map", "no-op map: worker processes' CPU per task", "µs", False),
    Metric("tree_cpu_client_us", "tree_reduce", "tree: client + scheduler process CPU per task", "µs", False),
    Metric("tree_cpu_workers_us", "tree_reduce", "tree: worker processes' CPU per task", "µs", False),
    Metric("roundtrip_cpu_client_us", "roundtrip", "round trip: client + scheduler process CPU per call", "µs", False),
    Metric("roundtrip_cpu_workers_us", "roundtrip", "round trip: worker processes' CPU per call", "µs", False),
    Metric("transfer_numpy_MBps", "transfer", "worker→worker numpy uint8 ({transfer_mb} MB)", "MB/s", True),
    Metric("transfer_numpy_s", "transfer", "worker→worker numpy, dependent-task time", "s", False),
    Metric("transfer_numpy_cpu_send", "transfer", "numpy: sending worker's CPU per MB", "ms/MB", False),
    Metric("transfer_numpy_cpu_recv", "transfer", "numpy: receiving worker's CPU per MB", "ms/MB", False),
    Metric("transfer_bytes_MBps", "transfer", "worker→worker bytes ({transfer_mb} MB)", "MB/s", True),
    Metric("transfer_bytes_s", "transfer", "worker→worker bytes, dependent-task time", "s", False),
    Metric("transfer_bytes_cpu_send", "transfer", "bytes: sending worker's CPU per MB", "ms/MB", False),
    Metric("transfer_bytes_cpu_recv", "transfer", "bytes: receiving worker's CPU per MB", "ms/MB", False),
    Metric("floor_MBps", "transfer", "floor: raw socket pair, fresh receive buffer ({transfer_mb} MB)", "MB/s", True),
    Metric("floor_warm_MBps", "transfer", "floor: raw socket pair, reused receive buffer", "MB/s", True),
    Metric("floor_cpu", "transfer", "floor (fresh buffer): both processes' CPU per MB", "ms/MB", False),
    Metric("floor_tls_MBps", "transfer", "TLS floor: Python ssl socket pair, reused receive buffer", "MB/s", True),
    Metric("floor_tls_cpu", "transfer", "TLS floor: both processes' CPU per MB", "ms/MB", False),
    Metric("scheduler_rss_MB", "rss", "idle RSS, scheduler process", "MB", False),
    Metric("worker_rss_MB", "rss", "idle RSS, one worker process", "MB", False),
    Metric("startup_s", "*", "launch → first task done (per child process)", "s", False),
)


def summarize(values):
    """(min, median, max) of a list of numbers, or None when it is empty."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return min(values), statistics.median(values), max(values)


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def short_error(exc: BaseException) -> str:
    """A one-line description of an exception plus the innermost frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 300:
        text = text[:297] + "..."
    return text + where


class ResultFile:
    """Progress and results of one child process, rewritten atomically."""

    def __init__(self, path: str, system: str, workload: str, sizes: dict):
        self.path = path
        self.data = {
            "system": system,
            "workload": workload,
            "sizes": sizes,
            "phase": "import",  # import -> start -> ready -> running -> done
            "ok": None,
            "error": None,
            "skipped": None,
            "ready_wall": None,
            "cluster_start_s": None,
            "metrics": {},
            "info": {},
            "pid": os.getpid(),
        }
        self.write()

    def set(self, **kw):
        self.data.update(kw)
        self.write()

    def phase(self, phase: str):
        self.set(phase=phase)

    def ready(self):
        self.set(phase="ready", ready_wall=time.time())

    def record(self, **metrics):
        """Append one repeat's value for each metric."""
        for key, value in metrics.items():
            self.data["metrics"].setdefault(key, []).append(value)
        self.write()

    def extend(self, **metrics):
        """Append several values (one list per metric)."""
        for key, values in metrics.items():
            self.data["metrics"].setdefault(key, []).extend(values)
        self.write()

    def fail(self, exc: BaseException):
        self.set(ok=False, error=short_error(exc), traceback=traceback.format_exc(limit=8))

    def write(self):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def read_result(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def add_common_args(parser):
    parser.add_argument("--workload", required=True, choices=WORKLOADS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", required=True, help="JSON dict of problem sizes")
    parser.add_argument("--out", required=True, help="result file (JSON)")
