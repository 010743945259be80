"""The ranks of a node meet before ``MPI_Init``, sleeping, so that none spins in it.

Why
---
MPICH's ``MPI_Init`` waits for the other ranks of the node by spinning
(``sched_yield`` in a loop): a rank that gets there first burns CPU until the
last one arrives.  When many ranks share few cores (64 ranks on 2, or any
oversubscribed node) the ranks arrive seconds apart, since they import the
runtime in turn, and the early ones spin for all those seconds, on the cores
that the late ones need to get there: measured at 64 ranks on 2 cores, a
second and a half of CPU, ~10 % of the whole start-up.

How
---
Local rank 0 listens on an abstract Unix socket (Linux: no file, gone with
the process) named after the job; every other rank of the node connects to
it and blocks in ``recv``.  Once all of them are connected, local rank 0
sends each a byte and every rank goes on to ``MPI_Init`` at the same moment.
Nothing is exchanged but that byte; both sides check that the peer runs as
the same user (``SO_PEERCRED``), so another user's socket of the same name is
ignored.  Any failure -- no way to name the job, an unknown local size, a
name in use, a rank that does not come within the deadline -- just ends the
wait: the ranks then call ``MPI_Init`` as they would have anyway.

The job's name: the pid of the process at the other end of MPICH's
``PMI_FD`` socket (hydra's proxy, shared by every rank it started on this
node, whatever wrapper scripts sit between), else ``PMIX_NAMESPACE`` (Open
MPI, and PMIx launchers); the node's rank count comes from
``MPI_LOCALNRANKS`` (MPICH), ``OMPI_COMM_WORLD_LOCAL_SIZE`` (Open MPI) or
``MV2_COMM_WORLD_LOCAL_SIZE`` (MVAPICH).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

#: Longest wait for the node's other ranks; past it they go on without (spinning).
RENDEZVOUS_TIMEOUT = 30.0

#: Seconds between two attempts to reach local rank 0 before it listens.
CONNECT_RETRY = 0.01

_LOCAL_SIZE = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
_LOCAL_RANK = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _first_int(environ: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _peer_pid(fd: int) -> int | None:
    """The pid at the other end of the Unix socket ``fd`` (``None``: not one)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        with socket.socket(fileno=dup) as sock:
            pid, _, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     _CRED.size))
    except OSError:  # not a socket, or not a Unix one
        return None
    return pid or None


def job_key(environ: Mapping[str, str] | None = None) -> str | None:
    """A name shared by every rank of this job on this node, and no other process (``None``: none)."""
    environ = os.environ if environ is None else environ
    fd = environ.get("PMI_FD", "").strip()
    if fd.isdigit():
        pid = _peer_pid(int(fd))
        if pid is not None:
            return f"pmi-{pid}"
    namespace = environ.get("PMIX_NAMESPACE", "").strip()
    if namespace:
        return f"pmix-{namespace}"
    return None


def _same_user(sock: socket.socket) -> bool:
    try:
        _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    except OSError:
        return False
    return uid == os.getuid()


def socket_name(key: str, size: int) -> str:
    """The abstract socket's name (a leading NUL: no file)."""
    return f"\0hpc-cluster-rendezvous-{os.getuid()}-{size}-{key}"


def wait_for_local_ranks(timeout: float = RENDEZVOUS_TIMEOUT,
                         environ: Mapping[str, str] | None = None) -> str:
    """Return once every rank of this job on this node has called this (or after ``timeout``).

    Returns:
        What happened, for the log and the tests: ``"met"`` (all ranks met),
        ``"alone"`` (one rank on this node), ``"unsupported"`` (not Linux,
        or the job or the node's rank count is unknown), ``"in use"`` (the
        name is taken: not ours), ``"timeout"`` or ``"failed"`` (a rank went
        away, or a socket error).
    """
    environ = os.environ if environ is None else environ
    size = _first_int(environ, _LOCAL_SIZE)
    rank = _first_int(environ, _LOCAL_RANK)
    if size is not None and size <= 1:
        return "alone"
    if not sys.platform.startswith("linux") or size is None or rank is None or rank >= size:
        return "unsupported"
    key = job_key(environ)
    if key is None:
        return "unsupported"
    name = socket_name(key, size)
    deadline = time.monotonic() + timeout
    try:
        if rank == 0:
            return _lead(name, size, deadline)
        return _follow(name, deadline)
    except OSError as e:
        logger.debug("rendezvous before MPI_Init failed: %r", e)
        return "failed"


def _lead(name: str, size: int, deadline: float) -> str:
    """Local rank 0: accept the ``size - 1`` others, then release them all."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        try:
            server.bind(name)
        except OSError:  # taken (by another user, or a job we cannot tell from ours)
            return "in use"
        server.listen(size)
        peers: list[socket.socket] = []
        try:
            while len(peers) < size - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                server.settimeout(remaining)
                try:
                    peer, _ = server.accept()
                except TimeoutError:
                    return "timeout"
                if _same_user(peer):
                    peers.append(peer)
                else:
                    peer.close()
            for peer in peers:
                try:
                    peer.sendall(b"g")
                except OSError:  # it gave up meanwhile: nothing to release
                    pass
            return "met"
        finally:
            for peer in peers:  # on a timeout too: closing releases them
                peer.close()


def _follow(name: str, deadline: float) -> str:
    """Any other rank: reach local rank 0 (it may not listen yet), then sleep until released."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(name)
            break
        except (ConnectionRefusedError, FileNotFoundError):  # nobody listens yet
            sock.close()
        except BaseException:
            sock.close()
            raise
        if time.monotonic() + CONNECT_RETRY >= deadline:
            return "timeout"
        time.sleep(CONNECT_RETRY)  # local rank 0 is still importing: poll its socket
    with sock:
        if not _same_user(sock):
            return "in use"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        sock.settimeout(remaining)
        try:
            return "met" if sock.recv(1) == b"g" else "failed"
        except TimeoutError:
            return "timeout"
