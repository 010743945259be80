"""The event loop that synchronous clients and clusters run on.

A synchronous ``Client`` or ``LocalCluster`` needs an event loop that is always
running: one daemon thread per process provides it (uvloop when installed, as
it makes small-message round trips about three times cheaper).  ``sync`` runs
a coroutine there and blocks the caller until it finishes.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import ClusterTimeoutError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if available, else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Awaitable[T]) -> T:
    """``asyncio.run`` on our preferred loop (used by the command line and worker processes)."""
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


class LoopRunner:
    """One event loop on a daemon thread, shared by the synchronous objects of a process."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.users = 0

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            self.users += 1
            if self.loop is None or self.thread is None or not self.thread.is_alive():
                loop = new_event_loop()
                ready = threading.Event()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()
                    try:
                        _cancel_all(loop)
                    finally:
                        loop.close()

                thread = threading.Thread(target=main, name="cluster-event-loop", daemon=True)
                thread.start()
                ready.wait()
                self.loop, self.thread = loop, thread
            return self.loop

    def release(self) -> None:
        """Drop one user; the last one stops the loop and joins its thread."""
        with self._lock:
            self.users -= 1
            if self.users > 0 or self.loop is None:
                return
            loop, thread = self.loop, self.thread
            self.loop = self.thread = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)


loop_runner = LoopRunner()


def sync(loop: asyncio.AbstractEventLoop, func: Callable[..., Awaitable[T]], *args,
         timeout: float | None = None, **kwargs) -> T:
    """Run ``func(*args, **kwargs)`` on ``loop`` (another thread's) and wait for it.

    Raises:
        ClusterTimeoutError: after ``timeout`` seconds (the coroutine is cancelled).
        whatever the coroutine raised.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("sync() called from the event loop it would block; use the asynchronous API")
    fut = asyncio.run_coroutine_threadsafe(_call(func, args, kwargs), loop)
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        if fut.done():
            raise  # the coroutine's own timeout, with its own message
        fut.cancel()
        raise ClusterTimeoutError(f"operation did not finish within {timeout}s") from None


async def _call(func, args, kwargs) -> Any:
    return await func(*args, **kwargs)


@atexit.register
def _stop_at_exit() -> None:  # pragma: no cover - interpreter shutdown
    runner = loop_runner
    if runner.loop is not None:
        try:
            runner.loop.call_soon_threadsafe(runner.loop.stop)
        except RuntimeError:
            pass
