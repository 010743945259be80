"""Contract tests for the transports behind ``runtime.comm.listen``/``connect``.

Every test that takes ``address`` runs once per transport: what one transport
promises, the other must too.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest
from cluster.runtime.comm import box_large, connect, dumps, listen
from cluster.runtime.comm import core as comm_core
from cluster.runtime.comm.inproc import new_address
from cluster.runtime.errors import AddressError, CommClosedError, ConnectionTimeoutError
from cluster.runtime.utils import parse_address, parse_host_port

from tests.helpers import gen_test

TRANSPORTS = ["tcp://127.0.0.1:0", "inproc://"]

transports = pytest.mark.parametrize("address", TRANSPORTS, ids=["tcp", "inproc"])


@asynccontextmanager
async def comm_pair(address: str):
    """A listener on ``address`` and one connection to it: ``(client, server, listener)``."""
    accepted: asyncio.Queue = asyncio.Queue()

    async def handler(comm):
        await accepted.put(comm)

    listener = listen(address, handler)
    await listener.start()
    try:
        client = await connect(listener.contact_address, timeout=5)
        try:
            server = await asyncio.wait_for(accepted.get(), 5)
            try:
                yield client, server, listener
            finally:
                server.abort()
        finally:
            client.abort()
    finally:
        listener.stop()


async def echo(client, server, msg):
    """Send ``msg`` client -> server -> client and return what came back."""
    # All three at once: a large reply only fits through the socket while it is being read.
    _, _, got = await asyncio.gather(client.write(msg), _bounce(server), client.read())
    return got


async def _bounce(server):
    await server.write(await server.read())


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unused_address(address: str) -> str:
    """An address of the same transport as ``address`` where nobody listens."""
    if address.startswith("tcp://"):
        return f"tcp://127.0.0.1:{free_port()}"
    return "inproc://" + new_address()


# --------------------------------------------------------------------------- round trips


@transports
@pytest.mark.parametrize(
    "msg",
    [
        {"op": "ping", "x": 1},
        [1, 2.5, "three", None, True],
        {"nested": {"a": [1, {"b": (2, 3)}], "c": {"d": b"bytes", "e": {1, 2}}}, "key": ("x", 0)},
        {},
        "",
    ],
    ids=["dict", "list", "nested", "empty-dict", "empty-str"],
)
@gen_test(timeout=10)
async def test_echo_round_trip(address, msg):
    async with comm_pair(address) as (client, server, _):
        assert await echo(client, server, msg) == msg
        # And the other direction: the server speaks first.
        await server.write(msg)
        got = await client.read()
        assert got == msg
        assert type(got) is type(msg)


@transports
@gen_test(timeout=10)
async def test_write_returns_bytes_written(address):
    async with comm_pair(address) as (client, server, _):
        n = await client.write({"payload": b"x" * 1000})
        assert n >= 1000
        assert (await server.read())["payload"] == b"x" * 1000


@transports
@gen_test(timeout=10)
async def test_many_messages_in_order(address):
    n = 2000
    async with comm_pair(address) as (client, server, _):

        async def send(comm):
            for i in range(n):
                await comm.write({"i": i, "pad": "x" * (i % 50)})

        async def receive(comm):
            return [(await comm.read())["i"] for _ in range(n)]

        _, got = await asyncio.gather(send(client), receive(server))
        assert got == list(range(n))
        _, got = await asyncio.gather(send(server), receive(client))
        assert got == list(range(n))


@transports
@gen_test(timeout=15)
async def test_large_numpy_array_round_trip(address):
    rng = np.random.default_rng(42)
    arr = rng.integers(0, 2**62, size=50 * 2**20 // 8, dtype=np.int64)  # 50 MiB
    assert arr.nbytes == 50 * 2**20
    async with comm_pair(address) as (client, server, _):
        got = await echo(client, server, {"array": arr, "meta": "m"})
    assert got["meta"] == "m"
    out = got["array"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr)


@transports
@gen_test(timeout=15)
async def test_large_non_contiguous_and_2d_arrays(address):
    base = np.arange(4 * 2**20, dtype=np.float64).reshape(2048, 2048)
    msg = {"f": np.asfortranarray(base), "strided": base[::2, ::3], "c": base}
    async with comm_pair(address) as (client, server, _):
        got = await echo(client, server, msg)
    for k, v in msg.items():
        assert got[k].shape == v.shape
        assert np.array_equal(got[k], v), k


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
@transports
@gen_test(timeout=15)
async def test_large_bytes_like_round_trip(address, kind):
    raw = os.urandom(16 * 2**20)
    value = {"bytes": raw, "bytearray": bytearray(raw), "memoryview": memoryview(raw)}[kind]
    async with comm_pair(address) as (client, server, _):
        got = await echo(client, server, {"data": box_large(value), "tail": 1})
    assert got["tail"] == 1
    assert bytes(got["data"]) == raw
    if kind == "bytes":
        assert type(got["data"]) is bytes


@transports
@gen_test(timeout=15)
async def test_large_plain_bytes_round_trip(address):
    """Unboxed bytes are not out of band, but they must still arrive intact."""
    raw = os.urandom(8 * 2**20)
    async with comm_pair(address) as (client, server, _):
        got = await echo(client, server, [raw, bytearray(raw[:1000])])
    assert type(got[0]) is bytes and got[0] == raw
    assert type(got[1]) is bytearray and got[1] == raw[:1000]


def test_large_buffers_travel_out_of_band():
    raw = os.urandom(1 << 20)
    arr = np.arange(1 << 18, dtype=np.float32)
    for value, size in [
        (box_large(raw), len(raw)),
        (box_large(bytearray(raw)), len(raw)),
        (box_large(memoryview(raw)), len(raw)),
        (arr, arr.nbytes),
        ({"nested": [arr]}, arr.nbytes),
    ]:
        frames = dumps(value)
        assert len(frames) > 1, type(value)
        # The pickle stream holds no copy of the payload: it sits in its own frame.
        assert len(frames[0]) < 4096
        assert sum(memoryview(f).nbytes for f in frames[1:]) == size


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("tcp://127.0.0.1:0", id="tcp"),
        pytest.param("inproc://", id="inproc"),
    ],
)
@gen_test(timeout=10)
async def test_received_buffers_do_not_alias_sent_ones(address):
    """A message is a copy on every transport: mutating what arrived leaves the source alone."""
    arr = np.zeros(1 << 16, dtype=np.int64)
    async with comm_pair(address) as (client, server, _):
        await client.write({"a": arr})
        got = (await server.read())["a"]
    assert np.array_equal(got, arr)
    if got.flags.writeable:
        got[:] = 7
    assert not np.shares_memory(got, arr)
    assert (arr == 0).all()


# --------------------------------------------------------------------------- closing


@transports
@pytest.mark.parametrize("closer", ["client", "server"])
@pytest.mark.parametrize("how", ["close", "abort"])
@gen_test(timeout=10)
async def test_closing_one_side_fails_the_others_read(address, closer, how):
    async with comm_pair(address) as (client, server, _):
        this, other = (client, server) if closer == "client" else (server, client)
        pending = asyncio.ensure_future(other.read())
        await asyncio.sleep(0)  # let the read start waiting (not synchronisation of a result)
        if how == "close":
            await this.close()
        else:
            this.abort()
        assert this.closed()
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(pending, 5)
        assert other.closed()
        # Once the read has seen the close, later reads and writes fail at once.
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(other.read(), 5)
        with pytest.raises(CommClosedError):
            await other.write({"x": 1})


@transports
@gen_test(timeout=10)
async def test_read_after_peer_closed_raises(address):
    """No read pending when the peer closes: the next read still raises."""
    async with comm_pair(address) as (client, server, _):
        await client.write({"last": True})
        await client.close()
        assert await asyncio.wait_for(server.read(), 5) == {"last": True}
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(server.read(), 5)


@transports
@gen_test(timeout=10)
async def test_write_and_read_after_own_close_raise(address):
    async with comm_pair(address) as (client, server, _):
        await client.close()
        assert client.closed()
        with pytest.raises(CommClosedError):
            await client.write({"x": 1})
        with pytest.raises(CommClosedError):
            await client.read()
        with pytest.raises(CommClosedError):  # BatchedSend's path, on both transports
            client.write_nowait({"x": 1})
        # Closing again is harmless.
        await client.close()
        client.abort()
        assert client.closed()
        assert "closed" in repr(client)


@transports
@gen_test(timeout=10)
async def test_pending_read_fails_when_own_side_closes(address):
    async with comm_pair(address) as (client, server, _):
        pending = asyncio.ensure_future(client.read())
        await asyncio.sleep(0)  # let the read start waiting (not synchronisation of a result)
        client.abort()
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(pending, 5)


@transports
@gen_test(timeout=10)
async def test_write_nowait_delivers_in_order(address):
    async with comm_pair(address) as (client, server, _):
        futs = [client.write_nowait({"i": i}) for i in range(50)]
        await asyncio.gather(*futs)
        assert [(await server.read())["i"] for _ in range(50)] == list(range(50))


# --------------------------------------------------------------------------- addresses


@gen_test(timeout=10)
async def test_inproc_alias_leads_to_a_live_listener_only():
    """A server's public address maps to its inproc twin while that listens, then to nothing."""
    from cluster.runtime.comm import inproc

    async def handler(comm):
        await comm.write(await comm.read())

    listener = listen("inproc://", handler)
    await listener.start()
    public = f"tls://127.0.0.1:{free_port()}"
    inproc.register_alias(public, listener.listen_address)
    try:
        assert inproc.alias_of(public) == listener.listen_address
        assert inproc.alias_of(public + "0") is None
        comm = await connect(inproc.alias_of(public), timeout=5)
        await comm.write({"x": 1})
        assert await comm.read() == {"x": 1}
        comm.abort()
        listener.stop()
        assert inproc.alias_of(public) is None  # registered, but nobody listens
    finally:
        listener.stop()
        inproc.unregister_alias(public)
    assert inproc.alias_of(public) is None


@transports
@gen_test(timeout=10)
async def test_local_and_peer_addresses(address):
    protocol = address.split("://")[0]
    async with comm_pair(address) as (client, server, listener):
        listen_address = listener.listen_address
        assert listener.contact_address == listen_address
        for addr in (listen_address, client.local_address, client.peer_address,
                     server.local_address, server.peer_address):
            proto, loc = parse_address(addr)
            assert proto == protocol, addr
            if protocol == "tcp":
                host, port = parse_host_port(loc)
                assert host == "127.0.0.1" and 0 < port < 65536, addr
            else:
                assert re.fullmatch(rf"{os.getpid()}/\d+", loc), addr
        assert client.peer_address == listen_address
        assert server.local_address == listen_address
        assert server.peer_address == client.local_address
        assert client.local_address != listen_address
        assert "open" in repr(client) and client.local_address in repr(client)
        assert not client.closed() and not server.closed()


# --------------------------------------------------------------------------- connect failures


@transports
@gen_test(timeout=10)
async def test_connect_after_listener_stop_times_out(address):
    accepted = []

    async def handler(comm):
        accepted.append(comm)

    listener = listen(address, handler)
    await listener.start()
    addr = listener.contact_address
    listener.stop()
    timeout = 0.3
    t0 = time.monotonic()
    with pytest.raises(ConnectionTimeoutError) as info:
        await connect(addr, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 1.0
    assert info.value.address == addr
    assert info.value.timeout == timeout
    assert addr in str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert accepted == []


@transports
@gen_test(timeout=10)
async def test_connect_to_nothing_retries_with_backoff(address, monkeypatch):
    addr = unused_address(address)
    protocol = address.split("://")[0]
    backend = comm_core.backends[protocol]
    real_connect = backend.connect
    attempts: list[float] = []

    async def counting_connect(location, **kwargs):
        attempts.append(time.monotonic())
        return await real_connect(location, **kwargs)

    monkeypatch.setattr(backend, "connect", counting_connect)
    timeout = 0.6
    t0 = time.monotonic()
    with pytest.raises(ConnectionTimeoutError) as info:
        await connect(addr, timeout=timeout)
    elapsed = time.monotonic() - t0
    # It kept trying for about the timeout, and not much longer.
    assert timeout * 0.9 <= elapsed <= timeout + 1.0
    assert addr in str(info.value)
    assert f"{timeout:g}s" in str(info.value)
    assert info.value.reason  # the last error is kept
    # Retried, with growing pauses: neither one attempt nor a busy loop.
    assert 3 <= len(attempts) <= 20, len(attempts)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert max(gaps) >= 2 * gaps[0], gaps


@pytest.mark.parametrize("address", ["foo://127.0.0.1:1234", "udp://127.0.0.1:1", "ucx://x"])
@gen_test(timeout=5)
async def test_unknown_protocol_raises_address_error(address):
    proto = address.split("://")[0]
    t0 = time.monotonic()
    with pytest.raises(AddressError, match=rf"unknown protocol '{proto}'"):
        await connect(address, timeout=3)
    assert time.monotonic() - t0 < 1.0  # not retried until the timeout

    async def handler(comm):  # pragma: no cover - never called
        pass

    with pytest.raises(AddressError, match=rf"unknown protocol '{proto}'"):
        listen(address, handler)


@pytest.mark.parametrize(
    "address, match",
    [
        ("", "invalid address"),
        (None, "invalid address"),
        (8786, "invalid address"),
        ("tcp://127.0.0.1", "missing port"),
        ("tcp://127.0.0.1:http", "not a number"),
        ("tcp://127.0.0.1:70000", "out of range"),
    ],
)
@gen_test(timeout=5)
async def test_bad_address_raises_address_error(address, match):
    t0 = time.monotonic()
    with pytest.raises(AddressError, match=match):
        await connect(address, timeout=3)
    assert time.monotonic() - t0 < 1.0  # not retried until the timeout


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:70000", "tcp://127.0.0.1:port", "", None])
def test_listen_on_bad_address_raises_address_error(address):
    async def handler(comm):  # pragma: no cover - never called
        pass

    with pytest.raises(AddressError):
        listen(address, handler)


@transports
@gen_test(timeout=10)
async def test_listen_on_address_in_use_fails(address):
    async def handler(comm):  # pragma: no cover - never called
        pass

    first = listen(address, handler)
    await first.start()
    try:
        second = listen(first.listen_address, handler)
        with pytest.raises(OSError):
            await second.start()
        second.stop()
    finally:
        first.stop()


# ----------------------------------------------------------------------------- batched stream holds


@gen_test(timeout=20)
async def test_batched_send_within_holds_until_a_plain_send_flush_or_close():
    from cluster.runtime.core import BatchedSend

    async with comm_pair("tcp://127.0.0.1:0") as (client, server, _):
        bs = BatchedSend(client, name="test")
        # A held message leaves with the next plain send: one write for both.
        bs.send({"n": 1}, within=60)
        bs.send({"n": 2})
        assert await asyncio.wait_for(server.read(), 5) == [{"n": 1}, {"n": 2}]
        assert (bs.message_count, bs.batch_count) == (2, 1)
        # flush() does not wait out the hold.
        bs.send({"n": 3}, within=60)
        await asyncio.wait_for(bs.flush(timeout=30), 5)
        assert await asyncio.wait_for(server.read(), 5) == [{"n": 3}]
        # Alone, a held message leaves after its bound, several together.
        bs.send({"n": 4}, within=0.05)
        bs.send({"n": 5}, within=0.05)
        assert await asyncio.wait_for(server.read(), 5) == [{"n": 4}, {"n": 5}]
        # close() sends what is held.
        bs.send({"n": 6}, within=60)
        await asyncio.wait_for(bs.close(), 5)
        assert await asyncio.wait_for(server.read(), 5) == [{"n": 6}]
