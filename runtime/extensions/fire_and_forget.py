"""``fire_and_forget``: tasks that run to completion even when every client lets go of them.

Theory of operation
-------------------
:func:`fire_and_forget` asks the scheduler to hold the futures' keys under the
pseudo-client ``"fire-and-forget"`` (:class:`FireAndForgetExtension`, the
scheduler's part ``scheduler.extensions["fire_and_forget"]``); the client's
own futures may then be dropped.  A task held this way is let go of once it has
finished (in memory) or failed, so its result is freed unless someone else
wants it, as dask.distributed does.

The seam gives extensions no hook on task transitions, so the extension looks
at the states of the keys it holds on the scheduler's loop, every
:data:`SWEEP_INTERVAL` seconds and only while it holds any (a set lookup per
held key; no client is involved and nothing blocks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

from ..futures import futures_of
from . import holding

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..futures import Future
    from ..scheduler.server import Scheduler

logger = logging.getLogger(__name__)

#: The pseudo-client that holds fire-and-forget tasks.
HOLDER = "fire-and-forget"

#: Seconds between looks at the held tasks' states.
SWEEP_INTERVAL = 0.1

#: Task states after which nothing more happens to a task by itself.
_DONE = frozenset({"memory", "erred", "forgotten"})

#: Background requests of asynchronous clients, kept until they finish.
_pending: set[Any] = set()


class FireAndForgetExtension:
    """The scheduler's fire-and-forget tasks: ``fire_and_forget``.

    Args:
        scheduler: the scheduler this is a part of.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        #: Keys held until their tasks finish or fail.
        self.held: set[Hashable] = set()
        self._sweeper: asyncio.Task | None = None
        #: How long to wait for keys still on their way on a client's stream.
        self.key_arrival_timeout = holding.KEY_ARRIVAL_TIMEOUT
        self.handlers = {"fire_and_forget": self.hold}

    async def hold(self, keys: Iterable[Hashable], client: str | None = None) -> list:
        """Hold ``keys`` until their tasks are done; keys the scheduler does not know
        (already forgotten) are skipped.

        Returns:
            The keys now held.
        """
        keys = list(keys)
        await holding.wait_known(self.scheduler, keys, self.key_arrival_timeout)
        known = [k for k in keys if k in self.scheduler.state.tasks]
        holding.hold(self.scheduler, HOLDER, known)
        self.held.update(known)
        self.sweep()
        if self.held and (self._sweeper is None or self._sweeper.done()):
            self._sweeper = asyncio.ensure_future(self._sweep_while_holding())
        return known

    def sweep(self) -> list:
        """Let go of the held keys whose tasks are done; return them."""
        tasks = self.scheduler.state.tasks
        done = []
        for k in self.held:
            ts = tasks.get(k)
            if ts is None or ts.state in _DONE:
                done.append(k)
        if done:
            self.held.difference_update(done)
            holding.release(self.scheduler, HOLDER, [k for k in done if k in tasks])
        return done

    async def _sweep_while_holding(self) -> None:
        while self.held:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:  # the scheduler's state is not ours to break: log and go on
                logger.exception("fire-and-forget: sweeping the held tasks failed")

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.held.clear()


def fire_and_forget(obj: Any) -> None:
    """Run the futures' tasks to completion even if every client lets go of them.

    Args:
        obj: a future, a (nested) list/tuple/set/dict of futures, or a persisted
            dask collection.

    A synchronous client returns once the scheduler holds the tasks; with an
    asynchronous client the request is sent in the background (the futures are
    kept until the scheduler holds them), as dask.distributed does.
    """
    by_client: dict[Client, list[Future]] = {}
    for f in futures_of(obj):
        by_client.setdefault(f.client, []).append(f)
    for client, futures in by_client.items():
        keys = [f.key for f in futures]
        if not client.asynchronous:
            holding.scheduler_call(client, "fire_and_forget", keys=keys)
            continue

        async def send(client: Client = client, keys: list = keys, futures: list = futures) -> None:
            try:
                await holding.scheduler_call(client, "fire_and_forget", keep=futures, keys=keys)
            except Exception:
                logger.exception("fire_and_forget of %d futures failed", len(futures))

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is client.loop:
            task: Any = asyncio.ensure_future(send())
        else:  # another thread than the asynchronous client's loop
            task = asyncio.run_coroutine_threadsafe(send(), client.loop)
        _pending.add(task)
        task.add_done_callback(_pending.discard)
