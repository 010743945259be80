"""Invariant checks of the worker's state (``validate=True``).

A plain function over a :class:`~cluster.runtime.worker.state.WorkerStateMachine`,
like :mod:`cluster.runtime.scheduler.validation` for the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidStateError

if TYPE_CHECKING:  # pragma: no cover
    from .state import WorkerStateMachine


def validate_state(state: WorkerStateMachine) -> None:
    """Check the invariants of every task.

    Raises:
        InvalidStateError: naming the task and the broken invariant.
    """
    for ts in state.tasks.values():
        s = ts.state
        if s == "memory" and ts.key not in state.data:
            raise InvalidStateError(f"{ts!r} in memory but not in data")
        if s in ("ready", "constrained", "executing") and any(d.state != "memory" for d in ts.dependencies):
            raise InvalidStateError(f"{ts!r} {s} with a dependency not in memory")
        if s == "executing" and ts not in state.executing:
            raise InvalidStateError(f"{ts!r} executing but not in executing")
        if s == "flight" and ts not in state.in_flight_tasks:
            raise InvalidStateError(f"{ts!r} in flight but not in in_flight_tasks")
        if s == "waiting" and not ts.waiting_for_data and not ts.dependencies:
            raise InvalidStateError(f"{ts!r} waiting for nothing")
        if s != "memory" and ts.key in state.data:
            raise InvalidStateError(f"{ts!r} has data but is {s}")
    for ts in state.executing:
        if ts.state not in ("executing",) and not (ts.state == "cancelled"):
            raise InvalidStateError(f"{ts!r} in executing set")
    if len(state.executing) > state.nthreads:
        raise InvalidStateError(f"{len(state.executing)} tasks executing on {state.nthreads} threads")
