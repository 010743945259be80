"""``tcp://`` transport on tornado's IOStream.

Reads go into one preallocated buffer per large frame (``read_into``), never
through an intermediate stream reader, because large transfers here are bound
by page faults and copies.  Writes hand frames to tornado without joining them
when they are large, so out-of-band buffers reach the socket uncopied.
"""

from __future__ import annotations

import logging
import mmap
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpclient import TCPClient
from tornado.tcpserver import TCPServer

from ..errors import CommClosedError, ProtocolError
from ..utils import parse_host_port, unparse_host_port
from . import core
from .core import HEADER, MAGIC, Backend, Comm, Listener
from .serialize import dumps, loads

logger = logging.getLogger(__name__)

#: Frames below this size are gathered into one write with the header.
SMALL_FRAME = 64 * 1024


#: Frames at least this big are received into anonymous memory maps.
LARGE_FRAME = 1 << 20


def receive_buffer(length: int):
    """A writable buffer for one incoming frame.

    Large frames get an anonymous memory map: its pages are committed only as
    data arrives, so a peer that announces a huge frame and sends nothing
    costs us no memory (``bytearray(n)`` would zero-fill all of it at once).
    """
    if length >= LARGE_FRAME:
        return memoryview(mmap.mmap(-1, length))
    return bytearray(length)


def _set_nodelay(stream: IOStream) -> None:
    sock = stream.socket
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - platform quirk
            pass


class TCPComm(Comm):
    """A framed message stream over one TCP connection."""

    def __init__(self, stream: IOStream, local: str, peer: str, prefix: str = "tcp://"):
        self.stream = stream
        self._local = prefix + local
        self._peer = prefix + peer
        self._closed = False
        _set_nodelay(stream)
        # Close the stream if the comm object is dropped without close().
        stream.set_close_callback(self._on_close)

    def _on_close(self) -> None:
        self._closed = True

    @property
    def local_address(self) -> str:
        return self._local

    @property
    def peer_address(self) -> str:
        return self._peer

    async def read(self) -> Any:
        stream = self.stream
        if self._closed:
            raise CommClosedError(f"{self._peer}: comm closed")
        try:
            head = await stream.read_bytes(HEADER.size)
            magic, n = HEADER.unpack(head)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {magic!r} from {self._peer}")
            if n == 0 or n > core.MAX_FRAMES:
                raise ProtocolError(f"bad frame count {n} from {self._peer}")
            lengths = struct.unpack(f"<{n}Q", await stream.read_bytes(8 * n))
            total = sum(lengths)
            if total > core.MAX_MESSAGE_SIZE:
                raise ProtocolError(
                    f"message of {total} bytes from {self._peer} exceeds the limit of "
                    f"{core.MAX_MESSAGE_SIZE} bytes"
                )
            frames: list = []
            for length in lengths:
                if length < SMALL_FRAME:
                    frames.append(await stream.read_bytes(length) if length else b"")
                else:
                    buf = receive_buffer(length)
                    await stream.read_into(buf)
                    frames.append(buf)
        except StreamClosedError as e:
            self._closed = True
            raise CommClosedError(f"{self._peer}: connection closed") from e
        except ProtocolError:
            self.abort()
            raise
        try:
            return loads(frames)
        except Exception as e:
            self.abort()
            raise ProtocolError(f"undecodable message from {self._peer}: {e!r}") from e

    def write_nowait(self, msg: Any):
        """Hand ``msg`` to the socket now; return a future that resolves once it is written.

        Used by :class:`runtime.core.BatchedSend` to avoid a task per write.

        Raises:
            CommClosedError: the connection is closed.
        """
        if self._closed:
            raise CommClosedError(f"{self._peer}: comm closed")
        frames = dumps(msg)
        lengths = [f.nbytes if isinstance(f, memoryview) else len(f) for f in frames]
        header = HEADER.pack(MAGIC, len(frames)) + struct.pack(f"<{len(frames)}Q", *lengths)
        stream = self.stream
        try:
            if len(frames) == 1 and lengths[0] < SMALL_FRAME:
                return stream.write(header + frames[0])
            fut = stream.write(header)
            for f in frames:
                fut = stream.write(f)
            return fut
        except StreamClosedError as e:
            self._closed = True
            raise CommClosedError(f"{self._peer}: connection closed") from e

    async def write(self, msg: Any) -> int:
        if self._closed:
            raise CommClosedError(f"{self._peer}: comm closed")
        frames = dumps(msg)
        lengths = [f.nbytes if isinstance(f, memoryview) else len(f) for f in frames]
        header = HEADER.pack(MAGIC, len(frames)) + struct.pack(f"<{len(frames)}Q", *lengths)
        stream = self.stream
        try:
            if len(frames) == 1 and lengths[0] < SMALL_FRAME:
                fut = stream.write(header + frames[0])
            else:
                fut = stream.write(header)
                for f in frames:
                    fut = stream.write(f)
            if not fut.done():
                await fut
            else:
                fut.result()
        except StreamClosedError as e:
            self._closed = True
            raise CommClosedError(f"{self._peer}: connection closed") from e
        return len(header) + sum(lengths)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.stream.close()
        except Exception:  # pragma: no cover
            pass

    def abort(self) -> None:
        self._closed = True
        if not self.stream.closed():
            self.stream.close()

    def closed(self) -> bool:
        return self._closed or self.stream.closed()


class _Server(TCPServer):
    def __init__(self, listener: TCPListener, **kwargs):
        super().__init__(**kwargs)
        self.listener = listener

    async def handle_stream(self, stream: IOStream, address) -> None:
        listener = self.listener
        try:
            local = unparse_host_port(*stream.socket.getsockname()[:2])
        except OSError:
            stream.close()
            return
        comm = TCPComm(stream, local, unparse_host_port(*address[:2]), listener.prefix)
        await listener.handle_comm(comm)


class TCPListener(Listener):
    """Listens on ``host:port`` (port 0 = any free port)."""

    prefix = "tcp://"

    def __init__(self, location: str, handler: Callable[[Comm], Awaitable[None]], **kwargs):
        self.host, self.port = parse_host_port(location, 0)
        self.handler = handler
        self.server: _Server | None = None
        self._bound: tuple[str, int] | None = None
        self._server_kwargs = kwargs

    async def handle_comm(self, comm: Comm) -> None:
        await self.handler(comm)

    async def start(self) -> None:
        self.server = _Server(self, max_buffer_size=core.MAX_MESSAGE_SIZE + 1, **self._server_kwargs)
        host = self.host or None
        sockets = bind_sockets(self.port, address=host, backlog=2048)
        self.server.add_sockets(sockets)
        self._bound = sockets[0].getsockname()[:2]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
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


class TCPBackend(Backend):
    prefix = "tcp://"
    comm_class = TCPComm

    async def connect(self, location: str, **kwargs) -> Comm:
        host, port = parse_host_port(location)
        client = TCPClient()
        try:
            stream = await client.connect(host, port, max_buffer_size=core.MAX_MESSAGE_SIZE + 1, **kwargs)
        except StreamClosedError as e:
            raise CommClosedError(f"{self.prefix}{location}: {e}") from e
        local = unparse_host_port(*stream.socket.getsockname()[:2])
        return TCPComm(stream, local, location, self.prefix)

    def listener(self, location, handler, **kwargs) -> Listener:
        return TCPListener(location, handler, **kwargs)


core.backends["tcp"] = TCPBackend()

__all__ = ["TCPBackend", "TCPComm", "TCPListener"]
