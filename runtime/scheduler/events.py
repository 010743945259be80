"""Typed events for :meth:`SchedulerState.handle` (facts, named ``...Event``).

The one way into the scheduler's state machine: the IO shell builds these
from wire messages and its own decisions, tests feed them directly, and
:data:`runtime.scheduler.stimuli.HANDLERS` names the handler of each type.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

Key = Hashable


@dataclass(slots=True)
class SchedulerEvent:
    """Base of the scheduler's events; each has its handler in ``stimuli.HANDLERS``."""


@dataclass(slots=True)
class RemoveClientEvent(SchedulerEvent):
    client: str
    stimulus_id: str = "remove-client"


@dataclass(slots=True)
class ClientReleasesKeysEvent(SchedulerEvent):
    """The client dropped its last future for these keys."""

    keys: Iterable[Key]
    client: str
    stimulus_id: str = "client-releases"


@dataclass(slots=True)
class AddWorkerEvent(SchedulerEvent):
    """A worker joined.  Tasks that had no worker get another chance."""

    address: str
    nthreads: int = 1
    name: Any = None
    memory_limit: int = 0
    resources: dict | None = None
    host: str = ""
    pid: int = 0
    nanny: str | None = None
    local_directory: str = ""
    services: dict | None = None
    keys: Iterable[Key] = ()
    nbytes: dict | None = None
    stimulus_id: str = "add-worker"


@dataclass(slots=True)
class RemoveWorkerEvent(SchedulerEvent):
    """A worker left or died."""

    address: str
    stimulus_id: str = "remove-worker"
    safe: bool = False


@dataclass(slots=True)
class HeartbeatEvent(SchedulerEvent):
    address: str
    metrics: dict | None = None


@dataclass(slots=True)
class TickEvent(SchedulerEvent):
    """Time passed (a :class:`~runtime.scheduler_events.TickEvent`): decide what is due."""

    now: float
    stimulus_id: str = "tick"


@dataclass(slots=True)
class UpdateGraphEvent(SchedulerEvent):
    """New work from a client: ``tasks`` maps keys to serialised recipes."""

    client: str
    tasks: dict[Key, bytes | None]
    keys: Iterable[Key]
    dependencies: dict[Key, Iterable[Key]] | None = None
    restrictions: dict[Key, Iterable[str]] | None = None
    loose_restrictions: Iterable[Key] = ()
    resources: dict[Key, dict] | None = None
    retries: dict[Key, int] | None = None
    user_priority: int | dict[Key, int] = 0
    stimulus_id: str = "update-graph"


@dataclass(slots=True)
class TaskFinishedEvent(SchedulerEvent):
    """A worker computed ``key``; ``data`` is its pickled value if small (forwarded, not kept)."""

    key: Key
    worker: str
    nbytes: int = -1
    type: str = ""
    startstops: Iterable = ()
    stimulus_id: str = "task-finished"
    data: bytes | None = None


@dataclass(slots=True)
class TaskErredEvent(SchedulerEvent):
    """A task raised on a worker; retry it if it has retries left."""

    key: Key
    worker: str
    exception: Any = None
    traceback: str = ""
    startstops: Iterable = ()
    stimulus_id: str = "task-erred"


@dataclass(slots=True)
class MissingDataEvent(SchedulerEvent):
    """A worker could not get ``key`` from ``errant_worker``.  Recover."""

    key: Key
    errant_worker: str | None = None
    worker: str | None = None
    stimulus_id: str = "missing-data"


@dataclass(slots=True)
class AddKeysEvent(SchedulerEvent):
    """A worker holds replicas of ``keys`` (fetched as dependencies)."""

    worker: str
    keys: Iterable[Key]
    stimulus_id: str = "add-keys"


@dataclass(slots=True)
class ReleaseWorkerDataEvent(SchedulerEvent):
    """A worker dropped its replica of ``key``."""

    key: Key
    worker: str
    stimulus_id: str = "release-worker-data"


@dataclass(slots=True)
class LongRunningEvent(SchedulerEvent):
    """A task seceded from its worker's thread pool: it no longer counts as load."""

    key: Key
    worker: str
    compute_duration: float | None = None
    stimulus_id: str = "long-running"


@dataclass(slots=True)
class RescheduleEvent(SchedulerEvent):
    """Send a processing task back to be placed again (e.g. it raised ``Reschedule``)."""

    key: Key
    worker: str | None = None
    stimulus_id: str = "reschedule"


@dataclass(slots=True)
class CancelEvent(SchedulerEvent):
    """Stop computing ``keys`` for ``client`` (and everything that depends on them)."""

    keys: Iterable[Key]
    client: str
    force: bool = False
    stimulus_id: str = "cancel"


@dataclass(slots=True)
class CancelKeyEvent(SchedulerEvent):
    """Cancel one key and its dependents for ``client``."""

    key: Key
    client: str
    force: bool = False
    stimulus_id: str = "cancel"


@dataclass(slots=True)
class UpdateDataEvent(SchedulerEvent):
    """Data was put on workers from outside (``scatter``)."""

    who_has: dict[Key, Iterable[str]]
    nbytes: dict[Key, int] | None = None
    client: str | None = None
    types: dict[Key, str] | None = None
    stimulus_id: str = "update-data"


@dataclass(slots=True)
class WorkerStatusEvent(SchedulerEvent):
    """``running``, ``paused`` (memory pressure) or ``closing_gracefully``."""

    address: str
    status: str
    stimulus_id: str = "worker-status"


@dataclass(slots=True)
class RestartEvent(SchedulerEvent):
    """Forget every task (the workers are being restarted); clients hear their keys were cancelled."""

    stimulus_id: str = "restart"
