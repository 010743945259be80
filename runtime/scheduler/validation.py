"""Invariant checks of the scheduler's state (``validate=True``).

Plain functions over a :class:`~runtime.scheduler.state.SchedulerState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidStateError
from .records import TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .state import SchedulerState


# ------------------------------------------------------------------ validation

def validate_task(state: SchedulerState, ts: TaskState) -> None:
    """Check the invariants of one task's state.

    Raises:
        InvalidStateError: naming the task and the broken invariant.
    """
    def check(cond: bool, what: str) -> None:
        if not cond:
            raise InvalidStateError(f"{ts!r}: {what}; story={state.story(ts.key)[-5:]}")

    s = ts.state
    check(s in {"released", "waiting", "queued", "no-worker", "processing", "memory", "erred"},
          f"unknown state {s}")
    check(state.tasks.get(ts.key) is ts, "not in tasks")
    if s != "processing":
        check(ts.processing_on is None, "processing_on set outside processing")
    if s != "memory":
        check(not ts.who_has, "who_has set outside memory")
    if s == "waiting":
        check(ts.waiting_on <= ts.dependencies, "waiting_on not a subset of dependencies")
        check(all(d.state != "memory" for d in ts.waiting_on), "waiting on data in memory")
    if s in ("queued", "processing", "no-worker"):
        check(not ts.waiting_on, f"{s} with unmet dependencies")
        check(all(d.state == "memory" for d in ts.dependencies), f"{s} with a dependency not in memory")
    if s == "processing":
        ws = ts.processing_on
        check(ws is not None and ts in ws.processing, "not in its worker's processing")
        check(ws is not None and ws.address in state.workers, "processing on an unknown worker")
    if s == "memory":
        check(bool(ts.who_has), "in memory nowhere")
        check(all(ts in ws.has_what for ws in ts.who_has), "who_has/has_what disagree")
    if s == "no-worker":
        check(ts in state.unrunnable, "no-worker but not in unrunnable")
    if s == "erred":
        check(ts.exception_blame is not None, "erred without blame")
    for cs in ts.who_wants:
        check(ts in cs.wants_what, "who_wants/wants_what disagree")

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
            if ws not in ts.who_has:
                raise InvalidStateError(f"{ws!r} lists {ts!r} in memory")
        occ = sum(ws.processing.values())
        if abs(occ - ws.occupancy) > 1e-6 * max(1.0, occ):
            raise InvalidStateError(f"{ws!r} occupancy {ws.occupancy} != {occ}")
    for ts in state.unrunnable:
        if ts.state != "no-worker":
            raise InvalidStateError(f"{ts!r} in unrunnable")
    nthreads = sum(ws.nthreads for ws in state.workers.values())
    if nthreads != state.total_nthreads:
        raise InvalidStateError(f"total_nthreads {state.total_nthreads} != {nthreads}")
