"""PBS (OpenPBS, PBS Pro, Torque): ``qsub``, ``qstat``, ``qdel``; ``#PBS`` directives.

Status: one plain ``qstat <ids>`` for all the cluster's jobs; its table
(``Job id  Name  User  Time Use  S  Queue``) is the same on OpenPBS, Torque
and Torque's commands on SLURM (Debian's ``slurm-wlm-torque``), and the
state is the column before the queue.  OpenPBS cuts long ids to 15
characters and a ``*``; such a row matches the id it starts.  A job that has
left the server is not in the table: ``qstat`` says so on standard error
("Job has finished" on OpenPBS, "Unknown Job Id" on Torque) and exits
non-zero, which is not a failure of the call; ``slurm-wlm-torque``'s
``qstat`` exits 153 (Torque's "unknown job id") and prints nothing.
A finished job's exit code: ``qstat -x -f ID`` (OpenPBS ``Exit_status = 3``;
Torque reads ``-x`` as XML, read too); where ``-x`` is refused
(``slurm-wlm-torque``) ``qstat -f ID``, which shows the state only.
Memory is written in PBS's binary units (``gb`` = GiB, ``mb`` = MiB,
:mod:`cluster.jobqueue.units`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..commands import CommandResult
from ..errors import StatusError
from ..states import JobState, JobStatus, map_state
from ..units import hms, pbs_memory
from .base import BatchSystem, check_resource_spec

if TYPE_CHECKING:
    from ..job import JobSpec
    from ..submit import MPIJobSpec

#: PBS job states (``qstat`` column ``S``; OpenPBS and Torque) -> JobState.
PBS_STATES: dict[str, JobState] = {
    "Q": JobState.PENDING,   # queued
    "H": JobState.PENDING,   # held
    "W": JobState.PENDING,   # waiting for its start time
    "T": JobState.PENDING,   # being moved
    "M": JobState.PENDING,   # moved to another server
    "S": JobState.PENDING,   # suspended
    "U": JobState.PENDING,   # suspended: workstation busy
    "R": JobState.RUNNING,
    "B": JobState.RUNNING,   # array job: at least one subjob started
    "E": JobState.COMPLETING,  # exiting after having run
    "C": JobState.DONE,      # Torque: completed
    "F": JobState.DONE,      # OpenPBS (qstat -x): finished
    "X": JobState.DONE,      # subjob finished
}

#: What ``qstat`` prints on stderr for a job the server no longer lists.
_GONE = ("Job has finished", "Unknown Job Id", "unknown job id", "Invalid job id")
#: Torque's exit status for an unknown job id (PBSE_UNKJOBID 15001, modulo 256).
_UNKNOWN_JOB_STATUS = 153


class PBS(BatchSystem):
    """PBS.

    Args:
        resource_spec: the ``-l`` resource request of each worker job (default
            ``select=1:ncpus=<cores>:mem=<memory>``; Torque sites often want
            ``nodes=1:ppn=<cores>``).  A cluster's ``project`` is its ``account``
            (``#PBS -A``), as in dask-jobqueue.

    Raises:
        ValueError: a bad ``resource_spec`` (named).
    """

    name = "pbs"
    title = "PBS"
    template_name = "pbs.sh.j2"
    mpi_template_name = "pbs-mpi.sh.j2"
    directive_prefix = "#PBS"
    job_id_variable = "PBS_JOBID"
    submit_command = ("qsub",)
    cancel_command = ("qdel",)
    status_command = ("qstat",)
    job_id_regexp = r"(?P<job_id>\d+(?:\[\d*\])?(?:\.[A-Za-z0-9_.-]+)?)"
    state_table = PBS_STATES
    options = ("resource_spec",)

    def __init__(self, resource_spec: str | None = None):
        self.resource_spec = check_resource_spec(resource_spec)

    @classmethod
    def job_id_expression(cls) -> str:
        """``${PBS_JOBID}``, or SLURM's id where PBS's commands run on SLURM.

        slurm-wlm-torque's ``qsub`` hands the script to ``sbatch``, which sets
        ``SLURM_JOB_ID`` (the id ``qsub`` printed) but no ``PBS_JOBID``.
        """
        return "${PBS_JOBID:-$SLURM_JOB_ID}"

    @classmethod
    def fold_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``project`` is PBS's other name for ``account`` (``-A``)."""
        project = options.pop("project", None)
        account = options.get("account")
        if project is not None and account is not None and project != account:
            raise ValueError(f"project={project!r} and account={account!r}: they are the same "
                             "PBS option (-A); give one")
        if project is not None:
            options["account"] = project
        return options

    def values(self, spec: JobSpec) -> dict[str, Any]:
        resources = self.resource_spec or (
            f"select=1:ncpus={spec.cores}:mem={pbs_memory(spec.memory)}")
        return {
            "walltime": None if spec.walltime is None else hms(spec.walltime),
            "resource_spec": resources,
        }

    @classmethod
    def mpi_values(cls, spec: MPIJobSpec) -> dict[str, Any]:
        chunk = spec.resource_spec
        if chunk is None:
            chunk = f"select={spec.ntasks}:ncpus={spec.cpus_per_task}:mpiprocs=1"
            if spec.memory is not None:
                chunk += f":mem={pbs_memory(spec.memory)}"
        return {
            "walltime": None if spec.walltime is None else hms(spec.walltime),
            "resource_spec": chunk,
        }

    @staticmethod
    def normalize_job_id(job_id: str) -> str:
        """``"123.server.domain"`` -> ``"123"``: the server part may be written longer or shorter."""
        return job_id.split(".", 1)[0]

    @classmethod
    def status_argv(cls, job_ids: Sequence[str]) -> list[str]:
        return [*cls.status_command, *job_ids]

    @classmethod
    def parse_status(cls, result: CommandResult,
                     job_ids: Sequence[str]) -> dict[str, JobStatus]:
        states: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) < 3 or fields[0].lower() == "job" or set(fields[0]) <= {"-"}:
                continue
            shown, native = fields[0], fields[-2]
            for jid in job_ids:
                if shown == jid or (shown.endswith("*") and jid.startswith(shown[:-1])) \
                        or cls.normalize_job_id(shown) == cls.normalize_job_id(jid) == shown:
                    states[jid] = JobStatus(native, map_state(cls.state_table, native, cls.title))
        gone = any(g in result.stderr for g in _GONE) or (
            result.returncode == _UNKNOWN_JOB_STATUS and not result.stderr.strip())
        if result.returncode != 0 and not states and not gone:
            raise StatusError(result.argv, result.returncode, result.stdout, result.stderr)
        return states

    @classmethod
    def outcome_argv(cls, job_id: str) -> list[str]:
        # OpenPBS/PBS Pro: -x includes finished jobs, -f the full record.
        # Torque reads -x as XML output, which parse_outcome reads too.
        return ["qstat", "-x", "-f", job_id]

    @classmethod
    def outcome_fallback_argv(cls, job_id: str) -> list[str] | None:
        # slurm-wlm-torque's qstat refuses -x ("Unknown option: x").
        return ["qstat", "-f", job_id]

    @classmethod
    def parse_outcome(cls, result: CommandResult) -> tuple[JobState | None, int | None]:
        state = code = None
        m = re.search(r"(?i)\bjob_state\s*(?:=\s*|>)([A-Z])\b", result.stdout)
        if m:
            state = map_state(cls.state_table, m.group(1), cls.title)
        m = re.search(r"(?i)\bexit_status\s*(?:=\s*|>)(-?\d+)", result.stdout)
        if m:
            code = int(m.group(1))
        return state, code


__all__ = ["PBS", "PBS_STATES"]
