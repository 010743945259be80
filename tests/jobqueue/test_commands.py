"""The subprocess seam, the typed errors, and status parsing of recorded batch-system outputs.

``run_command`` runs real (harmless) programs here: ``true``, ``sh -c``,
``sleep``.  The SLURM outputs below are what SLURM 22.05's ``squeue`` prints
on the test machine; the PBS outputs are recorded from OpenPBS 22 and Torque 6
(``qstat`` table and error messages), since no PBS server runs here.
"""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest

from jobqueue import PBSCluster, SLURMCluster
from jobqueue.commands import CommandResult, check, run_blocking, run_command
from jobqueue.errors import (
    CancelError,
    CommandError,
    CommandNotFoundError,
    CommandTimeoutError,
    JobIdNotFoundError,
    JobQueueError,
    StatusError,
    SubmitError,
    TemplateError,
)
from jobqueue.states import JobState, JobStatus, map_state
from runtime.errors import ClusterError

pytestmark = pytest.mark.timeout(30)


# ----------------------------------------------------------------------------- the seam


def test_run_command_returns_status_and_output():
    r = asyncio.run(run_command(["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert r == CommandResult(("sh", "-c", "echo out; echo err >&2; exit 3"), 3, "out\n", "err\n")


def test_run_command_feeds_stdin_and_env():
    r = asyncio.run(run_command(["sh", "-c", 'cat; echo "$X"'], input=b"in\n", env={"X": "y"}))
    assert (r.returncode, r.stdout) == (0, "in\ny\n")


def test_run_command_never_uses_a_shell():
    r = asyncio.run(run_command(["echo", "$HOME; rm -rf /"]))
    assert r.stdout == "$HOME; rm -rf /\n"
    with pytest.raises(ValueError, match="no shell"):
        asyncio.run(run_command("echo hi"))
    with pytest.raises(ValueError, match="argv"):
        asyncio.run(run_command([]))


def test_missing_program_is_command_not_found():
    with pytest.raises(CommandNotFoundError, match="'no-such-sbatch' not found") as info:
        asyncio.run(run_command(["no-such-sbatch", "x"]))
    assert info.value.argv == ("no-such-sbatch", "x")
    assert isinstance(info.value, FileNotFoundError)


def test_timeout_kills_the_command_and_its_children():
    start = time.monotonic()
    with pytest.raises(CommandTimeoutError, match="timed out after 0.3s") as info:
        asyncio.run(run_command(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.3))
    assert time.monotonic() - start < 5
    assert isinstance(info.value, TimeoutError)


def test_check_raises_the_named_error_with_everything():
    ok = CommandResult(("true",), 0, "", "")
    assert check(ok) is ok
    bad = CommandResult(("sbatch", "job.sh"), 1, "", "sbatch: error: invalid partition specified: nope\n")
    with pytest.raises(SubmitError) as info:
        check(bad, SubmitError)
    e = info.value
    assert (e.argv, e.returncode, e.stdout) == (("sbatch", "job.sh"), 1, "")
    assert "invalid partition" in e.stderr
    assert str(e) == ("command 'sbatch job.sh' exited with status 1; stderr: sbatch: error: "
                      "invalid partition specified: nope")


def test_run_blocking_inside_and_outside_a_loop():
    assert run_blocking(run_command, ["echo", "a"]).stdout == "a\n"

    async def inside():
        return run_blocking(run_command, ["echo", "b"])

    assert asyncio.run(inside()).stdout == "b\n"


# ----------------------------------------------------------------------------- errors


ERRORS = [
    CommandError(["squeue"], 1, "o", "e"),
    SubmitError(["sbatch", "/tmp/x.sh"], 1, "", "sbatch: error: Batch job submission failed"),
    CancelError(["scancel", "1", "2"], 1, "", "scancel: error: Kill job error"),
    StatusError(["qstat", "1"], 2, "", "Connection refused"),
    CommandNotFoundError(["sbatch"], reason="[Errno 2] No such file or directory"),
    CommandTimeoutError(["squeue"], reason="timed out after 60s"),
    JobIdNotFoundError(["sbatch", "x"], "weird output", r"(?P<job_id>\d+)"),
    TemplateError("mine.j2", "queue", "'queue' is undefined"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_fields(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert again.args == error.args
    assert str(again) == str(error)
    assert vars(again) == vars(error)
    assert isinstance(again, JobQueueError) and isinstance(again, ClusterError)


# ----------------------------------------------------------------------------- states


def test_state_tables_and_unknown_states():
    assert map_state(SLURMCluster.state_table, "CANCELLED by 0") == JobState.CANCELLED
    assert map_state(SLURMCluster.state_table, "COMPLETING+") == JobState.COMPLETING
    assert map_state(SLURMCluster.state_table, "TIMEOUT") == JobState.FAILED
    assert map_state(SLURMCluster.state_table, "SOMETHING_NEW") == JobState.UNKNOWN
    assert map_state(PBSCluster.state_table, "E") == JobState.COMPLETING
    assert JobState.RUNNING.active and not JobState.RUNNING.finished
    assert JobState.FAILED.finished and not JobState.UNKNOWN.finished
    assert str(JobState.PENDING) == "pending"


# ----------------------------------------------------------------------------- parsing


def slurm() -> SLURMCluster:
    return SLURMCluster(cores=1, memory="1GB", asynchronous=True)


def pbs() -> PBSCluster:
    return PBSCluster(cores=1, memory="1GB", asynchronous=True)


def test_slurm_status_argv_is_one_call_for_all_jobs():
    assert slurm().status_argv(["5", "6", "7"]) == [
        "squeue", "--noheader", "--states=all", "--format=%i|%T|%r", "--jobs=5,6,7"]


def test_slurm_parse_status():
    out = ("5|RUNNING|None\n6|PENDING|Resources\n7|COMPLETED|None\n8|CANCELLED|None\n"
           "10|PENDING|ReqNodeNotAvail, UnavailableNodes:n[1-2]\n99|RUNNING|None\n")
    r = CommandResult(("squeue",), 0, out, "")
    assert slurm().parse_status(r, ["5", "6", "7", "8", "9", "10"]) == {
        "5": ("RUNNING", JobState.RUNNING, ""), "6": ("PENDING", JobState.PENDING, "Resources"),
        "7": ("COMPLETED", JobState.DONE, ""), "8": ("CANCELLED", JobState.CANCELLED, ""),
        "10": ("PENDING", JobState.PENDING, "ReqNodeNotAvail, UnavailableNodes:n[1-2]")}


def test_slurm_parse_status_without_the_reason_column():
    r = CommandResult(("squeue",), 0, "5|RUNNING\n6|PENDING\n", "")
    states = slurm().parse_status(r, ["5", "6"])
    assert states == {"5": JobStatus("RUNNING", JobState.RUNNING),
                      "6": JobStatus("PENDING", JobState.PENDING)}
    assert states["6"].reason == ""


def test_slurm_status_of_purged_jobs_and_of_a_dead_controller():
    gone = CommandResult(("squeue",), 1, "", "slurm_load_jobs error: Invalid job id specified\n")
    assert slurm().parse_status(gone, ["5"]) == {}
    down = CommandResult(("squeue",), 1, "", "slurm_load_jobs error: Unable to contact slurm "
                                             "controller (connect failure)\n")
    with pytest.raises(StatusError, match="Unable to contact"):
        slurm().parse_status(down, ["5"])


def test_slurm_job_id_from_sbatch():
    c = slurm()
    assert c.parse_job_id(CommandResult(("sbatch",), 0, "Submitted batch job 4242\n", "")) == "4242"
    with pytest.raises(JobIdNotFoundError, match="no job id"):
        c.parse_job_id(CommandResult(("sbatch",), 0, "sbatch: queued\n", ""))


OPENPBS_QSTAT = """\
Job id            Name             User              Time Use S Queue
----------------  ---------------- ----------------  -------- - -----
1041.pbs01        hpc-worker       alice             00:00:03 R workq
1042.pbs01        hpc-worker       alice                    0 Q workq
1043.pbs01        hpc-worker       alice             00:01:10 E workq
10000000000.pbs0* hpc-worker       alice                    0 H workq
"""

TORQUE_QSTAT = """\
Job ID                    Name             User            Time Use S Queue
------------------------- ---------------- --------------- -------- - -----
77.torque-head             hpc-worker       bob             00:00:01 R batch
78.torque-head             hpc-worker       bob                    0 C batch
"""


def test_pbs_parse_openpbs_qstat():
    ids = ["1041.pbs01", "1042.pbs01", "1043.pbs01", "10000000000.pbs01", "1044.pbs01"]
    r = CommandResult(("qstat", *ids), 35, OPENPBS_QSTAT,
                      "qstat: 1044.pbs01 Job has finished, use -x or -H to obtain historical "
                      "job information\n")
    assert pbs().parse_status(r, ids) == {
        "1041.pbs01": JobStatus("R", JobState.RUNNING),
        "1042.pbs01": JobStatus("Q", JobState.PENDING),
        "1043.pbs01": JobStatus("E", JobState.COMPLETING),
        "10000000000.pbs01": JobStatus("H", JobState.PENDING)}


def test_pbs_parse_torque_qstat():
    ids = ["77.torque-head", "78.torque-head", "79.torque-head"]
    r = CommandResult(("qstat", *ids), 153, TORQUE_QSTAT,
                      "qstat: Unknown Job Id Error 79.torque-head\n")
    assert pbs().parse_status(r, ids) == {
        "77.torque-head": JobStatus("R", JobState.RUNNING),
        "78.torque-head": JobStatus("C", JobState.DONE)}


def test_pbs_status_errors_and_job_ids():
    c = pbs()
    assert c.status_argv(["1.s", "2.s"]) == ["qstat", "1.s", "2.s"]
    down = CommandResult(("qstat", "1.s"), 2, "", "Connection refused\nqstat: cannot connect to server pbs01 (errno=15010)\n")
    with pytest.raises(StatusError, match="cannot connect"):
        c.parse_status(down, ["1.s"])
    assert c.parse_job_id(CommandResult(("qsub",), 0, "1045.pbs01\n", "")) == "1045.pbs01"
    assert c.parse_job_id(CommandResult(("qsub",), 0, "312\n", "")) == "312"  # slurm-wlm-torque
    assert c.parse_job_id(CommandResult(("qsub",), 0, "88[].pbs01\n", "")) == "88[].pbs01"
    assert c.normalize_job_id("1045.pbs01.example.org") == "1045"
