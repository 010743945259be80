"""TLS clusters on loopback: end to end, refusals, files, the command line.

The point of TLS here is that nobody without the cluster's credentials gets a
byte parsed, let alone unpickled.  The central test sends a well-framed
message whose unpickling would create a directory, first to a plain server
(which does create it: the payload works) and then to a TLS one (which must
not).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import struct
import time

import numpy as np
import pytest
from cluster.runtime.comm import connect, dumps, listen
from cluster.runtime.comm import tcp as tcp_module
from cluster.runtime.comm.core import HEADER, MAGIC
from cluster.runtime.errors import CommError, EncryptionRequiredError, TLSError
from cluster.runtime.loop import run as run_on_uvloop
from cluster.runtime.security import unregister_local_credentials
from cluster.runtime.utils import parse_address, parse_host_port

from cluster import Client, LocalCluster, Nanny, Scheduler, Security, Worker
from tests.helpers import gen_test, until, until_sync
from tests.integration.test_cli import (  # noqa: F401  (fixtures)
    launch,
    no_launcher_environment,
    read_address,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tls_log(caplog):
    caplog.set_level(logging.WARNING, logger="cluster.runtime.comm.tcp")
    return caplog


def inc(x):
    return x + 1


def ones(n):
    return np.ones(n)


def total(x):
    return float(x.sum())


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Mark:
    """Unpickling this creates the directory ``path``: the mark of a decoded message."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def framed(msg) -> bytes:
    """``msg`` exactly as a comm puts it on the wire."""
    frames = [bytes(f) for f in dumps(msg)]
    return (HEADER.pack(MAGIC, len(frames)) + struct.pack(f"<{len(frames)}Q", *map(len, frames))
            + b"".join(frames))


def host_port(address: str) -> tuple[str, int]:
    return parse_host_port(parse_address(address)[1])


async def send_raw(address: str, payload: bytes, until_closed: bool = True) -> bytes:
    """Send ``payload`` over a plain TCP connection; return what came back before the
    server closed it (or, without ``until_closed``, the first bytes of the reply)."""
    reader, writer = await asyncio.open_connection(*host_port(address))
    try:
        writer.write(payload)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read() if until_closed else reader.read(1), 10)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


# ----------------------------------------------------------------------------- the transport


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_comm_round_trips(sec, loop):
    async def main():
        async def echo(comm):
            try:
                while True:
                    await comm.write(await comm.read())
            except CommError:
                pass

        listener = listen("tls://127.0.0.1:0", echo, **sec.get_listen_args("scheduler"))
        await listener.start()
        try:
            comm = await connect(listener.contact_address, timeout=5,
                                 **sec.get_connection_args("client"))
            try:
                assert comm.peer_address.startswith("tls://127.0.0.1:")
                for msg in ({"op": "ping"}, [1, "two", b"three"], {"nested": {"a": (1, 2)}}):
                    await comm.write(msg)
                    assert await comm.read() == msg
                for i in range(300):  # in order
                    comm.write_nowait({"i": i})
                assert [(await comm.read())["i"] for _ in range(300)] == list(range(300))
                big = np.arange(3_000_000, dtype="f8")  # 24 MB: written in 1 MiB pieces
                got, _ = await asyncio.gather(comm.read(), comm.write({"x": big}))
                assert np.array_equal(got["x"], big)
                # small messages queued behind a large one keep their order
                futs = [comm.write_nowait({"x": big}), *(comm.write_nowait(i) for i in range(5))]
                got = [await comm.read() for _ in range(6)]
                assert np.array_equal(got[0]["x"], big) and got[1:] == list(range(5))
                await asyncio.gather(*futs)
            finally:
                comm.abort()
        finally:
            listener.stop()

    runner = asyncio.run if loop == "asyncio" else run_on_uvloop
    runner(asyncio.wait_for(main(), 60))


@gen_test(timeout=30)
async def test_tls_close_delivers_a_queued_large_message(sec):
    received: asyncio.Queue = asyncio.Queue()

    async def collect(comm):
        try:
            while True:
                await received.put(await comm.read())
        except CommError:
            await received.put(None)

    listener = listen("tls://127.0.0.1:0", collect, **sec.get_listen_args("worker"))
    await listener.start()
    try:
        comm = await connect(listener.contact_address, timeout=5, **sec.get_connection_args("worker"))
        big = np.ones(5_000_000, dtype="u1")
        comm.write_nowait({"x": big})
        comm.write_nowait("last")
        await comm.close()
        got = await asyncio.wait_for(received.get(), 10)
        assert got["x"].nbytes == big.nbytes and got["x"].all()
        assert await asyncio.wait_for(received.get(), 10) == "last"
        assert await asyncio.wait_for(received.get(), 10) is None
    finally:
        listener.stop()


@gen_test(timeout=30)
async def test_tls_address_without_credentials_fails_at_once():
    start = time.monotonic()
    with pytest.raises(TLSError, match="needs TLS credentials"):
        await Client("tls://127.0.0.1:1", security=False, asynchronous=True, timeout=20)
    with pytest.raises(TLSError, match="needs TLS credentials"):
        await Scheduler(protocol="tls")
    assert time.monotonic() - start < 5  # not retried until the timeout


# ----------------------------------------------------------------------------- clusters


@gen_test(timeout=60)
async def test_tls_cluster_end_to_end(sec):
    async with Scheduler(security=sec, validate=True) as s:
        assert s.address.startswith("tls://127.0.0.1:")
        async with Worker(s.address, security=sec, nthreads=1, name="a", validate=True) as a, \
                Worker(s.address, security=sec, nthreads=1, name="b", validate=True) as b:
            assert a.address.startswith("tls://") and b.address.startswith("tls://")
            async with Client(s.address, security=sec, asynchronous=True) as c:
                assert await c.gather(c.map(inc, range(50))) == list(range(1, 51))
                # a dependency moves worker to worker, over TLS
                x = c.submit(ones, 1_000_000, workers=[a.address])
                y = c.submit(total, x, workers=[b.address])
                assert await y == 1_000_000.0
                assert x.key in b.data
                # a large result comes straight from a worker, over TLS
                assert (await x).shape == (1_000_000,)
                [scattered] = await c.scatter([np.arange(10)], workers=[b.address])
                assert (await c.submit(total, scattered, workers=[a.address])) == 45.0


def test_local_cluster_is_tls_by_default_with_nannies():
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        assert cluster.nanny and cluster.security.require_encryption
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert c.security is cluster.security
        w0, w1 = sorted(c.scheduler_info()["workers"])
        assert w0.startswith("tls://") and w1.startswith("tls://")
        x = c.submit(ones, 100_000, workers=[w0])
        assert c.submit(total, x, workers=[w1]).result() == 100_000.0
        c.restart()  # fresh worker processes get the credentials again
        until_sync(lambda: len(c.scheduler_info()["workers"]) == 2, timeout=30, what="2 workers")
        assert c.submit(inc, 1).result() == 2
        # A client made in this process from the address alone (a script that
        # `python -m cluster script.py` runs next to its cluster) finds the credentials.
        with Client(cluster.scheduler_address, set_as_default=False) as c2:
            assert c2.submit(inc, 2).result() == 3


def test_security_false_means_plain_tcp():
    with LocalCluster(n_workers=1, processes=False, security=False) as cluster:
        assert cluster.security is None
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        with Client(cluster) as c:
            assert c.submit(inc, 1).result() == 2


@gen_test(timeout=30)
async def test_security_without_credentials_means_tcp():
    async with LocalCluster(n_workers=0, processes=False, security=Security(),
                            asynchronous=True) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")


@gen_test(timeout=60)
async def test_scheduler_file_and_credentials_file_are_private(sec, tmp_path):
    sched = tmp_path / "sched.json"
    async with Scheduler(security=sec, scheduler_file=str(sched)) as s:
        # Only the files below may tell the others how to get in.
        unregister_local_credentials(s.address)
        info = json.loads(sched.read_text())
        assert info["address"] == s.address
        assert mode(sched) == 0o600
        assert mode(info["security"]) == 0o600
        assert Security.from_file(info["security"]) == sec
        async with Nanny(scheduler_file=str(sched), nthreads=1, memory_limit=0) as n:
            assert n.address.startswith("tls://") and n.worker_address.startswith("tls://")
            async with Client(scheduler_file=str(sched), asynchronous=True) as c:
                assert c.security == sec
                assert await c.submit(inc, 1) == 2
    assert not sched.exists()
    assert not os.path.exists(info["security"])


# ----------------------------------------------------------------------------- refusals


@gen_test(timeout=60)
async def test_plain_server_unpickles_the_payload(tmp_path):
    """The control: without TLS the payload below is decoded (so the next test means something)."""
    mark = tmp_path / "unpickled"
    async with Scheduler(security=False) as s:
        reply = await send_raw(s.address, framed({"op": "identity", "x": Mark(mark)}),
                               until_closed=False)
        assert reply == MAGIC[:1]  # it even answered
        await until(mark.exists, what="the payload to be unpickled")


@gen_test(timeout=60)
async def test_plain_connection_to_tls_scheduler_is_refused_unread(sec, tmp_path, tls_log):
    mark = tmp_path / "unpickled"
    async with Scheduler(security=sec) as s:
        payload = framed({"op": "identity", "x": Mark(mark)})
        reply = await send_raw(s.address, payload * 3)
        assert MAGIC not in reply
        await until(lambda: "TLS handshake with 127.0.0.1:" in tls_log.text,
                    what="the refusal to be logged with the peer's address")
        assert not mark.exists()
        assert tls_log.records[-1].levelno == logging.WARNING
        # the scheduler goes on serving clients that have the credentials
        async with Client(s.address, security=sec, asynchronous=True) as c:
            assert (await c.scheduler_info())["address"] == s.address
        assert not mark.exists()


@gen_test(timeout=60)
async def test_wrong_ca_is_refused_both_ways(sec, other, tls_log):
    async with Scheduler(security=sec) as s:
        # The client does not trust a server of another cluster: fails at once.
        start = time.monotonic()
        with pytest.raises(TLSError, match="CERTIFICATE_VERIFY_FAILED"):
            await Client(s.address, security=other, asynchronous=True, timeout=20)
        assert time.monotonic() - start < 10
        with pytest.raises(TLSError):
            await Worker(s.address, security=other, nthreads=1, death_timeout=20)
        # The server does not accept a client certificate of another CA, even
        # from a client that trusts the server.
        impostor = Security(tls_ca_file=sec.tls_ca_file, tls_client_cert=other.tls_client_cert,
                            tls_client_key=other.tls_client_key)
        with pytest.raises(CommError):
            await Client(s.address, security=impostor, asynchronous=True, timeout=5)
        await until(lambda: "certificate" in tls_log.text.lower(), what="the refusal to be logged")
        assert not s.state.clients and not s.state.workers
        async with Client(s.address, security=sec, asynchronous=True) as c:
            assert c.status == "running" and len(s.state.clients) == 1


@gen_test(timeout=60)
async def test_client_without_certificate_is_refused(sec, tls_log):
    import ssl

    async with Scheduler(security=sec) as s:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=sec.tls_ca_file)
        reader, writer = await asyncio.open_connection(*host_port(s.address), ssl=ctx)
        try:
            writer.write(framed({"op": "identity"}))
            with pytest.raises((ssl.SSLError, ConnectionError)):
                data = await asyncio.wait_for(reader.read(), 10)
                if not data:
                    raise ConnectionResetError("closed")
        finally:
            writer.close()
        await until(lambda: "CERTIFICATE" in tls_log.text, what="the refusal to be logged")


@gen_test(timeout=60)
async def test_stalled_handshake_is_cut_off(sec, tls_log, monkeypatch):
    monkeypatch.setattr(tcp_module, "TLS_HANDSHAKE_TIMEOUT", 0.5)
    async with Scheduler(security=sec) as s:
        reader, writer = await asyncio.open_connection(*host_port(s.address))
        try:
            start = time.monotonic()
            try:
                data = await asyncio.wait_for(reader.read(), 10)  # we send nothing
            except ConnectionResetError:
                data = b""
            assert data == b""
            assert time.monotonic() - start < 5
        finally:
            writer.close()
        await until(lambda: "longer than 0.5 seconds" in tls_log.text, what="the timeout log")
        async with Client(s.address, security=sec, asynchronous=True) as c:
            assert c.status == "running"


@gen_test(timeout=60)
async def test_require_encryption_refuses_tcp(sec):
    with pytest.raises(EncryptionRequiredError, match="tcp://"):
        await Scheduler(security=sec, protocol="tcp")
    with pytest.raises(EncryptionRequiredError):
        await connect("tcp://127.0.0.1:1", **sec.get_connection_args("client"))
    with pytest.raises(EncryptionRequiredError):
        await LocalCluster(n_workers=0, processes=False, protocol="tcp", security=True,
                           asynchronous=True)
    async with Scheduler(security=False) as plain:
        start = time.monotonic()
        with pytest.raises(EncryptionRequiredError):
            await Client(plain.address, security=sec, asynchronous=True, timeout=20)
        with pytest.raises(EncryptionRequiredError):
            await Worker(plain.address, security=sec, nthreads=1)
        assert time.monotonic() - start < 5
        assert not plain.state.workers
    # inproc never leaves the process: allowed
    async with Scheduler(security=sec, protocol="inproc") as s:
        assert s.address.startswith("inproc://")


def test_bad_security_arguments():
    with pytest.raises(TypeError, match="security"):
        Scheduler(security="yes")
    with pytest.raises(ValueError, match="security=True"):
        Worker("tls://127.0.0.1:1", security=True)
    with pytest.raises(ValueError, match="security=True"):
        Client("tls://127.0.0.1:1", security=True, asynchronous=True)
    with pytest.raises(ValueError, match="protocol"):
        LocalCluster(protocol="tls", security=False, asynchronous=True)


# ----------------------------------------------------------------------------- command line


def write_credentials(sec: Security, directory) -> dict[str, str]:
    paths = {}
    for role in ("scheduler", "worker", "client"):
        for kind in ("cert", "key"):
            p = directory / f"{role}.{kind}"
            p.write_text(getattr(sec, f"tls_{role}_{kind}"))
            p.chmod(0o600)
            paths[f"{role}_{kind}"] = str(p)
    (directory / "ca.pem").write_text(sec.tls_ca_file)
    paths["ca"] = str(directory / "ca.pem")
    return paths


def test_command_line_with_tls_files(tmp_path, launch, sec):  # noqa: F811
    from tests.integration.test_cli import command_env

    files = write_credentials(sec, tmp_path)
    sched = tmp_path / "sched.json"
    launch("scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched),
           "--tls-ca-file", files["ca"], "--tls-cert", files["scheduler_cert"],
           "--tls-key", files["scheduler_key"])
    address = read_address(sched)
    assert address.startswith("tls://127.0.0.1:")
    assert mode(sched) == 0o600
    # the worker's credentials from CLUSTER_TLS_* variables
    launch("worker", "worker", address, "--nthreads", "1", "--no-nanny",
           env=command_env(CLUSTER_TLS_CA_FILE=files["ca"], CLUSTER_TLS_CERT=files["worker_cert"],
                           CLUSTER_TLS_KEY=files["worker_key"]))
    client_sec = Security(tls_ca_file=files["ca"], tls_client_cert=files["client_cert"],
                          tls_client_key=files["client_key"])
    with Client(address, security=client_sec, timeout=20) as c:
        until_sync(lambda: len(c.scheduler_info()["workers"]) == 1, timeout=30, what="a worker")
        assert c.submit(inc, 1).result() == 2
        c.shutdown()


def test_command_line_tls_options_go_together(tmp_path):
    from tests.integration.test_cli import run_cli

    result = run_cli(tmp_path, "scheduler", "--tls-cert", str(tmp_path / "c.pem"))
    assert result.returncode == 2
    assert "--tls-ca-file" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(tmp_path, "scheduler", "--protocol", "tls")
    assert result.returncode == 2 and "--tls-ca-file" in result.stderr
