"""The Scheduler server: IO around :class:`SchedulerState`.

Theory of operation
-------------------
Workers and clients each keep one long-lived *stream* connection to the
scheduler; everything else is request/reply RPC.  Incoming stream messages
become events for the pure :class:`SchedulerState` (``state.handle``); the
instructions it returns go to the right worker's or client's :class:`BatchedSend`.
Task recipes arrive from clients as bytes and are forwarded to workers without
being unpickled here.  A worker whose stream breaks is removed at once (its
tasks are rescheduled), not after a heartbeat timeout; ``worker_ttl`` catches
workers that hang without closing their connection.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Hashable, Iterable
from contextlib import suppress
from typing import Any

from .. import messages
from ..comm.inproc import register_alias, unregister_alias
from ..config import FROM_CONFIG, setting
from ..core import BatchedSend, Server, Status
from ..dashboard.scheduler import SchedulerDiagnostics
from ..errors import CommClosedError, CommError
from ..extensions import DEFAULT_EXTENSIONS
from ..plugins import block_handlers
from ..preload import process_preloads, start_preloads, teardown_preloads
from ..security import (
    credentials_path,
    register_local_credentials,
    resolve_security,
    unregister_local_credentials,
    write_private_file,
)
from ..statemachine import Msg
from ..utils import (  # noqa: F401
    call_each,
    delegate,
    fifo_seconds,
    get_ip_for,
    get_ip_interface,
    parse_timedelta,
    unparse_host_port,
)
from . import elastic, events, stimuli
from . import extensions as _extensions
from .data import SchedulerData, scatter_to_workers  # noqa: F401  (re-exported)
from .events import (
    AddKeysEvent,
    AddWorkerEvent,
    CancelEvent,
    CancelKeyEvent,
    ClientHeartbeatEvent,
    ClientReleasesKeysEvent,
    HeartbeatEvent,
    LongRunningEvent,
    MissingDataEvent,
    RemoveClientEvent,
    RemoveWorkerEvent,
    RescheduleEvent,
    TaskErredEvent,
    TaskFinishedEvent,
    TickEvent,
    UpdateGraphEvent,
)
from .ops import SchedulerOps
from .records import CloseScheduler, RemoveWorker
from .state import SchedulerState, TaskState, WorkerState

logger = logging.getLogger(__name__)

Key = Hashable


def _state_setting(name: str, doc: str) -> property:
    """A property of the Scheduler kept by the state machine (a duration, parsed on set)."""
    return property(lambda self: getattr(self.state, name),
                    lambda self, value: setattr(self.state, name, parse_timedelta(value)), doc=doc)


def _from_state(name: str, doc: str) -> property:
    """A read-only property of the Scheduler that is the state machine's table ``name``."""
    return property(lambda self: getattr(self.state, name), doc=doc)


class Scheduler(Server):
    """Dynamic distributed task scheduler.

    Args:
        loop: ignored (the running asyncio loop is used); kept for compatibility.
        allowed_failures: worker deaths a task may cause before it fails
            with ``KilledWorker`` (default 3).
        validate: check every state invariant after each step.
        scheduler_file: path of a JSON file, written atomically once we
            listen and removed on close, that tells workers and clients where
            we are.  With TLS it is readable only by the user (0600) and
            names a credentials file, also 0600, written next to it
            (``<scheduler_file>.credentials``) and removed on close.
        worker_ttl: remove a worker not heard from for this long (``"60s"``).
        idle_timeout: close after this long with no work (``"1h"``).
        interface: listen on this network interface's address (``"ib0"``).
        host: listen on this host (default ``127.0.0.1``: loopback only).
        port: port to listen on (0: any free port).
        protocol: ``"tls"`` (the default with ``security``), ``"tcp"`` (the
            default without) or ``"inproc"``.
        dashboard_address: where the status page, its JSON and ``/metrics`` are served
            (default ``":8787"``: port 8787 on our own host, or a free port if it is
            taken; ``None``/``False``: not served).  HTTPS with our TLS credentials
            when we listen with TLS.  See :mod:`cluster.runtime.dashboard`.
        security: a :class:`~cluster.runtime.security.Security` with the scheduler's
            TLS credentials, ``True`` for fresh temporary ones
            (``Security.temporary()``), or ``None``/``False`` for none.
        preload / preload_argv: modules, files or source run at start (see
            :mod:`cluster.runtime.preload`; files others can write are refused).
        blocked_handlers: operations to refuse (e.g. ``["run_function"]``).
        services / service_kwargs / delete_interval / synchronize_worker_interval:
            refused unless left at their defaults (see ``SchedulerOps.check_options``).

    Raises:
        ValueError: an option has a value we cannot use, named in the message.
    """

    default_port = 8786

    def __init__(self, loop=None, delete_interval="500ms", synchronize_worker_interval="60s",
                 services=None, service_kwargs=None, allowed_failures: int | None = None,
                 extensions=None, validate: bool = False, scheduler_file: str | None = None,
                 security=None, worker_ttl=FROM_CONFIG, idle_timeout=FROM_CONFIG,
                 interface: str | None = None,
                 host: str | None = None, port: int = 0, protocol: str | None = None,
                 dashboard_address=":8787", preload=None, preload_argv=(), blocked_handlers=None,
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"Scheduler() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        SchedulerOps.check_options(services, service_kwargs, delete_interval, synchronize_worker_interval)
        if protocol not in (None, "tcp", "tls", "inproc"):
            raise ValueError(f"protocol={protocol!r}: accepted values are 'tcp', 'tls' and 'inproc'")
        security = resolve_security(security)
        self._set_security(security, "scheduler")
        # Defaults from the configuration (scheduler.*, runtime.config); allowed_failures=None too.
        allowed_failures = setting("scheduler.allowed-failures",
                                   FROM_CONFIG if allowed_failures is None else allowed_failures)
        if allowed_failures is not None and (not isinstance(allowed_failures, int) or allowed_failures < 0):
            raise ValueError(f"allowed_failures={allowed_failures!r}: expected a non-negative integer")
        self.state = SchedulerState(validate=validate,
                                    allowed_failures=allowed_failures,
                                    worker_ttl=parse_timedelta(setting("scheduler.worker-ttl", worker_ttl)),
                                    idle_timeout=parse_timedelta(setting("scheduler.idle-timeout",
                                                                         idle_timeout)))
        self.validate = validate
        self.scheduler_file = scheduler_file
        self.interface = interface
        self.host = host
        self.port = port
        if protocol is None:
            secure = security is not None and (security.has_tls("scheduler")
                                               or security.require_encryption)
            protocol = "tls" if secure else "tcp"
        self.protocol = protocol
        self._credentials_file: str | None = None
        self.services: dict[str, int] = {}
        #: Status page, task stream, counters and logs (a part with its own handlers).
        self.diagnostics = SchedulerDiagnostics(self, dashboard_address)
        self.id = f"Scheduler-{uuid.uuid4()}"
        self.stream_comms: dict[str, BatchedSend] = {}
        self.client_comms: dict[str, BatchedSend] = {}
        self.plugins: dict[str, Any] = {}
        self.worker_plugins: dict[str, bytes] = {}
        self.time_started = time.time()
        self._stimulus_counter = 0
        self._held: list[Msg] | None = None
        #: Gather, scatter and where keys live, through the scheduler (a part).
        self.data = SchedulerData(self)
        #: Cluster operations and plugins: retire, replicate, rebalance, restart (a part).
        self.ops = SchedulerOps(self)
        self.handlers.update({
            "gather": self.data.gather,
            "scatter": self.data.scatter,
            "update_data": self.data.update_data,
            "who_has": self.data.get_who_has,
            "has_what": self.data.get_has_what,
            "ncores": self.data.get_nthreads,
            "nthreads": self.data.get_nthreads,
            "broadcast": self.ops.broadcast,
            "run_function": self.ops.run_function,
            "cancel": self.stimulus_cancel,
            "close": self.close,
            "story": self.story,
            "identity": self.identity,
            "scheduler_info": self.identity,
            "unregister": self.remove_worker,
            "heartbeat_worker": self.heartbeat_worker,
            "retire_workers": self.ops.retire_workers,
            "workers_to_close": self.ops.workers_to_close,
            "adaptive_target": self.ops.adaptive_target,
            "replicate": self.ops.replicate,
            "rebalance": self.ops.rebalance,
            "restart": self.ops.restart,
            "register_worker_plugin": self.ops.register_worker_plugin,
            "add_plugin": self.ops.register_scheduler_plugin,
            "remove_plugin": self.ops.remove_plugin,
            "proxy": self.ops.proxy,
            "close_worker": self.close_worker,
        })
        self.stream_handlers.update({
            "register_worker": self.add_worker,
            "register_client": self.add_client,
        })
        #: Parts with their own state and handlers (variables, queues, locks...): ``{name: part}``.
        self.extensions: dict[str, Any] = _extensions.install(
            self, DEFAULT_EXTENSIONS if extensions is None else extensions)
        self.message_specs = {**messages.SCHEDULER_REQUESTS, **messages.SCHEDULER_STREAM_OPENINGS}
        #: What each stream message becomes: ``{op: event class}`` (the event is the spec).
        self.worker_ops = events.WORKER_STREAM
        self.client_ops = {**events.CLIENT_STREAM, "close_client": None}
        self.preloads = process_preloads(self, preload, preload_argv, "Scheduler")
        self.blocked_handlers = block_handlers(self, blocked_handlers, "Scheduler")

    # ------------------------------------------------------------------ state passthrough

    tasks = _from_state("tasks", "Every task the scheduler knows: ``{key: TaskState}``.")
    workers = _from_state("workers", "Every worker: ``{address: WorkerState}``.")
    clients = _from_state("clients", "Every client: ``{id: ClientState}``.")
    unrunnable = _from_state("unrunnable", "Tasks that no worker can run now.")
    idle = _from_state("idle", "Workers with fewer tasks than threads.")
    saturated = _from_state("saturated", "Workers with no room for more tasks.")
    host_info = _from_state("host_info", "Per host: its workers' addresses and threads.")
    task_duration = _from_state("task_duration", "Learned duration per task prefix.")

    def decide_worker(self, ts: TaskState) -> WorkerState | None:
        return self.state.placement.decide_worker(ts)

    def worker_objective(self, ts: TaskState, ws: WorkerState) -> tuple:
        return self.state.placement.worker_objective(ts, ws)

    def valid_workers(self, ts: TaskState):
        return self.state.placement.valid_workers(ts)

    def get_task_duration(self, ts: TaskState, default: float = 0.5) -> float:
        return self.state.placement.get_task_duration(ts, default)

    def get_comm_cost(self, ts: TaskState, ws: WorkerState) -> float:
        return self.state.placement.get_comm_cost(ts, ws)

    def reevaluate_occupancy(self, worker_index: int = 0) -> None:
        """Re-estimate every worker's expected load from current task durations (also periodic)."""
        elastic.reevaluate_occupancy(self.state, worker_index)
        self._send(self.state.transitions({}, self._stimulus("reevaluate-occupancy")))

    def check_idle_saturated(self, ws: WorkerState, occ: float | None = None) -> None:
        self.state.placement.check_idle_saturated(ws)

    def transition(self, key: Key, finish: str, *args, **kwargs) -> dict:
        """Move one task; return the follow-up recommendations (not carried out)."""
        recs = self.state.transition(key, finish, self._stimulus("transition"), **kwargs)
        self._send(self.state._instructions)
        self.state._instructions = []
        return recs

    def transitions(self, recommendations: dict) -> None:
        """Carry out recommendations until none are left, sending what results."""
        self._send(self.state.transitions(recommendations, self._stimulus("transitions")))

    def story(self, *keys: Key, keys_list: Iterable[Key] | None = None) -> list[tuple]:
        """Every transition recorded for ``keys``."""
        if keys_list is not None:
            keys = (*keys, *keys_list)
        return self.state.story(*keys)

    transition_story = story

    def _stimulus(self, name: str) -> str:
        self._stimulus_counter += 1
        return f"{name}-{self._stimulus_counter}"

    # ------------------------------------------------------------------ lifecycle

    async def start_unsafe(self) -> None:
        host = self.host
        if self.interface:
            host = get_ip_interface(self.interface)
        if host is None:
            host = "127.0.0.1"
        if self.protocol == "inproc":
            address = "inproc://"
        else:
            address = f"{self.protocol}://{unparse_host_port(host, self.port or 0)}"
        await self.listen(address)
        if self.protocol != "inproc":
            # A Client in this process (Client(cluster), Client(), a script run
            # next to its cluster) talks to us through memory (comm/inproc.py).
            local = await self.listen("inproc://")
            register_alias(self.address, local.listen_address)
        logger.info("Scheduler at %s", self.address)
        await self.diagnostics.start()
        await start_preloads(self.preloads)
        if self.secure:
            # A Client made in this process (a script run next to its cluster)
            # finds the credentials by our address.
            register_local_credentials(self.address, self.security)
        if self.scheduler_file:
            self._write_scheduler_file()
        self.spawn(self._periodic_checks())

    @property
    def secure(self) -> bool:
        """Whether we listen with TLS."""
        return self.protocol == "tls" and self.security is not None

    def _write_scheduler_file(self) -> None:
        path = os.path.abspath(self.scheduler_file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        info = self.identity()
        if self.secure:
            # Only the user may read where the cluster is and how to get in.
            self._credentials_file = self.security.to_file(credentials_path(path))
            info["security"] = self._credentials_file
            write_private_file(path, json.dumps(info, indent=2, default=str))
            return
        write_private_file(path, json.dumps(info, indent=2, default=str))

    # ------------------------------------------------------------------ the documented API of the parts

    gather = delegate("data", SchedulerData.gather)
    scatter = delegate("data", SchedulerData.scatter)
    update_data = delegate("data", SchedulerData.update_data)
    get_who_has = delegate("data", SchedulerData.get_who_has)
    get_has_what = delegate("data", SchedulerData.get_has_what)
    get_nthreads = delegate("data", SchedulerData.get_nthreads)
    retire_workers = delegate("ops", SchedulerOps.retire_workers)
    workers_to_close = delegate("ops", SchedulerOps.workers_to_close)
    adaptive_target = delegate("ops", SchedulerOps.adaptive_target)
    replicate = delegate("ops", SchedulerOps.replicate)
    rebalance = delegate("ops", SchedulerOps.rebalance)
    restart = delegate("ops", SchedulerOps.restart)
    add_plugin = delegate("ops", SchedulerOps.add_plugin)
    register_scheduler_plugin = delegate("ops", SchedulerOps.register_scheduler_plugin)
    remove_plugin = delegate("ops", SchedulerOps.remove_plugin)
    register_worker_plugin = delegate("ops", SchedulerOps.register_worker_plugin)
    proxy = delegate("ops", SchedulerOps.proxy)
    get_worker_service_addr = delegate("ops", SchedulerOps.get_worker_service_addr)
    coerce_address = delegate("ops", SchedulerOps.coerce_address)

    @property
    def dashboard_link(self) -> str | None:
        """Where the status page is (with its token when TLS is on); ``None`` when off."""
        return self.diagnostics.dashboard_link

    @property
    def http_server(self):
        """The status page's HTTP server (``None`` when off)."""
        return self.diagnostics.http_server

    def get_logs(self, n: int | None = None, timestamps: bool = False) -> list[tuple]:
        """The last records of this scheduler's runtime loggers."""
        return self.diagnostics.get_logs(n, timestamps)

    worker_ttl = _state_setting("worker_ttl", "Seconds without a heartbeat after which a worker "
                                "is removed (the state decides, on a tick).")
    idle_timeout = _state_setting("idle_timeout", "Seconds without work after which the scheduler "
                                  "closes (the state decides, on a tick).")

    async def _periodic_checks(self) -> None:
        """Tell the state the time now and then (:class:`TickEvent`); carry out what it decides."""
        interval = 0.5
        if self.worker_ttl:
            interval = min(interval, self.worker_ttl / 4)
        while self.status == Status.running:
            await asyncio.sleep(interval)
            self._send(self.state.handle(TickEvent(time.monotonic(), self._stimulus("tick"))))

    async def close(self, fast: bool = False, close_workers: bool = False) -> None:
        """Close the scheduler (and, with ``close_workers``, its workers)."""
        if self.status in (Status.closing, Status.closed):
            await self.finished()
            return
        self.status = Status.closing
        await self.ops.plugin_hook_async("before_close")
        await call_each(self.plugins, "close", "scheduler plugin")
        await asyncio.gather(*_extensions.call_hook(self.extensions, "close"), return_exceptions=True)
        await teardown_preloads(self.preloads)
        if close_workers:
            for bs in list(self.stream_comms.values()):
                with suppress(CommClosedError):
                    bs.send({"op": "close", "reason": "scheduler-close"})
            await asyncio.gather(*(bs.flush(2.0) for bs in self.stream_comms.values()),
                                 return_exceptions=True)
        for bs in list(self.client_comms.values()):
            with suppress(CommClosedError):
                bs.send({"op": "scheduler_closing"})
        await asyncio.gather(*(bs.flush(1.0) for bs in self.client_comms.values()), return_exceptions=True)
        for bs in list(self.stream_comms.values()) + list(self.client_comms.values()):
            bs.abort()
        await self._close_listeners_and_comms()
        await self.diagnostics.stop()
        if self.listeners:
            unregister_alias(self.address)
        if self.listeners and self.secure:
            unregister_local_credentials(self.address)
        if self.scheduler_file:
            with suppress(FileNotFoundError):
                os.remove(self.scheduler_file)
        if self._credentials_file:
            with suppress(FileNotFoundError):
                os.remove(self._credentials_file)
        self._mark_closed()

    # ------------------------------------------------------------------ routing

    def _send(self, instructions: list[Msg]) -> None:
        """Carry out the state's instructions: messages to peers, and the shell's own."""
        for instr in instructions:
            if isinstance(instr, RemoveWorker):
                if instr.safe:
                    logger.info("worker %s %s; removing it", instr.worker, instr.reason)
                else:
                    logger.warning("worker %s %s; removing it", instr.worker, instr.reason)
                self.spawn(self.remove_worker(instr.worker, safe=instr.safe, close=instr.close,
                                              stimulus_id=instr.stimulus_id))
            elif isinstance(instr, CloseScheduler):
                logger.info("scheduler %s; closing", instr.reason)
                self.spawn(self.close())
        if any(type(i) in (RemoveWorker, CloseScheduler) for i in instructions):
            instructions = [i for i in instructions if type(i) not in (RemoveWorker, CloseScheduler)]
        if self._held is not None:
            # Inside a batch from one peer: send once at its end.
            self._held.extend(instructions)
            return
        self._route(instructions)

    def _route(self, instructions: list[Msg]) -> None:
        per_worker: dict[str, list] = defaultdict(list)
        per_client: dict[str, list] = defaultdict(list)
        for msg in instructions:
            if msg.route == "worker":
                per_worker[msg.worker].append(msg.to_wire())
            elif msg.route == "client":
                per_client[msg.client].append(msg.to_wire())
            else:  # pragma: no cover
                logger.error("unroutable instruction %r", msg)
        for addr, msgs in per_worker.items():
            bs = self.stream_comms.get(addr)
            if bs is not None and not bs.closed:
                bs.send(*msgs)
        for client, msgs in per_client.items():
            bs = self.client_comms.get(client)
            if bs is not None and not bs.closed:
                bs.send(*msgs)
        if self.plugins:
            self.ops._plugin_transitions()

    def report(self, msg: dict, ts: TaskState | None = None, client: str | None = None) -> None:
        """Send ``msg`` to the clients that want ``ts`` (or to ``client``, or to all)."""
        if client is not None:
            targets = [client]
        elif ts is not None:
            targets = [cs.client_key for cs in ts.who_wants]
        else:
            targets = list(self.client_comms)
        for c in targets:
            bs = self.client_comms.get(c)
            if bs is not None and not bs.closed:
                bs.send(msg)

    def worker_send(self, worker: str, msg: dict) -> None:
        """Send a message on a worker's stream; a broken stream removes the worker."""
        bs = self.stream_comms.get(worker)
        if bs is None:
            return
        try:
            bs.send(msg)
        except CommClosedError:
            self.spawn(self.remove_worker(worker, stimulus_id=self._stimulus("worker-send-failed")))

    # ------------------------------------------------------------------ workers

    async def add_worker(self, comm, address: str, nthreads: int = 1, name: Any = None,
                         memory_limit: int = 0, resources: dict | None = None, host: str = "",
                         pid: int = 0, nanny: str | None = None, local_directory: str = "",
                         services: dict | None = None, keys: Iterable[Key] = (),
                         nbytes: dict | None = None, **extra) -> None:
        """Register a worker and serve its stream until it goes away."""
        if self.status != Status.running:
            await comm.write(("error", CommClosedError("scheduler is closing"), ""))
            return
        stimulus_id = self._stimulus("add-worker")
        try:
            stimuli.check_new_worker(self.state, address, name)
        except ValueError as e:
            await comm.write(("error", e, ""))
            return
        await comm.write(("OK", {"status": "OK", "scheduler": self.id, "time": time.time()}))
        # From here on no await until the stream is in place: work placed on the
        # new worker must find its stream.
        try:
            instrs = self.state.handle(AddWorkerEvent(address, nthreads, name, memory_limit, resources, host,
                                           pid, nanny, local_directory, services, keys, nbytes,
                                           stimulus_id=stimulus_id))
        except ValueError as e:  # a twin registered while we answered
            logger.warning("refusing worker %s: %s", address, e)
            comm.abort()
            return
        bs = BatchedSend(comm, name=f"Scheduler->Worker {address}")
        self.stream_comms[address] = bs
        logger.info("register worker %s (name=%r, nthreads=%d)", address, name, nthreads)
        self.ops.worker_registered(address, nanny, extra.get("versions"))
        for pname, blob in self.worker_plugins.items():
            bs.send({"op": "plugin_add", "plugin": blob, "name": pname})
        self._send(instrs)
        self.ops._plugin_hook("add_worker", scheduler=self, worker=address)
        await self._serve_stream(comm, self.worker_ops, address)
        if self.state.workers.get(address) is not None and self.stream_comms.get(address) is bs:
            await self.remove_worker(address, stimulus_id=self._stimulus("worker-stream-closed"))

    async def _serve_stream(self, comm, ops: dict, peer_id: str) -> None:
        """Apply each message of each batch from a worker's or client's stream.

        Each message becomes its event (``ops``: ``{op: event class}``, see
        :func:`events.decode`) for :meth:`SchedulerState.handle`.  A message of
        the wrong shape ends the stream before it is applied; messages before
        it in its batch stand.
        """
        peer = comm.peer_address
        while self.status == Status.running:
            try:
                batch = await comm.read()
            except CommClosedError:
                return
            except CommError as e:
                logger.warning("closing stream from %s: %s", peer, e)
                return
            if not isinstance(batch, list):
                logger.warning("closing stream from %s: expected a list of messages", peer)
                return
            self._held = []
            try:
                for msg in batch:
                    op = msg.pop("op", None) if isinstance(msg, dict) else None
                    if not isinstance(op, str) or op not in ops:
                        logger.warning("closing stream from %s: unknown operation %s", peer,
                                       messages.short_repr(op))
                        return
                    cls = ops[op]
                    if cls is None:  # close request
                        return
                    try:
                        ev = events.decode(cls, msg, peer_id, self._stimulus, self.state)
                    except (TypeError, ValueError) as e:
                        logger.warning("closing stream from %s: %s", peer, e)
                        return
                    try:
                        self._apply(ev)
                    except Exception:
                        logger.exception("error handling %r from %s", op, peer)
                        if self.validate:
                            raise
            finally:
                held, self._held = self._held, None
                if held:
                    self._route(held)

    async def remove_worker(self, address: str, safe: bool = False, close: bool = True,
                            stimulus_id: str | None = None) -> str:
        """Remove a worker; its running tasks go elsewhere, data only it held is recomputed."""
        if address not in self.state.workers:
            return "already-removed"
        logger.info("remove worker %s", address)
        instrs = self.state.handle(RemoveWorkerEvent(address, stimulus_id or self._stimulus("remove-worker"), safe=safe))
        bs = self.stream_comms.pop(address, None)
        # Send before any await: messages of later stimuli must not overtake these.
        self._send(instrs)
        self.ops._plugin_hook("remove_worker", scheduler=self, worker=address, stimulus_id=stimulus_id or "")
        _extensions.call_hook(self.extensions, "remove_worker", address)
        if bs is not None:
            if close:
                with suppress(CommClosedError):
                    bs.send({"op": "close", "reason": "scheduler-remove-worker"})
                await bs.flush(1.0)
            bs.abort()
        return "OK"

    def close_worker(self, worker: str, stimulus_id: str | None = None) -> str:
        """Ask a worker to close itself (its nanny, if any, does not restart it)."""
        self.worker_send(worker, {"op": "close", "reason": "scheduler-close-worker"})
        return "OK"

    def _apply(self, ev: events.SchedulerEvent) -> None:
        """Hand a peer's event to the state; record what the status page and plugins watch."""
        if isinstance(ev, (TaskFinishedEvent, TaskErredEvent)):
            self.diagnostics.record_task(ev.key, ev.worker, ev.startstops,
                                         isinstance(ev, TaskFinishedEvent))
        self._send(self.state.handle(ev))
        if self.plugins and isinstance(ev, UpdateGraphEvent):
            self.ops._plugin_hook("update_graph", self, client=ev.client, keys=list(ev.keys),
                                  tasks=list(ev.tasks), dependencies=ev.dependencies or {},
                                  annotations={}, priority=None, stimulus_id=ev.stimulus_id)

    def heartbeat_worker(self, address: str, metrics: dict | None = None) -> dict:
        self.state.handle(HeartbeatEvent(address, metrics))
        return {"status": "OK" if address in self.state.workers else "missing"}

    def add_keys(self, worker: str, keys: Iterable[Key] = ()) -> str:
        """Learn that ``worker`` holds ``keys``."""
        self._send(self.state.handle(AddKeysEvent(worker, keys, self._stimulus("add_keys"))))
        return "OK"

    def stimulus_missing_data(self, key: Key, errant_worker: str | None = None, worker: str | None = None) -> None:
        """Mark that ``key`` could not be found where expected.  Recover."""
        self._send(self.state.handle(MissingDataEvent(key, errant_worker, worker, self._stimulus("missing_data"))))

    def reschedule(self, key: Key | None = None, worker: str | None = None) -> None:
        """Place a processing task again, e.g. after it raised ``Reschedule``."""
        self._send(self.state.handle(RescheduleEvent(key, worker, self._stimulus("reschedule"))))

    def handle_long_running(self, key: Key | None = None, worker: str | None = None,
                            compute_duration: float | None = None) -> None:
        """A task seceded from its worker's thread pool."""
        self._send(self.state.handle(LongRunningEvent(key, worker, compute_duration, self._stimulus("long-running"))))

    def stimulus_task_finished(self, key: Key | None = None, worker: str | None = None, **kwargs) -> None:
        """Mark that a task finished on a worker."""
        kwargs.setdefault("stimulus_id", self._stimulus("task_finished"))
        self._apply(TaskFinishedEvent(key, worker, **kwargs))

    def stimulus_task_erred(self, key: Key | None = None, worker: str | None = None, exception=None,
                            traceback: str = "", **kwargs) -> None:
        """Mark that a task erred on a worker."""
        self._apply(TaskErredEvent(key, worker, exception, traceback,
                                   stimulus_id=self._stimulus("task_erred")))

    # ------------------------------------------------------------------ clients

    async def add_client(self, comm, client: str, **kwargs) -> None:
        """Register a client and serve its stream until it goes away."""
        if self.status != Status.running:
            await comm.write(("error", CommClosedError("scheduler is closing"), ""))
            return
        stimuli.add_client(self.state, client)
        await comm.write(("OK", {"status": "OK", "scheduler": self.id,
                                "dashboard_link": self.dashboard_link}))
        bs = BatchedSend(comm, name=f"Scheduler->Client {client}")
        self.client_comms[client] = bs
        logger.info("register client %s", client)
        self.ops._plugin_hook("add_client", scheduler=self, client=client)
        try:
            await self._serve_stream(comm, self.client_ops, client)
        finally:
            if self.client_comms.get(client) is bs:
                del self.client_comms[client]
                self.remove_client(client)
            bs.abort()

    def remove_client(self, client: str | None = None) -> None:
        """Forget a client; the keys only it wanted are released."""
        self._send(self.state.handle(RemoveClientEvent(client, self._stimulus("remove-client"))))
        self.ops._plugin_hook("remove_client", scheduler=self, client=client)
        _extensions.call_hook(self.extensions, "remove_client", client)

    def client_releases_keys(self, keys: Iterable[Key] | None = None, client: str | None = None) -> None:
        """Remove keys from a client's desired set."""
        self._send(self.state.handle(ClientReleasesKeysEvent(keys or (), client, self._stimulus("client_releases_keys"))))

    def client_heartbeat(self, client: str | None = None) -> None:
        """A client is alive."""
        self.state.handle(ClientHeartbeatEvent(client))

    def update_graph(self, client: str | None = None, tasks: dict | None = None, keys: Iterable[Key] = (),
                     dependencies: dict | None = None, restrictions: dict | None = None,
                     priority=None, loose_restrictions=(), resources: dict | None = None,
                     submitting_task=None, retries: dict | None = None, user_priority=0,
                     actors=None, fifo_timeout=0) -> None:
        """Add new computations from a client.

        ``fifo_timeout`` (seconds or a duration string): a graph that arrives
        within it of the start of the current generation joins it (its tasks
        interleave with that generation's by their order in each graph);
        else it starts a later generation, which runs after.

        Raises:
            ValueError: ``actors``, ``submitting_task`` or ``priority`` (dask's
                internal graph order: ours is the order of ``tasks``) is given;
                a bad ``fifo_timeout``.
        """
        for name, value in (("actors", actors), ("submitting_task", submitting_task),
                            ("priority", priority)):
            if value:
                raise ValueError(f"update_graph: {name} is not supported (the order of tasks "
                                 "is their priority within the graph; user_priority ranks graphs)")
        self._apply(UpdateGraphEvent(
            client, tasks or {}, keys, dependencies=dependencies, restrictions=restrictions,
            loose_restrictions=loose_restrictions, resources=resources, retries=retries,
            user_priority=user_priority, fifo_timeout=fifo_seconds(fifo_timeout),
            stimulus_id=self._stimulus("update_graph"), now=time.monotonic(),
        ))

    def stimulus_cancel(self, keys: Iterable[Key] = (), client: str = "", force: bool = False) -> str:
        """Stop computing ``keys`` for ``client``."""
        self._send(self.state.handle(CancelEvent(keys, client, force, self._stimulus("cancel"))))
        return "OK"

    def cancel_key(self, key: Key, client: str, retries: int = 5, force: bool = False) -> None:
        """Cancel one key and everything that depends on it."""
        self._send(self.state.handle(CancelKeyEvent(key, client, force, self._stimulus("cancel"))))

    # ------------------------------------------------------------------ cluster-wide operations

    def identity(self, n_workers: int = -1) -> dict:
        """Basic information about us and our workers.

        Args:
            n_workers: describe at most this many workers under ``"workers"`` (``-1``:
                all); ``"n_workers"`` still counts them all.  Each description is
                built on every call, so a poll that only counts workers asks for 0.
        """
        workers = self.state.workers
        listed = workers.values() if n_workers < 0 else itertools.islice(workers.values(), n_workers)
        return {
            "type": "Scheduler",
            "id": self.id,
            "address": self.address if self.listeners else None,
            "services": dict(self.services),
            "started": self.time_started,
            "n_workers": len(workers),
            "total_threads": self.state.total_nthreads,
            "workers": {ws.address: ws.identity() for ws in listed},
        }

    async def broadcast(self, msg: dict | None = None, workers=None, hosts=None, nanny: bool = False,
                        serializers=None, return_exceptions: bool = False) -> dict:
        """Send ``msg`` to workers (all by default): ``{address: reply}`` (see :class:`SchedulerOps`)."""
        return await self.ops.broadcast(msg, workers, hosts, nanny, serializers, return_exceptions)

    def workers_list(self, workers: Iterable[str] | None) -> list[str]:
        """Worker addresses matching addresses, names or hostnames in ``workers``."""
        return self.ops.workers_list(workers)

    def coerce_hostname(self, host: str) -> str:
        """The canonical host name of a worker host (alias names resolve to their host)."""
        return self.ops.coerce_hostname(host)

    def __repr__(self) -> str:
        n = len(self.state.workers) if hasattr(self, "state") else 0
        addr = self.listeners[0].contact_address if self.listeners else "not started"
        return f"<Scheduler {addr!r} workers: {n} status: {self.status}>"
