"""``inproc://`` transport: two queues inside one process.

Servers of ``protocol="inproc"`` listen only here (tests, ``LocalCluster(processes=False,
protocol="inproc")``).  A scheduler that listens on TCP or TLS also listens here and
registers the pair (:func:`register_alias`), so that a ``Client`` in the same process
reaches it through memory: no socket, no TLS record and no system call per message
(issue 14: that was about a fifth of a round trip's CPU).  Only code in this process
can connect, and it could call the scheduler's methods directly anyway.

Messages still go through :func:`dumps`/:func:`loads` so that what works over
inproc also pickles over TCP.  The two ends may live on different event loops
(a client's background thread and a server's loop): a message is delivered on
the reader's loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import CommClosedError
from . import core
from .core import Backend, Comm, Listener
from .serialize import dumps, loads

_listeners: dict[str, InprocListener] = {}
#: Public (TCP/TLS) address of a server in this process -> its inproc address.
_aliases: dict[str, str] = {}
_lock = threading.Lock()
_counter = itertools.count(1)
_CLOSE = object()


def new_address() -> str:
    return f"{os.getpid()}/{next(_counter)}"


def register_alias(address: str, inproc_address: str) -> None:
    """Say that the server at ``address`` also listens at ``inproc_address`` in this process."""
    with _lock:
        _aliases[address] = inproc_address


def unregister_alias(address: str) -> None:
    with _lock:
        _aliases.pop(address, None)


def alias_of(address: str) -> str | None:
    """The inproc address of the server at ``address`` if it runs in this process.

    Only while that listener is open: a closed server's alias leads nowhere.
    """
    with _lock:
        alias = _aliases.get(address)
        if alias is None or alias.removeprefix("inproc://") not in _listeners:
            return None
        return alias


class _Queue:
    """One direction of a pair: written from any thread, read on its owner's loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        loop = self.loop
        if loop is None:
            self.items.append(item)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put_local(item)
        else:
            try:
                loop.call_soon_threadsafe(self._put_local, item)
            except RuntimeError:  # reader's loop is closed: nobody will read
                pass

    def _put_local(self, item: Any) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> Any:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        return self.items.popleft()


class InprocComm(Comm):
    def __init__(self, local: str, peer: str, inq: _Queue, outq: _Queue):
        self._local = "inproc://" + local
        self._peer = "inproc://" + peer
        self._in = inq
        self._out = outq
        self._closed = False

    @property
    def local_address(self) -> str:
        return self._local

    @property
    def peer_address(self) -> str:
        return self._peer

    async def read(self) -> Any:
        if self._closed:
            raise CommClosedError(f"{self._peer}: comm closed")
        item = await self._in.get()
        if item is _CLOSE:
            self._closed = True
            raise CommClosedError(f"{self._peer}: connection closed")
        return loads(item)

    async def write(self, msg: Any) -> int:
        return self._put(msg)

    def write_nowait(self, msg: Any) -> asyncio.Future:
        """Deliver ``msg`` now (no buffer to drain): the returned future is done.

        Raises:
            CommClosedError: the connection is closed.
        """
        self._put(msg)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def _put(self, msg: Any) -> int:
        if self._closed:
            raise CommClosedError(f"{self._peer}: comm closed")
        frames = dumps(msg)
        if len(frames) > 1:
            # Like a socket, the receiver must not share the sender's buffers.
            frames = [frames[0], *(bytearray(f) for f in frames[1:])]
        self._out.put(frames)
        return sum(len(memoryview(f).cast("B")) for f in frames)

    async def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.put(_CLOSE)
            self._in.put(_CLOSE)

    def closed(self) -> bool:
        return self._closed


class InprocListener(Listener):
    def __init__(self, location: str, handler: Callable[[Comm], Awaitable[None]]):
        self.location = location or new_address()
        self.handler = handler
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        with _lock:
            if self.location in _listeners:
                raise OSError(f"inproc address {self.location!r} already in use")
            _listeners[self.location] = self

    def stop(self) -> None:
        with _lock:
            if _listeners.get(self.location) is self:
                del _listeners[self.location]

    def _accept(self, comm: InprocComm) -> None:
        task = asyncio.ensure_future(self.handler(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def listen_address(self) -> str:
        return "inproc://" + self.location


class InprocBackend(Backend):
    async def connect(self, location: str, **kwargs) -> Comm:
        with _lock:
            listener = _listeners.get(location)
        if listener is None or listener.loop is None:
            raise ConnectionRefusedError(f"no inproc listener at {location!r}")
        a, b = _Queue(), _Queue()
        local = new_address()
        ours = InprocComm(local, location, a, b)
        theirs = InprocComm(location, local, b, a)
        a.loop = asyncio.get_running_loop()
        b.loop = listener.loop
        listener.loop.call_soon_threadsafe(listener._accept, theirs)
        return ours

    def listener(self, location, handler, **kwargs) -> Listener:
        return InprocListener(location, handler)


core.backends["inproc"] = InprocBackend()
