"""Distributed semaphores: the scheduler's part and the ``Semaphore`` users hold.

Theory of operation
-------------------
The scheduler keeps, per semaphore name, its number of leases
(``max_leases``), the leases granted (``{lease_id: Lease}``) and a FIFO of
waiters.  A client asks ``semaphore_acquire`` with a fresh lease id; the
handler grants at once when a lease is free and nobody waits ahead, otherwise
it waits on its own future with the caller's deadline (``asyncio.wait``: no
polling, and the scheduler's loop is never blocked).  Whenever a lease comes
free (released, expired, or lost with its holder) the next waiters are granted
in order, so there is no thundering herd and no starvation.

A lease belongs to its *holder*: the client that asked (inside a task, the
worker's client, see :func:`cluster.runtime.task_client.get_client`) and, for a task,
its worker.  When that client goes (``remove_client``) or that worker goes
(``remove_worker``) its leases are released and its waiters fail.  The
holding side refreshes its leases every third of the lease timeout while it
holds them; a lease not refreshed within ``lease_timeout`` (dask's
``distributed.scheduler.locks.lease-timeout``, default 30 s) is released by
the next validation pass (every ``lease_validation_interval``, dask's
``lease-validation-interval``, default 10 s).  As in dask.distributed this
protects against holders that hang, at the price that a holder stalled past
the timeout (e.g. a task holding the GIL) may find its lease given to another:
``lease_timeout=float("inf")`` turns expiry off.

A request whose reply never reaches the caller (cancelled, connection lost)
is followed by a best-effort ``semaphore_release`` of its lease id, which
also withdraws a waiter still queued; the lease timeout is the backstop.

Scheduler-side settings are the extension's parameters::

    Scheduler(extensions={**DEFAULT_EXTENSIONS,
                          "semaphores": partial(SemaphoreExtension, lease_timeout="60s")})

and one semaphore may set its own ``lease_timeout`` when it is first registered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CommClosedError
from ..execution import task_worker
from ..futures import current_client
from ..utils import parse_timedelta

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..scheduler.server import Scheduler

logger = logging.getLogger(__name__)

#: dask.distributed's defaults (``distributed.scheduler.locks.*``), in seconds.
DEFAULT_LEASE_TIMEOUT = 30.0
DEFAULT_LEASE_VALIDATION_INTERVAL = 10.0


def duration(value: Any, name: str, *, allow_inf: bool = True, allow_none: bool = False) -> float | None:
    """Seconds from a duration option (``"30s"``, ``5``, ``float("inf")``, ``"inf"``).

    Raises:
        ValueError: naming the option and the accepted values.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity") and allow_inf:
        return math.inf
    try:
        seconds = parse_timedelta(value)
    except (ValueError, TypeError):
        seconds = None
    if seconds is None or math.isnan(seconds) or seconds < 0 or (math.isinf(seconds) and not allow_inf):
        accepted = "a non-negative duration like 30, '30s' or '500ms'"
        if allow_inf:
            accepted += ", or float('inf')"
        if allow_none:
            accepted += ", or None"
        raise ValueError(f"{name}={value!r}: expected {accepted}")
    return seconds


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name={name!r}: expected a non-empty string")
    return name


# ----------------------------------------------------------------------------- scheduler side


@dataclass
class Lease:
    """One granted lease: who holds it and when the holder last vouched for it."""

    holder: str | None
    worker: str | None
    last_seen: float


@dataclass
class Waiter:
    """One ``semaphore_acquire`` waiting for a lease."""

    lease_id: str
    holder: str | None
    worker: str | None
    future: asyncio.Future


@dataclass
class SemaphoreState:
    """One named semaphore on the scheduler."""

    max_leases: int
    lease_timeout: float
    leases: dict[str, Lease] = field(default_factory=dict)
    waiters: deque[Waiter] = field(default_factory=deque)


class SemaphoreExtension:
    """The scheduler's semaphores (and locks, which are one-lease semaphores).

    Operations: ``semaphore_register``, ``semaphore_acquire``,
    ``semaphore_release``, ``semaphore_refresh_leases``, ``semaphore_value``,
    ``semaphore_close``.

    Args:
        scheduler: the scheduler this is a part of.
        lease_timeout: default for semaphores that do not set their own: a
            lease not refreshed for this long is released (dask's
            ``distributed.scheduler.locks.lease-timeout``; ``float("inf")``: never).
        lease_validation_interval: how often expired leases are looked for
            (dask's ``distributed.scheduler.locks.lease-validation-interval``).
        clock: the time source for lease ages (tests inject one).

    Raises:
        ValueError: a duration that is not one, naming the option.
    """

    def __init__(self, scheduler: Scheduler, lease_timeout: Any = DEFAULT_LEASE_TIMEOUT,
                 lease_validation_interval: Any = DEFAULT_LEASE_VALIDATION_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.scheduler = scheduler
        self.lease_timeout = duration(lease_timeout, "lease_timeout")
        self.lease_validation_interval = duration(lease_validation_interval, "lease_validation_interval",
                                                  allow_inf=False)
        if not self.lease_validation_interval:
            raise ValueError(f"lease_validation_interval={lease_validation_interval!r}: must be above zero")
        self.clock = clock
        self.semaphores: dict[str, SemaphoreState] = {}
        self._validator: asyncio.Task | None = None
        self.handlers = {
            "semaphore_register": self.register,
            "semaphore_acquire": self.acquire,
            "semaphore_release": self.release,
            "semaphore_refresh_leases": self.refresh_leases,
            "semaphore_value": self.get_value,
            "semaphore_close": self.close_semaphore,
        }

    # ------------------------------------------------------------------ operations

    def register(self, name: str, max_leases: int = 1, lease_timeout: Any = None) -> dict:
        """Create the semaphore ``name`` unless it exists (with these ``max_leases``).

        Returns:
            ``{"max_leases": n, "lease_timeout": seconds}`` of the semaphore.

        Raises:
            ValueError: it exists with another ``max_leases``, or a bad value.
        """
        check_name(name)
        if isinstance(max_leases, bool) or not isinstance(max_leases, int) or max_leases < 1:
            raise ValueError(f"max_leases={max_leases!r}: expected a positive integer")
        timeout = duration(lease_timeout, "lease_timeout", allow_none=True)
        sem = self.semaphores.get(name)
        if sem is None:
            sem = self.semaphores[name] = SemaphoreState(
                max_leases, self.lease_timeout if timeout is None else timeout)
            self._start_validator()
        elif sem.max_leases != max_leases:
            raise ValueError(f"Inconsistent max leases for semaphore {name!r}: {max_leases} asked, "
                             f"it has {sem.max_leases}")
        return {"max_leases": sem.max_leases, "lease_timeout": sem.lease_timeout}

    async def acquire(self, name: str, lease_id: str, client: str | None = None,
                      worker: str | None = None, timeout: Any = None) -> bool:
        """Grant ``lease_id`` a lease of ``name``, waiting up to ``timeout`` seconds for one.

        Returns:
            ``True`` once granted (also when ``lease_id`` already holds one),
            ``False`` when ``timeout`` passed first.

        Raises:
            RuntimeError: the semaphore is not registered, or was closed meanwhile.
            CommClosedError: the holder went away, or the scheduler is closing.
        """
        sem = self._get(name)
        timeout = duration(timeout, "timeout", allow_none=True)
        if lease_id in sem.leases:
            return True  # a retried request
        if len(sem.leases) < sem.max_leases and not sem.waiters:
            sem.leases[lease_id] = Lease(client, worker, self.clock())
            return True
        if timeout == 0:
            return False
        waiter = Waiter(lease_id, client, worker, asyncio.get_running_loop().create_future())
        sem.waiters.append(waiter)
        try:
            await asyncio.wait({waiter.future}, timeout=None if math.isinf(timeout or 0) else timeout)
        except asyncio.CancelledError:
            # Nobody will hear the answer: undo a grant that came meanwhile.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._drop_lease(name, lease_id)
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            self._forget_waiter(sem, waiter)
        if waiter.future.cancelled():  # timed out, or withdrawn by a release of its lease id
            return False
        return waiter.future.result()  # True, or the exception it was failed with

    def release(self, name: str, lease_id: str) -> bool:
        """Give back ``lease_id``'s lease (or withdraw its request if still waiting).

        Returns:
            ``True`` if a lease was released; ``False`` (logged) if none was held
            under that id (it expired, was lost with its holder, or was released).
        """
        sem = self.semaphores.get(name)
        if sem is not None and lease_id in sem.leases:
            self._drop_lease(name, lease_id)
            return True
        if sem is not None:
            for waiter in sem.waiters:
                if waiter.lease_id == lease_id:  # the requester gave up before its answer
                    waiter.future.cancel()
                    return False
        logger.warning("semaphore %r: release of lease %s, which is not held (expired, lost with its "
                       "holder, or released already)", name, lease_id)
        return False

    def refresh_leases(self, name: str, lease_ids: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The holder vouches for its leases: they do not expire for another ``lease_timeout``.

        Returns:
            the lease ids that are not held any more (expired or lost).
        """
        sem = self.semaphores.get(name)
        now = self.clock()
        lost = []
        for lease_id in lease_ids:
            lease = sem.leases.get(lease_id) if sem is not None else None
            if lease is None:
                lost.append(lease_id)
            else:
                lease.last_seen = now
        return lost

    def get_value(self, name: str) -> int:
        """The number of leases of ``name`` held now (0 for an unknown name)."""
        sem = self.semaphores.get(name)
        return 0 if sem is None else len(sem.leases)

    def close_semaphore(self, name: str) -> None:
        """Delete the semaphore ``name``: its waiters fail, its leases are gone."""
        sem = self.semaphores.pop(name, None)
        if sem is None:
            return
        if sem.leases:
            logger.warning("semaphore %r closed while %d leases were held", name, len(sem.leases))
        self._fail_waiters(list(sem.waiters), RuntimeError(f"semaphore {name!r} was closed"))

    # ------------------------------------------------------------------ hooks

    def remove_client(self, client: str) -> None:
        """A client went away: its leases are released, its waiters fail."""
        self._remove_holder(lambda holder, worker: holder == client,
                            CommClosedError(f"client {client} went away"), f"client {client}")

    def remove_worker(self, worker: str) -> None:
        """A worker went away: the leases its tasks held are released, their waiters fail."""
        self._remove_holder(lambda holder, w: w == worker,
                            CommClosedError(f"worker {worker} went away"), f"worker {worker}")

    def close(self) -> None:
        """The scheduler is closing: every waiter fails."""
        if self._validator is not None:
            self._validator.cancel()
            self._validator = None
        for sem in self.semaphores.values():
            self._fail_waiters(list(sem.waiters), CommClosedError("the scheduler is closing"))

    # ------------------------------------------------------------------ lease expiry

    def validate_leases(self) -> list[tuple[str, str]]:
        """Release every lease not refreshed within its semaphore's ``lease_timeout``.

        Returns:
            ``[(name, lease_id), ...]`` released.
        """
        now = self.clock()
        expired = [(name, lease_id) for name, sem in self.semaphores.items()
                   for lease_id, lease in sem.leases.items() if now - lease.last_seen > sem.lease_timeout]
        for name, lease_id in expired:
            logger.warning("semaphore %r: lease %s not refreshed for %gs; releasing it", name, lease_id,
                           self.semaphores[name].lease_timeout)
            self._drop_lease(name, lease_id)
        return expired

    def _start_validator(self) -> None:
        # Only a serving scheduler has a loop to run it on; tests drive validate_leases().
        if self._validator is None and getattr(self.scheduler, "status", None) == "running":
            self._validator = self.scheduler.spawn(self._validate_periodically())

    async def _validate_periodically(self) -> None:
        while self.scheduler.status == "running":
            await asyncio.sleep(self.lease_validation_interval)  # a periodic timer
            self.validate_leases()

    # ------------------------------------------------------------------ internals

    def _get(self, name: str) -> SemaphoreState:
        check_name(name)
        sem = self.semaphores.get(name)
        if sem is None:
            raise RuntimeError(f"Semaphore or Lock {name!r} is not known to the scheduler "
                               "(never registered, or closed)")
        return sem

    def _drop_lease(self, name: str, lease_id: str) -> None:
        sem = self.semaphores.get(name)
        if sem is not None and sem.leases.pop(lease_id, None) is not None:
            self._grant(sem)

    def _grant(self, sem: SemaphoreState) -> None:
        """Hand free leases to the waiters at the head of the queue."""
        while sem.waiters and len(sem.leases) < sem.max_leases:
            waiter = sem.waiters.popleft()
            if waiter.future.done():  # timed out or withdrawn, not yet forgotten
                continue
            sem.leases[waiter.lease_id] = Lease(waiter.holder, waiter.worker, self.clock())
            waiter.future.set_result(True)

    @staticmethod
    def _forget_waiter(sem: SemaphoreState, waiter: Waiter) -> None:
        try:
            sem.waiters.remove(waiter)
        except ValueError:
            pass  # granted: already off the queue

    @staticmethod
    def _fail_waiters(waiters: list[Waiter], exc: BaseException) -> None:
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    def _remove_holder(self, match: Callable[[str | None, str | None], bool], exc: BaseException,
                       what: str) -> None:
        for name, sem in list(self.semaphores.items()):
            self._fail_waiters([w for w in sem.waiters if match(w.holder, w.worker)], exc)
            lost = [lease_id for lease_id, lease in sem.leases.items() if match(lease.holder, lease.worker)]
            for lease_id in lost:
                logger.info("semaphore %r: lease %s released, its holder (%s) went away", name, lease_id, what)
                sem.leases.pop(lease_id)
            if lost:
                self._grant(sem)


# ----------------------------------------------------------------------------- client side


def resolve_client(client: Client | None) -> Client:
    """``client``, else the client of this context: the worker's client inside a
    task, else the default client (:func:`cluster.runtime.task_client.get_client`)."""
    if client is not None:
        return client
    return current_client()


def current_worker_address() -> str | None:
    """The address of the worker whose task runs in this thread, else ``None``."""
    worker = task_worker()
    return None if worker is None else worker.address


def refuse(option: str, value: Any, why: str) -> None:
    """Refuse an argument of dask's signature that cannot apply here (it is not ignored).

    Raises:
        ValueError: naming the option, the accepted value and why.
    """
    if value is not None:
        raise ValueError(f"{option}={value!r}: only None is accepted ({why})")


class ClientBound:
    """What a coordination object needs of a client: its scheduler, sync and async.

    The client is resolved on first use (an object unpickled in a task attaches
    to the worker's client).  Methods call :meth:`_run`, which blocks with a
    synchronous client and returns an awaitable with an asynchronous one.
    """

    _client: Client | None

    @property
    def client(self) -> Client:
        """The client this object talks to the scheduler through."""
        if self._client is None:
            self._client = resolve_client(None)
        return self._client

    async def _call(self, op: str, **kwargs: Any) -> Any:
        client = self.client
        return await client.rpc.call(client._link, op, **kwargs)

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.client.sync(fn, *args, **kwargs)

    async def _await(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``await fn(*args)`` on the client's loop, from whatever loop we are on (``async with``)."""
        client = self.client
        if client.loop is None or client.loop is asyncio.get_running_loop():
            return await fn(*args)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), client.loop))


#: Background requests (giving back an unanswered lease), kept until done.
_background: set[asyncio.Task] = set()


def _in_background(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


class Semaphore(ClientBound):
    """A semaphore shared by every client and task of a cluster, by name.

    dask.distributed's ``Semaphore``: at most ``max_leases`` leases of one
    name are held at a time; ``acquire`` waits for one.  Unlike
    ``threading.Semaphore`` it cannot be released more often than it was
    acquired.  Leases are the holder's (its client; in a task, its worker's
    client and its worker) and are released if the holder goes away, or if
    it stops refreshing them for ``lease_timeout``.  It pickles by name: in a
    task it re-attaches to the worker's client.

    Example::

        sem = Semaphore(max_leases=2, name="database")
        with sem:
            query()

    Args:
        max_leases: how many leases may be held at once.
        name: the semaphore's name (default: a new unique one).
        scheduler_rpc: dask's internal connection to pass; only ``None``
            (the semaphore talks through its client).
        loop: dask's event loop to use; only ``None`` (the client's loop).
        register: register with the scheduler now (with a synchronous client;
            an asynchronous one registers when awaited or first used);
            ``False``: on first use.
        client: the client to use (default: the client of this context).
        lease_timeout: release a lease not refreshed for this long, for this
            semaphore when it is first registered (default: the scheduler's,
            30 s; ``float("inf")``: never).

    Raises:
        ValueError: ``max_leases`` is not a positive integer, an option that
            does not apply is given, or the name exists with other ``max_leases``.
    """

    _prefix = "semaphore"

    def __init__(self, max_leases: int = 1, name: str | None = None, scheduler_rpc: Any = None,
                 loop: Any = None, register: bool = True, *, client: Client | None = None,
                 lease_timeout: Any = None):
        refuse("scheduler_rpc", scheduler_rpc, "a Semaphore talks to the scheduler through its client")
        refuse("loop", loop, "the client's event loop is used")
        if isinstance(max_leases, bool) or not isinstance(max_leases, int) or max_leases < 1:
            raise ValueError(f"max_leases={max_leases!r}: expected a positive integer")
        if not isinstance(register, bool):
            raise TypeError(f"register={register!r}: expected True or False")
        self._setup(name or f"{self._prefix}-{uuid.uuid4().hex}", max_leases,
                    duration(lease_timeout, "lease_timeout", allow_none=True), client)
        if register and not self.client.asynchronous:
            self.client.sync(self._register)

    def _setup(self, name: str, max_leases: int, lease_timeout: float | None, client: Client | None) -> None:
        self.name = check_name(name)
        self.max_leases = max_leases
        self._lease_timeout = lease_timeout
        self._client = client
        self._registered: dict | None = None
        #: Lease ids this object holds, oldest first (``release`` gives back the oldest).
        self._leases: deque[str] = deque()
        self._refresh_handle: asyncio.TimerHandle | None = None

    def __reduce__(self):
        return (_restore, (type(self), self.name, self.max_leases, self._lease_timeout))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: name={self.name!r} max_leases={self.max_leases}>"

    def __await__(self):
        async def registered():
            await self._register()
            return self

        return registered().__await__()

    # ------------------------------------------------------------------ API

    def acquire(self, timeout: Any = None) -> bool:
        """Take a lease, waiting up to ``timeout`` (``None``: for ever).

        Returns:
            ``True`` if a lease was taken, ``False`` if ``timeout`` passed first.
        """
        timeout = duration(timeout, "timeout", allow_none=True)
        return self._run(self._acquire, timeout, current_worker_address())

    def release(self) -> bool:
        """Give back the oldest lease this object holds.

        Returns:
            ``True`` if the scheduler released it; ``False`` if it was no longer
            held (it expired or was lost with its holder: logged there).

        Raises:
            RuntimeError: ``"Released too often"``: this object holds no lease.
        """
        try:
            lease_id = self._leases.popleft()
        except IndexError:
            raise RuntimeError("Released too often") from None
        return self._run(self._release, lease_id)

    def get_value(self) -> int:
        """The number of leases of this name held now, by anyone."""
        return self._run(self._call, "semaphore_value", name=self.name)

    def close(self) -> None:
        """Delete the semaphore on the scheduler (its waiters fail, its leases are gone)."""
        return self._run(self._close)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    async def __aenter__(self):
        await self._await(self._acquire, None, current_worker_address())
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            lease_id = self._leases.popleft()
        except IndexError:
            raise RuntimeError("Released too often") from None
        await self._await(self._release, lease_id)

    # ------------------------------------------------------------------ on the client's loop

    async def _register(self) -> dict:
        if self._registered is None:
            self._registered = await self._call("semaphore_register", name=self.name,
                                                max_leases=self.max_leases, lease_timeout=self._lease_timeout)
        return self._registered

    async def _acquire(self, timeout: float | None, worker: str | None) -> bool:
        await self._register()
        lease_id = uuid.uuid4().hex
        try:
            granted = await self._call("semaphore_acquire", name=self.name, lease_id=lease_id,
                                       client=self.client.id, worker=worker, timeout=timeout)
        except BaseException:
            # The answer is lost; the scheduler may grant (or have granted) it anyway.
            if self.client.status == "running":
                _in_background(self._give_back(lease_id))
            raise
        if granted:
            self._leases.append(lease_id)
            self._schedule_refresh()
        return granted

    async def _give_back(self, lease_id: str) -> None:
        try:
            await self._call("semaphore_release", name=self.name, lease_id=lease_id)
        except Exception:  # the lease timeout, or the client's removal, frees it
            logger.debug("semaphore %r: could not give back lease %s", self.name, lease_id, exc_info=True)

    async def _release(self, lease_id: str) -> bool:
        if not self._leases:
            self._stop_refresh()
        return await self._call("semaphore_release", name=self.name, lease_id=lease_id)

    async def _close(self) -> None:
        self._leases.clear()
        self._stop_refresh()
        await self._call("semaphore_close", name=self.name)
        self._registered = None

    def _schedule_refresh(self) -> None:
        lease_timeout = (self._registered or {}).get("lease_timeout", DEFAULT_LEASE_TIMEOUT)
        if self._refresh_handle is not None or not self._leases or not math.isfinite(lease_timeout):
            return
        # A third of the timeout: a refresh may be late or lost once without the lease expiring.
        self._refresh_handle = asyncio.get_running_loop().call_later(lease_timeout / 3, self._refresh_tick)

    def _stop_refresh(self) -> None:
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
            self._refresh_handle = None

    def _refresh_tick(self) -> None:
        self._refresh_handle = None
        if self._leases and self.client.status == "running":
            _in_background(self._refresh())

    async def _refresh(self) -> None:
        held = list(self._leases)
        try:
            lost = await self._call("semaphore_refresh_leases", name=self.name, lease_ids=held)
        except Exception:
            logger.debug("semaphore %r: refreshing leases failed", self.name, exc_info=True)
        else:
            if lost:
                logger.warning("semaphore %r: %d leases of this holder were lost (expired, or the "
                               "scheduler forgot them)", self.name, len(lost))
        self._schedule_refresh()


def _restore(cls: type, name: str, max_leases: int, lease_timeout: float | None) -> Semaphore:
    """Unpickle a semaphore (or lock): same name, attached to this context's client on first use."""
    obj = cls.__new__(cls)
    Semaphore._setup(obj, name, max_leases, lease_timeout, None)
    return obj
