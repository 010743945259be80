"""``tcp://`` transport: an asyncio ``BufferedProtocol`` that parses frames as bytes arrive.

Why not tornado's IOStream (the first version of this module): a sequential
round trip spent most of its CPU in IOStream's per-read bookkeeping (three
``read_bytes`` calls per message, each re-registering interest with the event
loop).  A buffered protocol parses every complete message out of one receive
buffer in one call, and hands large frames the memory to receive into:

- small frames are sliced out of a reusable receive buffer;
- a frame of ``SMALL_FRAME`` bytes or more gets its own buffer (an anonymous
  memory map for large ones, so memory is committed only as data arrives) and
  the event loop reads the rest of it straight into that buffer, no copies;
- writes go to the transport at once (``write_nowait``); a large frame is
  handed over as a memoryview, not joined into a copy; the write future
  resolves when the transport's buffer has drained (back-pressure).

The header is checked before anything is allocated; a malformed stream makes
the next ``read`` raise :class:`ProtocolError` and the connection is aborted.

``tls://`` is the same protocol behind asyncio's (or uvloop's) TLS transport,
which hands it the decrypted bytes through the same ``get_buffer`` /
``buffer_updated`` calls.  A TLS listener accepts a plain TCP connection with
reading paused and runs the handshake itself (``loop.start_tls``) with a
deadline of :data:`TLS_HANDSHAKE_TIMEOUT`; only once it has succeeded -- the
peer's certificate verified against the cluster's CA -- does a framing
protocol see a byte.  A peer that fails it (plain TCP, no certificate, one
from another CA, too slow) is closed and logged with its address; nothing it
sent is parsed, let alone unpickled.  Pending handshakes are bounded in
number, overall and per peer host, and their failures are logged at a bounded
rate (:mod:`cluster.runtime.comm.admission`): a flood of stalled connections costs
neither all our memory nor all our descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import socket
import ssl
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import CommClosedError, ProtocolError, TLSError
from ..system import close_listening_socket, listening_socket, raise_fd_limit
from ..utils import parse_host_port, unparse_host_port
from . import core
from .admission import Admission
from .admission import describe as _describe
from .core import HEADER, MAGIC, Backend, Comm, Listener
from .serialize import dumps, loads

logger = logging.getLogger(__name__)

#: Frames below this size are sliced out of the shared receive buffer.
SMALL_FRAME = 64 * 1024
#: Frames at least this big are received into anonymous memory maps.
LARGE_FRAME = 1 << 20
#: Stop reading from a peer while this many bytes of its messages wait unread.
READ_PAUSE_BYTES = 64 << 20
#: Seconds a peer gets to complete the TLS handshake before it is disconnected.
TLS_HANDSHAKE_TIMEOUT = 10.0
#: Over TLS, frames larger than this are handed over in pieces of this size,
#: each once the previous one has drained (see ``TCPComm``).  The TLS
#: transport encrypts a piece into a memory buffer and copies that out into a
#: new ``bytes``: at 1 MiB that buffer grows by reallocation and every piece
#: is a fresh memory map, and a 200 MB transfer cost the sender 1.7 ms of CPU
#: per MB; at 256 KiB, 1.2 (issue 14, ``python -m bench transfer``).
TLS_WRITE_CHUNK = 256 << 10


def receive_buffer(length: int):
    """A writable buffer for one incoming frame.

    Large frames get an anonymous memory map: its pages are committed only as
    data arrives, so a peer that announces a huge frame and sends nothing
    costs us no memory (``bytearray(n)`` would zero-fill all of it at once).
    The map is private: a shared anonymous map is backed by shmem, which
    takes no transparent huge pages and costs a page-cache insertion per page
    (profiled: receiving took ~40% more CPU per MB that way).
    """
    if length >= LARGE_FRAME:
        buf = mmap.mmap(-1, length, flags=_PRIVATE_ANON) if _PRIVATE_ANON else mmap.mmap(-1, length)
        if _HUGEPAGE is not None:
            # Fewer page faults while the data lands: this is what bounds
            # large transfers into fresh memory.
            try:
                buf.madvise(_HUGEPAGE)
            except OSError:  # pragma: no cover - kernel without THP
                pass
        return buf
    return bytearray(length)


def populate(buf: mmap.mmap, start: int, end: int) -> None:
    """Commit ``buf[start:end]`` (from the page holding ``start``) in one call.

    Faulting pages in one by one as the copy reaches them is what large
    receives into fresh memory spend their time on, and with transparent
    huge pages it now and then stalls: copying 200 MB into a fresh
    ``MADV_HUGEPAGE`` map took 0.1 ms of CPU per MB in most runs and 1 to
    2 ms per MB in 2 of 15 (bench notes in bench/RESULTS.md).
    ``MADV_POPULATE_WRITE`` (Linux 5.14) commits the range at once: 0.10 to
    0.17 ms per MB in all 15.  Where the kernel lacks it this does nothing
    and pages fault in as before.
    """
    global _POPULATE
    if _POPULATE is None:
        return
    start -= start % mmap.PAGESIZE
    try:
        buf.madvise(_POPULATE, start, end - start)
    except OSError:  # EINVAL before Linux 5.14: fall back to faulting pages in
        _POPULATE = None


_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
# MADV_POPULATE_WRITE: Python 3.11's mmap module does not name it.
_POPULATE = getattr(mmap, "MADV_POPULATE_WRITE", 23) if sys.platform.startswith("linux") else None
#: A large frame's buffer is committed this far ahead of the data received into it.
POPULATE_WINDOW = 8 << 20
_PRIVATE_ANON = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


class _FramedProtocol(asyncio.BufferedProtocol):
    """Parses ``HPC1`` frames into messages (lists of frames) as bytes arrive."""

    def __init__(self, on_connect: Callable[[_FramedProtocol], None] | None = None):
        self.on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self.comm: TCPComm | None = None
        self.buf = bytearray(SMALL_FRAME)
        self.start = 0  # unparsed data is buf[start:end]
        self.end = 0
        self.nframes = 0
        self.lengths: tuple = ()
        self.frames: list = []
        self.large = None  # buffer of the large frame being received
        self.large_view: memoryview | None = None
        self.large_pos = 0
        self.large_ready = 0  # large[:large_ready] is populated (see _populate)
        self.messages: deque = deque()
        self.queued_bytes = 0
        self.reading_paused = False
        self.waiter: asyncio.Future | None = None
        self.error: Exception | None = None
        self.closed = False
        self.writing_paused = False
        self.drain_waiters: list[asyncio.Future] = []
        self.lost_reason: BaseException | None = None

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform quirk
                pass
        if self.on_connect is not None:
            self.on_connect(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.lost_reason = exc
        self._wake()
        for w in self.drain_waiters:
            if not w.done():
                w.set_exception(CommClosedError("connection closed while writing"))
        self.drain_waiters.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        for w in self.drain_waiters:
            if not w.done():
                w.set_result(None)
        self.drain_waiters.clear()

    # ------------------------------------------------------------------ receiving

    def get_buffer(self, sizehint: int):
        if self.large_view is not None:
            if self.large_pos >= self.large_ready:
                self._populate()
            return self.large_view[self.large_pos:self.large_ready]
        if self.end == len(self.buf):
            self._make_room(SMALL_FRAME)
        return memoryview(self.buf)[self.end:]

    def _populate(self) -> None:
        """Commit the next window of the large frame's buffer before data lands in it."""
        end = min(len(self.large_view), self.large_ready + POPULATE_WINDOW)
        if isinstance(self.large, mmap.mmap):
            populate(self.large, self.large_ready, end)
        self.large_ready = end

    def _make_room(self, need: int) -> None:
        """Ensure ``need`` bytes fit after ``start``: compact, or grow the buffer."""
        pending = self.end - self.start
        if self.start and pending:
            self.buf[:pending] = self.buf[self.start:self.end]
        self.start, self.end = 0, pending
        if len(self.buf) - pending < need or len(self.buf) == pending:
            new = bytearray(max(len(self.buf) * 2, pending + need))
            new[:pending] = self.buf[:pending]
            self.buf = new

    def buffer_updated(self, nbytes: int) -> None:
        if self.large_view is not None:
            self.large_pos += nbytes
            if self.large_pos < len(self.large_view):
                return
            self.large_view.release()
            self.frames.append(self.large)
            self.large = self.large_view = None
            self.large_pos = self.large_ready = 0
        else:
            self.end += nbytes
        try:
            self._parse()
        except ProtocolError as e:
            self.error = e
            self._wake()
            if self.transport is not None:
                self.transport.abort()

    def _parse(self) -> None:
        buf = self.buf
        while True:
            avail = self.end - self.start
            if not self.nframes:  # expecting a header
                if avail < HEADER.size:
                    break
                magic, n = HEADER.unpack_from(buf, self.start)
                if magic != MAGIC:
                    raise ProtocolError(f"bad magic {bytes(magic)!r} from {self._peer()}")
                if n == 0 or n > core.MAX_FRAMES:
                    raise ProtocolError(f"bad frame count {n} from {self._peer()}")
                if avail < HEADER.size + 8 * n:
                    if len(buf) - self.start < HEADER.size + 8 * n:
                        self._make_room(HEADER.size + 8 * n)
                        buf = self.buf
                    break
                lengths = struct.unpack_from(f"<{n}Q", buf, self.start + HEADER.size)
                total = sum(lengths)
                if total > core.MAX_MESSAGE_SIZE:
                    raise ProtocolError(
                        f"message of {total} bytes from {self._peer()} exceeds the limit of "
                        f"{core.MAX_MESSAGE_SIZE} bytes"
                    )
                self.start += HEADER.size + 8 * n
                self.nframes = n
                self.lengths = lengths
                self.frames = []
                self.queued_bytes += total
                continue
            i = len(self.frames)
            if i == self.nframes:
                self._message_done()
                continue
            length = self.lengths[i]
            if length >= SMALL_FRAME:
                target = receive_buffer(length)
                view = memoryview(target)
                take = min(avail, length)
                if take:
                    view[:take] = buf[self.start:self.start + take]
                    self.start += take
                if take < length:
                    # Let the event loop read the rest straight into it.
                    self.large, self.large_view, self.large_pos = target, view, take
                    self.large_ready = take
                    if self.start == self.end:
                        self.start = self.end = 0
                    return
                view.release()
                self.frames.append(target)
                continue
            if avail < length:
                if len(buf) - self.start < length:
                    self._make_room(length)
                    buf = self.buf
                break
            self.frames.append(bytes(buf[self.start:self.start + length]))
            self.start += length
        if self.start == self.end:
            self.start = self.end = 0

    def _message_done(self) -> None:
        self.messages.append(self.frames)
        self.frames = []
        self.nframes = 0
        self.lengths = ()
        self._wake()
        if self.queued_bytes > READ_PAUSE_BYTES and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _peer(self) -> str:
        return self.comm.peer_address if self.comm is not None else "peer"

    async def next_frames(self) -> list:
        while not self.messages:
            if self.error is not None:
                raise self.error
            if self.closed:
                why = f": {self.lost_reason}" if self.lost_reason is not None else ""
                raise CommClosedError(f"{self._peer()}: connection closed{why}")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        frames = self.messages.popleft()
        self.queued_bytes -= sum(len(f) if not isinstance(f, memoryview) else f.nbytes for f in frames)
        if self.reading_paused and self.queued_bytes <= READ_PAUSE_BYTES // 2 and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        return frames


class TCPComm(Comm):
    """A framed message stream over one TCP (or TLS) connection.

    Over plain TCP every write goes to the transport at once, large frames as
    memoryviews (no copy).  A TLS transport, though, encrypts all it is given
    at once into memory, and then copies that out again: a 100 MB frame
    written in one piece would cost some 200 MB more on the sender.  So over
    TLS a frame larger than :data:`TLS_WRITE_CHUNK` goes out in pieces of that
    size, each when the transport has drained the one before (a small pump
    task; later messages queue behind it, keeping their order).
    """

    def __init__(self, protocol: _FramedProtocol, local: str, peer: str, prefix: str = "tcp://"):
        self.protocol = protocol
        protocol.comm = self
        self.transport = protocol.transport
        self._local = prefix + local
        self._peer = prefix + peer
        self._closed = False
        self._chunked = prefix == "tls://"
        self._pending: deque = deque()  # (piece, future or None), written by the pump
        self._pump_task: asyncio.Task | None = None

    @property
    def local_address(self) -> str:
        return self._local

    @property
    def peer_address(self) -> str:
        return self._peer

    async def read(self) -> Any:
        if self._closed:
            raise CommClosedError(f"{self._peer}: comm closed")
        try:
            frames = await self.protocol.next_frames()
        except CommClosedError:
            self._closed = True
            raise
        try:
            return loads(frames)
        except Exception as e:
            self.abort()
            raise ProtocolError(f"undecodable message from {self._peer}: {e!r}") from e

    def write_nowait(self, msg: Any) -> asyncio.Future:
        """Hand ``msg`` to the transport now; the future resolves once the buffer drains.

        Raises:
            CommClosedError: the connection is closed.
        """
        if self._closed or self.protocol.closed or self.transport.is_closing():
            self._closed = True
            raise CommClosedError(f"{self._peer}: comm closed")
        frames = dumps(msg)
        lengths = [f.nbytes if isinstance(f, memoryview) else len(f) for f in frames]
        header = HEADER.pack(MAGIC, len(frames)) + struct.pack(f"<{len(frames)}Q", *lengths)
        self.nbytes_last = len(header) + sum(lengths)
        fut = asyncio.get_running_loop().create_future()
        if self._chunked and (self._pending or max(lengths) > TLS_WRITE_CHUNK):
            self._queue(header, frames, fut)
            return fut
        transport = self.transport
        if len(frames) == 1 and lengths[0] < SMALL_FRAME:
            transport.write(header + frames[0])
        elif sum(lengths) < SMALL_FRAME:  # one write: one TLS record, one system call
            transport.write(b"".join([header, *frames]))
        else:
            transport.write(header)
            for f in frames:
                transport.write(f)
        if self.protocol.writing_paused:
            self.protocol.drain_waiters.append(fut)
        else:
            fut.set_result(None)
        return fut

    def _queue(self, header: bytes, frames: list, fut: asyncio.Future) -> None:
        """Queue one message for the pump, large frames cut in pieces."""
        pending = self._pending
        pending.append((header, None))
        for f in frames:
            view = memoryview(f).cast("B")
            for start in range(0, view.nbytes, TLS_WRITE_CHUNK):
                pending.append((view[start:start + TLS_WRITE_CHUNK], None))
        piece, _ = pending.pop()
        pending.append((piece, fut))
        if self._pump_task is None:
            self._pump_task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        protocol, pending = self.protocol, self._pending
        loop = asyncio.get_running_loop()
        try:
            while pending:
                if protocol.writing_paused:
                    waiter = loop.create_future()
                    protocol.drain_waiters.append(waiter)
                    await waiter  # CommClosedError if the connection is lost
                    continue
                if protocol.closed or self.transport.is_closing():
                    raise CommClosedError(f"{self._peer}: connection closed while writing")
                piece, fut = pending.popleft()
                self.transport.write(piece)
                if fut is not None and not fut.done():
                    if protocol.writing_paused:
                        protocol.drain_waiters.append(fut)
                    else:
                        fut.set_result(None)
        except BaseException as e:
            error = e if isinstance(e, CommClosedError) else CommClosedError(
                f"{self._peer}: writing failed: {e!r}")
            while pending:
                _, fut = pending.popleft()
                if fut is not None and not fut.done():
                    fut.set_exception(error)
            if not isinstance(e, (CommClosedError, asyncio.CancelledError)):
                raise
        finally:
            self._pump_task = None

    async def write(self, msg: Any) -> int:
        fut = self.write_nowait(msg)
        if not fut.done():
            await fut
        return self.nbytes_last

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pump_task is not None:
            with contextlib.suppress(CommClosedError):
                await asyncio.shield(self._pump_task)
        self.transport.close()  # flushes what is buffered, then closes

    def abort(self) -> None:
        self._closed = True
        self.transport.abort()
        if self._pump_task is not None:
            self._pump_task.cancel()

    def closed(self) -> bool:
        return self._closed or self.protocol.closed


def _addresses(transport) -> tuple[str, str]:
    local = transport.get_extra_info("sockname")
    peer = transport.get_extra_info("peername")
    return unparse_host_port(*local[:2]), unparse_host_port(*peer[:2])


class TCPListener(Listener):
    """Listens on ``host:port`` (port 0 = any free port)."""

    prefix = "tcp://"

    def __init__(self, location: str, handler: Callable[[Comm], Awaitable[None]], **kwargs):
        self.host, self.port = parse_host_port(location, 0)
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self._bound: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task] = set()

    def _protocol_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        return lambda: _FramedProtocol(self._accept)

    def _accept(self, protocol: _FramedProtocol) -> None:
        try:
            local, peer = _addresses(protocol.transport)
        except (OSError, TypeError):
            protocol.transport.abort()
            return
        comm = TCPComm(protocol, local, peer, self.prefix)
        self._spawn(self.handler(comm))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        raise_fd_limit()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol_factory(), self.host or None, self.port,
            backlog=2048, reuse_address=True,
        )
        self._bound = self.server.sockets[0].getsockname()[:2]

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    @property
    def listen_address(self) -> str:
        if self._bound is None:
            raise RuntimeError("listener not started")
        return self.prefix + unparse_host_port(*self._bound)

    @property
    def contact_address(self) -> str:
        host, port = self._bound or (self.host, self.port)
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostbyname(socket.gethostname()) if host == "0.0.0.0" else host
        return self.prefix + unparse_host_port(host, port)


class TLSListener(TCPListener):
    """A listener whose connections pass a TLS handshake before anything is read from them.

    It accepts connections itself (the listening socket's readiness, then
    ``accept``) and hands each socket to ``loop.connect_accepted_socket`` with
    the TLS context: the framing protocol's ``connection_made`` -- and so any
    parsing -- happens only after a successful handshake, and a failed one
    raises here, where the peer's address is known and logged.  (Accepting
    through ``create_server(ssl=...)`` would drop failures silently, and
    uvloop reads the first bytes of a connection even when its protocol
    pauses reading in ``connection_made``, so ``start_tls`` after accepting is
    not an option either.)

    Handshakes in progress are bounded by an :class:`~cluster.runtime.comm.admission.Admission`
    (at most ``max_pending`` at a time, ``max_pending_per_peer`` per peer
    host; a stalled one makes room for a newcomer), which also logs failed
    handshakes at a bounded rate.

    Args:
        ssl_context: a server context that requires client certificates.
        max_pending: most handshakes in progress (default
            :data:`cluster.runtime.comm.admission.MAX_PENDING`).
        max_pending_per_peer: most of them from one host (default
            :data:`cluster.runtime.comm.admission.MAX_PENDING_PER_PEER`).

    Raises:
        TLSError: no ``ssl_context``.
    """

    prefix = "tls://"
    #: Connections taken per wake-up of the listening socket.
    accept_batch = 64

    def __init__(self, location: str, handler: Callable[[Comm], Awaitable[None]],
                 ssl_context: ssl.SSLContext | None = None, max_pending: int | None = None,
                 max_pending_per_peer: int | None = None, **kwargs):
        if ssl_context is None:
            raise TLSError(f"listening on tls://{location} needs TLS credentials: pass "
                           "security= with a CA and this server's certificate and key "
                           "(e.g. Security.temporary())")
        super().__init__(location, handler, **kwargs)
        self.ssl_context = ssl_context
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshakes: set[asyncio.Task] = set()
        self._unstarted: dict[asyncio.Task, socket.socket] = {}
        self._resume: asyncio.TimerHandle | None = None
        self._max_pending = (max_pending, max_pending_per_peer)
        self.admission: Admission | None = None

    async def start(self) -> None:
        raise_fd_limit()
        loop = asyncio.get_running_loop()
        sock = await listening_socket(loop, self.host, self.port, 2048)
        self._sock, self._loop = sock, loop
        self._bound = sock.getsockname()[:2]
        self.admission = Admission(self.listen_address, "TLS handshake", *self._max_pending,
                                   log=logger)
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(self.accept_batch):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of file descriptors or memory: back off for a second
                logger.error("%s: accepting connections failed (%s); trying again in 1 s",
                             self.listen_address, _describe(e))
                self._loop.remove_reader(sock.fileno())
                self._resume = self._loop.call_later(1.0, self._resume_accepting)
                return
            conn.setblocking(False)
            peer = unparse_host_port(*addr[:2]) if isinstance(addr, tuple) else str(addr)
            host = addr[0] if isinstance(addr, tuple) else peer
            tasks: list[asyncio.Task] = []
            # Cutting a pending handshake cancels its task, which aborts the transport.
            token = self.admission.admit(host, lambda tasks=tasks: tasks[0].cancel())
            if token is None:  # no room: closed before it costs anything
                conn.close()
                continue
            task = asyncio.ensure_future(self._handshake(conn, peer, token))
            tasks.append(task)
            self._unstarted[task] = conn
            self._handshakes.add(task)
            task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task) -> None:
        self._handshakes.discard(task)
        conn = self._unstarted.pop(task, None)
        if conn is not None:  # cancelled before it ran: the socket is still ours
            conn.close()

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    async def _handshake(self, conn: socket.socket, peer: str, token: int) -> None:
        self._unstarted.pop(asyncio.current_task(), None)
        loop = asyncio.get_running_loop()
        try:
            # The transport owns the socket from here on, and closes it on failure
            # (also when we are cancelled to make room: that aborts the handshake).
            await loop.connect_accepted_socket(lambda: _FramedProtocol(self._accept), conn,
                                               ssl=self.ssl_context,
                                               ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self.admission is not None:
                self.admission.done(token, peer, e)
            return
        if self.admission is not None:
            self.admission.done(token, peer)

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            close_listening_socket(self._loop, sock, self._resume)
            self._resume = None
        for task in list(self._handshakes):
            task.cancel()
        if self.admission is not None:
            self.admission.close()


class TCPBackend(Backend):
    prefix = "tcp://"

    async def connect(self, location: str, **kwargs) -> Comm:
        host, port = parse_host_port(location)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(_FramedProtocol, host, port)
        local, _ = _addresses(transport)
        return TCPComm(protocol, local, unparse_host_port(host, port), self.prefix)

    def listener(self, location, handler, **kwargs) -> Listener:
        return TCPListener(location, handler, **kwargs)


class TLSBackend(TCPBackend):
    """``tls://``: TCP with mutual TLS authentication (see :mod:`cluster.runtime.security`)."""

    prefix = "tls://"

    async def connect(self, location: str, ssl_context: ssl.SSLContext | None = None,
                      **kwargs) -> Comm:
        """Connect and complete the handshake.

        Raises:
            TLSError: no ``ssl_context``, or the handshake failed for a reason
                that retrying will not change (a certificate was refused, the
                peer does not speak TLS).
            OSError: the connection failed otherwise (``connect`` retries).
        """
        if ssl_context is None:
            raise TLSError(f"connecting to tls://{location} needs TLS credentials: pass "
                           "security= with the cluster's CA and a certificate and key "
                           "(e.g. the cluster's Security object)")
        host, port = parse_host_port(location)
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_connection(
                _FramedProtocol, host, port, ssl=ssl_context, server_hostname=host,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except ssl.SSLError as e:
            if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
                raise  # the peer hung up: perhaps a passing failure, retried
            raise TLSError(f"TLS handshake with tls://{location} failed: {_describe(e)}") from e
        local, _ = _addresses(transport)
        return TCPComm(protocol, local, unparse_host_port(host, port), self.prefix)

    def listener(self, location, handler, **kwargs) -> Listener:
        return TLSListener(location, handler, **kwargs)


core.backends["tcp"] = TCPBackend()
core.backends["tls"] = TLSBackend()

__all__ = ["TCPBackend", "TCPComm", "TCPListener", "TLSBackend", "TLSListener", "receive_buffer"]
