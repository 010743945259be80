"""Typed events for :meth:`SchedulerState.handle` (facts, named ``...Event``).

Each event names the stimulus method that handles it; the IO shell may build
these from wire messages, and tests feed them directly.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass(slots=True)
class SchedulerEvent:
    handler: ClassVar[str] = ""

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class AddWorkerEvent(SchedulerEvent):
    handler = "add_worker"
    address: str
    nthreads: int = 1
    name: Any = None
    memory_limit: int = 0
    resources: dict | None = None
    host: str = ""
    stimulus_id: str = "add-worker"


@dataclass(slots=True)
class RemoveWorkerEvent(SchedulerEvent):
    handler = "remove_worker"
    address: str
    stimulus_id: str = "remove-worker"
    safe: bool = False


@dataclass(slots=True)
class UpdateGraphEvent(SchedulerEvent):
    handler = "update_graph"
    client: str
    tasks: dict
    keys: list
    dependencies: dict = field(default_factory=dict)
    restrictions: dict = field(default_factory=dict)
    loose_restrictions: list = field(default_factory=list)
    resources: dict = field(default_factory=dict)
    retries: dict = field(default_factory=dict)
    user_priority: Any = 0
    stimulus_id: str = "update-graph"


@dataclass(slots=True)
class TaskFinishedEvent(SchedulerEvent):
    handler = "stimulus_task_finished"
    key: Hashable
    worker: str
    nbytes: int = -1
    type: str = ""
    startstops: list = field(default_factory=list)
    stimulus_id: str = "task-finished"


@dataclass(slots=True)
class TaskErredEvent(SchedulerEvent):
    handler = "stimulus_task_erred"
    key: Hashable
    worker: str
    exception: Any = None
    traceback: str = ""
    startstops: list = field(default_factory=list)
    stimulus_id: str = "task-erred"


@dataclass(slots=True)
class MissingDataEvent(SchedulerEvent):
    handler = "stimulus_missing_data"
    key: Hashable
    errant_worker: str | None = None
    worker: str | None = None
    stimulus_id: str = "missing-data"


@dataclass(slots=True)
class ClientReleasesKeysEvent(SchedulerEvent):
    handler = "client_releases_keys"
    keys: list
    client: str
    stimulus_id: str = "client-releases"


@dataclass(slots=True)
class CancelEvent(SchedulerEvent):
    handler = "stimulus_cancel"
    keys: list
    client: str
    force: bool = False
    stimulus_id: str = "cancel"


@dataclass(slots=True)
class AddKeysEvent(SchedulerEvent):
    handler = "add_keys"
    worker: str
    keys: list
    stimulus_id: str = "add-keys"


@dataclass(slots=True)
class LongRunningEvent(SchedulerEvent):
    handler = "handle_long_running"
    key: Hashable
    worker: str
    compute_duration: float | None = None
    stimulus_id: str = "long-running"


@dataclass(slots=True)
class RescheduleEvent(SchedulerEvent):
    handler = "reschedule"
    key: Hashable
    worker: str | None = None
    stimulus_id: str = "reschedule"


@dataclass(slots=True)
class UpdateDataEvent(SchedulerEvent):
    handler = "update_data"
    who_has: dict
    nbytes: dict = field(default_factory=dict)
    client: str | None = None
    stimulus_id: str = "update-data"


@dataclass(slots=True)
class TickEvent(SchedulerEvent):
    """Time passed: ``now`` on the scheduler's monotonic clock.  Worker TTL, idle
    timeout and the periodic load re-estimate are decided from it."""

    handler = "tick"
    now: float
    stimulus_id: str = "tick"
