"""Cluster-wide operations of the Scheduler server: retire, replicate, rebalance,
restart, plugins (scheduler, worker and nanny plugins), versions.

A part of :class:`cluster.runtime.scheduler.Scheduler` (``scheduler.data`` / ``scheduler.ops``).  Each operation asks the pure
state for a plan (:mod:`cluster.runtime.scheduler_elastic`), sends the messages, and
waits (polling the state, with a deadline) until the data has landed before it
removes anything, so that no result is lost on the way.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import pickle
import time
from collections.abc import Hashable, Iterable
from contextlib import suppress
from typing import Any

from ..errors import ClusterTimeoutError, CommError
from ..execution import server_kwargs
from ..plugins import SchedulerPlugin, overrides, plugin_name, refuse_unsupported
from ..utils import parse_address, parse_host_port, parse_timedelta, unparse_host_port
from ..versions import get_versions, registration_mismatch
from . import elastic
from .events import RestartEvent, WorkerStatusEvent
from .records import RemoveReplicasMsg

logger = logging.getLogger(__name__)

Key = Hashable


@functools.lru_cache(maxsize=512)
def _accepted_keywords(cls: type, hook: str) -> frozenset[str] | None:
    """The keyword arguments ``cls.<hook>`` takes (``None``: any, it has ``**kwargs``)."""
    try:
        params = inspect.signature(getattr(cls, hook)).parameters.values()
    except (AttributeError, TypeError, ValueError):  # e.g. a hook set on the object itself
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


class SchedulerOps:
    """Retirement, replication, rebalancing, restart and plugins for the Scheduler."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        #: Nanny plugins, pickled: ``{name: bytes}``, set up on every nanny, present and future.
        self.nanny_plugins: dict[str, bytes] = {}
        #: Nannies that asked for the nanny plugins (their workers may not have registered yet).
        self.nannies: set[str] = set()
        self._plugin_seen = 0
        scheduler.handlers.update({
            "register_nanny_plugin": self.register_nanny_plugin,
            "unregister_worker_plugin": self.unregister_worker_plugin,
            "unregister_nanny_plugin": self.unregister_nanny_plugin,
            "get_nanny_plugins": self.get_nanny_plugins,
            "versions": self.get_versions,
        })

    @staticmethod
    def check_options(services: Any, service_kwargs: Any, delete_interval: Any,
                      synchronize_worker_interval: Any) -> None:
        """Refuse the dask.distributed Scheduler options we do not implement, unless
        left at their defaults.

        Raises:
            TypeError: naming the option and why.
        """
        refuse_unsupported(
            "Scheduler", {
                "services": "use dashboard_address= (our status page, JSON and /metrics)",
                "service_kwargs": "use dashboard_address=",
                "delete_interval": "released keys are deleted on the workers at once",
                "synchronize_worker_interval": "workers report their data as it changes",
            },
            services=(services, None), service_kwargs=(service_kwargs, None),
            delete_interval=(parse_timedelta(delete_interval), 0.5),
            synchronize_worker_interval=(parse_timedelta(synchronize_worker_interval), 60.0))

    # ------------------------------------------------------------------ retiring

    def workers_to_close(self, memory_ratio: float | None = None, n: int | None = None, key=None,
                         minimum: int | None = None, target: int | None = None,
                         attribute: str = "address") -> list:
        """Workers that are cheap to close (see ``SchedulerState.workers_to_close``)."""
        if isinstance(key, bytes):
            key = pickle.loads(key)
        return elastic.workers_to_close(self.scheduler.state, memory_ratio, n, key, minimum, target, attribute)

    def adaptive_target(self, target_duration: Any = "5s") -> int:
        """How many workers the current work wants."""
        return elastic.adaptive_target(self.scheduler.state, parse_timedelta(target_duration))

    async def retire_workers(self, workers: Iterable[str] | None = None, remove: bool = True,
                             close_workers: bool = False, names: Iterable[Any] | None = None,
                             timeout: Any = 60, wait_for_recipient: Any = 0, **kwargs) -> dict:
        """Gracefully retire workers: copy the data only they hold, then remove them.

        Args:
            workers: addresses to retire (default: ``workers_to_close(**kwargs)``).
            names: worker names to retire, instead of addresses.
            remove: forget the workers at once (else wait for them to leave).
            close_workers: also tell the workers to close (removed workers are
                closed anyway, so that they do not register again).
            timeout: give up on a worker whose data has not moved by then.
            wait_for_recipient: when no other running worker can take the data
                only these workers hold, wait up to this long for one to join
                (a worker whose ``lifetime`` ended waits for its own
                replacement) instead of refusing at once.  Meanwhile the
                workers get no new tasks.

        Returns:
            ``{address: info}`` for each worker retired.
        """
        if parse_timedelta(wait_for_recipient):
            # Workers retiring by themselves (lifetime) go one at a time: retiring
            # together, each would see its peers closing_gracefully, find no
            # recipient for its unique data and be refused, over and over.
            lock = self.scheduler.__dict__.setdefault("_self_retirement_lock", asyncio.Lock())
            async with lock:
                return await self._retire_workers(workers, remove, close_workers, names, timeout,
                                                  wait_for_recipient, **kwargs)
        return await self._retire_workers(workers, remove, close_workers, names, timeout,
                                          wait_for_recipient, **kwargs)

    async def _retire_workers(self, workers: Iterable[str] | None, remove: bool,
                              close_workers: bool, names: Iterable[Any] | None, timeout: Any,
                              wait_for_recipient: Any, **kwargs) -> dict:
        if names is not None:
            wanted = set(names)
            workers = [a for a, ws in self.scheduler.state.workers.items() if ws.name in wanted or str(ws.name) in wanted]
        elif workers is None:
            workers = self.workers_to_close(**kwargs)
        workers = [w for w in workers if w in self.scheduler.state.workers]
        if not workers:
            return {}
        stimulus_id = self.scheduler._stimulus("retire-workers")
        info = {w: self.scheduler.state.workers[w].identity() for w in workers}
        instrs, plan = elastic.retire_plan(self.scheduler.state, workers, stimulus_id)
        self.scheduler._send(instrs)
        if any(r == "" for r in plan.values()) and await self._recipient_joined(workers, wait_for_recipient):
            instrs, plan = elastic.retire_plan(self.scheduler.state, workers, stimulus_id)
            self.scheduler._send(instrs)
        if any(r == "" for r in plan.values()):
            logger.warning("cannot retire %s: no other worker to take its unique data", workers)
            for w in workers:
                self.scheduler._send(self.scheduler.state.handle(WorkerStatusEvent(w, "running", stimulus_id)))
            return {}
        deadline = time.monotonic() + (parse_timedelta(timeout) or 60.0)
        rounds = 0
        while True:
            pending = [k for k, r in plan.items()
                       if k in self.scheduler.state.tasks and self.scheduler.state.tasks[k].state == "memory"
                       and not any(ws.address not in workers for ws in self.scheduler.state.tasks[k].who_has)]
            if not pending:
                # Tasks that finished there meanwhile made new unique data: move it too.
                instrs, more = elastic.retire_plan(self.scheduler.state, workers, stimulus_id)
                more = {k: r for k, r in more.items() if k not in plan}
                if not more or rounds >= 5 or any(r == "" for r in more.values()):
                    break
                rounds += 1
                self.scheduler._send(instrs)
                plan.update(more)
                continue
            if time.monotonic() > deadline:
                logger.warning("retiring %s: %d keys did not move in time; keeping the workers",
                               workers, len(pending))
                for w in workers:
                    self.scheduler._send(self.scheduler.state.handle(WorkerStatusEvent(w, "running", stimulus_id)))
                return {}
            await asyncio.sleep(0.01)
        for w in workers:
            if remove:
                # Closed even without close_workers (as dask does): a worker only
                # dropped would register again and take new tasks.
                await self.scheduler.remove_worker(w, safe=True, close=True, stimulus_id=stimulus_id)
            elif close_workers:
                self.scheduler.close_worker(w)
        logger.info("retired %s", ", ".join(workers))
        return info

    async def _recipient_joined(self, retiring: list[str], wait: Any) -> bool:
        """Wait up to ``wait`` for a running worker outside ``retiring``; ``True`` if one came."""
        deadline = time.monotonic() + (parse_timedelta(wait) or 0.0)
        while time.monotonic() < deadline:
            if not all(w in self.scheduler.state.workers for w in retiring):
                return False  # one of them left meanwhile: nothing more to plan for it
            if any(ws.status == "running" and a not in retiring for a, ws in self.scheduler.state.workers.items()):
                return True
            await asyncio.sleep(0.05)  # polling interval while waiting for a worker to register
        return False

    # ------------------------------------------------------------------ moving data

    async def _await_replicas(self, wanted: dict[Key, set[str]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            missing = [k for k, ws in wanted.items()
                       if k in self.scheduler.state.tasks
                       and not ws <= {w.address for w in self.scheduler.state.tasks[k].who_has}]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ClusterTimeoutError(f"{len(missing)} keys did not reach their new workers within {timeout}s")
            await asyncio.sleep(0.01)

    @staticmethod
    def _targets_of(instrs) -> dict[Key, set[str]]:
        wanted: dict[Key, set[str]] = {}
        for m in instrs:
            for k in m.who_has:
                wanted.setdefault(k, set()).add(m.worker)
        return wanted

    def _drop_replicas(self, drops: dict[str, list[Key]]) -> None:
        stimulus_id = self.scheduler._stimulus("remove_replicas")
        self.scheduler._send([RemoveReplicasMsg(stimulus_id, addr, list(keys)) for addr, keys in drops.items()])

    async def replicate(self, keys: Iterable[Key] = (), n: int | None = None,
                        workers: Iterable[str] | None = None, branching_factor: int = 2,
                        delete: bool = True, timeout: Any = 60) -> str:
        """Keep ``n`` copies of each key (on ``workers``, default all), copying peer to peer.

        Raises:
            ClusterTimeoutError: the copies did not land within ``timeout``.
        """
        instrs, drops = elastic.replicate_plan(self.scheduler.state, list(keys), n, workers, self.scheduler._stimulus("replicate"))
        self.scheduler._send(instrs)
        await self._await_replicas(self._targets_of(instrs), parse_timedelta(timeout) or 60.0)
        if delete:
            self._drop_replicas(drops)
        return "OK"

    async def rebalance(self, keys: Iterable[Key] | None = None, workers: Iterable[str] | None = None,
                        timeout: Any = 60) -> dict:
        """Move data so that each worker holds about the same number of bytes.

        Raises:
            ClusterTimeoutError: the copies did not land within ``timeout``.
        """
        instrs, drops = elastic.rebalance_plan(self.scheduler.state, keys, workers, self.scheduler._stimulus("rebalance"))
        self.scheduler._send(instrs)
        await self._await_replicas(self._targets_of(instrs), parse_timedelta(timeout) or 60.0)
        self._drop_replicas(drops)
        return {"status": "OK", "moved": sum(len(v) for v in drops.values())}

    # ------------------------------------------------------------------ restart

    async def restart(self, client: str | None = None, timeout: Any = 30) -> str:
        """Restart every worker through its nanny and forget all tasks.

        Workers without a nanny are closed: only something outside the cluster
        (a batch system relaunching them) can bring them back.

        Raises:
            ClusterTimeoutError: the workers did not all come back within
                ``timeout``; the message names the workers that had no nanny.
        """
        timeout = parse_timedelta(timeout) or 30.0
        stimulus_id = self.scheduler._stimulus("restart")
        await self.plugin_hook_async("restart", self.scheduler)
        self.scheduler._send(self.scheduler.state.handle(RestartEvent(stimulus_id)))
        nannies = {a: ws.nanny for a, ws in self.scheduler.state.workers.items() if ws.nanny}
        n_before = len(self.scheduler.state.workers)
        without_nanny = [a for a in self.scheduler.state.workers if a not in nannies]
        for addr in without_nanny:
            await self.scheduler.remove_worker(addr, safe=True, close=True, stimulus_id=stimulus_id)

        async def one(nanny: str) -> None:
            with suppress(CommError, OSError):
                await self.scheduler.rpc.call(nanny, "restart", timeout=timeout)

        await asyncio.gather(*(one(n) for n in nannies.values()))
        deadline = time.monotonic() + timeout
        while len(self.scheduler.state.workers) < n_before:
            if time.monotonic() > deadline:
                why = ""
                if without_nanny:
                    why = (f"; {len(without_nanny)} of them ({', '.join(without_nanny)}) had no nanny, so "
                           "they were closed, not restarted: only a nanny (Nanny, LocalCluster(processes=True)) "
                           "or a deployment that relaunches them can bring a worker back. Without nannies, "
                           "do not use restart")
                raise ClusterTimeoutError(f"only {len(self.scheduler.state.workers)} of {n_before} workers came "
                                          f"back within {timeout}s of a restart{why}")
            await asyncio.sleep(0.02)
        return "OK"

    # ------------------------------------------------------------------ plugins

    def add_plugin(self, plugin=None, idempotent: bool | None = None, name: str | None = None,
                   **kwargs) -> None:
        """Add a scheduler plugin (an object with any of the ``SchedulerPlugin`` hooks).

        Synchronous, as dask's (``scheduler.add_plugin(p)`` in a preload's
        ``dask_setup`` works): a plugin of the same name is replaced (its
        ``close`` called), unless ``idempotent`` (default: the plugin's own
        ``idempotent`` attribute), which keeps the first; the new one's
        ``start(scheduler)`` is called now, or, if it is ``async def``, run on
        the scheduler's event loop (see :meth:`register_scheduler_plugin` to
        wait for it).

        Raises:
            RuntimeError: an ``async def`` ``start`` or ``close`` and no running
                event loop to run it on.
        """
        old, plugin = self._put_plugin(plugin, idempotent, name)
        if plugin is None:
            return
        if old is not None:
            self._run_hook_soon(old, "close")
        self._run_hook_soon(plugin, "start", self.scheduler)

    async def register_scheduler_plugin(self, plugin=None, name: str | None = None,
                                        idempotent: bool | None = None, **kwargs) -> str:
        """:meth:`add_plugin`, waiting for the plugin's ``start`` (and the replaced
        one's ``close``), also when they are ``async def``: the handler of the
        clients' ``register_plugin``."""
        old, plugin = self._put_plugin(plugin, idempotent, name)
        if plugin is not None:
            if old is not None:
                await self._call_async(old, "close")
            await self._call_async(plugin, "start", self.scheduler)
        return "OK"

    def _put_plugin(self, plugin: Any, idempotent: bool | None, name: str | None) -> tuple[Any, Any]:
        """Register ``plugin``: ``(the plugin it replaced or None, the plugin)``, or
        ``(None, None)`` when an idempotent plugin of that name is kept."""
        if isinstance(plugin, (bytes, bytearray, memoryview)):
            plugin = pickle.loads(plugin)
        name = name or plugin_name(plugin)
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        if name in self.scheduler.plugins and idempotent:
            return None, None
        if not self.scheduler.plugins:
            # Plugins hear about transitions from now on, not the past.
            self._plugin_seen = self.scheduler.state.transition_counter
        else:
            self._plugin_transitions()  # flush the others' backlog first
        old = self.scheduler.plugins.pop(name, None)
        self.scheduler.plugins[name] = plugin
        return old, plugin

    def _run_hook_soon(self, plugin: Any, hook: str, *args: Any) -> None:
        fn = getattr(plugin, hook, None)
        if fn is None or (isinstance(plugin, SchedulerPlugin) and not overrides(plugin, hook, SchedulerPlugin)):
            return  # the base class's hooks do nothing
        result = fn(*args)
        if asyncio.iscoroutine(result):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                result.close()
                raise RuntimeError(f"{type(plugin).__name__}.{hook} is async def: add the plugin "
                                   "from the scheduler's event loop, or await "
                                   "scheduler.register_scheduler_plugin(plugin)") from None
            self.scheduler.spawn(self._logged(result, plugin, hook))

    @staticmethod
    async def _logged(coro: Any, plugin: Any, hook: str) -> None:
        try:
            await coro
        except Exception:
            logger.exception("scheduler plugin %r failed in %s", plugin, hook)

    @staticmethod
    async def _call_async(plugin: Any, hook: str, *args: Any) -> None:
        fn = getattr(plugin, hook, None)
        if fn is None:
            return
        result = fn(*args)
        if asyncio.iscoroutine(result):
            await result

    async def plugin_hook_async(self, hook: str, *args: Any) -> None:
        """Run a hook that may be ``async def`` (``restart``, ``before_close``) on every plugin;
        failures are logged."""
        for plugin in list(self.scheduler.plugins.values()):
            if isinstance(plugin, SchedulerPlugin) and not overrides(plugin, hook, SchedulerPlugin):
                continue
            try:
                await self._call_async(plugin, hook, *args)
            except Exception:
                logger.exception("scheduler plugin %r failed in %s", plugin, hook)

    def remove_plugin(self, plugin=None, name: str | None = None) -> str:
        """Remove a scheduler plugin by object or name.

        Raises:
            ValueError: no such plugin.
        """
        if name is None:
            name = next((n for n, p in self.scheduler.plugins.items() if p is plugin), None)
        if name not in self.scheduler.plugins:
            raise ValueError(f"no scheduler plugin named {name!r}; have {sorted(self.scheduler.plugins)}")
        del self.scheduler.plugins[name]
        return "OK"

    def _plugin_hook(self, hook: str, *args, **kwargs) -> None:
        """Call ``hook`` of every plugin with the keyword arguments it takes: dask's hooks
        grew arguments over the years (``stimulus_id``, ``tasks``...), and a plugin written
        for an older or newer signature must work either way."""
        for plugin in list(self.scheduler.plugins.values()):
            fn = getattr(plugin, hook, None)
            if fn is None:
                continue
            try:
                accepted = _accepted_keywords(type(plugin), hook)
                fn(*args, **(kwargs if accepted is None else
                             {k: v for k, v in kwargs.items() if k in accepted}))
            except Exception:
                logger.exception("scheduler plugin %r failed in %s", plugin, hook)

    def _plugin_transitions(self) -> None:
        """Feed transitions logged since last time to plugins' ``transition`` hooks."""
        counter = self.scheduler.state.transition_counter
        new = counter - self._plugin_seen
        self._plugin_seen = counter
        if not new or not any(hasattr(p, "transition") for p in self.scheduler.plugins.values()):
            return
        entries = list(self.scheduler.state.log.entries)[-new:]
        for key, start, finish, _recs, stimulus_id, _t in entries:
            self._plugin_hook("transition", key, start, finish, stimulus_id=stimulus_id)

    async def register_worker_plugin(self, plugin: bytes | Any = None, name: str | None = None,
                                     idempotent: bool | None = None) -> dict:
        """Run ``plugin.setup(worker)`` on every worker now and on every worker that joins.

        A plugin of the same name is replaced, unless ``idempotent`` (default:
        the plugin's ``idempotent`` attribute), which keeps the first.

        Returns:
            ``{address: reply}`` of the present workers: ``{"status": "OK"}``, or the
            exception ``setup`` raised there.
        """
        blob = bytes(plugin) if isinstance(plugin, (bytes, bytearray, memoryview)) else pickle.dumps(plugin)
        obj = pickle.loads(blob)
        name = name or plugin_name(obj)
        if idempotent is None:
            idempotent = bool(getattr(obj, "idempotent", False))
        if idempotent and name in self.scheduler.worker_plugins:
            return {}
        self.scheduler.worker_plugins[name] = blob
        return await self.scheduler.broadcast(msg={"op": "plugin_add", "plugin": blob, "name": name},
                                              return_exceptions=True)

    async def unregister_worker_plugin(self, name: str) -> dict:
        """Remove the worker plugin ``name`` from every worker (its ``teardown`` runs there).

        Raises:
            ValueError: no worker plugin of that name was registered.
        """
        if name not in self.scheduler.worker_plugins:
            raise ValueError(f"the worker plugin {name!r} does not exist; registered: "
                             f"{sorted(self.scheduler.worker_plugins)}")
        del self.scheduler.worker_plugins[name]
        return await self.scheduler.broadcast(msg={"op": "plugin_remove", "name": name},
                                              return_exceptions=True)

    async def register_nanny_plugin(self, plugin: bytes | Any = None, name: str | None = None,
                                    idempotent: bool | None = None) -> dict:
        """Run ``plugin.setup(nanny)`` on every nanny now and on every nanny that starts later
        (then, with ``plugin.restart``, the present nannies restart their workers).

        Returns:
            ``{nanny address: reply}``: ``{"status": "OK"}`` or the exception raised there.
        """
        blob = bytes(plugin) if isinstance(plugin, (bytes, bytearray, memoryview)) else pickle.dumps(plugin)
        obj = pickle.loads(blob)
        name = name or plugin_name(obj)
        if idempotent is None:
            idempotent = bool(getattr(obj, "idempotent", False))
        if idempotent and name in self.nanny_plugins:
            return {}
        self.nanny_plugins[name] = blob
        return await self._nanny_broadcast("plugin_add", plugin=blob, name=name)

    async def unregister_nanny_plugin(self, name: str) -> dict:
        """Remove the nanny plugin ``name`` from every nanny (its ``teardown`` runs there).

        Raises:
            ValueError: no nanny plugin of that name was registered.
        """
        if name not in self.nanny_plugins:
            raise ValueError(f"the nanny plugin {name!r} does not exist; registered: "
                             f"{sorted(self.nanny_plugins)}")
        del self.nanny_plugins[name]
        return await self._nanny_broadcast("plugin_remove", name=name)

    async def _nanny_broadcast(self, op: str, **msg: Any) -> dict:
        # The nannies of registered workers, and those that asked for the plugins
        # while their worker was still starting (it would miss a broadcast to workers).
        targets = self.nannies | {ws.nanny for ws in self.scheduler.state.workers.values() if ws.nanny}

        async def one(addr: str):
            try:
                return addr, await self.scheduler.rpc.call(addr, op, **msg)
            except (CommError, OSError):  # that nanny is gone
                self.nannies.discard(addr)
                return addr, None
            except Exception as e:  # the plugin failed there: the caller sees why
                return addr, e

        results = await asyncio.gather(*(one(a) for a in sorted(targets)))
        return {a: r for a, r in results if r is not None}

    def get_nanny_plugins(self, address: str | None = None) -> dict[str, bytes]:
        """The nanny plugins, for a nanny that starts (``address``: it, to reach it later)."""
        if address:
            self.nannies.add(address)
        return dict(self.nanny_plugins)

    # ------------------------------------------------------------------ versions

    async def get_versions(self, packages: list[str] | None = None) -> dict:
        """``{"scheduler": ..., "workers": {address: ...}}``: Python and package versions
        (see :mod:`cluster.runtime.versions`; a worker that cannot answer gives ``None``)."""
        replies = await self.scheduler.broadcast(msg={"op": "versions", "packages": packages},
                                                 return_exceptions=True)
        workers = {a: (None if isinstance(r, BaseException) else r) for a, r in replies.items()}
        return {"scheduler": get_versions(packages), "workers": workers}

    def worker_registered(self, address: str, nanny: str | None, versions: dict | None) -> None:
        """A worker registered: warn if its Python or ``cluster`` version differs from ours;
        its nanny is now known through it."""
        if nanny:
            self.nannies.discard(nanny)
        problem = registration_mismatch(get_versions(), versions)
        if problem:
            logger.warning("worker %s has other versions than the scheduler: %s (mismatched "
                           "environments; see client.get_versions(check=True))", address, problem)

    # ------------------------------------------------------------------ addresses and proxies

    def coerce_address(self, addr, resolve: bool = True) -> str:
        """Canonical ``protocol://host:port`` for an address, ``(host, port)`` or worker name.

        Raises:
            ValueError: nothing matches.
        """
        if addr in self.scheduler.state.aliases:
            return self.scheduler.state.aliases[addr]
        if isinstance(addr, tuple) and len(addr) == 2:
            addr = unparse_host_port(*addr)
        if not isinstance(addr, str):
            raise ValueError(f"cannot make an address of {addr!r}")
        default = self.scheduler.protocol if self.scheduler.protocol in ("tcp", "tls") else "tcp"
        proto, loc = parse_address(addr, default_protocol=default)
        if proto == "inproc":
            return f"{proto}://{loc}"
        host, port = parse_host_port(loc)
        return f"{proto}://{unparse_host_port(host, port)}"

    async def proxy(self, msg: dict | None = None, worker: str | None = None, serializers=None) -> Any:
        """Forward a request to a worker and return its reply."""
        msg = dict(msg or {})
        op = msg.pop("op")
        return await self.scheduler.rpc.call(self.coerce_address(worker), op, **msg)

    def get_worker_service_addr(self, worker: str, service_name: str, protocol: bool = False):
        """``(host, port)`` (or the full address) of a worker's service, e.g. ``"nanny"``.

        Returns ``None`` if the worker has no such service.
        """
        ws = self.scheduler.state.workers.get(worker)
        if ws is None:
            return None
        if service_name == "nanny":
            if not ws.nanny:
                return None
            return ws.nanny if protocol else parse_host_port(parse_address(ws.nanny)[1])
        port = ws.services.get(service_name)
        if port is None:
            return None
        proto = parse_address(ws.address)[0]
        return f"{proto}://{unparse_host_port(ws.host, port)}" if protocol else (ws.host, port)

    # ------------------------------------------------------------------ running code, reaching workers

    async def broadcast(self, msg: dict | None = None, workers: Iterable[str] | None = None,
                        hosts: Iterable[str] | None = None, nanny: bool = False,
                        serializers=None, return_exceptions: bool = False) -> dict:
        """Send ``msg`` to workers (all by default) and return ``{address: reply}``.

        With ``return_exceptions`` a worker's error is its reply instead of
        being raised.
        """
        msg = dict(msg or {})
        if workers is None and hosts is None:
            targets = list(self.scheduler.state.workers)
        else:
            targets = list(workers or [])
            for h in hosts or ():
                targets.extend(self.scheduler.state.host_info.get(h, {}).get("addresses", ()))
        op = msg.pop("op")

        async def one(addr: str):
            target = addr
            if nanny:
                target = self.scheduler.state.workers[addr].nanny
            return addr, await self.scheduler.rpc.call(target, op, **msg)

        async def guarded(addr: str):
            try:
                return await one(addr)
            except Exception as e:
                if not return_exceptions:
                    raise
                return addr, e

        results = await asyncio.gather(*(guarded(a) for a in targets))
        return dict(results)

    async def run_function(self, function: bytes, args: bytes | tuple = (), kwargs: dict | None = None,
                           wait: bool = True) -> Any:
        """Run a function in the scheduler's process (for ``Client.run_on_scheduler``; ``dask_scheduler=`` is the scheduler)."""
        func = pickle.loads(function) if isinstance(function, bytes) else function
        if isinstance(args, bytes):
            args, kwargs = pickle.loads(args)
        result = func(*args, **server_kwargs(func, kwargs, "dask_scheduler", self.scheduler))
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def workers_list(self, workers: Iterable[str] | None) -> list[str]:
        """Worker addresses matching addresses, names or hostnames in ``workers``."""
        if workers is None:
            return list(self.scheduler.state.workers)
        out = []
        for w in workers:
            if w in self.scheduler.state.workers:
                out.append(w)
            elif w in self.scheduler.state.aliases:
                out.append(self.scheduler.state.aliases[w])
            else:
                out.extend(sorted(self.scheduler.state.host_info.get(w, {}).get("addresses", ())))
        return out

    def coerce_hostname(self, host: str) -> str:
        """The canonical host name of a worker host (alias names resolve to their host)."""
        if host in self.scheduler.state.aliases:
            return self.scheduler.state.workers[self.scheduler.state.aliases[host]].host
        return host
