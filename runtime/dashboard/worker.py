"""A worker's own ``/metrics`` and ``/health``, logs, structured events and profiler.

:class:`WorkerDiagnostics` is a part of :class:`cluster.runtime.worker.Worker` (``worker.diagnostics``):
it owns the worker's HTTP server, logs, events and profiler.
The HTTP server is off unless ``dashboard=True`` or a ``dashboard_address`` is
given (the ``python -m cluster worker`` command turns it on); it listens on
the worker's own host, on a free port by default, and is announced to the
scheduler as the ``dashboard`` service.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil

from ..http import HTTPServer, Request, Response, parse_dashboard_address
from ..utils import parse_address
from .logs import EventLog, ServerLog
from .metrics import CONTENT_TYPE, MetricsWriter
from .profile import Profile, Sampler
from .scheduler import json_response

logger = logging.getLogger(__name__)


class WorkerDiagnostics:
    """Metrics, health, logs, events and profiling of a worker."""

    def __init__(self, worker: Any, dashboard: bool, dashboard_address: Any, profile: bool) -> None:
        self.worker = worker
        if dashboard and dashboard_address in (None, False, ""):
            dashboard_address = ":0"
        parse_dashboard_address(dashboard_address, "localhost")  # raises ValueError early
        self.dashboard_address = dashboard_address
        self.http_server: HTTPServer | None = None
        self.server_log = ServerLog()
        self.event_log = EventLog()
        self.profile_data = Profile()
        self._profile_enabled = bool(profile)
        self._sampler: Sampler | None = None
        self._proc = psutil.Process()
        worker.handlers.update({"get_logs": self.get_logs, "get_events": self.get_events,
                              "profile": self.get_profile})

    async def start(self) -> None:
        self.server_log.attach()
        if self._profile_enabled:
            self.start_profiling()
        own_host = "127.0.0.1"
        if not self.worker.address.startswith("inproc"):
            own_host = parse_address(self.worker.address)[1].rsplit(":", 1)[0].strip("[]")
        where = parse_dashboard_address(self.dashboard_address, own_host)
        if where is None:
            return
        ssl_context = self.worker.security.get_server_context("worker") if (
            self.worker.security is not None and self.worker.address.startswith("tls")) else None
        server = HTTPServer({"/metrics": self._metrics_route, "/health": self._health_route,
                             "/json/worker.json": lambda r: json_response(self._worker_json())},
                            ssl_context=ssl_context, name="worker dashboard")
        try:
            port = await server.listen(*where)
        except OSError as e:
            logger.warning("could not serve worker metrics at %s:%s: %s", *where, e)
            return
        self.http_server = server
        self.worker.services["dashboard"] = port

    async def stop(self) -> None:
        self.stop_profiling()
        self.server_log.detach()
        if self.http_server is not None:
            await self.http_server.close()
            self.http_server = None

    # ------------------------------------------------------------------ logs and events

    def get_logs(self, n: int | None = None, timestamps: bool = False) -> list[tuple]:
        """The last ``n`` log records of this process's runtime loggers: ``(level, message)``."""
        return self.server_log.get(n, timestamps)

    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Add ``msg`` under ``topic`` to this worker's bounded structured event log."""
        self.event_log.log(topic, msg)

    def get_events(self, topic: str | None = None):
        """``[(time, msg), ...]`` of ``topic``, or ``{topic: [...]}`` of all topics."""
        return self.event_log.get(topic)

    # ------------------------------------------------------------------ profiling

    def start_profiling(self, interval: float = 0.01) -> None:
        """Sample the stacks of running tasks every ``interval`` seconds until stopped."""
        if self._sampler is None:
            self._sampler = Sampler(self.profile_data, interval, name=f"profile-{self.worker.name}")
            self._sampler.start()

    def stop_profiling(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    def trigger_profile(self) -> None:
        """Take one sample of every thread running a task now."""
        self.profile_data.sample()

    def get_profile(self, key: str | None = None, top: int = 10) -> dict:
        """Samples per task prefix: ``{prefix: {"count": n, "functions": [[name, n], ...]}}``."""
        return self.profile_data.summary(top, prefix=key)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict:
        """What the heartbeat adds for the scheduler's page and ``/metrics``."""
        try:
            cpu = self._proc.cpu_percent()
        except psutil.Error:  # pragma: no cover
            cpu = 0.0
        return {"cpu": cpu, "spilled_bytes": getattr(self.worker.data, "disk_total", 0),
                "transfer_incoming_bytes": self.worker.transfer_incoming_bytes,
                "transfer_outgoing_bytes": self.worker.transfer_outgoing_bytes,
                "pause_reason": self._pause_reason()}

    def _pause_reason(self) -> str | None:
        """Why this worker is paused (``None``: it is not), for the scheduler and the client."""
        if not getattr(self.worker, "paused", False):
            return None
        spill = getattr(self.worker, "spill_pause_reason", None)
        if spill is not None:
            return spill
        fraction = getattr(self.worker, "memory_pause_fraction", None) or 0
        return f"process memory above {fraction:.0%} of memory_limit"

    def _worker_json(self) -> dict:
        try:
            rss = self._proc.memory_info().rss
        except psutil.Error:  # pragma: no cover
            rss = 0
        return {"address": self.worker.address, "name": str(self.worker.name), "status": self.worker.status,
                "paused": bool(getattr(self.worker, "paused", False)),
                "nthreads": self.worker.nthreads, "memory": rss, "memory_limit": self.worker.memory_limit,
                "executing": len(self.worker.state.executing), "ready": len(self.worker.state.ready),
                "in_memory": len(self.worker.data), "executed": self.worker.executed_count,
                "time": time.time(), **self.metrics()}

    def _health_route(self, request: Request) -> Response:
        bs = self.worker.batched_stream
        ok = self.worker.status == "running" and bs is not None and not bs.closed
        return Response("ok\n" if ok else f"{self.worker.status}\n", 200 if ok else 503)

    def _metrics_route(self, request: Request) -> Response:
        info = self._worker_json()
        m = MetricsWriter("cluster_worker")
        m.add("up", "gauge", "1 while the worker runs and is connected to its scheduler.",
              int(self._health_route(request).status == 200))
        m.add("threads", "gauge", "Threads that run tasks.", self.worker.nthreads)
        m.add("tasks", "gauge", "Tasks on this worker, by state.",
              {("state", "executing"): info["executing"], ("state", "ready"): info["ready"],
               ("state", "memory"): info["in_memory"]})
        m.add("tasks_executed_total", "counter", "Tasks run by this worker.", self.worker.executed_count)
        m.add("memory_bytes", "gauge", "Resident memory of this worker process.", info["memory"])
        m.add("memory_limit_bytes", "gauge", "This worker's memory limit (0: none).",
              self.worker.memory_limit)
        managed = getattr(self.worker.data, "memory_total", None)
        if managed is None:
            managed = sum(ts.nbytes for ts in self.worker.state.tasks.values()
                          if ts.state == "memory" and ts.nbytes > 0)
        m.add("managed_bytes", "gauge", "Bytes of results in memory.", managed)
        m.add("spilled_bytes", "gauge", "Bytes of results spilled to disk.", info["spilled_bytes"])
        m.add("cpu_percent", "gauge", "CPU use of this process (100 = one core).", info["cpu"])
        m.add("transfer_incoming_bytes_total", "counter", "Bytes fetched from other workers.",
              self.worker.transfer_incoming_bytes)
        m.add("transfer_outgoing_bytes_total", "counter", "Bytes sent to other workers and clients.",
              self.worker.transfer_outgoing_bytes)
        return Response(m.render(), content_type=CONTENT_TYPE)
