"""Client methods that ask the scheduler about, or act on, the cluster as a whole.

A part of :class:`cluster.runtime.client.Client` (``client.ops``): information (``who_has``,
``scheduler_info``, ``story``), running code everywhere (``run``,
``run_on_scheduler``, ``upload_file``) and cluster operations (``retire_workers``,
``rebalance``, ``replicate``, ``restart``, plugins).
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .comm.serialize import dumps_function
from .execution import dumps_args
from .futures import Future

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client


def _unpack(futures) -> list:
    if isinstance(futures, Future):
        return [futures]
    return list(futures)


class ClusterOps:
    """Cluster-wide queries and operations: a part of :class:`~cluster.runtime.client.Client` (``client.ops``).

    Talks to the cluster only through the client's scheduler connection
    (``client.rpc``, ``client.sync``) and reads nothing else of it but its
    address, id and cluster object.

    Args:
        client: the client whose scheduler this part asks.
    """

    def __init__(self, client: Client):
        self.client = client


    def _scheduler_call(self, op: str, **kwargs):
        async def call():
            return await self.client.rpc.call(self.client._link, op, **kwargs)

        return self.client.sync(call)

    def who_has(self, futures=None):
        """``{key: [worker addresses]}`` for the given futures (or all keys)."""
        keys = None if futures is None else [f.key for f in _unpack(futures)]
        return self._scheduler_call("who_has", keys=keys)

    def has_what(self, workers=None):
        """``{worker address: [keys]}``."""
        return self._scheduler_call("has_what", workers=workers)

    def nthreads(self, workers=None):
        """``{worker address: threads}``."""
        return self._scheduler_call("nthreads", workers=workers)

    ncores = nthreads

    def scheduler_info(self):
        """The scheduler's identity, with ``"workers"``: ``{address: info}``."""
        return self._scheduler_call("identity")

    def story(self, *keys):
        """The scheduler's transition log for ``keys``."""
        return self._scheduler_call("story", keys_list=[getattr(k, "key", k) for k in keys])

    def run(self, function: Callable, *args, workers=None, wait: bool = True, nanny: bool = False,
            on_error: str = "raise", **kwargs):
        """Run ``function(*args, **kwargs)`` in every (or the given) worker process.

        A function that takes a ``dask_worker`` parameter gets the Worker object
        there (an ``async def`` one is awaited on the worker's event loop).

        Returns:
            ``{worker_address: result}``.
        """
        if on_error not in ("raise", "return", "ignore"):
            raise ValueError(f"on_error={on_error!r}: accepted values are 'raise', 'return', 'ignore'")
        msg = {"op": "run", "function": dumps_function(function), "args": dumps_args(args, kwargs),
               "wait": wait}

        async def call():
            results = await self.client.rpc.call(self.client._link, "broadcast", msg=msg, workers=workers,
                                          nanny=nanny, return_exceptions=True)
            out = {}
            for addr, r in results.items():
                if isinstance(r, BaseException):
                    if on_error == "raise":
                        raise r
                    if on_error == "ignore":
                        continue
                out[addr] = r
            return out

        return self.client.sync(call)

    def run_on_scheduler(self, function: Callable, *args, **kwargs):
        """Run ``function(*args, **kwargs)`` in the scheduler's process and return its result.

        A function that takes a ``dask_scheduler`` parameter gets the Scheduler object there.
        """
        return self._scheduler_call("run_function", function=dumps_function(function),
                                    args=dumps_args(args, kwargs))

    def upload_file(self, filename: str, load: bool = True):
        """Send a local file to every worker (``.py``/``.zip``/``.egg`` are imported there)."""
        with open(filename, "rb") as f:
            data = f.read()
        msg = {"op": "upload_file", "filename": os.path.basename(filename), "data": data, "load": load}
        return self._scheduler_call("broadcast", msg=msg)

    # ------------------------------------------------------------------ cluster operations

    def retire_workers(self, workers: list[str] | None = None, close_workers: bool = True, **kwargs):
        """Gracefully retire workers: their unique data moves to others first.

        Returns:
            ``{address: info}`` of the workers retired.
        """
        return self._scheduler_call("retire_workers", workers=workers, close_workers=close_workers, **kwargs)

    def rebalance(self, futures=None, workers: list[str] | None = None):
        """Even out the bytes held by each worker (for ``futures``' keys, or all)."""
        keys = None if futures is None else [f.key for f in _unpack(futures)]
        return self._scheduler_call("rebalance", keys=keys, workers=workers)

    def replicate(self, futures, n: int | None = None, workers: list[str] | None = None,
                  branching_factor: int = 2):
        """Keep ``n`` copies (default: one per worker) of each future's data."""
        keys = [f.key for f in _unpack(futures)]
        return self._scheduler_call("replicate", keys=keys, n=n, workers=workers,
                                    branching_factor=branching_factor)

    def restart(self, timeout: Any = 30):
        """Restart every worker through its nanny and forget all tasks (futures are cancelled)."""
        return self._scheduler_call("restart", client=self.client.id, timeout=timeout)

    def register_plugin(self, plugin: Any, name: str | None = None, idempotent: bool | None = None):
        """Register a plugin where its base class says: every worker (``WorkerPlugin``), the
        scheduler (``SchedulerPlugin``) or every nanny (``NannyPlugin``), present and future.

        Args:
            plugin: an instance of one of those classes (it is pickled).
            name: its name (default: ``plugin.name``, else one made from its class).
                A plugin of the same name is replaced.
            idempotent: keep an existing plugin of the same name instead (default:
                ``plugin.idempotent``).

        Returns:
            For worker and nanny plugins ``{address: {"status": "OK"}}`` of the present
            ones; for a scheduler plugin ``"OK"``.

        Raises:
            TypeError: ``plugin`` is none of those classes.
            Exception: the error of the plugin's ``setup``/``start``, where it failed.
        """
        from .plugins import NannyPlugin, SchedulerPlugin, WorkerPlugin

        if isinstance(plugin, SchedulerPlugin):
            return self._scheduler_call("add_plugin", plugin=dumps_function(plugin), name=name,
                                        idempotent=idempotent)
        if isinstance(plugin, NannyPlugin):
            return self._plugin_call("register_nanny_plugin", plugin, name, idempotent)
        if isinstance(plugin, WorkerPlugin):
            return self._plugin_call("register_worker_plugin", plugin, name, idempotent)
        raise TypeError(f"register_plugin({plugin!r}): a plugin must be an instance of "
                        "WorkerPlugin, SchedulerPlugin or NannyPlugin (from cluster import ...)")

    def _plugin_call(self, op: str, plugin: Any, name: str | None, idempotent: bool | None):
        async def call():
            replies = await self.client.rpc.call(self.client._link, op,
                                                 plugin=dumps_function(plugin), name=name,
                                                 idempotent=idempotent)
            for reply in replies.values():
                if isinstance(reply, BaseException):  # setup failed there: say so here
                    raise reply
            return replies

        return self.client.sync(call)

    def register_worker_plugin(self, plugin: Any, name: str | None = None, nanny: bool | None = None):
        """Deprecated (as in dask.distributed): use :meth:`register_plugin`.

        Runs ``plugin.setup(worker)`` on every worker, present and future (on
        every nanny with ``nanny=True`` or a ``NannyPlugin``).  Duck-typed plugins
        (any object with ``setup``/``teardown``) are still accepted here.

        Returns:
            ``{worker_address: reply}`` for the present workers.
        """
        from .plugins import NannyPlugin

        warnings.warn("register_worker_plugin is deprecated; use register_plugin",
                      DeprecationWarning, stacklevel=3)
        op = "register_nanny_plugin" if nanny or isinstance(plugin, NannyPlugin) else "register_worker_plugin"
        return self._plugin_call(op, plugin, name, None)

    def register_scheduler_plugin(self, plugin: Any, name: str | None = None, idempotent: bool = False):
        """Deprecated (as in dask.distributed): use :meth:`register_plugin`.

        Adds a plugin to the scheduler (see :class:`cluster.runtime.plugins.SchedulerPlugin`).
        """
        warnings.warn("register_scheduler_plugin is deprecated; use register_plugin",
                      DeprecationWarning, stacklevel=3)
        return self._scheduler_call("add_plugin", plugin=dumps_function(plugin), name=name,
                                    idempotent=idempotent)

    def unregister_worker_plugin(self, name: str, nanny: bool | None = None):
        """Remove the worker plugin ``name`` (a nanny plugin with ``nanny=True``) everywhere;
        its ``teardown`` runs on each worker (nanny).

        Raises:
            ValueError: no plugin of that name is registered.
        """
        op = "unregister_nanny_plugin" if nanny else "unregister_worker_plugin"
        return self._scheduler_call(op, name=name)

    def unregister_scheduler_plugin(self, name: str):
        """Remove the scheduler plugin ``name``.

        Raises:
            ValueError: no plugin of that name.
        """
        return self._scheduler_call("remove_plugin", name=name)

    def get_versions(self, check: bool = False, packages: list[str] | None = None):
        """Python and package versions of the client, the scheduler and each worker.

        Args:
            check: raise if any of them differ (see :mod:`cluster.runtime.versions`).
            packages: more package names to report (and check) besides the usual ones.

        Returns:
            ``{"scheduler": ..., "workers": {address: ...}, "client": ...}``, each
            ``{"host": {...}, "packages": {name: version or None}}``.

        Raises:
            VersionMismatchError: with ``check``, naming each package whose versions
                differ and where (also a ``ValueError``).
        """
        from .versions import check_versions, get_versions

        packages = list(packages or [])

        async def call():
            result = await self.client.rpc.call(self.client._link, "versions", packages=packages)
            result["client"] = get_versions(packages)
            if check:
                check_versions(result, packages)
            return result

        return self.client.sync(call)

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None):
        """Block until at least ``n_workers`` workers are connected.

        Raises:
            TimeoutError: after ``timeout`` seconds.
        """
        async def waiter():
            from .errors import ClusterTimeoutError

            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                # Only the count: describing 1,000 workers on every poll costs the scheduler ~2 ms.
                info = await self.client.rpc.call(self.client._link, "identity", n_workers=0)
                if info["n_workers"] >= n_workers:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise ClusterTimeoutError(f"only {info['n_workers']} of {n_workers} workers after {timeout}s")
                await asyncio.sleep(0.05)

        return self.client.sync(waiter)

    # ------------------------------------------------------------------ diagnostics

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's status page (``None`` if it serves none)."""
        link = getattr(self.client.cluster, "dashboard_link", None)
        return link or getattr(self.client, "_dashboard_link", None)

    def get_scheduler_logs(self, n: int | None = None):
        """The scheduler's last ``n`` (default all kept) log records: ``[(level, message), ...]``."""
        return self._scheduler_call("get_logs", n=n)

    def get_worker_logs(self, n: int | None = None, workers: list[str] | None = None,
                        nanny: bool = False):
        """Each worker's last ``n`` log records: ``{address: [(level, message), ...]}``."""
        return self._scheduler_call("broadcast", msg={"op": "get_logs", "n": n},
                                    workers=workers, nanny=nanny)

    def get_worker_events(self, topic: str | None = None, workers: list[str] | None = None):
        """Each worker's structured events (``Worker.log_event``): ``{address: ...}``."""
        return self._scheduler_call("broadcast", msg={"op": "get_events", "topic": topic},
                                    workers=workers)

    def profile(self, key: str | None = None, workers: list[str] | None = None):
        """Sampled profiles of running tasks (workers with ``profile=True``), per task prefix:
        ``{prefix: {"count": samples, "functions": [[function, samples], ...]}}``."""
        return self._scheduler_call("profile", key=key, workers=workers)

    def progress(self, *futures, **kwargs):
        """A progress bar over ``futures`` (see :func:`cluster.runtime.progress.progress`)."""
        from .progress import progress

        return progress(*futures, **kwargs)
