"""Large transfers over ``tcp://`` and ``tls://``, on asyncio's loop and on uvloop.

Large frames are received straight into their own buffers, committed a window
at a time ahead of the data (``runtime.comm.tcp.populate``).  These tests check
what arrives at every size around the buffer and window boundaries, that numpy
arrays arrive writable and ``bytes`` as ``bytes``, that the fallback for
kernels without ``MADV_POPULATE_WRITE`` gives the same result, and that a
peer who stops in the middle of a large frame costs only its own connection.
"""

from __future__ import annotations

import asyncio
import mmap
import socket
import struct

import numpy as np
import pytest
from cluster.runtime.comm import box_large, connect, listen
from cluster.runtime.comm import tcp as tcp_module
from cluster.runtime.comm.core import HEADER, MAGIC
from cluster.runtime.errors import CommError
from cluster.runtime.security import Security

from tests.helpers import echo, pattern, run_on_loop

pytestmark = pytest.mark.timeout(120)

KiB, MiB = 1 << 10, 1 << 20
WINDOW = tcp_module.POPULATE_WINDOW


@pytest.fixture(scope="module")
def sec():
    return Security.temporary()


async def _pair(protocol: str, sec: Security, handler):
    kw = sec.get_listen_args("worker") if protocol == "tls" else {}
    listener = listen(f"{protocol}://127.0.0.1:0", handler, **kw)
    await listener.start()
    ckw = sec.get_connection_args("worker") if protocol == "tls" else {}
    return listener, ckw


SIZES = [
    tcp_module.SMALL_FRAME - 1,  # sliced out of the shared buffer
    tcp_module.SMALL_FRAME,  # own bytearray
    tcp_module.LARGE_FRAME,  # first size received into a memory map
    WINDOW - 1,
    WINDOW + 1,  # crosses one populate window
    3 * WINDOW + 4097,  # several windows, not page aligned
]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_sizes_around_buffer_and_window_boundaries(sec, protocol, loop_kind):
    async def main():
        listener, ckw = await _pair(protocol, sec, echo)
        try:
            comm = await connect(listener.contact_address, timeout=5, **ckw)
            try:
                for n in SIZES:
                    arr = pattern(n)
                    raw = arr.tobytes()
                    msg = {"arr": arr, "bytes": box_large(raw), "n": n}
                    await comm.write(msg)
                    got = await comm.read()
                    assert got["n"] == n
                    out = got["arr"]
                    assert out.dtype == np.uint8 and out.shape == (n,)
                    assert np.array_equal(out, arr), n
                    if n >= tcp_module.SMALL_FRAME:
                        # Out-of-band arrays with their own buffers arrive writable,
                        # as before (smaller ones are read-only slices).
                        assert out.flags.writeable
                        out[:1] = 0
                    assert type(got["bytes"]) is bytes and got["bytes"] == raw, n
            finally:
                comm.abort()
        finally:
            listener.stop()

    run_on_loop(loop_kind, main)


@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_many_large_frames_in_one_message(sec, protocol):
    """Several large buffers back to back: each lands in its own map, in order."""
    arrays = [pattern(WINDOW + k * 4099) + k for k in range(4)]

    async def main():
        listener, ckw = await _pair(protocol, sec, echo)
        try:
            comm = await connect(listener.contact_address, timeout=5, **ckw)
            try:
                await comm.write({"parts": arrays})
                got = await comm.read()
            finally:
                comm.abort()
        finally:
            listener.stop()
        return got

    got = run_on_loop("uvloop", main)
    assert len(got["parts"]) == len(arrays)
    for a, b in zip(got["parts"], arrays, strict=True):
        assert np.array_equal(a, b)


def test_without_populate_the_data_is_the_same(sec, monkeypatch):
    """A kernel that refuses ``MADV_POPULATE_WRITE`` (EINVAL): pages fault in as before."""
    calls = []
    real = mmap.mmap.madvise

    def refusing(self, option, *args):
        if option == 23:
            calls.append(args)
            raise OSError(22, "Invalid argument")
        return real(self, option, *args)

    monkeypatch.setattr(tcp_module, "_POPULATE", 23)
    monkeypatch.setattr(tcp_module.mmap, "mmap", _MmapWith(refusing))
    arr = pattern(2 * WINDOW + 5)

    async def main():
        listener, ckw = await _pair("tcp", sec, echo)
        try:
            comm = await connect(listener.contact_address, timeout=5, **ckw)
            try:
                await comm.write(arr)
                return await comm.read()
            finally:
                comm.abort()
        finally:
            listener.stop()

    got = run_on_loop("uvloop", main)
    assert np.array_equal(got, arr)
    assert len(calls) == 1  # tried once, then never again
    assert tcp_module._POPULATE is None


def _MmapWith(madvise):
    """An ``mmap.mmap`` subclass whose ``madvise`` is ``madvise``."""

    class M(mmap.mmap):
        pass

    M.madvise = madvise
    return M


@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_peer_stopping_inside_a_large_frame_costs_only_its_connection(sec, protocol):
    """A sender that announces a 64 MiB frame, sends 3 MiB of it and goes away: its
    connection's read fails; another connection to the same listener carries on."""
    reads: list = []

    async def handler(comm):
        try:
            while True:
                msg = await comm.read()
                reads.append(("ok", comm.peer_address))
                await comm.write(msg)
        except CommError as e:
            reads.append(("closed", comm.peer_address, type(e).__name__))

    async def main():
        listener, ckw = await _pair(protocol, sec, handler)
        try:
            good = await connect(listener.contact_address, timeout=5, **ckw)
            host, port = listener.listen_address.split("://")[1].rsplit(":", 1)
            ssl_ctx = ckw.get("ssl_context")
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=ssl_ctx, server_hostname=host if ssl_ctx else None)
            head = HEADER.pack(MAGIC, 2) + struct.pack("<2Q", 10, 64 * MiB)
            writer.write(head + b"x" * 10 + b"\x07" * (3 * MiB))
            await writer.drain()
            writer.transport.abort()
            deadline = asyncio.get_running_loop().time() + 20
            while not any(r[0] == "closed" for r in reads):
                assert asyncio.get_running_loop().time() < deadline, reads
                await asyncio.sleep(0.01)
            arr = pattern(WINDOW + 3)
            await good.write({"still": arr})
            back = await good.read()
            assert np.array_equal(back["still"], arr)
            good.abort()
        finally:
            listener.stop()

    run_on_loop("uvloop", main)
    closed = [r for r in reads if r[0] == "closed"]
    assert len(closed) >= 1
    assert ("ok", closed[0][1]) not in reads  # the broken peer got nothing through


def test_oversized_announcement_is_refused_before_allocation():
    """A header announcing more than MAX_MESSAGE_SIZE (lengths are u64: past 2 and 4 GiB)
    is a protocol error on that connection, with nothing allocated."""
    from cluster.runtime.comm import core

    async def main():
        accepted: asyncio.Queue = asyncio.Queue()

        async def handler(comm):
            try:
                await comm.read()
                await accepted.put("read")
            except CommError as e:
                await accepted.put(type(e).__name__)

        listener = listen("tcp://127.0.0.1:0", handler)
        await listener.start()
        try:
            host, port = listener.listen_address.split("://")[1].rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(HEADER.pack(MAGIC, 2) + struct.pack("<2Q", 3 << 30, 2 << 30))
                return await asyncio.wait_for(accepted.get(), 10)
        finally:
            listener.stop()

    assert core.MAX_MESSAGE_SIZE < 5 << 30
    assert run_on_loop("uvloop", main) == "ProtocolError"
