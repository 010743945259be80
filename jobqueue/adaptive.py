"""How many jobs to submit and which to close: a pure function of what was observed.

Theory of operation
-------------------
The cluster's IO shell (:mod:`cluster.jobqueue.core`) observes, at each step, the
number of workers the work wants (the scheduler's ``adaptive_target``, or the
``n`` of ``scale(n)``), every active job of the cluster (pending or running,
how many workers it has, whether it is already closing or *ending* -- its
workers are about to retire at their lifetime) and which running jobs the
scheduler would close cheaply (``workers_to_close`` grouped by job: all of a
job's workers idle, least data first).  :class:`ScalingPolicy` turns that
:class:`Observation` into a :class:`Decision`: submit ``n`` jobs, close these
jobs.  It touches no socket, subprocess or clock, so it is tested with plain
values.

Rules:

- Workers come in jobs of ``processes``: ``ceil(target / processes)`` jobs
  are wanted, within ``[minimum_jobs, maximum_jobs]``.
- Pending jobs count as capacity (no over-submission while the queue is
  slow); closing and ending jobs do not (an ending job is replaced *before*
  it leaves, so its workers' data has somewhere to go).
- Jobs are closed whole, never half a job: pending jobs first (newest first),
  then running jobs the scheduler marked closable, in its order.  ``scale``
  also closes starting jobs (running, no worker yet) and, if still over
  target, busy jobs (newest first: their data moves before they go).
  ``adapt`` closes only idle jobs, and only after the same job was chosen
  ``wait_count`` times in a row (a short lull does not throw jobs away).
- Idle jobs whose workers hold data (results a client keeps) are closable
  too: the scheduler lists them when their data fits in the workers that
  stay, least data first, and closing them moves the data first.  The jobs
  closed by one decision retire *together*, so their data goes to workers
  that stay and no key moves twice in one scale-down.  To keep it so,
  ``adapt`` holds back a running job that is ready to go while other running
  jobs chosen with it are still counting to ``wait_count`` (at most another
  ``wait_count`` decisions), then closes them in one decision.

:class:`Adaptive` is the handle ``cluster.adapt()`` returns: the settings
in force, ``stop()``, and ``log``: what adaptive scaling did and why it kept
workers (also logged at INFO by the ``jobqueue.adaptive`` logger).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.runtime.utils import format_bytes

from .states import JobState

if TYPE_CHECKING:
    from cluster.runtime.scheduler.elastic import AdaptiveSizing

    from .core import JobQueueCluster

logger = logging.getLogger(__name__)

#: Entries kept in ``Adaptive.log``.
LOG_LENGTH = 1000


@dataclass(frozen=True, slots=True)
class JobView:
    """One active job as the policy sees it.

    Attributes:
        id: the batch system's job id.
        state: ``PENDING``, ``RUNNING`` (or ``COMPLETING``: not counted).
        workers: its workers registered with the scheduler now.
        ending: its workers will retire at their lifetime soon (or already left).
        closing: we are already retiring or cancelling it.
    """

    id: str
    state: JobState
    workers: int = 0
    ending: bool = False
    closing: bool = False


@dataclass(frozen=True, slots=True)
class Observation:
    """What the cluster saw at one step.

    Attributes:
        target_workers: workers the work wants (``adaptive_target`` or ``scale``'s ``n``).
        jobs: the cluster's active jobs, oldest first.
        closable: ids of running jobs the scheduler would close cheaply, best first.
    """

    target_workers: int
    jobs: Sequence[JobView] = ()
    closable: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do: submit ``submit`` jobs; retire then cancel the jobs in ``close``."""

    submit: int = 0
    close: tuple[str, ...] = ()


@dataclass
class ScalingPolicy:
    """Jobs wanted for a target number of workers, and which jobs to close.

    Args:
        processes: workers per job.
        minimum_jobs: never fewer jobs.
        maximum_jobs: never more jobs (``None``: no limit).
        wait_count: times in a row a job must be chosen before it is closed.
        mode: ``"scale"`` (a fixed target: close busy jobs too) or ``"adapt"``
            (close idle jobs only).

    Raises:
        ValueError: a value out of range, named in the message.
    """

    processes: int = 1
    minimum_jobs: int = 0
    maximum_jobs: int | None = None
    wait_count: int = 1
    mode: str = "scale"
    _chosen: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("scale", "adapt"):
            raise ValueError(f"mode={self.mode!r}: accepted values are 'scale' and 'adapt'")
        if not isinstance(self.processes, int) or self.processes < 1:
            raise ValueError(f"processes={self.processes!r}: expected a positive integer")
        if not isinstance(self.minimum_jobs, int) or self.minimum_jobs < 0:
            raise ValueError(f"minimum_jobs={self.minimum_jobs!r}: expected a non-negative integer")
        if self.maximum_jobs is not None and (not isinstance(self.maximum_jobs, int)
                                              or self.maximum_jobs < self.minimum_jobs):
            raise ValueError(f"maximum_jobs={self.maximum_jobs!r}: expected an integer >= "
                             f"minimum_jobs={self.minimum_jobs}")
        if not isinstance(self.wait_count, int) or self.wait_count < 1:
            raise ValueError(f"wait_count={self.wait_count!r}: expected a positive integer")

    def jobs_wanted(self, target_workers: int) -> int:
        """``ceil(target_workers / processes)`` within the job limits."""
        wanted = math.ceil(max(0, target_workers) / self.processes)
        if self.maximum_jobs is not None:
            wanted = min(wanted, self.maximum_jobs)
        return max(wanted, self.minimum_jobs)

    def decide(self, obs: Observation) -> Decision:
        """The decision for one observation (updates the ``wait_count`` memory)."""
        wanted = self.jobs_wanted(obs.target_workers)
        counted = [j for j in obs.jobs
                   if j.state in (JobState.PENDING, JobState.RUNNING)
                   and not j.closing and not j.ending]
        if wanted >= len(counted):
            self._chosen.clear()
            return Decision(submit=wanted - len(counted))
        surplus = len(counted) - wanted
        chosen = self._candidates(counted, obs.closable)[:surplus]
        self._chosen = {jid: self._chosen.get(jid, 0) + 1 for jid in chosen}
        ready = [jid for jid in chosen if self._chosen[jid] >= self.wait_count]
        if self.mode == "adapt":
            ready = self._together(ready, chosen, {j.id for j in counted if j.state == JobState.RUNNING})
        for jid in ready:
            del self._chosen[jid]
        return Decision(close=tuple(ready))

    def _together(self, ready: list[str], chosen: list[str], running: set[str]) -> list[str]:
        """Hold back running jobs that are ready while other chosen running jobs still count.

        Jobs closed in one decision retire together (their data goes to jobs
        that stay, each key moved once); closing one now and its peer a
        decision later could move the first one's data twice.  A job is held
        back at most ``wait_count`` decisions beyond its own ``wait_count``.
        Pending jobs hold no data and are never held back.
        """
        counting = [jid for jid in chosen if jid in running and jid not in ready]
        if not counting:
            return ready
        return [jid for jid in ready
                if jid not in running or self._chosen[jid] >= 2 * self.wait_count]

    def _candidates(self, counted: list[JobView], closable: Sequence[str]) -> list[str]:
        pending = [j.id for j in reversed(counted) if j.state == JobState.PENDING]
        running = {j.id: j for j in counted if j.state == JobState.RUNNING}
        idle = [jid for jid in closable if jid in running]
        if self.mode == "adapt":
            return pending + idle
        starting = [j.id for j in reversed(counted)
                    if j.state == JobState.RUNNING and j.workers == 0 and j.id not in idle]
        taken = set(pending) | set(idle) | set(starting)
        busy = [j.id for j in reversed(counted) if j.id in running and j.id not in taken]
        return pending + starting + idle + busy


def adapt_limits(processes: int, minimum: int | None, maximum: int | None,
                 minimum_jobs: int | None, maximum_jobs: int | None) -> tuple[int, int | None]:
    """Job limits from ``adapt``'s worker and job limits (workers are counted in whole jobs).

    ``minimum`` workers need ``ceil(minimum / processes)`` jobs; ``maximum``
    workers allow ``maximum // processes`` jobs (at least one when
    ``maximum > 0``), so that ``maximum`` is not exceeded by more than one
    job's worth when it is smaller than a job.  Where both a worker and a job
    limit are given, the stricter one wins.

    Raises:
        ValueError: a negative value, or a minimum above the maximum.
    """
    for name, value in (("minimum", minimum), ("maximum", maximum),
                        ("minimum_jobs", minimum_jobs), ("maximum_jobs", maximum_jobs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}={value!r}: expected a non-negative integer or None")
    low = 0
    if minimum is not None:
        low = math.ceil(minimum / processes)
    if minimum_jobs is not None:
        low = max(low, minimum_jobs)
    high: int | None = None
    if maximum is not None:
        high = max(1, maximum // processes) if maximum > 0 else 0
    if maximum_jobs is not None:
        high = maximum_jobs if high is None else min(high, maximum_jobs)
    if high is not None and low > high:
        raise ValueError(f"adapt: the minimum ({minimum=}, {minimum_jobs=}) is above the maximum "
                         f"({maximum=}, {maximum_jobs=}) with processes={processes}")
    return low, high


class Adaptive:
    """The adaptive-scaling settings in force (returned by ``cluster.adapt()``).

    Attributes:
        interval: seconds between two decisions.
        target_duration: the work should take about this long (seconds) with the workers wanted.
        policy: the pure decision maker (limits in jobs, ``wait_count``).
        log: ``(time.time(), message)`` of what adaptive scaling did or declined
            to do (the last :data:`LOG_LENGTH`): jobs closed with the data they
            held, idle workers kept because their data would not fit elsewhere.
    """

    def __init__(self, cluster: JobQueueCluster, interval: float, target_duration: float,
                 policy: ScalingPolicy):
        self._cluster = weakref.ref(cluster)
        self.interval = interval
        self.target_duration = target_duration
        self.policy = policy
        self.log: deque[tuple[float, str]] = deque(maxlen=LOG_LENGTH)
        self._kept: tuple[int, int] = (0, 0)

    def record(self, message: str) -> None:
        """Add ``message`` to :attr:`log` and log it at INFO."""
        self.log.append((time.time(), message))
        logger.info("adapt: %s", message)

    def observe(self, sizing: AdaptiveSizing) -> None:
        """Say (once per change) when idle workers are kept only because their data would not fit.

        Workers that the minimum keeps anyway are not counted.
        """
        minimum = self.policy.minimum_jobs * self.policy.processes
        n = min(sizing.kept_for_data, sizing.workers - minimum)
        kept = (n, sizing.stored) if n > 0 else (0, 0)
        if kept == self._kept:
            return
        self._kept = kept
        if n > 0:
            self.record(kept_message(sizing, n))

    def __repr__(self) -> str:
        p = self.policy
        return (f"<Adaptive jobs=[{p.minimum_jobs}, {p.maximum_jobs}] interval={self.interval:g}s "
                f"wait_count={p.wait_count} target_duration={self.target_duration:g}s>")

    def stop(self) -> None:
        """Stop adapting; the jobs running now stay (call ``scale`` to change them)."""
        cluster = self._cluster()
        if cluster is not None:
            cluster.stop_adapting(self)


def kept_message(sizing: AdaptiveSizing, n: int | None = None) -> str:
    """Why ``n`` (default: ``sizing.kept_for_data``) idle workers stay: the data would not fit."""
    n = sizing.kept_for_data if n is None else n
    need = sizing.memory_ratio * sizing.stored
    return (f"keeping {n} idle worker{'' if n == 1 else 's'} that could go: the "
            f"{format_bytes(sizing.stored)} of data held on the cluster would not fit with headroom "
            f"in the workers that would stay (memory_ratio={sizing.memory_ratio:g}: "
            f"{format_bytes(need)} of memory limits needed, {format_bytes(sizing.limit)} in all "
            f"{sizing.workers} workers); they stay until less data is held")


__all__ = ["Adaptive", "Decision", "JobView", "Observation", "ScalingPolicy", "adapt_limits",
           "kept_message"]
