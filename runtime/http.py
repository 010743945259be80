"""A small HTTP/1.1 server on asyncio, for the status page and ``/metrics``.

Theory of operation
-------------------
The scheduler and the workers serve a handful of read-only routes (JSON, the
Prometheus text format, one static page).  That needs none of a web
framework's machinery, and tornado/aiohttp would be a large dependency for it,
so this module speaks just enough HTTP/1.1:

* ``GET`` and ``HEAD`` only (anything else: ``405``); no request bodies
  (``Content-Length`` above zero or ``Transfer-Encoding``: ``400``);
* the request head is limited in size (:data:`MAX_HEAD`) and in time
  (:data:`HEAD_TIMEOUT`), so a slow or huge request cannot hold memory;
* keep-alive as HTTP/1.1 has it (``Connection: close`` honoured), closed after
  :data:`IDLE_TIMEOUT` idle seconds;
* a malformed request is answered ``400`` and its connection closed; a route
  that raises is answered ``500`` and logged.  Nothing a peer sends stops the
  server;
* connections are bounded: the server accepts them itself, gives a TLS
  handshake :data:`HANDSHAKE_TIMEOUT` seconds, holds at most
  :data:`MAX_UNAUTHORISED` connections that have not yet made an authorised
  request (:data:`MAX_UNAUTHORISED_PER_PEER` per peer host; an old one makes
  room for a newcomer, see :class:`cluster.runtime.comm.admission.Admission`) and at
  most :data:`MAX_CONNECTIONS` in all; a refused request (``403``) closes its
  connection, and refusals and failed handshakes are logged at a bounded rate.

With an ``ssl.SSLContext`` the same routes are served over HTTPS.  With a
``token`` every request must be authorised: by a client certificate the
context verified (Prometheus or a Python client holding the cluster's
credentials), by ``Authorization: Bearer <token>``, by ``?token=<token>``
(the link a user opens in a browser; it also sets an ``HttpOnly``,
``SameSite=Strict`` cookie so the page's own requests need no token), or by
that cookie.  Anything else is answered ``403``.  The cookie is named after
the server's port (:attr:`HTTPServer.cookie_name`): browsers keep cookies per
host, not per port, so the pages of several clusters on one host each keep
their own.  :meth:`HTTPServer.close` closes the listener and every open
connection.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .comm.admission import Admission
from .system import close_listening_socket, listening_socket, raise_fd_limit
from .utils import unparse_host_port

logger = logging.getLogger(__name__)

#: Largest request head (request line and headers) we read, in bytes.
MAX_HEAD = 16 * 1024
#: Seconds a client has to send a whole request head.
HEAD_TIMEOUT = 10.0
#: Seconds an idle keep-alive connection stays open.
IDLE_TIMEOUT = 15.0

#: Seconds a client has to complete the TLS handshake (asyncio's default is 60).
HANDSHAKE_TIMEOUT = 10.0
#: Most connections open at once; a newcomer beyond is closed at once.
MAX_CONNECTIONS = 256
#: Most connections open at once that have not made an authorised request yet.
MAX_UNAUTHORISED = 128
#: Of those, most from one peer host.
MAX_UNAUTHORISED_PER_PEER = 32

#: Prefix of the cookie that carries the access token after a ``?token=``
#: request; the cookie itself is ``<prefix>_<port>`` (:attr:`HTTPServer.cookie_name`).
TOKEN_COOKIE = "hpc_cluster_token"

_REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass
class Request:
    """One parsed request: ``method``, ``path`` (decoded), ``query`` (first value per name)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Response:
    """What a route returns."""

    body: bytes | str = b""
    status: int = 200
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], "Response | Awaitable[Response]"]


class BadRequest(Exception):
    """The request cannot be served; answered with ``status`` and the connection closed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> Request:
    """Parse a request head (up to and including the blank line).

    Raises:
        BadRequest: the head is not HTTP/1.x we serve (``400``/``405``).
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as e:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest(f"undecodable request: {e}") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {lines[0][:80]!r}")
    method, target, _version = parts
    if not target.startswith("/"):
        raise BadRequest(f"unsupported request target {target[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    if method not in ("GET", "HEAD"):
        raise BadRequest(f"method {method[:20]!r} not allowed", status=405)
    if "transfer-encoding" in headers:
        raise BadRequest("request bodies are not accepted")
    length = headers.get("content-length", "0")
    # isascii: str.isdigit() accepts '²', which int() then refuses.
    if not (length.isascii() and length.isdigit()) or int(length) != 0:
        raise BadRequest("request bodies are not accepted")
    try:
        url = urllib.parse.urlsplit(target)
    except ValueError:  # e.g. '//[': an unclosed IPv6 netloc
        raise BadRequest(f"malformed request target {target[:80]!r}") from None
    query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
    return Request(method, urllib.parse.unquote(url.path), query, headers)


def render(response: Response, head_only: bool = False, keep_alive: bool = True) -> bytes:
    """The bytes of ``response`` on the wire."""
    body = response.body.encode() if isinstance(response.body, str) else response.body
    reason = _REASONS.get(response.status, "Unknown")
    headers = {"Content-Type": response.content_type, "Content-Length": str(len(body)),
               "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
               "Connection": "keep-alive" if keep_alive else "close", **response.headers}
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)


class HTTPServer:
    """Serve ``routes`` (exact path -> handler) over HTTP/1.1, or HTTPS with ``ssl_context``.

    Args:
        routes: handlers by exact path; a handler takes a :class:`Request` and
            returns a :class:`Response` (or an awaitable of one).
        fallback: handler for paths not in ``routes`` (default: ``404``).
        ssl_context: serve HTTPS with this server-side context.
        name: for log messages (``"scheduler dashboard"``).
        token: require this access token (or a verified client certificate)
            on every request; see the module docstring.
    """

    def __init__(self, routes: dict[str, Handler], fallback: Handler | None = None,
                 ssl_context: ssl.SSLContext | None = None, name: str = "http",
                 token: str | None = None):
        self.routes = routes
        self.fallback = fallback
        self.ssl_context = ssl_context
        self.token = token
        self.name = name
        self.host = ""
        self.port = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._tasks: dict[asyncio.Task, socket.socket | None] = {}  # socket: not yet handed over
        self._writers: set[asyncio.StreamWriter] = set()
        self.admission: Admission | None = None
        self.requests_served = 0

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def cookie_name(self) -> str:
        """The token cookie's name: one per port, so clusters on one host do not share it."""
        return f"{TOKEN_COOKIE}_{self.port}"

    @property
    def connections(self) -> int:
        """Connections open now (handshaking, reading or idle)."""
        return len(self._tasks)

    async def listen(self, host: str, port: int, fallback_to_random: bool = True) -> int:
        """Listen on ``host:port`` and return the port.

        Args:
            fallback_to_random: if ``port`` is taken, listen on a free port
                instead (logged), as dask's dashboard does.

        Raises:
            OSError: the address cannot be used.
        """
        raise_fd_limit()
        loop = asyncio.get_running_loop()
        try:
            sock = await self._bind(loop, host, port)
        except OSError as e:
            if not (fallback_to_random and port and e.errno == errno.EADDRINUSE):
                raise
            sock = await self._bind(loop, host, 0)
            logger.warning("%s: port %d is in use; serving on port %d instead", self.name, port,
                           sock.getsockname()[1])
        self._sock, self._loop = sock, loop
        self.host = host
        self.port = sock.getsockname()[1]
        self.admission = Admission(
            f"{self.name} at {unparse_host_port(host, self.port)}",
            "TLS handshake" if self.ssl_context is not None else "connection",
            MAX_UNAUTHORISED, MAX_UNAUTHORISED_PER_PEER, log=logger)
        loop.add_reader(sock.fileno(), self._on_readable)
        return self.port

    @staticmethod
    async def _bind(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
        return await listening_socket(loop, host, port, 128)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of descriptors or memory: back off for a second
                logger.error("%s: accepting connections failed (%s); trying again in 1 s",
                             self.name, e)
                self._loop.remove_reader(sock.fileno())
                self._resume = self._loop.call_later(1.0, self._resume_accepting)
                return
            if len(self._tasks) >= MAX_CONNECTIONS:
                conn.close()
                self.admission.refuse()
                continue
            host = addr[0] if isinstance(addr, tuple) else str(addr)
            peer = unparse_host_port(*addr[:2]) if isinstance(addr, tuple) else host
            tasks: list[asyncio.Task] = []
            token = self.admission.admit(host, lambda tasks=tasks: tasks[0].cancel())
            if token is None:
                conn.close()
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self._connection(conn, peer, token))
            tasks.append(task)
            self._tasks[task] = conn
            task.add_done_callback(self._connection_done)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _connection_done(self, task: asyncio.Task) -> None:
        conn = self._tasks.pop(task, None)
        if conn is not None:  # cancelled before it ran: the socket is still ours
            conn.close()

    async def _connection(self, conn: socket.socket, peer: str, token: int) -> None:
        """Handshake (with a deadline), then serve requests; ``token`` is our admission."""
        self._tasks[asyncio.current_task()] = None  # the transport owns the socket now
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl_context is not None else None)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.admission.done(token, peer, e)
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self._serve(reader, writer, token, peer)
        finally:
            self.admission.done(token)  # no-op once an authorised request released it

    async def close(self) -> None:
        """Stop listening and close every open connection."""
        sock, self._sock = self._sock, None
        if sock is not None:
            close_listening_socket(self._loop, sock, self._resume)
            self._resume = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self.admission is not None:
            self.admission.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     token: int | None = None, peer: str = "") -> None:
        self._writers.add(writer)
        try:
            first = True
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                                  HEAD_TIMEOUT if first else IDLE_TIMEOUT)
                except asyncio.LimitOverrunError:
                    writer.write(render(Response("request head too large\n", 400),
                                        keep_alive=False))
                    return
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError,
                        ssl.SSLError, OSError):
                    return
                first = False
                try:
                    request = parse_head(head)
                except BadRequest as e:
                    writer.write(render(Response(f"{e}\n", e.status), keep_alive=False))
                    return
                keep_alive = request.headers.get("connection", "").lower() != "close"
                how = self._authorised(request, writer)
                if how is None:
                    # %r: a path with an encoded newline must not forge a log line.
                    reason = (f"{request.method} {request.path[:200]!r} without a valid token "
                              "or certificate")
                    if token is not None:
                        self.admission.done(token)
                        token = None
                    if self.admission is not None:  # logged at a bounded rate
                        self.admission.failed(peer, reason, label="requests refused",
                                              template="refused {reason} from {address}")
                    else:  # pragma: no cover - not listening
                        logger.warning("%s: refused %s from %s", self.name, reason, peer)
                    response = Response("this page needs the cluster's access token: open the "
                                        "dashboard_link the cluster reports (it ends in "
                                        "?token=...)\n", 403)
                    keep_alive = False  # no idle connections for those without the token
                else:
                    if token is not None and self.admission is not None:
                        self.admission.done(token)  # authorised: no longer counted as pending
                        token = None
                    response = await self._respond(request)
                    if how == "query":
                        response.headers["Set-Cookie"] = (
                            f"{self.cookie_name}={self.token}; Path=/; HttpOnly; "
                            "SameSite=Strict" + ("; Secure" if self.ssl_context is not None else ""))
                writer.write(render(response, head_only=request.method == "HEAD",
                                    keep_alive=keep_alive))
                self.requests_served += 1
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, ssl.SSLError, OSError):
            return
        except Exception:  # pragma: no cover - never let a connection take the server down
            logger.exception("%s: error serving a connection", self.name)
        finally:
            self._writers.discard(writer)
            writer.close()  # what is buffered still goes out, then the socket closes

    def _authorised(self, request: Request, writer: asyncio.StreamWriter) -> str | None:
        """How ``request`` is authorised (``"open"``, ``"certificate"``, ``"query"``,
        ``"header"``, ``"cookie"``), or ``None`` if it is not."""
        token = self.token
        if token is None:
            return "open"
        if writer.get_extra_info("peercert"):  # verified against the cluster's CA
            return "certificate"
        expected = token.encode()

        def same(given: str | None) -> bool:
            return given is not None and hmac.compare_digest(given.encode(), expected)

        if same(request.query.get("token")):
            return "query"
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and same(auth[7:].strip()):
            return "header"
        cookie = self.cookie_name
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == cookie and same(value):
                return "cookie"
        return None

    async def _respond(self, request: Request) -> Response:
        handler = self.routes.get(request.path, self.fallback)
        if handler is None:
            return Response(f"no such page: {request.path[:200]}\n", 404)
        try:
            result = handler(request)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except BadRequest as e:
            return Response(f"{e}\n", e.status)
        except Exception:
            logger.exception("%s: route %s failed", self.name, request.path[:200])
            return Response("internal error\n", 500)


def parse_dashboard_address(value: object, default_host: str) -> tuple[str, int] | None:
    """``(host, port)`` from a ``dashboard_address`` value, or ``None`` when disabled.

    Accepts ``":8787"``, ``"8787"``, ``8787``, ``"host:port"``, ``"[::1]:0"``;
    an empty host means ``default_host`` (the server's own host).  ``None``,
    ``False`` and ``""`` disable the dashboard.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    if value is None or value is False or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"dashboard_address={value!r}: expected ':8787', 'host:port', a port "
                         "number, or None/False to disable")
    if isinstance(value, int):
        host, port_text = "", str(value)
    elif isinstance(value, str):
        text = value.split("://", 1)[-1]
        if text.isdigit():
            host, port_text = "", text
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                host, port_text = text, "0"
            host = host.strip("[]")
    else:
        raise ValueError(f"dashboard_address={value!r}: expected ':8787', 'host:port', a port "
                         "number, or None/False to disable")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"dashboard_address={value!r}: the port must be a number in 0-65535")
    return host or default_host, int(port_text)
