"""Seeing the cluster: the status page, JSON endpoints, Prometheus metrics and logs.

The scheduler and the workers hold a part each,
:class:`~cluster.runtime.dashboard.scheduler.SchedulerDiagnostics` and
:class:`~cluster.runtime.dashboard.worker.WorkerDiagnostics`; each serves its
routes with the small HTTP server of :mod:`cluster.runtime.http`.  The page
(``static/``: one HTML file, one script, one style sheet, no CDN, no fonts)
ships as package data and polls the JSON endpoints.

Nothing here runs per task except appending to a bounded deque and adding to a
counter (the task stream); everything else is computed when a page or a
Prometheus scraper asks.
"""

from .logs import ServerLog
from .metrics import MetricsWriter

__all__ = ["MetricsWriter", "ServerLog"]
