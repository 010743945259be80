"""LocalCluster: a scheduler and workers on this machine.

The scheduler runs in this process; workers run in child processes
(``processes=True``, the default, one per core with one thread each) or as
``Worker`` objects on the same event loop (``processes=False``).  It listens on
loopback unless given another host or interface, and speaks TLS with fresh
credentials (``Security.temporary()``) unless told otherwise, so that nobody
else on a shared login node can reach it: loopback ports are open to every
user of the machine.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import math
import os
import time
from contextlib import suppress
from typing import Any

from .errors import ClusterTimeoutError
from .loop import loop_runner, sync
from .nanny import Nanny
from .plugins import check_blocked_handlers, refuse_unsupported
from .plugins import silence_logs as silence_logs_option
from .process import WorkerProcess
from .scheduler.server import Scheduler
from .security import resolve_security
from .worker import Worker

logger = logging.getLogger(__name__)


def _check_worker_options(worker_kwargs: dict, nanny: bool, worker_class: Any) -> None:
    """Refuse keyword arguments that are options neither of LocalCluster nor of a worker.

    Checked here, before anything starts: later, the error would come from a
    Nanny, or from a worker process that exits before registering.

    Raises:
        TypeError: naming the unknown options.
    """
    if worker_class is not None:
        return  # a custom worker class may take more options
    accepted = {n for n, p in inspect.signature(Worker.__init__).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if nanny:
        accepted |= {n for n, p in inspect.signature(Nanny.__init__).parameters.items()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(worker_kwargs) - accepted - {"self"})
    if unknown:
        raise TypeError(f"LocalCluster() got unexpected keyword arguments: {', '.join(unknown)} "
                        f"(neither LocalCluster options nor options of its workers)")


def _worker_classes(worker_class: Any, processes: bool) -> tuple[type, Any]:
    """``(nanny class, worker class or None)`` from LocalCluster's ``worker_class``.

    Raises:
        ValueError: naming what is accepted.
    """
    if worker_class is None or worker_class is Worker:
        return Nanny, None
    if isinstance(worker_class, type) and issubclass(worker_class, Nanny):
        if not processes:
            raise ValueError(f"worker_class={worker_class!r}: a Nanny needs processes=True")
        return worker_class, None
    if isinstance(worker_class, str) or (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
        if isinstance(worker_class, str) and not processes:
            module, _, name = worker_class.rpartition(".")
            worker_class = getattr(importlib.import_module(module), name)
        Nanny._worker_class_path(worker_class)  # raises ValueError naming what is wrong
        return Nanny, worker_class
    raise ValueError(f"worker_class={worker_class!r}: expected Nanny or a subclass, a Worker "
                     "subclass, or 'module.Class' of one")


@functools.cache
def _handler_names(kind: str) -> frozenset[str]:
    """The operations of a Scheduler or Worker (of a throwaway one: made, never started)."""
    server = Scheduler(dashboard_address=None) if kind == "scheduler" else Worker("tcp://127.0.0.1:1", nthreads=1)
    return frozenset(server.handlers) | frozenset(server.stream_handlers)


def _split_blocked_handlers(blocked: Any) -> tuple[list[str], list[str]]:
    """LocalCluster's ``blocked_handlers``: ``(the scheduler's, the workers')``.

    Raises:
        TypeError / ValueError: not a list of str, or a name neither has (with the accepted names).
    """
    if not blocked:
        return [], []
    scheduler, worker = _handler_names("scheduler"), _handler_names("worker")
    names = check_blocked_handlers(blocked, scheduler | worker, "LocalCluster")
    return [n for n in names if n in scheduler], [n for n in names if n in worker]


_warned_no_tls = False


def _warn_no_tls_once() -> None:
    """Warn (once per process) that a cluster without TLS trusts whoever reaches its ports."""
    global _warned_no_tls
    if not _warned_no_tls:
        _warned_no_tls = True
        logger.warning("LocalCluster without TLS (security=False or protocol='tcp'): anyone who "
                       "can reach its ports -- every user of this machine -- can run code as you")


class LocalCluster:
    """A scheduler and ``n_workers`` workers on this machine.

    Args:
        n_workers: number of workers (default: one per core with processes,
            else one).
        threads_per_worker: threads per worker (default: cores / workers).
        processes: workers in child processes (True) or in this process.
        nanny: supervise each worker process with a :class:`Nanny` (default:
            ``processes``); it restarts crashed workers and makes
            ``Client.restart()`` work.
        host: where the scheduler listens (default ``127.0.0.1``).
        scheduler_port: port of the scheduler (0: any free port).
        interface: listen on this network interface's address instead.
        protocol: ``"tls"`` (the default), ``"tcp"`` or ``"inproc"`` (``inproc``
            needs ``processes=False``).
        security: ``None`` (the default) or ``True``: TLS with fresh
            credentials made for this cluster (``Security.temporary()``);
            ``False``: no TLS, anyone who can reach the ports can run code as
            you; or a :class:`~cluster.runtime.security.Security`.  ``None`` with
            ``protocol="tcp"`` or ``"inproc"`` means no TLS.
        memory_limit: per-worker memory limit (see ``Worker``).
        dashboard_address: where the scheduler serves its status page and
            ``/metrics`` (default ``":8787"``, or a free port if 8787 is taken;
            ``None``: not served); see ``cluster.dashboard_link``.
        worker_dashboard_address: serve each worker's ``/metrics`` and
            ``/health`` (``":0"``: a free port each; default: not served).
        asynchronous: use the running event loop; ``await`` the cluster.
        validate: turn on state validation in the scheduler and workers.
        scheduler_kwargs: more keyword arguments for ``Scheduler``.
        blocked_handlers: operations to refuse (see :func:`cluster.runtime.plugins.block_handlers`):
            each name goes to the scheduler if it is one of its operations and to
            the workers if it is one of theirs (``["run_function", "run"]`` stops
            ``client.run_on_scheduler`` and ``client.run``); other names are refused.
        worker_class: ``Nanny`` or a subclass of it (the supervisor of each worker
            process), or a ``Worker`` subclass (or ``"module.Class"``) to run as
            the worker, in this process or in the worker processes.
        silence_logs: the level of the runtime's loggers here and in the workers
            (see :func:`cluster.runtime.plugins.silence_logs`).
        diagnostics_port: the older name of ``dashboard_address``.
        loop: ignored (the running asyncio loop, or our own loop thread, is used);
            kept for compatibility.
        start / services / worker_services / service_kwargs / scheduler_sync_interval:
            refused unless left at their defaults (the cluster always starts; we
            serve our own status page; the cluster object reads the scheduler's
            state directly).
        **worker_kwargs: more keyword arguments for each ``Worker``.

    Raises:
        ValueError: an option has a value we cannot use, named in the message.
    """

    def __init__(self, n_workers: int | None = None, threads_per_worker: int | None = None,
                 processes: bool = True, loop=None, start=None, host: str | None = None,
                 ip: str | None = None, scheduler_port: int = 0, silence_logs=None,
                 dashboard_address: Any = ":8787", worker_dashboard_address=None, diagnostics_port=None,
                 services=None, worker_services=None, service_kwargs=None,
                 asynchronous: bool = False, security=None, protocol: str | None = None,
                 blocked_handlers=None, interface: str | None = None, worker_class=None,
                 scheduler_kwargs: dict | None = None, scheduler_sync_interval=1,
                 memory_limit: Any = "auto", validate: bool = False, nanny: bool | None = None,
                 **worker_kwargs):
        refuse_unsupported(
            "LocalCluster", {
                "services": "use dashboard_address=", "worker_services": "use worker_dashboard_address=",
                "service_kwargs": "use dashboard_address=",
                "scheduler_sync_interval": "the cluster reads the scheduler's state directly",
            },
            services=(services, None),
            worker_services=(worker_services, None), service_kwargs=(service_kwargs, None),
            scheduler_sync_interval=(scheduler_sync_interval, 1))
        if start is False:
            raise TypeError("LocalCluster(start=False) is not supported; a LocalCluster always "
                            "starts (asynchronous=True: when awaited)")
        if diagnostics_port is not None:
            if dashboard_address != ":8787":
                raise TypeError("LocalCluster: give dashboard_address or its older name "
                                "diagnostics_port, not both")
            dashboard_address = diagnostics_port
        if protocol not in (None, "tcp", "tls", "inproc"):
            raise ValueError(f"protocol={protocol!r}: accepted values are 'tls', 'tcp' and 'inproc'")
        if protocol == "inproc" and processes:
            raise ValueError("protocol='inproc' needs processes=False")
        # Secure by default (where dask.distributed needs security=True): we
        # launch these servers ourselves, so we can make their credentials.
        self.security = resolve_security(security, default=protocol in (None, "tls"))
        if self.security is None and protocol != "inproc":
            _warn_no_tls_once()
        if protocol is None:
            secure = self.security is not None and (self.security.has_tls()
                                                    or self.security.require_encryption)
            protocol = "tls" if secure else "tcp"
        if protocol == "tls" and self.security is None:
            raise ValueError("protocol='tls' needs security (True, None or a Security object)")
        cores = os.cpu_count() or 1
        if n_workers is None and threads_per_worker is None:
            if processes:
                n_workers = cores
                threads_per_worker = 1
            else:
                n_workers, threads_per_worker = 1, cores
        elif n_workers is None:
            n_workers = max(1, math.ceil(cores / threads_per_worker))
        elif threads_per_worker is None:
            threads_per_worker = max(1, cores // max(n_workers, 1))
        if not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers={n_workers!r}: expected a non-negative integer")
        if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
            raise ValueError(f"threads_per_worker={threads_per_worker!r}: expected a positive integer")
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.processes = processes
        if nanny and not processes:
            raise ValueError("nanny=True needs processes=True (a nanny supervises a worker process)")
        # As in dask.distributed: worker processes are supervised by nannies, so
        # that a crashed worker comes back and Client.restart() works.
        self.nanny = processes if nanny is None else bool(nanny)
        self.nanny_class, self.worker_class = _worker_classes(worker_class, processes)
        if self.nanny_class is not Nanny:
            self.nanny = True
        _check_worker_options(worker_kwargs, self.processes and self.nanny, worker_class)
        level = silence_logs_option(silence_logs, "LocalCluster")
        if level is not None:
            worker_kwargs.setdefault("silence_logs", level)
        scheduler_blocked, worker_blocked = _split_blocked_handlers(blocked_handlers)
        if scheduler_blocked:
            scheduler_kwargs = {**(scheduler_kwargs or {}), "blocked_handlers": scheduler_blocked}
        if worker_blocked:
            worker_kwargs.setdefault("blocked_handlers", worker_blocked)
        self.asynchronous = asynchronous
        self.validate = validate
        self.host = host or ip
        self.interface = interface
        self.protocol = protocol
        self.scheduler_port = scheduler_port
        self.memory_limit = memory_limit
        self.scheduler_kwargs = dict(scheduler_kwargs or {})
        self.dashboard_address = dashboard_address
        if worker_dashboard_address is not None:
            worker_kwargs.setdefault("dashboard_address", worker_dashboard_address)
        self.worker_kwargs = worker_kwargs
        self.scheduler: Scheduler | None = None
        self.workers: dict[Any, Worker | WorkerProcess] = {}
        self._next_name = 0
        self.status = "created"
        self.loop = None
        self._uses_runner = False
        if not asynchronous:
            self.loop = loop_runner.acquire()
            self._uses_runner = True
            try:
                sync(self.loop, self._start)
            except BaseException:
                with suppress(Exception):
                    sync(self.loop, self._close)
                self._release_loop()
                raise

    def _release_loop(self) -> None:
        if self._uses_runner:
            self._uses_runner = False
            loop_runner.release()

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self):
        await self
        return self

    async def __aexit__(self, *exc) -> None:
        await self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LocalCluster({self.scheduler_address!r}, workers={len(self.workers)}, "
                f"threads_per_worker={self.threads_per_worker}, processes={self.processes})")

    def _repr_html_(self) -> str:
        from .dashboard.reprs import local_cluster_repr_html

        return local_cluster_repr_html(self)

    @property
    def scheduler_address(self) -> str | None:
        return self.scheduler.address if self.scheduler is not None and self.scheduler.listeners else None

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's status page (``None`` if not served)."""
        return self.scheduler.dashboard_link if self.scheduler is not None else None

    async def _start(self):
        if self.status == "running":
            return self
        self.status = "starting"
        self.loop = asyncio.get_running_loop()
        kwargs = {"host": self.host, "interface": self.interface, "port": self.scheduler_port,
                  "protocol": self.protocol, "validate": self.validate,
                  "security": self.security if self.security is not None else False,
                  "dashboard_address": self.dashboard_address, **self.scheduler_kwargs}
        self.scheduler = await Scheduler(**kwargs)
        await self._scale(self.n_workers)
        self.status = "running"
        return self

    def _worker_options(self, name: Any) -> dict:
        return {"nthreads": self.threads_per_worker, "name": name, "memory_limit": self.memory_limit,
                "validate": self.validate, **self.worker_kwargs}

    async def _prune(self) -> None:
        """Forget workers that have gone (retired at their lifetime, crashed)."""
        for name, w in list(self.workers.items()):
            gone = (not w.is_alive()) if isinstance(w, WorkerProcess) else w.status in ("closing", "closed")
            if gone:
                del self.workers[name]
                await w.close()

    async def _scale(self, n: int, timeout: float = 60.0) -> None:
        await self._prune()
        started = []
        new_names = set()
        while len(self.workers) < n:
            name = self._next_name
            self._next_name += 1
            opts = self._worker_options(name)
            security = self.security if self.security is not None else False
            if self.processes and self.nanny:
                if self.worker_class is not None:
                    opts["worker_class"] = self.worker_class
                w = self.nanny_class(self.scheduler.address, security=security, **opts)
                started.append(w._start())
            elif self.processes:
                w = WorkerProcess(self.scheduler.address, opts, security=self.security,
                                  worker_class=Nanny._worker_class_path(self.worker_class))
                started.append(w.start())
            else:
                w = (self.worker_class or Worker)(self.scheduler.address, security=security, **opts)
                started.append(w._start())
            self.workers[name] = w
            new_names.add(name)
        if started:
            await asyncio.gather(*started)
            await self._wait_for_names(new_names, timeout)
        if len(self.workers) > n:
            doomed = sorted(self.workers, key=str)[n:]
            await asyncio.gather(*(self._stop_worker(name) for name in doomed))

    async def _wait_for_names(self, names: set, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            registered = {ws.name for ws in self.scheduler.state.workers.values()}
            if names <= registered:
                return
            dead = [nm for nm in names - registered
                    if isinstance(self.workers.get(nm), WorkerProcess) and not self.workers[nm].is_alive()]
            if dead:
                raise RuntimeError(f"worker processes {dead} exited before registering")
            if time.monotonic() > deadline:
                raise ClusterTimeoutError(f"workers {sorted(names - registered, key=str)} did not register within {timeout}s")
            await asyncio.sleep(0.02)

    async def _stop_worker(self, name: Any) -> None:
        w = self.workers.pop(name)
        address = next((a for a, ws in self.scheduler.state.workers.items() if ws.name == name), None)
        if isinstance(w, WorkerProcess):
            if address is not None:
                await self.scheduler.remove_worker(address, safe=True, close=True)
            await w.close()
        else:
            await w.close()

    def scale(self, n: int):
        """Run ``n`` workers: start new ones or stop the most recently started."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"scale(n={n!r}): expected a non-negative integer")
        self.n_workers = n
        if self.asynchronous:
            return self._scale(n)
        return sync(self.loop, self._scale, n)

    def wait_for_workers(self, n_workers: int, timeout: float | None = None):
        """Wait until ``n_workers`` workers are registered with the scheduler."""
        async def waiter():
            deadline = None if timeout is None else time.monotonic() + timeout
            while len(self.scheduler.state.workers) < n_workers:
                if deadline is not None and time.monotonic() > deadline:
                    raise ClusterTimeoutError(f"{n_workers} workers not there after {timeout}s")
                await asyncio.sleep(0.02)

        return waiter() if self.asynchronous else sync(self.loop, waiter)

    def close(self, timeout: float | None = None):
        """Stop the workers and the scheduler."""
        if self.asynchronous:
            return self._close()
        if self.status == "closed":
            self._release_loop()  # e.g. closed already by Client.shutdown()
            return None
        try:
            sync(self.loop, self._close, timeout=timeout)
        finally:
            self._release_loop()
        return None

    async def _close(self) -> None:
        if self.status == "closed":
            return
        self.status = "closing"
        await asyncio.gather(*(self._stop_worker(name) for name in list(self.workers)),
                             return_exceptions=True)
        if self.scheduler is not None:
            await self.scheduler.close()
        self.status = "closed"

    def __del__(self) -> None:
        if getattr(self, "status", "closed") != "closed" and not self.asynchronous and self.loop is not None:
            with suppress(Exception):
                self.close(timeout=10)
