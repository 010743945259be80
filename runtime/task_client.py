"""Tasks that submit tasks: ``get_client()``, ``worker_client()`` and the client
of a worker's tasks, with dask.distributed's names and meaning.

Inside a task, :func:`get_client` returns the worker's own client: one per
worker, made on first use, connected to the worker's scheduler with the
worker's credentials, on the process's shared background loop (the task's
thread blocks on it; the worker's own loop never does).  The worker closes it
when it closes.  Outside a task it is the default client.

A task that waits for the tasks it submitted must leave the worker's thread
pool while it waits, or a tree of such tasks fills every thread with waiting
parents and stops: :func:`worker_client` secedes on entry and rejoins on exit.

Futures pickle as references to their key (``Future.__reduce__``); unpickled
in a task, they attach to the worker's client (this module registers it with
:func:`cluster.runtime.futures.register_owner_finder`), so a future made in a task and
returned from it is a live future of the client that receives it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from .execution import _thread_state, get_worker, rejoin, secede, task_worker
from .futures import register_owner_finder
from .utils import parse_timedelta

if TYPE_CHECKING:
    from .client import Client

__all__ = ["get_client", "worker_client", "secede", "rejoin", "get_worker"]

_lock = threading.Lock()


def _client_security(worker: Any) -> Any:
    """The worker's credentials for a client connection: its own certificate when it has
    no client one (the scheduler trusts both, the same CA signed them)."""
    security = worker.security
    if security is None:
        return False  # the worker connects without TLS: so does its client
    if security.tls_client_cert is None and security.tls_worker_cert is not None:
        from .security import FIELDS, Security

        fields = {name: getattr(security, name) for name in FIELDS}
        fields.update(tls_client_cert=security.tls_worker_cert, tls_client_key=security.tls_worker_key)
        return Security(**fields)
    return security


def _sent(client: Client) -> None:
    """Wait until what ``client`` queued for the scheduler is written (a task that used
    it is ending: its result may hold futures of tasks it submitted, which the
    scheduler must know before whoever gets the result asks for them)."""
    async def flushed() -> None:
        client._flush_outbox()
        if client.scheduler_comm is not None and not client.scheduler_comm.closed:
            await client.scheduler_comm.flush(5.0)

    if client.status == "running":
        with suppress(Exception):  # a closing client: its futures are cancelled anyway
            client.sync(flushed, timeout=10)


def _worker_client(worker: Any, timeout: Any = None) -> Client:
    """The client of ``worker``'s tasks, made on first use (one per worker)."""
    client = _get_or_make_worker_client(worker, timeout)
    _thread_state.after_task = functools.partial(_sent, client)
    return client


def _get_or_make_worker_client(worker: Any, timeout: Any) -> Client:
    from .client import Client

    with _lock:
        client = worker.__dict__.get("_task_client")
        if client is not None and client.status == "running":
            return client
        if worker.__dict__.get("_task_client_closed") or worker.status not in ("running", "starting"):
            raise ValueError(f"worker {worker.address} is closing: no client for its tasks")
        client = Client(worker.scheduler_addr, security=_client_security(worker), set_as_default=False,
                        name=f"worker-client-{worker.name}",
                        timeout=parse_timedelta(timeout) or worker.death_timeout or 10)
        worker._task_client = client
        if worker.__dict__.get("_task_client_closed"):  # the worker closed meanwhile
            worker._task_client = None
            client.close()
            raise ValueError(f"worker {worker.address} is closing: no client for its tasks")
        return client


async def close_worker_client(worker: Any) -> None:
    """Close the client of ``worker``'s tasks, if it has one (the worker is closing).

    Tasks still waiting on its futures see them cancelled.  The client runs on
    another loop: it is closed from a thread, so that this loop (which may
    also run the scheduler it says goodbye to) keeps running.
    """
    worker._task_client_closed = True
    client = worker.__dict__.pop("_task_client", None)
    if client is not None and client.status != "closed":
        await asyncio.get_running_loop().run_in_executor(None, client.close)


def get_client(address: str | None = None, timeout: Any = None, resolve_address: bool = True) -> Client:
    """The client to submit tasks with from here.

    Inside a task: the worker's client (one per worker, sharing its scheduler
    and credentials).  Elsewhere: the default client, or a new client of
    ``address`` when the default one is connected elsewhere.

    Raises:
        ValueError: outside a task with no running client and no ``address``.
    """
    worker = task_worker()
    if worker is not None and (address is None or address == worker.scheduler_addr):
        return _worker_client(worker, timeout)
    from .client import Client, default_client

    try:
        client = default_client()
    except ValueError:
        if address is None:
            raise ValueError("get_client() outside a task found no running Client; "
                             "create one with Client(...) or pass address=") from None
        return Client(address, timeout=timeout or 10)
    if address is None or client.scheduler_address == address:
        return client
    return Client(address, timeout=timeout or 10)


@contextmanager
def worker_client(timeout: Any = None, separate_thread: bool = True) -> Iterator[Client]:
    """The worker's client, for a task that submits tasks and waits for them.

    On entry the task leaves the worker's thread pool (:func:`secede`), so
    that the tasks it waits for can run; on exit it takes a place in the pool
    again (:func:`rejoin`).

    Raises:
        ValueError: outside a task.
    """
    worker = task_worker()
    if worker is None:
        raise ValueError("worker_client() is for use inside a task running on a worker")
    client = _worker_client(worker, timeout)
    if separate_thread:
        secede()
    try:
        yield client
    finally:
        if separate_thread:
            rejoin()


def _in_task_client() -> Client | None:
    """Inside a task, the worker's client (the first place an unpickled future attaches)."""
    worker = task_worker()
    return _worker_client(worker) if worker is not None else None


def _thread_worker_client() -> Client | None:
    """The task client of the worker whose thread this is (e.g. in ``Client.run`` on a
    worker), when no default client runs here."""
    worker = getattr(_thread_state, "worker", None)
    client = worker.__dict__.get("_task_client") if worker is not None else None
    return client if client is not None and client.status == "running" else None


register_owner_finder(_in_task_client, order=0)
register_owner_finder(_thread_worker_client, order=20)
