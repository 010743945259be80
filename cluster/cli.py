"""The ``scheduler`` and ``worker`` commands of ``python -m cluster``.

The equivalents of ``dask scheduler`` and ``dask worker``, for batch scripts::

    python -m cluster scheduler --scheduler-file $HOME/sched.json &
    python -m cluster worker --scheduler-file $HOME/sched.json --nworkers 4 --nthreads 8

Theory of operation
-------------------
Each command parses its options (argparse; a bad value exits with status 2
and a message naming the option), fills the options not given on the command
line from ``CLUSTER_<OPTION>`` environment variables, builds the runtime
objects (a value the runtime rejects exits with status 1, without a
traceback) and runs them in one event loop (:func:`cluster.runtime.loop.run`).

With ``--tls-ca-file``/``--tls-cert``/``--tls-key`` (the options of ``dask
scheduler`` and ``dask worker``) the servers speak ``tls://`` and accept only
peers with a certificate signed by that CA; ``--tls-credentials FILE`` gives
the same in one 0600 file written by :meth:`Security.to_file` (what the jobs of
``SLURMCluster``/``PBSCluster`` get: the path, never the key material, is on
their command line).  Without them, a worker given a scheduler file that
names credentials (written by a TLS scheduler) uses those.

``scheduler`` runs one :class:`~cluster.runtime.scheduler.server.Scheduler` until it closes
(a client's ``shutdown()``, ``--idle-timeout``) or SIGTERM/SIGINT closes it.

``worker`` runs ``--nworkers`` :class:`~cluster.runtime.nanny.Nanny` objects (each
supervises one worker process) or, with ``--no-nanny``, as many in-process
:class:`~cluster.runtime.worker.Worker` objects.  The first SIGTERM/SIGINT retires
every worker gracefully -- the scheduler copies the data only it holds to
other workers before it closes -- within :data:`GRACEFUL_TIMEOUT` seconds; a
second signal closes them at once.  The command exits when all its workers
have closed, with status 0 whether a signal, the scheduler or a lost
scheduler connection closed them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from signal import SIGINT, SIGTERM
from typing import Any

from cluster.runtime.errors import ClusterError
from cluster.runtime.loop import run
from cluster.runtime.nanny import Nanny
from cluster.runtime.options import (
    ENV_PREFIX,
    boolean,
    duration,
    env_var,
    memory_limit,
    non_negative_int,
    port,
    port_range,
    positive_int,
    resources,
)
from cluster.runtime.scheduler.server import Scheduler
from cluster.runtime.security import Security
from cluster.runtime.worker import Worker
from cluster.runtime.worker.process import GRACEFUL_SIGNAL_TIMEOUT

logger = logging.getLogger("cluster.cli")

#: Prefix of the environment variables that set options: ``--foo-bar`` is ``CLUSTER_FOO_BAR``.

#: Environment variable for the worker command's ADDRESS (the name ``Client()`` reads too).
ENV_SCHEDULER_ADDRESS = "CLUSTER_SCHEDULER_ADDRESS"

#: The scheduler's port when ``--port`` is not given.
DEFAULT_SCHEDULER_PORT = Scheduler.default_port

#: Seconds each worker gets to retire gracefully after the first SIGTERM/SIGINT.
GRACEFUL_TIMEOUT = GRACEFUL_SIGNAL_TIMEOUT

#: Extra seconds, beyond :data:`GRACEFUL_TIMEOUT`, a nanny's worker gets to close after retiring.
CLOSE_MARGIN = 10.0

#: Longest time between two "are you there?" calls to the scheduler (seconds);
#: with a shorter ``--death-timeout``, a quarter of it.
WATCH_INTERVAL = 5.0

EXIT_FAILURE = 1
EXIT_USAGE = 2


_DURATION_HELP = "like 30s, 5m, 1h or 01:00:00 (a bare number is seconds)"


class CommandError(Exception):
    """A command cannot go on; the message is reported without a traceback."""


# ----------------------------------------------------------------------------- parsers


class _Command:
    """An argument parser that also reads its options from ``CLUSTER_*`` environment variables."""

    def __init__(self, prog: str, description: str, notes: str):
        self.parser = argparse.ArgumentParser(
            prog=prog, description=description, allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        self.notes = notes
        self.env_options: list[tuple[str, str, argparse.Action]] = []

    def option(self, *flags: str, **kwargs: Any) -> argparse.Action:
        """Add an option (default ``None``: not given) that ``CLUSTER_<NAME>`` can also set."""
        action = self.parser.add_argument(*flags, default=None, **kwargs)
        long = next(f for f in flags if f.startswith("--"))
        self.env_options.append((env_var(long), long, action))
        return action

    def flag(self, name: str, help: str) -> argparse.Action:
        """Add ``--name/--no-name`` (default ``None``: not given)."""
        return self.option(f"--{name}", action=argparse.BooleanOptionalAction, help=help)

    def finish(self) -> _Command:
        """Write the epilog: environment variables, then the command's notes."""
        names = ", ".join(name for name, _, _ in self.env_options)
        env = textwrap.fill(
            "Every option --foo-bar can also be set with the environment variable "
            f"{ENV_PREFIX}FOO_BAR; the command line wins. On/off options take 1/0, true/false, "
            f"yes/no or on/off. Here: {names}.", width=78, initial_indent="  ",
            subsequent_indent="  ")
        self.parser.epilog = f"environment:\n{env}\n\n{self.notes}"
        return self

    def parse(self, argv: Sequence[str], environ: Mapping[str, str]) -> tuple[argparse.Namespace, set[str]]:
        """Parse ``argv``, then fill options not given there from ``environ``.

        Returns:
            The options, and the names (``dest``) of those taken from the environment.

        Raises:
            SystemExit: with status 2 for a bad command line or variable (argparse's message).
        """
        args = self.parser.parse_args(list(argv))
        from_env: set[str] = set()
        for name, long, action in self.env_options:
            raw = environ.get(name, "")
            if getattr(args, action.dest) is not None or not raw.strip():
                continue
            convert = boolean if isinstance(action, argparse.BooleanOptionalAction) else action.type
            try:
                value = convert(raw) if convert is not None else raw
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                self.parser.error(f"environment variable {name} (for {long}): {e}")
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(repr, action.choices))
                self.parser.error(f"environment variable {name} (for {long}): invalid choice "
                                  f"{raw!r} (choose from {choices})")
            setattr(args, action.dest, value)
            from_env.add(action.dest)
        return args, from_env

    def exclusive(self, args: argparse.Namespace, from_env: set[str], a: str, b: str,
                  a_name: str, b_name: str) -> None:
        """At most one of options ``a`` and ``b``: one from the command line beats the other's variable.

        Raises:
            SystemExit: (status 2) both were given on the command line, or both in the environment.
        """
        if getattr(args, a) is None or getattr(args, b) is None:
            return
        a_env, b_env = a in from_env, b in from_env
        if a_env and not b_env:
            setattr(args, a, None)
        elif b_env and not a_env:
            setattr(args, b, None)
        else:
            where = "in the environment" if a_env else "on the command line"
            self.parser.error(f"give either {a_name} or {b_name}, not both ({where})")


def _tls_options(cmd: _Command, role: str) -> None:
    """``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` (as ``dask scheduler``/``dask worker``)."""
    cmd.option("--tls-ca-file", metavar="FILE",
               help="PEM file of the certificate authority: with it, listen and connect with "
                    "TLS (tls://) and accept only peers whose certificate it signed")
    cmd.option("--tls-cert", metavar="FILE",
               help=f"PEM file of this {role}'s certificate (signed by --tls-ca-file)")
    cmd.option("--tls-key", metavar="FILE",
               help=f"PEM file of this {role}'s private key (if not in --tls-cert); keep it "
                    "readable only by you")
    cmd.option("--tls-credentials", metavar="FILE",
               help="one credentials file holding the CA, this "
                    f"{role}'s certificate and key and the TLS settings (written by "
                    "Security.to_file; SLURMCluster/PBSCluster pass their jobs one), instead of "
                    "--tls-ca-file/--tls-cert/--tls-key; refused unless it is yours and "
                    "readable only by you (mode 0600)")


def _security(cmd: _Command, args: argparse.Namespace, role: str,
              from_env: set[str] = frozenset()) -> Security | None:
    """The ``Security`` of the TLS options (``None`` without them).

    ``--tls-credentials`` and the three separate options exclude each other;
    as elsewhere, what the command line gives wins over the environment.

    Raises:
        SystemExit: (status 2) an incomplete or contradictory set of TLS
            options; (status 1) an unusable ``--tls-credentials`` file.
    """
    parts = ("tls_ca_file", "tls_cert", "tls_key")
    if args.tls_credentials and any(getattr(args, p) for p in parts):
        parts_env = all(p in from_env for p in parts if getattr(args, p))
        file_env = "tls_credentials" in from_env
        if parts_env and not file_env:
            for p in parts:
                setattr(args, p, None)
        elif file_env and not parts_env:
            args.tls_credentials = None
        else:
            cmd.parser.error("give either --tls-credentials or --tls-ca-file/--tls-cert/"
                             "--tls-key, not both")
    given = [getattr(args, p) for p in parts]
    if args.tls_credentials:
        return _security_from_file(cmd, args.tls_credentials, role)
    if not any(given):
        return None
    if not (args.tls_ca_file and args.tls_cert):
        cmd.parser.error("TLS needs --tls-ca-file and --tls-cert (and --tls-key unless the "
                         "certificate file holds the key)")
    return Security(require_encryption=True, tls_ca_file=args.tls_ca_file,
                    **{f"tls_{role}_cert": args.tls_cert, f"tls_{role}_key": args.tls_key})


def _security_from_file(cmd: _Command, path: str, role: str) -> Security:
    """The ``Security`` of a ``--tls-credentials`` file (see :meth:`Security.from_file`).

    Raises:
        SystemExit: (status 1) the file cannot be read, is readable by others or
            owned by another user, is no credentials file, or holds no
            certificate for ``role``.
    """
    try:
        security = Security.from_file(os.path.expanduser(path))
    except (OSError, ValueError, TypeError) as e:  # PermissionError is an OSError
        cmd.parser.exit(EXIT_FAILURE, f"{cmd.parser.prog}: error: --tls-credentials: "
                                      f"{_describe(e)}\n")
    if not security.has_tls(role):
        cmd.parser.exit(EXIT_FAILURE, f"{cmd.parser.prog}: error: --tls-credentials {path}: "
                                      f"no CA and {role} certificate in it\n")
    return security


def scheduler_parser(prog: str = "python -m cluster scheduler") -> _Command:
    """The ``scheduler`` command's options."""
    cmd = _Command(prog, "Start a scheduler; workers and clients connect to it.", notes=(
        "The scheduler logs its address (\"Scheduler at tcp://...\") and, with\n"
        "--scheduler-file, writes it to that file (removed when it closes).\n"
        "It runs until a client's shutdown(), --idle-timeout, or SIGTERM/SIGINT\n"
        "closes it; the exit status is then 0.\n"
        f"Durations (T) look {_DURATION_HELP}."))
    cmd.option("--host", metavar="HOST",
               help="listen on this host (default: 127.0.0.1, loopback only: give the node's "
                    "address, or 0.0.0.0, for other nodes to connect)")
    cmd.option("--port", type=port, metavar="PORT",
               help=f"listen on this port (default: {DEFAULT_SCHEDULER_PORT}; 0: any free port)")
    cmd.option("--interface", metavar="IF",
               help="listen on this network interface's address, e.g. ib0 (instead of --host)")
    cmd.option("--protocol", choices=["tcp", "tls"],
               help="the network protocol (default: tls with the --tls-* options, else tcp)")
    cmd.option("--scheduler-file", metavar="FILE",
               help="write the scheduler's address and identity to this JSON file (with TLS: "
                    "readable only by you, and naming a credentials file next to it)")
    _tls_options(cmd, "scheduler")
    cmd.option("--idle-timeout", type=duration, metavar="T",
               help="close after this long without work (default: never)")
    cmd.option("--worker-ttl", type=duration, metavar="T",
               help="remove a worker not heard from for this long (default: never)")
    cmd.option("--allowed-failures", type=non_negative_int, metavar="N",
               help="worker deaths a task may cause before it fails with KilledWorker (default: 3)")
    cmd.flag("validate", help="check every scheduler-state invariant after each step (slow; "
                              "default: off)")
    cmd.flag("dashboard", help="serve the status page, its JSON and Prometheus /metrics "
                               "(default: on)")
    cmd.option("--dashboard-address", metavar="ADDR",
               help="where to serve them (default: :8787 on the scheduler's host, or a free "
                    "port if 8787 is taken)")
    return cmd.finish()


def worker_parser(prog: str = "python -m cluster worker") -> _Command:
    """The ``worker`` command's options."""
    cmd = _Command(prog, "Start workers that connect to a scheduler.", notes=(
        f"ADDRESS may also come from {ENV_SCHEDULER_ADDRESS}.\n\n"
        "signals:\n"
        "  The first SIGTERM/SIGINT retires every worker gracefully: the scheduler\n"
        "  copies the data only it holds to other workers, then it closes (within\n"
        f"  {GRACEFUL_TIMEOUT:g}s). A second signal closes the workers at once.\n"
        "  The command exits with status 0 once all its workers have closed\n"
        "  (signal, scheduler shutdown, scheduler lost), 1 if one failed to start.\n\n"
        f"Durations (T) look {_DURATION_HELP}."))
    cmd.parser.add_argument("address", nargs="?", default=None, metavar="ADDRESS",
                            help="the scheduler's address, e.g. tcp://10.0.0.1:8786 "
                                 "(or give --scheduler-file)")
    cmd.option("--scheduler-file", metavar="FILE",
               help="read the scheduler's address from this file (written by the scheduler)")
    cmd.option("--nworkers", type=positive_int, metavar="N",
               help="number of workers to start (default: 1)")
    cmd.option("--nthreads", type=positive_int, metavar="N",
               help="threads per worker (default: the usable cores divided by --nworkers)")
    cmd.option("--memory-limit", type=memory_limit, metavar="LIMIT",
               help="memory per worker: auto (the machine's memory times threads/cores), a size "
                    "like 4GB, a fraction like 0.5, or 0 for no limit (default: auto)")
    cmd.option("--name", metavar="NAME",
               help="the worker's name, unique in the cluster; with --nworkers > 1 the workers "
                    "are NAME-0, NAME-1, ... (default: the nanny's or worker's address)")
    cmd.flag("nanny", help="run each worker in a child process supervised (restarted, memory "
                           "watched) by a nanny in this process (default: on)")
    cmd.option("--lifetime", type=duration, metavar="T",
               help="retire each worker gracefully after this long (default: never)")
    cmd.option("--lifetime-stagger", type=duration, metavar="T",
               help="vary --lifetime randomly by up to this much, so workers do not all leave "
                    "together")
    cmd.flag("lifetime-restart", help="start a fresh worker when --lifetime ends (needs the nanny; "
                                      "default: off)")
    cmd.option("--death-timeout", type=duration, metavar="T",
               help="give up on an unreachable scheduler after this long, also one that "
                    "stops answering while connected (a frozen process): the workers close "
                    "and the command exits (default: 60s to connect; unanswered calls: no limit)")
    cmd.option("--local-directory", metavar="DIR",
               help="where the workers keep their files and spilled data (default: the system's "
                    "temporary directory)")
    cmd.option("--resources", type=resources, metavar="SPEC",
               help="abstract resources of each worker, e.g. \"GPU=2,MEM=10e9\"")
    cmd.option("--interface", metavar="IF",
               help="listen on this network interface's address, e.g. ib0 (instead of --host)")
    cmd.option("--host", metavar="HOST",
               help="listen on this host (default: the local address that routes to the scheduler)")
    cmd.option("--worker-port", type=port_range, metavar="PORT",
               help="port of the worker, or a range LOW:HIGH for --nworkers > 1 (default: 0, "
                    "any free port)")
    cmd.option("--nanny-port", type=port_range, metavar="PORT",
               help="port of the nanny, or a range LOW:HIGH for --nworkers > 1 (default: 0, "
                    "any free port)")
    cmd.flag("reconnect", help="reconnect when the connection to the scheduler breaks, for up to "
                               "--death-timeout (default: on); else close")
    cmd.flag("dashboard", help="each worker serves Prometheus /metrics and /health on a free "
                               "port (default: off)")
    cmd.option("--dashboard-address", metavar="ADDR",
               help="serve them here instead, e.g. :9100 (implies --dashboard; with --nworkers "
                    "> 1 use port 0)")
    cmd.flag("tls", help="--no-tls: accept a --scheduler-file that leads to a plain tcp:// "
                         "scheduler (no TLS: anyone who can reach the ports can run code as "
                         "you); without it such a file is refused")
    _tls_options(cmd, "worker")
    return cmd.finish()


# ----------------------------------------------------------------------------- running


class _Signals:
    """Route SIGTERM/SIGINT on the running loop to ``callback(signame, count)`` while in use."""

    def __init__(self, callback: Callable[[str, int], None]):
        self.callback = callback
        self.count = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> _Signals:
        self.loop = asyncio.get_running_loop()
        for sig in (SIGTERM, SIGINT):
            self.loop.add_signal_handler(sig, self._handle, sig.name)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig in (SIGTERM, SIGINT):
            self.loop.remove_signal_handler(sig)

    def _handle(self, signame: str) -> None:
        self.count += 1
        self.callback(signame, self.count)


async def _start(server: Scheduler | Worker | Nanny) -> None:
    await server


async def _unless(main: Awaitable[Any], stop: asyncio.Event) -> bool:
    """Await ``main``, unless ``stop`` is set first: then cancel it.

    Returns:
        True if ``main`` finished, False if it was cancelled because of ``stop``.

    Raises:
        whatever ``main`` raised.
    """
    task = asyncio.ensure_future(main)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        task.cancel()  # no-op if it finished
        await asyncio.gather(task, stopper, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def serve_scheduler(options: dict[str, Any]) -> int:
    """Run a scheduler with ``options`` until it closes or a signal closes it; return 0.

    Raises:
        CommandError: the runtime rejected an option, or the scheduler could not start.
    """
    try:
        scheduler = Scheduler(**options)
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    stop = asyncio.Event()

    def on_signal(signame: str, count: int) -> None:
        if count == 1:
            logger.info("received %s: closing the scheduler", signame)
        stop.set()

    with _Signals(on_signal):
        try:
            started = await _unless(_start(scheduler), stop)
        except (OSError, ValueError, ClusterError) as e:
            raise CommandError(f"the scheduler could not start: {_describe(e)}") from None
        if started:
            if scheduler.scheduler_file:
                logger.info("scheduler file: %s", os.path.abspath(scheduler.scheduler_file))
            await _unless(scheduler.finished(), stop)
        await scheduler.close()
    logger.info("scheduler closed")
    return 0


class WorkerGroup:
    """The workers (or nannies) of one ``worker`` command, started, retired and closed together.

    Args:
        servers: unstarted :class:`Nanny` or :class:`Worker` objects.
        graceful_timeout: seconds a worker gets to retire after the first signal.
    """

    def __init__(self, servers: list[Nanny | Worker], graceful_timeout: float = GRACEFUL_TIMEOUT,
                 death_timeout: float | None = None):
        self.servers = servers
        self.graceful_timeout = graceful_timeout
        self.death_timeout = death_timeout
        self._watchdog: asyncio.Task | None = None
        self.stop = asyncio.Event()
        self.started = False
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> int:
        """Start the workers, wait until all have closed; return 0.

        Raises:
            CommandError: a worker could not start (the others are closed first).
        """
        with _Signals(self._on_signal):
            try:
                started = await _unless(self._start_all(), self.stop)
            except BaseException:
                await self.close_all("start-failed")
                raise
            if not started:
                await self.close_all("signal-during-start")
                return 0
            self.started = True
            logger.info("%d worker(s)%s running: %s", len(self.servers),
                        " with nannies" if isinstance(self.servers[0], Nanny) else "",
                        ", ".join(f"{s.name!r}" for s in self.servers))
            if self.stop.is_set():  # a signal came just as the start finished
                self._spawn(self.retire_all("signal"))
            if self.death_timeout:
                self._watchdog = asyncio.ensure_future(self.watch_scheduler(self.death_timeout))
            try:
                await asyncio.gather(*(s.finished() for s in self.servers))
            finally:
                if self._watchdog is not None:
                    self._watchdog.cancel()
                    await asyncio.gather(self._watchdog, return_exceptions=True)
                while self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        logger.info("all workers closed")
        return 0

    async def watch_scheduler(self, timeout: float) -> None:
        """Close every worker once the scheduler has not answered for ``timeout`` seconds.

        A scheduler whose process is frozen (SIGSTOP, a hung notebook kernel, a
        login node that dropped the session) keeps its connections open, so no
        connection breaks: only a call that needs an answer shows it.  Every
        ``min(WATCH_INTERVAL, timeout / 4)`` seconds this asks the scheduler
        for its identity; when no answer came for ``timeout`` seconds the
        workers close (their data cannot go anywhere) and the command exits,
        which ends the batch job and frees the allocation.
        """
        interval = min(WATCH_INTERVAL, timeout / 4)
        server = self.servers[0]
        last = time.monotonic()
        while not self.stop.is_set():
            await asyncio.sleep(interval)  # the probe's period, not synchronisation
            address = server.scheduler_addr
            if address is None:
                continue
            try:
                await asyncio.wait_for(server.rpc.call(address, "identity"), interval)
                last = time.monotonic()
            except (asyncio.TimeoutError, OSError, ClusterError) as e:
                logger.info("the scheduler at %s did not answer (%s); silent for %.0fs of %gs",
                            address, _describe(e), time.monotonic() - last, timeout)
            if time.monotonic() - last >= timeout:
                logger.warning("the scheduler at %s has not answered for %.0fs (--death-timeout "
                               "%gs): closing the workers so that the job ends", address,
                               time.monotonic() - last, timeout)
                self.stop.set()
                await self.close_all("scheduler-unreachable")
                return

    async def _start_all(self) -> None:
        tasks = [asyncio.ensure_future(self._start_one(s)) for s in self.servers]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()  # the others, once one failed
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r

    async def _start_one(self, server: Nanny | Worker) -> None:
        try:
            await _start(server)
        except (OSError, ValueError, TypeError, ClusterError) as e:
            label = f"worker {server.name!r}" if server.name is not None else "a worker"
            raise CommandError(f"{label} could not start: {_describe(e)}") from None

    def _on_signal(self, signame: str, count: int) -> None:
        self.stop.set()
        if not self.started:
            logger.info("received %s while starting: stopping", signame)
        elif count == 1:
            logger.info("received %s: retiring %d worker(s) gracefully within %gs "
                        "(send it again to close them at once)", signame, len(self.servers),
                        self.graceful_timeout)
            self._spawn(self.retire_all(f"signal-{signame}"))
        else:
            logger.info("received %s again: closing the workers at once", signame)
            self._spawn(self.close_all(f"signal-{signame}"))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def retire_all(self, reason: str) -> None:
        """Retire every worker gracefully (its unique data moves to other workers), then close it."""
        await asyncio.gather(*(self._retire(s, reason) for s in self.servers))

    async def _retire(self, server: Nanny | Worker, reason: str) -> None:
        try:
            if isinstance(server, Nanny):
                await self._retire_nanny(server, reason)
            else:
                await server.close_gracefully(reason=reason, timeout=self.graceful_timeout)
        except Exception:
            logger.exception("could not retire worker %r gracefully; closing it", server.name)
        finally:
            await server.close(reason=reason)

    async def _retire_nanny(self, nanny: Nanny, reason: str) -> None:
        nanny.close_gracefully()  # do not restart the worker; close when it exits
        address = nanny.worker_address
        if address is None:  # no worker running right now: nothing to retire
            return
        call = asyncio.ensure_future(nanny.rpc.call(
            address, "close_gracefully", reason=reason, timeout=self.graceful_timeout))
        try:
            await asyncio.wait_for(nanny.finished(), self.graceful_timeout + CLOSE_MARGIN)
        except asyncio.TimeoutError:
            logger.warning("worker %r did not retire within %gs; closing it", nanny.name,
                           self.graceful_timeout + CLOSE_MARGIN)
        finally:
            call.cancel()
            # The call usually fails: the worker closes the connection as it closes.
            await asyncio.gather(call, return_exceptions=True)

    async def close_all(self, reason: str) -> None:
        """Close every worker now."""
        results = await asyncio.gather(*(s.close(reason=reason) for s in self.servers),
                                       return_exceptions=True)
        for server, r in zip(self.servers, results, strict=True):
            if isinstance(r, Exception):
                logger.error("closing worker %r failed: %s", server.name, _describe(r))


async def serve_workers(make: Callable[[], list[Nanny | Worker]],
                        death_timeout: float | None = None) -> int:
    """Build the workers with ``make()`` (in the event loop), run them until all have closed.

    With ``death_timeout`` they close when the scheduler has not answered for
    that long (:meth:`WorkerGroup.watch_scheduler`).

    Raises:
        CommandError: the runtime rejected an option, or a worker could not start.
    """
    try:
        servers = make()
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    return await WorkerGroup(servers, death_timeout=death_timeout).run()


# ----------------------------------------------------------------------------- commands


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _not_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def scheduler_command(argv: Sequence[str], prog: str = "python -m cluster scheduler",
                      environ: Mapping[str, str] | None = None) -> int:
    """``scheduler [options]``: run a scheduler; return the exit status.

    Raises:
        SystemExit: for ``--help`` (0) and bad options (2), from argparse.
    """
    cmd = scheduler_parser(prog)
    args, from_env = cmd.parse(argv, os.environ if environ is None else environ)
    cmd.exclusive(args, from_env, "host", "interface", "--host", "--interface")
    options = _not_none(
        host=args.host, interface=args.interface, protocol=args.protocol,
        scheduler_file=args.scheduler_file, idle_timeout=args.idle_timeout,
        worker_ttl=args.worker_ttl, allowed_failures=args.allowed_failures, validate=args.validate,
    )
    options["port"] = DEFAULT_SCHEDULER_PORT if args.port is None else args.port
    if args.dashboard is False:
        options["dashboard_address"] = None
    elif args.dashboard_address is not None:
        options["dashboard_address"] = args.dashboard_address
    security = _security(cmd, args, "scheduler", from_env)
    if security is not None:
        options["security"] = security
    elif args.protocol == "tls":
        cmd.parser.error("--protocol tls needs --tls-credentials, or --tls-ca-file and "
                         "--tls-cert")
    _configure_logging()
    try:
        return run(serve_scheduler(options))
    except CommandError as e:
        cmd.parser.exit(EXIT_FAILURE, f"{prog}: error: {e}\n")


def _ports(cmd: _Command, value: tuple[int, int] | None, n: int, option: str) -> list[int]:
    low, high = value or (0, 0)
    if low == high == 0:
        return [0] * n
    if high - low + 1 < n:
        given = f"{low}" if low == high else f"{low}:{high}"
        cmd.parser.error(f"{option} {given} has fewer ports than the {n} workers of --nworkers; "
                         "give a range LOW:HIGH with one port per worker, or 0 (any free port)")
    return [low + i for i in range(n)]


def worker_command(argv: Sequence[str], prog: str = "python -m cluster worker",
                   environ: Mapping[str, str] | None = None) -> int:
    """``worker [ADDRESS] [options]``: run workers; return the exit status.

    Raises:
        SystemExit: for ``--help`` (0) and bad options (2), from argparse.
    """
    environ = os.environ if environ is None else environ
    cmd = worker_parser(prog)
    args, from_env = cmd.parse(argv, environ)
    if args.address is None and environ.get(ENV_SCHEDULER_ADDRESS, "").strip():
        args.address = environ[ENV_SCHEDULER_ADDRESS].strip()
        from_env.add("address")
    if args.address is None and args.scheduler_file is None:
        cmd.parser.error("the scheduler is needed: give its ADDRESS or --scheduler-file "
                         f"(or set {ENV_SCHEDULER_ADDRESS} or {env_var('--scheduler-file')})")
    if "address" in from_env and "scheduler_file" in from_env:
        args.scheduler_file = None  # like Client(): the address wins
    cmd.exclusive(args, from_env, "address", "scheduler_file", "ADDRESS", "--scheduler-file")
    cmd.exclusive(args, from_env, "host", "interface", "--host", "--interface")
    nanny = True if args.nanny is None else args.nanny
    if not nanny and args.nanny_port is not None:
        cmd.parser.error("--nanny-port needs --nanny (there is no nanny with --no-nanny)")
    if not nanny and args.lifetime_restart:
        cmd.parser.error("--lifetime-restart needs --nanny (a nanny starts the fresh worker)")
    security = _security(cmd, args, "worker", from_env)
    if args.tls is False:
        if security is not None:
            cmd.parser.error("--no-tls excludes --tls-credentials and --tls-ca-file/--tls-cert/"
                             "--tls-key")
        security = False  # the user opted into plain TCP
    n = args.nworkers or 1
    nthreads = args.nthreads or max(1, _usable_cores() // n)
    worker_ports = _ports(cmd, args.worker_port, n, "--worker-port")
    nanny_ports = _ports(cmd, args.nanny_port, n, "--nanny-port")
    common = _not_none(
        scheduler_ip=args.address, scheduler_file=args.scheduler_file, nthreads=nthreads,
        memory_limit=args.memory_limit, resources=args.resources,
        local_directory=args.local_directory, death_timeout=args.death_timeout,
        lifetime=args.lifetime, lifetime_stagger=args.lifetime_stagger,
        lifetime_restart=args.lifetime_restart, interface=args.interface, host=args.host,
        reconnect=args.reconnect, security=security,
    )
    if args.dashboard is not False and args.dashboard_address is not None:
        common["dashboard_address"] = args.dashboard_address
    elif args.dashboard:
        common["dashboard"] = True

    def name(i: int) -> dict[str, Any]:
        if args.name is None:
            return {}
        return {"name": f"{args.name}-{i}" if n > 1 else args.name}

    def make() -> list[Nanny | Worker]:
        if nanny:
            return [Nanny(**common, **name(i), port=nanny_ports[i], worker_port=worker_ports[i])
                    for i in range(n)]
        return [Worker(**common, **name(i), port=worker_ports[i]) for i in range(n)]

    _configure_logging()
    try:
        return run(serve_workers(make, args.death_timeout))
    except CommandError as e:
        cmd.parser.exit(EXIT_FAILURE, f"{prog}: error: {e}\n")


COMMANDS: dict[str, Callable[..., int]] = {
    "scheduler": scheduler_command,
    "worker": worker_command,
}


def main(argv: Sequence[str], prog: str = "python -m cluster") -> int:
    """Run ``argv`` (``["scheduler", ...]`` or ``["worker", ...]``); return the exit status.

    argparse's exits (``--help``: 0, bad options: 2) become return values.
    """
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(f"{prog}: error: expected a command: {', '.join(COMMANDS)}\n")
        return EXIT_USAGE
    command = COMMANDS[argv[0]]
    try:
        return command(argv[1:], prog=f"{prog} {argv[0]}")
    except SystemExit as e:
        if e.code is None:
            return 0
        return e.code if isinstance(e.code, int) else EXIT_FAILURE
    except KeyboardInterrupt:  # before the event loop handles signals
        return 128 + SIGINT
