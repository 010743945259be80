"""The Nanny: a small server that runs one Worker in a child process and keeps it alive.

Theory of operation
-------------------
The nanny listens on its own address (chosen like a Worker's: loopback when
the scheduler is on loopback) and starts the worker as a
:class:`~cluster.runtime.process.WorkerProcess` with ``nanny=<our address>``, so the
scheduler records us in ``WorkerState.nanny`` and can reach us for
``restart``/``kill``.  The child reports its worker's address over a pipe once
it has registered; :meth:`Nanny.instantiate` returns then.

One *watcher* task per child waits for it to exit.  An exit nobody asked for
(a crash, SIGKILL, ``os._exit`` in a task, termination by the memory monitor)
is reported to the scheduler at once with ``unregister`` -- so its tasks are
rescheduled without waiting for a heartbeat timeout -- and a new worker
process with the same name is started.  Exits we cause (``kill``,
``restart``, ``close``) mark the process ``stopping`` first, so the watcher
leaves them alone.  A worker that exits with code 0 closed itself on purpose
(the scheduler told it to, or it gave up on an unreachable scheduler): it is
not restarted and the nanny closes too.  One that exits with
:data:`~cluster.runtime.process.RESTART_EXIT_CODE` asked for a fresh worker (its
``lifetime`` ended with ``lifetime_restart=True``) and gets one.  After :meth:`Nanny.close_gracefully` the worker is
not restarted either: when it exits the nanny closes.

Every ``memory_monitor_interval`` the memory monitor reads the child's RSS;
above ``memory_terminate_fraction * memory_limit`` the worker is unregistered
(its running tasks count as having killed a worker, towards the scheduler's
``allowed_failures``) and terminated -- SIGTERM, SIGKILL after
:attr:`Nanny.memory_terminate_grace` seconds -- and the watcher restarts it.
On Linux the RSS is read through a descriptor of ``/proc/<pid>/statm`` opened
once per worker process, so the monitor keeps enforcing the limit when the
process has run out of descriptors (a flood of connections to a scheduler in
the same process): a failed check is logged once, not once per interval.

Starting, killing and restarting the child are serialised by one lock.  The
child closes itself when its stdin pipe reaches end-of-file, so even a nanny
that dies without closing leaves no orphan worker behind.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import logging
import os
import pickle
import time
from contextlib import suppress
from typing import Any

import psutil

from .config import FROM_CONFIG, setting
from .core import Server, Status, unpack_reply
from .errors import ClusterTimeoutError, CommError
from .plugins import plugin_name, refuse_unsupported
from .plugins import silence_logs as apply_silence_logs
from .preload import process_preloads, start_preloads, teardown_preloads
from .process import RESTART_EXIT_CODE, WorkerProcess, WorkerProcessError
from .security import resolve_security
from .utils import (
    format_bytes,
    listen_host,
    parse_address,
    parse_host_port,
    parse_timedelta,
    unparse_host_port,
)
from .worker import Worker, parse_memory_limit
from .worker.plugins import UNSUPPORTED

logger = logging.getLogger(__name__)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: Worker options the nanny sets itself; ``**worker_kwargs`` may not override them.
_NANNY_OWNED = frozenset({
    "scheduler_ip", "scheduler_port", "scheduler_file", "nanny", "name", "nthreads", "ncores",
    "memory_limit", "host", "port", "protocol", "interface", "loop",
})


def _check_network_address(address: str, what: str) -> None:
    """A nanny's scheduler must be reachable from another process: tcp:// or tls://.

    Raises:
        ValueError: naming ``what`` and the address.
    """
    if parse_address(address)[0] not in ("tcp", "tls"):
        raise ValueError(f"{what} {address!r}: a Nanny needs a tls:// or tcp:// scheduler "
                         "(its worker is another process)")


def _worker_parameters() -> frozenset[str]:
    params = inspect.signature(Worker.__init__).parameters
    return frozenset(n for n, p in params.items()
                     if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


class Nanny(Server):
    """Runs one worker in a child process, restarts it when it dies, watches its memory.

    The parameters are those of :class:`~cluster.runtime.worker.Worker`, plus:

    Args:
        scheduler_ip: the scheduler's address (``"tcp://host:port"``) or host.
        scheduler_port: the port, when ``scheduler_ip`` is a bare host.
        scheduler_file: read the scheduler's address from this JSON file.
        worker_port: port the worker listens on (0: any free port).
        nthreads: threads of the worker (default: the number of cores).
        ncores: old name of ``nthreads``.
        loop: ignored (the running asyncio loop is used).
        local_directory: where the worker's directory goes (default: temp dir).
        services: passed to the worker.
        name: the worker's name, kept across restarts (default: our address).
        memory_limit: see :func:`~cluster.runtime.worker.parse_memory_limit`; 0 = none.
        reconnect: the worker reconnects when its scheduler connection breaks.
        validate: the worker checks its state invariants after every event.
        quiet: log the nanny's own comings and goings (start, restarts, close) at
            DEBUG instead of INFO.
        silence_logs: the level of the runtime's loggers, in this process and in
            the worker process (see :func:`cluster.runtime.plugins.silence_logs`).
        resources: abstract resources of the worker, e.g. ``{"GPU": 2}``.
        death_timeout: how long the worker may take to reach the scheduler
            (also bounds how long :meth:`instantiate` waits; default 60 s).
        preload / preload_argv: passed to the worker (see :mod:`cluster.runtime.preload`).
        preload_nanny / preload_nanny_argv: preloads of the nanny itself
            (``dask_setup(nanny)`` before it starts its worker).
        security: a :class:`~cluster.runtime.security.Security` with the worker
            role's TLS credentials (used by the nanny and handed to its worker
            process over a private pipe), or ``None``/``False``; with ``None``
            and a scheduler file that names credentials, those.
        contact_address: the address the worker advertises.
        listen_address: where the worker listens (``"tls://host:port"`` or ``tcp://``);
            default: our host and ``worker_port``.
        worker_class: the class to run in the child (a subclass of ``Worker``,
            or ``"module.Class"``); must be importable there.
        env: extra environment variables for the worker process.
        interface / host / port / protocol: where the nanny listens (by
            default the local address that routes to the scheduler, with its
            protocol; port 0 = any).  The worker listens on the same host.
        memory_terminate_fraction: restart the worker when its RSS exceeds
            this fraction of ``memory_limit`` (``None``/``False``/0: never;
            default: the ``worker.memory.terminate`` setting, 0.95).
        memory_monitor_interval: how often to check (``"100ms"``).
        **worker_kwargs: more keyword arguments for ``Worker`` (JSON-able).

    Raises:
        ValueError: an option has a value we cannot use, named in the message.
        TypeError: an unknown or non-JSON-able worker keyword argument.
    """

    #: Seconds between SIGTERM and SIGKILL when the memory monitor stops a worker.
    memory_terminate_grace: float = 1.0

    def __init__(self, scheduler_ip: str | None = None, scheduler_port: int | None = None,
                 scheduler_file: str | None = None, worker_port: int = 0,
                 nthreads: int | None = None, ncores: int | None = None, loop=None,
                 local_directory: str | None = None, services: dict | None = None,
                 name: Any = None, memory_limit: Any = "auto", reconnect: bool = True,
                 validate: bool = False, quiet: bool = False, resources: dict | None = None,
                 silence_logs=None, death_timeout: Any = None, preload=(), preload_argv=[],  # noqa: B006
                 security=None, contact_address: str | None = None,
                 listen_address: str | None = None, worker_class=None,
                 env: dict[str, str] | None = None, interface: str | None = None,
                 host: str | None = None, port: int | None = None, protocol: str | None = None,
                 memory_terminate_fraction: Any = FROM_CONFIG,  # worker.memory.terminate (0.95)
                 memory_monitor_interval: Any = "100ms", preload_nanny=None, preload_nanny_argv=None,
                 **worker_kwargs):
        super().__init__()
        refuse_unsupported("Nanny", UNSUPPORTED, services=(services, None))
        self._info = logger.debug if quiet else logger.info
        silence_logs_level = apply_silence_logs(silence_logs, "Nanny")
        if protocol not in (None, "tcp", "tls"):
            raise ValueError(f"protocol={protocol!r}: a Nanny needs 'tcp' or 'tls' (its worker is "
                             "another process)")
        if scheduler_ip is None and scheduler_file is None:
            raise ValueError("Nanny needs the scheduler's address or scheduler_file")
        self._no_tls = security is False  # opted into plain TCP (scheduler files)
        security = resolve_security(security, owner="Nanny")
        self._set_security(security, "worker")
        self._security_given = security is not None
        default_proto = "tls" if security is not None and security.has_tls("worker") else "tcp"
        if scheduler_ip is not None and "://" not in scheduler_ip:
            scheduler_ip = (f"{default_proto}://{unparse_host_port(scheduler_ip, scheduler_port)}"
                            if scheduler_port is not None else f"{default_proto}://{scheduler_ip}")
        if scheduler_ip is not None:
            _check_network_address(scheduler_ip, "scheduler address")
        unknown = set(worker_kwargs) - _worker_parameters()
        if unknown:
            raise TypeError(f"Nanny() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        owned = set(worker_kwargs) & _NANNY_OWNED
        if owned:
            raise TypeError(f"Nanny() sets these Worker options itself: {', '.join(sorted(owned))}")
        nthreads = nthreads or ncores or os.cpu_count() or 1
        if not isinstance(nthreads, int) or nthreads < 1:
            raise ValueError(f"nthreads={nthreads!r}: expected a positive integer")
        if memory_terminate_fraction is FROM_CONFIG:
            memory_terminate_fraction = setting("worker.memory.terminate")
        if memory_terminate_fraction in (None, False):
            memory_terminate_fraction = None
        elif (not isinstance(memory_terminate_fraction, (int, float))
              or isinstance(memory_terminate_fraction, bool) or memory_terminate_fraction <= 0):
            raise ValueError(f"memory_terminate_fraction={memory_terminate_fraction!r}: "
                             "expected a positive number, or None/False/0 to never terminate")
        interval = parse_timedelta(memory_monitor_interval)
        if interval is None or interval <= 0:
            raise ValueError(f"memory_monitor_interval={memory_monitor_interval!r}: "
                             "expected a positive duration such as '100ms'")
        if listen_address is not None:
            proto, _ = parse_address(listen_address)
            if proto not in ("tcp", "tls"):
                raise ValueError(f"listen_address={listen_address!r}: expected tls://host:port "
                                 "or tcp://host:port")
        self.scheduler_addr = scheduler_ip
        self.scheduler_file = scheduler_file
        self.worker_port = worker_port or 0
        self.nthreads = nthreads
        self.name = name
        self.memory_limit = parse_memory_limit(memory_limit, nthreads)
        self.memory_terminate_fraction = memory_terminate_fraction
        self.memory_monitor_interval = interval
        self.death_timeout = parse_timedelta(death_timeout)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.interface = interface
        self.host = host
        self.port = port or 0
        self.protocol = protocol
        self.contact_address = contact_address
        self.listen_address_for_worker = listen_address
        self.worker_class = self._worker_class_path(worker_class)
        self.auto_restart = True
        self.process: WorkerProcess | None = None
        self._worker_options: dict[str, Any] = {
            "reconnect": reconnect, "validate": validate, "resources": dict(resources or {}),
            "death_timeout": death_timeout, "local_directory": local_directory,
            **({"services": services} if services is not None else {}),
            **({"preload": list(preload)} if preload else {}),
            **({"preload_argv": list(preload_argv)} if preload_argv else {}),
            **({"contact_address": contact_address} if contact_address is not None else {}),
            **({"silence_logs": silence_logs_level} if silence_logs_level is not None else {}),
            **worker_kwargs,
        }
        try:
            json.dumps(self._worker_options)
        except TypeError as e:
            raise TypeError(f"Nanny: worker options must be JSON-serialisable to reach the "
                            f"worker process: {e}") from None
        self._lock: asyncio.Lock | None = None
        self._graceful = False
        self._close_task: asyncio.Task | None = None
        self._memory_victim: WorkerProcess | None = None
        self._listen_host: str | None = None
        self._listen_protocol = protocol or "tcp"
        self._statm: tuple[int, int] | None = None  # (pid, descriptor of /proc/<pid>/statm)
        self._monitor_failing = False
        self.handlers.update({
            "instantiate": self.instantiate,
            "kill": self.kill,
            "restart": self.restart,
            "close": self.close,
            "close_gracefully": self.close_gracefully,
            "memory_monitor": self.memory_monitor,
            "terminate": self.close,
            "plugin_add": self.plugin_add,
            "plugin_remove": self.plugin_remove,
        })
        #: Nanny plugins: ``{name: plugin}`` (``Client.register_plugin(NannyPlugin)``).
        self.plugins: dict[str, Any] = {}
        self.preloads = process_preloads(self, preload_nanny, preload_nanny_argv, "Nanny")

    @staticmethod
    def _worker_class_path(worker_class) -> str | None:
        if worker_class is None or worker_class is Worker:
            return None
        if isinstance(worker_class, str):
            if "." not in worker_class:
                raise ValueError(f"worker_class={worker_class!r}: expected 'module.Class'")
            return worker_class
        if isinstance(worker_class, type) and issubclass(worker_class, Worker):
            if "<locals>" in worker_class.__qualname__ or worker_class.__module__ == "__main__":
                raise ValueError(f"worker_class={worker_class!r}: must be importable by the worker "
                                 "process (defined at module level)")
            return f"{worker_class.__module__}.{worker_class.__qualname__}"
        raise ValueError(f"worker_class={worker_class!r}: expected a Worker subclass or 'module.Class'")

    # ------------------------------------------------------------------ properties

    @property
    def worker_address(self) -> str | None:
        """The address of the running worker (``None`` while there is none)."""
        wp = self.process
        return wp.worker_address if wp is not None and wp.is_alive() else None

    @property
    def worker_dir(self) -> str | None:
        return self.local_directory

    @property
    def local_directory(self) -> str | None:
        """The running worker's directory (``None`` before it has started)."""
        wp = self.process
        return wp.info.get("local_directory") if wp is not None and wp.info else None

    @property
    def local_dir(self) -> str | None:
        return self.local_directory

    @property
    def pid(self) -> int | None:
        """Process id of the (latest) worker process."""
        return self.process.pid if self.process is not None else None

    def identity(self) -> dict:
        return {"type": "Nanny", "address": self.address, "worker": self.worker_address,
                "name": self.name, "pid": self.pid}

    def __repr__(self) -> str:
        addr = self.listeners[0].contact_address if self.listeners else "not started"
        return (f"<Nanny {addr!r} name={self.name!r} status={self.status} "
                f"worker={self.worker_address!r} pid={self.pid}>")

    # ------------------------------------------------------------------ lifecycle

    async def start_unsafe(self) -> None:
        from_file = self.scheduler_addr is None
        await self._locate_scheduler("worker")
        if from_file:
            _check_network_address(self.scheduler_addr,
                                   f"scheduler address from {self.scheduler_file}")
        self._listen_protocol = self.protocol or parse_address(self.scheduler_addr)[0]
        host = listen_host(self.host, self.interface, self.scheduler_addr)
        self._listen_host = host
        await self.listen(f"{self._listen_protocol}://{unparse_host_port(host, self.port)}")
        if self.name is None:
            self.name = self.address
        await start_preloads(self.preloads)
        # The nanny plugins registered so far, before our worker exists (no restart needed).
        blobs = await self.rpc.call(self.scheduler_addr, "get_nanny_plugins", address=self.address)
        for pname, blob in blobs.items():
            await self._plugin_setup(pickle.loads(blob), pname)
        await self.instantiate()
        if self.memory_limit and self.memory_terminate_fraction:
            self.spawn(self._memory_monitor_loop())
        self._info("Nanny %s runs worker %s (name=%r, pid=%s)", self.address,
                    self.worker_address, self.name, self.pid)

    # ------------------------------------------------------------------ plugins

    async def _plugin_setup(self, plugin: Any, name: str) -> None:
        old = self.plugins.pop(name, None)
        if old is not None:
            await self._plugin_call(old, "teardown")
        self.plugins[name] = plugin
        await self._plugin_call(plugin, "setup")

    async def _plugin_call(self, plugin: Any, hook: str) -> None:
        fn = getattr(plugin, hook, None)
        if fn is not None:
            result = fn(nanny=self)
            if asyncio.iscoroutine(result):
                await result

    async def plugin_add(self, plugin: bytes | Any = None, name: str | None = None) -> dict:
        """Set up a nanny plugin (replacing one of the same name); with its ``restart``
        attribute, restart the worker afterwards.  ``setup``'s errors are raised."""
        if isinstance(plugin, (bytes, bytearray, memoryview)):
            plugin = pickle.loads(plugin)
        await self._plugin_setup(plugin, name or plugin_name(plugin))
        if getattr(plugin, "restart", False) and self.process is not None:
            await self.restart()
        return {"status": "OK"}

    async def plugin_remove(self, name: str) -> dict:
        """Remove a nanny plugin (its ``teardown(nanny)`` runs); unknown names are ignored."""
        plugin = self.plugins.pop(name, None)
        if plugin is not None:
            await self._plugin_call(plugin, "teardown")
        return {"status": "OK"}

    def _child_options(self) -> dict[str, Any]:
        protocol = self._listen_protocol
        if self.listen_address_for_worker is not None:
            protocol, location = parse_address(self.listen_address_for_worker)
            host, port = parse_host_port(location, 0)
        else:
            host, port = self._listen_host, self.worker_port
        return {**self._worker_options, "nthreads": self.nthreads, "name": self.name,
                "memory_limit": self.memory_limit, "nanny": self.address,
                "host": host, "port": port, "protocol": protocol}

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def instantiate(self) -> str:
        """Start the worker process; return ``"running"`` once it is registered with the scheduler.

        Does nothing if a worker process is already running.

        Raises:
            WorkerProcessError: the worker failed to start (the reason is in the message).
            ClusterTimeoutError: it did not register within ``death_timeout`` (60 s).
            RuntimeError: the nanny is closing.
        """
        async with self._get_lock():
            return await self._instantiate_unlocked()

    async def _instantiate_unlocked(self, timeout: float | None = None) -> str:
        if self.status not in (Status.starting, Status.running):
            raise RuntimeError(f"Nanny {self.name!r} is {self.status}; not starting a worker")
        if self.process is not None and self.process.is_alive():
            return Status.running
        wp = WorkerProcess(self.scheduler_addr, self._child_options(), env=self.env,
                           report_ready=True, worker_class=self.worker_class,
                           security=self.security)
        self.process = wp
        try:
            await wp.start()
            if self.status not in (Status.starting, Status.running):
                raise RuntimeError(f"Nanny {self.name!r} closed while its worker started")
            await wp.wait_ready(timeout or (self.death_timeout or 60.0) + 5.0)
        except BaseException:
            wp.stopping = True
            await wp.close(timeout=1.0)
            raise
        self.spawn(self._watch(wp))
        return Status.running

    async def _watch(self, wp: WorkerProcess) -> None:
        """Wait for ``wp`` to exit; unless that was on purpose, report it and start another."""
        code = await wp.wait()
        if wp.stopping or self.status not in (Status.starting, Status.running) or wp is not self.process:
            return
        if self._graceful:
            self._info("worker %s (name=%r) exited with code %s after close_gracefully; "
                        "closing the nanny", wp.worker_address, self.name, code)
            self._close_task = asyncio.ensure_future(self.close(reason="nanny-close-gracefully"))
            return
        if code == 0 and wp is not self._memory_victim:
            # The worker closed itself (the scheduler told it to, or it gave up on
            # the scheduler) and has said goodbye: that is the end of this nanny too.
            self._info("worker %s (name=%r) closed itself; closing the nanny",
                        wp.worker_address, self.name)
            self._close_task = asyncio.ensure_future(self.close(reason="worker-closed"))
            return
        if not self.auto_restart:
            logger.warning("worker %s (name=%r, pid=%s) exited with code %s; auto_restart is off",
                           wp.worker_address, self.name, wp.pid, code)
            await self._unregister(wp.worker_address)
            return
        if wp is self._memory_victim:
            self._info("worker %s (name=%r) terminated for memory use; restarting it",
                        wp.worker_address, self.name)
        elif code == RESTART_EXIT_CODE:
            self._info("worker %s (name=%r) closed asking for a fresh worker; restarting it",
                        wp.worker_address, self.name)
        else:
            logger.warning("worker %s (name=%r, pid=%s) exited unexpectedly with code %s; "
                           "restarting it", wp.worker_address, self.name, wp.pid, code)
        await self._unregister(wp.worker_address)
        delay = 0.1
        for attempt in range(3):
            async with self._get_lock():
                if (self.process is not wp or self.status not in (Status.starting, Status.running)
                        or not self.auto_restart):
                    return  # someone else started (or stopped) a worker meanwhile
                try:
                    await self._instantiate_unlocked()
                    return
                except Exception as e:
                    if self.status not in (Status.starting, Status.running):
                        return
                    self.process = wp  # keep our claim for the next attempt
                    logger.warning("could not restart worker %r (attempt %d): %s", self.name,
                                   attempt + 1, e)
            await asyncio.sleep(delay)
            delay *= 4
        logger.error("Nanny %s could not restart its worker %r; closing", self.address, self.name)
        self._close_task = asyncio.ensure_future(self.close(reason="nanny-restart-failed"))

    async def _unregister(self, address: str | None, safe: bool = False, timeout: float = 5.0) -> None:
        """Tell the scheduler that the worker at ``address`` is gone."""
        if address is None or self.scheduler_addr is None:
            return
        try:
            await asyncio.wait_for(self._call_scheduler(
                {"op": "unregister", "address": address, "safe": safe}), timeout)
        except (CommError, OSError, asyncio.TimeoutError) as e:
            logger.warning("could not tell the scheduler %s that worker %s is gone: %r",
                           self.scheduler_addr, address, e)

    async def _call_scheduler(self, msg: dict) -> Any:
        # Not ``self.rpc.call``: its own ``address`` parameter would clash with
        # the ``address`` argument of ``unregister``.
        async with self.rpc.connection(self.scheduler_addr) as comm:
            await comm.write(msg)
            answer = await comm.read()
        return unpack_reply(answer, self.scheduler_addr)

    async def kill(self, timeout: float = 2) -> str:
        """Stop the worker process without restarting it, after telling the scheduler.

        Returns ``"OK"`` once the process is gone and the scheduler has removed
        the worker (its tasks are rescheduled; they are not blamed for it).
        """
        async with self._get_lock():
            await self._kill_unlocked(timeout)
        return "OK"

    async def _kill_unlocked(self, timeout: float) -> None:
        wp = self.process
        if wp is None or (wp.stopping and not wp.is_alive()):
            return
        # Also for a process that just died and whose watcher has not yet run:
        # the scheduler must forget it before a worker of the same name registers.
        wp.stopping = True
        await self._unregister(wp.worker_address, safe=True, timeout=max(timeout, 1.0))
        await wp.close(timeout=timeout)

    async def restart(self, timeout: float = 30) -> str:
        """Replace the worker process by a new one with the same name; return ``"OK"``.

        Raises:
            ClusterTimeoutError: the new worker did not register within ``timeout`` seconds.
            WorkerProcessError: the new worker failed to start.
        """
        timeout = parse_timedelta(timeout) or 30.0
        deadline = time.monotonic() + timeout
        async with self._get_lock():
            await self._kill_unlocked(min(2.0, timeout / 2))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterTimeoutError(f"Nanny {self.name!r}: restart did not finish within {timeout:g}s")
            await self._instantiate_unlocked(timeout=remaining)
        return "OK"

    def close_gracefully(self) -> str:
        """Do not restart the worker any more; when it exits, the nanny closes too."""
        self._graceful = True
        self.auto_restart = False
        return "OK"

    async def close(self, timeout: float = 5, reason: str = "nanny-close", **kwargs) -> str:
        """Stop the worker (stdin EOF, then SIGTERM, then SIGKILL) and the nanny.

        The worker tells the scheduler itself as it closes; one that has to be
        killed is noticed by the scheduler when its connection breaks.
        """
        if self.status in (Status.closing, Status.closed):
            await self.finished()
            return "OK"
        self.status = Status.closing
        self.auto_restart = False
        self._info("Nanny %s closing (%s)", self.listeners[0].contact_address if self.listeners
                    else "not listening", reason)
        wp = self.process
        if wp is not None:
            wp.stopping = True
            await wp.close(timeout=timeout)
        # A start in progress sees the closing status, stops its own child and
        # releases the lock; whatever it left running is stopped here.
        async with self._get_lock():
            wp = self.process
            if wp is not None:
                wp.stopping = True
                await wp.close(timeout=timeout)
        for pname in list(self.plugins):
            try:
                await self._plugin_call(self.plugins.pop(pname), "teardown")
            except Exception:
                logger.exception("nanny plugin %r failed in teardown", pname)
        await teardown_preloads(self.preloads)
        await self._close_listeners_and_comms()
        self._close_statm()
        self._mark_closed()
        return "OK"

    # ------------------------------------------------------------------ memory

    async def _memory_monitor_loop(self) -> None:
        while self.status in (Status.starting, Status.running):
            await asyncio.sleep(self.memory_monitor_interval)
            try:
                await self.memory_monitor()
            except Exception as e:
                # Once per failing stretch, not once per interval (10 lines a second).
                if not self._monitor_failing:
                    self._monitor_failing = True
                    if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                        logger.error("memory monitor of nanny %s cannot check its worker: %s "
                                     "(out of file descriptors); retrying every %gs",
                                     self.address, e, self.memory_monitor_interval)
                    else:
                        logger.exception("memory monitor of nanny %s failed; retrying every "
                                         "%gs", self.address, self.memory_monitor_interval)
                else:
                    logger.debug("memory monitor of nanny %s failed again: %r", self.address, e)
            else:
                if self._monitor_failing:
                    self._monitor_failing = False
                    self._info("memory monitor of nanny %s works again", self.address)

    def _close_statm(self) -> None:
        if self._statm is not None:
            os.close(self._statm[1])
            self._statm = None

    def _rss(self, pid: int) -> int | None:
        """Resident bytes of process ``pid`` (``None``: it has exited).

        Read through a descriptor of ``/proc/<pid>/statm`` kept open while the
        process lives, so no descriptor is needed per check; elsewhere (or if
        it cannot be opened) through psutil.

        Raises:
            OSError: it cannot be read (e.g. ``EMFILE`` before the first read).
        """
        if self._statm is not None and self._statm[0] != pid:
            self._close_statm()
        if self._statm is None:
            try:
                fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                if not os.path.isdir("/proc/self"):  # no procfs here
                    return self._rss_psutil(pid)
                return None
            self._statm = (pid, fd)
        try:
            fields = os.pread(self._statm[1], 256, 0).split()
        except ProcessLookupError:  # exited
            self._close_statm()
            return None
        return int(fields[1]) * _PAGE_SIZE

    @staticmethod
    def _rss_psutil(pid: int) -> int | None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            return None

    async def memory_monitor(self) -> str:
        """Check the worker's memory once; terminate and restart it if it is above its limit.

        Returns ``"terminated"`` if it stopped the worker, else ``"OK"``.
        """
        wp = self.process
        if (not self.memory_limit or not self.memory_terminate_fraction or wp is None
                or not wp.is_alive() or wp.stopping or wp is self._memory_victim):
            return "OK"
        try:
            rss = self._rss(wp.pid)
        except psutil.Error:  # exited meanwhile: the watcher handles it
            return "OK"
        if rss is None:  # exited meanwhile: the watcher handles it
            return "OK"
        threshold = self.memory_terminate_fraction * self.memory_limit
        if rss <= threshold:
            return "OK"
        self._memory_victim = wp
        logger.warning(
            "Worker %s (name=%r, pid=%s) exceeded its memory budget: process memory %s is above "
            "%.0f%% of memory_limit %s (%s); terminating and restarting it",
            wp.worker_address, self.name, wp.pid, format_bytes(rss),
            self.memory_terminate_fraction * 100, format_bytes(self.memory_limit),
            format_bytes(threshold))
        # Unregister first: the scheduler counts the running tasks as suspects
        # (they may be the memory hogs), which a graceful close would not.
        await self._unregister(wp.worker_address, safe=False)
        with suppress(ProcessLookupError):
            await wp.terminate(grace=self.memory_terminate_grace)
        return "terminated"


__all__ = ["Nanny", "WorkerProcessError"]
