"""Worker processes: start one, watch it, stop it without leaving it behind.

A worker process is ``python -m runtime.worker_process '<json options>'``
started with a pipe on its standard input.  The child treats end-of-file on
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

TLS credentials (a pickled :class:`~runtime.security.Security`) reach the
child through a third pipe (``--security-fd N``), written in full before the
child starts and read by it once: never on the command line or in the
environment, which other users of the machine can see.

Exit codes: 0 when the worker closed on purpose, :data:`RESTART_EXIT_CODE`
when it closed asking to be replaced (``lifetime_restart``), anything else
(or a signal) when it failed or was killed.
"""

from __future__ import annotations

import asyncio
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

if TYPE_CHECKING:
    from .security import Security

logger = logging.getLogger(__name__)


#: Exit code of a worker process whose worker asked to be replaced by a fresh
#: one (``Worker.restart_requested``, e.g. ``lifetime_restart``): EX_TEMPFAIL.
RESTART_EXIT_CODE = 75


class WorkerProcessError(ClusterError):
    """A worker process failed to start (its message says why)."""


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment, with ``sys.path`` passed on so the child imports what we import."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
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
        options = json.dumps({"scheduler_ip": self.scheduler_address, **self.worker_kwargs})
        args = [sys.executable, "-m", "runtime.worker_process", options]
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
                *args, stdin=asyncio.subprocess.PIPE, env=child_environment(self.env),
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
        return self

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
