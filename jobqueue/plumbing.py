"""The sync/async plumbing shared by the clusters, one-shot MPI jobs and the command seam.

Theory of operation
-------------------
Everything in :mod:`cluster.jobqueue` is written as coroutines; two ways lead into them
from synchronous code:

- :class:`SyncAsync`, the base of :class:`~cluster.jobqueue.core.JobQueueCluster`: an
  object that lives on ONE event loop -- the caller's with
  ``asynchronous=True``, else the shared background loop of
  :data:`cluster.runtime.loop.loop_runner` (acquired at construction, released at
  close).  Its public methods call :meth:`SyncAsync._run`, which returns an
  awaitable in asynchronous mode and the result otherwise.  It also gives
  ``await obj``, ``async with obj`` and ``with obj``.
- :func:`blocking`: run one coroutine to completion on a fresh event loop --
  in a helper thread if the calling thread already runs one -- for objects
  with no loop of their own (:class:`~cluster.jobqueue.submit.MPIJob`) and for
  interpreter exit and finalizers (:func:`cluster.jobqueue.commands.run_blocking`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cluster.runtime.loop import loop_runner, sync

_T = TypeVar("_T")


def blocking(make: Callable[[], Awaitable[_T]], timeout: float | None = None) -> _T:
    """Run the coroutine ``make()`` to completion from synchronous code, on a fresh event loop.

    Args:
        make: makes the coroutine (called on the loop that runs it).
        timeout: when the calling thread runs an event loop (so a helper
            thread runs the coroutine), give up waiting after this long.

    Raises:
        TimeoutError: the helper thread did not finish within ``timeout``.
        whatever the coroutine raised.
    """
    async def main() -> _T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(main())
        except BaseException as e:  # handed to the calling thread
            box["error"] = e

    thread = threading.Thread(target=target, name="jobqueue-blocking", daemon=True)
    thread.start()
    thread.join(timeout)
    if "error" in box:
        raise box["error"]
    if "result" not in box:
        raise TimeoutError(f"did not finish within {timeout:g}s")
    return box["result"]


class SyncAsync:
    """An object living on one event loop, used from synchronous or asynchronous code.

    Subclasses implement ``async _start()`` (returning ``self``) and
    ``async _close()``, call :meth:`_enter_loop` at the end of their
    ``__init__``, and route public methods through :meth:`_run`.
    """

    asynchronous: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    _uses_runner: bool = False

    async def _start(self) -> Any:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def _enter_loop(self) -> None:
        """Synchronous mode: acquire the shared loop and start there (closed again on failure)."""
        if self.asynchronous:
            return
        self.loop = loop_runner.acquire()
        self._uses_runner = True
        try:
            sync(self.loop, self._start)
        except BaseException:
            try:
                sync(self.loop, self._close)
            except Exception:  # the start's error is the one to raise
                pass
            self._release_loop()
            raise

    def _run(self, func: Callable[[], Awaitable[_T]]) -> Any:
        """``func()`` as an awaitable (asynchronous mode) or its result."""
        if self.asynchronous:
            return asyncio.ensure_future(func())
        return sync(self.loop, func)

    def _release_loop(self) -> None:
        if self._uses_runner:
            self._uses_runner = False
            loop_runner.release()

    @property
    def closed(self) -> bool:
        return getattr(self, "status", "") == "closed"

    def close(self, timeout: float | None = None) -> Any:
        """Close (an awaitable in asynchronous mode)."""
        if self.asynchronous:
            return self._close()
        if self.closed:
            self._release_loop()
            return None
        try:
            if self.loop is not None:
                sync(self.loop, self._close, timeout=timeout)
        finally:
            self._release_loop()
        return None

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self):
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SyncAsync", "blocking"]
