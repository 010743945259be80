"""``Queue``: a named first-in first-out queue shared by clients and tasks, kept by the scheduler.

Theory of operation
-------------------
:class:`QueueExtension` is the scheduler's part (``scheduler.extensions["queues"]``):
per name, a deque of records (see :mod:`cluster.runtime.extensions.holding`) and a
``maxsize``.  Futures among the items stay in memory while they are queued:
their keys are held under the pseudo-client ``"queue-<name>"``, counted per
key (one future may be queued twice), and handed to the client that takes the
item.  A ``get`` on an empty queue and a ``put`` on a full one wait on the
scheduler's loop (asyncio waits with the caller's deadline); the client sends
one request and waits for its one reply.  A timed-out ``get`` of a batch puts
back what it had taken, in order.

A queue comes into being on first use, with the ``maxsize`` of the handle that
touched it first (dask.distributed creates it when the handle is made; the
handles of one name are expected to agree).

:class:`Queue` is the handle users hold, with dask.distributed's names and
meaning; it pickles by name and maxsize, and inside a task uses the worker's
client.
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from ..utils import parse_timedelta
from . import holding
from .holding import Waiters

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..scheduler.server import Scheduler


class _Queue:
    """One queue on the scheduler: its items, bound, held keys and waiting requests."""

    __slots__ = ("items", "maxsize", "held", "getters", "putters")

    def __init__(self, maxsize: int):
        self.items: deque[dict] = deque()
        self.maxsize = maxsize
        self.held: Counter = Counter()
        self.getters = Waiters()
        self.putters = Waiters()

    def full(self) -> bool:
        return self.maxsize > 0 and len(self.items) >= self.maxsize


def _check_maxsize(maxsize: Any) -> int:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
        raise ValueError(f"maxsize={maxsize!r}: expected a non-negative integer (0: unbounded)")
    return maxsize


def _check_batch(batch: Any) -> bool | int:
    if batch is True or batch is False:
        return batch
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch={batch!r}: expected True (everything queued now), False (one "
                         "item) or a non-negative number of items")
    return batch


class QueueExtension:
    """The scheduler's queues: ``queue_put``, ``queue_get``, ``queue_qsize``.

    Args:
        scheduler: the scheduler this is a part of.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        #: ``{name: queue}`` of every queue used so far.
        self.queues: dict[Hashable, _Queue] = {}
        self.handlers = {
            "queue_put": self.put,
            "queue_get": self.get,
            "queue_qsize": self.qsize,
        }

    @staticmethod
    def holder(name: Hashable) -> str:
        """The pseudo-client that keeps the futures queued in ``name`` alive."""
        return f"queue-{name}"

    def _queue(self, name: Hashable, maxsize: int = 0) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue(_check_maxsize(maxsize))
        return q

    async def put(self, name: Hashable, record: dict, timeout: float | None = None, maxsize: int = 0,
                  client: str | None = None) -> None:
        """Append ``record``, waiting for room while the queue is full.

        Raises:
            TypeError: ``record`` is not a value record.
            ClusterTimeoutError: still full after ``timeout`` seconds (a ``TimeoutError``),
                or a future in it never reached the scheduler.
        """
        holding.check_record(record)
        deadline = holding.deadline_of(timeout)
        q = self._queue(name, maxsize)
        keys = holding.record_keys(record)
        await holding.require_known(self.scheduler, keys, f"queue {name!r}")
        while q.full():
            await q.putters.wait(deadline, client, f"room in queue {name!r} (maxsize={q.maxsize}, "
                                                   f"timeout={timeout}s)")
        q.items.append(record)
        holding.hold(self.scheduler, self.holder(name), keys)
        q.held.update(keys)
        q.getters.notify_all()

    async def get(self, name: Hashable, timeout: float | None = None, batch: bool | int = False,
                  maxsize: int = 0, client: str | None = None) -> dict | list[dict]:
        """Take the oldest record (``batch=False``), all queued now (``True``), or ``batch`` of them.

        The futures in what is taken are handed to ``client``.

        Raises:
            ClusterTimeoutError: nothing (or not ``batch`` items) within ``timeout`` seconds.
        """
        batch = _check_batch(batch)
        deadline = holding.deadline_of(timeout)
        q = self._queue(name, maxsize)
        if batch is True:
            taken = list(q.items)
            q.items.clear()
        else:
            want = 1 if batch is False else batch
            taken = []
            try:
                while len(taken) < want:
                    while not q.items:
                        await q.getters.wait(deadline, client, f"an item in queue {name!r} "
                                                               f"(timeout={timeout}s)")
                    taken.append(q.items.popleft())
            except BaseException:
                q.items.extendleft(reversed(taken))  # not ours after all: back in front, in order
                raise
        self._taken(name, q, taken, client)
        return taken[0] if batch is False else taken

    def _taken(self, name: Hashable, q: _Queue, records: list[dict], client: str | None) -> None:
        keys = [k for r in records for k in holding.record_keys(r)]
        holding.hand_over(self.scheduler, client, keys)
        q.held.subtract(keys)
        gone = [k for k in set(keys) if q.held[k] <= 0]
        for k in gone:
            del q.held[k]
        holding.release(self.scheduler, self.holder(name), gone)
        if records:
            q.putters.notify_all()

    def qsize(self, name: Hashable, maxsize: int = 0, client: str | None = None) -> int:
        """How many items are queued."""
        q = self.queues.get(name)
        return 0 if q is None else len(q.items)

    def remove_client(self, client: str) -> None:
        for q in self.queues.values():
            q.getters.cancel(client)
            q.putters.cancel(client)

    def close(self) -> None:
        for q in self.queues.values():
            q.getters.cancel()
            q.putters.cancel()


class Queue:
    """A first-in first-out queue shared between clients and tasks (dask.distributed's ``Queue``).

    Items go through the scheduler: small values are fine, large data should be
    scattered and the futures queued instead.  A queued future stays in memory
    until someone takes it, even when every client lets go of it.

    Args:
        name: the name other clients and tasks use (default: a new unique one).
        client: the client to talk through (default: the worker's client inside
            a task, else the default client), found when first needed.
        maxsize: at most this many items; ``put`` waits for room (0: unbounded).

    Raises:
        ValueError: ``maxsize`` is not a non-negative integer.
    """

    def __init__(self, name: Hashable | None = None, client: Client | None = None, maxsize: int = 0):
        self.name = name if name is not None else f"queue-{uuid.uuid4().hex}"
        self._client = client
        self.maxsize = _check_maxsize(maxsize)

    @property
    def client(self) -> Client:
        """The client this queue talks through."""
        if self._client is None:
            self._client = holding.resolve_client(None)
        return self._client

    def __repr__(self) -> str:
        return f"<Queue: {self.name!r} maxsize={self.maxsize}>"

    def __reduce__(self):
        # By name: unpickled in a task it talks through that worker's client.
        return (Queue, (self.name, None, self.maxsize))

    def __await__(self):
        async def ready() -> Queue:
            return self

        return ready().__await__()

    def put(self, value: Any, timeout: Any = None):
        """Append ``value`` (a future, or anything that pickles), waiting while the queue is full.

        Raises:
            TimeoutError: still full after ``timeout`` (seconds or a string such as ``"1s"``).
            TaskSerializationError: ``value`` does not pickle.
        """
        return holding.scheduler_call(self.client, "queue_put", keep=value, name=self.name,
                                      record=holding.encode(value), timeout=parse_timedelta(timeout),
                                      maxsize=self.maxsize)

    def get(self, timeout: Any = None, batch: bool | int = False):
        """Take the oldest item, waiting for one.

        Args:
            timeout: seconds (or a string such as ``"1s"``) to wait at most.
            batch: ``True``: everything queued now (a list, maybe empty, without
                waiting); an integer ``n``: a list of the next ``n`` items.

        Returns:
            The item (a future of this queue's client when a future was queued),
            or a list of them with ``batch``.

        Raises:
            TimeoutError: nothing (or fewer than ``batch`` items) within ``timeout``;
                the items of a partial batch stay queued.
            ValueError: ``batch`` is neither a boolean nor a non-negative integer.
        """
        batch = _check_batch(batch)
        client = self.client
        kwargs = {"name": self.name, "timeout": parse_timedelta(timeout), "batch": batch,
                  "maxsize": self.maxsize}
        if client.asynchronous:
            return self._get(client, batch, kwargs)
        return self._decode(client, batch, holding.scheduler_call(client, "queue_get", **kwargs))

    async def _get(self, client: Client, batch: bool | int, kwargs: dict):
        return self._decode(client, batch, await holding.scheduler_call(client, "queue_get", **kwargs))

    @staticmethod
    def _decode(client: Client, batch: bool | int, reply: Any):
        if batch is False:
            return holding.decode(client, reply)
        return [holding.decode(client, r) for r in reply]

    def qsize(self):
        """How many items are queued now."""
        return holding.scheduler_call(self.client, "queue_qsize", name=self.name, maxsize=self.maxsize)
