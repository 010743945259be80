"""Stimuli of the scheduler's state machine: what clients and workers tell it.

A mixin of :class:`runtime.scheduler.state.SchedulerState`.  Each method turns
one event into recommendations, runs them through the transition table
(``self.transitions``) and returns the resulting instructions.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

from ..errors import KilledWorker, ScatteredDataLost
from ..statemachine import Msg
from . import elastic, validation
from .records import (
    CancelledKeyMsg,
    ClientState,
    CloseScheduler,
    FreeKeysMsg,
    KeyInMemoryMsg,
    RefreshWhoHasMsg,
    RemoveWorker,
    TaskErredClientMsg,
    TaskState,
    WorkerState,
)

#: Seconds between re-estimates of the workers' expected load (see ``tick``).
REEVALUATE_OCCUPANCY_INTERVAL = 5.0

Key = Hashable


class StimuliMixin:
    """Event handlers of :class:`SchedulerState`."""

    # ------------------------------------------------------------------ clients

    def add_client(self, client: str) -> ClientState:
        cs = self.clients.get(client)
        if cs is None:
            cs = self.clients[client] = ClientState(client)
        cs.last_seen = self.clock()
        return cs

    def remove_client(self, client: str, stimulus_id: str = "remove-client") -> list[Msg]:
        cs = self.clients.get(client)
        if cs is None:
            return []
        out = self.client_releases_keys([ts.key for ts in cs.wants_what], client, stimulus_id)
        del self.clients[client]
        return out

    def client_releases_keys(self, keys: Iterable[Key], client: str, stimulus_id: str = "client-releases") -> list[Msg]:
        """The client dropped its last future for these keys."""
        cs = self.clients.get(client)
        if cs is None:
            return []
        recs: dict[Key, str] = {}
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None or cs not in ts.who_wants:
                continue
            ts.who_wants.discard(cs)
            cs.wants_what.discard(ts)
            if not ts.who_wants:
                if not ts.dependents:
                    recs[key] = "forgotten"
                elif not ts.waiters and ts.state in ("memory", "erred"):
                    recs[key] = "released"
        return self.transitions(recs, stimulus_id)

    # ------------------------------------------------------------------ workers

    def add_worker(self, address: str, nthreads: int = 1, name: Any = None, memory_limit: int = 0,
                   resources: dict | None = None, host: str = "", pid: int = 0,
                   nanny: str | None = None, local_directory: str = "", services: dict | None = None,
                   keys: Iterable[Key] = (), nbytes: dict | None = None,
                   stimulus_id: str = "add-worker") -> list[Msg]:
        """A worker joined.  Tasks that had no worker get another chance.

        Raises:
            ValueError: the address or name is already taken.
        """
        self.check_new_worker(address, name)
        ws = WorkerState(address, nthreads, name, memory_limit, resources, host, pid, nanny,
                         local_directory, services)
        ws.last_seen = self.clock()
        self.workers[address] = ws
        self.aliases[ws.name] = address
        self.total_nthreads += nthreads
        hi = self.host_info.setdefault(host, {"addresses": set(), "nthreads": 0})
        hi["addresses"].add(address)
        hi["nthreads"] += nthreads
        self.placement.check_idle_saturated(ws)
        recs: dict[Key, str] = {}
        for key in keys:  # data the worker brings along (a reconnect)
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "memory":
                self._add_replica(ts, ws)
        for ts in list(self.unrunnable):
            valid = self.placement.valid_workers(ts)
            if valid is None or ws in valid or (ts.loose_restrictions and not valid):
                recs[ts.key] = "processing"
        return self.transitions(recs, stimulus_id)

    def remove_worker(self, address: str, stimulus_id: str = "remove-worker", safe: bool = False) -> list[Msg]:
        """A worker left or died.

        Tasks it was running are rescheduled (after ``allowed_failures``
        deaths during one task, the task fails with :class:`KilledWorker`);
        results only it held are recomputed from their recipe.
        """
        ws = self.workers.pop(address, None)
        if ws is None:
            return []
        if self.aliases.get(ws.name) == address:
            del self.aliases[ws.name]
        self.total_nthreads -= ws.nthreads
        hi = self.host_info.get(ws.host)
        if hi is not None:
            hi["addresses"].discard(address)
            hi["nthreads"] -= ws.nthreads
            if not hi["addresses"]:
                del self.host_info[ws.host]
        self.idle.pop(address, None)
        self.saturated.discard(ws)
        recs: dict[Key, str] = {}
        killed: dict[Key, str] = {}
        for ts in list(ws.processing):
            if not safe:
                ts.suspicious += 1
                ts.erred_on.add(address)
            if ts.suspicious > self.allowed_failures:
                ts.exception = KilledWorker(ts.key, address, self.allowed_failures)
                ts.traceback = ""
                killed[ts.key] = "erred"
            else:
                recs[ts.key] = "released"  # and from there back to waiting
        # Fail the killers first, so that no later recommendation revives them.
        out = self.transitions(killed, stimulus_id) if killed else []
        for ts in list(ws.has_what):
            self._remove_replica(ts, ws)
            if not ts.who_has:
                if ts.run_spec is not None:
                    recs[ts.key] = "released"
                else:
                    ts.exception = ScatteredDataLost(ts.key)
                    ts.traceback = ""
                    recs[ts.key] = "erred"
        out.extend(self.transitions(recs, stimulus_id))
        return out

    def check_new_worker(self, address: str, name: Any = None) -> None:
        """Raise ValueError if a worker with this address or name is already registered."""
        if address in self.workers:
            raise ValueError(f"worker {address} is already registered")
        if name is not None and name in self.aliases and self.aliases[name] != address:
            raise ValueError(f"a worker named {name!r} is already registered at {self.aliases[name]}")

    def worker_heartbeat(self, address: str, metrics: dict | None = None) -> bool:
        ws = self.workers.get(address)
        if ws is None:
            return False
        ws.last_seen = self.clock()
        if metrics:
            ws.metrics = metrics
        return True

    # ------------------------------------------------------------------ time

    def tick(self, now: float, stimulus_id: str = "tick") -> list:
        """Time passed (a :class:`~runtime.scheduler_events.TickEvent`): decide what is due.

        * every :data:`REEVALUATE_OCCUPANCY_INTERVAL` the workers' expected load
          is re-estimated from the task durations learned since (and workers
          that gained room are filled);
        * a worker not heard from for ``worker_ttl`` is to be removed
          (:class:`RemoveWorker`; the shell also closes its stream);
        * after ``idle_timeout`` with no task queued, waiting for a worker or
          running, the scheduler is to close (:class:`CloseScheduler`).
        """
        out: list = []
        last = self._last_reevaluation
        if last is None:
            self._last_reevaluation = now
        elif now - last > REEVALUATE_OCCUPANCY_INTERVAL:
            # Task durations drift as they are learned; re-align the workers'
            # expected load now and then rather than per task.
            self._last_reevaluation = now
            elastic.reevaluate_occupancy(self)
            out.extend(self.transitions({}, stimulus_id))
        if self.worker_ttl:
            for ws in self.workers.values():
                silent = now - ws.last_seen
                if silent > self.worker_ttl:
                    out.append(RemoveWorker(stimulus_id, ws.address,
                                            f"missed its heartbeat for {silent:.1f}s"))
        if self.idle_timeout:
            busy = (self._new_work or self.unrunnable
                    or any(ws.processing for ws in self.workers.values())
                    or any(ts.state == "queued" for _, _, ts in self.queued))
            self._new_work = False
            if busy or self.last_activity is None:
                self.last_activity = now
            elif now - self.last_activity > self.idle_timeout:
                out.append(CloseScheduler(stimulus_id, f"idle for {now - self.last_activity:.0f}s"))
        return out

    # ------------------------------------------------------------------ graphs

    def update_graph(self, client: str, tasks: dict[Key, bytes | None], keys: Iterable[Key],
                     dependencies: dict[Key, Iterable[Key]] | None = None,
                     restrictions: dict[Key, Iterable[str]] | None = None,
                     loose_restrictions: Iterable[Key] = (),
                     resources: dict[Key, dict] | None = None,
                     retries: dict[Key, int] | None = None,
                     user_priority: int | dict[Key, int] = 0,
                     stimulus_id: str = "update-graph") -> list[Msg]:
        """New work from a client: ``tasks`` maps keys to serialised recipes.

        ``keys`` are the keys the client holds futures for.  Recipes arrive as
        bytes and are forwarded to workers untouched.  A key already known
        keeps its state (so resubmitting the same pure task costs nothing).
        The graph must be acyclic (:meth:`check_graph`).
        """
        cs = self.add_client(client)
        self._new_work = True
        dependencies = dependencies or {}
        keys = list(keys)
        tasks = self._needed(tasks, keys, dependencies)
        restrictions = restrictions or {}
        resources = resources or {}
        retries = retries or {}
        loose = set(loose_restrictions)
        new: list[TaskState] = []
        out: list[Msg] = []
        recs: dict[Key, str] = {}
        for key, spec in tasks.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, spec)
                new.append(ts)
            elif ts.run_spec is None and spec is not None and ts.state in ("released", "erred"):
                ts.run_spec = spec
                new.append(ts)
                if ts.state == "erred":  # an unknown dependency that now has a recipe
                    recs[key] = "released"
            elif ts.state == "erred" and ts.exception_blame is ts:
                # Resubmission of a failed task: try again.
                new.append(ts)
                recs[key] = "released"
        for ts in new:
            for dep_key in dependencies.get(ts.key, ()):
                dts = self.tasks.get(dep_key)
                if dts is None:
                    dts = self.tasks[dep_key] = TaskState(dep_key, None)
                    dts.exception = KeyError(f"dependency {dep_key!r} is not known to the scheduler")
                    dts.exception_blame = dts
                    dts.state = "erred"
                ts.dependencies.add(dts)
                dts.dependents.add(ts)
            r = restrictions.get(ts.key)
            if r:
                self._set_restrictions(ts, r)
                ts.loose_restrictions = ts.key in loose
            res = resources.get(ts.key)
            if res:
                ts.resource_restrictions = dict(res)
            ts.retries = int(retries.get(ts.key, 0))
            up = user_priority.get(ts.key, 0) if isinstance(user_priority, dict) else user_priority
            ts.priority = (-up, next(self._priority_counter))
        self.placement.mark_rootish(new)
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.who_wants.add(cs)
            cs.wants_what.add(ts)
            if ts.state == "memory":
                out.append(KeyInMemoryMsg(stimulus_id, client, ts.key, ts.type or "", [w.address for w in ts.who_has]))
            elif ts.state == "erred" and key not in recs:  # (else: being tried again)
                blame = ts.exception_blame or ts
                out.append(TaskErredClientMsg(stimulus_id, client, ts.key, blame.exception,
                                              blame.traceback or "", ""))
        for ts in new:
            if ts.state == "released" and ts.key not in recs:
                recs[ts.key] = "waiting"
        out.extend(self.transitions(recs, stimulus_id))
        return out

    def _needed(self, tasks: dict[Key, Any], keys: Iterable[Key],
                dependencies: dict[Key, Iterable[Key]]) -> dict[Key, Any]:
        """``tasks`` without those that neither the client wants (``keys``) nor a wanted
        task needs: nothing would ever release them (our client sends none; a
        broken peer might)."""
        needed: set = set()
        stack = [k for k in keys if k in tasks]
        for k in tasks:
            ts = self.tasks.get(k)
            if ts is not None and (ts.dependents or ts.who_wants):
                stack.append(k)
        while stack:
            k = stack.pop()
            if k not in needed:
                needed.add(k)
                stack.extend(d for d in dependencies.get(k, ()) if d in tasks and d not in needed)
        if len(needed) == len(tasks):
            return tasks
        return {k: v for k, v in tasks.items() if k in needed}

    def _gains_dependencies(self, key: Key, spec: Any) -> bool:
        """Whether :meth:`update_graph` would give ``key`` (with recipe ``spec``) dependencies."""
        ts = self.tasks.get(key)
        if ts is None:
            return True
        if ts.run_spec is None and spec is not None and ts.state in ("released", "erred"):
            return True
        return ts.state == "erred" and ts.exception_blame is ts

    def check_graph(self, tasks: dict[Key, Any], dependencies: dict[Key, Iterable[Key]]) -> None:
        """Refuse a graph that :meth:`update_graph` would make cyclic; it changes nothing.

        Our client cannot make a cycle (a task can depend only on futures that
        exist before it), but a broken or hostile peer can, and a task that
        waits on itself would never run nor ever be forgotten.  Cost: linear in
        the new tasks and their edges; the existing graph is walked only when
        an existing task gains dependencies (a placeholder that gets its
        recipe, or a failed task submitted again).

        Raises:
            ValueError: naming a task on the cycle.
        """
        gaining = {k for k, spec in tasks.items() if dependencies.get(k) and self._gains_dependencies(k, spec)}
        if not gaining:
            return
        walk_old = any(k in self.tasks for k in gaining)

        def deps(key: Key) -> Iterable[Key]:
            if key in gaining:
                yield from dependencies[key]
                ts = self.tasks.get(key)
                if ts is not None:
                    yield from (d.key for d in ts.dependencies)
            elif walk_old:
                ts = self.tasks.get(key)
                if ts is not None:
                    yield from (d.key for d in ts.dependencies)

        done: set = set()
        for root in gaining:
            if root in done:
                continue
            on_path = {root}
            stack = [(root, iter(deps(root)))]
            while stack:
                key, it = stack[-1]
                for dep in it:
                    if dep in on_path:
                        raise ValueError(f"the graph has a cycle through task {dep!r}")
                    if dep not in done:
                        on_path.add(dep)
                        stack.append((dep, iter(deps(dep))))
                        break
                else:
                    stack.pop()
                    on_path.discard(key)
                    done.add(key)

    def _set_restrictions(self, ts: TaskState, restrictions: Iterable[str]) -> None:
        workers: set[str] = set()
        hosts: set[str] = set()
        for r in restrictions:
            if r in self.workers or "://" in str(r):
                workers.add(r)
            elif r in self.aliases:
                workers.add(self.aliases[r])
            else:
                hosts.add(r)
        ts.worker_restrictions = workers or None
        ts.host_restrictions = hosts or None

    # ------------------------------------------------------------------ stimuli from workers

    def stimulus_task_finished(self, key: Key, worker: str, nbytes: int = -1, type: str = "",
                               startstops: Iterable = (), stimulus_id: str = "task-finished",
                               data: bytes | None = None) -> list[Msg]:
        """A worker computed ``key``; ``data`` is its pickled value if small (forwarded, not kept)."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ws is None:
            return []
        if ts is None or ts.state != "processing" or ts.processing_on is not ws:
            if ts is not None and ts.state == "memory":
                # A duplicate result (e.g. after a reschedule): keep the replica.
                self._add_replica(ts, ws)
                return []
            return [FreeKeysMsg(stimulus_id, worker, [key])]
        for action, start, stop in startstops:
            if action == "compute":
                self._record_duration(ts, stop - start)
        recs = self.transition(key, "memory", stimulus_id, worker=ws, nbytes=nbytes, type=type, data=data)
        return self.transitions(recs, stimulus_id)

    def _record_duration(self, ts: TaskState, duration: float) -> None:
        old = self.task_duration.get(ts.prefix)
        self.task_duration[ts.prefix] = duration if old is None else 0.5 * old + 0.5 * duration

    def stimulus_task_erred(self, key: Key, worker: str, exception: Any = None, traceback: str = "",
                            startstops: Iterable = (), stimulus_id: str = "task-erred") -> list[Msg]:
        """A task raised on a worker; retry it if it has retries left."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ts is None or ws is None or ts.state != "processing" or ts.processing_on is not ws:
            return []
        if ts.retries > 0:
            ts.retries -= 1
            return self.transitions({key: "waiting"}, stimulus_id)
        ts.exception = exception
        ts.traceback = traceback
        ts.erred_on.add(worker)
        return self.transitions({key: "erred"}, stimulus_id)

    def stimulus_missing_data(self, key: Key, errant_worker: str | None = None, worker: str | None = None,
                              stimulus_id: str = "missing-data") -> list[Msg]:
        """A worker could not get ``key`` from ``errant_worker``.  Recover."""
        ts = self.tasks.get(key)
        if ts is None:
            return []
        ews = self.workers.get(errant_worker) if errant_worker else None
        if ews is not None and ews in ts.who_has:
            self._remove_replica(ts, ews)
        if ts.state == "memory" and not ts.who_has:
            if ts.run_spec is None:
                ts.exception = ScatteredDataLost(key)
                ts.traceback = ""
                return self.transitions({key: "erred"}, stimulus_id)
            return self.transitions({key: "waiting"}, stimulus_id)
        if ts.state == "memory" and worker in self.workers:
            return [RefreshWhoHasMsg(stimulus_id, worker, {key: [w.address for w in ts.who_has]})]
        return []

    def add_keys(self, worker: str, keys: Iterable[Key], stimulus_id: str = "add-keys") -> list[Msg]:
        """A worker holds replicas of ``keys`` (fetched as dependencies)."""
        ws = self.workers.get(worker)
        if ws is None:
            return []
        stale = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "memory":
                self._add_replica(ts, ws)
            else:
                stale.append(key)
        return [FreeKeysMsg(stimulus_id, worker, stale)] if stale else []

    def release_worker_data(self, key: Key, worker: str, stimulus_id: str = "release-worker-data") -> list[Msg]:
        """A worker dropped its replica of ``key``."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ts is None or ws is None or ws not in ts.who_has:
            return []
        self._remove_replica(ts, ws)
        if not ts.who_has and ts.state == "memory":
            return self.transitions({key: "released"}, stimulus_id)
        return []

    def handle_long_running(self, key: Key, worker: str, compute_duration: float | None = None,
                            stimulus_id: str = "long-running") -> list[Msg]:
        """A task seceded from its worker's thread pool: it no longer counts as load."""
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ts is None or ws is None or ts.processing_on is not ws:
            return []
        if compute_duration is not None:
            self._record_duration(ts, compute_duration)
        ts.long_running = True
        ws.long_running.add(ts)
        ws.occupancy -= ws.processing[ts]
        ws.processing[ts] = 0.0
        self.placement.check_idle_saturated(ws)
        return self.transitions({}, stimulus_id)

    def reschedule(self, key: Key, worker: str | None = None, stimulus_id: str = "reschedule") -> list[Msg]:
        """Send a processing task back to be placed again (e.g. it raised ``Reschedule``)."""
        ts = self.tasks.get(key)
        if ts is None or ts.state != "processing":
            return []
        if worker is not None and (ts.processing_on is None or ts.processing_on.address != worker):
            return []
        return self.transitions({key: "waiting"}, stimulus_id)

    # ------------------------------------------------------------------ stimuli from clients

    def stimulus_cancel(self, keys: Iterable[Key], client: str, force: bool = False,
                        stimulus_id: str = "cancel") -> list[Msg]:
        """Stop computing ``keys`` for ``client`` (and everything that depends on them)."""
        out: list[Msg] = []
        for key in keys:
            out.extend(self.cancel_key(key, client, force=force, stimulus_id=stimulus_id))
        return out

    def cancel_key(self, key: Key, client: str, force: bool = False, stimulus_id: str = "cancel") -> list[Msg]:
        """Cancel one key and its dependents for ``client``.

        Dependents go first, each before the tasks it depends on.  The walk is
        iterative: a chain of any length cancels (recursion stopped at ~1000).
        """
        ts = self.tasks.get(key)
        cs = self.clients.get(client)
        if ts is None or cs is None:
            return []
        order: list[Key] = []
        seen = {key}
        stack = [(ts, iter(list(ts.dependents)))]
        while stack:
            t, dependents = stack[-1]
            for dts in dependents:
                if dts.key not in seen:
                    seen.add(dts.key)
                    stack.append((dts, iter(list(dts.dependents))))
                    break
            else:
                stack.pop()
                order.append(t.key)
        out: list[Msg] = []
        for k in order:
            out.extend(self._cancel_one(k, cs, force, stimulus_id))
        return out

    def _cancel_one(self, key: Key, cs: ClientState, force: bool, stimulus_id: str) -> list[Msg]:
        """Cancel ``key`` for ``cs``, its dependents having been cancelled already."""
        ts = self.tasks.get(key)
        if ts is None:
            return []
        client = cs.client_key
        out: list[Msg] = []
        if force or ts.who_wants == {cs}:
            wanters = [c.client_key for c in ts.who_wants]
            for c in list(ts.who_wants):
                c.wants_what.discard(ts)
            ts.who_wants.clear()
            for c in wanters:
                out.append(CancelledKeyMsg(stimulus_id, c, key, "cancelled"))
            if not ts.dependents:
                out.extend(self.transitions({key: "forgotten"}, stimulus_id))
            elif not ts.waiters:
                # Kept for other dependents (of other clients) that are done with it.
                out.extend(self.transitions({key: "released"}, stimulus_id))
        elif cs in ts.who_wants:
            out.append(CancelledKeyMsg(stimulus_id, client, key, "cancelled"))
            out.extend(self.client_releases_keys([key], client, stimulus_id))
        return out

    # ------------------------------------------------------------------ data entering from outside

    def update_data(self, who_has: dict[Key, Iterable[str]], nbytes: dict[Key, int] | None = None,
                    client: str | None = None, types: dict[Key, str] | None = None,
                    stimulus_id: str = "update-data") -> list[Msg]:
        """Data was put on workers from outside (``scatter``)."""
        nbytes = nbytes or {}
        types = types or {}
        out: list[Msg] = []
        for key, workers in who_has.items():
            wss = [self.workers[w] for w in workers if w in self.workers]
            if not wss:
                continue
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, None)
                ts.priority = (0, next(self._priority_counter))
            if client is not None:
                # Wanted before it lands, so that landing reports it to the client.
                cs = self.add_client(client)
                ts.who_wants.add(cs)
                cs.wants_what.add(ts)
            if ts.state != "memory":
                if ts.state not in ("released", "waiting"):
                    recs = self.transition(key, "released", stimulus_id)
                    recs.pop(key, None)  # it goes to memory instead
                    out.extend(self.transitions(recs, stimulus_id))
                ts.nbytes = nbytes.get(key, -1)
                ts.type = types.get(key, "")
                recs = self.transition(key, "memory", stimulus_id, workers=wss)
                out.extend(self.transitions(recs, stimulus_id))
            else:
                for ws in wss:
                    self._add_replica(ts, ws)
                if client is not None:
                    out.append(KeyInMemoryMsg(stimulus_id, client, ts.key, ts.type or "",
                                              [w.address for w in ts.who_has]))
        if self.validate:
            validation.validate_state(self)
        return out

