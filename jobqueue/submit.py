"""One-shot MPI jobs: ``python -m cluster submit`` and :func:`submit_mpi_job`.

Theory of operation
-------------------
A one-shot job runs one script under the MPI launcher (:mod:`cluster.hpc.launcher`)
in one batch job: ``ntasks`` ranks, rank 0 the scheduler and the script
(whose ``Client()`` finds the cluster), every other rank a nanny-managed
worker with ``cpus_per_task`` threads.  It is the batch form of
``mpirun -n N python -m cluster script.py args``.

- **Options** are checked by :func:`make_mpi_spec` with the helpers of
  :mod:`cluster.jobqueue.job` (a bad value raises a ``ValueError``/``TypeError``
  naming it) and frozen in an :class:`MPIJobSpec`.
- **The script** is the batch system's MPI template (``templates/slurm-mpi.sh.j2``,
  ``pbs-mpi.sh.j2``, ``sge-mpi.sh.j2``), rendered by
  :func:`cluster.jobqueue.job.render_script` (jinja2, ``StrictUndefined``).  Each
  extends the workers' template of its system: the directives, extra
  directives, ``export`` lines and prologue are theirs; the resource request
  comes from the system (:meth:`~cluster.jobqueue.systems.BatchSystem.mpi_values`;
  SLURM: ``--ntasks``, ``--cpus-per-task``, ``--mem-per-cpu``; PBS:
  ``-l select=<ntasks>:ncpus=<cpus>:mpiprocs=1[:mem=<memory>]`` or
  ``resource_spec``; SGE: ``-pe smp <ntasks * cpus>``) and they end with
  ``exec <launch command>``, so that the launcher's exit status -- the
  script's, :mod:`cluster.hpc.launcher` -- is the job's.  The script path and its
  arguments are quoted with :func:`shlex.quote`: the script receives them as
  given, spaces, quotes and ``$`` included.
- **The launch command** is ``mpirun -n N`` (or ``mpiexec``, or any path;
  ``--launcher-args`` follow), or ``srun --ntasks=N --cpus-per-task=C``
  (SLURM only; give the site's PMI, e.g. ``--mpi=pmi2``), then
  ``<python> -m cluster --nthreads C [--memory-limit M] [cluster args]
  script.py args``.
- **Submission** goes through the batch system's class methods
  (:class:`~cluster.jobqueue.systems.BatchSystem`, one module per system in
  :mod:`cluster.jobqueue.systems`) and so through the one subprocess seam
  (:mod:`cluster.jobqueue.commands`): a failing ``sbatch``/``qsub`` raises
  :class:`~cluster.jobqueue.errors.SubmitError` with the command, its exit code and
  its output.
- **The job** (:class:`MPIJob`) asks for its state with the same one status
  call as the clusters (``squeue --states=all``, ``qstat``).  Once the job is
  finished or no longer listed, one more call asks for its outcome --
  SLURM ``scontrol show job --oneliner ID`` (``ExitCode=3:0``), PBS
  ``qstat -x -f ID`` (``Exit_status = 3``; Torque's XML form is read too),
  SGE ``qacct -j ID`` (``exit_status  3``) --
  so a job that exited non-zero is ``FAILED`` with its exit code even where
  the state table cannot tell (PBS ``F``).  A job that left the batch system
  with no record at all is ``UNKNOWN``, its exit code ``None``.

``python -m cluster submit`` (:func:`cluster.jobqueue.submit_cli.main`) prints the job id alone on
standard output; ``--dry-run`` prints the script instead and submits nothing;
``--wait`` then waits for the end and exits with the job's status (0 when
done; the job's exit code when it failed, or 1 if that is unknown).  Bad
options exit with status 2 and a message naming the option; a failing batch
command exits with status 1 and its error, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.runtime.process import python_command

from .commands import DEFAULT_TIMEOUT, Runner, run_command
from .errors import CancelError, CommandError
from .job import (
    JOB_NAME_PATTERN,
    _one_line,
    _strings,
    environment_variables,
    extra_directives,
    render_script,
)
from .plumbing import blocking
from .states import JobState
from .systems import SYSTEMS as BATCH_SYSTEMS
from .systems import BatchSystem
from .systems.base import check_resource_spec, check_word
from .units import exact_size, parse_memory, parse_walltime

logger = logging.getLogger(__name__)

#: Default ``job_name`` of a one-shot MPI job.
DEFAULT_MPI_JOB_NAME = "hpc-mpi"

#: Seconds between two status calls while waiting for a job (``--poll-interval``).
DEFAULT_POLL_INTERVAL = 5.0

#: Status calls in a row that may fail while waiting before the wait gives up.
STATUS_FAILURES_TOLERATED = 5

#: Accepted ``system=`` values.
SYSTEMS = tuple(BATCH_SYSTEMS)


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MPIJobSpec:
    """The checked options of one MPI job (see :func:`make_mpi_spec` for each)."""

    system: str
    script: str
    args: tuple[str, ...]
    ntasks: int
    walltime: int | None = None
    cpus_per_task: int = 1
    memory: int | None = None
    queue: str | None = None
    account: str | None = None
    job_name: str = DEFAULT_MPI_JOB_NAME
    job_extra_directives: tuple[str, ...] = ()
    launcher: str = "mpirun"
    launcher_args: tuple[str, ...] = ()
    cluster_args: tuple[str, ...] = ()
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)
    prologue: tuple[str, ...] = ()
    log_directory: str | None = None
    shebang: str = "#!/usr/bin/env bash"
    resource_spec: str | None = None
    parallel_environment: str | None = None

    @property
    def batch(self) -> type[BatchSystem]:
        """The batch system (its commands, outputs and template values)."""
        return BATCH_SYSTEMS[self.system]


def _check_cluster_args(args: tuple[str, ...]) -> None:
    """Parse ``cluster_args`` as the MPI launcher would, so a bad one fails before submission."""
    from cluster.hpc.launcher import build_parser

    parser = build_parser()

    def error(message: str) -> None:
        raise ValueError(f"cluster_args={list(args)!r}: {message} (see 'python -m cluster --help')")

    parser.error = error  # type: ignore[method-assign]
    ns = parser.parse_args(list(args))
    if ns.script is not None:
        error(f"unexpected argument {ns.script!r}: give the script separately, not in cluster_args")


def _positive(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option}={value!r}: expected a positive integer")
    return value


def make_mpi_spec(script: str | os.PathLike[str], args: Sequence[str] = (), *,
                  system: str = "slurm", ntasks: int, walltime: Any = None,
                  cpus_per_task: int = 1, memory: Any = None, queue: str | None = None,
                  account: str | None = None, job_name: str = DEFAULT_MPI_JOB_NAME,
                  job_extra_directives: Sequence[str] | None = None, launcher: str = "mpirun",
                  launcher_args: Sequence[str] | None = None,
                  cluster_args: Sequence[str] | None = None, python: str | None = None,
                  env: Mapping[str, Any] | None = None, prologue: Sequence[str] | None = None,
                  log_directory: str | os.PathLike[str] | None = None,
                  shebang: str = "#!/usr/bin/env bash", resource_spec: str | None = None,
                  parallel_environment: str | None = None) -> MPIJobSpec:
    """Check the options of one MPI job and freeze them.

    Args:
        script: the Python script rank 0 runs (a path as the job sees it,
            relative to the directory the job is submitted from).
        args: its arguments, passed to it exactly as given.
        system: ``"slurm"``, ``"pbs"`` or ``"sge"``.
        ntasks: MPI ranks (at least 2: rank 0 runs the scheduler and the
            script, every other rank a worker).
        walltime: the job's time limit (``"01:00:00"``, ``"90m"``; default:
            the batch system's).
        cpus_per_task: CPUs of each rank, and threads of each worker.
        memory: memory of each rank (``"4GB"``): SLURM ``--mem-per-cpu``, PBS
            ``mem=`` of each chunk, each worker's ``--memory-limit``.
        queue: partition (SLURM) or queue (PBS).
        account: account to charge (SLURM ``--account``, PBS ``-A``).
        job_name: the job's name (a letter, then letters, digits, ``_.-``).
        job_extra_directives: more directive lines (the prefix is added when missing).
        launcher: ``"mpirun"``, ``"mpiexec"``, ``"srun"`` (SLURM only) or a
            path to one of them.
        launcher_args: arguments of the launcher (``["--mpi=pmi2"]``).
        cluster_args: more options of ``python -m cluster`` (``["--interface", "ib0"]``).
        python: the Python the ranks run (default: this one).
        env: environment variables exported before the launch.
        prologue: shell lines run before the launch (``"module load mpi"``).
        log_directory: where the job's output goes (created at submission).
        shebang: the script's first line.
        resource_spec: the resource request instead of ours (PBS: ``-l``, default
            ``select=<ntasks>:ncpus=<cpus>:mpiprocs=1[:mem=<memory>]``; Torque
            wants ``nodes=1:ppn=<ntasks>``; SGE: ``-l``, default none).
        parallel_environment: SGE: the parallel environment of the ranks' slots
            (default ``"smp"``; ``-pe <pe> <ntasks * cpus_per_task>``).

    Raises:
        ValueError: a missing or bad value, named in the message (also a
            script that does not exist).
        TypeError: a value of the wrong type, named likewise.
    """
    system_name = system.lower() if isinstance(system, str) else system
    if system_name not in BATCH_SYSTEMS:
        raise ValueError(f"system={system!r}: expected one of {', '.join(SYSTEMS)}")
    script_path = _one_line(script, "script")
    if not os.path.isfile(script_path):
        raise ValueError(f"script={script_path!r}: no such file")
    if isinstance(args, str):
        raise TypeError(f"args={args!r}: expected a list of strings, not one string")
    script_args = _strings(args, "args")
    n = _positive(ntasks, "ntasks")
    if n < 2:
        raise ValueError(f"ntasks={ntasks!r}: an MPI job needs at least 2 ranks (rank 0 runs the "
                         "scheduler and the script, every other rank a worker)")
    cpus = _positive(cpus_per_task, "cpus_per_task")
    if not isinstance(job_name, str) or not JOB_NAME_PATTERN.match(job_name):
        raise ValueError(f"job_name={job_name!r}: expected a letter followed by letters, digits, "
                         "'_', '.' or '-'")
    launcher_cmd = _one_line(launcher, "launcher")
    batch = BATCH_SYSTEMS[system_name]
    for other in BATCH_SYSTEMS.values():
        if other is not batch and os.path.basename(launcher_cmd) in other.own_launchers:
            raise ValueError(f"launcher={launcher!r} starts ranks in {other.title} jobs only; "
                             f"with system={system!r} use mpirun or mpiexec")
    if parallel_environment is not None and system_name != "sge":
        raise ValueError(f"parallel_environment={parallel_environment!r}: only Grid Engine "
                         f"(system='sge') has parallel environments, not system={system!r}")
    if resource_spec is not None and system_name == "slurm":
        raise ValueError(f"resource_spec={resource_spec!r}: SLURM takes its resources from "
                         "ntasks, cpus_per_task and memory (or job_extra_directives)")
    cluster_extra = _strings(cluster_args, "cluster_args")
    _check_cluster_args(cluster_extra)
    shebang_line = _one_line(shebang, "shebang")
    if not shebang_line.startswith("#!"):
        raise ValueError(f"shebang={shebang!r}: expected a line starting with '#!'")
    return MPIJobSpec(
        system=system_name, script=script_path, args=script_args, ntasks=n,
        walltime=None if walltime is None else parse_walltime(walltime, "walltime"),
        cpus_per_task=cpus, memory=None if memory is None else parse_memory(memory, "memory"),
        queue=_one_line(queue, "queue"), account=_one_line(account, "account"),
        job_name=job_name,
        job_extra_directives=extra_directives(job_extra_directives, batch.directive_prefix),
        launcher=launcher_cmd, launcher_args=_strings(launcher_args, "launcher_args"),
        cluster_args=cluster_extra, python=_one_line(python, "python") or sys.executable,
        env=environment_variables(env), prologue=_strings(prologue, "prologue"),
        log_directory=_one_line(log_directory, "log_directory"), shebang=shebang_line,
        resource_spec=check_resource_spec(resource_spec),
        parallel_environment=check_word(parallel_environment, "parallel_environment",
                                        "the name of a parallel environment, e.g. 'smp'"),
    )


# ----------------------------------------------------------------------------- the script


def launch_command(spec: MPIJobSpec) -> str:
    """The shell line that starts the ranks, every word quoted (the script's arguments too)."""
    words = spec.batch.launch_words(spec)
    # -P (or its bootstrap): the job's working directory is not on the ranks' sys.path;
    # the script's own directory is, as with ``python script.py``.
    words += [*spec.launcher_args, *python_command("cluster", executable=spec.python),
              "--nthreads", str(spec.cpus_per_task)]
    if spec.memory is not None:
        words += ["--memory-limit", exact_size(spec.memory)]
    words += [*spec.cluster_args, spec.script, *spec.args]
    return shlex.join(words)


def _values(spec: MPIJobSpec) -> dict[str, Any]:
    return {
        "shebang": spec.shebang,
        "job_name": spec.job_name,
        "queue": spec.queue,
        "account": spec.account,
        "log_directory": spec.log_directory,
        "ntasks": spec.ntasks,
        "cpus_per_task": spec.cpus_per_task,
        "job_extra_directives": list(spec.job_extra_directives),
        "env": dict(spec.env),
        "job_script_prologue": list(spec.prologue),
        "launch_command": launch_command(spec),
        **spec.batch.mpi_values(spec),
    }


def render_mpi_script(spec: MPIJobSpec) -> str:
    """The job script of ``spec``.

    Raises:
        TemplateError: the template uses a value nobody set (named).
    """
    batch = spec.batch
    return render_script(batch.mpi_template_name, _values(spec), prefix=batch.directive_prefix)


def mpi_job_script(script: str | os.PathLike[str], args: Sequence[str] = (),
                   **options: Any) -> str:
    """The job script that :func:`submit_mpi_job` would submit (options as there).

    Raises:
        ValueError, TypeError: a bad option, named.
    """
    return render_mpi_script(make_mpi_spec(script, args, **options))


# ----------------------------------------------------------------------------- the job


class MPIJob:
    """A submitted MPI job: its id, state, outcome; wait for it or cancel it.

    Every method has an ``_async`` twin for use in an event loop.

    Attributes:
        job_id: the batch system's id.
        system: ``"slurm"``, ``"pbs"`` or ``"sge"``.
        script: the job script as submitted.
        exit_code: the job's exit code once known (``None`` before, or if the
            batch system kept no record).
    """

    def __init__(self, job_id: str, system: str, script: str = "", *,
                 runner: Runner | None = None, command_timeout: float = DEFAULT_TIMEOUT):
        if system not in BATCH_SYSTEMS:
            raise ValueError(f"system={system!r}: expected one of {', '.join(SYSTEMS)}")
        self.job_id = job_id
        self.system = system
        self.script = script
        self.runner: Runner = runner or run_command
        self.command_timeout = command_timeout
        self.exit_code: int | None = None
        self._batch = BATCH_SYSTEMS[system]
        self._final: JobState | None = None
        self._cancel_requested = False

    def __repr__(self) -> str:
        state = f" {self._final}" if self._final is not None else ""
        code = f" exit code {self.exit_code}" if self.exit_code is not None else ""
        return f"<MPIJob {self.system} {self.job_id}{state}{code}>"

    @property
    def done(self) -> bool:
        """The job has ended (its state will not change any more)."""
        return self._final is not None

    @property
    def returncode(self) -> int | None:
        """A process exit status for the job's outcome: 0 when done, the exit code or 1 if not.

        ``None`` while the job has not ended.
        """
        if self._final is None:
            return None
        if self._final is JobState.DONE:
            return 0
        code = self.exit_code
        return code if code is not None and 1 <= code <= 255 else 1

    # ------------------------------------------------------------------ async

    async def state_async(self) -> JobState:
        """The job's state now, from one status call (and one outcome call when it ended).

        Raises:
            StatusError: the status command gave nothing usable.
            CommandNotFoundError, CommandTimeoutError: from the seam.
        """
        if self._final is not None:
            return self._final
        batch = self._batch
        listed = await batch.states(self.runner, [self.job_id], self.command_timeout)
        listed_state = listed[self.job_id][1] if self.job_id in listed else None
        if listed_state is not None and not listed_state.finished:
            return listed_state
        # Finished, or no longer listed: ask how it ended.
        outcome_state, code = await self._outcome()
        if listed_state is None and outcome_state is not None and outcome_state.active:
            return outcome_state  # not listed any more, yet not over: ask again later
        state = listed_state or (outcome_state if outcome_state and outcome_state.finished
                                 else None)
        if code is not None and code != 0:
            cancelled = state is JobState.CANCELLED or self._cancel_requested
            state = JobState.CANCELLED if cancelled else JobState.FAILED
        elif code == 0 and state is not JobState.CANCELLED:
            state = JobState.DONE
        elif code is None and state is JobState.DONE:
            code = batch.done_exit_code  # SLURM's COMPLETED: every step exited 0
        if state is None:
            state = JobState.UNKNOWN  # gone, and the batch system kept no record
        self._final, self.exit_code = state, code
        logger.info("%s job %s ended: %s (exit code %s)", self.system, self.job_id, state, code)
        return state

    async def _outcome(self) -> tuple[JobState | None, int | None]:
        batch = self._batch
        outcome: tuple[JobState | None, int | None] = (None, None)
        for argv in (batch.outcome_argv(self.job_id), batch.outcome_fallback_argv(self.job_id)):
            if argv is None:
                break
            try:
                result = await self.runner(argv, timeout=self.command_timeout)
            except CommandError as e:
                logger.warning("cannot ask how %s job %s ended: %s", self.system, self.job_id, e)
                return None, None
            outcome = batch.parse_outcome(result)
            if result.returncode == 0 or outcome != (None, None):
                break
        return outcome

    async def wait_async(self, timeout: float | None = None,
                         poll_interval: float = DEFAULT_POLL_INTERVAL) -> JobState:
        """Wait until the job has ended; return its final state.

        Args:
            timeout: seconds to wait at most (default: no limit).
            poll_interval: seconds between status calls.

        Raises:
            TimeoutError: the job had not ended after ``timeout`` seconds.
            StatusError: several status calls in a row failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            try:
                state = await self.state_async()
                failures = 0
            except CommandError as e:
                failures += 1
                if failures >= STATUS_FAILURES_TOLERATED:
                    raise
                logger.warning("asking for the state of %s job %s failed (%d in a row): %s",
                               self.system, self.job_id, failures, e)
                state = JobState.UNKNOWN
            if self.done:
                return state
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.system} job {self.job_id} is still {state} after "
                                   f"{timeout:g}s")
            pause = poll_interval
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            await asyncio.sleep(pause)  # polling interval of the wait, not synchronisation

    async def cancel_async(self) -> None:
        """Cancel the job (nothing happens if it has ended already).

        Raises:
            CancelError: the cancel command failed and the job has not ended.
        """
        if self._final is not None:
            return
        self._cancel_requested = True
        result = await self._batch.cancel(self.runner, [self.job_id],
                                                  self.command_timeout)
        if result.returncode != 0 and not (await self.state_async()).finished:
            raise CancelError(result.argv, result.returncode, result.stdout, result.stderr)
        logger.info("cancelled %s job %s", self.system, self.job_id)

    # ------------------------------------------------------------------ sync

    def state(self) -> JobState:
        """The job's state now (see :meth:`state_async`)."""
        return blocking(self.state_async)

    def wait(self, timeout: float | None = None,
             poll_interval: float = DEFAULT_POLL_INTERVAL) -> JobState:
        """Wait until the job has ended; return its final state (see :meth:`wait_async`)."""
        return blocking(lambda: self.wait_async(timeout, poll_interval))

    def cancel(self) -> None:
        """Cancel the job (see :meth:`cancel_async`)."""
        blocking(self.cancel_async)


async def submit_spec_async(spec: MPIJobSpec, *, runner: Runner | None = None,
                            command_timeout: float = DEFAULT_TIMEOUT) -> MPIJob:
    """Submit the job of ``spec``; return it.

    Raises:
        SubmitError: the submit command failed (command, exit code, output).
        JobIdNotFoundError: it printed no job id.
        CommandNotFoundError, CommandTimeoutError: from the seam.
    """
    text = render_mpi_script(spec)
    runner = runner or run_command
    if spec.log_directory is not None:
        os.makedirs(spec.log_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jobqueue-mpi-") as tmp:
        path = os.path.join(tmp, f"{spec.job_name}.sh")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        job_id = await spec.batch.submit(runner, path, command_timeout)
    logger.info("submitted %s MPI job %s (%d ranks): %s", spec.system, job_id, spec.ntasks,
                spec.script)
    return MPIJob(job_id, spec.system, text, runner=runner, command_timeout=command_timeout)


async def submit_mpi_job_async(script: str | os.PathLike[str], args: Sequence[str] = (), *,
                               runner: Runner | None = None,
                               command_timeout: float = DEFAULT_TIMEOUT,
                               **options: Any) -> MPIJob:
    """:func:`submit_mpi_job` in an event loop."""
    spec = make_mpi_spec(script, args, **options)
    return await submit_spec_async(spec, runner=runner, command_timeout=command_timeout)


def submit_mpi_job(script: str | os.PathLike[str], args: Sequence[str] = (), *,
                   runner: Runner | None = None, command_timeout: float = DEFAULT_TIMEOUT,
                   **options: Any) -> MPIJob:
    """Submit ``script`` with ``args`` as one MPI job under our launcher; return the job.

    Example::

        job = submit_mpi_job("analysis.py", ["--year", "2024"], system="slurm", ntasks=64,
                             walltime="01:00:00", queue="normal", memory="4GB")
        job.wait()            # JobState.DONE or FAILED/CANCELLED
        job.exit_code         # the script's exit status (mpirun's)

    Args:
        script, args: the script rank 0 runs and its arguments.
        runner: the subprocess seam (tests pass a fake).
        command_timeout: seconds each batch command may take.
        **options: see :func:`make_mpi_spec` (``system``, ``ntasks``, ``walltime``, ...).

    Raises:
        ValueError, TypeError: a bad option, named.
        SubmitError: the submit command failed (command, exit code, output).
        JobIdNotFoundError, CommandNotFoundError, CommandTimeoutError: likewise typed.
    """
    spec = make_mpi_spec(script, args, **options)
    return blocking(lambda: submit_spec_async(spec, runner=runner,
                                               command_timeout=command_timeout))


__all__ = [
    "DEFAULT_MPI_JOB_NAME",
    "DEFAULT_POLL_INTERVAL",
    "SYSTEMS",
    "MPIJob",
    "MPIJobSpec",
    "launch_command",
    "make_mpi_spec",
    "mpi_job_script",
    "render_mpi_script",
    "submit_mpi_job",
    "submit_mpi_job_async",
    "submit_spec_async",
]
