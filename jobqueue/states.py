"""One vocabulary for job states, whatever the batch system.

Each batch system has its own state names (SLURM's ``PENDING``/``RUNNING``/
``COMPLETED``/``TIMEOUT``..., PBS's one-letter ``Q``/``R``/``E``/``F``...).  A
cluster class holds a table from its native names to :class:`JobState`, and
:func:`map_state` applies it; a name missing from the table is ``UNKNOWN``
(logged once), never an exception, because batch systems grow new states.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import NamedTuple

logger = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    """The state of a batch job, the same for every batch system.

    ``PENDING`` (queued, held, starting), ``RUNNING``, ``COMPLETING`` (ended,
    the batch system is cleaning up), then one of the finished states
    ``DONE``, ``FAILED`` (non-zero exit, walltime hit, node failure, out of
    memory) or ``CANCELLED``.  ``UNKNOWN``: the batch system said something we
    do not recognise, or nothing at all about a job it used to list.
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPLETING = "completing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        """The job is queued or holds resources (pending, running or completing)."""
        return self in (JobState.PENDING, JobState.RUNNING, JobState.COMPLETING)

    @property
    def finished(self) -> bool:
        """The job is over (done, failed or cancelled)."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobStatus(NamedTuple):
    """What one status call said about one job.

    Attributes:
        native: the batch system's own state name (``"PENDING"``, ``"R"``, ...).
        state: its :class:`JobState`.
        reason: why it is in that state, when the batch system says
            (SLURM's ``%r``: ``"Resources"``, ``"Priority"``, ``"BeginTime"``;
            ``""`` when there is none to tell).
    """

    native: str
    state: JobState
    reason: str = ""


_warned: set[tuple[str, str]] = set()


def map_state(table: Mapping[str, JobState], native: str, system: str = "") -> JobState:
    """The :class:`JobState` of a native state name (``UNKNOWN`` if the table lacks it).

    Lookups ignore case and anything after the first space or ``+`` (SLURM
    prints ``CANCELLED by 0`` and ``COMPLETING+``).
    """
    key = native.strip().split(" ")[0].rstrip("+")
    state = table.get(key) or table.get(key.upper())
    if state is None:
        if (system, key) not in _warned:
            _warned.add((system, key))
            logger.warning("unknown %s job state %r; treating it as %s", system or "batch", native,
                           JobState.UNKNOWN)
        return JobState.UNKNOWN
    return state


__all__ = ["JobState", "JobStatus", "map_state"]
