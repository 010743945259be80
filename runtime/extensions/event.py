"""Distributed events: the scheduler's part and the ``Event`` users hold.

Theory of operation
-------------------
The scheduler keeps, per event name, whether it is set and the futures of the
``event_wait`` requests waiting for it.  ``event_set`` resolves every waiting
future; a waiter waits on its own future with the caller's deadline
(``asyncio.wait``: no polling, the scheduler's loop never blocks).  A waiter
whose client goes away, or any waiter when the scheduler closes, fails at
once.  An event that is clear and has no waiters is forgotten: it is the same
as one never made, so the table holds only events in use.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CommClosedError
from .semaphore import ClientBound, check_name, duration

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..scheduler.server import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class EventState:
    """One named event on the scheduler."""

    is_set: bool = False
    #: ``{future: client id}`` of the requests waiting.
    waiters: dict[asyncio.Future, str | None] = field(default_factory=dict)


class EventExtension:
    """The scheduler's events.

    Operations: ``event_set``, ``event_clear``, ``event_is_set``, ``event_wait``.

    Args:
        scheduler: the scheduler this is a part of.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.events: dict[str, EventState] = {}
        self.handlers = {
            "event_set": self.event_set,
            "event_clear": self.event_clear,
            "event_is_set": self.event_is_set,
            "event_wait": self.event_wait,
        }

    def event_set(self, name: str) -> None:
        """Set ``name``: every waiter returns ``True``, and later waits return at once."""
        ev = self.events.setdefault(check_name(name), EventState())
        ev.is_set = True
        for fut in ev.waiters:
            if not fut.done():
                fut.set_result(True)

    def event_clear(self, name: str) -> None:
        """Clear ``name``: later waits wait for the next ``set``."""
        ev = self.events.get(check_name(name))
        if ev is not None:
            ev.is_set = False
            self._forget_if_unused(name)

    def event_is_set(self, name: str) -> bool:
        """Whether ``name`` is set."""
        ev = self.events.get(check_name(name))
        return ev is not None and ev.is_set

    async def event_wait(self, name: str, timeout: Any = None, client: str | None = None) -> bool:
        """Wait until ``name`` is set, at most ``timeout`` seconds.

        Returns:
            ``True`` if it is set, ``False`` if ``timeout`` passed first.

        Raises:
            CommClosedError: the waiting client went away, or the scheduler is closing.
        """
        timeout = duration(timeout, "timeout", allow_none=True)
        ev = self.events.setdefault(check_name(name), EventState())
        if ev.is_set:
            return True
        if timeout == 0:
            self._forget_if_unused(name)
            return False
        fut = asyncio.get_running_loop().create_future()
        ev.waiters[fut] = client
        try:
            await asyncio.wait({fut}, timeout=None if timeout is None or math.isinf(timeout) else timeout)
        finally:
            ev.waiters.pop(fut, None)
            if not fut.done():
                fut.cancel()
            self._forget_if_unused(name)
        if fut.cancelled():  # the deadline passed
            return False
        return fut.result()  # True, or the exception it was failed with

    def remove_client(self, client: str) -> None:
        """A client went away: its waits fail (nobody would hear their answer)."""
        self._fail(lambda c: c == client, CommClosedError(f"client {client} went away"))

    def close(self) -> None:
        """The scheduler is closing: every wait fails."""
        self._fail(lambda c: True, CommClosedError("the scheduler is closing"))

    def _fail(self, match, exc: BaseException) -> None:
        for ev in self.events.values():
            for fut, client in list(ev.waiters.items()):
                if match(client) and not fut.done():
                    fut.set_exception(exc)

    def _forget_if_unused(self, name: str) -> None:
        ev = self.events.get(name)
        if ev is not None and not ev.is_set and not ev.waiters:
            del self.events[name]


class Event(ClientBound):
    """An event shared by every client and task of a cluster, by name.

    dask.distributed's ``Event``: like ``threading.Event`` across processes.
    Pickles by name (in a task it attaches to the worker's client).

    Example::

        ready = Event("inputs-ready")
        ready.wait(timeout=60)      # in some tasks
        ready.set()                 # elsewhere

    Args:
        name: the event's name (default: a new unique one).
        client: the client to use (default: the client of this context; in a
            task, the worker's client).
    """

    def __init__(self, name: str | None = None, client: Client | None = None):
        self.name = check_name(name or f"event-{uuid.uuid4().hex}")
        self._client = client

    def __reduce__(self):
        return (Event, (self.name,))

    def __repr__(self) -> str:
        return f"<Event: name={self.name!r}>"

    def set(self) -> None:
        """Set the event: every waiter is woken."""
        return self._run(self._call, "event_set", name=self.name)

    def clear(self) -> None:
        """Clear the event: later ``wait`` calls wait for the next ``set``."""
        return self._run(self._call, "event_clear", name=self.name)

    def is_set(self) -> bool:
        """Whether the event is set."""
        return self._run(self._call, "event_is_set", name=self.name)

    def wait(self, timeout: Any = None) -> bool:
        """Wait until the event is set, at most ``timeout`` (``None``: for ever).

        Returns:
            ``True`` if it is set, ``False`` if ``timeout`` passed first.
        """
        timeout = duration(timeout, "timeout", allow_none=True)
        return self._run(self._wait, timeout)

    async def _wait(self, timeout: float | None) -> bool:
        return await self._call("event_wait", name=self.name, timeout=timeout, client=self.client.id)
