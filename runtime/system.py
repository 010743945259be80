"""What a server asks of the operating system: descriptors, and freed memory back.

* :func:`raise_fd_limit` lifts the soft limit on open descriptors
  (``RLIMIT_NOFILE``) to the hard one, once per process, when a server starts
  listening.  Login nodes often start processes with a soft limit of 1,024:
  a few hundred connections of a busy (or flooded) scheduler, and a nanny's
  memory monitor in the same process could no longer open ``/proc``.
* :func:`listening_socket` binds the non-blocking listening socket our TCP
  listeners and the status page accept connections on;
  :func:`close_listening_socket` stops accepting on it and closes it.
* :func:`trim_memory` asks glibc to hand freed heap memory back to the
  system (``malloc_trim``).  glibc keeps it for reuse -- after a large free
  its mmap threshold also grows, so later buffers come from the heap -- and
  the process's RSS stays high long after the data is gone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

logger = logging.getLogger(__name__)

_fd_limit_raised = False
_malloc_trim: Any = None


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise this process's soft descriptor limit to its hard limit (once; later calls do nothing).

    Returns:
        ``(old soft limit, new soft limit)`` the first time, else ``None``.
        A failure (no ``resource`` module, a limit we may not set) is logged
        at debug level and also returns ``None``.
    """
    global _fd_limit_raised
    if _fd_limit_raised:
        return None
    _fd_limit_raised = True
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = hard
        if hard == resource.RLIM_INFINITY:
            # Linux refuses an infinite soft limit: use the kernel's per-process ceiling.
            try:
                with open("/proc/sys/fs/nr_open") as f:
                    hard = int(f.read())
            except (OSError, ValueError):
                hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, limit))
            logger.debug("raised the soft limit on open files from %d to %d", soft, hard)
            return soft, hard
    except (ImportError, OSError, ValueError) as e:
        logger.debug("could not raise the limit on open files: %s", e)
    return None


def trim_memory() -> bool:
    """Ask the C allocator to return free memory to the system (glibc only).

    Returns:
        Whether memory was released.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    return bool(_malloc_trim(0))


async def listening_socket(loop: asyncio.AbstractEventLoop, host: str | None, port: int,
                           backlog: int) -> socket.socket:
    """A non-blocking socket bound to ``(host, port)`` and listening (``SO_REUSEADDR``).

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


__all__ = ["listening_socket", "raise_fd_limit", "trim_memory"]


def close_listening_socket(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                           resume: asyncio.TimerHandle | None) -> None:
    """Stop accepting on ``sock`` and close it.

    ``resume`` is the pending timer of a listener that backed off after a
    failed ``accept`` (its reader is then already removed), or ``None``.
    """
    if resume is not None:
        resume.cancel()
    else:
        loop.remove_reader(sock.fileno())
    sock.close()
