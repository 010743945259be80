"""A misbehaving peer on a raw socket: the server drops just that connection.

Each test talks to a real Scheduler or Worker on 127.0.0.1 through a plain
non-blocking ``socket`` (driven by the event loop, so the in-process server
keeps running), sends something that is not a valid message, and checks that

* the server closes that connection (``recv`` returns ``b""`` within a deadline),
* it logged why,
* it did not allocate anything large on the strength of a length prefix, and
* a normal ``Client`` still gets work done on the same cluster.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import resource
import socket
import struct

import psutil
import pytest

from runtime.comm.core import HEADER, MAGIC, MAX_FRAMES, MAX_MESSAGE_SIZE
from runtime.utils import parse_address, parse_host_port
from tests.helpers import gen_cluster, gen_test, until

MB = 2**20


def inc(x):
    return x + 1


def framed(*frames: bytes, nframes: int | None = None, lengths: list[int] | None = None) -> bytes:
    """A message in wire format; ``nframes``/``lengths`` override the true values."""
    n = len(frames) if nframes is None else nframes
    lengths = [len(f) for f in frames] if lengths is None else lengths
    return HEADER.pack(MAGIC, n) + struct.pack(f"<{len(lengths)}Q", *lengths) + b"".join(frames)


def host_port(address: str) -> tuple[str, int]:
    proto, loc = parse_address(address)
    assert proto == "tcp"
    return parse_host_port(loc)


async def raw_connect(address: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, host_port(address)), 5)
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the server closes the connection; return what it sent before closing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    received = b""
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"server did not close the connection within {timeout}s")
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), remaining)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"server did not close the connection within {timeout}s"
            ) from None
        if chunk == b"":
            return received
        received += chunk


async def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    buf = b""
    deadline = loop.time() + timeout
    while len(buf) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(buf)), deadline - loop.time())
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


async def read_reply(sock: socket.socket):
    magic, n = HEADER.unpack(await recv_exactly(sock, HEADER.size))
    assert magic == MAGIC
    lengths = struct.unpack(f"<{n}Q", await recv_exactly(sock, 8 * n))
    frames = [await recv_exactly(sock, length) for length in lengths]
    return pickle.loads(frames[0], buffers=frames[1:])


def server_side_connected(sock: socket.socket) -> bool:
    """Whether the in-process server still holds its end of ``sock``'s connection."""
    ours = sock.getsockname()
    for c in psutil.Process().net_connections(kind="inet"):
        if c.raddr and tuple(c.raddr) == ours and c.status == psutil.CONN_ESTABLISHED:
            return True
    return False


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


async def client_still_works(c, x: int) -> None:
    assert await asyncio.wait_for(c.submit(inc, x), 5) == x + 1


def target_address(target: str, s, workers) -> str:
    return s.address if target == "scheduler" else workers[0].address


targets = pytest.mark.parametrize("target", ["scheduler", "worker"])


def _unpicklable_pickle() -> bytes:
    # A well-formed pickle stream whose global cannot be imported.
    return b"cno_such_module_xy\nf\n."  # GLOBAL opcode, then STOP


def _needs_buffer_pickle() -> bytes:
    # A protocol-5 pickle that expects an out-of-band buffer nobody sends.
    return pickle.dumps(pickle.PickleBuffer(b"x" * 100), protocol=5, buffer_callback=lambda b: False)


BAD_MESSAGES = {
    # name: (bytes to send, expected text in the logged reason)
    "http-request": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "bad magic"),
    "random-garbage": (b"\x00GARBAGE" + bytes(range(256)) * 16, "bad magic"),
    "wrong-magic-valid-shape": (b"HPC2" + framed(b"x")[4:], "bad magic"),
    "zero-frames": (HEADER.pack(MAGIC, 0), "bad frame count"),
    "too-many-frames": (HEADER.pack(MAGIC, MAX_FRAMES + 1), "bad frame count"),
    "u32-max-frames": (HEADER.pack(MAGIC, 2**32 - 1), "bad frame count"),
    "oversized-frame": (framed(nframes=1, lengths=[MAX_MESSAGE_SIZE + 1]), "exceeds the limit"),
    "oversized-total": (
        framed(nframes=3, lengths=[MAX_MESSAGE_SIZE // 2, MAX_MESSAGE_SIZE // 2, 2]),
        "exceeds the limit",
    ),
    "u64-max-length": (framed(nframes=1, lengths=[2**64 - 1]), "exceeds the limit"),
    "not-a-pickle": (framed(b"this is not a pickle stream"), "undecodable"),
    "truncated-pickle": (framed(pickle.dumps({"op": "identity"}, protocol=5)[:-4]), "undecodable"),
    "unimportable-global": (framed(_unpicklable_pickle()), "undecodable"),
    "missing-oob-buffer": (framed(_needs_buffer_pickle()), "undecodable"),
    "pickle-of-list": (framed(pickle.dumps([1, 2, 3])), "not a message"),
    "pickle-of-str": (framed(pickle.dumps("identity")), "not a message"),
    "dict-without-op": (framed(pickle.dumps({"x": 1})), "not a message"),
    "dict-non-str-op": (framed(pickle.dumps({"op": 42})), "not a message"),
    "unknown-op": (framed(pickle.dumps({"op": "no-such-operation-xyz"})), "unknown operation"),
}


def test_bad_messages_are_well_formed_where_intended():
    """The cases above break exactly the rule they are named for."""
    good = framed(pickle.dumps({"op": "identity"}))
    magic, n = HEADER.unpack(good[: HEADER.size])
    assert (magic, n) == (MAGIC, 1)
    assert struct.unpack("<Q", good[8:16])[0] == len(good) - 16
    for name in ("not-a-pickle", "pickle-of-list", "unknown-op", "missing-oob-buffer"):
        data = BAD_MESSAGES[name][0]
        assert data[:4] == MAGIC, name
        assert struct.unpack("<Q", data[8:16])[0] == len(data) - 16, name
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(_unpicklable_pickle())
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(_needs_buffer_pickle())


@targets
@gen_test(timeout=10)
async def test_raw_socket_valid_request_is_answered(target):
    """Positive control: the framing used below is the real one."""
    async with gen_cluster(nworkers=1) as (c, s, workers):
        addr = target_address(target, s, workers)
        sock = await raw_connect(addr)
        try:
            await asyncio.get_running_loop().sock_sendall(sock, framed(pickle.dumps({"op": "identity"})))
            status, info = await asyncio.wait_for(read_reply(sock), 5)
            assert status == "OK"
            assert info["address"] == addr
            # The connection stays open for the next request.
            await asyncio.get_running_loop().sock_sendall(sock, framed(pickle.dumps({"op": "identity"})))
            status, _ = await asyncio.wait_for(read_reply(sock), 5)
            assert status == "OK"
        finally:
            sock.close()


@targets
@pytest.mark.parametrize("case", list(BAD_MESSAGES))
@gen_test(timeout=10)
async def test_bad_message_closes_only_that_connection(target, case, caplog):
    payload, reason = BAD_MESSAGES[case]
    caplog.set_level(logging.WARNING, logger="runtime")
    loop = asyncio.get_running_loop()
    async with gen_cluster(nworkers=1) as (c, s, workers):
        addr = target_address(target, s, workers)
        # A bystander connection made before the bad one must survive it.
        bystander = await raw_connect(addr)
        sock = await raw_connect(addr)
        try:
            peer = "{}:{}".format(*sock.getsockname()[:2])
            rss0, peak0 = rss(), peak_rss()
            await loop.sock_sendall(sock, payload)
            leftover = await recv_until_closed(sock, timeout=5)
            assert leftover == b"", "the server answered a bad message instead of closing"
            assert rss() - rss0 < 100 * MB
            assert peak_rss() - peak0 < 100 * MB
            await until(lambda: not server_side_connected(sock), timeout=5,
                        what="server to drop its end")

            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any(reason in m and peer in m for m in logged), logged

            await client_still_works(c, len(case))
            await loop.sock_sendall(bystander, framed(pickle.dumps({"op": "identity"})))
            status, _ = await asyncio.wait_for(read_reply(bystander), 5)
            assert status == "OK"
        finally:
            sock.close()
            bystander.close()


@targets
@pytest.mark.parametrize(
    "partial",
    [
        HEADER.pack(MAGIC, 1)[:5],  # inside the header
        HEADER.pack(MAGIC, 2) + struct.pack("<Q", 100),  # inside the lengths
        framed(b"x" * 1000)[:200],  # inside a small frame
        framed(b"y" * (1 * MB))[: 300 * 1024],  # inside a large (preallocated) frame
    ],
    ids=["in-header", "in-lengths", "in-small-frame", "in-large-frame"],
)
@pytest.mark.parametrize("how", ["half-close", "close"])
@gen_test(timeout=10)
async def test_client_disconnects_mid_message(target, partial, how, caplog):
    caplog.set_level(logging.WARNING, logger="runtime")
    loop = asyncio.get_running_loop()
    async with gen_cluster(nworkers=1) as (c, s, workers):
        addr = target_address(target, s, workers)
        sock = await raw_connect(addr)
        try:
            await loop.sock_sendall(sock, partial)
            if how == "half-close":
                # We stop writing but keep reading: the server must see EOF and close.
                sock.shutdown(socket.SHUT_WR)
                assert await recv_until_closed(sock, timeout=5) == b""
                await until(lambda: not server_side_connected(sock), timeout=5,
                            what="server to drop its end")
            else:
                name = sock.getsockname()
                sock.close()

                def gone():
                    return not any(
                        c.raddr and tuple(c.raddr) == name and c.status == psutil.CONN_ESTABLISHED
                        for c in psutil.Process().net_connections(kind="inet")
                    )

                await until(gone, timeout=5, what="server to drop its end")
        finally:
            sock.close()
        # A peer going away is routine, not an error worth more than a warning.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        await client_still_works(c, len(partial))


@targets
@gen_test(timeout=15)
async def test_many_bad_connections_then_client_works(target, caplog):
    caplog.set_level(logging.WARNING, logger="runtime")
    loop = asyncio.get_running_loop()
    async with gen_cluster(nworkers=1) as (c, s, workers):
        addr = target_address(target, s, workers)
        socks = [await raw_connect(addr) for _ in range(20)]
        try:
            payloads = [v[0] for v in BAD_MESSAGES.values()]
            await asyncio.gather(*(
                loop.sock_sendall(sock, payloads[i % len(payloads)]) for i, sock in enumerate(socks)
            ))
            leftovers = await asyncio.gather(*(recv_until_closed(sock, 5) for sock in socks))
            assert leftovers == [b""] * len(socks)
        finally:
            for sock in socks:
                sock.close()
        await client_still_works(c, 100)
        assert len([r for r in caplog.records if "closing connection" in r.getMessage()]) >= 20


@gen_test(timeout=10)
async def test_bad_request_arguments_get_an_error_reply_not_a_crash():
    """A known op with bad arguments is the handler's error: replied to, connection kept."""
    loop = asyncio.get_running_loop()
    async with gen_cluster(nworkers=1) as (c, s, workers):
        sock = await raw_connect(s.address)
        try:
            await loop.sock_sendall(sock, framed(pickle.dumps({"op": "identity", "bogus": 1})))
            reply = await asyncio.wait_for(read_reply(sock), 5)
            assert reply[0] == "error"
            assert isinstance(reply[1], TypeError)
            assert "bogus" in str(reply[1])
            await loop.sock_sendall(sock, framed(pickle.dumps({"op": "identity"})))
            assert (await asyncio.wait_for(read_reply(sock), 5))[0] == "OK"
        finally:
            sock.close()
        await client_still_works(c, 7)



@targets
@gen_test(timeout=10)
async def test_announced_but_unsent_frame_does_not_commit_memory(target):
    loop = asyncio.get_running_loop()
    announced = 256 * MB  # well under MAX_MESSAGE_SIZE, but nothing of it is ever sent
    assert announced < MAX_MESSAGE_SIZE
    async with gen_cluster(nworkers=1) as (c, s, workers):
        sock = await raw_connect(target_address(target, s, workers))
        try:
            rss0 = rss()
            await loop.sock_sendall(sock, framed(nframes=1, lengths=[announced]) + b"z" * 1024)
            # A negative property needs a window: watch RSS for a while, fail on the first jump.
            deadline = loop.time() + 1.0
            while loop.time() < deadline:
                assert rss() - rss0 < 100 * MB, "server committed memory for data never sent"
                await asyncio.sleep(0.02)
        finally:
            sock.close()
        await client_still_works(c, 11)
