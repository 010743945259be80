"""An in-memory cluster: one :class:`SchedulerState` wired to several
:class:`WorkerStateMachine` s, with no sockets, threads or event loop.

How messages are routed
-----------------------
Everything in flight sits in one FIFO queue of ``(source, destination, item)``;
:meth:`Cluster.run_until_idle` pops and delivers until it is empty, so a
scenario is deterministic and per-stream order is kept, as on a TCP stream.

* Scheduler instructions with ``route == "worker"`` go through ``to_wire()``
  and become the worker's events as ``runtime/worker/server.py`` builds them
  (``compute_task`` -> :class:`ComputeTaskEvent`, ``free_keys`` ->
  :class:`FreeKeysEvent`, ``refresh_who_has``, ``acquire_replicas``).
  ``route == "client"`` messages are appended to :attr:`Cluster.reports`.
  :class:`RemoveWorker` (worker TTL) removes the worker as the shell does;
  :class:`CloseScheduler` sets :attr:`Cluster.closed`.
* Worker ``...Msg`` instructions become scheduler events as
  ``runtime/scheduler/server.py`` builds them (``task_finished`` ->
  :class:`TaskFinishedEvent`, with the small result attached when a client
  asked for it, ``task_erred``, ``add_keys``, ``missing_data``...).  The
  worker's ``stimulus_id`` is kept, so stories join across machines.
* ``Execute`` is queued as ``"execute"``: when delivered the task's function
  (given per key at submission) is called on the dependency values from the
  worker's ``data`` and an ``ExecuteSuccessEvent`` / ``ExecuteFailureEvent``
  (or ``RescheduleEvent``) goes back to that worker.  A key in
  :attr:`Cluster.blocked` stays executing ("a long task") until unblocked.
* ``GatherDep`` is queued as ``"gather"``: when delivered the values are read
  from the peer's ``data`` (missing keys left out, like ``get_data``) and a
  ``GatherDepSuccessEvent`` is returned, or ``GatherDepNetworkFailureEvent``
  when the peer is gone.

Stimuli from outside are methods: ``add_worker``, ``submit``/``update_graph``,
``release``, ``cancel``, ``remove_client``, ``scatter``, ``kill_worker`` (its streams
break), ``reconnect`` (the stream breaks and the worker registers again with its
data), ``pause``, ``secede``, ``retire`` / ``replicate`` / ``rebalance`` (run as
``runtime/scheduler/ops.py`` runs the plans of ``elastic``), ``hang`` and ``advance``.
Faults: a key in :attr:`Cluster.blocked` keeps executing; transfers from a worker
in :attr:`Cluster.unreachable` fail as on a broken network.  Observed:
:attr:`Cluster.reports` (to clients), :attr:`Cluster.calls` / :attr:`Cluster.order`
(executions), :attr:`Cluster.gather_log` (transfers started).

Time is a fake clock shared by both machines; :meth:`Cluster.advance` moves it,
makes the live (not :meth:`hung <Cluster.hang>`) workers heartbeat and
delivers a :class:`TickEvent`.  Both machines run with ``validate=True`` and,
when idle, :meth:`Cluster.check` compares the scheduler's view with the workers'.
"""

from __future__ import annotations

import traceback
from collections import Counter, deque
from collections.abc import Hashable, Iterable
from typing import Any

from cluster.runtime.execution import Reschedule, sizeof
from cluster.runtime.scheduler import elastic
from cluster.runtime.scheduler import events as sev
from cluster.runtime.scheduler.records import CloseScheduler, RemoveWorker
from cluster.runtime.scheduler.state import SchedulerState
from cluster.runtime.statemachine import Msg
from cluster.runtime.worker import events as wev
from cluster.runtime.worker.server import SMALL_RESULT, pickle_small
from cluster.runtime.worker.state import WorkerStateMachine

Key = Hashable
SCHEDULER = "scheduler"

def to_worker(wire: dict) -> Any:
    """The worker event a scheduler's message becomes, decoded exactly as the worker's
    server decodes it (:func:`cluster.runtime.worker.events.decode`)."""
    op = wire.pop("op")
    return wev.decode(op, wire)


def to_scheduler(worker: str, wire: dict) -> sev.SchedulerEvent:
    """The scheduler event a worker's message becomes, decoded (and checked) exactly as
    the scheduler's server decodes it (:func:`cluster.runtime.scheduler.events.decode`)."""
    op = wire.pop("op")
    return sev.decode(sev.WORKER_STREAM[op], wire, worker, lambda op: f"{op}-harness")


class Cluster:
    """One scheduler state and its worker states, wired together in memory.

    Args:
        allowed_failures / worker_ttl / idle_timeout: passed to :class:`SchedulerState`.
        check: compare scheduler and workers (:meth:`check`) whenever idle.
    """

    def __init__(self, allowed_failures: int = 3, worker_ttl: float | None = None,
                 idle_timeout: float | None = None, check: bool = True):
        self.now = 1000.0
        self.scheduler = SchedulerState(validate=True, allowed_failures=allowed_failures,
                                        clock=self.clock, worker_ttl=worker_ttl,
                                        idle_timeout=idle_timeout)
        self.workers: dict[str, WorkerStateMachine] = {}
        self.queue: deque[tuple[str, str, Any]] = deque()
        self.functions: dict[Key, tuple[Any, tuple]] = {}
        #: Keys whose execution does not finish until removed from this set.
        self.blocked: set[Key] = set()
        self.parked: list[tuple[str, str, Any]] = []
        #: Workers alive but silent (no heartbeats; see :meth:`hang`).
        self.hung: set[str] = set()
        #: Every message sent to a client, in order.
        self.reports: list[Msg] = []
        #: How many times each key was executed (anywhere).
        self.calls: Counter = Counter()
        #: Every execution's key, in the order the executions finished.
        self.order: list[Key] = []
        #: Workers whose transfers to peers fail as if the network broke (the worker lives
        #: on, and the scheduler still hears from it).
        self.unreachable: set[str] = set()
        #: Every transfer started: ``("gather", fetching worker, GatherDep)``.
        self.gather_log: list[tuple[str, str, Any]] = []
        self.closed: str | None = None
        self.counter = 0
        #: Seconds each execution reports in its startstops (the clock does not move).
        self.task_duration = 1.0
        self.do_check = check

    def sid(self, name: str) -> str:
        """A fresh stimulus_id, as the scheduler shell makes them."""
        self.counter += 1
        return f"{name}-{self.counter}"

    def clock(self) -> float:
        """The fake time of both machines."""
        return self.now

    @staticmethod
    def address(name: str) -> str:
        return f"sim://{name}"

    def worker(self, name: str) -> WorkerStateMachine:
        return self.workers[self.address(name)]

    # ------------------------------------------------------------------ stimuli from outside

    def add_worker(self, name: str, nthreads: int = 1, **kwargs: Any) -> WorkerStateMachine:
        """Start a worker and register it (``resources=...`` etc. go to both sides)."""
        addr = self.address(name)
        ws = WorkerStateMachine(addr, nthreads, resources=kwargs.get("resources"),
                                validate=True, clock=self.clock)
        self.workers[addr] = ws
        self._to_scheduler(sev.AddWorkerEvent(addr, nthreads, name=name, host=name,
                                              stimulus_id=f"add-worker-{name}", **kwargs))
        return ws

    def submit(self, key: Key, func: Any, *deps: Key, client: str = "client", **kwargs: Any) -> None:
        """One task: ``func(*values of deps)`` (or ``func`` itself if not callable)."""
        self.update_graph({key: (func, *deps)}, keys=[key], client=client, **kwargs)

    def update_graph(self, tasks: dict[Key, tuple], keys: Iterable[Key] | None = None,
                     client: str = "client", **kwargs: Any) -> None:
        """``tasks`` maps key -> ``(func, *dependency keys)``; ``keys``: what the client wants
        (default: all); ``kwargs`` (retries, restrictions...) go to :class:`UpdateGraphEvent`."""
        for key, (func, *deps) in tasks.items():
            self.functions[key] = (func, tuple(deps))
        kwargs.setdefault("now", self.now)
        self._to_scheduler(sev.UpdateGraphEvent(
            client, {k: repr(k).encode() for k in tasks}, list(tasks if keys is None else keys),
            dependencies={k: list(t[1:]) for k, t in tasks.items()},
            stimulus_id=self.sid("update_graph"), **kwargs))

    def release(self, *keys: Key, client: str = "client") -> None:
        """The client dropped its futures."""
        self._to_scheduler(sev.ClientReleasesKeysEvent(list(keys), client, self.sid("client_releases_keys")))

    def cancel(self, *keys: Key, client: str = "client", force: bool = False) -> None:
        self._to_scheduler(sev.CancelEvent(list(keys), client, force, self.sid("cancel")))

    def remove_client(self, client: str = "client") -> None:
        """The client closed (or its connection broke)."""
        self._to_scheduler(sev.RemoveClientEvent(client, self.sid("remove-client")))

    def scatter(self, data: dict[Key, Any], *names: str, client: str = "client") -> None:
        """``Client.scatter``: the values go round robin to ``names`` (default: every
        worker), then the scheduler is told who has them (``update-data``)."""
        addrs = [self.address(n) for n in names] or list(self.workers)
        who_has: dict[Key, list[str]] = {}
        for i, (key, value) in enumerate(data.items()):
            addr = addrs[i % len(addrs)]
            self._route_worker(addr, self.workers[addr].handle(
                wev.UpdateDataEvent(self.sid("update-data"), {key: value}, {key: sizeof(value)})))
            who_has[key] = [addr]
        self._to_scheduler(sev.UpdateDataEvent(who_has, {k: sizeof(v) for k, v in data.items()},
                                               client, stimulus_id=self.sid("scatter")))

    def secede(self, key: Key) -> None:
        """The running task ``key`` calls ``secede()``: it leaves the thread pool."""
        for addr, ws in self.workers.items():
            if key in ws.tasks and ws.tasks[key].state == "executing":
                self._route_worker(addr, ws.handle(wev.SecedeEvent(f"secede-{key}", key, 0.5)))
                return
        raise KeyError(f"{key!r} is executing nowhere")

    def reconnect(self, name: str) -> None:
        """The worker's stream breaks and it registers again with the data it holds
        (``reconnect=True``): messages in flight on the old stream are lost."""
        addr = self.address(name)
        ws = self.workers[addr]
        self.queue = deque(e for e in self.queue if SCHEDULER not in (e[0], e[1]) or addr not in (e[0], e[1]))
        self._route_scheduler(self.scheduler.handle(sev.RemoveWorkerEvent(addr, self.sid("worker-stream-closed"))))
        memory = {k: ts.nbytes for k, ts in ws.tasks.items() if ts.state == "memory"}
        self._to_scheduler(sev.AddWorkerEvent(addr, ws.nthreads, name=name, host=name, keys=list(memory),
                                              nbytes=memory, resources=ws.total_resources or None,
                                              stimulus_id=self.sid("add-worker")))

    def replicate(self, keys: Iterable[Key], n: int | None = None) -> None:
        """``Client.replicate`` as ``runtime/scheduler/ops.py`` runs it: copy, wait, drop extras."""
        instrs, drops = elastic.replicate_plan(self.scheduler, list(keys), n, None, self.sid("replicate"))
        self._copy_then_drop(instrs, drops)

    def rebalance(self, keys: Iterable[Key] | None = None) -> None:
        """``Client.rebalance``: copy towards the mean, wait, drop the senders' copies."""
        instrs, drops = elastic.rebalance_plan(self.scheduler, keys, None, self.sid("rebalance"))
        self._copy_then_drop(instrs, drops)

    def _copy_then_drop(self, instrs: list, drops: dict[str, list[Key]]) -> None:
        self._route_scheduler(instrs)
        self.run_until_idle()
        for addr, keys in drops.items():
            if addr in self.workers:
                self.queue.append((SCHEDULER, addr, wev.RemoveReplicasEvent(self.sid("remove_replicas"), keys)))
        self.run_until_idle()

    def kill_worker(self, name: str) -> None:
        """The worker dies: its streams break (queued messages from/to it are lost)."""
        addr = self.address(name)
        self._drop(addr)
        self._route_scheduler(self.scheduler.handle(sev.RemoveWorkerEvent(addr, self.sid("worker-stream-closed"))))

    def _drop(self, addr: str) -> None:
        """Forget a worker's machine and everything in flight from or to it."""
        self.workers.pop(addr, None)
        self.queue = deque(e for e in self.queue if addr not in (e[0], e[1]))
        self.parked = [e for e in self.parked if e[1] != addr]

    def pause(self, name: str, paused: bool = True) -> None:
        """Memory pressure: the worker pauses itself and tells the scheduler (``worker_status_change``)."""
        addr = self.address(name)
        event = wev.PauseEvent("pause") if paused else wev.UnpauseEvent("unpause")
        self._route_worker(addr, self.workers[addr].handle(event))
        self.queue.append((addr, SCHEDULER, sev.WorkerStatusEvent(
            addr, "paused" if paused else "running", self.sid("worker_status_change"))))

    def retire(self, name: str) -> bool:
        """Retire gracefully as ``Scheduler.retire_workers`` does: copy the unique data away,
        wait for it to land, then remove the worker safely.  ``False``: refused."""
        addr, sid = self.address(name), self.sid("retire-workers")
        instrs, plan = elastic.retire_plan(self.scheduler, [addr], sid)
        self._route_scheduler(instrs)
        if any(r == "" for r in plan.values()):
            self._to_scheduler(sev.WorkerStatusEvent(addr, "running", sid))
            self.run_until_idle()
            return False
        for _ in range(6):
            self.run_until_idle()
            instrs, more = elastic.retire_plan(self.scheduler, [addr], sid)
            self._route_scheduler(instrs)
            if not more:
                break
        self.run_until_idle()
        self._drop(addr)
        self._route_scheduler(self.scheduler.handle(sev.RemoveWorkerEvent(addr, sid, safe=True)))
        return True

    def hang(self, name: str) -> None:
        """The worker stops heartbeating (but its state stays)."""
        self.hung.add(self.address(name))

    def advance(self, seconds: float) -> None:
        """Time passes: live workers heartbeat, then the scheduler ticks."""
        self.now += seconds
        for addr in self.workers:
            if addr not in self.hung:
                self.scheduler.handle(sev.HeartbeatEvent(addr, {}))
        self._to_scheduler(sev.TickEvent(self.now, self.sid("tick")))

    def unblock(self, *keys: Key) -> None:
        """Let blocked executions finish."""
        self.blocked.difference_update(keys)
        self.queue.extend(e for e in self.parked if e[2][0] in keys)
        self.parked = [e for e in self.parked if e[2][0] not in keys]

    # ------------------------------------------------------------------ routing

    def _to_scheduler(self, event: Any) -> None:
        self._route_scheduler(self.scheduler.handle(event))

    def _route_scheduler(self, instructions: list) -> None:
        for inst in instructions:
            if isinstance(inst, RemoveWorker):
                self._drop(inst.worker)
                self._route_scheduler(self.scheduler.handle(
                    sev.RemoveWorkerEvent(inst.worker, inst.stimulus_id)))
            elif isinstance(inst, CloseScheduler):
                self.closed = inst.reason
            elif inst.route == "client":
                self.reports.append(inst)
            else:
                wire = inst.to_wire()
                self.queue.append((SCHEDULER, inst.worker, to_worker(wire)))

    def _route_worker(self, addr: str, instructions: list) -> None:
        ws = self.workers[addr]
        for inst in instructions:
            if isinstance(inst, wev.Execute):
                # Like the shell's thread pool: the inputs are taken when the task starts.
                args = tuple(ws.data[d] for d in self.functions[inst.key][1])
                self.queue.append(("execute", addr, (inst.key, args)))
            elif isinstance(inst, wev.GatherDep):
                self.queue.append(("gather", addr, inst))
                self.gather_log.append(("gather", addr, inst))
            else:
                wire = inst.to_wire()
                ts = ws.tasks.get(inst.key) if isinstance(inst, wev.TaskFinishedMsg) else None
                if ts is not None and ts.report and 0 <= ts.nbytes <= SMALL_RESULT:
                    wire["data"] = pickle_small(ws.data.get(inst.key))
                self.queue.append((addr, SCHEDULER, to_scheduler(addr, wire)))

    def _execute(self, key: Key, args: tuple) -> Any:
        func, sid = self.functions[key][0], f"execute-{key}"  # the shell's stimulus_id
        self.calls[key] += 1
        self.order.append(key)
        try:
            value = func(*args) if callable(func) else func
        except Reschedule:
            return wev.RescheduleEvent(f"reschedule-{key}", key)
        except Exception as e:
            return wev.ExecuteFailureEvent(sid, key, e, "".join(traceback.format_exception(e)),
                                           self.now, self.now + self.task_duration)
        return wev.ExecuteSuccessEvent(sid, key, value, self.now, self.now + self.task_duration, sizeof(value),
                                       type(value).__qualname__)

    def _gather(self, inst: wev.GatherDep) -> Any:
        peer = self.workers.get(inst.worker)
        if peer is None or inst.worker in self.unreachable:
            return wev.GatherDepNetworkFailureEvent(inst.stimulus_id, inst.worker, list(inst.keys))
        data = {k: peer.data[k] for k in inst.keys if k in peer.data}
        nbytes = {k: peer.tasks[k].nbytes if k in peer.tasks else -1 for k in data}
        return wev.GatherDepSuccessEvent(inst.stimulus_id, inst.worker, data, nbytes)

    def step(self) -> bool:
        """Deliver one queued item; ``False`` when nothing is left."""
        if not self.queue:
            return False
        src, dst, item = entry = self.queue.popleft()
        if dst == SCHEDULER:
            self._to_scheduler(item)
        elif dst not in self.workers:
            pass  # its stream is closed
        elif src == "execute":
            if item[0] in self.blocked:
                self.parked.append(entry)
            else:
                self._route_worker(dst, self.workers[dst].handle(self._execute(*item)))
        elif src == "gather":
            self._route_worker(dst, self.workers[dst].handle(self._gather(item)))
        else:
            self._route_worker(dst, self.workers[dst].handle(item))
        return True

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Deliver everything (blocked executions stay parked), then :meth:`check`."""
        for _ in range(max_steps):
            if not self.step():
                if self.do_check:
                    self.check()
                return
        raise RuntimeError(f"not idle after {max_steps} steps")

    # ------------------------------------------------------------------ observing

    def check(self) -> None:
        """At rest, the scheduler's view matches the workers': every replica it counts is
        in that worker's memory and every value a worker holds is counted."""
        sched = self.scheduler
        for key, ts in sched.tasks.items():
            for ws in ts.who_has:
                w = self.workers[ws.address]
                assert key in w.data and w.tasks[key].state == "memory", (key, ws, w.tasks.get(key))
            if ts.state == "processing":
                wts = self.workers[ts.processing_on.address].tasks.get(key)
                assert wts is not None and wts.state not in ("memory", "error", "released"), (key, wts)
        for addr, w in self.workers.items():
            for key in w.data:
                ts = sched.tasks.get(key)
                assert ts is not None and addr in {ws.address for ws in ts.who_has}, (addr, key, ts)

    def result(self, key: Key) -> Any:
        """The value of ``key``, read from a worker that holds it (as ``gather`` does)."""
        ws = next(iter(self.scheduler.tasks[key].who_has))
        return self.workers[ws.address].data[key]

    def reports_of(self, cls: type, client: str = "client") -> list:
        return [m for m in self.reports if isinstance(m, cls) and m.client == client]

    def state(self, key: Key) -> str:
        ts = self.scheduler.tasks.get(key)
        return "forgotten" if ts is None else ts.state
