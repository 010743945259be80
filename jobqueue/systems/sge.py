"""Grid Engine (SGE, Son of Grid Engine, Open Grid Scheduler): ``qsub``, ``qstat``, ``qdel``; ``#$`` directives.

Submission: ``qsub -terse SCRIPT`` prints the job id alone.  Status: one
plain ``qstat`` lists this user's queued and running jobs (Grid Engine's
``qstat`` takes no job ids for its table); its columns are ``job-ID prior
name user state submit/start-at queue slots ja-task-ID``, the state the fifth
(``qw``, ``hqw``, ``r``, ``t``, ``Rr``, ``dr``, ``Eqw``, ...), and a job that
ended is no longer listed.  A finished job's exit code: ``qacct -j ID``
(``failed`` and ``exit_status``, from the accounting file).  A job's cores
are slots of a parallel environment (``-pe smp <cores>``); its walltime is
``-l h_rt=HH:MM:SS``; it runs in the directory it was submitted from
(``-cwd``) under the shell of the script's shebang (``-S``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..commands import CommandResult
from ..errors import StatusError
from ..states import JobState, JobStatus, map_state
from ..units import hms
from .base import BatchSystem, check_resource_spec, check_word

if TYPE_CHECKING:
    from ..job import JobSpec
    from ..submit import MPIJobSpec

#: Grid Engine job states (``qstat`` column ``state``) -> JobState.  ``E``
#: (error) is a job the system will not run: FAILED, though it stays listed.
SGE_STATES: dict[str, JobState] = {
    "qw": JobState.PENDING, "hqw": JobState.PENDING, "hRwq": JobState.PENDING,
    "Rq": JobState.PENDING, "Rqw": JobState.PENDING, "hRqw": JobState.PENDING,
    "w": JobState.PENDING, "s": JobState.PENDING, "ts": JobState.PENDING,
    "S": JobState.PENDING, "tS": JobState.PENDING, "T": JobState.PENDING,
    "tT": JobState.PENDING, "Rs": JobState.PENDING, "Rts": JobState.PENDING,
    "RS": JobState.PENDING, "RtS": JobState.PENDING, "RT": JobState.PENDING,
    "RtT": JobState.PENDING,
    "r": JobState.RUNNING, "t": JobState.RUNNING, "Rr": JobState.RUNNING,
    "Rt": JobState.RUNNING, "hr": JobState.RUNNING,
    "dr": JobState.COMPLETING, "dt": JobState.COMPLETING, "dRr": JobState.COMPLETING,
    "dRt": JobState.COMPLETING, "ds": JobState.COMPLETING, "dS": JobState.COMPLETING,
    "dT": JobState.COMPLETING, "dRs": JobState.COMPLETING, "dqw": JobState.COMPLETING,
    "Eqw": JobState.FAILED, "Ehqw": JobState.FAILED, "EhRqw": JobState.FAILED,
}

#: Default parallel environment for a job's cores (``-pe smp <cores>``).
DEFAULT_PARALLEL_ENVIRONMENT = "smp"


class SGE(BatchSystem):
    """Grid Engine.

    Args:
        project: the project of the jobs (``#$ -P``).
        resource_spec: the ``-l`` resource request of each job (e.g.
            ``"h_vmem=16G,mem_free=16G"``; default: none).
        parallel_environment: the parallel environment whose slots are the
            job's cores (``#$ -pe <pe> <cores>``; default ``"smp"``, ``None``
            leaves the line out).

    Raises:
        ValueError: a bad value, named.
    """

    name = "sge"
    title = "SGE"
    template_name = "sge.sh.j2"
    mpi_template_name = "sge-mpi.sh.j2"
    directive_prefix = "#$"
    job_id_variable = "JOB_ID"
    submit_command = ("qsub", "-terse")
    cancel_command = ("qdel",)
    status_command = ("qstat",)
    job_id_regexp = r"(?P<job_id>\d+)"
    state_table = SGE_STATES
    options = ("project", "resource_spec", "parallel_environment")

    def __init__(self, project: str | None = None, resource_spec: str | None = None,
                 parallel_environment: str | None = DEFAULT_PARALLEL_ENVIRONMENT):
        self.project = check_word(project, "project", "a project name")
        self.resource_spec = check_resource_spec(resource_spec, example="h_vmem=16G")
        self.parallel_environment = check_word(parallel_environment, "parallel_environment",
                                               "the name of a parallel environment, e.g. 'smp'")

    @staticmethod
    def shell(shebang: str) -> str:
        """The ``-S`` shell of a shebang line: its program, or bash for ``/usr/bin/env``."""
        words = shebang[2:].split()
        if not words or words[0].endswith("/env"):
            name = words[1] if len(words) > 1 else "bash"
            return name if name.startswith("/") else f"/bin/{name}"
        return words[0]

    def values(self, spec: JobSpec) -> dict[str, Any]:
        return {
            "walltime": None if spec.walltime is None else hms(spec.walltime),
            "project": self.project,
            "resource_spec": self.resource_spec,
            "parallel_environment": self.parallel_environment,
            "slots": spec.cores,
            "shell": self.shell(spec.shebang),
        }

    @classmethod
    def mpi_values(cls, spec: MPIJobSpec) -> dict[str, Any]:
        return {
            "walltime": None if spec.walltime is None else hms(spec.walltime),
            "project": None,
            "resource_spec": spec.resource_spec,
            "parallel_environment": spec.parallel_environment or DEFAULT_PARALLEL_ENVIRONMENT,
            "slots": spec.ntasks * spec.cpus_per_task,
            "shell": cls.shell(spec.shebang),
        }

    @classmethod
    def status_argv(cls, job_ids: Sequence[str]) -> list[str]:
        return list(cls.status_command)

    @classmethod
    def parse_status(cls, result: CommandResult,
                     job_ids: Sequence[str]) -> dict[str, JobStatus]:
        if result.returncode != 0:
            raise StatusError(result.argv, result.returncode, result.stdout, result.stderr)
        wanted = set(job_ids)
        states: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) < 5 or not fields[0].isdigit() or fields[0] not in wanted:
                continue
            native = fields[4]
            states[fields[0]] = JobStatus(native, map_state(cls.state_table, native, cls.title))
        return states

    @classmethod
    def outcome_argv(cls, job_id: str) -> list[str]:
        return ["qacct", "-j", job_id]

    @classmethod
    def parse_outcome(cls, result: CommandResult) -> tuple[JobState | None, int | None]:
        if result.returncode != 0:
            return None, None  # "error: job id 7 not found": not accounted (yet)
        # The last record: job numbers may have wrapped around.
        record = result.stdout.rsplit("==============================================", 1)[-1]
        failed = re.search(r"(?m)^failed\s+(\d+)", record)
        status = re.search(r"(?m)^exit_status\s+(-?\d+)", record)
        if failed is None and status is None:
            return None, None
        code = int(status.group(1)) if status else None
        ok = (failed is None or failed.group(1) == "0") and code == 0
        return (JobState.DONE if ok else JobState.FAILED), code


__all__ = ["DEFAULT_PARALLEL_ENVIRONMENT", "SGE", "SGE_STATES"]
