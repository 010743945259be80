"""Entry point of a worker child process (see :mod:`runtime.process`).

Usage::

    python -m runtime.worker_process '<json Worker options>' [--ready-fd N] [--worker-class M.C]

The worker closes when its standard input reaches end-of-file (the parent
closed the pipe or died), on SIGTERM/SIGINT, or when the scheduler tells it to.
With ``--ready-fd`` the child writes one JSON line to that file descriptor
once the worker has registered with the scheduler (``{"status": "running",
"address": ...}``) or failed to start (``{"status": "error", "error": ...}``),
then closes it; the parent learns the worker's address from it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from .loop import run
from .worker import Worker

logger = logging.getLogger("runtime.worker_process")


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
    """The class named ``"module.Class"`` (default :class:`runtime.worker.Worker`).

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


async def serve(options: dict, ready_fd: int | None = None, worker_class: str | None = None) -> int:
    try:
        worker = load_worker_class(worker_class)(**options)
        await worker
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

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except (OSError, ValueError):
            pass
        try:
            loop.call_soon_threadsafe(request_close, "parent-gone")
        except RuntimeError:  # loop already closed
            pass

    if sys.stdin is not None and not sys.stdin.isatty():
        threading.Thread(target=watch_stdin, name="watch-parent", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_close, signal.Signals(sig).name)
    await worker.finished()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m runtime.worker_process")
    parser.add_argument("options", nargs="?", default="{}", help="JSON keyword arguments for Worker")
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="file descriptor to report the registered worker's address on")
    parser.add_argument("--worker-class", default=None, help="'module.Class' to run instead of Worker")
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    try:
        return run(serve(options, args.ready_fd, args.worker_class))
    except Exception:
        logger.exception("worker process failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
