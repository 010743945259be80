"""JobQueueCluster: a scheduler in this process, workers in batch jobs.

Theory of operation
-------------------
The cluster starts a :class:`~cluster.runtime.scheduler.server.Scheduler` on its event loop
(the shared background loop for a synchronous cluster, the caller's for
``asynchronous=True``).  Each batch job runs the rendered job script, which
starts ``processes`` nanny-managed workers with ``python -m cluster worker``;
they connect to the scheduler and register under names that carry their job
id (:mod:`cluster.jobqueue.job`).

One watcher task drives everything, one *step* at a time (a lock keeps steps
and explicit ``scale()`` calls from interleaving):

1. every ``status_interval``, one batched status call (``squeue``/``qstat``)
   for all the cluster's active jobs, mapped to :class:`JobState`;
2. the scheduler's workers are assigned to jobs by name (:mod:`cluster.jobqueue.tracking`);
3. the :class:`~cluster.jobqueue.adaptive.ScalingPolicy` turns the target (``scale``'s,
   or the scheduler's ``adaptive_target`` under ``adapt``) and the jobs into a
   decision: submit jobs, close jobs.  Closing a running job retires all its
   workers through the scheduler (their unique data moves to other workers
   first, ``retire_workers``) and only then cancels the job; a pending job
   is just cancelled.  The jobs of one decision retire in ONE
   ``retire_workers`` call, so their data goes to workers that stay and each
   key moves once.  Under ``adapt`` a job that got work between the decision
   and its retirement (checked in the same event-loop step as the retirement
   starts) is kept: closing never interrupts a task.

Jobs that end by themselves -- workers retired at their walltime-derived
lifetime -- drop out of the count, so the next step submits a replacement
(even before they end: see ``Lifetime.ending_after``).  Jobs that keep
ending without ever starting a worker (a broken prologue, a wrong python)
pause submission with a growing back-off, logged as an error, instead of
filling the queue.

Security is on by default (``tls://``, fresh credentials, the workers' in
one 0600 file the jobs read by path): :func:`cluster.jobqueue.config.cluster_security`
and :mod:`cluster.jobqueue.credentials`.  Options not passed come from the
configuration (``jobqueue.<config_name>.*``, dask's ``jobqueue.yaml`` too):
:mod:`cluster.jobqueue.config`.

While ``wait_for_workers`` waits it logs, at INFO and at most every
:data:`WAIT_LOG_INTERVAL` seconds, what it waits for: each active job with its
native state and the batch system's reason (``job 123 PENDING (Resources)``)
or its workers connected so far (``job 124 RUNNING (0/2 workers connected)``).

Every subprocess call goes through ``runner`` (:mod:`cluster.jobqueue.commands`).
``close()`` closes the scheduler, cancels every job the cluster submitted that
is still queued or running, and waits until the batch system lists none of
them as active.  If the cluster is never closed, a ``weakref.finalize`` (run
at garbage collection or interpreter exit) cancels them: no job is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.runtime.config import FROM_CONFIG
from cluster.runtime.errors import ClusterTimeoutError
from cluster.runtime.scheduler import Scheduler, elastic
from cluster.runtime.security import Security
from cluster.runtime.utils import format_bytes

from .adaptive import Adaptive, Observation, ScalingPolicy, adapt_limits
from .commands import Runner, cancel_leftovers, run_command
from .config import (
    CONFIGURABLE,
    cluster_security,
    explain,
    positive,
    resolve_options,
    scheduler_options,
)
from .credentials import make_private_directory, remove_file, worker_security
from .errors import CancelError, CommandError
from .job import (
    common_values,
    make_spec,
    render_script,
    worker_command,
)
from .plumbing import SyncAsync
from .states import JobState
from .systems import BatchSystem, get_system, system_class
from .tracking import JobInfo, JobTable
from .units import parse_duration, parse_memory

logger = logging.getLogger(__name__)

#: Jobs in a row that end without starting a worker before submission pauses.
FAILURES_BEFORE_BACKOFF = 3

#: Longest pause of submission after repeated failures (seconds).
MAX_BACKOFF = 300.0

#: Shortest time between two "waiting for workers" log lines (seconds) ...
WAIT_LOG_INTERVAL = 5.0
#: ... and the longest, when nothing changed.
WAIT_LOG_REPEAT = 30.0


class JobQueueCluster(SyncAsync):
    """A scheduler in this process and workers in batch jobs of one batch system.

    ``JobQueueCluster(system="sge", cores=8, memory="16GB", project="p1")``;
    :class:`~cluster.jobqueue.clusters.SLURMCluster`, ``PBSCluster`` and ``SGECluster``
    are this class with their system filled in.

    Args:
        system: the batch system: a name (``"slurm"``, ``"pbs"``, ``"sge"``), a
            :class:`~cluster.jobqueue.systems.BatchSystem` class, or an instance (which
            then carries the system's own options).
        cores: cores of one job (required). Its workers share them: each gets
            ``cores // processes`` threads.
        memory: memory of one job (required), like ``"16GB"`` or ``"8GiB"``;
            each worker's limit is ``memory // processes``.
        processes: workers per job (default: about ``sqrt(cores)``, dividing ``cores``).
        queue: the queue (SLURM partition) to submit to.
        account: the account (project) charged for the jobs.
        walltime: time limit of each job, like ``"01:00:00"``, ``"1-00:00:00"``,
            ``"90m"`` (default ``"00:30:00"``; ``None``: the queue's default, and no
            walltime-derived lifetime).
        job_name: name of the jobs; workers are named ``<job_name>-<job id>[-<i>]``.
        job_extra_directives: more directive lines (the ``#SBATCH``/``#PBS`` prefix is added
            when missing).
        job_directives_skip: drop the template's directive lines that contain any of these strings.
        job_script_prologue: shell lines run before the workers start (``module load``, ...).
        job_script_epilogue: shell lines run after the workers exit.
        security: TLS for the scheduler and the workers.  ``None`` (the default) or
            ``True``: fresh credentials for this cluster (``Security.temporary()``),
            the scheduler on ``tls://``, the workers' credentials in a 0600 file
            passed to the jobs by path; ``False``: plain ``tcp://``, no
            authentication (anyone who can reach the port can run code as you);
            a :class:`~cluster.runtime.security.Security`: used as given (it needs a CA,
            a scheduler and a worker certificate; the jobs get the CA, the
            worker certificate and key and the settings, in the same file).
        shared_temp_directory: a directory that this machine and the jobs' nodes
            both see (a shared filesystem); the workers' credentials file goes
            to its ``hpc-cluster-credentials`` subdirectory (mode 0700).
            Default: ``~/.hpc-cluster/credentials``.
        interface: network interface of the workers (e.g. ``"ib0"``); also the
            scheduler's, unless ``scheduler_options`` gives a host or interface.
        local_directory: the workers' directory for files and spilled data.
        log_directory: directory for the jobs' output files (created if missing).
        worker_extra_args: more arguments for ``python -m cluster worker``.
        python: the Python that runs the workers (default: this one).
        shebang: first line of the job script.
        env: environment variables exported by the job script.
        nanny: run each worker under a nanny (restarts on crash; default True).
        death_timeout: the workers give up on a scheduler that cannot be reached, or
            stops answering (its process frozen: SIGSTOP, a hung kernel, a dropped
            login session), after this long (default 3 minutes); they then exit, so
            the job ends and its allocation is freed even though nobody cancelled it.
        lifetime: ``"auto"`` (walltime-derived, see :mod:`cluster.jobqueue.job`), a duration, or
            ``None`` for none.
        lifetime_stagger: ``"auto"`` or a duration: lifetimes vary by up to this much.
        lifetime_margin: ``"auto"`` or a duration kept free before the walltime.
        template: path of a jinja2 template to use instead of ours (it may
            ``{% extends "slurm.sh.j2" %}``).
        scheduler_options: keyword arguments of the in-process ``Scheduler``
            (``host``, ``port``, ``interface``, ...). Default: loopback only,
            which suits a single machine; on a cluster give ``interface=`` (or
            ``scheduler_options={"host": ...}``) so that compute nodes can connect.
        n_workers: workers to start with (``scale(n_workers)``).
        asynchronous: use the running event loop (``await cluster``, ``async with``).
        status_interval: seconds between two status calls (one for all jobs).
        command_timeout: seconds a batch command may take.
        close_timeout: seconds ``close()`` waits for the cancelled jobs to leave the queue.
        runner: the command seam (default :func:`cluster.jobqueue.commands.run_command`).
        config_name: the section ``jobqueue.<config_name>`` of the configuration
            that gives the options not passed here (default: the system's name,
            ``jobqueue.slurm``; see :mod:`cluster.jobqueue.config` and docs/configuration.md).
        **system_options: the batch system's own options (SLURM: ``job_cpu``,
            ``job_mem``; PBS: ``resource_spec``, ``project``; SGE: ``project``,
            ``resource_spec``, ``parallel_environment``).

    Raises:
        ValueError: an option is missing or has a bad value (named in the message).
        TypeError: an option has the wrong type (named in the message).
    """

    def __init__(self, cores: int | None = FROM_CONFIG, memory: str | int | None = FROM_CONFIG,
                 processes: int | None = FROM_CONFIG, queue: str | None = FROM_CONFIG,
                 account: str | None = FROM_CONFIG, walltime: str | None = FROM_CONFIG,
                 job_name: str = FROM_CONFIG, job_extra_directives: Sequence[str] | None = FROM_CONFIG,
                 job_directives_skip: Sequence[str] | None = FROM_CONFIG,
                 job_script_prologue: Sequence[str] | None = FROM_CONFIG,
                 job_script_epilogue: Sequence[str] | None = FROM_CONFIG,
                 interface: str | None = FROM_CONFIG, local_directory: str | None = FROM_CONFIG,
                 log_directory: str | None = FROM_CONFIG,
                 worker_extra_args: Sequence[str] | None = FROM_CONFIG,
                 python: str | None = FROM_CONFIG, shebang: str = FROM_CONFIG,
                 env: Mapping[str, str] | None = FROM_CONFIG, nanny: bool = FROM_CONFIG,
                 death_timeout: Any = FROM_CONFIG, lifetime: Any = FROM_CONFIG,
                 lifetime_stagger: Any = FROM_CONFIG, lifetime_margin: Any = FROM_CONFIG,
                 template: str | os.PathLike | None = FROM_CONFIG,
                 scheduler_options: Mapping[str, Any] | None = FROM_CONFIG, n_workers: int = 0,
                 asynchronous: bool = False, status_interval: Any = FROM_CONFIG,
                 command_timeout: Any = FROM_CONFIG, close_timeout: Any = FROM_CONFIG,
                 runner: Runner | None = None, security: Security | bool | None = None,
                 shared_temp_directory: str | os.PathLike | None = FROM_CONFIG,
                 system: str | type[BatchSystem] | BatchSystem | None = None,
                 config_name: str | None = None, **system_options: Any):
        chosen = system if system is not None else self.default_system
        if chosen is None:
            raise ValueError("system is required: 'slurm', 'pbs' or 'sge' (or use SLURMCluster, "
                             "PBSCluster, SGECluster)")
        given = {k: v for k, v in locals().items() if k in CONFIGURABLE}
        options, own, sources = resolve_options(type(self).__name__, system_class(chosen),
                                                config_name, given, system_options)
        #: Where each option taken from the configuration was set (``{"queue": "jobqueue.slurm.queue in ..."}``).
        self.config_sources = sources
        try:
            self._configure(chosen, options, own, security)
        except (ValueError, TypeError) as e:
            raise explain(e, sources) from None
        if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 0:
            raise ValueError(f"n_workers={n_workers!r}: expected a non-negative integer")
        self.runner: Runner = runner or run_command
        self.asynchronous = asynchronous
        self.scheduler: Scheduler | None = None
        self.status = "created"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._table = JobTable(self.spec.worker_names, self.system.normalize_job_id,
                               f"{self.spec.job_name}-")
        self._policy = ScalingPolicy(self.spec.processes, mode="scale")
        self._target_workers = n_workers
        self._adaptive: Adaptive | None = None
        self._live_ids: set[str] = set()  # shared with the finalizer: never rebind
        self._finalizer: weakref.finalize | None = None
        self._credentials_finalizer: weakref.finalize | None = None
        self._watcher: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()
        self._next_status = 0.0
        self._paused_until = 0.0
        self._enter_loop()

    #: The batch system when none is given (set by SLURMCluster and friends).
    default_system: type[BatchSystem] | None = None

    # ------------------------------------------------------------------ options

    def _configure(self, chosen: Any, options: dict[str, Any], own: dict[str, Any],
                   security: Any) -> None:
        """Check the options (resolved by :func:`~cluster.jobqueue.config.resolve_options`) and keep them."""
        folded = system_class(chosen).fold_options({"account": options.pop("account"), **own})
        options["account"] = folded.pop("account")
        self.system: BatchSystem = get_system(chosen, **folded)
        mine = {k: options.pop(k) for k in ("shared_temp_directory", "scheduler_options",
                                             "status_interval", "command_timeout",
                                             "close_timeout")}
        self.spec = make_spec(**options, directive_prefix=self.system.directive_prefix)
        self.scheduler_options = scheduler_options(mine["scheduler_options"], self.spec.interface)
        self.security, self.credentials_file = cluster_security(
            security, mine["shared_temp_directory"], self.spec.job_name)
        if self.security is not None:
            self.scheduler_options["security"] = self.security
        self.status_interval = positive(mine["status_interval"], "status_interval")
        self.command_timeout = positive(mine["command_timeout"], "command_timeout")
        self.close_timeout = parse_duration(mine["close_timeout"], "close_timeout")

    # ------------------------------------------------------------------ public surface

    @property
    def scheduler_address(self) -> str | None:
        """The address workers and clients connect to (``None`` before the start)."""
        s = self.scheduler
        return s.address if s is not None and s.listeners else None

    @property
    def jobs(self) -> dict[str, JobInfo]:
        """``{job id: JobInfo}`` of the jobs this cluster submitted (id, state, workers), oldest first."""
        return self._table.info()

    @property
    def workers(self) -> dict[str, str]:
        """``{worker name: job id}`` of the workers of this cluster's jobs registered now."""
        return self._table.workers()

    def job_script(self, scheduler_address: str | None = None) -> str:
        """The job script this cluster submits.

        Args:
            scheduler_address: render for this address instead of the running
                scheduler's (lets an unstarted cluster show its script).

        Raises:
            TemplateError: the template uses a value nobody set (named).
            RuntimeError: no scheduler address is known yet.
        """
        address = scheduler_address or self.scheduler_address
        if address is None:
            raise RuntimeError("the cluster has no scheduler yet: start it (await it) or pass "
                               "scheduler_address=")
        system = self.system
        line = worker_command(self.spec, address, system.job_id_expression(), self.credentials_file)
        values = {**common_values(self.spec, line), **system.values(self.spec)}
        return render_script(system.template_name, values, user_template=self.spec.template,
                             prefix=system.directive_prefix, skip=self.spec.job_directives_skip)

    def scale(self, n: int | None = None, jobs: int | None = None, memory: Any = None,
              cores: int | None = None):
        """Run ``n`` workers (in ``ceil(n / processes)`` jobs), or enough for ``jobs``/``memory``/``cores``.

        Stops adaptive scaling.  Extra jobs are closed whole: pending ones
        cancelled, running ones retired (their data moves) and then cancelled.

        Returns:
            ``None``, or an awaitable with ``asynchronous=True``.

        Raises:
            ValueError: not exactly one of the arguments, or a bad value.
            SubmitError: submitting a job failed (with the command's output).
        """
        given = [name for name, v in (("n", n), ("jobs", jobs), ("memory", memory),
                                      ("cores", cores)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"scale: give one of n, jobs, memory, cores, not {', '.join(given)}")
        p = self.spec.processes
        if jobs is not None:
            n = self._count(jobs, "jobs") * p
        elif cores is not None:
            n = math.ceil(self._count(cores, "cores") / self.spec.cores) * p
        elif memory is not None:
            n = math.ceil(parse_memory(memory, "memory") / self.spec.memory) * p
        n = self._count(0 if n is None else n, "n")
        if self._adaptive is not None:
            logger.info("scale(%d) stops adaptive scaling", n)
        self._adaptive = None
        self._target_workers = n
        self._table.failures_in_a_row = 0
        return self._run(self._scale_now)

    def stop_adapting(self, adaptive: Adaptive) -> None:
        """``adaptive`` stops (:meth:`Adaptive.stop`): the jobs running now become the target."""
        if self._adaptive is adaptive:
            self._adaptive = None
            self._target_workers = sum(len(j.workers) for j in self._table.active()) or self._target_workers

    @staticmethod
    def _count(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"scale({name}={value!r}): expected a non-negative integer")
        return value

    def adapt(self, minimum: int | None = None, maximum: int | None = None,
              minimum_jobs: int | None = None, maximum_jobs: int | None = None,
              interval: Any = "1s", wait_count: int = 3, target_duration: Any = "5s") -> Adaptive:
        """Scale with the load: the scheduler's ``adaptive_target`` workers, in whole jobs.

        Args:
            minimum: fewest workers (rounded up to whole jobs).
            maximum: most workers (rounded down to whole jobs, at least one job).
            minimum_jobs: fewest jobs.
            maximum_jobs: most jobs.
            interval: seconds between decisions.
            wait_count: a job is closed only after being chosen this many times in a row.
            target_duration: aim to finish the current work in about this long.

        Returns:
            The :class:`Adaptive` settings (``.stop()`` stops adapting).

        Raises:
            ValueError: a bad value, named in the message.
        """
        low, high = adapt_limits(self.spec.processes, minimum, maximum, minimum_jobs, maximum_jobs)
        policy = ScalingPolicy(self.spec.processes, low, high, wait_count, mode="adapt")
        self._adaptive = Adaptive(self, positive(interval, "interval"),
                                  positive(target_duration, "target_duration"), policy)
        self._table.failures_in_a_row = 0
        self._poke()
        return self._adaptive

    def wait_for_workers(self, n_workers: int, timeout: Any = None):
        """Wait until ``n_workers`` workers of this cluster are registered, saying what it waits for.

        While it waits it logs at INFO, when something changed but at most
        every :data:`WAIT_LOG_INTERVAL` seconds (and every
        :data:`WAIT_LOG_REPEAT` seconds when nothing did), each active job with
        the batch system's state and reason, or its workers connected so far::

            waiting for 3 workers (1 connected): job 123 PENDING (Resources),
            job 124 RUNNING (1/2 workers connected)

        It does not submit jobs: call ``scale()`` or ``adapt()`` first.

        Args:
            n_workers: how many workers of this cluster's jobs.
            timeout: give up after this long (seconds or ``"5m"``; ``None``: never).

        Returns:
            ``None``, or an awaitable with ``asynchronous=True``.

        Raises:
            ClusterTimeoutError: not there after ``timeout``; the message says
                what was still missing.
            ValueError: a bad ``n_workers`` or ``timeout``.
            RuntimeError: the cluster is not running.
        """
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"wait_for_workers(n_workers={n_workers!r}): expected a "
                             "non-negative integer")
        limit = None if timeout is None else parse_duration(timeout, "timeout")

        async def waiter() -> None:
            start = time.monotonic()
            deadline = None if limit is None else start + limit
            logged_at, logged = -math.inf, ""
            while True:
                if self.status != "running":
                    raise RuntimeError(f"wait_for_workers: the cluster is {self.status}")
                self._apply_workers()
                if len(self._registered()) >= n_workers:
                    if logged:
                        logger.info("%d worker%s connected after %.1fs", n_workers,
                                    "" if n_workers == 1 else "s", time.monotonic() - start)
                    return
                now = time.monotonic()
                text = self.waiting_for(n_workers)
                if now - logged_at >= (WAIT_LOG_INTERVAL if text != logged else WAIT_LOG_REPEAT):
                    logger.info("%s", text)
                    logged_at, logged = now, text
                if deadline is not None and now > deadline:
                    raise ClusterTimeoutError(f"{n_workers} workers not there after {limit:g}s; "
                                              f"{text}")
                await asyncio.sleep(0.1)  # polling interval of the deadline loop

        return self._run(waiter)

    def waiting_for(self, n_workers: int) -> str:
        """What ``wait_for_workers(n_workers)`` is waiting for, in one line (see there)."""
        have = len(self._registered())
        head = (f"waiting for {n_workers} worker{'' if n_workers == 1 else 's'} "
                f"({have} connected)")
        parts = self._table.describe_active(self.spec.processes)
        if not parts:
            parts.append("no job queued or running (call scale() or adapt() first)")
        if self._paused_until and time.monotonic() < self._paused_until:
            parts.append(f"submission paused for {self._paused_until - time.monotonic():.0f}s "
                         f"after {self._table.failures_in_a_row} jobs ended without a worker")
        return f"{head}: {', '.join(parts)}"

    def close(self, timeout: float | None = None):
        """Close the scheduler, cancel every job of the cluster, wait until they left the queue."""
        return super().close(timeout)

    def __repr__(self) -> str:
        active = self._table.active()
        return (f"{type(self).__name__}({self.scheduler_address!r}, jobs={len(active)}, "
                f"workers={len(self._registered())}, status={self.status})")

    def _repr_html_(self) -> str:
        from cluster.runtime.dashboard.reprs import jobqueue_cluster_repr_html

        return jobqueue_cluster_repr_html(self)

    # ------------------------------------------------------------------ plumbing

    def _registered(self) -> dict[str, str]:
        return self._table.workers()

    def _poke(self) -> None:
        if self.loop is None or self._wake is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._wake.set()
        else:
            self.loop.call_soon_threadsafe(self._wake.set)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ start and close

    async def _start(self):
        if self.status in ("running", "starting"):
            return self
        if self.status != "created":
            raise RuntimeError(f"cluster is {self.status}; it cannot start again")
        self.status = "starting"
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        if self.spec.log_directory is not None:
            os.makedirs(self.spec.log_directory, exist_ok=True)
        if self.credentials_file is not None:
            self._write_credentials()
        self.scheduler = await Scheduler(**self.scheduler_options)
        host = self.scheduler.address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
        if host.startswith("127.") or host in ("localhost", "::1"):
            logger.warning("%s: the scheduler listens on %s, so only workers on this machine "
                           "can connect; on a cluster pass interface='ib0' (or "
                           "scheduler_options={'host': ...})", type(self).__name__,
                           self.scheduler.address)
        self._finalizer = weakref.finalize(self, cancel_leftovers, self.runner,
                                           tuple(self.system.cancel_command), self._live_ids,
                                           self.system.title, self.command_timeout)
        self.status = "running"
        self._watcher = asyncio.ensure_future(self._watch())
        if self._target_workers:
            await self._scale_now()
        return self

    def _write_credentials(self) -> None:
        """Write the workers' credentials file (0600 in a 0700 directory); remove it at exit."""
        path = self.credentials_file
        make_private_directory(os.path.dirname(path))
        # Removed at garbage collection or interpreter exit if close() never runs.
        self._credentials_finalizer = weakref.finalize(self, remove_file, path)
        worker_security(self.security).to_file(path)
        logger.info("%s: workers' TLS credentials in %s (mode 0600; removed on close)",
                    type(self).__name__, path)

    async def _close(self) -> None:
        if self.status in ("closed", "closing", "created"):
            self.status = "closed" if self.status == "created" else self.status
            return
        self.status = "closing"
        try:
            await self._close_all()
        finally:
            if self._credentials_finalizer is not None:
                self._credentials_finalizer()  # removes the credentials file, once
            self.status = "closed"

    async def _close_all(self) -> None:
        # Under the lock: a step never stops between a submission and recording
        # its job id (that job would be orphaned).
        async with self._lock:
            tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
            for t in tasks:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.scheduler is not None:
            await self.scheduler.close()
        ids = self._table.active_ids()
        if ids:
            await self._cancel(ids)
            await self._wait_until_gone(self.close_timeout)
        if self._finalizer is not None:
            left = set(self._live_ids)
            if left:
                logger.warning("%s jobs %s still listed after close(); cancelling them again "
                               "at exit", self.system.title, sorted(left))
            else:
                self._finalizer.detach()

    async def _wait_until_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._table.active_ids():
            await self._poll_status(grace=0.0)
            if not self._table.active_ids() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)  # polling interval of the deadline loop

    # ------------------------------------------------------------------ the watcher

    async def _watch(self) -> None:
        while True:
            interval = self.status_interval
            if self._adaptive is not None:
                interval = min(interval, self._adaptive.interval)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                async with self._lock:
                    await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s cluster step failed; retrying in %gs", self.system.title, interval)

    async def _scale_now(self) -> None:
        async with self._lock:
            await self._step(poll=bool(self._table.active_ids()))

    async def _step(self, poll: bool | None = None) -> None:
        if self.status != "running":
            return
        now = time.monotonic()
        if poll or (poll is None and now >= self._next_status):
            self._next_status = now + self.status_interval
            try:
                await self._poll_status(grace=2 * self.status_interval + 10)
            except CommandError as e:
                logger.warning("%s status call failed (job states unchanged): %s", self.system.title, e)
        self._apply_workers()
        await self._reconcile()

    def _apply_workers(self) -> None:
        """Assign the scheduler's workers to jobs; log (INFO) each job's workers as they come."""
        before = {j.id: len(j.workers) for j in self._table.active()}
        self._table.apply_workers({str(ws.name): (addr, ws.status)
                                   for addr, ws in self.scheduler.state.workers.items()})
        for job in self._table.active():
            n = len(job.workers)
            if n > before.get(job.id, 0):
                logger.info("%s job %s: %d/%d workers connected", self.system.title, job.id, n,
                            self.spec.processes)

    async def _poll_status(self, grace: float) -> None:
        ids = self._table.active_ids()
        if not ids:
            return
        states = await self.system.states(self.runner, ids, self.command_timeout)
        before = {jid: (self._table[jid].native_state, self._table[jid].reason) for jid in ids}
        ended = self._table.apply_status(states, ids, grace)
        for jid in ids:
            job = self._table.jobs.get(jid)
            if job is not None and job.finished is None \
                    and (job.native_state, job.reason) != before[jid]:
                logger.info("%s job %s is %s%s", self.system.title, jid, job.native_state,
                            f" ({job.reason})" if job.reason else "")
        for job in ended:
            self._live_ids.discard(job.id)
            if job.state == JobState.DONE or job.cancel_requested:
                logger.info("%s job %s ended: %s (%s)", self.system.title, job.id, job.state,
                            job.native_state)
            else:
                logger.warning("%s job %s ended %s (%s)%s", self.system.title, job.id, job.state,
                               job.native_state, "" if job.ever_workers
                               else " without starting a worker")

    async def _reconcile(self) -> None:
        adaptive = self._adaptive
        if adaptive is not None:
            sizing = elastic.adaptive_sizing(self.scheduler.state, adaptive.target_duration)
            adaptive.observe(sizing)
            target, policy = sizing.target, adaptive.policy
        else:
            target, policy = self._target_workers, self._policy
        obs = Observation(target, self._table.views(self.spec.lifetime.ending_after),
                          self._closable_jobs())
        decision = policy.decide(obs)
        if decision.submit and self._submission_allowed():
            await self._submit(decision.submit)
        if decision.close:
            for jid in decision.close:
                self._table[jid].closing = True
            self._spawn(self._close_jobs(list(decision.close), idle_only=policy.mode == "adapt"))

    def _submission_allowed(self) -> bool:
        failures = self._table.failures_in_a_row
        if failures < FAILURES_BEFORE_BACKOFF:
            self._paused_until = 0.0
            return True
        now = time.monotonic()
        if self._paused_until == 0.0:
            pause = min(MAX_BACKOFF, 30.0 * 2 ** (failures - FAILURES_BEFORE_BACKOFF))
            self._paused_until = now + pause
            where = (f"; see the job output in {self.spec.log_directory}"
                     if self.spec.log_directory else "")
            logger.error("%d %s jobs in a row ended without starting a worker; pausing "
                         "submission for %gs (check the job script: cluster.job_script())%s",
                         failures, self.system.title, pause, where)
            return False
        if now < self._paused_until:
            return False
        self._paused_until = 0.0
        self._table.failures_in_a_row = FAILURES_BEFORE_BACKOFF - 1  # one more try, then pause longer
        return True

    def _closable_jobs(self) -> list[str]:
        state = self.scheduler.state
        table = self._table

        def key(ws):
            return table.job_of(ws.name) or ws.address

        order: list[str] = []
        for address in self.scheduler.workers_to_close(key=key):
            ws = state.workers.get(address)
            jid = table.job_of(ws.name) if ws is not None else None
            if jid is not None and jid not in order:
                order.append(jid)
        return order

    # ------------------------------------------------------------------ submitting and cancelling

    async def _submit(self, n: int) -> list[str]:
        script = self.job_script()
        ids: list[str] = []
        with tempfile.TemporaryDirectory(prefix="jobqueue-") as tmp:
            path = os.path.join(tmp, f"{self.spec.job_name}.sh")
            with open(path, "w", encoding="utf-8") as f:
                f.write(script)
            for _ in range(n):
                jid = await self.system.submit(self.runner, path, self.command_timeout)
                self._table.add(jid)
                self._live_ids.add(jid)
                ids.append(jid)
                logger.info("submitted %s job %s", self.system.title, jid)
        return ids

    async def _cancel(self, ids: Sequence[str]) -> bool:
        for jid in ids:
            if jid in self._table:
                self._table[jid].cancel_requested = True
        try:
            result = await self.system.cancel(self.runner, ids, self.command_timeout)
        except CommandError as e:
            logger.error("cancelling %s jobs %s failed: %s", self.system.title, list(ids), e)
            return False
        if result.returncode != 0:
            # Often a job that ended just before: the next status call tells.
            logger.warning("cancelling %s jobs %s: %s", self.system.title, list(ids),
                           CancelError(result.argv, result.returncode, result.stdout, result.stderr))
            return False
        logger.info("cancelled %s jobs %s", self.system.title, ", ".join(ids))
        return True

    async def _close_jobs(self, ids: list[str], idle_only: bool = False) -> None:
        """Retire the workers of these jobs together (their data moves first), then cancel them.

        One ``retire_workers`` call for all of them: the scheduler marks every
        one of their workers as retiring before it plans the moves, so the data
        goes to workers that stay and no key is moved twice.  If the workers
        cannot retire (no room for their data elsewhere, or it did not move in
        time) the jobs are kept.

        Args:
            ids: the jobs to close.
            idle_only: keep a job whose workers got work since the decision
                (``adapt``: closing never interrupts a task).
        """
        state = self.scheduler.state
        jobs = [self._table[jid] for jid in ids if jid in self._table]
        if idle_only:
            for job in [j for j in jobs if j.workers]:
                if any(state.workers[a].processing for a in job.workers.values()
                       if a in state.workers):
                    logger.info("%s job %s got work since it was chosen to close; keeping it",
                                self.system.title, job.id)
                    job.closing = False
                    jobs.remove(job)
        with_workers = [j for j in jobs if j.workers]
        addresses = [a for j in with_workers for a in j.workers.values()]
        if addresses:
            # Nothing between this check and retire_workers' planning yields to the loop.
            present = [state.workers[a] for a in addresses if a in state.workers]
            held = sum(ws.nbytes for ws in present)
            if self._adaptive is not None and idle_only:
                self._adaptive.record(
                    f"closing idle job{'' if len(with_workers) == 1 else 's'} "
                    f"{', '.join(j.id for j in with_workers)} ({len(addresses)} workers); "
                    f"{format_bytes(held)} of data on them moves to the workers that stay first")
            retired = await self.scheduler.retire_workers(workers=addresses, close_workers=True,
                                                          remove=True)
            still = [a for a in addresses if a in self.scheduler.state.workers]
            if not retired and still:
                kept = [j for j in with_workers if set(j.workers.values()) & set(still)]
                logger.warning("%s job%s %s: the workers could not retire (no other worker could "
                               "take their data, or it did not move in time); keeping %s",
                               self.system.title, "" if len(kept) == 1 else "s",
                               ", ".join(j.id for j in kept), "it" if len(kept) == 1 else "them")
                if self._adaptive is not None and idle_only:
                    self._adaptive.record(f"could not retire the workers of job(s) "
                                          f"{', '.join(j.id for j in kept)}; keeping them")
                for j in kept:
                    j.closing = False
                jobs = [j for j in jobs if j not in kept]
        if jobs:
            await self._cancel([j.id for j in jobs])

__all__ = ["Adaptive", "JobQueueCluster"]
