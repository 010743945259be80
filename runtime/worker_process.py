"""Entry point of a worker child process (see :mod:`runtime.process`).

Usage: ``python -m runtime.worker_process '<json Worker options>'``.  The worker
closes when its standard input reaches end-of-file (the parent closed the pipe
or died), on SIGTERM/SIGINT, or when the scheduler tells it to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading

from .loop import run
from .worker import Worker

logger = logging.getLogger("runtime.worker_process")


async def serve(options: dict) -> int:
    worker = Worker(**options)
    await worker
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
    options = json.loads(argv[0]) if argv else {}
    return run(serve(options))


if __name__ == "__main__":
    sys.exit(main())
