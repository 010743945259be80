"""Stimuli of the scheduler's state machine: what clients, workers and time tell it.

One handler function per event type of :mod:`cluster.runtime.scheduler.events`
(:data:`HANDLERS`); :meth:`SchedulerState.handle` dispatches to them.  Each
turns its event into recommendations, runs them through the transition table
(``state.transitions``) and returns the resulting instructions.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import KilledWorker, ScatteredDataLost
from ..statemachine import Msg
from . import elastic, validation
from .events import (
    AddKeysEvent,
    AddWorkerEvent,
    CancelEvent,
    CancelKeyEvent,
    ClientHeartbeatEvent,
    ClientReleasesKeysEvent,
    HeartbeatEvent,
    LongRunningEvent,
    MissingDataEvent,
    ReleaseWorkerDataEvent,
    RemoveClientEvent,
    RemoveWorkerEvent,
    RescheduleEvent,
    RestartEvent,
    TaskErredEvent,
    TaskFinishedEvent,
    TickEvent,
    UpdateDataEvent,
    UpdateGraphEvent,
    WorkerClosingEvent,
    WorkerStatusEvent,
)
from .graph_check import check_graph  # noqa: F401  (part of update_graph's contract)
from .records import (
    CancelledKeyMsg,
    ClientState,
    CloseScheduler,
    FreeKeysMsg,
    KeyInMemoryMsg,
    RefreshWhoHasMsg,
    RemoveReplicasMsg,
    RemoveWorker,
    TaskErredClientMsg,
    TaskState,
    WorkerState,
)
from .records import lazy_add as _add
from .records import members as _members
from .records import one_add as _one_add
from .records import one_discard as _one_discard

#: Seconds between re-estimates of the workers' expected load (see ``tick``).
REEVALUATE_OCCUPANCY_INTERVAL = 5.0

Key = Hashable

if TYPE_CHECKING:  # pragma: no cover
    from .state import SchedulerState


def add_client(state: SchedulerState, client: str) -> ClientState:
    cs = state.clients.get(client)
    if cs is None:
        cs = state.clients[client] = ClientState(client)
    cs.last_seen = state.clock()
    return cs


def remove_client(state: SchedulerState, ev: RemoveClientEvent) -> list[Msg]:
    client, stimulus_id = ev.client, ev.stimulus_id
    cs = state.clients.get(client)
    if cs is None:
        return []
    out = client_releases_keys(state, ClientReleasesKeysEvent([ts.key for ts in cs.wants_what], client, stimulus_id))
    del state.clients[client]
    return out


def client_releases_keys(state: SchedulerState, ev: ClientReleasesKeysEvent) -> list[Msg]:
    """The client dropped its last future for these keys."""
    keys, client, stimulus_id = ev.keys, ev.client, ev.stimulus_id
    cs = state.clients.get(client)
    if cs is None:
        return []
    recs: dict[Key, str] = {}
    for key in keys:
        ts = state.tasks.get(key)
        if ts is None or not _one_discard(ts, "_who_wants", cs):
            continue
        cs.wants_what.discard(ts)
        if not ts._who_wants:
            if not ts._dependents:
                recs[key] = "forgotten"
            elif not ts._waiters and ts.state in ("memory", "erred"):
                recs[key] = "released"
    return state.transitions(recs, stimulus_id)


def add_worker(state: SchedulerState, ev: AddWorkerEvent) -> list[Msg]:
    """A worker joined.  Tasks that had no worker get another chance.

    Raises:
        ValueError: the address or name is already taken.
    """
    address, nthreads, name, memory_limit, resources, host, pid, nanny, local_directory, services, keys, stimulus_id = (
        ev.address, ev.nthreads, ev.name, ev.memory_limit, ev.resources, ev.host, ev.pid, ev.nanny,
        ev.local_directory, ev.services, ev.keys, ev.stimulus_id)
    check_new_worker(state, address, name)
    ws = WorkerState(address, nthreads, name, memory_limit, resources, host, pid, nanny,
                     local_directory, services)
    ws.last_seen = state.clock()
    state.workers[address] = ws
    state.aliases[ws.name] = address
    state.total_nthreads += nthreads
    hi = state.host_info.setdefault(host, {"addresses": set(), "nthreads": 0})
    hi["addresses"].add(address)
    hi["nthreads"] += nthreads
    state.placement.check_idle_saturated(ws)
    recs: dict[Key, str] = {}
    for key in keys:  # data the worker brings along (a reconnect)
        ts = state.tasks.get(key)
        if ts is not None and ts.state == "memory":
            state._add_replica(ts, ws)
    for ts in list(state.unrunnable):
        valid = state.placement.valid_workers(ts)
        if valid is None or ws in valid or (ts.loose_restrictions and not valid):
            recs[ts.key] = "processing"
    return state.transitions(recs, stimulus_id)


def remove_worker(state: SchedulerState, ev: RemoveWorkerEvent) -> list[Msg]:
    """A worker left or died.

    Tasks it was running are rescheduled (after ``allowed_failures``
    deaths during one task, the task fails with :class:`KilledWorker`);
    results only it held are recomputed from their recipe.
    """
    address, stimulus_id, safe = ev.address, ev.stimulus_id, ev.safe
    ws = state.workers.pop(address, None)
    if ws is None:
        return []
    if state.aliases.get(ws.name) == address:
        del state.aliases[ws.name]
    state.total_nthreads -= ws.nthreads
    hi = state.host_info.get(ws.host)
    if hi is not None:
        hi["addresses"].discard(address)
        hi["nthreads"] -= ws.nthreads
        if not hi["addresses"]:
            del state.host_info[ws.host]
    state.placement.forget_worker(ws)
    recs: dict[Key, str] = {}
    killed: dict[Key, str] = {}
    for ts in list(ws.processing):
        if not safe:
            ts.suspicious += 1
            _add(ts, "_erred_on", address)
        if ts.suspicious > state.allowed_failures:
            ts.exception = KilledWorker(ts.key, address, state.allowed_failures)
            ts.traceback = ""
            killed[ts.key] = "erred"
        else:
            recs[ts.key] = "released"  # and from there back to waiting
    for ts in list(ws.has_what):
        state._remove_replica(ts, ws)
        if not ts._who_has:
            if ts.run_spec is not None:
                recs[ts.key] = "released"
            else:
                ts.exception = ScatteredDataLost(ts.key)
                ts.traceback = ""
                recs[ts.key] = "erred"
    # One pass, so that the state is checked only once all the worker's tasks have
    # moved; the killers go in last because recommendations are taken last in,
    # first out: they fail first, and no later recommendation revives them.
    return state.transitions({**recs, **killed}, stimulus_id)


def check_new_worker(state: SchedulerState, address: str, name: Any = None) -> None:
    """Raise ValueError if a worker with this address or name is already registered."""
    if address in state.workers:
        raise ValueError(f"worker {address} is already registered")
    if name is not None and name in state.aliases and state.aliases[name] != address:
        raise ValueError(f"a worker named {name!r} is already registered at {state.aliases[name]}")


def heartbeat(state: SchedulerState, ev: HeartbeatEvent) -> list:
    """A worker is alive (and, with ``metrics``, how it does); unknown workers are ignored."""
    ws = state.workers.get(ev.address)
    if ws is not None:
        ws.last_seen = state.clock()
        if ev.metrics:
            ws.metrics = ev.metrics
    return []


def client_heartbeat(state: SchedulerState, ev: ClientHeartbeatEvent) -> list:
    """A client is alive; unknown clients are ignored."""
    cs = state.clients.get(ev.client)
    if cs is not None:
        cs.last_seen = state.clock()
    return []


def worker_closing(state: SchedulerState, ev: WorkerClosingEvent) -> list:
    """A worker says it is closing: the shell removes it, without asking it to close."""
    if ev.worker not in state.workers:
        return []
    return [RemoveWorker(ev.stimulus_id, ev.worker, f"is closing ({ev.reason})", safe=True, close=False)]


def tick(state: SchedulerState, ev: TickEvent) -> list:
    """Time passed (a :class:`~cluster.runtime.scheduler_events.TickEvent`): decide what is due.

    * every :data:`REEVALUATE_OCCUPANCY_INTERVAL` the workers' expected load
      is re-estimated from the task durations learned since (and workers
      that gained room are filled);
    * a worker not heard from for ``worker_ttl`` is to be removed
      (:class:`RemoveWorker`; the shell also closes its stream);
    * after ``idle_timeout`` with no task queued, waiting for a worker or
      running, the scheduler is to close (:class:`CloseScheduler`).
    """
    now, stimulus_id = ev.now, ev.stimulus_id
    out: list = []
    last = state._last_reevaluation
    if last is None:
        state._last_reevaluation = now
    elif now - last > REEVALUATE_OCCUPANCY_INTERVAL:
        # Task durations drift as they are learned; re-align the workers'
        # expected load now and then rather than per task.
        state._last_reevaluation = now
        elastic.reevaluate_occupancy(state)
        out.extend(state.transitions({}, stimulus_id))
    if state.worker_ttl:
        for ws in state.workers.values():
            silent = now - ws.last_seen
            if silent > state.worker_ttl:
                out.append(RemoveWorker(stimulus_id, ws.address,
                                        f"missed its heartbeat for {silent:.1f}s"))
    if state.idle_timeout:
        busy = (state._new_work or state.unrunnable
                or any(ws.processing for ws in state.workers.values())
                or any(ts.state == "queued" for _, _, ts in state.queued))
        state._new_work = False
        if busy or state.last_activity is None:
            state.last_activity = now
        elif now - state.last_activity > state.idle_timeout:
            out.append(CloseScheduler(stimulus_id, f"idle for {now - state.last_activity:.0f}s"))
    return out


def _generation(state: SchedulerState, now: float, fifo_timeout: float) -> int:
    """The generation of a graph arriving at ``now``: the current one if it began
    at most ``fifo_timeout`` seconds ago, else a new, later one (dask's rule)."""
    if state._generation_time is None or now - state._generation_time > fifo_timeout:
        state.generation += 1
        state._generation_time = now
    return state.generation


def update_graph(state: SchedulerState, ev: UpdateGraphEvent) -> list[Msg]:
    """New work from a client: ``tasks`` maps keys to serialised recipes.

    ``keys`` are the keys the client holds futures for.  Recipes arrive as
    bytes and are forwarded to workers untouched.  A key already known
    keeps its state (so resubmitting the same pure task costs nothing).
    The graph must be acyclic (:meth:`check_graph`).
    """
    client, tasks, keys, dependencies, restrictions, loose_restrictions, resources, retries, user_priority, stimulus_id = ev.client, ev.tasks, ev.keys, ev.dependencies, ev.restrictions, ev.loose_restrictions, ev.resources, ev.retries, ev.user_priority, ev.stimulus_id
    cs = add_client(state, client)
    state._new_work = True
    dependencies = dependencies or {}
    keys = list(keys)
    tasks = _needed(state, tasks, keys, dependencies)
    restrictions = restrictions or {}
    resources = resources or {}
    retries = retries or {}
    loose = set(loose_restrictions)
    new: list[TaskState] = []
    out: list[Msg] = []
    recs: dict[Key, str] = {}
    unknown: dict[Key, str] = {}
    starts = list(ev.graph_starts) or [0]
    graph_order: list[int] = []  # per new task: its position within its own graph
    start_i = 0
    for pos, (key, spec) in enumerate(tasks.items()):
        ts = state.tasks.get(key)
        if ts is None:
            ts = state.tasks[key] = TaskState(key, spec)
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
        else:
            continue
        while start_i + 1 < len(starts) and starts[start_i + 1] <= pos:
            start_i += 1
        graph_order.append(pos - starts[start_i])
    generation = _generation(state, ev.now, ev.fifo_timeout) if new else state.generation
    for ts, order in zip(new, graph_order, strict=True):
        for dep_key in dependencies.get(ts.key, ()):
            dts = state.tasks.get(dep_key)
            if dts is None:
                # Unknown: a placeholder that fails through the table (released -> erred),
                # before the new tasks wait on it, so they fail with its error.
                dts = state.tasks[dep_key] = TaskState(dep_key, None)
                dts.exception = KeyError(f"dependency {dep_key!r} is not known to the scheduler")
                dts.exception_blame = dts
                unknown[dep_key] = "erred"
            _add(ts, "_dependencies", dts)
            _add(dts, "_dependents", ts)
        r = restrictions.get(ts.key)
        if r:
            _set_restrictions(state, ts, r)
            ts.loose_restrictions = ts.key in loose
        res = resources.get(ts.key)
        if res:
            ts.resource_restrictions = dict(res)
        ts.retries = int(retries.get(ts.key, 0))
        up = user_priority.get(ts.key, 0) if isinstance(user_priority, dict) else user_priority
        ts.priority = (-up, generation, order, next(state._priority_counter))
    state.placement.mark_rootish(new)
    if unknown:
        out.extend(state.transitions(unknown, stimulus_id))
    for key in keys:
        ts = state.tasks.get(key)
        if ts is None:
            continue
        _one_add(ts, "_who_wants", cs)
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
    out.extend(state.transitions(recs, stimulus_id))
    return out


def _needed(state: SchedulerState, tasks: dict[Key, Any], keys: Iterable[Key],
            dependencies: dict[Key, Iterable[Key]]) -> dict[Key, Any]:
    """``tasks`` without those that neither the client wants (``keys``) nor a wanted
    task needs: nothing would ever release them (our client sends none; a
    broken peer might)."""
    needed: set = set()
    stack = [k for k in keys if k in tasks]
    for k in tasks:
        ts = state.tasks.get(k)
        if ts is not None and (ts._dependents or ts._who_wants):
            stack.append(k)
    while stack:
        k = stack.pop()
        if k not in needed:
            needed.add(k)
            stack.extend(d for d in dependencies.get(k, ()) if d in tasks and d not in needed)
    if len(needed) == len(tasks):
        return tasks
    return {k: v for k, v in tasks.items() if k in needed}


def _set_restrictions(state: SchedulerState, ts: TaskState, restrictions: Iterable[str]) -> None:
    workers: set[str] = set()
    hosts: set[str] = set()
    for r in restrictions:
        if r in state.workers or "://" in str(r):
            workers.add(r)
        elif r in state.aliases:
            workers.add(state.aliases[r])
        else:
            hosts.add(r)
    ts.worker_restrictions = workers or None
    ts.host_restrictions = hosts or None


def task_finished(state: SchedulerState, ev: TaskFinishedEvent) -> list[Msg]:
    """A worker computed ``key``; ``data`` is its pickled value if small (forwarded, not kept)."""
    key, worker, nbytes, type, startstops, stimulus_id, data = ev.key, ev.worker, ev.nbytes, ev.type, ev.startstops, ev.stimulus_id, ev.data
    ts = state.tasks.get(key)
    ws = state.workers.get(worker)
    if ws is None:
        return []
    if ts is None or ts.state != "processing" or ts.processing_on is not ws:
        if ts is not None and ts.state == "memory":
            # A duplicate result (e.g. after a reschedule): keep the replica.
            state._add_replica(ts, ws)
            return []
        return [FreeKeysMsg(stimulus_id, worker, [key])]
    for action, start, stop in startstops:
        if action == "compute":
            _record_duration(state, ts, stop - start)
    recs = state.transition(key, "memory", stimulus_id, worker=ws, nbytes=nbytes, type=type, data=data)
    return state.transitions(recs, stimulus_id)


def _record_duration(state: SchedulerState, ts: TaskState, duration: float) -> None:
    old = state.task_duration.get(ts.prefix)
    state.task_duration[ts.prefix] = duration if old is None else 0.5 * old + 0.5 * duration


def task_erred(state: SchedulerState, ev: TaskErredEvent) -> list[Msg]:
    """A task raised on a worker; retry it if it has retries left."""
    key, worker, exception, traceback, stimulus_id = ev.key, ev.worker, ev.exception, ev.traceback, ev.stimulus_id
    ts = state.tasks.get(key)
    ws = state.workers.get(worker)
    if ts is None or ws is None or ts.state != "processing" or ts.processing_on is not ws:
        return []
    if ts.retries > 0:
        ts.retries -= 1
        return state.transitions({key: "waiting"}, stimulus_id)
    ts.exception = exception
    ts.traceback = traceback
    _add(ts, "_erred_on", worker)
    return state.transitions({key: "erred"}, stimulus_id)


def missing_data(state: SchedulerState, ev: MissingDataEvent) -> list[Msg]:
    """A worker could not get ``key`` from ``errant_worker``.  Recover."""
    key, errant_worker, worker, stimulus_id = ev.key, ev.errant_worker, ev.worker, ev.stimulus_id
    ts = state.tasks.get(key)
    if ts is None:
        return []
    ews = state.workers.get(errant_worker) if errant_worker else None
    out: list[Msg] = []
    if ews is not None and ews in ts.who_has:
        state._remove_replica(ts, ews)
        # The errant worker is alive (the failure may have been the network's): it must
        # drop the copy we stop counting, or it would keep it for ever.
        out.append(RemoveReplicasMsg(stimulus_id, ews.address, [key]))
    if ts.state == "memory" and not ts.who_has:
        if ts.run_spec is None:
            ts.exception = ScatteredDataLost(key)
            ts.traceback = ""
            return out + state.transitions({key: "erred"}, stimulus_id)
        return out + state.transitions({key: "waiting"}, stimulus_id)
    if ts.state == "memory" and worker in state.workers:
        out.append(RefreshWhoHasMsg(stimulus_id, worker, {key: [w.address for w in ts.who_has]}))
    return out


def add_keys(state: SchedulerState, ev: AddKeysEvent) -> list[Msg]:
    """A worker holds replicas of ``keys`` (fetched as dependencies)."""
    worker, keys, stimulus_id = ev.worker, ev.keys, ev.stimulus_id
    ws = state.workers.get(worker)
    if ws is None:
        return []
    stale = []
    for key in keys:
        ts = state.tasks.get(key)
        if ts is not None and ts.state == "memory":
            state._add_replica(ts, ws)
        elif ts is not None and ts.processing_on is ws:
            # The key is being computed again on this very worker (its other holder
            # died while this message was on the wire): the worker answers that
            # compute-task with the copy it holds; freeing it here would leave us
            # counting a replica the worker no longer has.
            continue
        else:
            stale.append(key)
    return [FreeKeysMsg(stimulus_id, worker, stale)] if stale else []


def release_worker_data(state: SchedulerState, ev: ReleaseWorkerDataEvent) -> list[Msg]:
    """A worker dropped its replica of ``key``."""
    key, worker, stimulus_id = ev.key, ev.worker, ev.stimulus_id
    ts = state.tasks.get(key)
    ws = state.workers.get(worker)
    if ts is None or ws is None or ws not in ts.who_has:
        return []
    state._remove_replica(ts, ws)
    if not ts.who_has and ts.state == "memory":
        return state.transitions({key: "released"}, stimulus_id)
    return []


def long_running(state: SchedulerState, ev: LongRunningEvent) -> list[Msg]:
    """A task seceded from its worker's thread pool: it no longer counts as load."""
    key, worker, compute_duration, stimulus_id = ev.key, ev.worker, ev.compute_duration, ev.stimulus_id
    ts = state.tasks.get(key)
    ws = state.workers.get(worker)
    if ts is None or ws is None or ts.processing_on is not ws:
        return []
    if compute_duration is not None:
        _record_duration(state, ts, compute_duration)
    ts.long_running = True
    ws.long_running.add(ts)
    ws.occupancy -= ws.processing[ts]
    ws.processing[ts] = 0.0
    state.placement.check_idle_saturated(ws)
    return state.transitions({}, stimulus_id)


def reschedule(state: SchedulerState, ev: RescheduleEvent) -> list[Msg]:
    """Send a processing task back to be placed again (e.g. it raised ``Reschedule``)."""
    key, worker, stimulus_id = ev.key, ev.worker, ev.stimulus_id
    ts = state.tasks.get(key)
    if ts is None or ts.state != "processing":
        return []
    if worker is not None and (ts.processing_on is None or ts.processing_on.address != worker):
        return []
    return state.transitions({key: "waiting"}, stimulus_id)


def cancel(state: SchedulerState, ev: CancelEvent) -> list[Msg]:
    """Stop computing ``keys`` for ``client`` (and everything that depends on them)."""
    keys, client, force, stimulus_id = ev.keys, ev.client, ev.force, ev.stimulus_id
    out: list[Msg] = []
    for key in keys:
        out.extend(cancel_key(state, CancelKeyEvent(key, client, force=force, stimulus_id=stimulus_id)))
    return out


def cancel_key(state: SchedulerState, ev: CancelKeyEvent) -> list[Msg]:
    """Cancel one key and its dependents for ``client``.

    Dependents go first, each before the tasks it depends on.  The walk is
    iterative: a chain of any length cancels (recursion stopped at ~1000).
    """
    key, client, force, stimulus_id = ev.key, ev.client, ev.force, ev.stimulus_id
    ts = state.tasks.get(key)
    cs = state.clients.get(client)
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
        out.extend(_cancel_one(state, k, cs, force, stimulus_id))
    return out


def _cancel_one(state: SchedulerState, key: Key, cs: ClientState, force: bool, stimulus_id: str) -> list[Msg]:
    """Cancel ``key`` for ``cs``, its dependents having been cancelled already."""
    ts = state.tasks.get(key)
    if ts is None:
        return []
    client = cs.client_key
    out: list[Msg] = []
    wanted = ts._who_wants
    if force or wanted is cs or (type(wanted) is set and wanted == {cs}):
        wanters = [c.client_key for c in _members(ts._who_wants)]
        for c in list(_members(ts._who_wants)):
            c.wants_what.discard(ts)
        ts._who_wants = None
        for c in wanters:
            out.append(CancelledKeyMsg(stimulus_id, c, key, "cancelled"))
        if not ts._dependents:
            out.extend(state.transitions({key: "forgotten"}, stimulus_id))
        elif not ts._waiters:
            # Kept for other dependents (of other clients) that are done with it.
            out.extend(state.transitions({key: "released"}, stimulus_id))
    elif cs in ts.who_wants:
        out.append(CancelledKeyMsg(stimulus_id, client, key, "cancelled"))
        out.extend(client_releases_keys(state, ClientReleasesKeysEvent([key], client, stimulus_id)))
    return out


def update_data(state: SchedulerState, ev: UpdateDataEvent) -> list[Msg]:
    """Data was put on workers from outside (``scatter``)."""
    who_has, nbytes, client, types, stimulus_id = ev.who_has, ev.nbytes, ev.client, ev.types, ev.stimulus_id
    nbytes = nbytes or {}
    types = types or {}
    out: list[Msg] = []
    for key, workers in who_has.items():
        wss = [state.workers[w] for w in workers if w in state.workers]
        if not wss:
            continue
        ts = state.tasks.get(key)
        if ts is None:
            ts = state.tasks[key] = TaskState(key, None)
            ts.priority = (0, state.generation, 0, next(state._priority_counter))
        if client is not None:
            # Wanted before it lands, so that landing reports it to the client.
            cs = add_client(state, client)
            _one_add(ts, "_who_wants", cs)
            cs.wants_what.add(ts)
        if ts.state != "memory":
            if ts.state not in ("released", "waiting"):
                recs = state.transition(key, "released", stimulus_id)
                recs.pop(key, None)  # it goes to memory instead
                out.extend(state.transitions(recs, stimulus_id))
            ts.nbytes = nbytes.get(key, -1)
            ts.type = types.get(key, "")
            recs = state.transition(key, "memory", stimulus_id, workers=wss)
            out.extend(state.transitions(recs, stimulus_id))
        else:
            for ws in wss:
                state._add_replica(ts, ws)
            if client is not None:
                out.append(KeyInMemoryMsg(stimulus_id, client, ts.key, ts.type or "",
                                          [w.address for w in ts.who_has]))
    if state.validate:
        validation.validate_state(state)
    return out


def worker_status(state: SchedulerState, ev: WorkerStatusEvent) -> list[Msg]:
    """``running``, ``paused`` (memory pressure) or ``closing_gracefully``.

    Raises:
        ValueError: for another status, naming the accepted ones.
    """
    address, status, stimulus_id = ev.address, ev.status, ev.stimulus_id
    if status not in ("running", "paused", "closing_gracefully"):
        raise ValueError(f"status={status!r}: accepted values are 'running', 'paused', 'closing_gracefully'")
    ws = state.workers.get(address)
    if ws is None or ws.status == status:
        return []
    if ws.status == "closing_gracefully" and status == "paused":
        return []  # retiring wins over pausing
    ws.status = status
    state.placement.check_idle_saturated(ws)
    recs: dict[Key, str] = {}
    if status == "running":
        # Back in service: tasks that had nowhere to run may run here now.
        for ts in list(state.unrunnable):
            valid = state.placement.valid_workers(ts)
            if valid is None or ws in valid or (ts.loose_restrictions and not valid):
                recs[ts.key] = "processing"
    return state.transitions(recs, stimulus_id)  # and the queue fills it


def restart(state: SchedulerState, ev: RestartEvent) -> list[Msg]:
    """Forget every task (the workers are being restarted); clients hear their keys were cancelled.

    Through the transition table like any other change, so ``story()`` shows it:
    no client wants anything any more, and every task is recommended
    ``forgotten``, dependents before their dependencies.
    """
    stimulus_id = ev.stimulus_id
    out: list[Msg] = []
    for ts in state.tasks.values():
        for cs in _members(ts._who_wants):
            out.append(CancelledKeyMsg(stimulus_id, cs.client_key, ts.key, "restart"))
            cs.wants_what.discard(ts)
        ts._who_wants = None
    # Recommendations are taken last in, first out: dependencies go in first.
    recs: dict[Key, str] = {}
    stack = [(ts, False) for ts in state.tasks.values()]
    while stack:
        ts, expanded = stack.pop()
        if ts.key in recs:
            continue
        if expanded:
            recs[ts.key] = "forgotten"
        else:
            stack.append((ts, True))
            stack.extend((dts, False) for dts in ts._dependencies or () if dts.key not in recs)
    out.extend(state.transitions(recs, stimulus_id))
    # The queue drops the entries of tasks that left it lazily; none is left to wait for.
    state.queued[:] = [entry for entry in state.queued if entry[2].state == "queued"]
    return out


#: The handler of each event type (see :meth:`SchedulerState.handle`).
HANDLERS: dict[type, Callable[[SchedulerState, Any], list]] = {
    RemoveClientEvent: remove_client,
    ClientReleasesKeysEvent: client_releases_keys,
    AddWorkerEvent: add_worker,
    RemoveWorkerEvent: remove_worker,
    HeartbeatEvent: heartbeat,
    ClientHeartbeatEvent: client_heartbeat,
    WorkerClosingEvent: worker_closing,
    TickEvent: tick,
    UpdateGraphEvent: update_graph,
    TaskFinishedEvent: task_finished,
    TaskErredEvent: task_erred,
    MissingDataEvent: missing_data,
    AddKeysEvent: add_keys,
    ReleaseWorkerDataEvent: release_worker_data,
    LongRunningEvent: long_running,
    RescheduleEvent: reschedule,
    CancelEvent: cancel,
    CancelKeyEvent: cancel_key,
    UpdateDataEvent: update_data,
    WorkerStatusEvent: worker_status,
    RestartEvent: restart,
}
