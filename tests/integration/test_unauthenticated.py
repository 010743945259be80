"""Peers without credentials cannot exhaust a TLS server's memory or descriptors (issue 16).

Anyone on the machine can open connections to a scheduler's port and never
finish the TLS handshake.  These tests flood a real scheduler process (and the
status page) with such connections on loopback and check that the pending
handshakes stay bounded, that the log gets a count per interval rather than a
line per connection, that the scheduler's memory goes back once the flood is
cut, and that a client with the credentials keeps working throughout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time

import psutil
import pytest
from cluster.runtime.comm import admission
from cluster.runtime.comm import tcp as tcp_module

from cluster import Client, Scheduler, Security
from tests.helpers import gen_test, until, until_sync
from tests.integration.test_cli import (  # noqa: F401  (fixtures)
    launch,
    no_launcher_environment,
    read_address,
)
from tests.integration.test_tls import host_port, write_credentials

pytestmark = pytest.mark.timeout(120)

#: Stalled connections of the flood.
FLOOD = 2000


def partial_client_hello() -> bytes:
    """The first half of a real TLS ClientHello."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello[: len(hello) // 2]


def open_flood(host: str, port: int, n: int, payload: bytes,
               sources: int = 16) -> list[socket.socket]:
    """``n`` connections that send nothing (even ones) or ``payload`` (odd ones), then stall.

    They come from ``sources`` loopback addresses (127.0.0.2, 127.0.0.3, ...: all of
    127/8 is loopback), so the overall cap is reached, not only the per-host one.
    """
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(10)
            try:
                s.bind((f"127.0.0.{2 + i % sources}", 0))
                s.connect((host, port))
                if i % 2:
                    s.sendall(payload)
            except OSError:
                pass  # closed by the server's caps meanwhile: that is what they are for
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_flood_of_stalled_handshakes_is_bounded_and_memory_returns(tmp_path, launch, sec):  # noqa: F811
    from tests.integration.test_cli import command_env

    files = write_credentials(sec, tmp_path)
    sched = tmp_path / "sched.json"
    cmd = launch("scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched),
                 "--no-dashboard", "--tls-ca-file", files["ca"],
                 "--tls-cert", files["scheduler_cert"], "--tls-key", files["scheduler_key"],
                 env=command_env())
    address = read_address(sched)
    host, port = host_port(address)
    pid = cmd.proc.pid
    client_sec = Security(tls_ca_file=files["ca"], tls_client_cert=files["client_cert"],
                          tls_client_key=files["client_key"])
    with Client(address, security=client_sec, timeout=20) as c:
        assert c.run_on_scheduler(lambda: 1) == 1
        # Warm up: the scheduler's own allocations for a few real handshakes and one failure.
        close_all(open_flood(host, port, 4, partial_client_hello()))
        assert c.run_on_scheduler(lambda: 2) == 2
        before = rss(pid)
        fds_before = psutil.Process(pid).num_fds()
        socks = open_flood(host, port, FLOOD, partial_client_hello())
        try:
            peak = rss(pid)
            # The caps bound the descriptors the scheduler holds, flood or not.
            assert psutil.Process(pid).num_fds() < fds_before + admission.MAX_PENDING + 64
            # An existing client keeps working during the flood.
            assert c.run_on_scheduler(lambda: 3) == 3
        finally:
            close_all(socks)
        # Once the flood is cut, the pending handshakes fail (their descriptors close),
        # and then the memory goes back.
        until_sync(lambda: psutil.Process(pid).num_fds() <= fds_before + 4, timeout=30,
                   interval=0.1, what="the flood's descriptors to be closed")
        after = until_sync(lambda: (r := rss(pid)) <= before * 1.2 and r, timeout=40,
                           interval=0.2,
                           what=lambda: f"RSS {rss(pid) / 2**20:.0f} MiB to return within 20% "
                                        f"of {before / 2**20:.0f} MiB (peak "
                                        f"{peak / 2**20:.0f} MiB)")
        assert after <= before * 1.2
        assert c.run_on_scheduler(lambda: 4) == 4
        c.shutdown()
    until_sync(lambda: cmd.proc.poll() is not None, timeout=20, what="the scheduler to exit")
    log = cmd.err_path.read_text()
    lines = [line for line in log.splitlines() if "TLS handshake" in line]
    # A count per interval, not a line per connection.
    assert 1 <= len(lines) < 60, "\n".join(lines[:80])
    assert any("connections were closed unread to stay within" in line for line in lines), \
        "\n".join(lines)
    assert "Traceback" not in log


@gen_test(timeout=60)
async def test_caps_per_peer_and_overall_cut_the_oldest_stalled_handshake(sec, monkeypatch,
                                                                          caplog):
    caplog.set_level(logging.WARNING, logger="cluster.runtime.comm.tcp")
    monkeypatch.setattr(admission, "EVICT_AFTER", 0.3)
    monkeypatch.setattr(admission, "LOG_INTERVAL", 0.5)
    monkeypatch.setattr(admission, "MAX_PENDING_PER_PEER", 8)
    async with Scheduler(security=sec, dashboard_address=None) as s:
        listener = s.listeners[0]
        assert isinstance(listener, tcp_module.TLSListener)
        host, port = host_port(s.address)
        stalled = [await asyncio.open_connection(host, port) for _ in range(8)]
        try:
            await until(lambda: listener.admission.pending == 8, what="8 pending handshakes")
            # A ninth from the same host, at once: no room (the oldest is too young to cut).
            extra = await asyncio.open_connection(host, port)
            try:
                assert await asyncio.wait_for(extra[0].read(), 10) == b""
            finally:
                extra[1].close()
            assert listener.admission.refused_total == 1
            # A client with the credentials gets in: its handshake cuts the oldest stalled one.
            await until(lambda: time.monotonic() > 0 and all(
                time.monotonic() - e.since >= 0.3 for e in listener.admission._pending.values()),
                what="the stalled handshakes to be old enough to cut")
            async with Client(s.address, security=sec, asynchronous=True, timeout=20) as c:
                assert (await c.scheduler_info())["address"] == s.address
            assert listener.admission.cut_total >= 1
            assert await asyncio.wait_for(stalled[0][0].read(), 10) == b""  # the oldest went
            await until(lambda: "closed unread to stay within" in caplog.text,
                        what="the summary line")
        finally:
            for _, writer in stalled:
                writer.close()
        await until(lambda: listener.admission.pending == 0, what="the stalled ones to go")


@gen_test(timeout=60)
async def test_status_page_cuts_slow_handshakes_and_caps_unauthorised_connections(
        sec, monkeypatch, caplog):
    from cluster.runtime import http

    caplog.set_level(logging.WARNING, logger="cluster.runtime.http")
    monkeypatch.setattr(http, "HANDSHAKE_TIMEOUT", 0.5)  # 10 s by default (asyncio's: 60 s)
    monkeypatch.setattr(admission, "EVICT_AFTER", 0.3)
    async with Scheduler(security=sec, dashboard_address="127.0.0.1:0") as s:
        server = s.http_server
        port = server.port
        # One that says nothing is cut after the handshake timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            start = time.monotonic()
            try:
                assert await asyncio.wait_for(reader.read(), 10) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - start < 5
        finally:
            writer.close()
        await until(lambda: "TLS handshake with 127.0.0.1:" in caplog.text, what="the log line")
        # A flood from 8 hosts: at most MAX_UNAUTHORISED held (32 per host), the rest closed.
        monkeypatch.setattr(http, "HANDSHAKE_TIMEOUT", 30)
        flood = []
        try:
            for i in range(400):
                try:
                    flood.append(await asyncio.open_connection(
                        "127.0.0.1", port, local_addr=(f"127.0.0.{2 + i % 8}", 0)))
                except OSError:
                    pass
                assert server.connections <= http.MAX_UNAUTHORISED
            await until(lambda: server.admission.pending == http.MAX_UNAUTHORISED,
                        what="the caps to fill")
            assert server.admission.refused_total + server.admission.cut_total > 0
            # The link still opens the page: the oldest stalled connection makes room once
            # it has waited EVICT_AFTER (before that a newcomer is closed, and retries).
            await until(lambda: time.monotonic() - min(
                e.since for e in server.admission._pending.values()) >= 0.3,
                what="the oldest stalled connection to be old enough to cut")
            token = s.dashboard_link.split("?token=", 1)[1]
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            try:
                w.write(f"GET /health?token={token} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
                assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 200 ")
            finally:
                w.close()
        finally:
            for _, w in flood:
                w.close()
        await until(lambda: server.connections == 0, what="the flood's connections to close")
        await until(lambda: "connections were closed unread to stay within" in caplog.text,
                    timeout=15, what="the summary line")
        lines = [r for r in caplog.records if r.name == "cluster.runtime.http"]
        assert len(lines) < 20, [r.getMessage() for r in lines]
