"""Helpers for loopback tests: run coroutines with a deadline, start small clusters."""

from __future__ import annotations

import asyncio
import functools
import time
from contextlib import asynccontextmanager, contextmanager

from cluster.runtime import Client, Scheduler, Worker
from cluster.runtime import client as client_module


def gen_test(timeout: float = 30):
    """Run an ``async def`` test in a fresh event loop, failing after ``timeout`` seconds."""

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            async def main():
                return await asyncio.wait_for(fn(*args, **kwargs), timeout)

            return asyncio.run(main())

        return wrapper

    return decorator


@contextmanager
def socket_link():
    """Clients started inside reach their scheduler over its TCP/TLS socket even when
    it runs in their process (as a client elsewhere does), not through memory."""
    saved = client_module.alias_of
    client_module.alias_of = lambda address: None
    try:
        yield
    finally:
        client_module.alias_of = saved


@asynccontextmanager
async def gen_cluster(nworkers: int = 2, nthreads: int = 1, client: bool = True,
                      worker_kwargs: dict | None = None, scheduler_kwargs: dict | None = None):
    """A validating scheduler and ``nworkers`` in-process workers on loopback, plus a client.

    The client talks to the scheduler over its socket (:func:`socket_link`), as one on
    another machine does; LocalCluster tests cover the in-process link.  The status page is off unless ``scheduler_kwargs`` asks for it (``dashboard_address``).
    """
    scheduler_kwargs = {"dashboard_address": None, **(scheduler_kwargs or {})}
    async with Scheduler(validate=True, **scheduler_kwargs) as s:
        workers = [
            Worker(s.address, nthreads=nthreads, validate=True, name=f"w{i}", **(worker_kwargs or {}))
            for i in range(nworkers)
        ]
        await asyncio.gather(*(w._start() for w in workers))
        try:
            if client:
                c = Client(s.address, asynchronous=True)
                with socket_link():
                    await c
                async with c:
                    yield c, s, workers
            else:
                yield None, s, workers
        finally:
            await asyncio.gather(*(w.close() for w in workers))


def run_on_loop(loop_kind: str, coro_fn, timeout: float = 60):
    """Run ``coro_fn()`` to completion on a fresh ``"asyncio"`` or ``"uvloop"`` loop,
    failing after ``timeout`` seconds; tasks left behind (listener handlers
    whose connections ended) are cancelled and awaited before the loop closes."""
    from cluster.runtime.loop import new_event_loop

    loop = new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), timeout))
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()

        async def drain():
            await asyncio.gather(*pending, return_exceptions=True)

        loop.run_until_complete(drain())
        loop.close()


def pattern(n: int, seed: int = 0):
    """``n`` bytes (a numpy uint8 array) that differ from their neighbours' offsets,
    so a shifted or lost chunk shows; ``seed`` shifts the sequence."""
    import numpy as np

    return ((np.arange(n, dtype=np.uint64) + seed) % 251).astype(np.uint8)


async def echo(comm) -> None:
    """A listener's handler: send back every message until the connection ends."""
    from cluster.runtime.errors import CommError

    try:
        while True:
            await comm.write(await comm.read())
    except CommError:
        pass


async def until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Wait until ``predicate()`` is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def until_sync(predicate, timeout: float = 10.0, interval: float = 0.01, what="condition"):
    """Poll ``predicate()`` until it returns something truthy, and return that.

    Fails after ``timeout`` seconds; ``what`` names what is awaited (a callable
    is called only then, so the message can show the latest state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval)  # polling interval of the deadline loop, not synchronisation
