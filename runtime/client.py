"""The Client: submit work, get futures, gather results.

Theory of operation
-------------------
The client keeps one stream to the scheduler.  ``submit``/``map`` serialise a
task's function and arguments once, here, into the recipe bytes that the
scheduler forwards untouched; futures among the arguments (also nested in
lists, tuples, dicts and sets) become dependencies.  Messages produced in one
burst (a loop of ``submit`` calls, or dropped futures) leave in one write.

Results are fetched straight from a worker that holds them (the scheduler
says which in ``key_in_memory``), not relayed through the scheduler.

Synchronous clients run their event loop on a shared background thread
(:mod:`cluster.runtime.loop`); ``asynchronous=True`` uses the caller's running loop.
``Client()`` with no address starts a :class:`LocalCluster` and closes it
with the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Hashable, Iterable
from contextlib import suppress
from typing import Any

from .client_data import gather_keys, gather_via_scheduler
from .client_data import scatter as scatter_data
from .client_ops import ClusterOps
from .collections import (
    client_compute,
    client_get,
    client_persist,
    refuse_unsupported,
    register_as_dask_scheduler,
    unregister_as_dask_scheduler,
)
from .comm import connect
from .comm.inproc import alias_of
from .comm.serialize import dumps_function
from .core import BatchedSend, ConnectionPool, unpack_reply
from .dashboard.reprs import client_repr_html
from .dashboard.task_stream import client_get_task_stream
from .errors import ClusterError, CommClosedError, CommError
from .extensions.datasets import Datasets
from .futures import Future, FutureState, register_owner_finder
from .graph import (
    collect_futures,
    graph_msg,
    map_batches,
    merge_messages,
    substitute_results,
    task_piece,
    update_graph_msg,
)
from .loop import loop_runner, sync
from .security import Security, local_credentials, resolve_security, security_from_scheduler_info
from .utils import delegate, fifo_seconds, parse_timedelta, read_scheduler_info

logger = logging.getLogger(__name__)

Key = Hashable

_current_client: Client | None = None

#: Environment variables through which a launcher tells ``Client()`` where its cluster is.
ENV_ADDRESS = "CLUSTER_SCHEDULER_ADDRESS"
ENV_SCHEDULER_FILE = "CLUSTER_SCHEDULER_FILE"


def default_client() -> Client:
    """The most recently started client that set itself as default.

    Raises:
        ValueError: no client is running.
    """
    if _current_client is None or _current_client.status != "running":
        raise ValueError("no running Client; create one with Client(...)")
    return _current_client


def _default_client_or_none() -> Client | None:
    try:
        return default_client()
    except ValueError:
        return None


register_owner_finder(_default_client_or_none, order=10)


@contextlib.contextmanager
def _as_current(client: Client):
    """Make ``client`` the default client, and dask's scheduler, inside a ``with`` block."""
    global _current_client
    previous = _current_client
    _current_client = client
    register_as_dask_scheduler(client)
    try:
        yield client
    finally:
        unregister_as_dask_scheduler(client)
        if _current_client is client:
            _current_client = previous


class Client:
    """Connect to a cluster and submit computation to it.

    Args:
        address: scheduler address, or a cluster object (``LocalCluster`` ...);
            ``None`` starts a local cluster (unless a launcher set
            ``CLUSTER_SCHEDULER_ADDRESS``/``CLUSTER_SCHEDULER_FILE``).
        timeout: seconds to wait for the scheduler.
        set_as_default: make this the client ``default_client()`` returns.
        scheduler_file: read the scheduler's address from this JSON file (and
            its credentials from the file it names, if any).
        security: a :class:`~cluster.runtime.security.Security` with a client
            certificate; ``None`` (the default) takes the credentials of the
            cluster object, of the scheduler file, or of a scheduler running
            in this process; ``False``: none.  Without an address ``True``/
            ``None``/``False`` go to the ``LocalCluster`` that is started
            (TLS by default).  A client in the process of its scheduler (its
            own cluster, a ``LocalCluster`` passed in or its address) talks to it
            through memory, not TLS over loopback, unless given ``security=``
            for a scheduler it did not start.
        asynchronous: use the running event loop; methods return awaitables.
        name: a label for this client.
        direct_to_workers: gather straight from workers (default ``True``).
        **cluster_kwargs: passed to ``LocalCluster`` when one is started.

    Raises:
        ConnectionTimeoutError: the scheduler did not answer within ``timeout``.
        TLSError: the scheduler refused our certificate or we refused its.
        ValueError: ``security=True`` with an existing cluster.
    """

    def __init__(self, address: Any = None, loop=None, timeout: Any = 10, set_as_default: bool = True,
                 scheduler_file: str | None = None, security=None, asynchronous: bool = False,
                 name: str | None = None, heartbeat_interval=None, serializers=None,
                 deserializers=None, extensions=None, direct_to_workers: bool | None = None,
                 connection_limit: int = 512, **cluster_kwargs):
        if security is not None and not isinstance(security, (bool, Security)):
            raise TypeError(f"security={security!r}: expected a Security object, True, False "
                            "or None")
        self._security_arg = security
        self._file_security: Security | None = None
        self.security: Security | None = None
        self.connection_args: dict[str, Any] = {}
        self.id = f"{name or 'Client'}-{uuid.uuid4()}"
        self.asynchronous = asynchronous
        self.timeout = parse_timedelta(timeout) or 10.0
        self.set_as_default = set_as_default
        self.direct_to_workers = True if direct_to_workers is None else direct_to_workers
        self.status = "newly-created"
        self.cluster = None
        self._own_cluster = False
        self._cluster_kwargs = cluster_kwargs
        self.scheduler_file = scheduler_file
        if address is not None and not isinstance(address, str):
            if not hasattr(address, "scheduler_address"):
                raise TypeError(f"address must be a string or a cluster object, not {type(address).__name__}")
            self.cluster = address
            address = None
        if address is None and scheduler_file is None and self.cluster is None:
            address = os.environ.get(ENV_ADDRESS) or None
            if address is None and os.environ.get(ENV_SCHEDULER_FILE):
                self.scheduler_file = os.environ[ENV_SCHEDULER_FILE]
        elif cluster_kwargs:
            raise TypeError(f"unexpected keyword arguments for a Client with an address: {', '.join(sorted(cluster_kwargs))}")
        self._address = address
        #: Where we reach the scheduler: its address, or its in-process twin
        #: when it runs in this process (see _start).
        self._link: str | None = address
        if security is True and (address is not None or self.scheduler_file or self.cluster):
            resolve_security(True, owner="Client")  # raises: new credentials fit no cluster
        self.futures: dict[Key, FutureState] = {}
        self._ref_lock = threading.Lock()
        # (message, mergeable): consecutive mergeable update_graph messages leave as one.
        self._outbox: list[tuple[dict, bool]] = []
        self._outbox_lock = threading.Lock()
        self._flush_scheduled = False
        self._function_cache: dict[Any, bytes] = {}
        self.scheduler_comm: BatchedSend | None = None
        self.rpc = ConnectionPool(timeout=self.timeout)
        #: Cluster-wide queries and operations (a part: who_has, run, retire_workers, ...).
        self.ops = ClusterOps(self)
        #: Published datasets (a part, and the mapping dask's ``client.datasets`` is).
        self.datasets = Datasets(self)
        self._callback_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._report_task: asyncio.Task | None = None
        self._closed_event: asyncio.Event | None = None
        if asynchronous:
            self.loop = None  # set when awaited
            self._uses_runner = False
        else:
            self.loop = loop_runner.acquire()
            self._uses_runner = True
            try:
                self.sync(self._start)
            except BaseException:
                self._release_loop()
                raise

    # ------------------------------------------------------------------ plumbing

    def sync(self, func: Callable, *args, timeout: float | None = None, **kwargs):
        """Run ``func`` on the client's loop: a coroutine in async mode, blocking otherwise."""
        if self.asynchronous:
            return func(*args, **kwargs)
        return sync(self.loop, func, *args, timeout=timeout, **kwargs)

    def call_on_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the client's event loop (now, if called from it)."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        elif loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    def run_callback(self, fn: Callable, future: Future) -> None:
        """Call ``fn(future)`` in the client's callback thread (a done callback)."""
        if self._callback_executor is None:
            self._callback_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="client-callback")

        def call() -> None:
            try:
                fn(future)
            except Exception:
                logger.exception("error in done callback %r of %r", fn, future)

        self._callback_executor.submit(call)

    def _release_loop(self) -> None:
        if self._uses_runner:
            self._uses_runner = False
            loop_runner.release()

    @property
    def scheduler_address(self) -> str | None:
        return self._address

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self):
        await self
        return self

    async def __aexit__(self, *exc) -> None:
        await self._close()

    def __enter__(self):
        if self.asynchronous:
            raise RuntimeError("use 'async with' with an asynchronous Client")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client: {self.id} scheduler={self._address!r} status={self.status}>"

    # ------------------------------------------------------------------ start and stop

    async def _start(self):
        if self.status == "running":
            return self
        self.loop = asyncio.get_running_loop()
        self._closed_event = asyncio.Event()
        if self.cluster is None and self._address is None and self.scheduler_file is None:
            from .local import LocalCluster

            kwargs = dict(self._cluster_kwargs)
            if self._security_arg is not None:
                kwargs["security"] = self._security_arg
            self.cluster = await LocalCluster(asynchronous=True, **kwargs)
            self._own_cluster = True
        if self.cluster is not None:
            self._address = self.cluster.scheduler_address
        if self._address is None:
            self._address = await self._read_scheduler_file()
        # A scheduler in this process (our LocalCluster, a job-queue cluster, the one
        # `python -m cluster script.py` runs) is reached through memory: no socket or
        # TLS record per message (issue 14). Its TCP/TLS address is what we show.
        # Given security= for a scheduler we did not start, we authenticate over
        # the socket as asked.
        self._link = self._address
        if self._security_arg is None or self._own_cluster:
            self._link = alias_of(self._address) or self._address
        try:
            self._use_security(self._choose_security())
            comm = await connect(self._link, timeout=self.timeout, **self.connection_args)
            await comm.write({"op": "register_client", "client": self.id})
            info = unpack_reply(await comm.read(), self._address)
            self._dashboard_link = info.get("dashboard_link") if isinstance(info, dict) else None
        except BaseException:
            if self._own_cluster:
                await self.cluster._close()
            raise
        self.scheduler_comm = BatchedSend(comm, name=f"Client->Scheduler {self.id}")
        self._report_task = asyncio.ensure_future(self._handle_report(comm))
        self.status = "running"
        if self.set_as_default:
            global _current_client
            _current_client = self
            register_as_dask_scheduler(self)
        return self

    async def _read_scheduler_file(self) -> str:
        info = await read_scheduler_info(self.scheduler_file, self.timeout)
        if self._security_arg is None:
            self._file_security = security_from_scheduler_info(info, self.scheduler_file)
        return info["address"]

    def _choose_security(self) -> Security | None:
        """Our ``security=``, else the cluster's, the scheduler file's, or this process's scheduler's."""
        arg = self._security_arg
        if isinstance(arg, Security):
            return arg
        if arg is False:
            return None
        security = getattr(self.cluster, "security", None) if self.cluster is not None else None
        if not isinstance(security, Security):
            security = self._file_security
        if security is None and self._address.startswith("tls://"):
            security = local_credentials(self._address)
        return security

    def _use_security(self, security: Security | None) -> None:
        self.security = security
        self.connection_args = security.get_connection_args("client") if security else {}
        self.rpc.connect_kwargs = dict(self.connection_args)

    async def _handle_report(self, comm) -> None:
        ops = {
            "key_in_memory": self._on_key_in_memory,
            "task_erred": self._on_task_erred,
            "cancelled_key": self._on_cancelled_key,
            "lost_data": self._on_lost_data,
        }
        try:
            while True:
                try:
                    batch = await comm.read()
                except CommError:
                    break
                for msg in batch:
                    op = msg.pop("op", None)
                    if op == "scheduler_closing":
                        logger.info("scheduler %s is closing", self._address)
                        continue
                    handler = ops.get(op)
                    if handler is None:
                        logger.warning("unknown operation %r from the scheduler", op)
                        continue
                    handler(**msg)
        finally:
            if self.status == "running":
                logger.info("lost the connection to the scheduler %s", self._address)
                self.status = "disconnected"
                err = CommClosedError(f"lost the connection to the scheduler {self._address}")
                for st in list(self.futures.values()):
                    if not st.done():
                        st.set_error(err, "", "")

    def close(self, timeout: float | None = None):
        """Close the client (and the local cluster it started)."""
        if self.asynchronous:
            return self._close()
        if self.status == "closed":
            return None
        try:
            self.sync(self._close, timeout=timeout)
        finally:
            self._release_loop()
        return None

    async def _close(self, fast: bool = False) -> None:
        if self.status == "closed":
            return
        self.status = "closing"
        for st in list(self.futures.values()):
            if not st.done():
                st.cancel()  # nobody will report on them any more
        bs = self.scheduler_comm
        if bs is not None and not bs.closed:
            self._flush_outbox()
            with suppress(CommClosedError):
                bs.send({"op": "close_client"})
            await bs.close(timeout=2.0)
        if self._report_task is not None:
            self._report_task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._report_task
        await self.rpc.close()
        if self._own_cluster and self.cluster is not None:
            await self.cluster._close()
        if self._callback_executor is not None:
            self._callback_executor.shutdown(wait=False)
        self.status = "closed"
        unregister_as_dask_scheduler(self, everywhere=True)
        global _current_client
        if _current_client is self:
            _current_client = None

    def shutdown(self):
        """Close the scheduler and its workers, then this client."""
        if self.asynchronous:
            return self._shutdown()
        try:
            self.sync(self._shutdown)
        finally:
            self._release_loop()

    async def _shutdown(self) -> None:
        if self.cluster is not None:
            await self._close()
            await self.cluster._close()
            return
        with suppress(CommError, OSError):
            await self.rpc.call(self._link, "close", close_workers=True)
        await self._close()

    # ------------------------------------------------------------------ reports from the scheduler

    def _on_key_in_memory(self, key: Key, type: str = "", workers=(), data: bytes | None = None, **kw) -> None:
        st = self.futures.get(key)
        if st is not None:
            st.finish(type, workers, data)

    def _on_task_erred(self, key: Key, exception=None, traceback: str = "", worker: str = "", **kw) -> None:
        st = self.futures.get(key)
        if st is not None:
            st.set_error(exception, traceback, worker)

    def _on_cancelled_key(self, key: Key, reason: str = "", **kw) -> None:
        st = self.futures.get(key)
        if st is not None:
            st.cancel()

    def _on_lost_data(self, key: Key, **kw) -> None:
        st = self.futures.get(key)
        if st is not None:
            st.lose()

    # ------------------------------------------------------------------ references

    def _state_for_new_task(self, key: Key) -> FutureState:
        """The state of a key being submitted (again): a cancelled, lost or failed one
        is pending again, as the scheduler runs it again (a failed task is retried
        when submitted anew)."""
        st = self.future_state(key)
        if st.status in ("cancelled", "lost", "error"):
            st.status = "pending"
            st.exception = None
            st.traceback = ""
            if st._event is not None:
                self.call_on_loop(st.event.clear)
        return st

    def future_state(self, key: Key) -> FutureState:
        """The state shared by every future of ``key`` in this client (made on first use)."""
        with self._ref_lock:
            return self._state_locked(key)

    def _state_locked(self, key: Key) -> FutureState:
        """:meth:`future_state`, for a caller holding ``_ref_lock``."""
        st = self.futures.get(key)
        if st is None:
            st = self.futures[key] = FutureState()
        return st

    @property
    def refcount(self) -> dict[Key, int]:
        """How many futures of each key this client holds (a snapshot)."""
        with self._ref_lock:
            return {k: st.refs for k, st in self.futures.items() if st.refs}

    def hold_future(self, key: Key) -> None:
        """One more future of ``key`` exists."""
        with self._ref_lock:
            self._state_locked(key).refs += 1

    def drop_future(self, key: Key) -> None:
        """One future of ``key`` fewer; with none left, the scheduler may release it."""
        with self._ref_lock:
            st = self.futures.get(key)
            if st is None:
                return
            st.refs -= 1
            if st.refs > 0:
                return
            del self.futures[key]
        if self.status == "running":
            self._send({"op": "client_releases_keys", "keys": [key]})

    def want_keys(self, keys: list) -> None:
        """Tell the scheduler this client holds futures of ``keys`` made elsewhere (unpickled,
        or handed out by a variable or queue), so it keeps them for us too."""
        self._send(update_graph_msg({}, list(keys)))

    async def fetch(self, keys: list) -> dict:
        """The values of finished ``keys``, fetched straight from workers that hold them."""
        return await gather_keys(self, keys)

    # ------------------------------------------------------------------ outgoing messages

    def _send(self, msg: dict, merge: bool = True) -> None:
        """Queue a message for the scheduler; everything queued in one burst leaves together.

        Consecutive ``update_graph`` messages become one unless ``merge`` is false
        (the batches of ``map(batch_size=...)`` stay apart).
        """
        with self._outbox_lock:
            self._outbox.append((msg, merge))
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            running.call_soon(self._flush_outbox)  # let a burst of submits accumulate
        elif self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self) -> None:
        with self._outbox_lock:
            msgs, self._outbox = self._outbox, []
            self._flush_scheduled = False
        if not msgs or self.scheduler_comm is None or self.scheduler_comm.closed:
            return
        merged = merge_messages(msgs)
        with suppress(CommClosedError):
            self.scheduler_comm.send(*merged)

    # ------------------------------------------------------------------ submitting work

    def _serialize_function(self, func: Callable) -> bytes:
        try:
            cached = self._function_cache.get(func)
        except TypeError:  # unhashable callable
            return dumps_function(func)
        if cached is None:
            cached = dumps_function(func)
            if len(self._function_cache) > 1000:
                self._function_cache.clear()
            self._function_cache[func] = cached
        return cached

    def submit(self, func: Callable, *args, key: Key | None = None, workers=None, resources=None,
               retries: int | None = None, priority: int = 0, fifo_timeout="100 ms",
               allow_other_workers: bool = False, actor: bool = False, actors: bool = False,
               pure: bool | None = None, **kwargs) -> Future:
        """Run ``func(*args, **kwargs)`` on the cluster.

        Args:
            key: the task's key (default: function name plus a hash of the
                call if ``pure``, else a random token).
            pure: same function and arguments give the same key (default True).
            workers: addresses, names or hostnames the task may run on.
            allow_other_workers: ``workers`` is a preference, not a rule.
            resources: abstract resources the task needs, e.g. ``{"GPU": 1}``.
            retries: run again this many times if it raises.
            priority: higher runs first.

        Raises:
            TypeError: ``func`` is not callable, or ``key``, ``workers``,
                ``resources``, ``retries`` or ``priority`` has the wrong type (named).
            TaskSerializationError: the function or an argument cannot be pickled (named).
            ValueError: a future argument belongs to another client; negative ``retries``.
        """
        if not callable(func):
            raise TypeError(f"the first argument of submit must be callable, not {type(func).__name__}")
        if actor or actors:
            raise ValueError("actors are not supported")
        self._check_running()
        pure = True if pure is None else pure
        func_b = self._serialize_function(func)
        fifo = fifo_seconds(fifo_timeout)
        key, piece = task_piece(self, func, func_b, args, kwargs, key, pure)
        msg = graph_msg({key: piece}, [key], workers, resources, retries, priority,
                        allow_other_workers, fifo)
        future = Future(key, self, self._state_for_new_task(key))
        self._send(msg)
        return future

    def map(self, func: Callable, *iterables: Iterable, key: str | list | None = None, workers=None,
            retries: int | None = None, resources=None, priority: int = 0,
            allow_other_workers: bool = False, fifo_timeout="100 ms", actor: bool = False,
            actors: bool = False, pure: bool | None = None, batch_size: int | None = None,
            **kwargs) -> list[Future]:
        """Apply ``func`` to each element of the iterables; one future per element.

        Args:
            key: a list of keys (one per element) or a prefix for them.
            batch_size: send the tasks to the scheduler in messages of at most this
                many, each serialized and sent before the next is built, so the
                cluster starts on the first while later ones are prepared (default:
                all in one message).
            Other arguments as for :meth:`submit`.

        Raises:
            TypeError: ``batch_size`` is not an integer (and as for :meth:`submit`).
            ValueError: ``batch_size`` is below 1; a key list of the wrong length.
        """
        if not callable(func):
            raise TypeError(f"the first argument of map must be callable, not {type(func).__name__}")
        if not iterables:
            raise TypeError("map needs at least one iterable")
        if actor or actors:
            raise ValueError("actors are not supported")
        self._check_running()
        pure = True if pure is None else pure
        fifo = fifo_seconds(fifo_timeout)
        func_b = self._serialize_function(func)
        futures: list[Future] = []
        for pieces, order in map_batches(self, func, func_b, iterables, kwargs, key, pure, batch_size):
            msg = graph_msg(pieces, list(pieces), workers, resources, retries, priority,
                            allow_other_workers, fifo)
            futures.extend(Future(k, self) for k in order)
            self._send(msg, merge=batch_size is None)
        return futures

    # ------------------------------------------------------------------ cluster-wide operations (client.ops)

    who_has = delegate("ops", ClusterOps.who_has)
    has_what = delegate("ops", ClusterOps.has_what)
    nthreads = ncores = delegate("ops", ClusterOps.nthreads)
    scheduler_info = delegate("ops", ClusterOps.scheduler_info)
    story = delegate("ops", ClusterOps.story)
    run = delegate("ops", ClusterOps.run)
    run_on_scheduler = delegate("ops", ClusterOps.run_on_scheduler)
    upload_file = delegate("ops", ClusterOps.upload_file)
    retire_workers = delegate("ops", ClusterOps.retire_workers)
    rebalance = delegate("ops", ClusterOps.rebalance)
    replicate = delegate("ops", ClusterOps.replicate)
    restart = delegate("ops", ClusterOps.restart)
    register_plugin = delegate("ops", ClusterOps.register_plugin)
    register_worker_plugin = delegate("ops", ClusterOps.register_worker_plugin)
    register_scheduler_plugin = delegate("ops", ClusterOps.register_scheduler_plugin)
    unregister_worker_plugin = delegate("ops", ClusterOps.unregister_worker_plugin)
    unregister_scheduler_plugin = delegate("ops", ClusterOps.unregister_scheduler_plugin)
    get_versions = delegate("ops", ClusterOps.get_versions)
    wait_for_workers = delegate("ops", ClusterOps.wait_for_workers)
    get_scheduler_logs = delegate("ops", ClusterOps.get_scheduler_logs)
    get_worker_logs = delegate("ops", ClusterOps.get_worker_logs)
    get_worker_events = delegate("ops", ClusterOps.get_worker_events)
    profile = delegate("ops", ClusterOps.profile)
    progress = delegate("ops", ClusterOps.progress)
    get_task_stream = client_get_task_stream
    _repr_html_ = client_repr_html

    # ------------------------------------------------------------------ published datasets (client.datasets)

    publish_dataset = delegate("datasets", Datasets.publish_dataset)
    get_dataset = delegate("datasets", Datasets.get_dataset)
    list_datasets = delegate("datasets", Datasets.list_datasets)
    unpublish_dataset = delegate("datasets", Datasets.unpublish_dataset)

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's status page (``None`` if it serves none)."""
        return self.ops.dashboard_link

    # ------------------------------------------------------------------ dask graphs and collections

    def get(self, dsk, keys, workers=None, allow_other_workers=None, resources=None, sync: bool = True,
            asynchronous: bool | None = None, direct: bool | None = None, retries=None,
            priority=0, fifo_timeout="60s", actors=None, **kwargs):
        """Run a dask graph on the cluster: dask's scheduler protocol (``scheduler=client.get``).

        Args:
            dsk: a mapping of keys to tasks (dask's task specs or legacy tuples
                ``(func, *args)``; futures of this client may appear inside),
                or a dask expression/collection.
            keys: the keys to return, possibly nested lists of them.
            sync: wait and return results; ``False`` returns futures.
            workers, allow_other_workers, resources, retries, priority: as for
                :meth:`submit`, for every task (``dask.annotate`` wins per task).

        Returns:
            The results in the shape of ``keys`` (futures with ``sync=False``).

        Raises:
            ValueError: a missing dependency or a cycle, naming the key; the first
                failing task's own exception, with its remote traceback.
        """
        refuse_unsupported(actors, kwargs)
        return client_get(self, dsk, keys, sync=sync, asynchronous=asynchronous, direct=direct,
                          workers=workers, allow_other_workers=allow_other_workers,
                          resources=resources, retries=retries, priority=priority,
                          fifo_timeout=fifo_seconds(fifo_timeout))

    def compute(self, collections, sync: bool = False, optimize_graph: bool = True, workers=None,
                allow_other_workers=False, resources=None, retries=0, priority=0,
                fifo_timeout="60s", actors=None, traverse: bool = True, **kwargs):
        """Compute dask collections on the cluster.

        Args:
            collections: a collection, or a list of them (other objects pass through).
            sync: return results instead of futures.
            optimize_graph: apply the collections' graph optimizations first.
            traverse: look inside lists, tuples, sets and dicts for collections.
            workers, allow_other_workers, resources, retries, priority: as for :meth:`get`.

        Returns:
            A future per collection (one for one), or the results with ``sync=True``.
        """
        refuse_unsupported(actors, kwargs)
        return client_compute(self, collections, sync=sync, optimize_graph=optimize_graph,
                              traverse=traverse, workers=workers,
                              allow_other_workers=allow_other_workers, resources=resources,
                              retries=retries, priority=priority,
                              fifo_timeout=fifo_seconds(fifo_timeout))

    def persist(self, collections, optimize_graph: bool = True, workers=None,
                allow_other_workers=None, resources=None, retries=None, priority=0,
                fifo_timeout="60s", actors=None, **kwargs):
        """Start computing dask collections; return the same collections backed by futures
        that stay on the workers (later computations reuse them).  Options as for :meth:`compute`."""
        refuse_unsupported(actors, kwargs)
        return client_persist(self, collections, optimize_graph=optimize_graph, workers=workers,
                              allow_other_workers=allow_other_workers, resources=resources,
                              retries=retries, priority=priority,
                              fifo_timeout=fifo_seconds(fifo_timeout))

    def as_current(self):
        """Context manager: this client is the default one (and dask's scheduler) inside it."""
        return _as_current(self)

    def _check_running(self) -> None:
        if self.status not in ("running",):
            raise ClusterError(f"the client is {self.status}; it cannot take new work")

    # ------------------------------------------------------------------ results

    def gather(self, futures, errors: str = "raise", direct: bool | None = None, asynchronous: bool | None = None):
        """Results of futures, in the same structure (list, tuple, dict, single future).

        Args:
            errors: ``"raise"`` the first task exception, or ``"skip"`` failed futures.
            direct: fetch straight from workers (default) or through the scheduler.

        Raises:
            the first failed task's own exception (with ``errors="raise"``).
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors={errors!r}: accepted values are 'raise' and 'skip'")
        if asynchronous or self.asynchronous:
            return self._gather(futures, errors, direct)
        return self.sync(self._gather, futures, errors, direct)

    async def _gather(self, futures, errors: str = "raise", direct: bool | None = None):
        flat: list[Future] = []
        collect_futures(futures, flat)
        while True:
            for f in flat:
                st = f._state
                if not st.done():
                    await st.wait()
                if st.status != "finished" and errors == "raise":
                    st.raise_exception(f.key)
            keys = [f.key for f in flat if f._state.status == "finished"]
            direct = self.direct_to_workers if direct is None else direct
            data = await (gather_keys(self, keys) if direct else gather_via_scheduler(self, keys))
            if all(k in data for k in keys):
                break
        return substitute_results(futures, data, errors)

    # ------------------------------------------------------------------ data in

    def scatter(self, data, workers=None, broadcast: bool = False, direct: bool | None = None,
                hash: bool = True, timeout: Any = 10, asynchronous: bool | None = None):
        """Put local data on the cluster; returns futures in the same structure.

        Args:
            data: a value, a list/tuple/set of values, or a dict of key -> value.
            workers: where to put it (addresses, names or hostnames).
            broadcast: put a copy on every (chosen) worker.
            direct: send straight to the workers instead of through the scheduler.
            hash: name keys after a hash of the data (``False``: random names).
        """
        if asynchronous or self.asynchronous:
            return scatter_data(self, data, workers, broadcast, direct, hash, timeout)
        return self.sync(scatter_data, self, data, workers, broadcast, direct, hash, timeout)

    # ------------------------------------------------------------------ control

    def cancel(self, futures, force: bool = False, asynchronous: bool | None = None):
        """Cancel futures (and whatever depends on them)."""
        fs = futures if isinstance(futures, (list, tuple, set)) else [futures]
        keys = [f.key for f in fs]
        if asynchronous or self.asynchronous:
            return self._cancel(keys, force)
        return self.sync(self._cancel, keys, force)

    async def _cancel(self, keys: list, force: bool = False) -> None:
        self._flush_outbox()
        if self.scheduler_comm is not None:
            await self.scheduler_comm.flush()
        await self.rpc.call(self._link, "cancel", keys=keys, client=self.id, force=force)
        for k in keys:
            st = self.futures.get(k)
            if st is not None and st.status != "cancelled":
                st.cancel()
