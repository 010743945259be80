"""Distributed locks: a :class:`~cluster.runtime.extensions.semaphore.Semaphore` of one lease.

As in dask.distributed, a ``Lock`` is a one-lease semaphore served by the
scheduler's semaphore part (:class:`~cluster.runtime.extensions.semaphore.SemaphoreExtension`),
so it shares its guarantees: waiters are served in order, and the lock is
released when its holder's client or worker goes away (a task holding it on a
worker that dies) or when its holder stops refreshing it for the lease
timeout.  Locks and semaphores share one namespace of names.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from .semaphore import Semaphore, duration

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client


class Lock(Semaphore):
    """A lock shared by every client and task of a cluster, by name.

    dask.distributed's ``Lock``.  Two processes that make ``Lock("x")`` share
    one lock; it pickles by name (in a task it attaches to the worker's client).

    Example::

        with Lock("output-file"):
            append_results()

    Args:
        name: the lock's name (default: a new unique one).
        client: the client to use (default: the client of this context; in a
            task, the worker's client).
        scheduler_rpc: dask's internal connection to pass; only ``None``.
        loop: dask's event loop to use; only ``None`` (the client's loop).
        lease_timeout: release the lock if its holder stops refreshing it for
            this long (default: the scheduler's, 30 s; ``float("inf")``: never,
            at the price of a lock held for ever by a holder that hangs).

    Raises:
        ValueError: an option that does not apply is given, or a semaphore
            of this name has more than one lease.
    """

    _prefix = "lock"

    def __init__(self, name: str | None = None, client: Client | None = None, scheduler_rpc: Any = None,
                 loop: Any = None, *, lease_timeout: Any = None):
        super().__init__(max_leases=1, name=name or f"lock-{uuid.uuid4().hex}", scheduler_rpc=scheduler_rpc,
                         loop=loop, client=client, lease_timeout=lease_timeout)

    def acquire(self, blocking: bool = True, timeout: Any = None) -> bool:
        """Take the lock.

        Args:
            blocking: wait for it (``False``: take it only if free now).
            timeout: wait at most this long (``None``: for ever).

        Returns:
            ``True`` if taken, ``False`` otherwise.

        Raises:
            ValueError: a ``timeout`` with ``blocking=False``.
        """
        if not blocking:
            if timeout is not None:
                raise ValueError("can't specify a timeout for a non-blocking call")
            timeout = 0
        return super().acquire(timeout=duration(timeout, "timeout", allow_none=True))

    def release(self) -> bool:
        """Release the lock (held by this object).

        Raises:
            RuntimeError: this object does not hold the lock.
        """
        return super().release()

    def locked(self) -> bool:
        """Whether anyone holds the lock now."""
        return self._run(self._locked)

    async def _locked(self) -> bool:
        return await self._call("semaphore_value", name=self.name) == 1
