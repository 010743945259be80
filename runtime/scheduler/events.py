"""Typed events for :meth:`SchedulerState.handle` (facts, named ``...Event``).

The one way into the scheduler's state machine: the IO shell builds these
from wire messages and its own decisions, tests feed them directly, and
:data:`cluster.runtime.scheduler.stimuli.HANDLERS` names the handler of each type.

An event that arrives over a stream is also that message's spec, the one
definition of it: :func:`on_stream` names its operation and the field the
scheduler fills with the sender (``worker`` or ``client``), and each field the
peer sends is declared with :func:`wire` and the check it must pass (from
:mod:`cluster.runtime.messages`).  :func:`decode` checks a message against its event's
fields and builds the event; a message with a field the event does not
declare, or of the wrong type, is refused before anything is applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .. import messages as m
from .graph_check import check_graph

Key = Hashable

#: ``{op: event class}``: the messages of a worker's stream to the scheduler.
WORKER_STREAM: dict[str, type[SchedulerEvent]] = {}
#: ``{op: event class}``: the messages of a client's stream to the scheduler.
CLIENT_STREAM: dict[str, type[SchedulerEvent]] = {}


def wire(check: m.Field, default: Any = MISSING) -> Any:
    """A field the peer sends, checked by ``check`` before the event is built."""
    if default is MISSING:
        return field(metadata={"wire": check})
    return field(default=default, metadata={"wire": check})


def on_stream(table: dict[str, type], op: str, peer: str,
              semantic: Callable[[Mapping, Any], None] | None = None) -> Callable[[type], type]:
    """Class decorator: the event is how message ``op`` of a stream enters the state.

    Args:
        table: :data:`WORKER_STREAM` or :data:`CLIENT_STREAM`.
        op: the wire operation.
        peer: the field the scheduler fills with the sender's address or id.
        semantic: a check of a well-typed message against the state (see
            :class:`cluster.runtime.messages.Spec`).
    """

    def register(cls: type) -> type:
        cls.OP, cls.PEER = op, peer
        cls.SPEC = m.Spec(semantic=semantic, **{f.name: f.metadata["wire"]
                                                 for f in fields(cls) if "wire" in f.metadata})
        cls.HAS_STIMULUS = "stimulus_id" in cls.__dataclass_fields__
        cls.HAS_CLOCK = "now" in cls.__dataclass_fields__ and "now" not in cls.SPEC.fields
        table[op] = cls
        return cls

    return register


def decode(cls: type, msg: dict, peer: str, new_stimulus: Callable[[str], str],
           state: Any = None, clock: Callable[[], float] = time.monotonic) -> SchedulerEvent:
    """The event for ``msg`` (without its ``op``) from ``peer``.

    The peer's ``stimulus_id`` is kept, so that ``story()`` follows a task
    across processes; a message without one gets ``new_stimulus(op)``.

    Raises:
        TypeError: a field the event does not declare, or of the wrong type.
        ValueError: the message is well typed but cannot be applied (a cyclic graph).
    """
    cls.SPEC.check(cls.OP, msg, state)
    if cls.HAS_STIMULUS and not msg.get("stimulus_id"):
        msg["stimulus_id"] = new_stimulus(cls.OP)
    msg[cls.PEER] = peer
    if cls.HAS_CLOCK:  # the arrival time, from the scheduler's clock (time is an event's field)
        msg["now"] = clock()
    return cls(**msg)


def _check_graph(msg: Mapping, state: Any) -> None:
    check_graph(state, msg.get("tasks") or {}, msg.get("dependencies") or {})


@dataclass(slots=True)
class SchedulerEvent:
    """Base of the scheduler's events; each has its handler in ``stimuli.HANDLERS``."""


@dataclass(slots=True)
class RemoveClientEvent(SchedulerEvent):
    client: str
    stimulus_id: str = "remove-client"


@on_stream(CLIENT_STREAM, "client_releases_keys", peer="client")
@dataclass(slots=True)
class ClientReleasesKeysEvent(SchedulerEvent):
    """The client dropped its last future for these keys."""

    keys: Iterable[Key] = wire(m.KEYS, ())
    client: str = ""
    stimulus_id: str = "client-releases"


@on_stream(CLIENT_STREAM, "heartbeat_client", peer="client")
@dataclass(slots=True)
class ClientHeartbeatEvent(SchedulerEvent):
    """A client is alive."""

    client: str


@on_stream(WORKER_STREAM, "worker_closing", peer="worker")
@dataclass(slots=True)
class WorkerClosingEvent(SchedulerEvent):
    """A worker says it is closing: remove it without asking it to close."""

    worker: str
    reason: Any = wire(m.ANY, "")
    stimulus_id: str = "worker_closing"


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


@on_stream(WORKER_STREAM, "heartbeat", peer="address")
@dataclass(slots=True)
class HeartbeatEvent(SchedulerEvent):
    """A worker is alive; ``metrics`` is what it measured."""

    address: str
    metrics: dict | None = wire(m.METRICS, None)


@dataclass(slots=True)
class TickEvent(SchedulerEvent):
    """Time passed (a :class:`~cluster.runtime.scheduler_events.TickEvent`): decide what is due."""

    now: float
    stimulus_id: str = "tick"


@on_stream(CLIENT_STREAM, "update_graph", peer="client", semantic=_check_graph)
@dataclass(slots=True)
class UpdateGraphEvent(SchedulerEvent):
    """New work from a client: ``tasks`` maps keys to serialised recipes
    (the client's side of this message: :func:`cluster.runtime.graph.update_graph_msg`)."""

    client: str
    tasks: dict[Key, bytes | None] = wire(m._f(
        m.dict_of(m.is_key, m.is_recipe),
        "a dict of keys to recipes ((function bytes, arguments bytes) pairs)", required=True))
    keys: Iterable[Key] = wire(m.KEYS, ())
    dependencies: dict[Key, Iterable[Key]] | None = wire(m._f(
        m.optional(m.dict_of(m.is_key, m.collection_of(m.is_key))),
        "a dict of keys to lists of keys, or None"), None)
    restrictions: dict[Key, Iterable[str]] | None = wire(m._f(
        m.optional(m.dict_of(m.is_key, m.collection_of(m.is_hashable))),
        "a dict of keys to lists of workers, or None"), None)
    loose_restrictions: Iterable[Key] = wire(m.KEYS, ())
    resources: dict[Key, dict] | None = wire(m._f(
        m.optional(m.dict_of(m.is_key, m.dict_of(m.is_str, m.is_finite))),
        "a dict of keys to {resource name: amount}, or None"), None)
    retries: dict[Key, int] | None = wire(m._f(
        m.optional(m.dict_of(m.is_key, m.is_count)), "a dict of keys to non-negative ints, or None"), None)
    user_priority: int | dict[Key, int] = wire(m._f(
        m.one_of(m.is_finite, m.dict_of(m.is_key, m.is_finite)),
        "a number or a dict of keys to numbers"), 0)
    fifo_timeout: float = wire(m._f(lambda v: m.is_finite(v) and v >= 0,
                                    "a non-negative number of seconds"), 0.0)
    #: Where each graph of a message that carries several begins, as positions in
    #: ``tasks`` (the client merges graphs sent together; each keeps its own order).
    graph_starts: list[int] = wire(m._f(m.collection_of(m.is_count), "a list of non-negative ints"), ())
    stimulus_id: str = wire(m.STIMULUS, "update_graph")
    #: The scheduler's clock (``time.monotonic``) when the message arrived; not on the wire.
    now: float = 0.0


@on_stream(WORKER_STREAM, "task_finished", peer="worker")
@dataclass(slots=True)
class TaskFinishedEvent(SchedulerEvent):
    """A worker computed ``key``; ``data`` is its pickled value if small (forwarded, not kept)."""

    key: Key = wire(m.KEY)
    worker: str
    nbytes: int = wire(m.NBYTES, -1)
    type: str = wire(m.STR, "")
    startstops: Iterable = wire(m.STARTSTOPS, ())
    stimulus_id: str = wire(m.STIMULUS, "task_finished")
    data: bytes | None = wire(m._f(m.optional(m.is_bytes), "bytes or None"), None)


@on_stream(WORKER_STREAM, "task_erred", peer="worker")
@dataclass(slots=True)
class TaskErredEvent(SchedulerEvent):
    """A task raised on a worker; retry it if it has retries left."""

    key: Key = wire(m.KEY)
    worker: str
    exception: Any = wire(m.ANY, None)
    traceback: str | None = wire(m._f(m.optional(m.is_str), "a str or None"), "")
    startstops: Iterable = wire(m.STARTSTOPS, ())
    stimulus_id: str = wire(m.STIMULUS, "task_erred")


@on_stream(WORKER_STREAM, "missing_data", peer="worker")
@dataclass(slots=True)
class MissingDataEvent(SchedulerEvent):
    """A worker could not get ``key`` from ``errant_worker``.  Recover."""

    key: Key = wire(m.KEY)
    errant_worker: str | None = wire(m.OPT_STR, None)
    worker: str | None = None
    stimulus_id: str = wire(m.STIMULUS, "missing_data")


@on_stream(WORKER_STREAM, "add_keys", peer="worker")
@dataclass(slots=True)
class AddKeysEvent(SchedulerEvent):
    """A worker holds replicas of ``keys`` (fetched as dependencies)."""

    worker: str
    keys: Iterable[Key] = wire(m.KEYS, ())
    stimulus_id: str = wire(m.STIMULUS, "add_keys")


@on_stream(WORKER_STREAM, "release_worker_data", peer="worker")
@dataclass(slots=True)
class ReleaseWorkerDataEvent(SchedulerEvent):
    """A worker dropped its replica of ``key``."""

    key: Key = wire(m.KEY)
    worker: str
    stimulus_id: str = wire(m.STIMULUS, "release_worker_data")


@on_stream(WORKER_STREAM, "long_running", peer="worker")
@dataclass(slots=True)
class LongRunningEvent(SchedulerEvent):
    """A task seceded from its worker's thread pool: it no longer counts as load."""

    key: Key = wire(m.KEY)
    worker: str
    compute_duration: float | None = wire(m.OPT_FINITE, None)
    stimulus_id: str = wire(m.STIMULUS, "long-running")


@on_stream(WORKER_STREAM, "reschedule", peer="worker")
@dataclass(slots=True)
class RescheduleEvent(SchedulerEvent):
    """Send a processing task back to be placed again (e.g. it raised ``Reschedule``)."""

    key: Key = wire(m.KEY)
    worker: str | None = None
    stimulus_id: str = wire(m.STIMULUS, "reschedule")


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


@on_stream(WORKER_STREAM, "worker_status_change", peer="address")
@dataclass(slots=True)
class WorkerStatusEvent(SchedulerEvent):
    """``running``, ``paused`` (memory pressure) or ``closing_gracefully``."""

    address: str
    status: str = wire(m._f(lambda v: v in ("running", "paused", "closing_gracefully")
                            if isinstance(v, str) else False,
                            "'running', 'paused' or 'closing_gracefully'", required=True))
    stimulus_id: str = wire(m.STIMULUS, "worker-status")


@dataclass(slots=True)
class RestartEvent(SchedulerEvent):
    """Forget every task (the workers are being restarted); clients hear their keys were cancelled."""

    stimulus_id: str = "restart"
