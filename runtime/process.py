"""Worker processes: start one, watch it, stop it without leaving it behind.

A worker process is ``python -P -m cluster.runtime.worker.process '<json options>'``
started with a pipe on its standard input.  ``-P`` (Python 3.11+; a small
``-c`` bootstrap that drops the entry before anything is imported on 3.10)
keeps the working directory off the child's ``sys.path``: a module that
another user planted in a shared working directory is never imported by a
worker.  The child imports what we import from ``PYTHONPATH``, which
:func:`child_environment` fills with our ``sys.path`` minus the working
directory and minus directories another user can write.  The child treats end-of-file on
that pipe as "my parent is gone": it closes itself.  So a crashed or killed
parent never leaves orphans, and a normal stop is just closing the pipe, then
SIGTERM, then SIGKILL, each after a grace period.

With ``report_ready=True`` the child also gets the write end of a second pipe
(``--ready-fd N``).  Once its worker has registered with the scheduler it
writes one JSON line there -- ``{"status": "running", "address": ..., "pid":
..., "local_directory": ..., "name": ...}`` -- or ``{"status": "error",
"error": ...}`` if the worker could not start, and closes it.
:meth:`WorkerProcess.wait_ready` reads that line; end-of-file without a line
means the child died before it got that far.  The child's own stdout and
stderr are left alone (inherited), so task output is not captured or delayed.

TLS credentials (a pickled :class:`~cluster.runtime.security.Security`) reach the
child through a third pipe (``--security-fd N``), written in full before the
child starts and read by it once: never on the command line or in the
environment, which other users of the machine can see.

Exit codes: 0 when the worker closed on purpose, :data:`RESTART_EXIT_CODE`
when it closed asking to be replaced (``lifetime_restart``), anything else
(or a signal) when it failed or was killed.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import json
import logging
import os
import pickle
import signal
import sys
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from .errors import ClusterError, ClusterTimeoutError
from .files import writable_by_others
from .worker import RESTART_EXIT_CODE, WARM_FLAG  # noqa: F401  (re-exported: the exit code nannies read)

if TYPE_CHECKING:
    from .security import Security


logger = logging.getLogger(__name__)




class WorkerProcessError(ClusterError):
    """A worker process failed to start (its message says why)."""


#: Run by ``python -c`` where ``-P`` is missing (Python 3.10) or the interpreter is not
#: ours: drop the working directory that ``-c`` put first on ``sys.path`` before
#: importing anything (``sys`` is built in), then run the module as ``-m`` would.
BOOTSTRAP = ('import sys; getattr(sys.flags, "safe_path", 0) or sys.path.pop(0); '
              'import runpy; runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)')

_warned_path_entries: set[str] = set()


def python_command(module: str, *args: str, executable: str | None = None) -> list[str]:
    """The command line of ``python -m module args`` without the working directory on
    the child's ``sys.path``: ``-P`` when ``executable`` is our interpreter and it has
    it (3.11+), else a ``-c`` bootstrap that any Python 3 runs.
    """
    exe = executable or sys.executable
    if exe == sys.executable and sys.version_info >= (3, 11):
        return [exe, "-P", "-m", module, *args]
    return [exe, "-c", BOOTSTRAP, module, *args]


def _main_script_directory() -> str | None:
    """The directory of the script ``__main__`` was run from (``python script.py``), if any."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None:  # -m, -c, interactive
        return None
    return os.path.dirname(os.path.realpath(path))


def inherited_path() -> list[str]:
    """Our ``sys.path`` entries that a child may import from.

    Left out: relative entries (``''`` is the working directory); the working
    directory itself, unless it is the directory of the script we run (which
    ``python script.py`` puts on ``sys.path`` on purpose); and any entry
    another user owns or can write to (logged once at WARNING; inside our
    interpreter's prefix silently, as the child finds those itself).  Entries
    listed in ``PYTHONPATH`` stay: the user asked for them.
    """
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = None
    explicit = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p and os.path.isabs(p)}
    script_dir = _main_script_directory()
    prefixes = tuple(os.path.realpath(p) + os.sep
                     for p in {sys.prefix, sys.base_prefix, sys.exec_prefix} if p)
    paths: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str) or not entry or not os.path.isabs(entry):
            continue
        if not (os.path.isdir(entry) or os.path.isfile(entry)):
            continue
        real = os.path.realpath(entry)
        if real not in explicit:
            if real == cwd and real != script_dir:
                continue
            problem = writable_by_others(entry)
            if problem:
                if not (real + os.sep).startswith(prefixes) and entry not in _warned_path_entries:
                    _warned_path_entries.add(entry)
                    logger.warning(
                        "not passing %s on to worker processes' sys.path: it %s, so another "
                        "user could plant modules there (put it in PYTHONPATH to pass it anyway)",
                        entry, problem)
                continue
        if entry not in paths:
            paths.append(entry)
    return paths


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment, with our importable ``sys.path`` (:func:`inherited_path`) in
    ``PYTHONPATH`` so that the child imports what we import."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(inherited_path() + ([old] if old else []))
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _pipe_holding(data: bytes) -> int:
    """The read end of a pipe that holds ``data`` and then reaches end-of-file.

    Raises:
        OSError: ``data`` does not fit in a pipe's buffer.
    """
    read_fd, write_fd = os.pipe()
    try:
        if len(data) > 65536 and hasattr(fcntl, "F_SETPIPE_SZ"):
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, len(data))
        os.set_blocking(write_fd, False)  # never hang here: a short write is an error
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view):]
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


# ----------------------------------------------------------------------------- pre-warmed children



class _WarmChild:
    """A worker child waiting for its options on its stdin (see :func:`prewarm`).

    Either a fresh ``python -P -m cluster.runtime.worker.process --options-from-stdin``
    (:meth:`spawn`) or a fork of this process, which has imported the
    worker's modules already (:meth:`fork`).  Neither needs an event loop, so
    that it can be started before anything else -- before ``MPI_Init``, say.
    Its standard input is a pipe: the options arrive there (a JSON line, then
    the pickled credentials), and end-of-file ends the child, as for every
    worker process.  The ready pipe (``--ready-fd``) is made now, its read end
    kept.
    """

    def __init__(self, env: dict[str, str], executable: str, popen: Any, ready_fd: int,
                 forked: bool = False):
        self.env = env
        self.executable = executable
        self.popen = popen
        self.ready_fd: int | None = ready_fd
        #: Whether the child is a fork of this process (no interpreter start-up).
        self.forked = forked

    @classmethod
    def spawn(cls, env: dict[str, str], executable: str) -> _WarmChild:
        """A fresh interpreter (:class:`subprocess.Popen`) that imports the runtime itself."""
        import subprocess

        read_fd, write_fd = os.pipe()
        try:
            popen = subprocess.Popen(
                python_command("cluster.runtime.worker.process", WARM_FLAG, "--ready-fd", str(write_fd),
                               executable=executable),
                stdin=subprocess.PIPE, env=env, pass_fds=(write_fd,), start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(env, executable, popen, read_fd)

    @classmethod
    def fork(cls, env: dict[str, str]) -> _WarmChild:
        """A fork of this process (see :func:`cluster.runtime.worker.process.run_forked`).

        The caller checked that forking is safe (:func:`_can_fork`).

        Raises:
            OSError: the fork failed.
        """
        from .worker.process import run_forked

        path = inherited_path()  # computed here: the child must not import anything to find it
        stdin_r, stdin_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            for fd in (stdin_r, stdin_w, ready_r, ready_w):
                os.close(fd)
            raise
        if pid == 0:  # the child: never returns
            run_forked(stdin_r, ready_w, env, path, parent_fds=(stdin_w, ready_r))
        os.close(stdin_r)
        os.close(ready_w)
        return cls(env, sys.executable, _ForkedPopen(pid, os.fdopen(stdin_w, "wb")), ready_r,
                   forked=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def hand_over(self, options: dict[str, Any], worker_class: str | None,
                  security: Security | None) -> tuple[_PopenProcess, int]:
        """Send the child its options; return it (as an asyncio-like process) and the ready fd.

        Raises:
            OSError: the child is gone (its stdin is closed).
        """
        secret = pickle.dumps(security, protocol=5) if security is not None else b""
        header = json.dumps({"options": options, "worker_class": worker_class,
                             "security_bytes": len(secret)}).encode() + b"\n"
        stdin = self.popen.stdin
        stdin.write(header + secret)
        stdin.flush()
        ready_fd, self.ready_fd = self.ready_fd, None
        return _PopenProcess(self.popen), ready_fd

    def close(self) -> None:
        """Unused: close its stdin (it exits at end-of-file), and reap it."""
        if self.ready_fd is not None:
            with suppress(OSError):
                os.close(self.ready_fd)
            self.ready_fd = None
        with suppress(Exception):
            self.popen.stdin.close()
        try:
            self.popen.wait(5.0)
        except Exception:
            with suppress(Exception):
                self.popen.kill()
                self.popen.wait(5.0)


class _ForkedPopen:
    """The parts of :class:`subprocess.Popen` that :class:`_WarmChild` and
    :class:`_PopenProcess` use, for a child made by ``os.fork``."""

    def __init__(self, pid: int, stdin: Any):
        self.pid = pid
        self.stdin = stdin
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: its status is lost
                self.returncode = 255
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child exits (``TimeoutError`` after ``timeout`` seconds)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"process {self.pid} still running after {timeout:g}s")
            time.sleep(delay)  # polling a child's exit without an event loop
            delay = min(delay * 2, 0.05)
        return code

    def kill(self) -> None:
        if self.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class _PopenProcess:
    """The parts of :class:`asyncio.subprocess.Process` that :class:`WorkerProcess` uses,
    for a child started with :class:`subprocess.Popen` (a pre-warmed one)."""

    def __init__(self, popen):
        self.popen = popen
        self.stdin = popen.stdin

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for the child's exit without a thread: its pidfd becomes readable then."""
        code = self.popen.poll()
        if code is not None:
            return code
        pidfd = -1
        with suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(self.popen.pid)
        if pidfd < 0:  # pragma: no cover - Linux < 5.3
            delay = 0.01
            while (code := self.popen.poll()) is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
            return code
        loop = asyncio.get_running_loop()
        exited = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            while (code := self.popen.poll()) is None:
                await exited
                exited = loop.create_future()
            return code
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)


_warm: _WarmChild | None = None


def _can_fork() -> str | None:
    """Why this process may not fork a worker now (``None``: it may).

    A fork copies only the calling thread: with other threads running, a lock
    one of them holds stays locked in the child forever.  And once MPI is
    initialised, some MPI libraries break in a forked child.
    """
    if not hasattr(os, "fork"):
        return "no os.fork on this platform"
    import threading

    if threading.active_count() > 1:
        return f"{threading.active_count()} threads are running"
    if "mpi4py.MPI" in sys.modules:
        return "mpi4py.MPI is imported (MPI may be initialised)"
    return None


def prewarm(env: dict[str, str] | None = None, executable: str | None = None,
            fork: bool = False) -> int | None:
    """Start a worker process now, for the next :meth:`WorkerProcess.start` to use.

    The child waits for its options; the next :class:`WorkerProcess` started
    with the same environment (``child_environment(its env)`` equal to
    ``env``) and interpreter hands its options to this child instead of
    starting a fresh one -- the options and credentials go through the
    child's stdin pipe, never the command line or the environment.  An unused
    child is reaped by :func:`discard_warm` (also at exit); when we die it
    reads end-of-file on stdin and exits.  Does nothing if a warm child is
    already waiting.  Needs no event loop.

    Args:
        env: the child's whole environment (default: ``child_environment()``).
        executable: its Python (default: ours).
        fork: make the child by forking this process, which imports the
            worker's modules first (:mod:`cluster.runtime.worker.process`), instead of
            starting an interpreter that imports them again: no start-up
            cost, and the imported code is shared with us.  Only where
            forking is safe -- one thread, MPI not initialised, our own
            interpreter -- otherwise a fresh interpreter, as without it.

    Returns:
        The child's pid, or ``None`` if it could not be started.
    """
    global _warm
    if _warm is not None and _warm.alive():
        return _warm.pid
    discard_warm()
    env = child_environment() if env is None else dict(env)
    executable = executable or sys.executable
    why_not = _can_fork() if fork else "not asked to"
    if fork and why_not is None and executable == sys.executable:
        try:
            _warm = _WarmChild.fork(env)
            return _warm.pid
        except OSError as e:
            why_not = repr(e)
    if fork:
        logger.debug("not forking a worker process (%s); starting an interpreter", why_not)
    try:
        _warm = _WarmChild.spawn(env, executable)
    except OSError as e:
        logger.debug("could not pre-warm a worker process: %r", e)
        return None
    return _warm.pid


def discard_warm() -> None:
    """Stop the waiting pre-warmed child, if there is one."""
    global _warm
    warm, _warm = _warm, None
    if warm is not None:
        warm.close()


def _take_warm(env: dict[str, str], executable: str) -> _WarmChild | None:
    """The waiting pre-warmed child if it suits ``env`` and ``executable`` (else ``None``)."""
    global _warm
    warm = _warm
    if warm is None:
        return None
    if not warm.alive():
        discard_warm()
        return None
    if warm.env != env or warm.executable != executable:
        logger.debug("pre-warmed worker process %s does not suit (other environment); unused",
                     warm.pid)
        return None
    _warm = None
    return warm


atexit.register(discard_warm)


class WorkerProcess:
    """One worker in a child process.

    Args:
        scheduler_address: where the worker should register.
        worker_kwargs: JSON-able keyword arguments for ``Worker``.
        env: extra environment variables for the child.
        report_ready: have the child report its address once registered
            (see :meth:`wait_ready`).
        worker_class: ``"module.Class"`` to run instead of ``runtime.worker.Worker``.
        security: TLS credentials for the worker (sent over a private pipe).

    Attributes:
        info: what the child reported once ready (``None`` before).
        stopping: set by the owner when it stops the process on purpose, so
            that a supervisor does not mistake the exit for a crash.
    """

    def __init__(self, scheduler_address: str, worker_kwargs: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, report_ready: bool = False,
                 worker_class: str | None = None, security: Security | None = None):
        self.scheduler_address = scheduler_address
        self.security = security
        self.worker_kwargs = dict(worker_kwargs or {})
        self.env = env
        self.report_ready = report_ready
        self.worker_class = worker_class
        self.process: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] | None = None
        self.stopping = False
        self._ready_reader: asyncio.StreamReader | None = None
        self._ready_transport: asyncio.ReadTransport | None = None

    def __repr__(self) -> str:
        return f"<WorkerProcess name={self.name!r} pid={self.pid} address={self.worker_address!r}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def name(self):
        return self.worker_kwargs.get("name")

    @property
    def worker_address(self) -> str | None:
        """The worker's address, once the child reported it (``report_ready``)."""
        return self.info.get("address") if self.info else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def start(self) -> WorkerProcess:
        """Start the child (does not wait for its worker to register).

        Raises:
            TypeError: ``worker_kwargs`` is not JSON-serialisable.
            OSError: the child could not be started.
        """
        env = child_environment(self.env)
        warm = _take_warm(env, sys.executable)
        if warm is not None:
            try:
                self.process, read_fd = warm.hand_over(
                    {"scheduler_ip": self.scheduler_address, **self.worker_kwargs},
                    self.worker_class, self.security)
            except (OSError, ValueError) as e:  # it died meanwhile: start a fresh one
                logger.debug("pre-warmed worker process %s unusable: %r", warm.pid, e)
                warm.close()
            else:
                if self.report_ready:
                    await self._read_ready_from(read_fd)
                else:
                    os.close(read_fd)
                return self
        options = json.dumps({"scheduler_ip": self.scheduler_address, **self.worker_kwargs})
        args = python_command("cluster.runtime.worker.process", options)
        if self.worker_class:
            args += ["--worker-class", self.worker_class]
        read_fd = write_fd = security_fd = None
        if self.security is not None:
            security_fd = _pipe_holding(pickle.dumps(self.security, protocol=5))
            args += ["--security-fd", str(security_fd)]
        if self.report_ready:
            read_fd, write_fd = os.pipe()
            args += ["--ready-fd", str(write_fd)]
        pass_fds = tuple(fd for fd in (write_fd, security_fd) if fd is not None)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, env=env,
                pass_fds=pass_fds,
                # Its own session: a Ctrl-C at the terminal interrupts the user's
                # program, not the workers; they stop when we tell them (or when
                # their stdin closes because we are gone).
                start_new_session=True,
            )
        except BaseException:
            if read_fd is not None:
                os.close(read_fd)
            raise
        finally:
            if write_fd is not None:
                os.close(write_fd)  # the child has its copy; EOF once it closes that
            if security_fd is not None:
                os.close(security_fd)
        if read_fd is not None:
            await self._read_ready_from(read_fd)
        return self

    async def _read_ready_from(self, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            raise
        self._ready_reader = reader
        self._ready_transport = transport

    def __await__(self):
        return self.start().__await__()

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the child's worker has registered; return what it reported.

        Raises:
            WorkerProcessError: the worker failed to start, or the child exited
                before it registered (with its exit code).
            ClusterTimeoutError: no report within ``timeout`` seconds.
            RuntimeError: the process was not started with ``report_ready=True``.
        """
        if self.info is not None:
            return self.info
        if self._ready_reader is None:
            raise RuntimeError("wait_ready() needs a started WorkerProcess(report_ready=True)")
        try:
            line = await asyncio.wait_for(self._ready_reader.readline(), timeout)
        except asyncio.TimeoutError:
            raise ClusterTimeoutError(
                f"worker process {self.pid} (name={self.name!r}) did not register with "
                f"{self.scheduler_address} within {timeout:g}s") from None
        finally:
            self._close_ready_pipe()
        if not line:
            code = None
            with suppress(asyncio.TimeoutError):
                code = await asyncio.wait_for(self.process.wait(), 5.0)
            raise WorkerProcessError(
                f"worker process {self.pid} (name={self.name!r}) exited with code {code} "
                "before it registered with the scheduler; see its output above")
        try:
            info = json.loads(line)
        except ValueError:
            raise WorkerProcessError(
                f"worker process {self.pid} sent a malformed ready report: {line[:200]!r}") from None
        if info.get("status") != "running":
            raise WorkerProcessError(
                f"worker process {self.pid} (name={self.name!r}) failed to start: "
                f"{info.get('error', info)}")
        self.info = info
        return info

    def _close_ready_pipe(self) -> None:
        if self._ready_transport is not None:
            self._ready_transport.close()
            self._ready_transport = None
        self._ready_reader = None

    async def wait(self) -> int:
        """Wait until the child exits; return its exit code (negative: killed by that signal)."""
        return await self.process.wait()

    def is_alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def close(self, timeout: float = 5.0) -> int | None:
        """Stop the child: close its stdin, then SIGTERM, then SIGKILL."""
        self._close_ready_pipe()
        proc = self.process
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        if proc.stdin is not None:
            with suppress(Exception):
                proc.stdin.close()
        return await self._escalate(proc, [(None, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)])

    async def terminate(self, grace: float = 2.0) -> int | None:
        """Stop the child now: SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds."""
        self._close_ready_pipe()
        proc = self.process
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        return await self._escalate(proc, [(signal.SIGTERM, grace), (signal.SIGKILL, 5.0)])

    async def _escalate(self, proc: asyncio.subprocess.Process,
                        steps: list[tuple[signal.Signals | None, float]]) -> int | None:
        for sig, grace in steps:
            if sig is not None:
                with suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                return await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                continue
        logger.error("worker process %s did not exit", proc.pid)  # pragma: no cover
        return None

    def kill(self) -> None:
        """SIGKILL the child at once (for tests of failure)."""
        if self.process is not None and self.process.returncode is None:
            with suppress(ProcessLookupError):
                self.process.kill()
