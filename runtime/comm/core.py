"""The transport seam: ``Comm``, ``Listener``, ``connect`` and ``listen``.

A ``Comm`` carries whole Python messages in both directions; a ``Listener``
accepts comms and hands each to a coroutine.  Backends register themselves by
protocol name (``tcp``, ``inproc``); everything above this module speaks only to
these two ABCs and to addresses such as ``tcp://127.0.0.1:8786``.

Wire framing (stream transports)::

    b"HPC1" | u32 nframes | nframes x u64 length | frame 0 | frame 1 | ...

The header is checked before anything is allocated: a wrong magic, too many
frames or an oversized total length raise :class:`ProtocolError`, and the
server that owns the comm closes just that connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import AddressError, CommClosedError, ConnectionTimeoutError, EncryptionRequiredError
from ..utils import parse_address

logger = logging.getLogger(__name__)

MAGIC = b"HPC1"
HEADER = struct.Struct("<4sI")
#: A message may not carry more frames than this (checked before allocation).
MAX_FRAMES = 1 << 16
#: Nor more bytes than this in all (checked before allocation).
MAX_MESSAGE_SIZE = 4 << 30
#: Protocols that ``require_encryption`` accepts: ``tls``, and ``inproc``, which
#: never leaves the process.
SECURE_PROTOCOLS = frozenset({"tls", "inproc"})


class Comm(ABC):
    """A message-oriented, bidirectional connection."""

    #: Free-form label for logs (``"Scheduler->Worker"``, ...).
    name: str = ""

    @abstractmethod
    async def read(self) -> Any:
        """Read one message.

        Raises:
            CommClosedError: the connection is closed.
            ProtocolError: the peer sent something that is not a valid message.
        """

    @abstractmethod
    async def write(self, msg: Any) -> int:
        """Write one message; return the bytes written.

        Raises:
            CommClosedError: the connection is closed.
        """

    @abstractmethod
    async def close(self) -> None:
        """Close gracefully (flush, then close)."""

    @abstractmethod
    def abort(self) -> None:
        """Close at once, dropping anything unsent."""

    @abstractmethod
    def closed(self) -> bool:
        """Whether the comm is closed."""

    @property
    @abstractmethod
    def local_address(self) -> str: ...

    @property
    @abstractmethod
    def peer_address(self) -> str: ...

    def __repr__(self) -> str:
        state = "closed" if self.closed() else "open"
        return f"<{type(self).__name__} {self.name} local={self.local_address} remote={self.peer_address} {state}>"


class Listener(ABC):
    """Accepts connections and passes each new ``Comm`` to a handler coroutine."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @property
    @abstractmethod
    def listen_address(self) -> str:
        """The address we are bound to, with the real port."""

    @property
    def contact_address(self) -> str:
        """The address others should use to reach us."""
        return self.listen_address

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        self.stop()


class Backend(ABC):
    """One transport: how to connect and how to listen for a protocol name."""

    @abstractmethod
    async def connect(self, location: str, **kwargs) -> Comm: ...

    @abstractmethod
    def listener(self, location: str, handler: Callable[[Comm], Awaitable[None]], **kwargs) -> Listener: ...


backends: dict[str, Backend] = {}


def get_backend(protocol: str) -> Backend:
    try:
        return backends[protocol]
    except KeyError:
        raise AddressError(
            f"unknown protocol {protocol!r}; known protocols: {', '.join(sorted(backends))}"
        ) from None


def check_encryption(address: str, protocol: str, require_encryption: bool) -> None:
    """Refuse an unencrypted protocol when encryption is required.

    Raises:
        EncryptionRequiredError: naming the address.
    """
    if require_encryption and protocol not in SECURE_PROTOCOLS:
        raise EncryptionRequiredError(
            f"{address}: encryption is required (Security.require_encryption), so plain "
            f"{protocol}:// is refused; use a tls:// address")


async def connect(address: str, timeout: float = 10.0, require_encryption: bool = False,
                  extra_conn_args: dict | None = None, **kwargs) -> Comm:
    """Connect to ``address``, retrying with jittered exponential backoff.

    Args:
        address: ``protocol://location``.
        timeout: give up after this many seconds.
        require_encryption: refuse protocols that do not encrypt.
        extra_conn_args: accepted for compatibility (unused).
        **kwargs: for the transport (``ssl_context`` for ``tls://``).

    Raises:
        ConnectionTimeoutError: naming the address, once ``timeout`` seconds passed.
        AddressError: the address or its protocol is invalid.
        EncryptionRequiredError: ``require_encryption`` and a plain address.
        TLSError: a TLS handshake failed for a reason retrying will not change.
    """
    protocol, location, backend = _resolve(address)
    check_encryption(address, protocol, require_encryption)
    deadline = time.monotonic() + timeout
    backoff = 0.01
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return await asyncio.wait_for(backend.connect(location, **kwargs), remaining)
        except (OSError, CommClosedError, asyncio.TimeoutError) as e:
            last = e
        except AddressError as e:  # the location does not parse: name the whole address
            raise _naming(e, address, location) from None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await asyncio.sleep(min(backoff * (0.5 + random.random()), remaining))
        backoff = min(backoff * 2, 1.0)
    raise ConnectionTimeoutError(address, timeout, repr(last) if last else "") from last


def listen(address: str, handler: Callable[[Comm], Awaitable[None]],
           require_encryption: bool = False, extra_conn_args: dict | None = None,
           **kwargs) -> Listener:
    """Create (not yet start) a listener on ``address``.

    Args:
        address: ``protocol://location``.
        handler: coroutine function called with each accepted ``Comm``.
        require_encryption: refuse protocols that do not encrypt.
        extra_conn_args: accepted for compatibility (unused).
        **kwargs: for the transport (``ssl_context`` for ``tls://``).

    Raises:
        AddressError: the address or its protocol is invalid.
        EncryptionRequiredError: ``require_encryption`` and a plain address.
        TLSError: ``tls://`` without an ``ssl_context``.
    """
    protocol, location, backend = _resolve(address)
    check_encryption(address, protocol, require_encryption)
    try:
        return backend.listener(location, handler, **kwargs)
    except AddressError as e:
        raise _naming(e, address, location) from None


def _resolve(address: str) -> tuple[str, str, Backend]:
    """``(protocol, location, backend)`` of ``address``.

    Raises:
        AddressError: naming the address.
    """
    protocol, location = parse_address(address)
    try:
        return protocol, location, get_backend(protocol)
    except AddressError as e:
        raise AddressError(f"invalid address {address!r}: {e}") from None


def _naming(e: AddressError, address: str, location: str) -> AddressError:
    """``e``, about ``location``, reworded to name the whole ``address``."""
    text = str(e)
    if repr(location) in text:
        return AddressError(text.replace(repr(location), repr(address), 1))
    return AddressError(f"invalid address {address!r}: {text}")
