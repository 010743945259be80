"""SLURMCluster: workers in SLURM jobs (``sbatch``, ``squeue``, ``scancel``).

Status: one ``squeue --noheader --states=all --format=%i|%T|%r --jobs=<ids>``
for all the cluster's jobs (``%r``: why a job waits, ``Resources``,
``Priority``, ``BeginTime``...; ``None`` when it does not).  ``--states=all`` keeps finished jobs listed
(``COMPLETED``, ``FAILED``, ``TIMEOUT``, ``CANCELLED``) for ``MinJobAge``
after they end, so their outcome is known; a job purged since is no longer
listed (``squeue`` then exits 1 with "Invalid job id specified" when it was
the only one asked about).  Memory is written in MiB, rounded up
(:mod:`jobqueue.units`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .commands import CommandResult
from .core import JobQueueCluster
from .errors import StatusError
from .states import JobState, JobStatus, map_state
from .units import parse_memory, slurm_memory, slurm_time

#: SLURM job states (``squeue %T``) -> JobState.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETING": JobState.COMPLETING,
    "STAGE_OUT": JobState.COMPLETING,
    "COMPLETED": JobState.DONE,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
}

_GONE = "Invalid job id specified"


class SLURMCluster(JobQueueCluster):
    """Workers in SLURM batch jobs, each ``sbatch`` job running ``processes`` workers.

    Takes every argument of :class:`~jobqueue.core.JobQueueCluster`, and:

    Args:
        job_cpu: ``--cpus-per-task`` of each job (default: ``cores``).
        job_mem: ``--mem`` of each job (default: ``memory``), written in MiB.

    Example::

        cluster = SLURMCluster(cores=8, memory="16GB", processes=2, queue="normal",
                               walltime="01:00:00", interface="ib0")
        cluster.adapt(maximum_jobs=20)
        client = Client(cluster)

    Raises:
        ValueError: an option is missing or has a bad value (named in the message).
    """

    system = "SLURM"
    template_name = "slurm.sh.j2"
    directive_prefix = "#SBATCH"
    job_id_variable = "SLURM_JOB_ID"
    submit_command = ("sbatch",)
    cancel_command = ("scancel",)
    status_command = ("squeue", "--noheader", "--states=all", "--format=%i|%T|%r")
    job_id_regexp = r"(?P<job_id>\d+)"
    state_table = SLURM_STATES

    def __init__(self, *args: Any, job_cpu: int | None = None, job_mem: Any = None, **kwargs: Any):
        if job_cpu is not None and (isinstance(job_cpu, bool) or not isinstance(job_cpu, int)
                                    or job_cpu < 1):
            raise ValueError(f"job_cpu={job_cpu!r}: expected a positive integer")
        self.job_cpu = job_cpu
        self.job_mem = None if job_mem is None else parse_memory(job_mem, "job_mem")
        super().__init__(*args, **kwargs)

    def system_values(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "walltime": None if spec.walltime is None else slurm_time(spec.walltime),
            "job_cpu": self.job_cpu or spec.cores,
            "job_mem": slurm_memory(self.job_mem or spec.memory),
        }

    @classmethod
    def status_argv(cls, job_ids: Sequence[str]) -> list[str]:
        return [*cls.status_command, f"--jobs={','.join(job_ids)}"]

    @classmethod
    def parse_status(cls, result: CommandResult,
                     job_ids: Sequence[str]) -> dict[str, JobStatus]:
        wanted = set(job_ids)
        states: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            jid, sep, rest = line.strip().partition("|")
            native, _, reason = rest.partition("|")
            reason = reason.strip()
            if sep and jid in wanted:
                states[jid] = JobStatus(native.strip(),
                                        map_state(cls.state_table, native, cls.system),
                                        "" if reason in ("None", "(null)") else reason)
        if result.returncode != 0 and not states and _GONE not in result.stderr:
            raise StatusError(result.argv, result.returncode, result.stdout, result.stderr)
        return states


__all__ = ["SLURM_STATES", "SLURMCluster"]
