"""SLURM: ``sbatch``, ``squeue``, ``scancel``; ``#SBATCH`` directives; ``srun`` as a launcher.

Status: one ``squeue --noheader --states=all --format=%i|%T|%r --jobs=<ids>``
for all the cluster's jobs (``%r``: why a job waits, ``Resources``,
``Priority``, ``BeginTime``...; ``None`` when it does not).  ``--states=all``
keeps finished jobs listed (``COMPLETED``, ``FAILED``, ``TIMEOUT``,
``CANCELLED``) for ``MinJobAge`` after they end, so their outcome is known; a
job purged since is no longer listed (``squeue`` then exits 1 with "Invalid
job id specified" when it was the only one asked about).  A finished job's
exit code: ``scontrol show job --oneliner ID`` (``ExitCode=3:0``; a signal
``N`` is ``128 + N``).  Memory is written in MiB, rounded up
(:mod:`cluster.jobqueue.units`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..commands import CommandResult
from ..errors import StatusError
from ..states import JobState, JobStatus, map_state
from ..units import parse_memory, slurm_memory, slurm_time
from .base import BatchSystem

if TYPE_CHECKING:
    from ..job import JobSpec
    from ..submit import MPIJobSpec

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

#: Launchers that start ranks themselves, by their command's base name.
SRUN = "srun"


class SLURM(BatchSystem):
    """SLURM.

    Args:
        job_cpu: ``--cpus-per-task`` of each worker job (default: ``cores``).
        job_mem: ``--mem`` of each worker job (default: ``memory``), written in MiB.

    Raises:
        ValueError: a bad ``job_cpu`` or ``job_mem`` (named).
    """

    name = "slurm"
    title = "SLURM"
    template_name = "slurm.sh.j2"
    mpi_template_name = "slurm-mpi.sh.j2"
    directive_prefix = "#SBATCH"
    job_id_variable = "SLURM_JOB_ID"
    submit_command = ("sbatch",)
    cancel_command = ("scancel",)
    status_command = ("squeue", "--noheader", "--states=all", "--format=%i|%T|%r")
    job_id_regexp = r"(?P<job_id>\d+)"
    state_table = SLURM_STATES
    options = ("job_cpu", "job_mem")
    own_launchers = (SRUN,)
    done_exit_code = 0

    def __init__(self, job_cpu: int | None = None, job_mem: Any = None):
        if job_cpu is not None and (isinstance(job_cpu, bool) or not isinstance(job_cpu, int)
                                    or job_cpu < 1):
            raise ValueError(f"job_cpu={job_cpu!r}: expected a positive integer")
        self.job_cpu = job_cpu
        self.job_mem = None if job_mem is None else parse_memory(job_mem, "job_mem")

    def values(self, spec: JobSpec) -> dict[str, Any]:
        return {
            "walltime": None if spec.walltime is None else slurm_time(spec.walltime),
            "job_cpu": self.job_cpu or spec.cores,
            "job_mem": slurm_memory(self.job_mem or spec.memory),
        }

    @classmethod
    def mpi_values(cls, spec: MPIJobSpec) -> dict[str, Any]:
        mem = None
        if spec.memory is not None:
            mem = slurm_memory(math.ceil(spec.memory / spec.cpus_per_task))
        return {
            "walltime": None if spec.walltime is None else slurm_time(spec.walltime),
            "mem_per_cpu": mem,
        }

    @classmethod
    def launch_words(cls, spec: MPIJobSpec) -> list[str]:
        if os.path.basename(spec.launcher) == SRUN:
            return [spec.launcher, f"--ntasks={spec.ntasks}",
                    f"--cpus-per-task={spec.cpus_per_task}"]
        return super().launch_words(spec)

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
                                        map_state(cls.state_table, native, cls.title),
                                        "" if reason in ("None", "(null)") else reason)
        if result.returncode != 0 and not states and _GONE not in result.stderr:
            raise StatusError(result.argv, result.returncode, result.stdout, result.stderr)
        return states

    @classmethod
    def outcome_argv(cls, job_id: str) -> list[str]:
        return ["scontrol", "show", "job", "--oneliner", job_id]

    @classmethod
    def parse_outcome(cls, result: CommandResult) -> tuple[JobState | None, int | None]:
        state = code = None
        m = re.search(r"\bJobState=(\S+)", result.stdout)
        if m:
            state = map_state(cls.state_table, m.group(1), cls.title)
        m = re.search(r"\bExitCode=(\d+):(\d+)", result.stdout)
        if m:
            status, signal = int(m.group(1)), int(m.group(2))
            code = 128 + signal if signal else status
        return state, code


__all__ = ["SLURM", "SLURM_STATES", "SRUN"]
