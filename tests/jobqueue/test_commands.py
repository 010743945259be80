"""The subprocess seam, the typed errors, and status parsing of captured batch-system outputs.

``run_command`` runs real (harmless) programs here: ``true``, ``sh -c``,
``sleep``.  The outputs below were captured from the real commands on the
test machine, each labelled with the command line that printed it: SLURM
22.05's ``squeue``/``scontrol`` (``scripts/slurm.sh``), the Torque-style
``qsub``/``qstat``/``qdel`` of Debian's ``slurm-wlm-torque`` 22.05 on that
SLURM (``scripts/pbs.sh``), and Grid Engine 8.1.9's ``qsub``/``qstat``/``qacct``
(``scripts/gridengine.sh``).  The one exception is OpenPBS's table with an id
cut to 15 characters and a ``*``: no installable system prints that shape
(there is no OpenPBS server in Debian), so that sample is written from
OpenPBS's documented format, as the fake PBS of ``fake_pbs.py`` prints it.
"""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest
from cluster.jobqueue.commands import CommandResult, check, run_blocking, run_command
from cluster.jobqueue.errors import (
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
from cluster.jobqueue.states import JobState, JobStatus, map_state
from cluster.jobqueue.systems import PBS, SGE, SLURM
from cluster.runtime.errors import ClusterError

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
    assert map_state(SLURM.state_table, "CANCELLED by 0") == JobState.CANCELLED
    assert map_state(SLURM.state_table, "COMPLETING+") == JobState.COMPLETING
    assert map_state(SLURM.state_table, "TIMEOUT") == JobState.FAILED
    assert map_state(SLURM.state_table, "SOMETHING_NEW") == JobState.UNKNOWN
    assert map_state(PBS.state_table, "E") == JobState.COMPLETING
    assert JobState.RUNNING.active and not JobState.RUNNING.finished
    assert JobState.FAILED.finished and not JobState.UNKNOWN.finished
    assert str(JobState.PENDING) == "pending"


# ----------------------------------------------------------------------------- parsing


def slurm() -> type[SLURM]:
    return SLURM


def pbs() -> type[PBS]:
    return PBS


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


# Written from OpenPBS's documented format (not captured: no OpenPBS installs here);
# the fake PBS of fake_pbs.py prints the same shape.  Long ids cut to 15 characters + '*'.
OPENPBS_QSTAT = """\
Job id            Name             User              Time Use S Queue
----------------  ---------------- ----------------  -------- - -----
1041.pbs01        hpc-worker       alice             00:00:03 R workq
1042.pbs01        hpc-worker       alice                    0 Q workq
1043.pbs01        hpc-worker       alice             00:01:10 E workq
10000000000.pbs0* hpc-worker       alice                    0 H workq
"""

# Captured: `qstat 58 59 60 99999` of slurm-wlm-torque 22.05 (scripts/pbs.sh) with
# job 58 finished, 59 running, 60 held (`qsub -h`, shown as Q); 99999 unknown
# (left out, exit status 0).
TORQUE_QSTAT = (
    "Job id              Name             Username        Time Use S Queue          \n"
    "------------------- ---------------- --------------- -------- - ---------------\n"
    "58                  hpc-worker       root            00:00:00 C debug          \n"
    "59                  hpc-worker       root            00:00:00 R debug          \n"
    "60                  hpc-worker       root            00:00:00 Q debug          \n")

# Captured: `qstat -f 58` of slurm-wlm-torque (its qstat refuses -x: "Unknown option: x").
TORQUE_QSTAT_F = (
    "Job Id:\t58\n\tJob_Name = hpc-worker\n\tJob_Owner = root@localhost\n\tjob_state = C\n"
    "\tqueue = debug\n\tqtime = Wed Dec  2 05:50:47 2026\n\tmtime = Wed Dec  2 05:50:47 2026\n"
    "\tctime = Wed Dec  2 05:50:47 2026\n\texec_host = vm/1\n\tPriority = 4294901703\n"
    "\teuser = root(0)\n\tegroup = root(0)\n\tResource_List.walltime = 71582788:15:00\n"
    "\tResource_List.nodect = 1\n\tResource_List.ncpus = 1\n\n")

# Captured: Grid Engine 8.1.9's `qstat` (scripts/gridengine.sh) with job 3 running,
# 5 waiting (asks for 9 slots of 8), 4 held (`qsub -h`).
SGE_QSTAT = (
    "job-ID  prior   name       user         state submit/start at     queue                "
    "          slots ja-task-ID \n"
    "-----------------------------------------------------------------------------------------"
    "------------------------\n"
    "      3 0.25000 hpc-worker root         r     12/02/2026 05:50:56 all.q@vm             "
    "              1        \n"
    "      5 0.75000 hpc-worker root         qw    12/02/2026 05:50:56                      "
    "              9        \n"
    "      4 0.00000 hpc-worker root         hqw   12/02/2026 05:50:56                      "
    "              1        \n")

# Captured: the same `qstat` after `qdel 3 4 5` (job 3 being deleted).
SGE_QSTAT_DELETING = (
    "job-ID  prior   name       user         state submit/start at     queue                "
    "          slots ja-task-ID \n"
    "-----------------------------------------------------------------------------------------"
    "------------------------\n"
    "      3 0.50000 hpc-worker root         dr    12/02/2026 05:50:56 all.q@vm             "
    "              1        \n")

# Captured: `qacct -j 2` of a job whose script exited 3 (the lines after exit_status cut).
SGE_QACCT = (
    "==============================================================\nqname        all.q        "
    "       \nhostname     vm                  \ngroup        root                \nowner "
    "       root                \nproject      NONE                \ndepartment   defaultdepa"
    "rtment   \njobname      hpc-worker          \njobnumber    2                   \ntaskid  "
    "     undefined\naccount      sge                 \npriority     0                   \nqs"
    "ub_time    Wed Dec  2 05:50:52 2026\nstart_time   Wed Dec  2 05:50:52 2026\nend_time     "
    "Wed Dec  2 05:50:52 2026\ngranted_pe   NONE                \nslots        1             "
    "      \nfailed       0    \nexit_status  3                   \nru_wallclock 0s\n")


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
    ids = ["58", "59", "60", "99999"]
    r = CommandResult(("qstat", *ids), 0, TORQUE_QSTAT, "")
    assert pbs().parse_status(r, ids) == {
        "58": JobStatus("C", JobState.DONE),
        "59": JobStatus("R", JobState.RUNNING),
        "60": JobStatus("Q", JobState.PENDING)}
    # Captured: `qstat 99999` alone exits 153 (Torque's unknown job id) and prints nothing.
    assert pbs().parse_status(CommandResult(("qstat", "99999"), 153, "", ""), ["99999"]) == {}


def test_pbs_outcome_falls_back_to_qstat_f_where_x_is_refused():
    assert PBS.outcome_argv("58") == ["qstat", "-x", "-f", "58"]
    assert PBS.outcome_fallback_argv("58") == ["qstat", "-f", "58"]
    assert PBS.parse_outcome(CommandResult(("qstat", "-f", "58"), 0, TORQUE_QSTAT_F, "")) == (
        JobState.DONE, None)


def test_pbs_status_errors_and_job_ids():
    c = pbs()
    assert c.status_argv(["1.s", "2.s"]) == ["qstat", "1.s", "2.s"]
    down = CommandResult(("qstat", "1.s"), 2, "", "Connection refused\nqstat: cannot connect to server pbs01 (errno=15010)\n")
    with pytest.raises(StatusError, match="cannot connect"):
        c.parse_status(down, ["1.s"])
    assert c.parse_job_id(CommandResult(("qsub",), 0, "1045.pbs01\n", "")) == "1045.pbs01"
    assert c.parse_job_id(CommandResult(("qsub",), 0, "58\n", "")) == "58"  # captured: slurm-wlm-torque
    assert c.parse_job_id(CommandResult(("qsub",), 0, "88[].pbs01\n", "")) == "88[].pbs01"
    assert c.normalize_job_id("1045.pbs01.example.org") == "1045"


def test_sge_status_is_one_plain_qstat():
    assert SGE.status_argv(["3", "4"]) == ["qstat"]
    assert SGE.submit_argv("/tmp/job.sh") == ["qsub", "-terse", "/tmp/job.sh"]
    assert SGE.cancel_argv(["3", "4"]) == ["qdel", "3", "4"]
    # Captured: `qsub -terse job.sh` prints the id alone; plain `qsub` a sentence.
    assert SGE.parse_job_id(CommandResult(("qsub",), 0, "2\n", "")) == "2"
    assert SGE.parse_job_id(CommandResult(
        ("qsub",), 0, 'Your job 5 ("hpc-worker") has been submitted\n', "")) == "5"


def test_sge_parse_qstat():
    r = CommandResult(("qstat",), 0, SGE_QSTAT, "")
    assert SGE.parse_status(r, ["3", "4", "5", "2"]) == {
        "3": JobStatus("r", JobState.RUNNING), "4": JobStatus("hqw", JobState.PENDING),
        "5": JobStatus("qw", JobState.PENDING)}
    assert SGE.parse_status(r, ["4"]) == {"4": JobStatus("hqw", JobState.PENDING)}
    deleting = CommandResult(("qstat",), 0, SGE_QSTAT_DELETING, "")
    assert SGE.parse_status(deleting, ["3", "4"]) == {"3": JobStatus("dr", JobState.COMPLETING)}
    assert SGE.parse_status(CommandResult(("qstat",), 0, "", ""), ["3"]) == {}  # no jobs: no output
    down = CommandResult(("qstat",), 1, "", "error: commlib error: got select error "
                                          "(Connection refused)\n")
    with pytest.raises(StatusError, match="commlib"):
        SGE.parse_status(down, ["3"])


def test_sge_outcome_from_qacct():
    assert SGE.outcome_argv("2") == ["qacct", "-j", "2"]
    assert SGE.parse_outcome(CommandResult(("qacct",), 0, SGE_QACCT, "")) == (JobState.FAILED, 3)
    ok = SGE_QACCT.replace("exit_status  3", "exit_status  0")
    assert SGE.parse_outcome(CommandResult(("qacct",), 0, ok, "")) == (JobState.DONE, 0)
    # Captured: `qacct -j 99999` (not accounted, or not yet).
    gone = CommandResult(("qacct", "-j", "99999"), 1, "", "error: job id 99999 not found\n")
    assert SGE.parse_outcome(gone) == (None, None)
