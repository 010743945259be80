"""The scheduler's status page, JSON endpoints, ``/metrics``, task stream and logs.

:class:`SchedulerDiagnostics` is a part of :class:`cluster.runtime.scheduler.server.Scheduler`
(``scheduler.diagnostics``).  The scheduler shell calls
:meth:`~SchedulerDiagnostics.record_task` for
each ``task_finished``/``task_erred`` message (one deque append and a counter:
the only per-task cost), starts the HTTP server once it listens and closes it
with itself.

Routes (all ``GET``):

========================== ==================================================
``/status``                the live page (``/`` redirects there)
``/json/identity.json``    counts: workers, threads, tasks, completed tasks
``/json/workers.json``     one row per worker (memory, CPU, tasks, data, state)
``/json/task-stream.json`` finished tasks ``?since=<index>`` (key, prefix, worker, start, stop)
``/json/progress.json``    tasks by prefix and state
``/json/profile.json``     the workers' sampled profiles, top functions per prefix
``/json/logs.json``        the scheduler's last log records
``/metrics``               Prometheus text format
``/health``                ``ok``
========================== ==================================================
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import Hashable
from typing import Any

import psutil

from ..http import BadRequest, HTTPServer, Request, Response, parse_dashboard_address
from ..utils import key_split, parse_address
from .logs import ServerLog
from .metrics import CONTENT_TYPE, MetricsWriter

logger = logging.getLogger(__name__)

#: Finished tasks the task stream keeps.
TASK_STREAM_LENGTH = 100_000
#: Most task-stream entries one request returns.
TASK_STREAM_PAGE = 5_000
#: Seconds a count of tasks by prefix and state is reused (it walks every task).
COUNTS_TTL = 0.25

STATIC = os.path.join(os.path.dirname(__file__), "static")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png"}
_static_cache: dict[str, bytes] = {}


def static_file(name: str) -> Response:
    """A file of ``static/`` (read once), or 404."""
    ext = os.path.splitext(name)[1]
    if "/" in name or name.startswith(".") or ext not in _STATIC_TYPES:
        raise BadRequest(f"no such file {name[:100]!r}", 404)
    body = _static_cache.get(name)
    if body is None:
        try:
            with open(os.path.join(STATIC, name), "rb") as f:
                body = f.read()
        except FileNotFoundError:
            raise BadRequest(f"no such file {name[:100]!r}", 404) from None
        _static_cache[name] = body
    return Response(body, content_type=_STATIC_TYPES[ext])


def json_response(value: Any) -> Response:
    return Response(json.dumps(value, default=str, separators=(",", ":")),
                    content_type="application/json")


def key_text(key: Hashable) -> str:
    """A task key as the page shows it."""
    return key if isinstance(key, str) else str(key)


class SchedulerDiagnostics:
    """Status page, metrics, task stream and logs of the scheduler."""

    def __init__(self, scheduler: Any, dashboard_address: Any) -> None:
        self.scheduler = scheduler
        parse_dashboard_address(dashboard_address, "localhost")  # raises ValueError early
        self.dashboard_address = dashboard_address
        self.http_server: HTTPServer | None = None
        #: ``(key, worker, start, stop, ok)`` of the last finished tasks.
        self.task_stream: deque[tuple] = deque(maxlen=TASK_STREAM_LENGTH)
        #: Entries ever appended to ``task_stream`` (the index of the next one).
        self.task_stream_count = 0
        self.tasks_completed_total = 0
        self.tasks_erred_total = 0
        self._counts_cache: tuple[float, dict, dict] = (-1.0, {}, {})
        self.server_log = ServerLog()
        scheduler.handlers.update({"get_logs": self.get_logs, "dashboard_link": self._dashboard_link,
                                   "profile": self.get_profile,
                                   "get_task_stream": self.get_task_stream,
                                   "performance_snapshot": self.performance_snapshot})

    # ------------------------------------------------------------------ hot path

    def record_task(self, key: Hashable, worker: str, startstops, ok: bool) -> None:
        """Note a finished task for the task stream (one append, one counter)."""
        if ok:
            self.tasks_completed_total += 1
        else:
            self.tasks_erred_total += 1
        for action, start, stop in startstops:
            if action == "compute":
                self.task_stream.append((key, worker, start, stop, ok))
                self.task_stream_count += 1

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Serve the page on ``dashboard_address`` (a failure is logged, not raised)."""
        self.server_log.attach()
        if getattr(self.scheduler, "protocol", "tcp") == "inproc":
            own_host = "127.0.0.1"
        else:
            own_host = parse_address(self.scheduler.address)[1].rsplit(":", 1)[0].strip("[]")
        where = parse_dashboard_address(self.dashboard_address, own_host)
        if where is None:
            return
        ssl_context = token = None
        if self.scheduler.secure:
            # A browser holds no certificate of this cluster: HTTPS, the client
            # certificate optional, and a per-scheduler token for those without one.
            ssl_context = self.scheduler.security.get_server_context("scheduler", require_client_cert=False)
            token = secrets.token_urlsafe(24)
        server = HTTPServer(self._dashboard_routes(), fallback=self._static_route,
                            ssl_context=ssl_context, name="scheduler dashboard", token=token)
        try:
            port = await server.listen(*where)
        except OSError as e:
            logger.warning("could not serve the dashboard at %s:%s: %s", *where, e)
            return
        self.http_server = server
        self.scheduler.services["dashboard"] = port
        # Never the token: logs (batch output files) are often readable by others.
        link = (self.dashboard_link or "").split("?token=", 1)[0]
        logger.info("Dashboard at %s%s", link, "" if token is None else
                    " (needs its access token: read client.dashboard_link or "
                    "scheduler.dashboard_link)")

    async def stop(self) -> None:
        self.server_log.detach()
        if self.http_server is not None:
            await self.http_server.close()
            self.http_server = None

    @property
    def dashboard_link(self) -> str | None:
        """The status page's address (``None`` when not served)."""
        s = self.http_server
        if s is None:
            return None
        host = s.host
        if host in ("0.0.0.0", "::", ""):
            host = parse_address(self.scheduler.address)[1].rsplit(":", 1)[0].strip("[]")
        if ":" in host:
            host = f"[{host}]"
        link = f"{s.scheme}://{host}:{s.port}/status"
        return link if s.token is None else f"{link}?token={s.token}"

    def _dashboard_link(self) -> str | None:
        return self.dashboard_link

    # ------------------------------------------------------------------ RPC handlers

    def get_logs(self, n: int | None = None, timestamps: bool = False) -> list[tuple]:
        """The last ``n`` log records of this process's runtime loggers: ``(level, message)``."""
        return self.server_log.get(n, timestamps)

    async def get_profile(self, workers: list[str] | None = None, start: float | None = None,
                          stop: float | None = None, key: str | None = None) -> dict:
        """The workers' sampled profiles merged: ``{prefix: {"count": n, "functions": {...}}}``."""
        from .profile import merge_profiles

        replies = await self.scheduler.broadcast(msg={"op": "profile", "key": key}, workers=workers,
                                       return_exceptions=True)
        return merge_profiles([r for r in replies.values() if isinstance(r, dict)])

    def get_task_stream(self, start: float | None = None, stop: float | None = None,
                        count: int | None = None, since: int | None = None) -> dict:
        """Task records in dask's shape: ``{"next": index, "records": [...]}``
        (see :func:`cluster.runtime.dashboard.task_stream.collect`)."""
        from .task_stream import collect

        return collect(self.task_stream, self.task_stream_count, len(self.task_stream),
                       self.scheduler.state.tasks, start=start, stop=stop, count=count, since=since)

    async def performance_snapshot(self, fresh: bool = False) -> dict:
        """Counters, workers and profiles for ``performance_report`` (see its module)."""
        from .report import snapshot

        return await snapshot(self, fresh)

    # ------------------------------------------------------------------ routes

    def _dashboard_routes(self) -> dict:
        return {
            "/": lambda r: Response("", 302, headers={"Location": "/status"}),
            "/status": lambda r: static_file("index.html"),
            "/health": lambda r: Response("ok\n"),
            "/metrics": lambda r: Response(self.prometheus_metrics(), content_type=CONTENT_TYPE),
            "/json/identity.json": lambda r: json_response(self._json_identity()),
            "/json/workers.json": lambda r: json_response(self._json_workers()),
            "/json/task-stream.json": lambda r: json_response(self._json_task_stream(r)),
            "/json/progress.json": lambda r: json_response(self._json_progress()),
            "/json/logs.json": lambda r: json_response(self.server_log.get(200, timestamps=True)),
            "/json/profile.json": self._json_profile,
        }

    def _static_route(self, request: Request) -> Response:
        if request.path.startswith("/static/"):
            return static_file(request.path[len("/static/"):])
        raise BadRequest(f"no such page: {request.path[:200]}", 404)

    def _task_counts(self) -> tuple[dict, dict]:
        """``({state: n}, {prefix: {state: n}})``, reused for :data:`COUNTS_TTL` seconds."""
        now = time.monotonic()
        when, by_state, by_prefix = self._counts_cache
        if now - when < COUNTS_TTL:
            return by_state, by_prefix
        pairs = Counter((ts.prefix, ts.state) for ts in self.scheduler.state.tasks.values())
        by_state = Counter()
        by_prefix: dict[str, dict[str, int]] = {}
        for (prefix, state), n in pairs.items():
            by_state[state] += n
            by_prefix.setdefault(prefix, {})[state] = n
        self._counts_cache = (now, dict(by_state), by_prefix)
        return dict(by_state), by_prefix

    def _json_identity(self) -> dict:
        by_state, _ = self._task_counts()
        return {
            "address": self.scheduler.address, "id": self.scheduler.id, "time": time.time(),
            "started": self.scheduler.time_started, "workers": len(self.scheduler.state.workers),
            "threads": self.scheduler.state.total_nthreads, "clients": len(self.scheduler.state.clients),
            "tasks": by_state, "completed": self.tasks_completed_total,
            "erred": self.tasks_erred_total, "task_stream_count": self.task_stream_count,
        }

    def _json_workers(self) -> list[dict]:
        rows = []
        for ws in self.scheduler.state.workers.values():
            m = ws.metrics or {}
            rows.append({
                "address": ws.address, "name": str(ws.name), "host": ws.host,
                "nthreads": ws.nthreads, "status": ws.status,
                "memory": m.get("memory", 0), "memory_limit": ws.memory_limit,
                "managed_bytes": ws.nbytes, "spilled_bytes": m.get("spilled_bytes", 0),
                "cpu": m.get("cpu", 0.0), "processing": len(ws.processing),
                "executing": m.get("executing", 0), "in_memory": len(ws.has_what),
                "transfer_incoming_bytes": m.get("transfer_incoming_bytes", 0),
                "transfer_outgoing_bytes": m.get("transfer_outgoing_bytes", 0),
                "dashboard": ws.services.get("dashboard"),
            })
        rows.sort(key=lambda r: r["name"])
        return rows

    def _json_task_stream(self, request: Request) -> dict:
        try:
            since = int(request.query.get("since", "-1"))
        except ValueError:
            raise BadRequest("since: expected an integer") from None
        total = self.task_stream_count
        first = total - len(self.task_stream)  # index of the oldest kept entry
        if since < 0:
            since = max(first, total - 1000)
        since = max(since, first, total - TASK_STREAM_PAGE)
        stream = self.task_stream
        n = len(stream)
        out = []
        for i in range(since - first, n):
            key, worker, start, stop, ok = stream[i]
            out.append([key_text(key), key_split(key), worker, start, stop, ok])
        return {"next": total, "tasks": out}

    def _json_progress(self) -> dict:
        _, by_prefix = self._task_counts()
        return by_prefix

    async def _json_profile(self, request: Request) -> Response:
        return json_response(await self.get_profile())

    # ------------------------------------------------------------------ Prometheus

    def prometheus_metrics(self) -> str:
        """This scheduler's state in the Prometheus text exposition format."""
        by_state, by_prefix = self._task_counts()
        m = MetricsWriter("cluster_scheduler")
        workers = list(self.scheduler.state.workers.values())
        m.add("workers", "gauge", "Workers connected, by status.",
              {("status", s): n for s, n in Counter(ws.status for ws in workers).items()}
              or {("status", "running"): 0})
        m.add("threads", "gauge", "Threads of all workers.", self.scheduler.state.total_nthreads)
        m.add("clients", "gauge", "Clients connected.", len(self.scheduler.state.clients))
        states = ("released", "waiting", "queued", "no-worker", "processing", "memory", "erred")
        m.add("tasks", "gauge", "Tasks the scheduler knows, by state.",
              {("state", s): by_state.get(s, 0) for s in sorted(set(states) | set(by_state))})
        m.add("task_prefixes", "gauge", "Distinct task prefixes known.", len(by_prefix))
        m.add("tasks_completed_total", "counter", "Tasks finished successfully on a worker.",
              self.tasks_completed_total)
        m.add("tasks_erred_total", "counter", "Tasks that raised on a worker.",
              self.tasks_erred_total)
        managed = sum(ws.nbytes for ws in workers)
        spilled = sum((ws.metrics or {}).get("spilled_bytes", 0) for ws in workers)
        rss = sum((ws.metrics or {}).get("memory", 0) for ws in workers)
        m.add("memory_bytes", "gauge", "Bytes on the workers: managed (results held), "
              "spilled (of those, on disk), process (resident memory of the worker processes).",
              {("type", "managed"): managed, ("type", "spilled"): spilled,
               ("type", "process"): rss})
        try:
            own = psutil.Process().memory_info().rss
        except psutil.Error:  # pragma: no cover
            own = 0
        m.add("process_memory_bytes", "gauge", "Resident memory of the scheduler process.", own)
        w = MetricsWriter("cluster_worker")

        def per_worker(field: str) -> list:
            return [({"worker": ws.address, "name": ws.name}, (ws.metrics or {}).get(field, 0))
                    for ws in workers]

        w.add("memory_bytes", "gauge", "Resident memory of each worker process.",
              per_worker("memory"))
        w.add("managed_bytes", "gauge", "Bytes of results each worker holds.",
              [({"worker": ws.address, "name": ws.name}, ws.nbytes) for ws in workers])
        w.add("spilled_bytes", "gauge", "Bytes of results each worker spilled to disk.",
              per_worker("spilled_bytes"))
        w.add("processing_tasks", "gauge", "Tasks assigned to each worker and not yet finished.",
              [({"worker": ws.address, "name": ws.name}, len(ws.processing)) for ws in workers])
        w.add("cpu_percent", "gauge", "CPU use of each worker process (100 = one core).",
              per_worker("cpu"))
        w.add("transfer_incoming_bytes_total", "counter",
              "Bytes each worker fetched from other workers.", per_worker("transfer_incoming_bytes"))
        w.add("transfer_outgoing_bytes_total", "counter",
              "Bytes each worker sent to other workers and clients.",
              per_worker("transfer_outgoing_bytes"))
        return m.render() + w.render()
