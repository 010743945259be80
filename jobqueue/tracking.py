"""The cluster's record of its jobs: states from the batch system, workers from the scheduler.

Theory of operation
-------------------
:class:`JobTable` holds one :class:`Job` per job the cluster submitted.  Two
kinds of news update it, both as plain values (no IO; time is passed in):

- :meth:`JobTable.apply_status`: the states one batched status call reported,
  ``{job id: JobStatus(native state, JobState, reason)}``.  A job the batch system no longer
  lists has left it: it is over (``CANCELLED`` if we cancelled it, ``DONE``
  if it had run, else ``UNKNOWN``), but only once it was listed before or
  a grace period after its submission has passed.
- :meth:`JobTable.apply_workers`: the workers registered with the scheduler,
  ``{name: (address, status)}``.  A worker belongs to a job by its name
  (``<job_name>-<job id>[-<i>]``, see :func:`cluster.jobqueue.job.JobSpec.worker_names`).
  A job's first worker starts its lifetime clock.

A job is *ending* when its workers' lifetime is near (``Lifetime.ending_after``
after its first worker came), when one of its workers is retiring without us
asking, or when all the workers it had are gone: either way it will leave by
itself and needs a replacement.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .adaptive import JobView
from .states import JobState, JobStatus

#: Finished jobs kept for ``cluster.jobs`` (the oldest are forgotten).
FINISHED_KEPT = 100


@dataclass
class Job:
    """One batch job of the cluster (mutable; see :class:`JobInfo` for the public snapshot)."""

    id: str
    submitted: float
    state: JobState = JobState.PENDING
    native_state: str = ""
    reason: str = ""
    listed: bool = False
    started: float | None = None
    first_worker: float | None = None
    finished: float | None = None
    workers: dict[str, str] = field(default_factory=dict)
    retiring: set[str] = field(default_factory=set)
    ever_workers: int = 0
    closing: bool = False
    cancel_requested: bool = False

    def ending(self, now: float, ending_after: float | None) -> bool:
        """Will this job leave by itself soon (see the module docstring)?"""
        if self.closing or self.state != JobState.RUNNING:
            return False
        if self.retiring:
            return True
        if self.ever_workers and not self.workers:
            return True
        return (ending_after is not None and self.first_worker is not None
                and now - self.first_worker >= ending_after)

    def view(self, now: float, ending_after: float | None) -> JobView:
        return JobView(self.id, self.state, len(self.workers) - len(self.retiring),
                       self.ending(now, ending_after), self.closing)


@dataclass(frozen=True)
class JobInfo:
    """A job as ``cluster.jobs`` shows it.

    Attributes:
        id: the batch system's job id.
        state: its :class:`JobState`.
        native_state: the batch system's own word for it (``""`` before the first status call).
        workers: names of its workers registered with the scheduler now.
        submitted: when it was submitted (``time.time()``).
        started: when it was first seen running or its first worker came (``None`` before).
        closing: the cluster is retiring or cancelling it.
        reason: why the batch system keeps it in its state, when it says
            (SLURM: ``"Resources"``, ``"Priority"``, ...; ``""`` otherwise).
    """

    id: str
    state: JobState
    native_state: str
    workers: tuple[str, ...]
    submitted: float
    started: float | None
    closing: bool
    reason: str = ""


class JobTable:
    """The jobs of one cluster, by id, oldest first.

    Args:
        worker_names: the worker names of a job id (``JobSpec.worker_names``).
        normalize: a job id's comparable form (PBS: the part before the first dot),
            used to find a worker's job when its name carries a longer id.
        name_prefix: what every worker name of this cluster starts with (``<job_name>-``).
        clock: monotonic seconds (injected for tests).
        wall_clock: seconds since the epoch, for :class:`JobInfo`.
    """

    def __init__(self, worker_names: Callable[[str], list[str]],
                 normalize: Callable[[str], str] = lambda jid: jid, name_prefix: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.worker_names = worker_names
        self.normalize = normalize
        self.name_prefix = name_prefix
        self.clock = clock
        self.wall_clock = wall_clock
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._names: dict[str, str] = {}
        self._wall_offset = wall_clock() - clock()
        #: Jobs in a row that ended without ever starting a worker.
        self.failures_in_a_row = 0

    # ------------------------------------------------------------------ queries

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.jobs

    def __getitem__(self, job_id: str) -> Job:
        return self.jobs[job_id]

    def active(self) -> list[Job]:
        """Jobs still queued or running (not finished), oldest first."""
        return [j for j in self.jobs.values() if j.finished is None]

    def active_ids(self) -> list[str]:
        return [j.id for j in self.active()]

    def describe_active(self, processes: int) -> list[str]:
        """``["job 123 PENDING (Resources)", "job 124 RUNNING (1/2 workers connected)"]``."""
        parts = []
        for job in self.active():
            native = job.native_state or "submitted"
            if job.state in (JobState.RUNNING, JobState.COMPLETING) or job.workers:
                detail = f"{len(job.workers)}/{processes} workers connected"
            else:
                detail = job.reason
            parts.append(f"job {job.id} {native}" + (f" ({detail})" if detail else ""))
        return parts

    def job_of(self, worker_name: object) -> str | None:
        """The id of the job a worker of this name belongs to (``None``: not ours)."""
        name = str(worker_name)
        jid = self._names.get(name)
        if jid is not None or not self.name_prefix or not name.startswith(self.name_prefix):
            return jid
        # The name may carry a longer form of the id than the submit command
        # printed (PBS: 123.server.domain vs 123.server): compare normalised ids,
        # with and without the "-<i>" of a job with several workers.
        rest = name[len(self.name_prefix):]
        head, sep, tail = rest.rpartition("-")
        forms = {self.normalize(rest)} | ({self.normalize(head)} if sep and tail.isdigit() else set())
        for job in self.jobs.values():
            if self.normalize(job.id) in forms:
                return job.id
        return None

    def views(self, ending_after: float | None) -> list[JobView]:
        now = self.clock()
        return [j.view(now, ending_after) for j in self.active()]

    def info(self) -> dict[str, JobInfo]:
        """``{job id: JobInfo}``, oldest first."""
        def wall(t: float | None) -> float | None:
            return None if t is None else t + self._wall_offset
        return {j.id: JobInfo(j.id, j.state, j.native_state, tuple(sorted(j.workers)),
                              wall(j.submitted) or 0.0, wall(j.started), j.closing, j.reason)
                for j in self.jobs.values()}

    def workers(self) -> dict[str, str]:
        """``{worker name: job id}`` for every registered worker of the cluster's jobs."""
        return {name: j.id for j in self.jobs.values() for name in sorted(j.workers)}

    # ------------------------------------------------------------------ news

    def add(self, job_id: str) -> Job:
        """Record a job just submitted (``PENDING``)."""
        job = Job(job_id, submitted=self.clock())
        self.jobs[job_id] = job
        for name in self.worker_names(job_id):
            self._names[name] = job_id
        return job

    def apply_status(self, states: Mapping[str, JobStatus], asked: Iterable[str],
                     grace: float) -> list[Job]:
        """Update the jobs in ``asked`` from one status call's ``states``.

        Args:
            states: ``{job id: JobStatus}`` for the jobs the batch system listed.
            asked: the ids the status call asked about.
            grace: seconds after submission during which an unlisted job is
                not yet taken for gone.

        Returns:
            The jobs that finished with this news.
        """
        now = self.clock()
        ended = []
        for jid in asked:
            job = self.jobs.get(jid)
            if job is None or job.finished is not None:
                continue
            if jid in states:
                native, state, reason = JobStatus(*states[jid])  # plain pairs too
                job.listed = True
                job.native_state = native
                job.reason = reason
                if state == JobState.RUNNING and job.started is None:
                    job.started = now
                job.state = state
                if state.finished:
                    ended.append(job)
            elif job.listed or now - job.submitted > grace:
                job.native_state = job.native_state or "(not listed)"
                if job.cancel_requested:
                    job.state = JobState.CANCELLED
                elif job.state in (JobState.RUNNING, JobState.COMPLETING) or job.ever_workers:
                    job.state = JobState.DONE
                else:
                    job.state = JobState.UNKNOWN
                ended.append(job)
        for job in ended:
            self._finish(job, now)
        return ended

    def _finish(self, job: Job, now: float) -> None:
        job.finished = now
        if job.cancel_requested or job.ever_workers:
            if job.ever_workers:
                self.failures_in_a_row = 0
        else:
            self.failures_in_a_row += 1
        finished = [j.id for j in self.jobs.values() if j.finished is not None]
        for jid in finished[:max(0, len(finished) - FINISHED_KEPT)]:
            for name in self.worker_names(jid):
                self._names.pop(name, None)
            del self.jobs[jid]

    def apply_workers(self, registered: Mapping[str, tuple[str, str]]) -> None:
        """Update every job's workers from ``{name: (address, status)}`` of the scheduler."""
        now = self.clock()
        seen: dict[str, dict[str, str]] = {}
        retiring: dict[str, set[str]] = {}
        for name, (address, status) in registered.items():
            jid = self.job_of(name)
            if jid is None or jid not in self.jobs:
                continue
            seen.setdefault(jid, {})[name] = address
            if status == "closing_gracefully":
                retiring.setdefault(jid, set()).add(name)
        for job in self.jobs.values():
            new = seen.get(job.id, {})
            if new and job.first_worker is None:
                job.first_worker = now
                if job.started is None:
                    job.started = now
                if job.state == JobState.PENDING:
                    job.state = JobState.RUNNING  # the batch system will say so at its next call
            job.ever_workers += len(set(new) - set(job.workers))
            if new:
                self.failures_in_a_row = 0
            job.workers = new
            job.retiring = retiring.get(job.id, set())


__all__ = ["FINISHED_KEPT", "Job", "JobInfo", "JobTable"]
