"""Invariant checks of the scheduler's state (``validate=True``).

Plain functions over a :class:`~cluster.runtime.scheduler.state.SchedulerState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidStateError
from .records import TaskState, members, one_has

if TYPE_CHECKING:  # pragma: no cover
    from .state import SchedulerState


# ------------------------------------------------------------------ validation

def validate_task(state: SchedulerState, ts: TaskState) -> None:
    """Check the invariants of one task's state.

    Raises:
        InvalidStateError: naming the task and the broken invariant.
    """
    # The slots, not the public names: those make a view per read (see records._View),
    # and this runs for every task after every transition in the tests.
    s = ts.state
    if s not in _STATES:
        _fail(state, ts, f"unknown state {s}")
    if state.tasks.get(ts.key) is not ts:
        _fail(state, ts, "not in tasks")
    if s != "processing" and ts.processing_on is not None:
        _fail(state, ts, "processing_on set outside processing")
    who_has = ts._who_has
    if s != "memory" and who_has:
        _fail(state, ts, "who_has set outside memory")
    waiting_on = ts._waiting_on or ()
    deps = ts._dependencies or ()
    if s == "waiting":
        if not all(d in deps for d in waiting_on):
            _fail(state, ts, "waiting_on not a subset of dependencies")
        if any(d.state == "memory" for d in waiting_on):
            _fail(state, ts, "waiting on data in memory")
    elif s in ("queued", "processing", "no-worker"):
        if waiting_on:
            _fail(state, ts, f"{s} with unmet dependencies")
        if not all(d.state == "memory" for d in deps):
            _fail(state, ts, f"{s} with a dependency not in memory")
        if s == "processing":
            ws = ts.processing_on
            if ws is None or ts not in ws.processing:
                _fail(state, ts, "not in its worker's processing")
            if ws is None or ws.address not in state.workers:
                _fail(state, ts, "processing on an unknown worker")
        elif s == "no-worker" and ts not in state.unrunnable:
            _fail(state, ts, "no-worker but not in unrunnable")
    elif s == "memory":
        if not who_has:
            _fail(state, ts, "in memory nowhere")
        if not all(ts in ws.has_what for ws in members(who_has)):
            _fail(state, ts, "who_has/has_what disagree")
    elif s == "erred" and ts.exception_blame is None:
        _fail(state, ts, "erred without blame")
    for cs in members(ts._who_wants):
        if ts not in cs.wants_what:
            _fail(state, ts, "who_wants/wants_what disagree")


_STATES = frozenset({"released", "waiting", "queued", "no-worker", "processing", "memory", "erred"})


def _fail(state: SchedulerState, ts: TaskState, what: str) -> None:
    raise InvalidStateError(f"{ts!r}: {what}; story={state.story(ts.key)[-5:]}")


def validate_state(state: SchedulerState) -> None:
    """Check every task, worker and client.

    Raises:
        InvalidStateError: naming what is broken.
    """
    for ts in state.tasks.values():
        validate_task(state, ts)
    for ws in state.workers.values():
        for ts in ws.processing:
            if ts.processing_on is not ws or ts.state != "processing":
                raise InvalidStateError(f"{ws!r} lists {ts!r} as processing")
        for ts in ws.has_what:
            if not one_has(ts._who_has, ws):
                raise InvalidStateError(f"{ws!r} lists {ts!r} in memory")
        occ = sum(ws.processing.values())
        if abs(occ - ws.occupancy) > 1e-6 * max(1.0, occ):
            raise InvalidStateError(f"{ws!r} occupancy {ws.occupancy} != {occ}")
    for ws in state.workers.values():
        # Placement.fill_workers trusts this to skip a full scan when every worker is busy.
        full = ws.status == "running" and not state.placement.has_room(ws)
        if (ws in state.saturated) != full:
            raise InvalidStateError(f"{ws!r} {'not ' if full else ''}in saturated "
                                    f"(status {ws.status}, {len(ws.processing)} processing)")
    for ws in state.saturated:
        if state.workers.get(ws.address) is not ws:
            raise InvalidStateError(f"{ws!r} in saturated but not a worker")
    for ts in state.unrunnable:
        if ts.state != "no-worker":
            raise InvalidStateError(f"{ts!r} in unrunnable")
    nthreads = sum(ws.nthreads for ws in state.workers.values())
    if nthreads != state.total_nthreads:
        raise InvalidStateError(f"total_nthreads {state.total_nthreads} != {nthreads}")
