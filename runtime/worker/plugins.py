"""What users add to a Worker: plugins, preloads, extensions, custom metrics.

A part of :class:`cluster.runtime.worker.Worker` (``worker.extras``), with its own
handlers (``plugin_add``, ``plugin_remove``, ``versions``):

* **plugins** (``Worker(plugins=...)``, ``Client.register_plugin``): each
  plugin's ``setup(worker)`` runs once the worker has registered (those given
  to the constructor) or when it arrives; ``teardown(worker)`` when it is
  removed or replaced, or when the worker closes.  A plugin with a
  ``transition`` hook of its own hears every task transition of the worker's
  state machine, read from the machine's transition log after each step (so
  plugins cost nothing when none has such a hook).
* **preloads** (``Worker(preload=...)``, see :mod:`cluster.runtime.preload`): loaded
  at construction, ``dask_setup(worker)`` before the worker registers,
  ``dask_teardown(worker)`` at close.
* **extensions** (``Worker(extensions={name: factory})``): ``factory(worker)``
  at construction, kept in ``worker.extensions[name]``; their ``close()`` (if
  any) runs when the worker closes.
* **metrics** (``Worker(metrics={name: function})``): ``function(worker)`` at
  every heartbeat, sent to the scheduler with the built-in metrics
  (``client.scheduler_info()["workers"][addr]["metrics"][name]``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

from ..files import open_private_directory, write_private_file
from ..plugins import WorkerPlugin, overrides, plugin_name
from ..preload import process_preloads, start_preloads, teardown_preloads
from ..utils import call_each
from ..versions import get_versions

logger = logging.getLogger(__name__)

#: The directory in ``local_directory`` that uploaded files go to (on ``sys.path``).
UPLOADS_DIRECTORY = "uploads"

#: Names of the metrics every heartbeat carries; custom metrics may not take them.
BUILTIN_METRICS = frozenset({"memory", "executing", "in_memory", "ready", "in_flight", "time", "cpu",
                             "spilled_bytes", "transfer_incoming_bytes", "transfer_outgoing_bytes",
                             "pause_reason"})


#: What to use instead of the dask.distributed Worker options we refuse.
UNSUPPORTED = {
    "services": "use dashboard=True / dashboard_address= (our /metrics and /health)",
    "service_ports": "use dashboard_address=", "service_kwargs": "use dashboard_address=",
    "startup_information": "use metrics= (sent with every heartbeat)",
    "low_level_profiler": "use profile=True (stack sampling of tasks)",
    "profile_cycle_interval": "use profile=True (no cycling: one profile per task prefix)",
}


def _check_metrics(metrics: Mapping | None) -> dict[str, Callable]:
    if not metrics:
        return {}
    if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and callable(v) for k, v in metrics.items()):
        raise TypeError(f"Worker(metrics={metrics!r}): expected a dict of names (str) to "
                        "functions taking the worker")
    taken = sorted(set(metrics) & BUILTIN_METRICS)
    if taken:
        raise ValueError(f"Worker(metrics=...): {', '.join(map(repr, taken))} are built-in metric "
                         f"names; choose others (built-in: {', '.join(sorted(BUILTIN_METRICS))})")
    return dict(metrics)


def _check_plugins(plugins: Any) -> list:
    if not plugins:
        return []
    if isinstance(plugins, (str, bytes)) or not hasattr(plugins, "__iter__"):
        raise TypeError(f"Worker(plugins={plugins!r}): expected a list or set of WorkerPlugin objects")
    plugins = list(plugins)
    bad = [p for p in plugins if not callable(getattr(p, "setup", None))
           and not callable(getattr(p, "teardown", None))]
    if bad:
        raise TypeError(f"Worker(plugins=...): {bad[0]!r} is not a worker plugin (a WorkerPlugin "
                        "with setup/teardown/transition hooks)")
    return plugins


class WorkerExtras:
    """Plugins, preloads, extensions and custom metrics of one Worker (``worker.extras``).

    Args:
        worker: the Worker.
        plugins / preload / preload_argv / extensions / metrics: the Worker's options.

    Raises:
        TypeError / ValueError: an option of the wrong shape (named).
        UnsafePathError / ImportError: a preload that cannot be used.
    """

    def __init__(self, worker: Any, plugins: Any = (), preload: Any = None, preload_argv: Any = None,
                 extensions: Any = None, metrics: Mapping | None = None):
        self.worker = worker
        #: ``{name: plugin}`` (also ``worker.plugins``).
        self.plugins: dict[str, Any] = {}
        self._pending = _check_plugins(plugins)
        self.metrics = _check_metrics(metrics)
        self.preloads = process_preloads(worker, preload, preload_argv, owner="Worker")
        self._transition_plugins: list = []
        self._last_entry: tuple | None = None
        self.extensions: dict[str, Any] = {}
        if extensions:
            if not isinstance(extensions, Mapping) or not all(callable(f) for f in extensions.values()):
                raise TypeError(f"Worker(extensions={extensions!r}): expected a dict of names to "
                                "factories called with the worker")
            for name, factory in extensions.items():
                self.extensions[name] = factory(worker)
        worker.handlers.update({"plugin_add": self.plugin_add, "plugin_remove": self.plugin_remove,
                                "versions": self.versions})

    # ------------------------------------------------------------------ lifecycle

    async def before_register(self) -> None:
        """Run the preloads' ``dask_setup`` (before the worker registers)."""
        await start_preloads(self.preloads)

    async def after_register(self) -> None:
        """Set up the plugins given to the constructor."""
        pending, self._pending = self._pending, []
        for plugin in pending:
            await self.plugin_add(plugin)

    async def close(self) -> None:
        """Teardown of plugins, ``close`` of extensions, ``dask_teardown`` of preloads."""
        for name in list(self.plugins):
            plugin = self.plugins.pop(name)
            try:
                await self._call(plugin, "teardown")
            except Exception:
                logger.exception("worker plugin %r failed in teardown", name)
        self._transition_plugins = []
        await call_each(self.extensions, "close", "worker extension")
        await teardown_preloads(self.preloads)

    # ------------------------------------------------------------------ plugins

    async def plugin_add(self, plugin: bytes | Any = None, name: str | None = None) -> dict:
        """Install a plugin: ``setup(worker)`` now, ``teardown(worker)`` when removed or at close.

        A plugin of the same name is torn down and replaced.  Errors of
        ``setup`` are raised (they reach the client that registered it).
        """
        if isinstance(plugin, (bytes, bytearray, memoryview)):
            plugin = pickle.loads(plugin)
        name = name or plugin_name(plugin)
        old = self.plugins.pop(name, None)
        if old is not None:
            self._refresh_transition_plugins()
            await self._call(old, "teardown")
        self.plugins[name] = plugin
        self._refresh_transition_plugins()
        await self._call(plugin, "setup")
        return {"status": "OK"}

    async def plugin_remove(self, name: str) -> dict:
        """Remove the plugin ``name`` (its ``teardown(worker)`` runs); unknown names are ignored."""
        plugin = self.plugins.pop(name, None)
        self._refresh_transition_plugins()
        if plugin is not None:
            await self._call(plugin, "teardown")
        return {"status": "OK"}

    def _on_plugin_add(self, plugin: bytes, name: str | None = None, stimulus_id: str = ""):
        """The scheduler's ``plugin_add`` stream message (a plugin registered before we joined)."""
        self.worker.spawn(self._guarded(self.plugin_add(plugin, name), name))

    def _on_plugin_remove(self, name: str, stimulus_id: str = ""):
        self.worker.spawn(self._guarded(self.plugin_remove(name), name))

    @staticmethod
    async def _guarded(coro, name: str | None) -> None:
        try:
            await coro
        except Exception:
            logger.exception("worker plugin %r failed", name)

    async def _call(self, plugin: Any, hook: str) -> None:
        fn = getattr(plugin, hook, None)
        if fn is None:
            return
        result = fn(worker=self.worker)
        if asyncio.iscoroutine(result):
            await result

    def _refresh_transition_plugins(self) -> None:
        self._transition_plugins = [p for p in self.plugins.values()
                                    if callable(getattr(p, "transition", None))
                                    and (not isinstance(p, WorkerPlugin)
                                         or overrides(p, "transition", WorkerPlugin))]
        entries = self.worker.state.log.entries
        self._last_entry = entries[-1] if entries else None

    def after_stimulus(self) -> None:
        """Feed the transitions logged since last time to plugins' ``transition`` hooks."""
        if not self._transition_plugins:
            return
        entries = self.worker.state.log.entries
        new = []
        for entry in reversed(entries):  # newest first, back to the last one already seen
            if entry is self._last_entry:
                break
            new.append(entry)
        self._last_entry = entries[-1] if entries else None
        for key, start, finish, _recs, stimulus_id, _t in reversed(new):
            for plugin in self._transition_plugins:
                try:
                    plugin.transition(key, start, finish, stimulus_id=stimulus_id)
                except Exception:
                    logger.exception("worker plugin %r failed in transition", plugin)

    # ------------------------------------------------------------------ uploaded files

    def upload_file(self, filename: str, data: bytes, load: bool = True) -> dict:
        """Save a file in ``<local_directory>/uploads``; import it if it is a Python module
        or archive.

        That directory (0700, ours) goes on ``sys.path`` with the first upload;
        the local directory itself never does.
        """

        worker = self.worker
        name = os.path.basename(filename)
        if not name or name in (".", ".."):
            raise ValueError(f"invalid file name {filename!r}")
        uploads = worker._uploads_directory
        if uploads is None:
            uploads = os.path.join(worker.local_directory, UPLOADS_DIRECTORY)
            with suppress(FileExistsError):
                os.mkdir(UPLOADS_DIRECTORY, 0o700, dir_fd=worker._local_directory_fd)
            os.close(open_private_directory(uploads, "uploads directory", create=False))
            worker._uploads_directory = uploads
            if uploads not in sys.path:
                sys.path.insert(0, uploads)
        path = write_private_file(os.path.join(uploads, name), data)
        if load and name.endswith((".py", ".zip", ".egg")):
            if name.endswith((".zip", ".egg")) and path not in sys.path:
                sys.path.insert(0, path)
            if name.endswith(".py"):
                modname = name[:-3]
                importlib.invalidate_caches()
                if modname in sys.modules:
                    importlib.reload(sys.modules[modname])
                else:
                    importlib.import_module(modname)
        return {"status": "OK", "nbytes": len(data)}

    # ------------------------------------------------------------------ metrics, versions

    async def custom_metrics(self) -> dict[str, Any]:
        """``{name: function(worker)}`` of ``Worker(metrics=...)`` (a function may be
        ``async def``); a failing one is left out (logged)."""
        out = {}
        for name, fn in self.metrics.items():
            try:
                value = fn(self.worker)
                if asyncio.iscoroutine(value):
                    value = await value
                out[name] = value
            except Exception:
                logger.exception("custom metric %r failed", name)
        return out

    def versions(self, packages: list[str] | None = None) -> dict:
        """This process's Python and package versions (``Client.get_versions``)."""
        return get_versions(packages)


__all__ = ["BUILTIN_METRICS", "UPLOADS_DIRECTORY", "UNSUPPORTED", "WorkerExtras"]
