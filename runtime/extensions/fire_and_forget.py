"""``fire_and_forget``: tasks that run to completion even when every client lets go of them.

Theory of operation
-------------------
:func:`fire_and_forget` asks the scheduler to hold the futures' keys under the
pseudo-client ``"fire-and-forget"`` (:class:`FireAndForgetExtension`, the
scheduler's part ``scheduler.extensions["fire_and_forget"]``); the client's
own futures may then be dropped.  A task held this way is let go of once it has
finished (in memory) or failed, so its result is freed unless someone else
wants it, as dask.distributed does.

The scheduler's state lets go of them itself: when a task that the
pseudo-client holds finishes or fails, the transition drops that hold
(``SchedulerState._let_go_fire_and_forget``), so nothing here watches the tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

from ..futures import futures_of
from ..scheduler.state import FIRE_AND_FORGET
from . import holding

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..futures import Future
    from ..scheduler.server import Scheduler

logger = logging.getLogger(__name__)

#: The pseudo-client that holds fire-and-forget tasks (the state's own name for it).
HOLDER = FIRE_AND_FORGET

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
        #: How long to wait for keys still on their way on a client's stream.
        self.key_arrival_timeout = holding.KEY_ARRIVAL_TIMEOUT
        self.handlers = {"fire_and_forget": self.hold}

    async def hold(self, keys: Iterable[Hashable], client: str | None = None) -> list:
        """Hold ``keys`` until their tasks are done; keys the scheduler does not know
        (already forgotten) and tasks already done are skipped.

        Returns:
            The keys now held.
        """
        keys = list(keys)
        await holding.wait_known(self.scheduler, keys, self.key_arrival_timeout)
        tasks = self.scheduler.state.tasks
        held = [k for k in keys if k in tasks and tasks[k].state not in _DONE]
        holding.hold(self.scheduler, HOLDER, held)
        return held


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
