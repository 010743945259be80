"""Invariant checks of the worker's state (``validate=True``).

A mixin of :class:`runtime.worker_state.WorkerState`, like
:mod:`runtime.scheduler.validation` for the scheduler.
"""

from __future__ import annotations

from .errors import InvalidStateError


class WorkerValidationMixin:
    """``validate_state`` for :class:`WorkerState`."""

    # ------------------------------------------------------------------ validation

    def validate_state(self) -> None:
        """Check the invariants of every task.

        Raises:
            InvalidStateError: naming the task and the broken invariant.
        """
        for ts in self.tasks.values():
            s = ts.state
            if s == "memory" and ts.key not in self.data:
                raise InvalidStateError(f"{ts!r} in memory but not in data")
            if s in ("ready", "constrained", "executing") and any(d.state != "memory" for d in ts.dependencies):
                raise InvalidStateError(f"{ts!r} {s} with a dependency not in memory")
            if s == "executing" and ts not in self.executing:
                raise InvalidStateError(f"{ts!r} executing but not in executing")
            if s == "flight" and ts not in self.in_flight_tasks:
                raise InvalidStateError(f"{ts!r} in flight but not in in_flight_tasks")
            if s == "waiting" and not ts.waiting_for_data and not ts.dependencies:
                raise InvalidStateError(f"{ts!r} waiting for nothing")
            if s != "memory" and ts.key in self.data:
                raise InvalidStateError(f"{ts!r} has data but is {s}")
        for ts in self.executing:
            if ts.state not in ("executing",) and not (ts.state == "cancelled"):
                raise InvalidStateError(f"{ts!r} in executing set")
        if len(self.executing) > self.nthreads:
            raise InvalidStateError(f"{len(self.executing)} tasks executing on {self.nthreads} threads")
