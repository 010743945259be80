"""Events and instructions of the worker's state machine.

Events are facts the IO shell reports (``...Event``); instructions are what the
state machine asks it to do (``Execute``, ``GatherDep``) or to send to the
scheduler (``...Msg``).

A message of the scheduler's stream that the state takes is the event it
becomes: :func:`from_scheduler` names its operation, the event's fields are
the message's (the scheduler's ``...Msg`` of the same operation sends exactly
those), and :func:`decode` builds it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..statemachine import Instruction, Msg

Key = Hashable


# ----------------------------------------------------------------------------- events

#: ``{op: event class}``: the scheduler's stream messages that are events of the state.
FROM_SCHEDULER: dict[str, type[StateMachineEvent]] = {}


def from_scheduler(op: str):
    """Class decorator: the event is how the scheduler's message ``op`` enters the state."""

    def register(cls: type) -> type:
        cls.OP = op
        FROM_SCHEDULER[op] = cls
        return cls

    return register


def decode(op: str, msg: dict) -> StateMachineEvent:
    """The event for the scheduler's message ``op`` (``msg`` without its ``op``).

    Raises:
        KeyError: ``op`` is not an event of the state.
        TypeError: a field the event does not have, or one it needs is missing.
    """
    cls = FROM_SCHEDULER[op]
    if not msg.get("stimulus_id"):
        msg["stimulus_id"] = op
    return cls(**msg)


@dataclass(slots=True)
class StateMachineEvent:
    handler: ClassVar[str] = ""
    stimulus_id: str


@from_scheduler("compute_task")
@dataclass(slots=True)
class ComputeTaskEvent(StateMachineEvent):
    handler = "_handle_compute_task"
    key: Key
    run_spec: bytes | None
    priority: tuple = ()
    who_has: dict = field(default_factory=dict)
    nbytes: dict = field(default_factory=dict)
    duration: float = 0.5
    resource_restrictions: dict | None = None
    report: bool = False

    def __post_init__(self) -> None:
        # As sent: a list (pickled tuples stay tuples, but be lenient) and None for empty.
        if type(self.priority) is not tuple:
            self.priority = tuple(self.priority)
        if self.who_has is None:
            self.who_has = {}
        if self.nbytes is None:
            self.nbytes = {}


@from_scheduler("free_keys")
@dataclass(slots=True)
class FreeKeysEvent(StateMachineEvent):
    handler = "_handle_free_keys"
    keys: list


@dataclass(slots=True)
class ExecuteSuccessEvent(StateMachineEvent):
    handler = "_handle_execute_success"
    key: Key
    value: Any
    start: float
    stop: float
    nbytes: int
    type: str


@dataclass(slots=True)
class ExecuteFailureEvent(StateMachineEvent):
    handler = "_handle_execute_failure"
    key: Key
    exception: Any
    traceback: str
    start: float
    stop: float


@dataclass(slots=True)
class RescheduleEvent(StateMachineEvent):
    handler = "_handle_reschedule"
    key: Key


@dataclass(slots=True)
class SecedeEvent(StateMachineEvent):
    handler = "_handle_secede"
    key: Key
    compute_duration: float


@dataclass(slots=True)
class GatherDepSuccessEvent(StateMachineEvent):
    handler = "_handle_gather_dep_success"
    worker: str
    data: dict
    nbytes: dict


@dataclass(slots=True)
class GatherDepNetworkFailureEvent(StateMachineEvent):
    handler = "_handle_gather_dep_network_failure"
    worker: str
    keys: list


@dataclass(slots=True)
class GatherDepFailureEvent(StateMachineEvent):
    """The peer answered, but the data could not be used (e.g. unpickling failed)."""

    handler = "_handle_gather_dep_failure"
    worker: str
    keys: list
    exception: Any
    traceback: str


@dataclass(slots=True)
class UpdateDataEvent(StateMachineEvent):
    handler = "_handle_update_data"
    data: dict
    nbytes: dict


@from_scheduler("refresh_who_has")
@dataclass(slots=True)
class RefreshWhoHasEvent(StateMachineEvent):
    handler = "_handle_refresh_who_has"
    who_has: dict


@dataclass(slots=True)
class PauseEvent(StateMachineEvent):
    """Memory is short: start no new tasks."""

    handler = "_handle_pause"


@dataclass(slots=True)
class UnpauseEvent(StateMachineEvent):
    handler = "_handle_unpause"


@from_scheduler("remove_replicas")
@dataclass(slots=True)
class RemoveReplicasEvent(StateMachineEvent):
    """The scheduler asks us to drop replicas it has elsewhere (rebalance, replicate)."""

    handler = "_handle_remove_replicas"
    keys: list


@from_scheduler("acquire_replicas")
@dataclass(slots=True)
class AcquireReplicasEvent(StateMachineEvent):
    handler = "_handle_acquire_replicas"
    who_has: dict
    nbytes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nbytes is None:
            self.nbytes = {}


# ----------------------------------------------------------------------------- instructions


@dataclass(slots=True)
class Execute(Instruction):
    key: Key


@dataclass(slots=True)
class GatherDep(Instruction):
    worker: str
    keys: set
    total_nbytes: int


@dataclass(slots=True)
class TaskFinishedMsg(Msg):
    op = "task_finished"
    key: Key
    nbytes: int
    type: str
    startstops: list


@dataclass(slots=True)
class TaskErredMsg(Msg):
    op = "task_erred"
    key: Key
    exception: Any
    traceback: str
    startstops: list


@dataclass(slots=True)
class AddKeysMsg(Msg):
    op = "add_keys"
    keys: list


@dataclass(slots=True)
class ReleaseWorkerDataMsg(Msg):
    """We dropped our replica of ``key``."""

    op = "release_worker_data"
    key: Key


@dataclass(slots=True)
class MissingDataMsg(Msg):
    op = "missing_data"
    key: Key
    errant_worker: str | None


@dataclass(slots=True)
class RescheduleMsg(Msg):
    op = "reschedule"
    key: Key


@dataclass(slots=True)
class LongRunningMsg(Msg):
    op = "long_running"
    key: Key
    compute_duration: float
