"""One-shot MPI jobs: ``python -m cluster submit`` and ``jobqueue.submit_mpi_job``.

Three kinds of test, each saying which it is:

- **pure**: exact job scripts (``--dry-run``) of both systems, quoting (the
  rendered launch line run by bash with a recording stand-in for ``mpirun``),
  bad options, and the job handle's state/outcome logic against a fake
  runner (the subprocess seam) answering with SLURM's and PBS's outputs;
- **real SLURM** (the ``slurm`` fixture of conftest.py, skipped without it):
  real ``sbatch``/``squeue``/``scontrol``, jobs running our launcher under
  MPICH's ``mpiexec`` (loopback only) or ``srun --mpi=pmi2``, a script whose
  ``Client()`` computes and writes its result; the job's exit status is the
  script's; the fixture fails a test that leaves a job behind;
- **fake PBS** (``fake_pbs.py``, the fixture of test_pbs_fake.py): the PBS
  script really runs (under ``mpiexec``) through a stand-in ``qsub``/``qstat``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cluster.jobqueue import JobState, MPIJob, SubmitError, mpi_job_script, submit_mpi_job
from cluster.jobqueue.commands import CommandResult
from cluster.jobqueue.submit_cli import main
from cluster.runtime.process import BOOTSTRAP

from cluster import jobqueue

from . import test_pbs_fake
from .conftest import Slurm, run

pytestmark = pytest.mark.timeout(30)

#: The fake PBS of test_pbs_fake.py (qsub/qstat/qdel on PATH, no job left behind).
fake_pbs = test_pbs_fake.fake_pbs

REPO = Path(__file__).resolve().parents[2]
PY = "/opt/py/bin/python"
#: How a job script runs ``python -m`` without the job's working directory on sys.path.
BOOT = shlex.quote(BOOTSTRAP)
VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"
#: MPICH inside the test jobs: one node, loopback only.
MPICH_ENV = ["--env", "HYDRA_IFACE=lo", "--env", "HYDRA_LAUNCHER=fork",
             "--env", "UCX_NET_DEVICES=lo", "--env", "FI_TCP_IFACE=lo"]
#: Arguments that a careless script would mangle: spaces, quotes, $, ;, a newline, a glob.
AWKWARD_ARGS = ["a b", "it's", '"double"', "$HOME", "x; echo pwned", "line\nbreak", "*", "-n", ""]

COMPUTE = textwrap.dedent("""\
    import json, sys
    from cluster import Client

    def square(x):
        return x * x

    with Client() as client:
        total = client.submit(sum, client.map(square, range(100))).result()
        workers = len(client.scheduler_info()["workers"])
    with open(sys.argv[1], "w") as f:
        json.dump({"total": total, "workers": workers, "argv": sys.argv[2:]}, f)
    """)

FAIL = textwrap.dedent("""\
    import sys
    from cluster import Client

    with Client() as client:
        assert client.submit(abs, -1).result() == 1
    sys.exit(3)
    """)

SLEEP = textwrap.dedent("""\
    import time
    time.sleep(600)
    """)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in ``tmp_path`` with a ``script.py`` there (scripts are named relative to it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "script.py").write_text(COMPUTE)
    return tmp_path


def cli(capsys, *argv: str, runner=None) -> tuple[int, str, str]:
    """``python -m cluster submit ARGV`` in this process: (status, stdout, stderr)."""
    status = main(list(argv), runner=runner)
    out, err = capsys.readouterr()
    return status, out, err


class FakeRunner:
    """The subprocess seam, answering each command from a queue of canned results.

    ``default``: the answer once the queue is empty (without it, a further
    command fails the test).
    """

    def __init__(self, *answers: tuple[int, str, str], default: tuple[int, str, str] | None = None):
        self.answers = list(answers)
        self.default = default
        self.calls: list[list[str]] = []

    async def __call__(self, argv, *, timeout=60.0, input=None, env=None) -> CommandResult:
        self.calls.append(list(argv))
        if not self.answers and self.default is None:
            raise AssertionError(f"unexpected command {argv}")
        code, out, err = self.answers.pop(0) if self.answers else self.default
        return CommandResult(tuple(argv), code, out, err)


# ----------------------------------------------------------------------------- pure: scripts


def test_slurm_minimal_script_exactly(in_tmp, capsys):
    status, out, err = cli(capsys, "--system", "slurm", "-n", "4", "--python", PY, "--dry-run",
                           "script.py")
    assert (status, err) == (0, "")
    assert out == textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #SBATCH --job-name=hpc-mpi
        #SBATCH --ntasks=4
        #SBATCH --cpus-per-task=1

        exec mpirun -n 4 {PY} -c {BOOT} cluster --nthreads 1 script.py
        """)


def test_slurm_every_option_exactly(in_tmp, capsys):
    status, out, err = cli(
        capsys, "--system", "SLURM", "-n", "64", "--walltime", "1-02:00:00", "--queue", "gpu",
        "--account", "proj42", "--job-name", "analysis", "--memory", "8GB", "--nthreads", "4",
        "--job-extra-directive=--exclusive", "--job-extra-directive", "#SBATCH --constraint=ib",
        "--launcher", "srun", "--launcher-args=--mpi=pmi2 --cpu-bind=cores",
        "--cluster-args", "--interface ib0 --no-nanny", "--python", PY,
        "--env", "OMP_NUM_THREADS=1", "--env", "NOTE=it's here", "--prologue", "module load mpi",
        "--prologue", "cd /work", "--output-dir", "/scratch/logs", "--dry-run",
        "script.py", "--year", "2024", "a b")
    assert (status, err) == (0, "")
    assert out == textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #SBATCH --job-name=analysis
        #SBATCH --output=/scratch/logs/analysis-%j.out
        #SBATCH --error=/scratch/logs/analysis-%j.err
        #SBATCH --partition=gpu
        #SBATCH --account=proj42
        #SBATCH --ntasks=64
        #SBATCH --cpus-per-task=4
        #SBATCH --mem-per-cpu=1908M
        #SBATCH --time=1-02:00:00
        #SBATCH --exclusive
        #SBATCH --constraint=ib

        export OMP_NUM_THREADS=1
        export NOTE='it'"'"'s here'
        module load mpi
        cd /work
        exec srun --ntasks=64 --cpus-per-task=4 --mpi=pmi2 --cpu-bind=cores {PY} -c {BOOT} cluster --nthreads 4 --memory-limit 8GB --interface ib0 --no-nanny script.py --year 2024 'a b'
        """)
    assert not Path("/scratch/logs").exists()  # --dry-run creates nothing


def test_pbs_minimal_script_exactly(in_tmp, capsys):
    status, out, err = cli(capsys, "--system", "pbs", "-n", "2", "--python", PY, "--dry-run",
                           "script.py")
    assert (status, err) == (0, "")
    assert out == textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #PBS -N hpc-mpi
        #PBS -l select=2:ncpus=1:mpiprocs=1

        cd "$PBS_O_WORKDIR"
        exec mpirun -n 2 {PY} -c {BOOT} cluster --nthreads 1 script.py
        """)


def test_pbs_every_option_exactly(in_tmp, capsys):
    status, out, err = cli(
        capsys, "--system", "pbs", "--ntasks", "16", "--walltime", "36:00:00", "--queue",
        "workq", "--account", "proj42", "--job-name", "analysis", "--memory", "4GiB",
        "--cpus-per-task", "2", "--job-extra-directive", "-l place=scatter",
        "--job-extra-directive", "#PBS -m abe", "--launcher", "/opt/mpich/bin/mpiexec",
        "--launcher-args", "-ppn 8", "--cluster-args", "--interface ib0", "--python", PY,
        "--env", "A=1", "--prologue", "module load mpi", "--log-directory", "/scratch/logs",
        "--dry-run", "script.py", "a b")
    assert (status, err) == (0, "")
    assert out == textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #PBS -N analysis
        #PBS -q workq
        #PBS -A proj42
        #PBS -l select=16:ncpus=2:mpiprocs=1:mem=4gb
        #PBS -l walltime=36:00:00
        #PBS -o /scratch/logs/
        #PBS -e /scratch/logs/
        #PBS -l place=scatter
        #PBS -m abe

        cd "$PBS_O_WORKDIR"
        export A=1
        module load mpi
        exec /opt/mpich/bin/mpiexec -n 16 -ppn 8 {PY} -c {BOOT} cluster --nthreads 2 --memory-limit 4GiB --interface ib0 script.py 'a b'
        """)


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_python_api_renders_what_the_cli_shows(in_tmp, capsys, system):
    status, out, _ = cli(capsys, "--system", system, "-n", "3", "--walltime", "00:10:00",
                         "--memory", "2GB", "--env", "X=1", "--dry-run", "script.py", "a b")
    assert status == 0
    assert out == mpi_job_script("script.py", ["a b"], system=system, ntasks=3,
                                 walltime="00:10:00", memory="2GB", env={"X": 1})
    assert f"{sys.executable} -P -m cluster" in out  # the default Python is this one (3.11+: -P)


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_scripts_are_valid_bash(in_tmp, capsys, system):
    _, out, _ = cli(capsys, "--system", system, "-n", "2", "--env", "A=it's", "--dry-run",
                    "script.py", *AWKWARD_ARGS)
    check = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr


def test_dry_run_submits_nothing(in_tmp, capsys):
    runner = FakeRunner()  # any command would fail the test
    status, out, _ = cli(capsys, "--system", "slurm", "-n", "2", "--output-dir", "logs",
                         "--dry-run", "script.py", runner=runner)
    assert status == 0 and out.startswith("#!/usr/bin/env bash\n")
    assert runner.calls == [] and not (in_tmp / "logs").exists()


def test_arguments_reach_the_launcher_intact(in_tmp, capsys):
    """Pure quoting check: bash runs the rendered script with a recording stand-in for mpirun."""
    record = in_tmp / "argv.json"
    fake = in_tmp / "fake mpirun"  # a space in the launcher's path too
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    _, out, _ = cli(capsys, "--system", "slurm", "-n", "2", "--launcher", str(fake),
                    "--python", PY, "--dry-run", "script.py", *AWKWARD_ARGS)
    done = subprocess.run(["bash", "-c", out], cwd=in_tmp, capture_output=True, text=True,
                          timeout=20, env={**os.environ, "HOME": "/nowhere"})
    assert done.returncode == 0, done.stderr
    assert json.loads(record.read_text()) == [
        "-n", "2", PY, "-c", BOOTSTRAP, "cluster", "--nthreads", "1", "script.py", *AWKWARD_ARGS]


def test_options_after_the_script_are_the_scripts(in_tmp, capsys):
    _, out, _ = cli(capsys, "--system", "slurm", "-n", "2", "--python", PY, "--dry-run",
                    "script.py", "--system", "pbs", "--dry-run")
    assert out.endswith(f"{PY} -c {BOOT} cluster --nthreads 1 script.py --system pbs --dry-run\n")
    assert "#SBATCH" in out


# ----------------------------------------------------------------------------- pure: bad options


@pytest.mark.parametrize("argv, named", [
    ([], "--system"),
    (["--system", "slurm", "script.py"], "-n/--ntasks"),
    (["--system", "lsf", "-n", "2", "script.py"], "--system"),
    (["--system", "slurm", "-n", "1", "script.py"], "-n/--ntasks"),
    (["--system", "slurm", "-n", "many", "script.py"], "-n/--ntasks"),
    (["--system", "slurm", "-n", "2", "--walltime", "60", "script.py"], "--walltime"),
    (["--system", "slurm", "-n", "2", "--walltime", "soon", "script.py"], "--walltime"),
    (["--system", "slurm", "-n", "2", "--memory", "lots", "script.py"], "--memory"),
    (["--system", "slurm", "-n", "2", "--nthreads", "0", "script.py"], "--cpus-per-task/--nthreads"),
    (["--system", "slurm", "-n", "2", "--env", "NOVALUE", "script.py"], "--env"),
    (["--system", "slurm", "-n", "2", "--env", "1BAD=x", "script.py"], "--env"),
    (["--system", "slurm", "-n", "2", "--job-name", "my job", "script.py"], "--job-name"),
    (["--system", "slurm", "-n", "2", "--launcher-args", "'unclosed", "script.py"],
     "--launcher-args"),
    (["--system", "slurm", "-n", "2", "--cluster-args=--no-such-option", "script.py"],
     "argument --cluster-args: "),
    (["--system", "slurm", "-n", "2", "--cluster-args", "other.py", "script.py"],
     "argument --cluster-args: "),
    (["--system", "pbs", "-n", "2", "--launcher", "srun", "script.py"],
     "argument --launcher: launcher='srun'"),
    (["--system", "slurm", "-n", "2", "--dry-run", "--wait", "script.py"], "--wait"),
    (["--system", "slurm", "-n", "2", "--poll-interval", "0", "script.py"], "--poll-interval"),
    (["--system", "slurm", "-n", "2", "missing.py"], "argument script: script='missing.py'"),
    (["--system", "slurm", "-n", "2", "--no-such-option", "script.py"], "--no-such-option"),
])
def test_bad_options_exit_2_naming_the_option(in_tmp, capsys, argv, named):
    runner = FakeRunner()
    status, out, err = cli(capsys, *argv, runner=runner)
    assert status == 2, err
    assert out == "" and runner.calls == []
    message = err.strip().splitlines()[-1]
    assert message.startswith("python -m cluster submit: error: ") and named in message, err


@pytest.mark.parametrize("options, error, named", [
    ({"ntasks": 1}, ValueError, "ntasks=1"),
    ({"ntasks": True}, ValueError, "ntasks=True"),
    ({"system": "lsf"}, ValueError, "system='lsf'"),
    ({"system": "pbs", "parallel_environment": "smp"}, ValueError, "parallel_environment="),
    ({"resource_spec": "nodes=1"}, ValueError, "resource_spec="),
    ({"system": "sge", "launcher": "srun"}, ValueError, "launcher='srun'"),
    ({"cpus_per_task": 0}, ValueError, "cpus_per_task=0"),
    ({"memory": "-1GB"}, ValueError, "memory="),
    ({"walltime": 3600}, ValueError, "walltime=3600"),
    ({"job_extra_directives": "--exclusive"}, TypeError, "job_extra_directives="),
    ({"env": {"A-B": 1}}, ValueError, "env: 'A-B'"),
    ({"queue": "a\nb"}, ValueError, "queue="),
    ({"launcher_args": "--mpi=pmi2"}, TypeError, "launcher_args="),
    ({"shebang": "bash"}, ValueError, "shebang="),
])
def test_bad_python_options_are_named(in_tmp, options, error, named):
    options = {"system": "slurm", "ntasks": 2, **options}
    with pytest.raises(error, match=re.escape(named)):
        mpi_job_script("script.py", **options)


def test_bad_script_and_args_are_named(in_tmp):
    with pytest.raises(ValueError, match="script='nope.py': no such file"):
        mpi_job_script("nope.py", system="slurm", ntasks=2)
    with pytest.raises(TypeError, match="args='a b'"):
        mpi_job_script("script.py", "a b", system="slurm", ntasks=2)


# ----------------------------------------------------------------------------- pure: seam and handle


def test_failing_sbatch_exits_1_with_the_typed_error_and_no_traceback(in_tmp, capsys):
    runner = FakeRunner((1, "", "sbatch: error: Batch job submission failed: Invalid partition "
                                "name specified\n"))
    status, out, err = cli(capsys, "--system", "slurm", "-n", "2", "--queue", "nope",
                           "script.py", runner=runner)
    assert (status, out) == (1, "")
    assert runner.calls[0][0] == "sbatch" and len(runner.calls) == 1
    assert err.startswith("python -m cluster submit: error: command 'sbatch ")
    assert "exited with status 1" in err and "Invalid partition name specified" in err
    assert "Traceback" not in err
    # The Python API raises the typed error itself.
    with pytest.raises(SubmitError) as info:
        submit_mpi_job("script.py", system="slurm", ntasks=2, runner=FakeRunner((1, "", "no")))
    assert info.value.returncode == 1 and info.value.argv[0] == "sbatch"


def test_submit_prints_only_the_job_id(in_tmp, capsys):
    runner = FakeRunner((0, "Submitted batch job 4242\n", ""))
    status, out, err = cli(capsys, "--system", "slurm", "-n", "2", "--output-dir", "logs",
                           "script.py", runner=runner)
    assert (status, out, err) == (0, "4242\n", "")
    assert runner.calls[0][0] == "sbatch" and (in_tmp / "logs").is_dir()
    assert not os.path.exists(runner.calls[0][1])  # the temporary script is gone


SQUEUE = "squeue", "--noheader", "--states=all", "--format=%i|%T|%r", "--jobs=7"
SCONTROL = "scontrol", "show", "job", "--oneliner", "7"


@pytest.mark.parametrize("native, detail, state, code, returncode", [
    ("COMPLETED", "JobId=7 JobState=COMPLETED Reason=None ExitCode=0:0 DerivedExitCode=0:0",
     JobState.DONE, 0, 0),
    ("FAILED", "JobId=7 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 DerivedExitCode=0:0",
     JobState.FAILED, 3, 3),
    ("TIMEOUT", "JobId=7 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15", JobState.FAILED, 143,
     143),
    ("CANCELLED", "JobId=7 JobState=CANCELLED Reason=None ExitCode=0:0", JobState.CANCELLED, 0, 1),
])
def test_slurm_job_outcome_from_squeue_and_scontrol(native, detail, state, code, returncode):
    runner = FakeRunner((0, "7|RUNNING\n", ""), (0, f"7|{native}\n", ""), (0, detail + "\n", ""))
    job = MPIJob("7", "slurm", runner=runner)
    assert job.state() is JobState.RUNNING and not job.done and job.returncode is None
    assert job.wait(timeout=5, poll_interval=0.01) is state
    assert (job.exit_code, job.returncode, job.done) == (code, returncode, True)
    assert [tuple(c) for c in runner.calls] == [SQUEUE, SQUEUE, SCONTROL]
    assert job.state() is state and len(runner.calls) == 3  # final: no more commands


def test_slurm_job_forgotten_by_the_batch_system_is_unknown():
    gone = (1, "", "slurm_load_jobs error: Invalid job id specified\n")
    job = MPIJob("7", "slurm", runner=FakeRunner(gone, gone))
    assert job.state() is JobState.UNKNOWN and job.done
    assert (job.exit_code, job.returncode) == (None, 1)


@pytest.mark.parametrize("detail, state, code", [
    ("Job Id: 9.srv\n    job_state = F\n    Exit_status = 0\n", JobState.DONE, 0),
    ("Job Id: 9.srv\n    job_state = F\n    Exit_status = 2\n", JobState.FAILED, 2),
    # Torque reads -x as XML output.
    ("<Data><Job><Job_Id>9.srv</Job_Id><job_state>C</job_state><exit_status>5</exit_status>"
     "</Job></Data>", JobState.FAILED, 5),
])
def test_pbs_job_outcome_from_qstat(detail, state, code):
    table = ("Job id            Name             User              Time Use S Queue\n"
             "----------------  ---------------- ----------------  -------- - -----\n"
             "9.srv             hpc-mpi          me                00:00:01 R workq\n")
    finished = (35, "", "qstat: 9.srv Job has finished, use -x or -H to obtain historical job "
                        "information\n")
    runner = FakeRunner((0, table, ""), finished, (0, detail, ""))
    job = MPIJob("9.srv", "pbs", runner=runner)
    assert job.state() is JobState.RUNNING
    assert job.wait(timeout=5, poll_interval=0.01) is state and job.exit_code == code
    assert runner.calls == [["qstat", "9.srv"], ["qstat", "9.srv"],
                            ["qstat", "-x", "-f", "9.srv"]]


def test_wait_times_out_and_cancel_uses_the_cancel_command():
    runner = FakeRunner(default=(0, "7|RUNNING\n", ""))
    job = MPIJob("7", "slurm", runner=runner)
    with pytest.raises(TimeoutError, match="slurm job 7 is still running"):
        job.wait(timeout=0.05, poll_interval=0.01)
    assert {c[0] for c in runner.calls} == {"squeue"}
    runner.answers.append((0, "", ""))
    job.cancel()
    assert runner.calls[-1] == ["scancel", "7"]


def test_cli_wait_exits_with_the_jobs_exit_code(in_tmp, capsys):
    runner = FakeRunner((0, "Submitted batch job 7\n", ""), (0, "7|FAILED\n", ""),
                        (0, "JobId=7 JobState=FAILED ExitCode=3:0\n", ""))
    status, out, err = cli(capsys, "--system", "slurm", "-n", "2", "--wait", "--poll-interval",
                           "0.01", "script.py", runner=runner)
    assert (status, out) == (3, "7\n")
    assert "slurm job 7 failed (exit code 3)" in err


def test_the_python_equivalent_is_exported():
    assert jobqueue.submit_mpi_job is submit_mpi_job and jobqueue.MPIJob is MPIJob


# ----------------------------------------------------------------------------- real SLURM


def _submit_cli(*argv: str, cwd: Path, timeout: float = 100) -> subprocess.CompletedProcess:
    """``python -m cluster submit ARGV`` as its own process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "cluster", "submit", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _scontrol(job_id: str) -> dict[str, str]:
    text = run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
    return dict(re.findall(r"\b(JobState|ExitCode)=(\S+)", text))


@pytest.mark.timeout(120)
def test_slurm_cli_wait_runs_the_script_under_our_launcher(slurm: Slurm, tmp_path):
    """Real SLURM: 3 ranks under MPICH's mpiexec, a Client() computing; args arrive intact."""
    (tmp_path / "compute.py").write_text(COMPUTE)
    done = _submit_cli(
        "--system", "slurm", "-n", "3", "--walltime", "00:05:00", "--queue", slurm.partition,
        "--memory", "500MB", "--launcher", str(MPIEXEC), *MPICH_ENV, "--output-dir", "logs",
        "--wait", "--poll-interval", "0.5", "compute.py", str(tmp_path / "result.json"),
        *AWKWARD_ARGS, cwd=tmp_path)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*")))
    assert done.returncode == 0, f"{done.stderr}\n{logs}"
    job_id = done.stdout.strip()
    assert done.stdout == f"{job_id}\n" and job_id.isdigit()  # just the id, for $(...)
    assert f"slurm job {job_id} done (exit code 0)" in done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"total": sum(x * x for x in range(100)), "workers": 2,
                      "argv": AWKWARD_ARGS}
    assert _scontrol(job_id) == {"JobState": "COMPLETED", "ExitCode": "0:0"}
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {f"hpc-mpi-{job_id}.out",
                                                               f"hpc-mpi-{job_id}.err"}


@pytest.mark.timeout(120)
def test_slurm_failing_script_fails_the_job_with_its_exit_code(slurm: Slurm, tmp_path,
                                                                 monkeypatch):
    """Real SLURM, Python API: the script exits 3, so does mpiexec, so does the job."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fail.py").write_text(FAIL)
    env = dict(e.split("=", 1) for e in MPICH_ENV[1::2])
    job = submit_mpi_job("fail.py", system="slurm", ntasks=3, walltime="00:05:00",
                         launcher=str(MPIEXEC), env=env, log_directory="logs")
    assert job.wait(timeout=90, poll_interval=0.5) is JobState.FAILED
    assert (job.exit_code, job.returncode) == (3, 3)
    assert _scontrol(job.job_id) == {"JobState": "FAILED", "ExitCode": "3:0"}
    assert "exec " in job.script and str(MPIEXEC) in job.script


@pytest.mark.timeout(120)
def test_slurm_srun_launcher(slurm: Slurm, tmp_path, monkeypatch):
    """Real SLURM: srun --mpi=pmi2 starts the ranks (pip MPICH speaks PMI2); a failure fails the job.

    srun's own status is the highest of its tasks', so after the script's
    MPI_Abort(3) the other ranks' SIGKILL makes it 137: the job fails, with
    srun's code rather than the script's (mpirun/mpiexec keep the script's).
    """
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compute.py").write_text(COMPUTE)
    (tmp_path / "fail.py").write_text(FAIL)
    common = {"system": "slurm", "ntasks": 3, "walltime": "00:05:00", "launcher": "srun",
              "launcher_args": ["--mpi=pmi2"], "log_directory": "logs"}
    ok = submit_mpi_job("compute.py", [str(tmp_path / "result.json"), "x y"], **common)
    bad = submit_mpi_job("fail.py", **common)
    assert ok.wait(timeout=90, poll_interval=0.5) is JobState.DONE, ok
    assert json.loads((tmp_path / "result.json").read_text())["argv"] == ["x y"]
    assert bad.wait(timeout=90, poll_interval=0.5) is JobState.FAILED
    assert bad.exit_code not in (None, 0)


@pytest.mark.timeout(120)
def test_slurm_cancel(slurm: Slurm, tmp_path, monkeypatch):
    """Real SLURM: cancel() ends a running job; it is CANCELLED and leaves squeue."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sleep.py").write_text(SLEEP)
    env = dict(e.split("=", 1) for e in MPICH_ENV[1::2])
    job = submit_mpi_job("sleep.py", system="slurm", ntasks=2, walltime="00:05:00",
                         launcher=str(MPIEXEC), env=env, log_directory="logs")
    slurm.wait_state(job.job_id, {"RUNNING"})
    job.cancel()
    assert job.wait(timeout=60, poll_interval=0.5) is JobState.CANCELLED
    slurm.wait_gone([job.job_id])


@pytest.mark.timeout(60)
def test_slurm_bad_partition_exits_1_without_traceback(slurm: Slurm, tmp_path):
    """Real SLURM: sbatch refuses the partition; the CLI shows its error, exit 1."""
    (tmp_path / "compute.py").write_text(COMPUTE)
    done = _submit_cli("--system", "slurm", "-n", "2", "--queue", "no-such-partition",
                       "compute.py", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert "command 'sbatch " in done.stderr and "exited with status 1" in done.stderr
    assert "invalid partition" in done.stderr.lower() and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- fake PBS


@pytest.mark.timeout(120)
def test_pbs_job_runs_under_the_fake_qsub(fake_pbs: Path, tmp_path):
    """Fake PBS (fake_pbs.py; no PBS server here): the PBS script really runs under mpiexec.

    The job starts in its submit directory (``cd "$PBS_O_WORKDIR"``), the
    script's result arrives, and the job's exit status comes back through
    ``qstat -x -f``: 0, then 3 for a failing script.
    """
    (tmp_path / "compute.py").write_text(COMPUTE)
    (tmp_path / "fail.py").write_text(FAIL)
    common = ["--system", "pbs", "-n", "3", "--walltime", "00:05:00", "--launcher", str(MPIEXEC),
              *MPICH_ENV, "--wait", "--poll-interval", "0.5"]
    done = _submit_cli(*common, "compute.py", "result.json", "a b", "it's", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1.fakepbs\n"
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "total": sum(x * x for x in range(100)), "workers": 2, "argv": ["a b", "it's"]}
    failed = _submit_cli(*common, "fail.py", cwd=tmp_path)
    assert (failed.returncode, failed.stdout) == (3, "2.fakepbs\n"), failed.stderr
    assert "pbs job 2.fakepbs failed (exit code 3)" in failed.stderr
