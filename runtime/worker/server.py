"""The Worker server: IO around :class:`WorkerStateMachine`.

Theory of operation
-------------------
The worker registers with the scheduler over one stream connection and then
receives batches of ``compute_task`` / ``free_keys`` messages on it.  Each
batch becomes events for the pure :class:`WorkerStateMachine`; the instructions that
come back are carried out here: ``Execute`` hands a task to the thread pool,
``GatherDep`` fetches dependencies straight from the peer worker that holds
them (never through the scheduler), and messages go back on the stream.
Results come back from the pool in batches and become events again.

Peers call ``get_data`` to fetch our results; clients call it to gather.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import random
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Hashable, Iterable, MutableMapping
from contextlib import suppress
from typing import Any

import psutil

from .. import messages
from ..comm.serialize import box_large
from ..config import FROM_CONFIG
from ..core import BatchedSend, Server, Status, unpack_reply
from ..dashboard.worker import WorkerDiagnostics
from ..errors import ClusterError, CommClosedError, CommError
from ..execution import (  # noqa: F401
    TaskThreadPool,
    check_executor,
    get_current_task,
    get_worker,
    make_task_pool,
    sizeof,
)
from ..files import (
    make_private_subdirectory,
    open_scratch_root,
)
from ..plugins import block_handlers, refuse_unsupported
from ..plugins import silence_logs as apply_silence_logs
from ..security import resolve_security
from ..statemachine import Instruction, Msg
from ..system import trim_memory
from ..task_client import close_worker_client
from ..utils import (
    delegate,
    format_bytes,
    get_address_host,
    listen_host,
    parse_address,
    parse_timedelta,
    unparse_host_port,
)
from ..versions import registration_versions
from .events import FROM_SCHEDULER, decode
from .memory import memory_fraction, parse_memory_limit
from .plugins import UNSUPPORTED, UPLOADS_DIRECTORY, WorkerExtras  # noqa: F401
from .state import (
    Execute,
    ExecuteFailureEvent,
    ExecuteSuccessEvent,
    GatherDep,
    GatherDepFailureEvent,
    GatherDepNetworkFailureEvent,
    GatherDepSuccessEvent,
    PauseEvent,
    RescheduleEvent,
    SecedeEvent,
    TaskFinishedMsg,
    UnpauseEvent,
    UpdateDataEvent,
    WorkerStateMachine,
)

logger = logging.getLogger(__name__)

Key = Hashable

#: Results at most this big travel with ``task_finished`` to the waiting client.
SMALL_RESULT = 16 * 1024
#: Seconds a finished task's report may wait for the next one while this worker is
#: still running tasks (bounded: an idle worker's report leaves at once). dask's
#: worker batches every message for 2 ms; issue 14 measured +20-30% no-op tasks/s.
RESULT_COALESCE = 0.002
_RESULT_OPS = frozenset({"task_finished", "task_erred"})

#: How long a retiring worker (lifetime, close_gracefully) keeps its data while
#: no other worker can take it, waiting for one to join -- typically its own
#: replacement (``lifetime_restart``, or the next batch job).  Walltime margins
#: must leave room for this plus the data transfer.
RECIPIENT_WAIT = 10.0


def pickle_small(value: Any) -> bytes | None:
    """Pickle a small result for the client, or ``None`` if it does not pickle small."""
    try:
        b = pickle.dumps(value, protocol=5)
    except Exception:
        return None
    return b if len(b) <= SMALL_RESULT else None


class Worker(Server):
    """Worker node of a cluster: stores data and runs tasks.

    Args:
        scheduler_ip: the scheduler's address (``"tcp://host:port"``) or host.
        scheduler_port: the port, when ``scheduler_ip`` is a bare host.
        scheduler_file: read the scheduler's address from this JSON file.
        nthreads: threads that run tasks (default: the number of cores).
        name: a name for this worker, unique in the cluster.
        memory_limit: see :func:`parse_memory_limit` (reported; enforced by the Nanny).
        resources: abstract resources this worker has, e.g. ``{"GPU": 2}``.
        local_directory: where the worker's own directory goes: a directory of
            ours, or a shared sticky one (``/tmp``) in which we use
            ``cluster-worker-space-<uid>`` (default: that in ``$TMPDIR``).  See
            :func:`cluster.runtime.files.open_scratch_root`; one that others could
            tamper with is refused (:class:`~cluster.runtime.errors.UnsafePathError`).
        death_timeout: give up and close if the scheduler cannot be reached
            for this long (``"60s"``).
        reconnect: reconnect when the scheduler connection breaks (else close).
        heartbeat_interval: how often to tell the scheduler we are alive.
        host / port / interface / protocol: where to listen (by default the
            local address that routes to the scheduler, with its protocol;
            port 0 = any).
        security: a :class:`~cluster.runtime.security.Security` with the worker's TLS
            credentials, or ``None``/``False``; with ``None`` and a scheduler
            file that names credentials, those.
        validate: check worker-state invariants after every event.
        nanny: address of the nanny supervising this worker, if any.
        dashboard / dashboard_address: serve ``/metrics`` and ``/health`` (off by
            default; ``dashboard=True`` alone: a free port on our own host).
        profile: sample the stacks of running tasks every 10 ms (see
            :mod:`cluster.runtime.dashboard.profile`; ``Client.profile()`` reads them).
        plugins: worker plugins set up once registered (:mod:`cluster.runtime.worker.plugins`).
        preload / preload_argv: see :mod:`cluster.runtime.preload` (files others can
            write are refused).
        extensions: ``{name: factory(worker)}``, kept in ``worker.extensions``.
        metrics: ``{name: function(worker)}`` sent with every heartbeat.
        executor: where tasks run: ``None`` (our pool of ``nthreads`` threads),
            ``"offload"`` (one thread), a ``ThreadPoolExecutor`` (shut down at
            close; ``secede`` does nothing there) or ``{"default": one of those}``.
        blocked_handlers: operations to refuse (e.g. ``["run"]``).
        contact_address: the address we advertise, when peers must reach us
            at another address than the one we listen on.
        silence_logs: the level of the runtime's loggers in this process.
        loop: ignored (the running asyncio loop is used); kept for compatibility.
        services / service_ports / service_kwargs / startup_information /
            low_level_profiler / profile_cycle_interval: refused unless empty
            (we serve ``/metrics`` with ``dashboard``; see ``metrics``).

    Raises:
        ValueError: an option has a value we cannot use, named in the message.
    """

    def __init__(self, scheduler_ip: str | None = None, scheduler_port: int | None = None,
                 scheduler_file: str | None = None, ncores: int | None = None,
                 nthreads: int | None = None, loop=None, local_dir: str | None = None,
                 local_directory: str | None = None, services=None, service_ports=None,
                 service_kwargs=None, name: Any = None, reconnect: bool = True,
                 memory_limit: Any = "auto", executor=None, resources: dict | None = None,
                 silence_logs=None, death_timeout: Any = None, preload=None, preload_argv=None,
                 security=None, contact_address: str | None = None,
                 memory_monitor_interval: Any = "200ms", extensions=None, metrics=None,
                 startup_information=None, data: MutableMapping | None = None,
                 interface: str | None = None, host: str | None = None, port: int | None = None,
                 protocol: str | None = None, dashboard_address=None, nanny: str | None = None,
                 plugins=(), low_level_profiler: bool = False, validate: bool = False,
                 profile_cycle_interval=None, lifetime=None, lifetime_stagger=None,
                 lifetime_restart=None, heartbeat_interval: Any = "1s",
                 dashboard: bool = False, profile: bool = False,
                 transfer_incoming_count_limit: int = 4,
                 memory_target_fraction: Any = FROM_CONFIG,  # worker.memory.target (0.6)
                 memory_spill_fraction: Any = FROM_CONFIG,  # worker.memory.spill (0.7)
                 memory_pause_fraction: Any = FROM_CONFIG,  # worker.memory.pause (0.8)
                 blocked_handlers=None, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"Worker() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        refuse_unsupported("Worker", UNSUPPORTED, services=(services, None),
                           service_ports=(service_ports, None), service_kwargs=(service_kwargs, None),
                           startup_information=(startup_information, None),
                           low_level_profiler=(low_level_profiler, False),
                           profile_cycle_interval=(profile_cycle_interval, None))
        self.executor = check_executor(executor)
        apply_silence_logs(silence_logs, "Worker")
        if protocol not in (None, "tcp", "tls", "inproc"):
            raise ValueError(f"protocol={protocol!r}: accepted values are 'tcp', 'tls' and 'inproc'")
        if scheduler_ip is None and scheduler_file is None:
            raise ValueError("Worker needs the scheduler's address or scheduler_file")
        self._no_tls = security is False  # opted into plain TCP (scheduler files)
        security = resolve_security(security, owner="Worker")
        self._set_security(security, "worker")
        self._security_given = security is not None
        default_proto = "tls" if security is not None and security.has_tls("worker") else "tcp"
        if scheduler_ip is not None and scheduler_port is not None and "://" not in scheduler_ip:
            scheduler_ip = f"{default_proto}://{unparse_host_port(scheduler_ip, scheduler_port)}"
        elif scheduler_ip is not None and "://" not in scheduler_ip:
            scheduler_ip = f"{default_proto}://{scheduler_ip}"
        self.scheduler_addr = scheduler_ip
        self.scheduler_file = scheduler_file
        if nthreads is None:
            nthreads = ncores if ncores is not None else (os.cpu_count() or 1)
        if not isinstance(nthreads, int) or nthreads < 1:
            raise ValueError(f"nthreads={nthreads!r}: expected a positive integer")
        self.nthreads = nthreads
        self.name = name
        self.memory_limit = parse_memory_limit(memory_limit, nthreads)
        self.memory_target_fraction = memory_fraction("memory_target_fraction", memory_target_fraction)
        self.memory_spill_fraction = memory_fraction("memory_spill_fraction", memory_spill_fraction)
        self.memory_pause_fraction = memory_fraction("memory_pause_fraction", memory_pause_fraction)
        self.memory_monitor_interval = parse_timedelta(memory_monitor_interval) or 0.2
        self._user_data = data is not None
        self.paused = False
        #: Why spilling is impossible (a full disk); the worker stays paused while set.
        self.spill_pause_reason: str | None = None
        #: The close that follows a failure of the state machine (see handle_stimulus).
        self._fatal_close: asyncio.Future | None = None
        self.resources = dict(resources or {})
        self.death_timeout = parse_timedelta(death_timeout)
        self.reconnect = reconnect
        self.heartbeat_interval = parse_timedelta(heartbeat_interval) or 1.0
        self.interface = interface
        self.host = host
        self.port = port or 0
        self.protocol = protocol
        self.contact_address = contact_address
        self.nanny = nanny
        self.validate = validate
        self.lifetime = parse_timedelta(lifetime)
        self.lifetime_stagger = parse_timedelta(lifetime_stagger) or 0.0
        self.lifetime_restart = bool(lifetime_restart)
        self._own_local_directory = False
        local_directory = local_directory or local_dir
        self._local_directory_root = local_directory
        self.local_directory = ""
        self._local_directory_fd: int | None = None
        self._temporary_root: str | None = None
        self._uploads_directory: str | None = None
        self.data: MutableMapping = data if data is not None else {}
        self.state = WorkerStateMachine(nthreads=nthreads, data=self.data, resources=self.resources,
                                 validate=validate,
                                 transfer_incoming_count_limit=transfer_incoming_count_limit)
        self.id = f"Worker-{uuid.uuid4()}"
        self.batched_stream: BatchedSend | None = None
        self.pool: TaskThreadPool | None = None
        self.executed_count = 0
        self.services: dict = {}
        #: Bytes fetched from / sent to other workers and clients (for /metrics).
        self.transfer_incoming_bytes = 0
        self.transfer_outgoing_bytes = 0
        #: /metrics, /health, logs, events and the profiler (a part with its own handlers).
        self.diagnostics = WorkerDiagnostics(self, dashboard, dashboard_address, profile)
        #: Plugins, preloads, extensions and custom metrics (a part with its own handlers).
        self.extras = WorkerExtras(self, plugins, preload, preload_argv, extensions, metrics)
        self.plugins: dict = self.extras.plugins
        self.extensions: dict = self.extras.extensions
        self.restart_requested = False
        self.handlers.update({
            "get_data": self.get_data,
            "update_data": self.update_data,
            "run": self.run,
            "close": self.close,
            "upload_file": self.upload_file,
            "story": self.story,
            "close_gracefully": self.close_gracefully,
            "keys": lambda: list(self.data),
        })
        self.message_specs = messages.WORKER_REQUESTS
        #: The scheduler's stream messages that are not events of the state
        #: (those are decoded by :func:`cluster.runtime.worker.events.decode`).
        self.stream_ops = {
            "plugin_add": self.extras._on_plugin_add,
            "plugin_remove": self.extras._on_plugin_remove,
            "close": self._on_close,
        }
        self.blocked_handlers = block_handlers(self, blocked_handlers, "Worker")

    # ------------------------------------------------------------------ compatibility names

    worker_address = property(lambda self: self.address, doc="Our address (dask's older name).")
    local_dir = property(lambda self: self.local_directory, doc="``local_directory``'s older name.")
    tasks = property(lambda self: self.state.tasks, doc="The state machine's tasks: ``{key: TaskState}``.")
    executing_count = property(lambda self: len(self.state.executing), doc="Tasks running now.")
    plugin_add = delegate("extras", WorkerExtras.plugin_add)
    plugin_remove = delegate("extras", WorkerExtras.plugin_remove)
    upload_file = delegate("extras", WorkerExtras.upload_file)

    @property
    def address(self) -> str:
        """Where peers reach us: ``contact_address`` if given, else where we listen."""
        if self.contact_address and self.listeners:
            if "://" in self.contact_address:
                return self.contact_address
            return f"{parse_address(self.listen_address)[0]}://{self.contact_address}"
        return Server.address.fget(self)

    def story(self, *keys: Key, keys_list: Iterable[Key] | None = None) -> list[tuple]:
        if keys_list is not None:
            keys = (*keys, *keys_list)
        return self.state.story(*keys)

    def get_current_task(self) -> Key | None:
        """The key of the task running in the calling thread."""
        return get_current_task()

    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Record a structured event under ``topic`` (read with ``Client.get_worker_events``)."""
        self.diagnostics.log_event(topic, msg)

    def get_logs(self, n: int | None = None, timestamps: bool = False) -> list[tuple]:
        """The last records of this worker's runtime loggers."""
        return self.diagnostics.get_logs(n, timestamps)

    @property
    def http_server(self):
        """The worker's own HTTP server (``/metrics``, ``/health``; ``None`` when off)."""
        return self.diagnostics.http_server

    def __repr__(self) -> str:
        addr = self.listeners[0].contact_address if self.listeners else "not started"
        return (f"<Worker {addr!r} name={self.name!r} status={self.status} "
                f"threads={self.nthreads} memory={len(self.data)}>")

    # ------------------------------------------------------------------ lifecycle

    async def start_unsafe(self) -> None:
        await self._locate_scheduler("worker")
        protocol = self.protocol or parse_address(self.scheduler_addr)[0]
        if protocol == "inproc":
            listen_at = "inproc://"
        else:
            host = listen_host(self.host, self.interface, self.scheduler_addr)
            listen_at = f"{protocol}://{unparse_host_port(host, self.port)}"
        await self.listen(listen_at)
        self._make_local_directory()
        if not self._user_data and self.memory_limit and (
            self.memory_target_fraction or self.memory_spill_fraction
        ):
            from ..spill import SpillBuffer

            target = self.memory_target_fraction or self.memory_spill_fraction
            self.data = SpillBuffer(os.path.join(self.local_directory, "storage"),
                                    target=int(self.memory_limit * target),
                                    on_no_space=self._spill_no_space)
            self.state.data = self.data
        self.state.address = self.address
        if self.name is None:  # as in dask: a worker without a name is known by its address
            self.name = self.address
        self.pool = make_task_pool(self.executor, self.nthreads, self._on_results, self,
                                   f"worker-{self.name or self.address}", self._on_secede)
        await self.diagnostics.start()
        await self.extras.before_register()
        await self._register()
        await self.extras.after_register()
        self.spawn(self._heartbeat_loop())
        if self.memory_limit and (self.memory_spill_fraction or self.memory_pause_fraction):
            self.spawn(self._memory_monitor_loop())
        if self.lifetime:
            lifetime = self.lifetime + random.uniform(-self.lifetime_stagger, self.lifetime_stagger)
            self.spawn(self._close_after(max(lifetime, 0.0)))
        logger.info("Worker %s (name=%r) registered with %s", self.address, self.name, self.scheduler_addr)

    def _make_local_directory(self) -> None:
        """A fresh 0700 ``worker-*`` directory in a scratch root only we can write
        (see :func:`cluster.runtime.files.open_scratch_root`).  Not put on ``sys.path``:
        only the ``uploads`` directory inside it is, once a file is uploaded."""
        root, root_fd, temporary = open_scratch_root(self._local_directory_root)
        try:
            name, self._local_directory_fd = make_private_subdirectory(root_fd, "worker-")
        finally:
            os.close(root_fd)
        self._temporary_root = root if temporary else None
        self.local_directory = os.path.join(root, name)
        self._own_local_directory = True

    def _remove_local_directory(self) -> None:
        if self._local_directory_fd is not None:
            os.close(self._local_directory_fd)
            self._local_directory_fd = None
        if self._own_local_directory and self.local_directory:
            if self._uploads_directory is not None:
                with suppress(ValueError):
                    sys.path.remove(self._uploads_directory)
            shutil.rmtree(self.local_directory, ignore_errors=True)
            if self._temporary_root is not None:
                with suppress(OSError):
                    os.rmdir(self._temporary_root)

    async def _register(self) -> None:
        from ..comm import connect

        timeout = self.death_timeout or 60.0
        comm = await connect(self.scheduler_addr, timeout=timeout, **self.connection_args)
        await comm.write({
            "op": "register_worker",
            "address": self.address,
            "nthreads": self.nthreads,
            "name": self.name,
            "memory_limit": self.memory_limit,
            "resources": self.resources,
            "host": get_address_host(self.address) if not self.address.startswith("inproc") else socket.gethostname(),
            "pid": os.getpid(),
            "nanny": self.nanny,
            "local_directory": self.local_directory,
            "services": self.services,
            "keys": [k for k, ts in self.state.tasks.items() if ts.state == "memory"],
            "nbytes": {k: ts.nbytes for k, ts in self.state.tasks.items() if ts.state == "memory"},
            "versions": registration_versions(),
        })
        reply = await comm.read()
        try:
            unpack_reply(reply, self.scheduler_addr)
        except Exception:
            comm.abort()
            raise
        self.batched_stream = BatchedSend(comm, name=f"Worker->Scheduler {self.address}")
        self.spawn(self._handle_scheduler(comm))

    async def _handle_scheduler(self, comm) -> None:
        try:
            while self.status in (Status.running, Status.starting):
                try:
                    batch = await comm.read()
                except CommError:
                    break
                events = []
                for msg in batch:
                    op = msg.pop("op", None)
                    handler = self.stream_ops.get(op)
                    if handler is None and op not in FROM_SCHEDULER:
                        logger.warning("unknown operation %r from scheduler; ignoring", op)
                        continue
                    try:
                        ev = decode(op, msg) if handler is None else handler(**msg)
                    except Exception:
                        logger.exception("malformed %r message from the scheduler; ignoring it", op)
                        continue
                    if ev is not None:
                        events.append(ev)
                if events:
                    self.handle_stimulus(*events)
        finally:
            if self.status in (Status.running, Status.starting):
                await self._scheduler_lost()

    async def _scheduler_lost(self) -> None:
        if self.batched_stream is not None:
            self.batched_stream.abort()
        if self.reconnect and self.status == Status.running:
            logger.info("lost the scheduler at %s; reconnecting", self.scheduler_addr)
            deadline = time.monotonic() + (self.death_timeout or 60.0)
            delay = 0.05
            while self.status == Status.running and time.monotonic() < deadline:
                try:
                    await self._register()
                    return
                except (CommError, OSError, ClusterError, ValueError) as e:
                    # ValueError: the scheduler has not yet noticed we left.
                    logger.info("could not reconnect to the scheduler yet: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        logger.info("lost the scheduler at %s; closing", self.scheduler_addr)
        self.spawn(self.close(report=False))

    async def _heartbeat_loop(self) -> None:
        proc = psutil.Process()
        while self.status == Status.running:
            await asyncio.sleep(self.heartbeat_interval)
            bs = self.batched_stream
            if bs is None or bs.closed:
                continue
            try:
                mem = proc.memory_info().rss
            except psutil.Error:  # pragma: no cover
                mem = 0
            with suppress(CommClosedError):
                bs.send({"op": "heartbeat", "metrics": {
                    "memory": mem, "executing": len(self.state.executing), "in_memory": len(self.data),
                    "ready": len(self.state.ready), "in_flight": len(self.state.in_flight_tasks),
                    "time": time.time(), **self.diagnostics.metrics(),
                    **(await self.extras.custom_metrics()),
                }})

    # ------------------------------------------------------------------ memory

    async def _memory_monitor_loop(self) -> None:
        proc = psutil.Process()
        while self.status == Status.running:
            await asyncio.sleep(self.memory_monitor_interval)
            try:
                await self.memory_monitor(proc)
            except Exception:  # pragma: no cover - keep monitoring
                logger.exception("memory monitor failed")

    async def memory_monitor(self, proc: psutil.Process | None = None) -> None:
        """Track this process's memory: spill above the spill fraction, pause above the pause fraction."""
        proc = proc or psutil.Process()
        limit = self.memory_limit
        if not limit:
            return
        rss = proc.memory_info().rss
        if self.memory_pause_fraction:
            if rss > self.memory_pause_fraction * limit and not self.paused:
                logger.warning("worker %s paused: process memory %s is above %.0f%% of the limit %s",
                               self.address, format_bytes(rss), self.memory_pause_fraction * 100,
                               format_bytes(limit))
                self._set_paused(True)
            elif (rss <= self.memory_pause_fraction * limit and self.paused
                  and self.spill_pause_reason is None):
                logger.info("worker %s resumed: process memory %s", self.address, format_bytes(rss))
                self._set_paused(False)
        if self.spill_pause_reason is not None:
            self.data.check_space()  # calls _spill_no_space(None) once it can spill again
        evict = getattr(self.data, "evict", None)
        if self.memory_spill_fraction and evict is not None and rss > self.memory_spill_fraction * limit:
            # Python rarely hands freed memory back at once, so count what we
            # free instead of re-measuring the process after each value.
            goal = (self.memory_target_fraction or self.memory_spill_fraction) * limit
            need = rss - goal
            freed = 0
            n = 0
            while freed < need:
                got = evict()
                if got < 0:
                    break
                freed += got
                n += 1
                if n % 8 == 0:
                    await asyncio.sleep(0)  # let the worker serve its peers meanwhile
            if n:
                logger.info("worker %s spilled %d values (%s) to disk", self.address, n, format_bytes(freed))
        if rss > (self.memory_target_fraction or self.memory_spill_fraction or 1.0) * limit:
            # glibc keeps freed heap memory (its mmap threshold grows after a
            # large free); hand it back, or a paused worker might never resume.
            trim_memory()

    def _spill_no_space(self, reason: str | None) -> None:
        """SpillBuffer hook: its disk is full (pause, with ``reason``) or has room again.

        Called with the buffer's lock held, possibly from a task thread: the
        pause itself happens on the event loop.
        """
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set_spill_pause, reason)

    def _set_spill_pause(self, reason: str | None) -> None:
        self.spill_pause_reason = reason
        if reason is not None and not self.paused:
            logger.error("worker %s paused: %s", self.address, reason)
            self._set_paused(True)
        elif reason is None and self.paused:
            logger.info("worker %s resumed: spilling works again", self.address)
            self._set_paused(False)  # the memory monitor pauses again if memory is high

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        event = PauseEvent("pause") if paused else UnpauseEvent("unpause")
        self.handle_stimulus(event)
        bs = self.batched_stream
        if bs is not None and not bs.closed:
            with suppress(CommClosedError):
                bs.send({"op": "worker_status_change", "status": "paused" if paused else "running"})

    async def _close_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        logger.info("worker %s reached its lifetime; retiring gracefully", self.address)
        await self.close_gracefully(restart=self.lifetime_restart, reason="worker-lifetime")

    async def close_gracefully(self, restart: bool = False, reason: str = "worker-close-gracefully",
                               timeout: float = 60.0) -> str:
        """Retire: stop taking tasks, let the scheduler move our unique data away, then close.

        With ``restart`` the process asks its nanny for a fresh worker
        (``restart_requested`` is set for the worker process to report).
        """
        if self.status in (Status.closing, Status.closed):
            return "OK"
        self.restart_requested = restart
        try:
            await asyncio.wait_for(
                self.rpc.call(self.scheduler_addr, "retire_workers", workers=[self.address],
                              close_workers=False, remove=True,
                              wait_for_recipient=min(RECIPIENT_WAIT, timeout / 2)),
                timeout,
            )
        except (CommError, OSError, asyncio.TimeoutError, ClusterError) as e:
            logger.warning("worker %s could not retire gracefully (%s); closing anyway", self.address, e)
        await self.close(reason=reason)
        return "OK"

    async def close(self, timeout: float = 5, report: bool = True, nanny: bool = True,
                    reason: str = "worker-close") -> str:
        """Close the worker: tell the scheduler, stop the threads, remove files."""
        if self.status in (Status.closing, Status.closed):
            await self.finished()
            return "OK"
        self.status = Status.closing
        await close_worker_client(self)  # the client of our tasks (get_client)
        await self.extras.close()
        bs = self.batched_stream
        if bs is not None and not bs.closed:
            if report:
                with suppress(CommClosedError):
                    bs.send({"op": "worker_closing", "reason": reason})
            await bs.close(timeout=min(timeout, 2.0))
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.shutdown, min(timeout, 2.0))
        await self._close_listeners_and_comms()
        await self.diagnostics.stop()
        close_data = getattr(self.data, "close", None)
        if close_data is not None and not self._user_data:
            close_data()
        self._remove_local_directory()
        self._mark_closed()
        return "OK"

    # ------------------------------------------------------------------ stimuli

    def handle_stimulus(self, *events) -> None:
        """Feed events to the state machine and carry out its instructions."""
        try:
            instructions = self.state.handle(*events)
        except Exception:
            logger.exception("worker state machine failed on %r; closing the worker", events[:3])
            if self.validate:
                raise
            # A machine that failed mid-step may disagree with the scheduler from now
            # on, silently: close instead (the scheduler hears it and places our
            # tasks elsewhere; a nanny starts a fresh worker).  Not spawned: close()
            # cancels this server's own tasks.
            if self._fatal_close is None and self.status not in (Status.closing, Status.closed):
                self._fatal_close = asyncio.ensure_future(self.close(reason="worker-state-machine-failed"))
            return
        self._execute_instructions(instructions)
        self.extras.after_stimulus()

    def _execute_instructions(self, instructions: list[Instruction]) -> None:
        msgs = []
        for inst in instructions:
            if isinstance(inst, Execute):
                self._start_task(inst.key)
            elif isinstance(inst, GatherDep):
                self.spawn(self._gather_dep(inst.worker, inst.keys, inst.stimulus_id))
            elif isinstance(inst, TaskFinishedMsg):
                msg = inst.to_wire()
                ts = self.state.tasks.get(inst.key)
                if ts is not None and ts.report and 0 <= ts.nbytes <= SMALL_RESULT:
                    # A client waits for this small result: send it along and
                    # save the client a round trip to fetch it.
                    msg["data"] = pickle_small(self.data.get(inst.key))
                msgs.append(msg)
            elif isinstance(inst, Msg):
                msgs.append(inst.to_wire())
        if msgs and self.batched_stream is not None and not self.batched_stream.closed:
            # While tasks still run here, results wait a moment for the next ones
            # and leave together (fewer writes here, fewer reads at the scheduler).
            within = RESULT_COALESCE if self.state.executing and all(
                m["op"] in _RESULT_OPS for m in msgs) else 0.0
            with suppress(CommClosedError):
                self.batched_stream.send(*msgs, within=within)

    def _start_task(self, key: Key) -> None:
        ts = self.state.tasks[key]
        deps = {d.key: self.data[d.key] for d in ts.dependencies} if ts.dependencies else None
        self.pool.submit(key, ts.run_spec, deps)

    def _on_results(self, batch: list) -> None:
        events = []
        for outcome in batch:
            kind = outcome[0]
            if kind == "ok":
                _, key, value, start, stop, nbytes, typename = outcome
                events.append(ExecuteSuccessEvent(f"execute-{key}", key, value, start, stop, nbytes, typename))
            elif kind == "error":
                _, key, exc, tb, start, stop = outcome
                events.append(ExecuteFailureEvent(f"execute-{key}", key, exc, tb, start, stop))
            else:
                events.append(RescheduleEvent(f"reschedule-{outcome[1]}", outcome[1]))
        self.executed_count += len(batch)
        if self.status in (Status.running, Status.closing):
            self.handle_stimulus(*events)

    def _on_secede(self, key: Key, compute_duration: float) -> None:
        if self.status in (Status.running, Status.closing):
            self.handle_stimulus(SecedeEvent(f"secede-{key}", key, compute_duration))

    def _on_close(self, reason: str = "", stimulus_id: str = ""):
        logger.info("scheduler asked worker %s to close (%s)", self.address, reason)
        self.reconnect = False  # the stream ends next: closing, not a lost scheduler to find again
        self.spawn(self.close(report=False, reason=reason))
        return None

    # ------------------------------------------------------------------ data transfer

    async def _gather_dep(self, worker: str, keys: set, stimulus_id: str) -> None:
        try:
            reply = await self.rpc.call(worker, "get_data", keys=list(keys), who=self.address)
        except (CommError, OSError) as e:
            logger.info("could not fetch %d keys from %s: %s", len(keys), worker, e)
            self.handle_stimulus(GatherDepNetworkFailureEvent(stimulus_id, worker, list(keys)))
            return
        except Exception as e:  # the data arrived but could not be used
            import traceback as tb_mod

            self.handle_stimulus(GatherDepFailureEvent(
                stimulus_id, worker, list(keys), e, "".join(tb_mod.format_exception(e))))
            return
        if self.status not in (Status.running, Status.closing):
            return
        self.transfer_incoming_bytes += sum(n for n in reply["nbytes"].values() if n > 0)
        self.handle_stimulus(GatherDepSuccessEvent(stimulus_id, worker, reply["data"], reply["nbytes"]))

    def get_data(self, keys: Iterable[Key] = (), who: str | None = None) -> dict:
        """Our values for ``keys`` (missing keys are left out)."""
        data = {}
        nbytes = {}
        tasks = self.state.tasks
        for k in keys:
            if k in self.data:
                data[k] = box_large(self.data[k])
                ts = tasks.get(k)
                nbytes[k] = ts.nbytes if ts is not None else -1
        self.transfer_outgoing_bytes += sum(n for n in nbytes.values() if n > 0)
        return {"data": data, "nbytes": nbytes}

    def update_data(self, data: dict | None = None, report: bool = True) -> dict:
        """Store data sent from outside (``scatter``)."""
        data = data or {}
        nbytes = {k: sizeof(v) for k, v in data.items()}
        types = {k: type(v).__qualname__ for k, v in data.items()}
        self.handle_stimulus(UpdateDataEvent(f"update-data-{time.time()}", data, nbytes))
        if report and self.batched_stream is not None:
            with suppress(CommClosedError):
                self.batched_stream.send({"op": "add_keys", "keys": list(data)})
        return {"nbytes": nbytes, "types": types, "status": "OK"}

    # ------------------------------------------------------------------ misc operations

    async def run(self, function: bytes, args: bytes | tuple = (), kwargs: dict | None = None,
                  wait: bool = True) -> Any:
        """Run a function in this worker's process (for ``Client.run``; ``dask_worker=`` is this worker)."""
        func = pickle.loads(function) if isinstance(function, bytes) else function
        if isinstance(args, bytes):
            args, kwargs = pickle.loads(args)
        from ..execution import _thread_state, server_kwargs

        previous = getattr(_thread_state, "worker", None)
        _thread_state.worker = self
        try:
            result = func(*args, **server_kwargs(func, kwargs, "dask_worker", self))
            if asyncio.iscoroutine(result):
                result = await result
        finally:
            _thread_state.worker = previous
        return result
