"""Values that may be futures, kept by the scheduler for someone else: the pieces
that variables, queues and published datasets share.

Theory of operation
-------------------
A value crosses to the scheduler as a *record*, made on the client side by
:func:`encode`: a future travels as its key (``{"type": "Future", "key": k}``);
anything else travels pickled (``{"type": "data", "data": bytes, "keys": [...]}``)
with the keys of the futures inside it, so that the scheduler never unpickles
user objects.  The extension holding the record keeps those keys alive under a
pseudo-client name of its own (:func:`cluster.runtime.scheduler.extensions.hold_keys`).

Two races are closed on the scheduler side:

- a future submitted just before it is stored reaches the scheduler on the
  client's stream, the store request on another connection:
  :func:`wait_known` waits (without blocking the event loop, bounded) for the
  key to arrive before holding it;
- between the reply that hands a future out and the receiving client's own
  ``update_graph`` for it, the holder may let go of the key (a queue item is
  taken, a variable overwritten): :func:`hand_over` makes the receiving client
  want the key *before* the reply leaves, so it is never forgotten in between.

On the receiving side :func:`decode` turns the record into a value whose futures
belong to the client that asked (not to whichever client is the default).
"""

from __future__ import annotations

import asyncio
import io
import pickle
import time
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

from ..comm.serialize import dumps_function
from ..errors import ClusterTimeoutError, CommClosedError
from ..futures import Future, current_client, futures_of
from ..scheduler.extensions import hold_keys, release_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..scheduler.server import Scheduler

Key = Hashable

#: How long a store request waits for a key still on its way on the client's stream.
KEY_ARRIVAL_TIMEOUT = 5.0


# ----------------------------------------------------------------------------- client side


def resolve_client(client: Client | None) -> Client:
    """``client``, else the client of this place: the worker's inside a task, the default one elsewhere."""
    if client is not None:
        return client
    return current_client()


def encode(value: Any) -> dict:
    """The record of ``value`` to send to the scheduler (see the module docstring).

    Raises:
        TaskSerializationError: ``value`` does not pickle (named).
    """
    if isinstance(value, Future):
        return {"type": "Future", "key": value.key}
    return {"type": "data", "data": dumps_function(value), "keys": [f.key for f in futures_of(value)]}


def adopt(client: Client, key: Key) -> Future:
    """A future of ``client`` for ``key``, which the scheduler already has; the scheduler
    is told that the client wants it (and answers with its state)."""
    future = Future(key, client)
    client.want_keys([key])
    return future


class _Unpickler(pickle.Unpickler):
    """Unpickles futures as futures of one given client (not the default one)."""

    def __init__(self, data: bytes, client: Client):
        super().__init__(io.BytesIO(data))
        self._client = client

    def find_class(self, module: str, name: str) -> Any:
        if module == "cluster.runtime.futures" and name == "_unpickle_future":
            client = self._client
            return lambda key: adopt(client, key)
        return super().find_class(module, name)


def decode(client: Client, record: dict) -> Any:
    """The value of a record from the scheduler; its futures belong to ``client``."""
    if record["type"] == "Future":
        return adopt(client, record["key"])
    return _Unpickler(record["data"], client).load()


async def flushed(client: Client) -> None:
    """Wait until what ``client`` queued for the scheduler is written: a future just
    submitted is then on its way before a request that names it."""
    client._flush_outbox()
    comm = client.scheduler_comm
    if comm is not None and not comm.closed:
        await comm.flush()


def scheduler_call(client: Client, op: str, keep: Any = None, **kwargs) -> Any:
    """Send one request to ``client``'s scheduler, after what it queued; sync or async as the client.

    ``keep`` (the value being stored) stays referenced until the reply: its futures
    must not be released before the scheduler holds them, also when an
    asynchronous caller's own frame is gone (``await v.set(client.submit(...))``).
    """
    async def call(keep: Any = keep):
        await flushed(client)
        return await client.rpc.call(client._link, op, client=client.id, **kwargs)

    return client.sync(call)


# ----------------------------------------------------------------------------- scheduler side


def record_keys(record: dict | None) -> list:
    """The keys a record keeps alive."""
    if not record:
        return []
    if record.get("type") == "Future":
        return [record["key"]]
    return list(record.get("keys") or ())


def check_record(record: Any) -> dict:
    """``record`` if it has the shape :func:`encode` makes.

    Raises:
        TypeError: anything else (a peer that did not use our client).
    """
    if not isinstance(record, dict) or record.get("type") not in ("Future", "data"):
        raise TypeError(f"record={record!r:.80}: expected {{'type': 'Future', 'key': ...}} or "
                        "{'type': 'data', 'data': bytes, 'keys': [...]}")
    if record["type"] == "data" and not isinstance(record.get("data"), (bytes, bytearray)):
        raise TypeError("record['data']: expected the pickled value (bytes)")
    return record


async def wait_known(scheduler: Scheduler, keys: Iterable[Key],
                     timeout: float | None = KEY_ARRIVAL_TIMEOUT) -> list:
    """Wait until the scheduler knows ``keys`` or ``timeout`` passes (a key submitted
    just before may still be on the client's stream).  Only this race waits: keys
    known at once return at once, and the event loop keeps running meanwhile.

    Returns:
        The keys still unknown.
    """
    keys = list(keys)
    deadline = time.monotonic() + (KEY_ARRIVAL_TIMEOUT if timeout is None else timeout)
    delay = 0.001
    while True:
        missing = [k for k in keys if k not in scheduler.state.tasks]
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def require_known(scheduler: Scheduler, keys: Iterable[Key], what: str,
                        timeout: float | None = KEY_ARRIVAL_TIMEOUT) -> None:
    """:func:`wait_known`, then refuse futures the scheduler does not have.

    Raises:
        ClusterTimeoutError: naming the keys that did not arrive (released or cancelled futures).
    """
    missing = await wait_known(scheduler, keys, timeout)
    if missing:
        raise ClusterTimeoutError(f"{what}: the scheduler does not know the futures {missing!r:.200} "
                                  "(released or cancelled?)")


def hold(scheduler: Scheduler, holder: str, keys: Iterable[Key]) -> None:
    """Keep ``keys`` alive for ``holder`` (:func:`cluster.runtime.scheduler.extensions.hold_keys`)."""

    hold_keys(scheduler, holder, keys)


def release(scheduler: Scheduler, holder: str, keys: Iterable[Key]) -> None:
    """Stop holding ``keys`` for ``holder``; a holder left holding nothing is forgotten
    (pseudo-clients do not pile up in the scheduler's client table)."""

    release_keys(scheduler, holder, keys)
    cs = scheduler.state.clients.get(holder)
    if cs is not None and not cs.wants_what:
        del scheduler.state.clients[holder]


def hand_over(scheduler: Scheduler, client: str | None, keys: Iterable[Key]) -> None:
    """Make ``client`` want ``keys`` now, before the reply that gives it futures for them
    leaves (see the module docstring).  A client the scheduler does not know (gone,
    or none named) is skipped."""
    if client is not None and client in scheduler.state.clients:
        hold(scheduler, client, keys)


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, float(timeout))


class Waiters:
    """Requests waiting on the scheduler's loop for a change (a value set, an item
    put, room made): each waits on its own future, :meth:`notify_all` wakes them all,
    and they check again.  Waiting never blocks the event loop."""

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Future, str | None] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    async def wait(self, deadline: float | None, client: str | None, what: str) -> None:
        """Wait for the next :meth:`notify_all`.

        Raises:
            ClusterTimeoutError: at ``deadline`` (a ``TimeoutError``), saying ``what`` was awaited.
            CommClosedError: the waiting client left, or the scheduler is closing.
        """
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise ClusterTimeoutError(f"timed out waiting for {what}")
        fut = asyncio.get_running_loop().create_future()
        self._waiting[fut] = client
        try:
            await asyncio.wait_for(fut, left)
        except asyncio.TimeoutError:
            raise ClusterTimeoutError(f"timed out waiting for {what}") from None
        finally:
            self._waiting.pop(fut, None)

    def notify_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)

    def cancel(self, client: str | None = None) -> None:
        """End the waits of ``client`` (all waits when ``None``: the scheduler is closing),
        with :class:`CommClosedError`: nobody will read their answer."""
        reason = "the scheduler is closing" if client is None else f"client {client} left"
        for fut, c in list(self._waiting.items()):
            if client is None or c == client:
                self._waiting.pop(fut, None)
                if not fut.done():
                    fut.set_exception(CommClosedError(reason))
