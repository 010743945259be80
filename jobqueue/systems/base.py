"""What every batch system is: its commands, its outputs, its job scripts (no state of its own).

Theory of operation
-------------------
A :class:`BatchSystem` is a *part* of a cluster (and of a one-shot MPI job),
never its base class.  Everything that differs between SLURM, PBS and Grid
Engine lives in one subclass per system, in one module of
:mod:`cluster.jobqueue.systems`:

- **the commands**: ``submit_command``/``cancel_command``/``status_command``
  as class attributes, :meth:`status_argv` and :meth:`outcome_argv` for the
  ones that need the job ids placed;
- **the outputs**: :meth:`parse_job_id` (``job_id_regexp``),
  :meth:`parse_status` (the one status call for all jobs, mapped through
  ``state_table`` to :class:`~cluster.jobqueue.states.JobState`), :meth:`parse_outcome`
  (a finished job's state and exit code);
- **the job scripts**: the template (``template_name``, ``mpi_template_name``),
  ``directive_prefix``, ``job_id_variable``, and the template values of the
  system's own options (:meth:`values` for a cluster's worker jobs,
  :meth:`mpi_values` and :meth:`launch_words` for one MPI job);
- **its own options** (``job_cpu`` for SLURM, ``resource_spec`` for PBS and
  Grid Engine, ...): :attr:`options` names them; the instance holds their
  checked values (:meth:`__init__`), so one cluster's system is one instance.

The async class methods :meth:`submit`, :meth:`cancel` and :meth:`states`
run the commands through a *runner* (the one subprocess seam,
:mod:`cluster.jobqueue.commands`) and turn what the batch system said into values or
typed errors.  Adding a system is one module with one subclass (about 150
lines), one template and its MPI variant, and one line in
:data:`cluster.jobqueue.systems.SYSTEMS` (see docs/architecture.md).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..commands import DEFAULT_TIMEOUT, CommandResult, Runner, check
from ..errors import JobIdNotFoundError, SubmitError
from ..states import JobState, JobStatus

if TYPE_CHECKING:
    from ..job import JobSpec
    from ..submit import MPIJobSpec


class BatchSystem:
    """Commands, outputs and job-script values of one batch system (subclasses set the class attributes).

    Args:
        **options: the system's own options (named in :attr:`options`); a
            subclass checks them and keeps their values.

    Raises:
        TypeError: an option this system does not take.
    """

    #: ``system=`` name that selects it (``"slurm"``).
    name: ClassVar[str] = ""
    #: Name for messages (``"SLURM"``).
    title: ClassVar[str] = "batch"
    #: Our template for a cluster's worker jobs (in :mod:`cluster.templates`).
    template_name: ClassVar[str] = ""
    #: Our template for one MPI job; it extends :attr:`template_name`.
    mpi_template_name: ClassVar[str] = ""
    #: What starts a directive line.
    directive_prefix: ClassVar[str] = "#"
    #: The environment variable holding the job id inside a running job.
    job_id_variable: ClassVar[str] = ""
    #: Submits a job script (its path is appended).
    submit_command: ClassVar[tuple[str, ...]] = ()
    #: Cancels jobs (their ids are appended).
    cancel_command: ClassVar[tuple[str, ...]] = ()
    #: Reports job states (see :meth:`status_argv`).
    status_command: ClassVar[tuple[str, ...]] = ()
    #: Finds the job id in the submit command's output.
    job_id_regexp: ClassVar[str] = r"(?P<job_id>\d+)"
    #: Native job state -> JobState.
    state_table: ClassVar[Mapping[str, JobState]] = {}
    #: The system's own options (keyword arguments of the cluster and of :meth:`__init__`).
    options: ClassVar[tuple[str, ...]] = ()
    #: MPI launchers that only this system runs (``srun`` on SLURM).
    own_launchers: ClassVar[tuple[str, ...]] = ()
    #: The exit code of a job whose state says it completed when the outcome
    #: command gives none (SLURM's ``COMPLETED``: every step exited 0).
    done_exit_code: ClassVar[int | None] = None

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"{self.title} takes no option{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{o}={getattr(self, o, None)!r}" for o in self.options)
        return f"{type(self).__name__}({shown})"

    @classmethod
    def job_id_expression(cls) -> str:
        """The job id as a shell expression inside a running job (``${SLURM_JOB_ID}``)."""
        return f"${{{cls.job_id_variable}}}"

    @classmethod
    def fold_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Adjust a cluster's keyword arguments before they are read (aliases, e.g. PBS's ``project``).

        Returns:
            the options, changed or not.
        """
        return options

    # ------------------------------------------------------------------ job scripts

    def values(self, spec: JobSpec) -> dict[str, Any]:
        """Template values of this system for a cluster's worker jobs (``walltime`` and its own)."""
        raise NotImplementedError

    @classmethod
    def mpi_values(cls, spec: MPIJobSpec) -> dict[str, Any]:
        """Template values of this system for one MPI job (``walltime`` and its resource lines)."""
        raise NotImplementedError

    @classmethod
    def launch_words(cls, spec: MPIJobSpec) -> list[str]:
        """The launcher and its rank count, before the launcher's own arguments.

        ``mpirun -n N`` (or ``mpiexec``, or a path); a system whose own
        launcher starts ranks (SLURM's ``srun``) overrides this.
        """
        return [spec.launcher, "-n", str(spec.ntasks)]

    # ------------------------------------------------------------------ argv lists and outputs

    @classmethod
    def submit_argv(cls, script_path: str) -> list[str]:
        """The submit command for the job script at ``script_path``."""
        return [*cls.submit_command, script_path]

    @classmethod
    def cancel_argv(cls, job_ids: Sequence[str]) -> list[str]:
        """The cancel command for all of ``job_ids``."""
        return [*cls.cancel_command, *job_ids]

    @classmethod
    def status_argv(cls, job_ids: Sequence[str]) -> list[str]:
        """The one status command for all of ``job_ids``."""
        raise NotImplementedError

    @classmethod
    def parse_status(cls, result: CommandResult,
                     job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """``{job id: JobStatus(native state, JobState, reason)}`` of the listed jobs among ``job_ids``.

        Jobs the batch system no longer knows are left out.

        Raises:
            StatusError: the output says nothing usable (e.g. the server is down).
        """
        raise NotImplementedError

    @classmethod
    def outcome_argv(cls, job_id: str) -> list[str]:
        """The command that reports a finished job's state and exit code."""
        raise NotImplementedError

    @classmethod
    def outcome_fallback_argv(cls, job_id: str) -> list[str] | None:
        """A second outcome command, tried when the first one fails (``None``: there is none)."""
        return None

    @classmethod
    def parse_outcome(cls, result: CommandResult) -> tuple[JobState | None, int | None]:
        """``(state, exit code)`` from :meth:`outcome_argv`'s output; ``None`` for what it lacks."""
        raise NotImplementedError

    @classmethod
    def parse_job_id(cls, result: CommandResult) -> str:
        """The job id in the submit command's output.

        Raises:
            JobIdNotFoundError: no match of ``job_id_regexp``.
        """
        m = re.search(cls.job_id_regexp, result.stdout)
        if m is None:
            raise JobIdNotFoundError(result.argv, result.stdout, cls.job_id_regexp)
        return m.group("job_id")

    @staticmethod
    def normalize_job_id(job_id: str) -> str:
        """A job id's comparable form (workers' names may carry a longer form)."""
        return job_id

    # ------------------------------------------------------------------ running them

    @classmethod
    async def submit(cls, runner: Runner, script_path: str,
                     timeout: float = DEFAULT_TIMEOUT) -> str:
        """Submit the job script at ``script_path``; return its job id.

        Raises:
            SubmitError: the submit command failed (argv, exit code, stdout, stderr).
            JobIdNotFoundError: it succeeded but printed no job id.
            CommandNotFoundError, CommandTimeoutError: from the runner.
        """
        result = await runner(cls.submit_argv(script_path), timeout=timeout)
        check(result, SubmitError)
        return cls.parse_job_id(result)

    @classmethod
    async def cancel(cls, runner: Runner, job_ids: Sequence[str],
                     timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        """Cancel ``job_ids`` with one command; return its result, whatever its status.

        A non-zero status often means a job ended just before; the caller decides.

        Raises:
            CommandNotFoundError, CommandTimeoutError: from the runner.
        """
        return await runner(cls.cancel_argv(list(job_ids)), timeout=timeout)

    @classmethod
    async def states(cls, runner: Runner, job_ids: Sequence[str],
                     timeout: float = DEFAULT_TIMEOUT) -> dict[str, JobStatus]:
        """The states of ``job_ids`` from one status command (jobs no longer listed left out).

        Raises:
            StatusError: the status command gave nothing usable.
            CommandNotFoundError, CommandTimeoutError: from the runner.
        """
        result = await runner(cls.status_argv(list(job_ids)), timeout=timeout)
        return cls.parse_status(result, job_ids)


def check_resource_spec(value: Any, option: str = "resource_spec",
                        example: str = "select=1:ncpus=8:mem=16gb") -> str | None:
    """``value`` if it is ``None`` or one non-empty line.

    Raises:
        ValueError: anything else, naming ``option``.
    """
    if value is not None and (not isinstance(value, str) or not value.strip() or "\n" in value):
        raise ValueError(f"{option}={value!r}: expected a resource list like {example!r}")
    return value


def check_word(value: Any, option: str, what: str) -> str | None:
    """``value`` if it is ``None`` or one word safe in a directive line.

    Raises:
        ValueError: anything else, naming ``option``.
    """
    if value is not None and (not isinstance(value, str) or not value
                              or shlex.split(value) != [value]):
        raise ValueError(f"{option}={value!r}: expected {what}")
    return value


__all__ = ["BatchSystem", "check_resource_spec", "check_word"]
