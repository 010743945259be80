"""The IO shell shared by Scheduler, Worker and Nanny: a message server, an RPC
connection pool, and a batched stream.

Theory of operation
-------------------
Every connection starts with a request ``{"op": name, ...}``.  Ordinary
operations are request/reply: the handler's return value goes back as
``("OK", value)`` or, if it raised, ``("error", exception, traceback_text)``.
A *stream* operation (``register_worker``, ``register_client``) hands the
connection over to its handler for the rest of its life; both sides then
exchange lists of messages through :class:`BatchedSend`.

A connection that sends something that is not a message, names an unknown
operation, or breaks the framing is closed with a logged reason.  Nothing else
is affected: the server keeps serving every other connection.

:class:`BatchedSend` writes at once when the link is idle and coalesces only
the messages that pile up while a write is in flight (or within one turn of
the event loop), so a lone request never waits on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import weakref
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

from .comm import Comm, connect, listen
from .comm.core import Listener
from .errors import ClusterError, CommClosedError, CommError, ProtocolError, UnknownOperationError
from .messages import Spec, check_message, short_repr
from .security import Security, local_credentials, security_from_scheduler_info
from .utils import parse_address, parse_host_port, read_scheduler_info

logger = logging.getLogger(__name__)


def error_reply(exc: BaseException) -> tuple:
    """Reply to a failed request: the exception (pickled if possible) and its traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ("error", exc, tb)


class Status:
    created = "created"
    starting = "starting"
    running = "running"
    closing = "closing"
    closed = "closed"
    failed = "failed"


class Server:
    """Base of every long-running server: awaitable, ``async with``, ``finished()``, ``close()``.

    Subclasses fill ``self.handlers`` (request/reply) and
    ``self.stream_handlers`` (operations that take over the connection) and
    implement :meth:`start_unsafe` and :meth:`close`.
    """

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[..., Any]] = {"identity": self.identity}
        self.stream_handlers: dict[str, Callable[..., Awaitable[None]]] = {}
        #: Shapes of the requests and stream openings to check before their handler runs.
        self.message_specs: Mapping[str, Spec] = {}
        self.listeners: list[Listener] = []
        self.status = Status.created
        self._start_lock: asyncio.Lock | None = None
        self._finished: asyncio.Event | None = None
        self._comms: weakref.WeakSet[Comm] = weakref.WeakSet()
        self._tasks: set[asyncio.Task] = set()
        self.security: Security | None = None
        self.connection_args: dict[str, Any] = {}
        self.listen_args: dict[str, Any] = {}
        self.rpc = ConnectionPool()
        self.loop: asyncio.AbstractEventLoop | None = None

    def _set_security(self, security: Security | None, role: str) -> None:
        """Use ``security``'s credentials for ``role`` to listen and to connect (``rpc``).

        Raises:
            ValueError: the credentials cannot be loaded.
        """
        self.security = security
        if security is None:
            self.connection_args, self.listen_args = {}, {}
        else:
            self.connection_args = security.get_connection_args(role)
            self.listen_args = security.get_listen_args(role)
        self.rpc = ConnectionPool(timeout=self.rpc.timeout, max_idle=self.rpc.max_idle,
                                  **self.connection_args)

    async def _locate_scheduler(self, role: str) -> str:
        """The scheduler's address, and the credentials to reach it (workers and nannies).

        The address is ``scheduler_addr``, or read from ``scheduler_file``
        (waiting up to ``death_timeout`` for it).  The credentials are those
        given; else those the scheduler file points to; else, for a ``tls://``
        scheduler in this very process, its own.
        """
        if self.scheduler_addr is None:
            info = await read_scheduler_info(self.scheduler_file, self.death_timeout or 60.0)
            if not self._security_given:
                security = security_from_scheduler_info(
                    info, self.scheduler_file, allow_plain=getattr(self, "_no_tls", False))
                if security is not None:
                    self._set_security(security, role)
            self.scheduler_addr = info["address"]
        if parse_address(self.scheduler_addr)[0] == "tls" and self.security is None:
            self._set_security(local_credentials(self.scheduler_addr), role)
        return self.scheduler_addr

    # ------------------------------------------------------------------ lifecycle

    def __await__(self):
        return self._start().__await__()

    async def _start(self):
        if self.status == Status.running:
            return self
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.status in (Status.created, Status.failed):
                self.loop = asyncio.get_running_loop()
                self._finished = asyncio.Event()
                self.status = Status.starting
                try:
                    await self.start_unsafe()
                except BaseException:
                    self.status = Status.failed
                    with suppress(Exception):
                        await self.close()
                    raise
                self.status = Status.running
        return self

    async def start_unsafe(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def __aenter__(self):
        await self
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def finished(self) -> None:
        """Wait until this server has closed."""
        if self._finished is None:
            self._finished = asyncio.Event()
        await self._finished.wait()

    def _mark_closed(self) -> None:
        self.status = Status.closed
        if self._finished is not None:
            self._finished.set()

    async def close(self) -> None:  # pragma: no cover - overridden
        await self._close_listeners_and_comms()
        self._mark_closed()

    async def _close_listeners_and_comms(self) -> None:
        for listener in self.listeners:
            listener.stop()
        for comm in list(self._comms):
            comm.abort()
        for task in list(self._tasks):
            task.cancel()
        await self.rpc.close()

    def spawn(self, coro) -> asyncio.Task:
        """Run a background task owned by this server (cancelled on close)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, (CommError, asyncio.CancelledError)):
                logger.error("background task of %s failed", self, exc_info=exc)

    # ------------------------------------------------------------------ serving

    async def listen(self, address: str, **kwargs) -> Listener:
        listener = listen(address, self.handle_comm, **{**self.listen_args, **kwargs})
        await listener.start()
        self.listeners.append(listener)
        return listener

    @property
    def address(self) -> str:
        if not self.listeners:
            raise ValueError(f"{type(self).__name__} is not listening yet; await it first")
        return self.listeners[0].contact_address

    @property
    def listen_address(self) -> str:
        return self.listeners[0].listen_address

    @property
    def port(self) -> int:
        """The port we listen on once bound (a random one when asked for 0); before that, the one asked for."""
        if self.listeners:
            protocol, location = parse_address(self.listen_address)
            if protocol != "inproc":
                return parse_host_port(location)[1]
        return self.__dict__.get("_port", 0)

    @port.setter
    def port(self, value: int) -> None:
        self.__dict__["_port"] = value

    def identity(self) -> dict:
        return {"type": type(self).__name__, "address": self.address}

    async def handle_comm(self, comm: Comm) -> None:
        """Serve one connection until it closes or misbehaves."""
        self._comms.add(comm)
        peer = comm.peer_address
        try:
            while self.status not in (Status.closed,):
                try:
                    msg = await comm.read()
                except CommClosedError:
                    return
                except ProtocolError as e:
                    logger.warning("closing connection from %s: %s", peer, e)
                    return
                if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                    logger.warning("closing connection from %s: not a message: %s", peer,
                                   short_repr(msg))
                    return
                op = msg.pop("op")
                reply = msg.pop("reply", True)
                stream_handler = self.stream_handlers.get(op)
                if stream_handler is not None:
                    await self._open_stream(comm, op, stream_handler, msg)
                    return
                handler = self.handlers.get(op)
                if handler is None:
                    logger.warning("closing connection from %s: unknown operation %s", peer,
                                   short_repr(op))
                    return
                try:
                    check_message(self.message_specs, op, msg)
                    result = handler(**msg)
                    if asyncio.iscoroutine(result):
                        result = await result
                    answer: tuple = ("OK", result)
                except CommClosedError:
                    return
                except Exception as e:
                    logger.debug("handler %s failed", op, exc_info=True)
                    answer = error_reply(e)
                if reply:
                    try:
                        await comm.write(answer)
                    except CommClosedError:
                        return
                    except ClusterError as e:  # the reply would not serialise
                        await comm.write(error_reply(e))
        finally:
            comm.abort()
            self._comms.discard(comm)

    async def _open_stream(self, comm: Comm, op: str, handler: Callable[..., Awaitable[None]],
                           msg: dict) -> None:
        """Hand ``comm`` to a stream handler, if its opening message has the right shape.

        Whatever goes wrong in the handler ends this connection, logged, and
        nothing else: the server keeps serving.
        """
        peer = comm.peer_address
        try:
            check_message(self.message_specs, op, msg)
        except TypeError as e:
            logger.warning("closing connection from %s: %s", peer, e)
            return
        try:
            await handler(comm, **msg)
        except CommError as e:  # the peer left, or broke the framing
            logger.debug("stream %r from %s ended: %s", op, peer, e)
        except Exception:
            logger.exception("closing connection from %s: %r failed", peer, op)


# ----------------------------------------------------------------------------- RPC


class ConnectionPool:
    """Reusable connections to peers, with a limit of idle ones per address."""

    def __init__(self, timeout: float = 10.0, max_idle: int = 8, **connect_kwargs):
        self.timeout = timeout
        self.max_idle = max_idle
        self.connect_kwargs = connect_kwargs
        self.idle: dict[str, deque[Comm]] = defaultdict(deque)
        self.busy: set[Comm] = set()
        self.closed = False

    async def acquire(self, address: str, timeout: float | None = None) -> Comm:
        if self.closed:
            raise CommClosedError("connection pool is closed")
        idle = self.idle.get(address)
        while idle:
            comm = idle.pop()
            if not comm.closed():
                self.busy.add(comm)
                return comm
        comm = await connect(address, timeout=timeout or self.timeout, **self.connect_kwargs)
        self.busy.add(comm)
        return comm

    def release(self, address: str, comm: Comm) -> None:
        self.busy.discard(comm)
        if self.closed or comm.closed():
            comm.abort()
            return
        idle = self.idle[address]
        if len(idle) >= self.max_idle:
            comm.abort()
        else:
            idle.append(comm)

    @asynccontextmanager
    async def connection(self, address: str, timeout: float | None = None):
        comm = await self.acquire(address, timeout)
        ok = False
        try:
            yield comm
            ok = True
        finally:
            if ok:
                self.release(address, comm)
            else:
                self.busy.discard(comm)
                comm.abort()

    async def call(self, address: str, op: str, /, **kwargs) -> Any:
        """Send one request and return its reply's value.

        Raises:
            the handler's own exception, re-raised here with the remote traceback
            as its ``__cause__``; ``CommError`` subclasses for network failures.
        """
        async with self.connection(address) as comm:
            await comm.write({"op": op, **kwargs})
            answer = await comm.read()
        return unpack_reply(answer, address)

    async def close(self) -> None:
        self.closed = True
        for idle in self.idle.values():
            for comm in idle:
                comm.abort()
        self.idle.clear()
        for comm in list(self.busy):
            comm.abort()
        self.busy.clear()


def unpack_reply(answer: Any, address: str = "") -> Any:
    from .errors import RemoteTraceback

    if not isinstance(answer, tuple) or not answer:
        raise ProtocolError(f"malformed reply from {address}: {answer!r:.100}")
    if answer[0] == "OK":
        return answer[1]
    if answer[0] == "error":
        exc, tb = answer[1], answer[2]
        if not isinstance(exc, BaseException):
            exc = UnknownOperationError(str(exc))
        raise exc from RemoteTraceback(tb, address)
    raise ProtocolError(f"malformed reply from {address}: {answer!r:.100}")


# ----------------------------------------------------------------------------- batched stream


class BatchedSend:
    """Send lists of messages over one comm, coalesced per turn of the event loop.

    ``send`` never blocks.  Everything sent in one turn of the event loop
    leaves in one write at its end (handed to the socket then, on a comm with
    ``write_nowait``); while a write is in flight, new messages wait and leave
    together when it completes.
    """

    def __init__(self, comm: Comm, name: str = ""):
        self.comm = comm
        self.name = name
        self.buffer: list = []
        self._scheduled = False
        self._writing = False
        self.closed = False
        self.message_count = 0
        self.batch_count = 0
        self._loop = asyncio.get_running_loop()
        self._flushed: asyncio.Event = asyncio.Event()
        self._flushed.set()
        self._timer: asyncio.TimerHandle | None = None

    def send(self, *msgs: Any, within: float = 0.0) -> None:
        """Queue ``msgs``; they leave at the end of this turn of the event loop.

        Args:
            within: the sender expects more messages soon: these may wait up to
                this many seconds to leave with them (one write, one TLS record
                and one read on the other side for several). A later send
                without ``within`` takes them along at the end of its turn.
        """
        if self.closed:
            raise CommClosedError(f"batched stream {self.name} is closed")
        self.buffer.extend(msgs)
        if self._writing:
            return  # they leave when the write in flight completes
        if within > 0:
            if not self._scheduled and self._timer is None:
                self._flushed.clear()
                self._timer = self._loop.call_later(within, self._flush)
            return
        if not self._scheduled:
            self._flushed.clear()
            # Written at the end of this turn of the event loop: a reader that has
            # several messages buffered handles them all first, and their answers
            # leave in one write (one TLS record, one system call) instead of one
            # each. An idle link waits only for the rest of the current turn.
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self._cancel_timer()
        if self._writing or not self.buffer or self.closed:
            if not self.buffer:
                self._flushed.set()
            return
        payload, self.buffer = self.buffer, []
        self.message_count += len(payload)
        self.batch_count += 1
        write_nowait = getattr(self.comm, "write_nowait", None)
        if write_nowait is None:
            self._writing = True
            asyncio.ensure_future(self._write(payload))
            return
        # Fast path: hand the bytes to the socket now, no task per write.
        try:
            fut = write_nowait(payload)
        except CommClosedError:
            self._fail()
            return
        except Exception:
            logger.exception("batched stream %s failed to send %d messages", self.name, len(payload))
            self._fail()
            self.comm.abort()
            return
        if fut.done():
            self._write_done(fut)
        else:
            self._writing = True
            fut.add_done_callback(self._write_done)

    def _write_done(self, fut) -> None:
        self._writing = False
        if fut.exception() is not None:
            self._fail()
            return
        if self.buffer and not self.closed:
            self._flush()
        else:
            self._flushed.set()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self) -> None:
        self._cancel_timer()
        self.closed = True
        self.buffer.clear()
        self._writing = False
        self._flushed.set()

    async def _write(self, payload: list) -> None:
        try:
            await self.comm.write(payload)
        except CommClosedError:
            self._fail()
        except Exception:
            logger.exception("batched stream %s failed to send %d messages", self.name, len(payload))
            self._fail()
            self.comm.abort()
        finally:
            self._writing = False
            if self.buffer and not self.closed:
                self._flush()
            else:
                self._flushed.set()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything sent so far has been written (held messages leave now)."""
        if self._timer is not None and not self._writing:
            self._flush()
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._flushed.wait(), timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Flush, then close the comm."""
        if not self.closed:
            await self.flush(timeout)
        self.closed = True
        await self.comm.close()

    def abort(self) -> None:
        self._cancel_timer()
        self.closed = True
        self.buffer.clear()
        self.comm.abort()
