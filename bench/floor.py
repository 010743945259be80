"""The floor of a worker-to-worker transfer: one raw TCP stream on 127.0.0.1.

    python -m bench.floor --bytes N --repeat R

Two processes (this one sends, a child receives), one plain socket, the same
bytes as the transfer workload: the sender hands a touched ``N``-byte buffer
to ``sendall`` in one call, the receiver ``recv_into``s it. No framing, no
serialisation, no encryption, no event loop: what is left is the kernel's
copies and, into a *fresh* buffer, the page faults that any transfer of a new
object pays. Two figures per repeat:

- ``fresh``: each repeat receives into a new anonymous map (``MADV_HUGEPAGE``,
  as ours does), the fair floor for a transfer that creates an object;
- ``warm``: every repeat reuses one touched buffer, the memcpy bound.

Then the same over TLS, the bound of any TLS transfer from Python here: the
two ends are blocking ``ssl.SSLSocket``s with our contexts
(``Security.temporary()``: TLS 1.3, mutual certificates, the cipher OpenSSL
picks), the sender ``sendall``s, the receiver ``recv_into``s a reused buffer;
the receiver is a fork, so both ends hold the same credentials:

- ``tls``: MB/s of that stream; ``tls_cpu_ms_per_MB``: CPU of both ends per MB.

Prints one JSON object: ``{"fresh_MBps": [...], "warm_MBps": [...],
"fresh_cpu_ms_per_MB": [...], "tls_MBps": [...], "tls_cpu_ms_per_MB": [...],
"tls_cipher": "..."}`` (CPU of both processes, user + system).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import sys
import time

CHUNK = 8 << 20


def _cpu(pid=None):
    """CPU seconds of a process: its threads' run time in ns where Linux keeps it
    (psutil's user + system counts 10 ms ticks)."""
    pid = pid or os.getpid()
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system


def _fresh(n):
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def receive_exactly(sock, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (``recv_into`` at most CHUNK bytes at a time)."""
    n, pos = view.nbytes, 0
    while pos < n:
        got = sock.recv_into(view[pos:], min(CHUNK, n - pos))
        if not got:
            raise ConnectionError("sender went away")
        pos += got


def receiver(sock, n, rounds):
    """Receive ``rounds`` transfers of ``n`` bytes; ack each with one byte."""
    warm = bytearray(n)
    for i in range(rounds):
        buf = warm if i % 2 else _fresh(n)
        view = memoryview(buf)
        receive_exactly(sock, view)
        view.release()
        sock.sendall(b"k")
        if buf is not warm:
            buf.close()


def timed_send(conn, view, peer_pid):
    """Send ``view`` and wait for the one-byte ack: (seconds, CPU seconds of both ends)."""
    c0, r0, t0 = _cpu(), _cpu(peer_pid), time.perf_counter()
    conn.sendall(view)
    if conn.recv(1) != b"k":
        raise ConnectionError("receiver went away")
    return time.perf_counter() - t0, _cpu() - c0 + _cpu(peer_pid) - r0


def tls_floor(view, repeat):
    """MB/s and CPU per MB of ``repeat`` sends of ``view`` over a TLS socket pair."""
    import ssl

    from cluster.runtime.security import Security

    n = view.nbytes
    sec = Security.temporary()
    server, client = sec.get_server_context("worker"), sec.get_client_context("worker")
    out = {"tls_MBps": [], "tls_cpu_ms_per_MB": [], "tls_cipher": ""}
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        pid = os.fork()
        if pid == 0:  # the receiver
            code = 1
            try:
                with socket.create_connection(ls.getsockname()) as raw, \
                        client.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    buf = memoryview(bytearray(n))
                    for _ in range(repeat + 1):
                        receive_exactly(s, buf)
                        s.sendall(b"k")
                code = 0
            finally:
                os._exit(code)
        try:
            ls.settimeout(60)
            raw, _ = ls.accept()
            with server.wrap_socket(raw, server_side=True) as conn:
                out["tls_cipher"] = "{} {}".format(*conn.cipher()[1::-1])
                for i in range(repeat + 1):
                    dt, cpu = timed_send(conn, view, pid)
                    if i:  # the first is untimed
                        out["tls_MBps"].append(n / 1e6 / dt)
                        out["tls_cpu_ms_per_MB"].append(cpu * 1e3 / (n / 1e6))
        finally:
            _, status = os.waitpid(pid, 0)
        if status:
            raise ssl.SSLError(f"the TLS receiver failed (status {status})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.floor")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    n = args.bytes
    rounds = 2 * (args.repeat + 1)  # fresh and warm alternate; one untimed pair first
    if args.receive:
        with socket.create_connection(("127.0.0.1", args.port)) as s:
            receiver(s, n, rounds)
        return 0
    import subprocess

    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        child = subprocess.Popen([sys.executable, "-m", "bench.floor", "--receive", "--bytes",
                                  str(n), "--repeat", str(args.repeat), "--port",
                                  str(ls.getsockname()[1])])
        try:
            ls.settimeout(60)
            conn, _ = ls.accept()
            with conn:
                data = bytearray(os.urandom(1 << 20)) * (n // (1 << 20) + 1)
                view = memoryview(data)[:n]
                out = {"fresh_MBps": [], "warm_MBps": [], "fresh_cpu_ms_per_MB": []}
                for i in range(rounds):
                    dt, cpu = timed_send(conn, view, child.pid)
                    if i < 2:
                        continue  # the untimed pair
                    if i % 2:
                        out["warm_MBps"].append(n / 1e6 / dt)
                    else:
                        out["fresh_MBps"].append(n / 1e6 / dt)
                        out["fresh_cpu_ms_per_MB"].append(cpu * 1e3 / (n / 1e6))
        finally:
            child.wait(60)
        out.update(tls_floor(view, args.repeat))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
