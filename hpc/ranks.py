"""What a rank runs: the scheduler, a worker, or the user's script; and how each one ends.

Theory of operation
-------------------
The servers of a rank run on the process's background event loop
(:data:`cluster.runtime.loop.loop_runner`), the same loop a synchronous ``Client``
uses, so a script running on the scheduler's rank shares it with the
scheduler.  The main thread owns MPI (:class:`cluster.hpc.mpi.Job`, polled, never
blocking) and the signals (:class:`SignalCatcher`), and is the only thread
that decides when the rank ends.

Scheduler rank (:func:`serve_scheduler`): start the
:class:`~cluster.runtime.scheduler.server.Scheduler`, broadcast its address (or the reason
it did not start), then either run the user's script -- once every worker
rank's worker has registered, or the startup deadline passed -- or, in
service mode, wait until the scheduler closes (``client.shutdown()``,
``idle_timeout``) or a signal arrives.  Then close the scheduler with
``close_workers=True``, post the *done* barrier and meet the other ranks at
the final one.

Worker rank (:func:`serve_worker`): post the *done* barrier at once, start a
:class:`~cluster.runtime.nanny.Nanny` (or an in-process
:class:`~cluster.runtime.worker.Worker`) named after the rank, and probe the
scheduler's port every second.  The rank ends, and closes its server, when

* the *done* barrier completes: the scheduler closed on purpose -- status 0;
* SIGTERM/SIGINT arrives: the worker retires gracefully (bounded by
  :data:`RETIRE_TIMEOUT`) -- status 128 + signal number;
* the scheduler has been unreachable for ``death_timeout`` seconds without
  the barrier completing: the scheduler rank died or hangs -- status 1.

A worker that retires on its own (``lifetime``) leaves the rank waiting for
one of these, so its exit does not depend on a collective the others are not
in.  Whatever happens, the final barrier has a deadline (:mod:`cluster.hpc.mpi`).

A nanny's worker process is a child of its rank; it closes itself when the
rank dies (its stdin pipe reaches end-of-file), so nothing outlives the job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.runtime.comm import connect
from cluster.runtime.core import Status
from cluster.runtime.errors import ClusterError
from cluster.runtime.loop import loop_runner, sync
from cluster.runtime.security import Security
from cluster.runtime.utils import get_ip_interface

from .mpi import Job
from .roles import scheduler_host

if TYPE_CHECKING:
    from cluster.runtime.nanny import Nanny
    from cluster.runtime.scheduler.server import Scheduler
    from cluster.runtime.worker import Worker

# Each role imports the servers it runs (a worker rank needs no Scheduler, and
# no rank needs the Client): see the functions below.

#: What a script's ``Client()`` reads the scheduler's address from
#: (``runtime.client.ENV_ADDRESS``, not imported: the Client is not needed here).
ENV_ADDRESS = "CLUSTER_SCHEDULER_ADDRESS"

logger = logging.getLogger(__name__)

#: Exit status of a rank that failed (its scheduler did not start, was lost, ...).
EXIT_FAILURE = 1
#: Exit status of a script that could not be opened (as ``python missing.py``).
EXIT_NO_SCRIPT = 2

#: Seconds a worker gets to retire gracefully (move its unique data away) after a signal.
RETIRE_TIMEOUT = 10.0
#: Seconds a nanny's worker process gets to close before it is terminated, then killed.
CLOSE_TIMEOUT = 3.0
#: Seconds the scheduler rank waits for the other ranks at the final barrier.
FINISH_TIMEOUT = 30.0
#: Extra seconds a worker rank waits there, so that rank 0 aborts first (with its status).
FINISH_MARGIN = 15.0
#: Seconds the scheduler gets to close (telling its workers to close too).
SCHEDULER_CLOSE_TIMEOUT = 15.0


@dataclass
class ClusterOptions:
    """The options of a launch, shared by every rank.

    Attributes:
        nthreads: threads per worker (``None``: this rank's share of the node's cores).
        memory_limit: per-worker memory limit (see ``runtime.worker.parse_memory_limit``).
        local_directory: where workers put their files.
        interface: network interface every server listens on (``"ib0"``).
        host: host the scheduler listens on.
        protocol: ``"tcp"`` for plain TCP (turns TLS off), ``None``: the default.
        tls: encrypt and authenticate with per-job credentials that rank 0
            makes and sends over MPI (see :attr:`secure`).
        scheduler_port: the scheduler's port (0: any free port).
        scheduler_file: the scheduler writes its address there (JSON).
        name: prefix of the workers' names.
        nanny: supervise each worker with a nanny (restarts it when it dies).
        lifetime / lifetime_stagger / lifetime_restart: worker lifetime (seconds).
        resources: abstract resources of every worker, e.g. ``{"GPU": 2}``.
        death_timeout: seconds a worker rank tolerates an unreachable scheduler.
        idle_timeout: the scheduler closes after this long without work.
        startup_timeout: seconds for every rank to start, and for the workers
            to register before the script runs anyway.
        nworkers: number of workers without MPI (``None``: one per core).
    """

    nthreads: int | None = None
    memory_limit: Any = "auto"
    local_directory: str | None = None
    interface: str | None = None
    host: str | None = None
    protocol: str | None = None
    scheduler_port: int = 0
    scheduler_file: str | None = None
    name: str | None = None
    nanny: bool = True
    lifetime: float | None = None
    lifetime_stagger: float | None = None
    lifetime_restart: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    death_timeout: float = 20.0
    idle_timeout: float | None = None
    startup_timeout: float = 120.0
    nworkers: int | None = None
    tls: bool = True

    @property
    def secure(self) -> bool:
        """TLS for this launch: on unless ``--no-tls`` or ``--protocol tcp`` asked for plain TCP."""
        return self.tls and self.protocol != "tcp"

    def worker_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every ``Nanny``/``Worker`` (without name and nthreads)."""
        kwargs: dict[str, Any] = {
            "memory_limit": self.memory_limit,
            "death_timeout": self.death_timeout,
        }
        if self.local_directory:
            kwargs["local_directory"] = self.local_directory
        if self.resources:
            kwargs["resources"] = dict(self.resources)
        if self.interface:
            kwargs["interface"] = self.interface
        if self.protocol:
            kwargs["protocol"] = self.protocol
        if self.lifetime:
            kwargs["lifetime"] = self.lifetime
            if self.lifetime_stagger:
                kwargs["lifetime_stagger"] = self.lifetime_stagger
            if self.lifetime_restart:
                kwargs["lifetime_restart"] = True
        return kwargs

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the ``Scheduler`` (without host and interface)."""
        kwargs: dict[str, Any] = {"port": self.scheduler_port}
        if self.protocol:
            kwargs["protocol"] = self.protocol
        if self.scheduler_file:
            kwargs["scheduler_file"] = self.scheduler_file
        if self.idle_timeout:
            kwargs["idle_timeout"] = self.idle_timeout
        return kwargs


# ----------------------------------------------------------------------------- signals


class SignalCatcher:
    """Records SIGTERM/SIGINT for the main thread; while a script runs, also interrupts it.

    Outside a script the handler only records the signal (``signum``, and
    ``event`` is set) and the main thread's loops notice it.  With
    ``raise_in_main`` set (the user's script is running), SIGINT raises
    ``KeyboardInterrupt`` and SIGTERM raises ``SystemExit(143)`` in the
    script, so that its ``finally`` blocks run.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()
        self.raise_in_main = False
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalCatcher:
        """Install the handlers (only possible in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            with suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()

    @property
    def status(self) -> int | None:
        """``128 + signal number`` of the first signal, or ``None``."""
        return None if self.signum is None else 128 + self.signum

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking up early on a signal or :meth:`wake`;
        whether a signal arrived."""
        if self.event.wait(timeout) and self.signum is None:
            self.event.clear()  # a wake() call, not a signal
        return self.signum is not None

    def wake(self) -> None:
        """End a :meth:`wait` now (from any thread) without a signal."""
        self.event.set()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()
        logger.warning("received %s; shutting down", signal.Signals(signum).name)
        if self.raise_in_main:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- the script


def exit_status(code: Any) -> int:
    """The process exit status of ``sys.exit(code)``: None is 0, an int is itself, else 1 (printed)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")
    return EXIT_FAILURE


def _print_traceback(exc: BaseException, path: str) -> None:
    """Print ``exc`` as Python would for ``python path``: from the script's first frame on."""
    script = os.path.abspath(path)
    tb = exc.__traceback__
    start = tb
    while start is not None and os.path.abspath(start.tb_frame.f_code.co_filename) != script:
        start = start.tb_next
    traceback.print_exception(type(exc), exc, start if start is not None else tb, file=sys.stderr)


def run_script(path: str, args: Sequence[str], signals: SignalCatcher | None = None,
               environ: Mapping[str, str] | None = None) -> int:
    """Run a Python script in this process as ``__main__`` and return its exit status.

    ``sys.argv`` is ``[path, *args]`` and the script's directory comes first
    on ``sys.path`` while it runs, as with ``python path args...``.

    Args:
        path: the script.
        args: its arguments.
        signals: interrupt the script on SIGTERM/SIGINT (see :class:`SignalCatcher`).
        environ: variables set in ``os.environ`` while the script runs.

    Returns:
        0 when it ran to the end, its ``sys.exit`` status, 1 after an uncaught
        exception (whose traceback goes to stderr), 130 after
        ``KeyboardInterrupt``, 2 when it cannot be opened.
    """
    if not os.path.isfile(path):
        sys.stderr.write(f"{sys.executable}: can't open file {path!r}: no such file\n")
        return EXIT_NO_SCRIPT
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_env = {k: os.environ.get(k) for k in (environ or {})}
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    os.environ.update(environ or {})
    try:
        if signals is not None:
            signals.raise_in_main = True
        try:
            runpy.run_path(path, run_name="__main__")
            status = 0
        finally:
            if signals is not None:
                signals.raise_in_main = False
    except SystemExit as e:
        status = exit_status(e.code)
    except KeyboardInterrupt:
        sys.stderr.write("KeyboardInterrupt\n")
        status = 130
    except BaseException as e:  # the user's error: report it the way Python would
        _print_traceback(e, path)
        status = EXIT_FAILURE
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for stream in (sys.stdout, sys.stderr):
            with suppress(Exception):
                stream.flush()
    return status


# ----------------------------------------------------------------------------- helpers


def default_nthreads(local_workers: int) -> int:
    """Threads per worker when ``--nthreads`` is not given.

    A rank bound to some cores (``sched_getaffinity`` smaller than the
    machine) uses those; otherwise the node's cores are shared among the
    ``local_workers`` worker ranks on it.
    """
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        usable = cores
    if usable < cores:
        return max(1, usable)
    return max(1, cores // max(1, local_workers))


def routable_address(processor_names: Sequence[str], me: str) -> str:
    """This node's address that the other nodes of the job can reach.

    The local address that routes to another rank's node, else the address of
    our host name.
    """
    for name in processor_names:
        if name == me:
            continue
        try:
            ip = socket.gethostbyname(name)
        except OSError:
            continue
        from cluster.runtime.scheduler.server import get_ip_for

        local = get_ip_for(ip)
        if not local.startswith("127."):
            return local
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        logger.warning("cannot find a routable address for this node; the scheduler listens on "
                       "loopback, which other nodes cannot reach (pass --interface or --host)")
        return "127.0.0.1"


# ----------------------------------------------------------------------------- scheduler rank


async def _registered_names(scheduler: Scheduler) -> set[str]:
    return {str(ws.name) for ws in scheduler.state.workers.values()}


def wait_for_workers(loop: asyncio.AbstractEventLoop, scheduler: Scheduler, names: set[str],
                     timeout: float, signals: SignalCatcher | None) -> set[str]:
    """Wait until workers of all ``names`` registered, a signal arrives or ``timeout`` passes.

    Returns:
        The names still missing (empty: all there).
    """
    deadline = time.monotonic() + timeout
    missing = set(names)
    while True:
        missing = names - sync(loop, _registered_names, scheduler, timeout=10)
        if not missing or time.monotonic() >= deadline:
            return missing
        if signals is not None and signals.signum is not None:
            return missing
        if signals is not None:
            signals.wait(0.05)
        else:
            time.sleep(0.05)  # polling interval of the registration check


def choose_scheduler_host(opts: ClusterOptions, size: int, processor_names: Sequence[str],
                          me: str) -> str:
    """Where the scheduler of an MPI job listens (see :func:`cluster.hpc.roles.scheduler_host`).

    Raises:
        ValueError: ``opts.interface`` does not exist or has no IPv4 address.
    """
    interface_address = get_ip_interface(opts.interface) if opts.interface else None
    host = scheduler_host(size, processor_names, host=opts.host, interface_address=interface_address)
    return host if host is not None else routable_address(processor_names, me)


def serve_scheduler(job: Job, opts: ClusterOptions, processor_names: Sequence[str],
                    worker_names: set[str], signals: SignalCatcher, script: str | None = None,
                    script_args: Sequence[str] = (), announce: bool = True,
                    finish_timeout: float = FINISH_TIMEOUT) -> int:
    """Run the scheduler rank (rank 0) to the end; return its status (or abort the job).

    Args:
        job: the MPI job (rank 0).
        opts: the launch options.
        processor_names: every rank's processor name.
        worker_names: the names of the workers the worker ranks start.
        signals: installed signal catcher.
        script: run this script once the workers are there (``None``: service mode).
        script_args: the script's arguments.
        announce: in service mode without a scheduler file, print the address.
        finish_timeout: seconds to wait for the other ranks at the end.

    Returns:
        The script's exit status (script mode), 0 once the scheduler closed
        (service mode), 128 + signal number after a signal, 1 or 2 if the
        scheduler or the script could not start.  Every rank of the job
        exits with a non-zero one (see :meth:`Job.finish`).
    """
    loop = loop_runner.acquire()
    scheduler: Scheduler | None = None
    try:
        error, status = None, 0
        if script is not None and not os.path.isfile(script):
            error, status = f"cannot open the script {script!r}: no such file", EXIT_NO_SCRIPT
        else:
            try:
                host = choose_scheduler_host(opts, job.size, processor_names, processor_names[job.rank])
                # Fresh credentials for this job, made here and sent over MPI:
                # never written where other users (or other jobs) could read them.
                security = Security.temporary() if opts.secure else None

                from cluster.runtime.scheduler.server import Scheduler

                async def start() -> Scheduler:
                    return await Scheduler(host=host, security=security, **opts.scheduler_kwargs())

                scheduler = sync(loop, start, timeout=opts.startup_timeout)
            except Exception as e:
                error, status = f"the scheduler did not start: {e}", EXIT_FAILURE
        if error:
            job.bcast({"error": error}, opts.startup_timeout)
        else:
            job.bcast({"address": scheduler.address,
                       "security": security.to_dict(roles=("worker", "client")) if security else None},
                      opts.startup_timeout)
        if error:
            logger.error("%s", error)
            return job.finish(status, finish_timeout)
        address = scheduler.address
        logger.info("scheduler at %s; %d worker ranks", address, len(worker_names))
        try:
            if script is not None:
                status = _run_script_on_cluster(loop, scheduler, worker_names, opts, signals,
                                                script, script_args)
            else:
                if announce and not opts.scheduler_file:
                    sys.stdout.write(f"Scheduler at {address}\n")
                    sys.stdout.flush()
                while scheduler.status not in (Status.closed, Status.failed) and signals.signum is None:
                    signals.wait(0.1)
                status = signals.status or 0
        finally:
            _close_scheduler(loop, scheduler)
    finally:
        loop_runner.release()
    return job.finish(status, finish_timeout)


def _run_script_on_cluster(loop: asyncio.AbstractEventLoop, scheduler: Scheduler,
                           worker_names: set[str], opts: ClusterOptions, signals: SignalCatcher,
                           script: str, script_args: Sequence[str]) -> int:
    missing = wait_for_workers(loop, scheduler, worker_names, opts.startup_timeout, signals)
    if signals.signum is not None:
        return signals.status
    if missing == worker_names and worker_names:
        logger.error("no worker registered within %.0fs (expected %d); not running %s",
                     opts.startup_timeout, len(worker_names), script)
        return EXIT_FAILURE
    if missing:
        logger.warning("workers %s did not register within %.0fs; running %s without them",
                       sorted(missing, key=_rank_order), opts.startup_timeout, script)
    return run_script(script, script_args, signals, {ENV_ADDRESS: scheduler.address})


def _rank_order(name: str) -> tuple:
    tail = name.rsplit("-", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def _close_scheduler(loop: asyncio.AbstractEventLoop, scheduler: Scheduler | None) -> None:
    if scheduler is None:
        return

    async def close() -> None:
        await scheduler.close(close_workers=True)

    try:
        sync(loop, close, timeout=SCHEDULER_CLOSE_TIMEOUT)
    except Exception as e:
        logger.error("the scheduler did not close cleanly: %r", e)


# ----------------------------------------------------------------------------- worker rank


class WorkerRank:
    """The server of a worker rank (a Nanny or a Worker) and a watchdog on its scheduler.

    The watchdog opens (and at once drops) a connection to the scheduler --
    every ``probe_interval`` while it fails, every ``quiet_interval`` once it
    succeeded; :attr:`last_contact` is the time of the last one that
    succeeded.  Each probe is a TLS handshake on both sides (~3 ms of CPU):
    once a second from each of 63 ranks that was a fifth of a core on the
    scheduler's rank for as long as the job ran.  The rank gives up at
    ``last_contact + death_timeout`` either way, since the quiet interval is
    well below ``death_timeout``: only the first failed probe may come later.

    Args:
        address: the scheduler's address.
        name: the worker's name.
        nthreads: its threads.
        opts: the launch options.
    """

    def __init__(self, address: str, name: str, nthreads: int, opts: ClusterOptions,
                 security: Security | None = None):
        self.address = address
        self.name = name
        self.nthreads = nthreads
        self.opts = opts
        self.security = security
        self.server: Nanny | Worker | None = None
        #: Set once the server has closed (the end of the job is near).
        self.ended = False
        self.ended_at = 0.0
        #: Called (in the event loop's thread) once the server has closed.
        self.on_end: Callable[[], None] | None = None
        self.last_contact = time.monotonic()
        self.probe_interval = min(1.0, max(0.1, opts.death_timeout / 10))
        self.quiet_interval = max(self.probe_interval, min(5.0, opts.death_timeout / 4))
        self._probe: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the watchdog, then the server (returns once the worker registered).

        Raises:
            Exception: whatever the ``Nanny``/``Worker`` raised while starting.
        """
        self.last_contact = time.monotonic()
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._probe_loop())
        kwargs = {"name": self.name, "nthreads": self.nthreads, **self.opts.worker_kwargs()}
        if self.security is not None:
            kwargs["security"] = self.security
            kwargs.pop("protocol", None)  # the scheduler's tls:// decides
        if self.opts.nanny:
            from cluster.runtime.nanny import Nanny as cls
        else:
            from cluster.runtime.worker import Worker as cls
        self.server = cls(self.address, **kwargs)
        asyncio.ensure_future(self._notice_end(self.server))
        await self.server

    async def _notice_end(self, server: Nanny | Worker) -> None:
        await server.finished()
        self.ended_at = time.monotonic()
        self.ended = True
        if self.on_end is not None:
            self.on_end()

    async def _probe_loop(self) -> None:
        timeout = max(self.probe_interval, min(5.0, self.opts.death_timeout / 2))
        connect_args = self.security.get_connection_args("worker") if self.security else {}
        while True:
            reached = False
            try:
                comm = await connect(self.address, timeout=timeout, **connect_args)
            except (OSError, ClusterError, asyncio.TimeoutError):
                pass
            else:
                comm.abort()
                self.last_contact = time.monotonic()
                reached = True
            await asyncio.sleep(self.next_probe_in(reached))

    def next_probe_in(self, reached: bool) -> float:
        """Seconds until the next probe: rarely while the scheduler answers, often once it does not."""
        return self.quiet_interval if reached else self.probe_interval

    def scheduler_silent_for(self) -> float:
        """Seconds since the scheduler last accepted a connection."""
        return time.monotonic() - self.last_contact

    async def stop(self, graceful: bool) -> None:
        """Stop the watchdog and the server; with ``graceful`` the worker retires first."""
        if self._probe is not None:
            self._probe.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._probe
            self._probe = None
        server = self.server
        if server is None:
            return
        if graceful and server.status == Status.running:
            try:
                await asyncio.wait_for(self._retire(server), RETIRE_TIMEOUT)
            except (asyncio.TimeoutError, OSError, ClusterError) as e:
                logger.warning("worker %s did not retire within %.0fs (%r); closing it",
                               self.name, RETIRE_TIMEOUT, e)
        await server.close(timeout=CLOSE_TIMEOUT)

    async def _retire(self, server: Nanny | Worker) -> None:
        from cluster.runtime.worker import Worker

        if isinstance(server, Worker):
            await server.close_gracefully(reason="rank-signal")
            return
        server.close_gracefully()  # no restart; the nanny closes when its worker exits
        worker = server.worker_address
        if worker is None:  # no worker running (e.g. between a crash and its restart)
            return
        # The worker may be retiring already: MPI launchers signal the whole
        # process group, so it got the signal too.  Either way the nanny
        # finishes when the worker has gone, whatever becomes of our request.
        ask = asyncio.ensure_future(self._ask_to_retire(server, worker))
        try:
            await server.finished()
        finally:
            ask.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await ask

    @staticmethod
    async def _ask_to_retire(server: Nanny, worker: str) -> None:
        try:
            async with server.rpc.connection(worker, timeout=CLOSE_TIMEOUT) as comm:
                await comm.write({"op": "close_gracefully", "reason": "rank-signal"})
                await comm.read()
        except (OSError, ClusterError) as e:  # it closed meanwhile (or is closing)
            logger.debug("asking worker %s to retire: %r", worker, e)


def job_security(info: Mapping[str, Any]) -> Security | None:
    """The credentials rank 0 broadcast with its address (``None``: the job runs plain TCP)."""
    data = info.get("security")
    return Security.from_dict(data) if data else None


def serve_worker(job: Job, address: str, name: str, nthreads: int, opts: ClusterOptions,
                 signals: SignalCatcher, finish_timeout: float = FINISH_TIMEOUT + FINISH_MARGIN,
                 security: Security | None = None) -> int:
    """Run a worker rank to the end; return its status (or abort the job).

    Args:
        job: the MPI job (anything with ``post_done()``, ``done()`` and
            ``finish(status, timeout)``).
        address: the scheduler's address.
        name: the worker's name.
        nthreads: its threads.
        opts: the launch options.
        signals: installed signal catcher.
        finish_timeout: seconds to wait for the other ranks at the end.
        security: the job's credentials (from rank 0), ``None`` for plain TCP.

    Returns:
        0 when the scheduler closed on purpose, 128 + signal number after a
        signal, 1 when the worker did not start or the scheduler was lost;
        but rank 0's status when that is non-zero (see :meth:`Job.finish`).
    """
    job.post_done()
    loop = loop_runner.acquire()
    rank = WorkerRank(address, name, nthreads, opts, security)
    # Once our server has closed (the scheduler closed it), the done barrier is
    # about to complete: poll it every few ms instead of every 0.1 s.
    rank.on_end = signals.wake
    fast_delay = 0.001
    try:
        # The end conditions are watched while the worker starts, too: a start
        # is bounded only by death_timeout, and the job may be over before that.
        started = asyncio.run_coroutine_threadsafe(rank.start(), loop)
        failed = False
        status: int | None = None
        graceful = False
        while status is None:
            if not failed and started.done() and started.exception() is not None:
                logger.error("worker %s did not start: %s", name, started.exception())
                failed = True
            if signals.signum is not None:
                status, graceful = signals.status, True
            elif job.done():
                status = EXIT_FAILURE if failed else 0
            elif rank.scheduler_silent_for() > opts.death_timeout:
                logger.error("worker %s: the scheduler %s has been unreachable for %.0fs; giving up",
                             name, address, rank.scheduler_silent_for())
                status = EXIT_FAILURE
            elif rank.ended and time.monotonic() - rank.ended_at < 5.0:
                signals.wait(fast_delay)
                fast_delay = min(fast_delay * 2, 0.005)
            else:
                signals.wait(0.1)
        try:
            # Closing the server also stops a start still in progress (a signal came early).
            sync(loop, rank.stop, graceful, timeout=RETIRE_TIMEOUT + 4 * CLOSE_TIMEOUT + 10)
        except Exception as e:
            logger.error("worker %s did not close cleanly: %r", name, e)
        if not started.done():
            with suppress(Exception):
                started.result(timeout=4 * CLOSE_TIMEOUT)
    finally:
        loop_runner.release()
    return job.finish(status, finish_timeout)
