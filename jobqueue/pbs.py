"""PBSCluster: workers in PBS jobs (OpenPBS, PBS Pro, Torque: ``qsub``, ``qstat``, ``qdel``).

Status: one plain ``qstat <ids>`` for all the cluster's jobs; its table
(``Job id  Name  User  Time Use  S  Queue``) is the same on OpenPBS and
Torque, and the state is the column before the queue.  OpenPBS cuts long
ids to 15 characters and a ``*``; such a row matches the id it starts.
A job that has left the server is not in the table: ``qstat`` says so on
standard error ("Job has finished" on OpenPBS, "Unknown Job Id" on Torque)
and exits non-zero, which is not a failure of the call.  Memory is written
in PBS's binary units (``gb`` = GiB, ``mb`` = MiB, :mod:`jobqueue.units`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .commands import CommandResult
from .core import JobQueueCluster
from .errors import StatusError
from .states import JobState, JobStatus, map_state
from .units import hms, pbs_memory

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


class PBSCluster(JobQueueCluster):
    """Workers in PBS batch jobs, each ``qsub`` job running ``processes`` workers.

    Takes every argument of :class:`~jobqueue.core.JobQueueCluster`, and:

    Args:
        resource_spec: the ``-l`` resource request (default
            ``select=1:ncpus=<cores>:mem=<memory>``; Torque sites often want
            ``nodes=1:ppn=<cores>``).
        project: the other name of ``account`` (``#PBS -A``), as in dask-jobqueue.

    PBS jobs do not inherit the submitting shell's environment: load modules
    or activate an environment in ``job_script_prologue``, or pass
    ``job_extra_directives=["-V"]``.

    Raises:
        ValueError: an option is missing or has a bad value (named in the message).
    """

    system = "PBS"
    template_name = "pbs.sh.j2"
    directive_prefix = "#PBS"
    job_id_variable = "PBS_JOBID"
    submit_command = ("qsub",)
    cancel_command = ("qdel",)
    status_command = ("qstat",)
    job_id_regexp = r"(?P<job_id>\d+(?:\[\d*\])?(?:\.[A-Za-z0-9_.-]+)?)"
    state_table = PBS_STATES

    def __init__(self, *args: Any, resource_spec: str | None = None, project: str | None = None,
                 account: str | None = None, **kwargs: Any):
        if project is not None and account is not None and project != account:
            raise ValueError(f"project={project!r} and account={account!r}: they are the same "
                             "PBS option (-A); give one")
        if resource_spec is not None and (not isinstance(resource_spec, str)
                                          or not resource_spec.strip() or "\n" in resource_spec):
            raise ValueError(f"resource_spec={resource_spec!r}: expected a resource list like "
                             "'select=1:ncpus=8:mem=16gb'")
        self.resource_spec = resource_spec
        super().__init__(*args, account=account if account is not None else project, **kwargs)

    def system_values(self) -> dict[str, Any]:
        spec = self.spec
        resources = self.resource_spec or (
            f"select=1:ncpus={spec.cores}:mem={pbs_memory(spec.memory)}")
        return {
            "walltime": None if spec.walltime is None else hms(spec.walltime),
            "resource_spec": resources,
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
                    states[jid] = JobStatus(native, map_state(cls.state_table, native, cls.system))
        if result.returncode != 0 and not states and not any(g in result.stderr for g in _GONE):
            raise StatusError(result.argv, result.returncode, result.stdout, result.stderr)
        return states


__all__ = ["PBS_STATES", "PBSCluster"]
