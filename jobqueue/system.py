"""One batch system's command-line surface: submit, cancel, ask for states (no state of its own).

Theory of operation
-------------------
:class:`BatchSystem` is what differs between SLURM, PBS and the rest, as
class attributes (the commands, the job-id pattern, the state table, the
template and its directive prefix) and class methods that build argv lists
and read outputs.  The three async class methods run the commands through a
*runner* (the seam of :mod:`jobqueue.commands`) and turn what the batch
system said into values or typed errors:

- :meth:`BatchSystem.submit`: ``sbatch``/``qsub`` a script file, return the
  job id (:class:`~jobqueue.errors.SubmitError` with argv, exit code, stdout
  and stderr if it fails; :class:`~jobqueue.errors.JobIdNotFoundError` if its
  output holds no id);
- :meth:`BatchSystem.cancel`: one ``scancel``/``qdel`` for many jobs;
- :meth:`BatchSystem.states`: one ``squeue``/``qstat`` for many jobs,
  mapped to :class:`~jobqueue.states.JobState`.

The clusters (:class:`~jobqueue.core.JobQueueCluster`) inherit from it; a
one-shot job submission needs nothing more than these class methods.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

from .commands import DEFAULT_TIMEOUT, CommandResult, Runner, check
from .errors import JobIdNotFoundError, SubmitError
from .states import JobState, JobStatus


class BatchSystem:
    """Commands and outputs of one batch system (subclasses set the class attributes)."""

    #: Name of the batch system, for messages.
    system: ClassVar[str] = "batch"
    #: Our template for this system (in :mod:`templates`).
    template_name: ClassVar[str] = ""
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


__all__ = ["BatchSystem"]
