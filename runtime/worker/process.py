"""Entry point of a worker child process (see :mod:`cluster.runtime.process`).

Usage::

    python -m cluster.runtime.worker.process '<json Worker options>' [--ready-fd N] [--worker-class M.C]
                                     [--security-fd N]
    python -m cluster.runtime.worker.process --options-from-stdin [--ready-fd N]   # pre-warmed

The worker closes when its standard input reaches end-of-file (the parent
closed the pipe or died), or when the scheduler tells it to.  SIGTERM/SIGINT
make it retire gracefully (its unique data moves to other workers) within
``GRACEFUL_SIGNAL_TIMEOUT`` seconds; a second signal, or the deadline, closes
it at once.
With ``--ready-fd`` the child writes one JSON line to that file descriptor
once the worker has registered with the scheduler (``{"status": "running",
"address": ...}``) or failed to start (``{"status": "error", "error": ...}``),
then closes it; the parent learns the worker's address from it.  The exit
code is 0 after a normal close, ``RESTART_EXIT_CODE`` (75) when the worker asked
to be replaced by a fresh one (``Worker.restart_requested``).
With ``--security-fd`` the child reads a pickled ``Security`` (its TLS
credentials) from that file descriptor, to its end, before anything else.
With ``--options-from-stdin`` (a pre-warmed child, see
:func:`cluster.runtime.process.prewarm`) the child has imported the runtime already
and reads its options, worker class and credentials from its stdin pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import pickle
import signal
import sys
import threading
from contextlib import suppress
from typing import Any

from ..loop import run
from . import RESTART_EXIT_CODE, WARM_FLAG
from .server import Worker

#: Seconds a worker gets to retire gracefully after SIGTERM before it just closes.
GRACEFUL_SIGNAL_TIMEOUT = 30.0

logger = logging.getLogger("cluster.runtime.worker_process")


def report_ready(fd: int | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` as one JSON line to ``fd`` and close it (no-op without a fd)."""
    if fd is None:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(payload, default=str) + "\n").encode())
    except OSError:  # the parent is gone; stdin EOF will close us
        pass


def load_worker_class(path: str | None) -> type:
    """The class named ``"module.Class"`` (default :class:`cluster.runtime.worker.Worker`).

    Raises:
        ValueError: ``path`` is not of the form ``module.Class``.
        ImportError / AttributeError: the module or class does not exist.
    """
    if not path:
        return Worker
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"worker class {path!r}: expected 'module.Class'")
    return getattr(importlib.import_module(module), name)


def read_security(fd: int | None):
    """The pickled ``Security`` our parent left in the pipe ``fd`` (``None`` without one).

    The pipe is private to our parent and us, which is why unpickling is fine.
    """
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        return pickle.loads(f.read())


def read_options_from_stdin() -> tuple[dict, str | None, Any]:
    """A pre-warmed child's options, from its stdin: ``(options, worker_class, security)``.

    The parent writes one JSON line (``options``, ``worker_class``,
    ``security_bytes``) and then that many bytes of pickled ``Security``, and
    nothing else (later, stdin only tells us when the parent is gone).  Read
    from the raw descriptor, exactly that much.  End-of-file first (the parent
    did not need us after all) ends the process quietly.
    """
    fd = sys.stdin.fileno()
    buf = bytearray()
    while b"\n" not in buf:
        chunk = os.read(fd, 65536)
        if not chunk:
            os._exit(0)
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    header = json.loads(line)
    want = int(header.get("security_bytes") or 0)
    secret = bytearray(rest)
    while len(secret) < want:
        chunk = os.read(fd, want - len(secret))
        if not chunk:
            os._exit(0)
        secret += chunk
    security = pickle.loads(bytes(secret)) if want else None
    return header.get("options") or {}, header.get("worker_class"), security


def _exit_if_parent_gone_during_startup(stdin_fd: int, started: threading.Event) -> None:
    """Until the worker has started, a parent that goes away ends this process at once
    (otherwise an orphan would keep trying to reach its scheduler for death_timeout)."""
    try:
        while not started.is_set():
            if not os.read(stdin_fd, 65536):
                if not started.is_set():
                    os._exit(1)
                return
    except OSError:
        return


async def serve(options: dict, ready_fd: int | None = None, worker_class: str | None = None) -> int:
    started = threading.Event()
    try:
        early_fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        early_fd = -1
    if early_fd >= 0 and not os.isatty(early_fd):
        # The parent never writes to our stdin, so this read returns only at EOF.
        threading.Thread(target=_exit_if_parent_gone_during_startup, args=(early_fd, started),
                         name="watch-parent-startup", daemon=True).start()
    try:
        worker = load_worker_class(worker_class)(**options)
        await worker
        started.set()
    except BaseException as e:
        report_ready(ready_fd, {"status": "error", "error": f"{type(e).__name__}: {e}"})
        raise
    report_ready(ready_fd, {"status": "running", "address": worker.address, "pid": os.getpid(),
                            "name": worker.name, "local_directory": worker.local_directory})
    loop = asyncio.get_running_loop()

    def request_close(reason: str) -> None:
        if worker.status not in ("closing", "closed"):
            logger.info("worker %s closing: %s", worker.address, reason)
            asyncio.ensure_future(worker.close(reason=reason))

    retiring: list[asyncio.Task] = []

    def request_retire(signame: str) -> None:
        """First SIGTERM/SIGINT: retire gracefully (data moved away) within a deadline;
        a second one: close at once."""
        if retiring:
            request_close(f"second {signame}")
            return

        async def retire() -> None:
            try:
                await asyncio.wait_for(worker.close_gracefully(reason=f"signal-{signame}"),
                                       GRACEFUL_SIGNAL_TIMEOUT)
            except asyncio.TimeoutError:
                logger.warning("worker %s could not retire within %ss of %s; closing",
                               worker.address, GRACEFUL_SIGNAL_TIMEOUT, signame)
                await worker.close(reason=f"signal-{signame}")

        if worker.status not in ("closing", "closed"):
            logger.info("worker %s retiring gracefully on %s", worker.address, signame)
            retiring.append(asyncio.ensure_future(retire()))

    def watch_stdin() -> None:
        # os.read on the raw descriptor, not sys.stdin.buffer: a daemon thread
        # blocked inside the BufferedReader holds its lock, and the interpreter
        # aborts (SIGABRT) when it finds that lock taken at shutdown -- which
        # happens whenever the worker closes while its parent is still there.
        try:
            while os.read(stdin_fd, 65536):
                pass
        except OSError:
            pass
        try:
            loop.call_soon_threadsafe(request_close, "parent-gone")
        except RuntimeError:  # loop already closed
            pass

    try:
        stdin_fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # no stdin at all
        stdin_fd = -1
    if stdin_fd >= 0 and not os.isatty(stdin_fd):
        threading.Thread(target=watch_stdin, name="watch-parent", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_retire, signal.Signals(sig).name)
    await worker.finished()
    if getattr(worker, "restart_requested", False):
        return RESTART_EXIT_CODE
    return 0


def _close_inherited_fds(keep: set[int]) -> None:
    """Close every inheritable descriptor above stderr but ``keep``.

    A forked worker must not hold what its parent inherited -- an MPI
    launcher's PMI socket, the other ranks' output pipes -- open after the
    parent has gone.  Descriptors that Python opened itself are
    close-on-exec and may belong to objects that would close them again
    later (perhaps a reused number): those are left alone.
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no procfs: up to the descriptor limit
        fds = list(range(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024))
    for fd in fds:
        if fd <= 2 or fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                os.close(fd)
        except OSError:  # the listing's own descriptor, already closed
            pass


def run_forked(stdin_fd: int, ready_fd: int, env: dict[str, str], path: list[str],
               parent_fds: tuple[int, ...] = ()) -> None:
    """The body of a worker process made by ``os.fork`` (:func:`cluster.runtime.process.prewarm`).

    Turns the fork into what ``python -P -m cluster.runtime.worker.process
    --options-from-stdin`` would be -- its own session, ``stdin_fd`` as its
    stdin, no other inherited descriptor but ``ready_fd``, the environment
    ``env``, ``sys.path`` without the working directory (``path``) -- runs
    :func:`main` and exits with its status.  ``parent_fds`` are the parent's
    ends of our pipes, closed here (holding our own stdin's write end, we
    would never see end-of-file).  Never returns: nothing of the
    parent's call stack runs in the child.
    """
    code = 1
    try:
        import atexit

        atexit._clear()  # the parent's exit handlers are the parent's business
        os.setsid()
        for fd in parent_fds:
            os.close(fd)
        os.dup2(stdin_fd, 0)
        if stdin_fd != 0:
            os.close(stdin_fd)
        _close_inherited_fds({ready_fd})
        os.set_inheritable(ready_fd, False)
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
        sys.argv = [__file__, WARM_FLAG, "--ready-fd", str(ready_fd)]
        code = main(sys.argv[1:])
        atexit._run_exitfuncs()
    except BaseException:  # noqa: B036 - nothing may escape into the parent's code
        with suppress(Exception):
            logger.exception("forked worker process failed")
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(Exception):
                stream.flush()
        with suppress(Exception):
            logging.shutdown()
        os._exit(code if isinstance(code, int) else 1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m cluster.runtime.worker.process")
    parser.add_argument("options", nargs="?", default="{}", help="JSON keyword arguments for Worker")
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="file descriptor to report the registered worker's address on")
    parser.add_argument("--worker-class", default=None, help="'module.Class' to run instead of Worker")
    parser.add_argument("--security-fd", type=int, default=None,
                        help="file descriptor to read the pickled TLS credentials from")
    parser.add_argument(WARM_FLAG, dest="warm", action="store_true",
                        help="pre-warmed: read the options, worker class and credentials from "
                             "stdin (see cluster.runtime.process.prewarm)")
    args = parser.parse_args(argv)
    worker_class = args.worker_class
    if args.warm:
        options, worker_class, security = read_options_from_stdin()
    else:
        options = json.loads(args.options)
        security = read_security(args.security_fd)
    if security is not None:
        options["security"] = security
    try:
        return run(serve(options, args.ready_fd, worker_class))
    except Exception:
        logger.exception("worker process failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
