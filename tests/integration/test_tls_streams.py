"""TLS connections under load, over real sockets, on asyncio's loop and on uvloop.

Over TLS a large frame goes to the transport in pieces (``TLS_WRITE_CHUNK``),
each once the one before has drained, so these check what that must keep:
``close`` sends what is queued first; back-pressure pauses the writer while
the reader does not read, and resumes it; both directions at once, large
frames between small messages, keep every byte and the order; a dead peer
fails only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from cluster.runtime.comm import connect, listen
from cluster.runtime.comm import tcp as tcp_module
from cluster.runtime.errors import CommClosedError, CommError
from cluster.runtime.security import Security

from tests.helpers import echo, pattern, run_on_loop, until

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(scope="module")
def sec():
    return Security.temporary()


@contextlib.asynccontextmanager
async def tls_pair(sec: Security, handler):
    """A TLS listener running ``handler`` and a comm connected to it; both closed after."""
    listener = listen("tls://127.0.0.1:0", handler, **sec.get_listen_args("worker"))
    await listener.start()
    try:
        comm = await connect(listener.contact_address, timeout=10,
                             **sec.get_connection_args("worker"))
        try:
            yield comm
        finally:
            comm.abort()
    finally:
        listener.stop()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_both_ends_are_tls13_with_certificates(sec, loop_kind):
    seen = {}

    async def handler(comm):
        seen["server"] = comm.transport
        await comm.write(await comm.read())

    async def main():
        async with tls_pair(sec, handler) as comm:
            await comm.write("ping")
            assert await comm.read() == "ping"
            for transport in (comm.transport, seen["server"]):
                assert transport.get_extra_info("peercert")  # both ends showed a certificate
                assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        # Nothing resumes a session, so servers send no session tickets.
        assert sec.get_server_context("worker").num_tickets == 0

    run_on_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_close_right_after_a_large_write_delivers_all_of_it(sec, loop_kind):
    """The server writes 48 MiB and closes at once: the client gets every byte,
    then a closed connection."""
    data = pattern(48 * MiB, seed=3)

    async def handler(comm):
        await comm.read()
        comm.write_nowait({"data": data})  # not awaited: close must flush it
        await comm.close()

    async def main():
        async with tls_pair(sec, handler) as comm:
            await comm.write("go")
            msg = await comm.read()
            assert np.array_equal(msg["data"], data)
            with pytest.raises(CommClosedError):
                await comm.read()

    run_on_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_writer_waits_while_the_reader_does_not_read_then_goes_on(sec, loop_kind):
    """Back-pressure: with the reader holding more than READ_PAUSE_BYTES unread,
    its transport stops reading, the kernel's buffers fill, and the writer's
    transport buffers and pauses; the write's future stays pending until the
    reader reads again, and then everything arrives in order."""
    chunk = pattern(40 * MiB, seed=5)
    server: dict = {}

    async def handler(comm):
        server["comm"] = comm
        await server["go"].wait()
        got = []
        for _ in range(4):
            got.append(await comm.read())
        server["got"] = got

    async def main():
        server["go"] = asyncio.Event()
        async with tls_pair(sec, handler) as comm:
            futures = [comm.write_nowait({"i": i, "data": chunk}) for i in range(4)]
            await until(lambda: "comm" in server and server["comm"].protocol.reading_paused,
                        what="the reader to pause reading")
            await until(lambda: comm.transport.get_write_buffer_size() > 0,
                        what="the writer to buffer what the socket does not take")
            assert not futures[-1].done()
            assert comm.protocol.writing_paused
            server["go"].set()
            await asyncio.wait_for(asyncio.gather(*futures), 30)
            await until(lambda: "got" in server, what="the reader to read all four")
            assert [m["i"] for m in server["got"]] == [0, 1, 2, 3]
            assert all(np.array_equal(m["data"], chunk) for m in server["got"])

    run_on_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_both_directions_at_once_keep_every_message_in_order(sec, loop_kind):
    """Both ends write small messages and 3 MiB frames interleaved while reading
    the other's: full-duplex, each side's socket full at times."""
    big = pattern(3 * MiB, seed=7)
    n = 120

    def message(i: int):
        return {"i": i, "data": big} if i % 10 == 0 else {"i": i, "small": b"s" * (i % 97)}

    async def pump(comm, received: list):
        async def writer():
            for i in range(n):
                await comm.write(message(i))

        async def reader():
            for _ in range(n):
                received.append(await comm.read())

        await asyncio.gather(writer(), reader())

    server_received: list = []

    async def handler(comm):
        await pump(comm, server_received)

    async def main():
        client_received: list = []
        async with tls_pair(sec, handler) as comm:
            await pump(comm, client_received)
            await until(lambda: len(server_received) == n, what="the server to read all")
        for received in (client_received, server_received):
            assert [m["i"] for m in received] == list(range(n))
            for m in received:
                if "data" in m:
                    assert np.array_equal(m["data"], big)
                else:
                    assert m["small"] == b"s" * (m["i"] % 97)

    run_on_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_peer_gone_mid_write_fails_that_write_only(sec, loop_kind):
    """The server reads one message and aborts while the client is writing 64 MiB:
    the client's write fails with a connection error (not a hang); a new
    connection to the same listener works."""
    data = pattern(64 * MiB)

    async def handler(comm):
        msg = await comm.read()
        if msg == "abort":
            comm.abort()
            return
        await comm.write(msg)

    async def main():
        async with tls_pair(sec, handler) as comm:
            await comm.write("abort")
            with pytest.raises(CommError):
                for _ in range(8):  # the abort lands somewhere in these
                    await comm.write({"data": data})
                await comm.read()
            other = await connect(comm.peer_address, timeout=10,
                                  **sec.get_connection_args("worker"))
            await other.write("again")
            assert await other.read() == "again"
            other.abort()

    run_on_loop(loop_kind, main)


def test_frames_of_every_size_near_a_record_arrive_whole(sec):
    """Messages just under, at and over one TLS record (16 KiB) and the small
    frame limit, back to back: the short-read shortcut in the transport must
    not lose or delay any of them."""
    sizes = [1, 100, 16 * 1024 - 50, 16 * 1024, 16 * 1024 + 1, 32 * 1024,
             tcp_module.SMALL_FRAME - 1, tcp_module.SMALL_FRAME, tcp_module.SMALL_FRAME + 1]

    async def main():
        async with tls_pair(sec, echo) as comm:
            for _ in range(3):
                for size in sizes:
                    comm.write_nowait(bytes(pattern(size, seed=size)))
                for size in sizes:
                    assert await comm.read() == bytes(pattern(size, seed=size))

    run_on_loop("uvloop", main)


def test_messages_of_many_sizes_back_to_back_arrive_whole_and_in_order(sec):
    """600 messages of sizes from 1 byte to 70 KiB written without waiting, so that
    the shared receive buffer is compacted and grown while records straddle
    message boundaries; each echo must come back whole, in order, at once."""
    rng = np.random.default_rng(14)
    sizes = [int(x) for x in rng.integers(1, 70 * 1024, 600)]

    async def main():
        async with tls_pair(sec, echo) as comm:
            for i, size in enumerate(sizes):
                comm.write_nowait(bytes(pattern(size, seed=i)))
            for i, size in enumerate(sizes):
                got = await asyncio.wait_for(comm.read(), 10)
                assert got == bytes(pattern(size, seed=i)), i

    run_on_loop("uvloop", main)
