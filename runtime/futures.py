"""Client-side futures: ``concurrent.futures``-shaped and awaitable.

A :class:`Future` is a handle on one key.  All futures of a key in one client
share a :class:`FutureState`, which the client's event loop updates from the
scheduler's reports.  Futures count references: when the last one for a key
is dropped, the client tells the scheduler, which releases the data.

``wait`` and ``as_completed`` keep the meaning they have in the standard
library.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import pickle
import re
import sys
import threading
import types
from collections import deque, namedtuple
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ClusterTimeoutError, FutureCancelledError, RemoteTraceback
from .execution import graph_future_value, graph_pickling

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

Key = Hashable

FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION
ALL_COMPLETED = concurrent.futures.ALL_COMPLETED

DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", "done not_done")


_FRAME_LINE = re.compile(r'^  File "(?P<file>.*)", line (?P<line>\d+), in (?P<name>.*)$')


class _Raise(Exception):
    """Raised inside a made-up frame to capture it (see :func:`traceback_object`)."""


def traceback_object(text: str | None) -> types.TracebackType | None:
    """A traceback object whose frames stand for those of a remote traceback's text.

    Each ``File "...", line N, in name`` of the last exception in ``text``
    becomes a real frame of a code object with that file name, function name
    and line, so the ``traceback`` module formats it as the worker did.
    """
    if not text:
        return None
    last = text.rsplit("Traceback (most recent call last):", 1)[-1]
    frames = [(m["file"], int(m["line"]), m["name"])
              for m in map(_FRAME_LINE.match, last.splitlines()) if m]
    tb = None
    for filename, lineno, name in reversed(frames):
        code = compile("\n" * max(lineno - 1, 0) + "raise _Raise", filename, "exec")
        if name.isidentifier():
            code = code.replace(co_name=name)
        try:
            exec(code, {"_Raise": _Raise})
        except _Raise as e:
            inner = e.__traceback__.tb_next  # the made-up frame
            tb = types.TracebackType(tb, inner.tb_frame, inner.tb_lasti, inner.tb_lineno)
    return tb


#: Values many futures hold alike -- the tuple of workers that hold a key, a
#: result's type name, a small pickled result such as ``None`` -- each come in
#: a fresh object per message.  A finished future keeps the first such object
#: seen instead (issue 14: a held task's memory in the client); the table
#: stops growing at :data:`SHARED_LIMIT` entries and then values are kept as
#: they come.
_shared: dict = {}
SHARED_LIMIT = 4096
#: Pickled results up to this many bytes are shared (``None``, small ints, ...).
SHARED_VALUE_BYTES = 64


def shared(value: Any) -> Any:
    """``value``, or an equal object already held (``value`` must be hashable)."""
    kept = _shared.get(value)
    if kept is not None:
        return kept
    if len(_shared) < SHARED_LIMIT:
        _shared[value] = value
    return value


class FutureState:
    """What the client knows of one key: pending, finished, error, cancelled or lost."""

    __slots__ = ("status", "_event", "exception", "traceback", "type", "workers", "worker", "callbacks",
                 "value_bytes", "refs")

    def __init__(self) -> None:
        #: How many :class:`Future` objects of this key the client holds (kept
        #: here rather than in a second dict keyed like ``Client.futures``).
        self.refs = 0
        self.status = "pending"
        self._event: asyncio.Event | None = None
        self.exception: BaseException | None = None
        self.traceback = ""
        self.type = ""
        self.workers: tuple[str, ...] = ()
        self.worker = ""
        #: Made on first use, like the event: most futures are never waited on one by
        #: one, and an ``asyncio.Event`` and a list per task were most of the client's
        #: memory per task (issue 14).
        self.callbacks: list[Callable[[], None]] | None = None
        #: Pickled value sent along by the worker (small results only).
        self.value_bytes: bytes | None = None

    @property
    def event(self) -> asyncio.Event:
        """Set while the future is done (made on first use)."""
        if self._event is None:
            self._event = asyncio.Event()
            if self.done():
                self._event.set()
        return self._event

    def done(self) -> bool:
        return self.status in ("finished", "error", "cancelled")

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when the future is done (on the client's loop)."""
        if self.callbacks is None:
            self.callbacks = []
        self.callbacks.append(fn)

    def _set(self, status: str) -> None:
        self.status = status
        if self._event is not None:
            self._event.set()
        callbacks, self.callbacks = self.callbacks, None
        for cb in callbacks or ():
            cb()

    def finish(self, type: str = "", workers: Iterable[str] = (), data: bytes | None = None) -> None:
        self.type = shared(type)
        self.workers = shared(tuple(workers))
        self.value_bytes = (shared(data) if data is not None and len(data) <= SHARED_VALUE_BYTES
                            else data)
        self._set("finished")

    def set_error(self, exception: BaseException, traceback: str, worker: str = "") -> None:
        self.exception = exception
        self.traceback = traceback
        self.worker = worker
        self._set("error")

    def cancel(self) -> None:
        self._set("cancelled")

    def lose(self) -> None:
        """The data was lost; the scheduler computes it again."""
        self.status = "pending"
        self.workers = ()
        self.value_bytes = None
        if self._event is not None:
            self._event.clear()

    async def wait(self, timeout: float | None = None) -> None:
        if self.done():
            return
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except asyncio.TimeoutError:
            raise ClusterTimeoutError(f"future not done within {timeout}s") from None

    def raise_exception(self, key: Key) -> None:
        if self.status == "cancelled":
            raise FutureCancelledError(key)
        exc = self.exception
        if exc is None:  # pragma: no cover
            raise RuntimeError(f"no exception recorded for {key!r}")
        raise _fresh_copy(exc) from RemoteTraceback(self.traceback, self.worker)


def _fresh_copy(exc: BaseException) -> BaseException:
    """A copy of ``exc`` to raise: the raised one gains a traceback whose frames may hold
    futures of the key; raising the stored object itself would keep them (and so the
    key on the cluster) alive as long as the state is."""
    try:
        new = copy.copy(exc)
    except Exception:
        new = exc
    if type(new) is not type(exc):  # pragma: no cover - an odd __reduce__
        new = exc
    return new.with_traceback(None)


class FutureOwner(Protocol):
    """What a :class:`Future` needs of the client that holds it (:class:`~cluster.runtime.client.Client`
    implements it); futures know their client only through this."""

    asynchronous: bool

    def sync(self, func: Callable, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``func`` on the client's loop: a coroutine in async mode, blocking otherwise."""

    def future_state(self, key: Key) -> FutureState:
        """The state shared by every future of ``key`` in this client."""

    def hold_future(self, key: Key) -> None:
        """One more future of ``key`` exists."""

    def drop_future(self, key: Key) -> None:
        """One future of ``key`` fewer."""

    def want_keys(self, keys: list) -> None:
        """Tell the scheduler this client holds futures of ``keys`` made elsewhere."""

    async def fetch(self, keys: list) -> dict:
        """The values of finished ``keys``."""

    def cancel(self, futures: list, force: bool = False) -> Any:
        """Cancel ``futures``."""

    def call_on_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the client's event loop."""

    def run_callback(self, fn: Callable, future: Future) -> None:
        """Call a done callback ``fn(future)`` off the event loop."""


#: Where a future unpickled in this process attaches: ``(order, finder)``, tried in
#: order until one returns an owner (:func:`register_owner_finder`).
_owner_finders: list[tuple[int, Callable[[], FutureOwner | None]]] = []


def register_owner_finder(finder: Callable[[], FutureOwner | None], order: int) -> None:
    """Add a way to find the client that futures unpickled here attach to.

    Args:
        finder: returns the client, or ``None`` when it has none to offer here.
        order: lower is tried first.  :mod:`cluster.runtime.task_client` adds the
            worker's client inside a task (0) and the client of the worker
            whose thread this is (20); :mod:`cluster.runtime.client` the default client (10).
    """
    if all(f is not finder for _, f in _owner_finders):
        _owner_finders.append((order, finder))
        _owner_finders.sort(key=lambda pair: pair[0])


def current_client() -> FutureOwner:
    """The client of this place: inside a task the worker's client, elsewhere the
    default client (the finders of :func:`register_owner_finder`, in order).

    Raises:
        ValueError: no client runs here.
    """
    for _, find in _owner_finders:
        owner = find()
        if owner is not None:
            return owner
    raise ValueError("no client runs here: create a Client first "
                     "(inside a task the worker's client is used)")


def _unpickle_future(key: Key) -> Future:
    """A pickled future, attached to this side's client (:func:`current_client`),
    which tells the scheduler that it wants the key too.

    Raises:
        ValueError: no client runs here.
    """
    owner = current_client()
    future = Future(key, owner)
    owner.want_keys([key])
    return future


class Future:
    """A remotely running computation.

    Behaves like :class:`concurrent.futures.Future` (``result``, ``exception``,
    ``done``, ``cancel``, ``add_done_callback``) and can be awaited.  In an
    asynchronous client ``result()`` returns a coroutine.
    """

    __slots__ = ("key", "client", "_state", "__weakref__")

    def __init__(self, key: Key, client: FutureOwner, state: FutureState | None = None):
        self.key = key
        self.client = client
        self._state = state if state is not None else client.future_state(key)
        client.hold_future(key)

    def __del__(self) -> None:
        try:
            self.client.drop_future(self.key)
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"<Future: {self.status}, key: {self.key!r}>"

    #: dask treats objects with this flag (and a ``key``) as references to
    #: keys of the scheduler: futures inside dask graphs become dependencies.
    __dask_future__ = True

    def __dask_tokenize__(self):
        return ("cluster.Future", self.key)

    def __reduce__(self):
        keys = graph_pickling.keys
        if keys is not None:  # inside a dask graph node: a dependency (runtime.collections)
            keys.add(self.key)
            return (graph_future_value, (self.key,))
        # Anywhere else (a task returning futures it made, futures inside a value):
        # a reference to the key, live again in the client of the unpickling side.
        return (_unpickle_future, (self.key,))

    @property
    def status(self) -> str:
        return self._state.status

    @property
    def type(self) -> str:
        return self._state.type

    def done(self) -> bool:
        """Whether the computation finished, erred or was cancelled."""
        return self._state.done()

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    def result(self, timeout: float | None = None):
        """The value (fetched straight from a worker that holds it).

        Raises:
            the task's own exception, with the remote traceback as its cause;
            ``concurrent.futures.CancelledError`` if cancelled;
            ``TimeoutError`` after ``timeout`` seconds.
        """
        if self.client.asynchronous:
            return self._result(timeout)
        # Blocking: wait here for the loop to mark the state done, and unpickle a
        # result the worker sent along here too.  Going through sync() instead
        # costs the loop a task, an asyncio.Event and a concurrent future per call,
        # a tenth of a round trip's CPU (issue 14).  Anything else -- a large
        # result to fetch, data lost meanwhile -- goes the general way.
        st = self._state
        if not st.done():
            waited = self._wait_blocking(timeout)
            if waited is None:
                return self.client.sync(self._result, timeout)
            if not waited:
                raise ClusterTimeoutError(f"future not done within {timeout}s")
        if st.status == "finished":
            data = st.value_bytes
            if data is not None:
                return pickle.loads(data)
        elif st.status in ("error", "cancelled"):
            st.raise_exception(self.key)
        return self.client.sync(self._result, timeout)

    def _wait_blocking(self, timeout: float | None) -> bool | None:
        """Block this thread until the state is done: False on timeout, None if this
        thread may not block for it (it runs the client's loop, or that loop is gone)."""
        loop = getattr(self.client, "loop", None)
        if loop is None or loop.is_closed():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return None
        except RuntimeError:
            pass
        done = threading.Event()
        st = self._state

        def register() -> None:
            if st.done():
                done.set()
            else:
                st.add_callback(done.set)

        self.client.call_on_loop(register)
        return done.wait(timeout)

    async def _result(self, timeout: float | None = None):
        st = self._state
        while True:
            await st.wait(timeout)
            if st.status != "finished":
                st.raise_exception(self.key)
            data = await self.client.fetch([self.key])
            if self.key in data:
                return data[self.key]
            # Lost while we fetched it: the scheduler recomputes it.

    def __await__(self):
        return self._result().__await__()

    def exception(self, timeout: float | None = None):
        """The task's exception, or ``None`` if it succeeded."""
        if self.client.asynchronous:
            return self._exception(timeout)
        return self.client.sync(self._exception, timeout)

    async def _exception(self, timeout: float | None = None):
        await self._state.wait(timeout)
        if self._state.status == "cancelled":
            raise FutureCancelledError(self.key)
        return self._state.exception if self._state.status == "error" else None

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        """The traceback of a failed task, as a traceback object (``None`` if it succeeded).

        Its frames name the task's files, lines and functions where it raised,
        on the worker (``traceback.format_tb(future.traceback())``,
        ``traceback.print_tb``), as in dask.distributed; the source lines show
        where those files exist here too.  The text as the worker printed it is
        :attr:`traceback_text` (and the exception's ``__cause__``).
        """
        if self.client.asynchronous:
            return self._traceback(timeout)
        return self.client.sync(self._traceback, timeout)

    async def _traceback(self, timeout: float | None = None):
        await self._state.wait(timeout)
        return traceback_object(self._state.traceback) if self._state.status == "error" else None

    @property
    def traceback_text(self) -> str | None:
        """The remote traceback as text, once the task has failed (``None`` otherwise)."""
        return self._state.traceback if self._state.status == "error" else None

    def cancel(self, force: bool = False):
        """Cancel this future (and what depends on it)."""
        return self.client.cancel([self], force=force)

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(self)`` once the future is done (in a separate thread)."""
        client = self.client

        def run() -> None:
            client.run_callback(fn, self)

        def register() -> None:
            if self._state.done():
                run()
            else:
                self._state.add_callback(run)

        client.call_on_loop(register)

    async def _wait(self, timeout: float | None = None) -> None:
        await self._state.wait(timeout)


def _unpack_futures(fs) -> list[Future]:
    if isinstance(fs, Future):
        return [fs]
    if is_dask_collection(fs):
        return futures_of(fs)
    if isinstance(fs, dict):
        fs = fs.values()
    out = []
    for f in fs:
        if not isinstance(f, Future):
            raise TypeError(f"expected Futures, got {type(f).__name__}")
        out.append(f)
    return out


def is_dask_collection(obj: Any) -> bool:
    """Whether ``obj`` is a dask collection (without importing dask when it was never imported)."""
    if "dask" not in sys.modules:
        return False
    from dask.base import is_dask_collection as is_coll

    return is_coll(obj)


def futures_of(obj: Any) -> list[Future]:
    """The futures inside ``obj``: a future, a (nested) list/tuple/set/dict of them, or a
    persisted dask collection.

    Args:
        obj: what to search.

    Returns:
        The distinct futures, in the order found.
    """
    seen: set = set()
    out: list[Future] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, Future):
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(reversed(list(o)))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        elif is_dask_collection(o):
            graph = o.__dask_graph__()
            stack.extend(reversed([v for v in graph.values()
                                   if isinstance(v, (Future, list, tuple, dict, set))]))
    # One future per key, as dask.distributed does.
    by_key: dict = {}
    for f in out:
        by_key.setdefault(f.key, f)
    return list(by_key.values())


def wait(fs, timeout: float | None = None, return_when: str = ALL_COMPLETED) -> DoneAndNotDoneFutures:
    """Wait until the futures are done (``ALL_COMPLETED``, ``FIRST_COMPLETED`` or ``FIRST_EXCEPTION``).

    Returns:
        ``(done, not_done)`` sets, as :func:`concurrent.futures.wait` does.

    Raises:
        TimeoutError: if ``timeout`` passes first (like ``dask.distributed.wait``).
        ValueError: for an unknown ``return_when``.
    """
    futures = _unpack_futures(fs)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(f"return_when={return_when!r}: accepted values are "
                         "ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION")
    if not futures:
        return DoneAndNotDoneFutures(set(), set())
    client = futures[0].client
    if client.asynchronous:
        return _wait(futures, timeout, return_when)
    return client.sync(_wait, futures, timeout, return_when)


async def _wait(futures: list[Future], timeout: float | None, return_when: str) -> DoneAndNotDoneFutures:
    async def all_done() -> None:
        for f in futures:
            await f._state.wait()

    async def first(which: str) -> None:
        pending = {asyncio.ensure_future(f._state.wait()): f for f in futures if not f.done()}
        if any(f.done() and (which == FIRST_COMPLETED or f.status == "error") for f in futures):
            for t in pending:
                t.cancel()
            return
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    f = pending.pop(t)
                    if which == FIRST_COMPLETED or f.status == "error":
                        return
        finally:
            for t in pending:
                t.cancel()

    coro = all_done() if return_when == ALL_COMPLETED else first(return_when)
    try:
        await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise ClusterTimeoutError(f"futures not done within {timeout}s") from None
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, set(futures) - done)


class as_completed:
    """Iterate over futures in the order they complete (sync ``for`` or ``async for``).

    Args:
        futures: futures to watch (more can be added with :meth:`add`).
        with_results: yield ``(future, result)`` pairs instead of futures.
        raise_errors: with ``with_results``, raise a failed task's exception.
    """

    def __init__(self, futures: Iterable[Future] = (), loop=None, with_results: bool = False,
                 raise_errors: bool = True):
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._lock = threading.Condition()
        self._done: deque[Future] = deque()
        self._pending: set[Future] = set()
        self._async_event: asyncio.Event | None = None
        self._client: Client | None = None
        for f in futures:
            self.add(f)

    def add(self, future: Future) -> None:
        """Watch one more future."""
        self._client = future.client
        with self._lock:
            self._pending.add(future)
        client = future.client
        st = future._state

        def on_done() -> None:
            with self._lock:
                if future in self._pending:
                    self._pending.discard(future)
                    self._done.append(future)
                    self._lock.notify_all()
            if self._async_event is not None:
                self._async_event.set()

        def register() -> None:
            if st.done():
                on_done()
            else:
                st.add_callback(on_done)

        client.call_on_loop(register)

    def update(self, futures: Iterable[Future]) -> None:
        for f in futures:
            self.add(f)

    def count(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._done)

    def is_empty(self) -> bool:
        return self.count() == 0

    def has_ready(self) -> bool:
        with self._lock:
            return bool(self._done)

    def _result_of(self, f: Future):
        if not self.with_results:
            return f
        if f.status == "error" and not self.raise_errors:
            return f, f._state.exception
        return f, f.result()

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            while not self._done:
                if not self._pending:
                    raise StopIteration
                self._lock.wait(0.5)
            f = self._done.popleft()
        return self._result_of(f)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._async_event is None:
            self._async_event = asyncio.Event()
        while True:
            with self._lock:
                if self._done:
                    f = self._done.popleft()
                    break
                if not self._pending:
                    raise StopAsyncIteration
                self._async_event.clear()
            await self._async_event.wait()
        if not self.with_results:
            return f
        if f.status == "error" and not self.raise_errors:
            return f, f._state.exception
        return f, await f._result()

    def next_batch(self, block: bool = True) -> list:
        """Everything completed so far (waiting for at least one if ``block``)."""
        out = []
        if block:
            try:
                out.append(next(self))
            except StopIteration:
                return out
        with self._lock:
            batch = list(self._done)
            self._done.clear()
        out.extend(self._result_of(f) for f in batch)
        return out

    def batches(self):
        while True:
            batch = self.next_batch(block=True)
            if not batch:
                return
            yield batch
