"""Elasticity of the cluster, pure part: which workers to close, how many to want,
and the data moves that retiring, replicating and rebalancing need.

Plain functions over a :class:`~cluster.runtime.scheduler.state.SchedulerState` (no IO).  The IO
shell (:mod:`cluster.runtime.scheduler.ops`) sends the planned messages, waits until
the replicas have landed, and only then removes workers, so that retiring a
worker never loses data.

Graceful retirement: a retiring worker's status becomes
``closing_gracefully``: it takes no new tasks, and every key it holds that no
running worker also holds is copied to the running worker with the least data
(``AcquireReplicasMsg``).  When the copies exist it is removed "safely": the
tasks still running there are placed again without counting against
``allowed_failures``.

Scaling down with held data: an idle worker that holds data (results a
client still holds) is as closable as an empty one -- retiring it moves its
unique data to the workers that stay -- as long as that data fits in what
stays with headroom: the memory limits of the workers left must be at least
``memory_ratio`` (2) times the bytes stored, and at least one worker must be
left to take it.  ``adaptive_target`` asks for fewer workers exactly when
``workers_to_close`` would close some; :func:`adaptive_sizing`
also says how many idle workers were kept only because their data would not
fit (the adaptive log reports it).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..statemachine import Msg
from .records import AcquireReplicasMsg, TaskState, WorkerState

if TYPE_CHECKING:  # pragma: no cover
    from .state import SchedulerState

Key = Hashable

#: Closing workers must leave at least this many times the stored bytes in memory limits.
DEFAULT_MEMORY_RATIO = 2.0


@dataclass(frozen=True, slots=True)
class AdaptiveSizing:
    """How many workers adaptive scaling wants, and why (see :func:`adaptive_sizing`).

    Attributes:
        target: workers wanted (what ``adaptive_target`` returns).
        work: workers the work alone wants (queued and running tasks, memory pressure).
        workers: workers counted (all but the retiring ones).
        busy: workers running tasks.
        kept_for_data: idle workers kept only because the data they would hand
            over does not fit in the workers that would stay (``memory_ratio`` rule).
        stored: bytes held by the workers counted.
        limit: their memory limits, summed (0: no limits known).
        memory_ratio: the headroom rule in force.
    """

    target: int
    work: int
    workers: int
    busy: int
    kept_for_data: int
    stored: int
    limit: int
    memory_ratio: float


# ------------------------------------------------------------------ status

# ------------------------------------------------------------------ choosing workers

def workers_to_close(state: SchedulerState, memory_ratio: float | None = None, n: int | None = None,
                     key: Callable[[WorkerState], Hashable] | None = None,
                     minimum: int | None = None, target: int | None = None,
                     attribute: str = "address") -> list:
    """Workers that are cheap to close: idle ones, least data first.

    An idle worker that holds data is a candidate like any idle worker
    (retiring it moves its unique data to the workers that stay), but only
    while the data fits in what stays: the memory limits left must be at
    least ``memory_ratio`` times the bytes stored, and when any data is
    held at least one worker must stay to take it.  Candidates are taken
    least data first and the first that does not fit ends the list.

    Args:
        memory_ratio: keep this many times the stored bytes in memory limits (default 2;
            0 turns the rule off).
        n: close at most this many workers.
        key: group workers (e.g. by batch job); a group is closed whole or not at all.
        minimum: keep at least this many workers.
        target: close down to this many workers.
        attribute: which attribute of each worker to return.
    """
    workers = [ws for ws in state.workers.values() if ws.status != "closing_gracefully"]
    if target is not None and n is None:
        n = len(workers) - target
    if n is not None and n <= 0:
        return []
    groups: dict[Hashable, list[WorkerState]] = defaultdict(list)
    for ws in workers:
        groups[key(ws) if key is not None else ws.address].append(ws)

    def idle(group: list[WorkerState]) -> bool:
        return all(not ws.processing for ws in group)

    candidates = sorted(
        (g for g in groups.values() if idle(g)),
        key=lambda g: (sum(ws.nbytes for ws in g), len(g)),
    )
    memory_ratio = DEFAULT_MEMORY_RATIO if memory_ratio is None else memory_ratio
    limit = sum(ws.memory_limit for ws in workers)
    stored = sum(ws.nbytes for ws in workers)
    remaining = len(workers)
    chosen: list[WorkerState] = []
    for group in candidates:
        if n is not None and len(chosen) >= n:
            break
        if n is not None and len(chosen) + len(group) > n:
            continue  # a group is closed whole or not at all
        if minimum is not None and remaining - len(group) < minimum:
            break
        if stored and remaining - len(group) < 1:
            break  # the data needs a worker to go to
        group_limit = sum(ws.memory_limit for ws in group)
        if limit and stored and (limit - group_limit) < memory_ratio * stored:
            break
        chosen.extend(group)
        remaining -= len(group)
        limit -= group_limit
    return [getattr(ws, attribute) for ws in chosen]

def adaptive_target(state: SchedulerState, target_duration: float = 5.0, memory_ratio: float | None = None) -> int:
    """How many workers the current work wants (used by adaptive scaling).

    Enough workers to finish the queued and running work in
    ``target_duration`` seconds, at least one per ready task up to the
    number of tasks, and more when memory is more than 60% used.  Below
    the current number only by the workers that ``workers_to_close``
    would close: idle ones, including those that hold data as long as it
    fits in the workers that stay (see :meth:`adaptive_sizing`).
    """
    return adaptive_sizing(state, target_duration, memory_ratio).target

def adaptive_sizing(state: SchedulerState, target_duration: float = 5.0,
                    memory_ratio: float | None = None) -> AdaptiveSizing:
    """:meth:`adaptive_target` with its reasons (for the adaptive log).

    Args:
        target_duration: finish the queued and running work in about this many seconds.
        memory_ratio: the headroom rule of :meth:`workers_to_close` (default 2).
    """
    memory_ratio = DEFAULT_MEMORY_RATIO if memory_ratio is None else memory_ratio
    workers = [ws for ws in state.workers.values() if ws.status != "closing_gracefully"]
    nthreads = max(1, sum(ws.nthreads for ws in workers))
    threads_per_worker = nthreads / max(1, len(workers))
    queued = [ts for _, _, ts in state.queued if ts.state == "queued"]
    work = sum(ws.occupancy for ws in workers)
    work += sum(state.placement.get_task_duration(ts) for ts in queued)
    work += sum(state.placement.get_task_duration(ts) for ts in state.unrunnable)
    cpu = math.ceil(work / max(target_duration, 1e-9) / threads_per_worker)
    ntasks = len(queued) + len(state.unrunnable) + sum(len(ws.processing) for ws in workers)
    cpu = min(cpu, math.ceil(ntasks / threads_per_worker))
    limit = sum(ws.memory_limit for ws in workers)
    stored = sum(ws.nbytes for ws in workers)
    memory = 0
    if limit and stored > 0.6 * limit:
        memory = 2 * len(workers)
    wanted = max(cpu, memory)
    busy = sum(1 for ws in workers if ws.processing)
    target, kept = wanted, 0
    if wanted < len(workers):
        # Drop only the workers that could be closed now (idle, their data
        # fits in what stays), as many as the work allows.
        floor = max(wanted, 1 if ntasks else 0)
        closable = len(workers_to_close(state, memory_ratio=memory_ratio, target=floor))
        target = len(workers) - closable
        if memory_ratio and stored:
            kept = len(workers_to_close(state, memory_ratio=0, target=floor)) - closable
    return AdaptiveSizing(target=target, work=wanted, workers=len(workers), busy=busy,
                          kept_for_data=kept, stored=stored, limit=limit,
                          memory_ratio=memory_ratio)

# ------------------------------------------------------------------ moving data

def running_recipients(state: SchedulerState, exclude: Iterable[WorkerState] = ()) -> list[WorkerState]:
    excluded = set(exclude)
    return sorted((ws for ws in state.workers.values() if ws.status == "running" and ws not in excluded),
                  key=lambda ws: ws.nbytes)

def retire_plan(state: SchedulerState, addresses: Iterable[str], stimulus_id: str = "retire") -> tuple[list[Msg], dict[Key, str]]:
    """Mark workers ``closing_gracefully`` and plan copies of the data only they hold.

    Returns:
        The instructions to send, and ``{key: recipient}`` for every key that
        must land before the workers may go.  If no running worker is left to
        take data that must be kept, the keys map to ``""``: the caller must
        not remove those workers.
    """
    retiring = [state.workers[a] for a in addresses if a in state.workers]
    for ws in retiring:
        ws.status = "closing_gracefully"
        state.placement.check_idle_saturated(ws)
    retiring_set = set(retiring)
    recipients = running_recipients(state, retiring_set)
    load = {ws: ws.nbytes for ws in recipients}
    moves: dict[WorkerState, dict[Key, list[str]]] = defaultdict(dict)
    nbytes: dict[WorkerState, dict[Key, int]] = defaultdict(dict)
    plan: dict[Key, str] = {}
    for ws in retiring:
        for ts in ws.has_what:
            if ts.key in plan or not (ts.who_has <= retiring_set):
                continue
            if not recipients:
                plan[ts.key] = ""
                continue
            target = min(recipients, key=load.__getitem__)
            load[target] += ts.get_nbytes()
            moves[target][ts.key] = [w.address for w in ts.who_has]
            nbytes[target][ts.key] = ts.get_nbytes()
            plan[ts.key] = target.address
    out: list[Msg] = [AcquireReplicasMsg(stimulus_id, ws.address, who_has, nbytes[ws])
                      for ws, who_has in moves.items()]
    out.extend(state.transitions({}, stimulus_id))
    return out, plan

def replicate_plan(state: SchedulerState, keys: Iterable[Key], n: int | None = None, workers: Iterable[str] | None = None,
                   stimulus_id: str = "replicate") -> tuple[list[Msg], dict[str, list[Key]]]:
    """Plan copies so each key is on ``n`` of ``workers`` (all by default), and which extra
    replicas to drop.

    Returns:
        ``(instructions, {worker: [keys to drop]})``.
    """
    pool = [state.workers[w] for w in (workers if workers is not None else state.workers) if w in state.workers]
    if n is not None and n < 1:
        raise ValueError(f"replicate(n={n!r}): n must be at least 1 (replicate never deletes data)")
    pool = [ws for ws in pool if ws.status == "running"]
    n = len(pool) if n is None else min(n, len(pool))
    moves: dict[WorkerState, dict[Key, list[str]]] = defaultdict(dict)
    nbytes: dict[WorkerState, dict[Key, int]] = defaultdict(dict)
    drops: dict[str, list[Key]] = defaultdict(list)
    load = {ws: ws.nbytes for ws in pool}
    for key in keys:
        ts = state.tasks.get(key)
        if ts is None or ts.state != "memory":
            continue
        have = [ws for ws in pool if ws in ts.who_has]
        if len(have) < n:
            lacking = sorted((ws for ws in pool if ws not in ts.who_has), key=load.__getitem__)
            for ws in lacking[: n - len(have)]:
                moves[ws][key] = [w.address for w in ts.who_has]
                nbytes[ws][key] = ts.get_nbytes()
                load[ws] += ts.get_nbytes()
        elif len(have) > n:
            for ws in sorted(have, key=load.__getitem__, reverse=True)[: len(have) - n]:
                drops[ws.address].append(key)
                load[ws] -= ts.get_nbytes()
    out: list[Msg] = [AcquireReplicasMsg(stimulus_id, ws.address, who_has, nbytes[ws])
                      for ws, who_has in moves.items()]
    return out, dict(drops)

def rebalance_plan(state: SchedulerState, keys: Iterable[Key] | None = None, workers: Iterable[str] | None = None,
                   stimulus_id: str = "rebalance") -> tuple[list[Msg], dict[str, list[Key]]]:
    """Plan moves so that each worker holds about the mean number of bytes.

    Senders above the mean give their largest keys to the receivers most
    below it, until each side reaches the mean.

    Returns:
        ``(instructions to copy, {sender: [keys to drop once copied]})``.
    """
    pool = [state.workers[w] for w in (workers if workers is not None else state.workers) if w in state.workers]
    pool = [ws for ws in pool if ws.status == "running"]
    if len(pool) < 2:
        return [], {}
    wanted = None if keys is None else set(keys)
    load = {ws: sum(ts.get_nbytes() for ts in ws.has_what if wanted is None or ts.key in wanted) for ws in pool}
    mean = sum(load.values()) / len(pool)
    senders = sorted((ws for ws in pool if load[ws] > mean), key=load.__getitem__, reverse=True)
    moves: dict[WorkerState, dict[Key, list[str]]] = defaultdict(dict)
    nbytes: dict[WorkerState, dict[Key, int]] = defaultdict(dict)
    drops: dict[str, list[Key]] = defaultdict(list)
    for sender in senders:
        items = sorted((ts for ts in sender.has_what if wanted is None or ts.key in wanted),
                       key=TaskState.get_nbytes, reverse=True)
        for ts in items:
            if load[sender] <= mean:
                break
            size = ts.get_nbytes()
            receivers = [ws for ws in pool if ws not in ts.who_has and load[ws] + size <= mean + 1]
            if not receivers:
                continue
            receiver = min(receivers, key=load.__getitem__)
            moves[receiver][ts.key] = [sender.address]
            nbytes[receiver][ts.key] = size
            drops[sender.address].append(ts.key)
            load[receiver] += size
            load[sender] -= size
    out: list[Msg] = [AcquireReplicasMsg(stimulus_id, ws.address, who_has, nbytes[ws])
                      for ws, who_has in moves.items()]
    return out, dict(drops)

def reevaluate_occupancy(state: SchedulerState, worker_index: int = 0) -> None:
    """Recompute each worker's expected work from the current task durations."""
    for ws in state.workers.values():
        total = 0.0
        for ts in ws.processing:
            d = 0.0 if ts.long_running else state.placement.get_task_duration(ts) + state.placement.get_comm_cost(ts, ws)
            ws.processing[ts] = d
            total += d
        ws.occupancy = total
        state.placement.check_idle_saturated(ws)

