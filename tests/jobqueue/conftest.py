"""Fixtures for tests against the real single-node SLURM of ``scripts/slurm.sh``.

``slurm`` (session): starts SLURM with ``bash scripts/slurm.sh start`` (quick
when it is already up) and returns a :class:`Slurm` describing it (default
partition, node, CPUs) with small helpers to submit, query and cancel jobs.
If SLURM cannot be started the test is skipped with the reason, or fails when
``CLUSTER_REQUIRE_SLURM=1`` (CI sets it).

``slurm_jobs_cleanup`` (function): notes the jobs in ``squeue`` before the
test; afterwards polls until every job the test submitted has left
``squeue`` (15 s for jobs COMPLETING, 2 s for any other state), and if one is
still there cancels it and fails the test. Every test that uses ``slurm`` gets it automatically.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import until_sync

REPO = Path(__file__).resolve().parents[2]
SLURM_SH = REPO / "scripts" / "slurm.sh"

# A job the test cancelled may stay COMPLETING until its processes exit:
# KillWait (5 s) after SIGTERM at most, plus slurmctld's bookkeeping.
LEFTOVER_DEADLINE = 15.0
# Any other job still in squeue this long after the test is a leak.
LEFTOVER_GRACE = 2.0
POLL_INTERVAL = 0.1
COMMAND_TIMEOUT = 30.0
START_TIMEOUT = 110.0  # a fresh install + bring-up takes ~15 s; pytest-timeout is 120 s


def slurm_required() -> bool:
    return os.environ.get("CLUSTER_REQUIRE_SLURM", "") == "1"


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str | Callable[[], str]
) -> object:
    """Poll ``predicate`` every :data:`POLL_INTERVAL` until it returns something truthy
    (see :func:`tests.helpers.until_sync`)."""
    return until_sync(predicate, timeout, POLL_INTERVAL, what)


def run(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT):
    """Run a command (argv list, no shell) and return its CompletedProcess."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


@dataclass(frozen=True)
class Slurm:
    """The running single-node SLURM, as the tests see it."""

    partition: str  # the default partition
    partitions: dict[str, str]  # name -> time limit as sinfo prints it ("infinite", "10:00")
    node: str
    cpus: int
    memory_mb: int
    start_output: str = field(default="", repr=False)

    def sbatch(self, *args: str, check: bool = True):
        """``sbatch ARGS`` as a CompletedProcess."""
        return run(["sbatch", *args], check=check)

    def submit(self, *args: str) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.sbatch("--parsable", *args).stdout.strip()
        job_id = out.split(";")[0]
        if not job_id.isdigit():
            raise RuntimeError(f"sbatch printed no job id: {out!r}")
        return job_id

    def jobs(self, all_states: bool = False) -> dict[str, str]:
        """Job id -> state (``squeue --noheader -o '%i %T'``).

        Without ``all_states`` only what squeue shows by default (pending,
        running, completing, ...); with it also finished jobs that slurmctld
        still remembers (MinJobAge, 10 s).
        """
        argv = ["squeue", "--noheader", "--format=%i %T"]
        if all_states:
            argv.append("--states=all")
        jobs = {}
        for line in run(argv).stdout.splitlines():
            job_id, _, state = line.strip().partition(" ")
            if job_id:
                jobs[job_id] = state.strip()
        return jobs

    def state(self, job_id: str) -> str | None:
        """The job's state, or None once slurmctld has forgotten it."""
        return self.jobs(all_states=True).get(job_id)

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 30.0) -> str:
        """Poll until the job is in one of ``states``; returns that state."""
        wanted = set(states)
        return wait_until(
            lambda: (s := self.state(job_id)) in wanted and s,
            timeout,
            lambda: f"job {job_id} to be {'/'.join(sorted(wanted))} (is {self.state(job_id)})",
        )

    def cancel(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            run(["scancel", *ids], check=False)

    def wait_gone(self, job_ids: Iterable[str], timeout: float = LEFTOVER_DEADLINE) -> None:
        """Poll until none of the jobs is in (default) squeue any more."""
        ids = set(job_ids)
        wait_until(
            lambda: not (ids & self.jobs().keys()),
            timeout,
            lambda: f"jobs {sorted(ids & self.jobs().keys())} to leave squeue",
        )


def _unavailable(reason: str) -> None:
    if slurm_required():
        pytest.fail(f"SLURM is required (CLUSTER_REQUIRE_SLURM=1) but {reason}", pytrace=False)
    pytest.skip(f"no SLURM: {reason} (set CLUSTER_REQUIRE_SLURM=1 to make this a failure)")


def _describe(start_output: str) -> Slurm:
    partitions = {}
    default = None
    for line in run(["sinfo", "--noheader", "--format=%P %l"]).stdout.splitlines():
        name, _, limit = line.strip().partition(" ")
        if name.endswith("*"):
            name = name[:-1]
            default = name
        partitions.setdefault(name, limit.strip())
    nodes = run(["sinfo", "--noheader", "--Node", "--format=%N %c %m"]).stdout.split()
    if default is None or len(nodes) < 3:
        raise RuntimeError(f"unexpected sinfo output: partitions={partitions} nodes={nodes}")
    return Slurm(
        partition=default,
        partitions=partitions,
        node=nodes[0],
        cpus=int(nodes[1]),
        memory_mb=int(nodes[2]),
        start_output=start_output,
    )


@pytest.fixture(scope="session")
def slurm() -> Slurm:
    """Start (or find) the single-node SLURM and describe it."""
    if os.geteuid() != 0:
        _unavailable("scripts/slurm.sh needs root to install and start SLURM")
    try:
        proc = run(["bash", str(SLURM_SH), "start"], check=False, timeout=START_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"`bash scripts/slurm.sh start` did not finish: {exc}")
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        output = "\n".join(output.splitlines()[-25:])
        _unavailable(f"`bash scripts/slurm.sh start` exited {proc.returncode}:\n{output}")
    try:
        return _describe(output)
    except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        _unavailable(f"SLURM started but does not answer as expected: {exc}")


@pytest.fixture
def slurm_jobs_cleanup(slurm: Slurm):
    """Fail a test that leaves a job in squeue (after cancelling it)."""
    before = set(slurm.jobs())
    yield slurm
    start = time.monotonic()
    while True:
        left = {i: s for i, s in slurm.jobs().items() if i not in before}
        if not left:
            return
        waited = time.monotonic() - start
        # Only a job on its way out (COMPLETING) gets the whole deadline.
        if waited > LEFTOVER_DEADLINE or (
            waited > LEFTOVER_GRACE and any(s != "COMPLETING" for s in left.values())
        ):
            break
        time.sleep(POLL_INTERVAL)  # polling interval of the deadline loop, not synchronisation
    slurm.cancel(left)
    outcome = "now cancelled"
    try:
        slurm.wait_gone(left)
    except pytest.fail.Exception:
        outcome = "cancelled, but still in squeue"
    listing = ", ".join(f"{i} {s}" for i, s in sorted(left.items()))
    pytest.fail(
        f"test left {len(left)} SLURM job(s) in squeue {waited:.1f}s after it ended "
        f"({outcome}): {listing}",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _slurm_job_guard(request):
    """Give every test that uses ``slurm`` the ``slurm_jobs_cleanup`` check."""
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm_jobs_cleanup")
    yield


# ----------------------------------------------------------------------------- PBS and Grid Engine

PBS_SH = REPO / "scripts" / "pbs.sh"
GRIDENGINE_SH = REPO / "scripts" / "gridengine.sh"
SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}


def _required(variable: str) -> bool:
    return os.environ.get(variable, "") == "1"


def _missing(system: str, variable: str, reason: str) -> None:
    if _required(variable):
        pytest.fail(f"{system} is required ({variable}=1) but {reason}", pytrace=False)
    pytest.skip(f"no {system}: {reason} (set {variable}=1 to make this a failure)")


def _start(script: Path, system: str, variable: str) -> str:
    """Run ``bash SCRIPT start`` (quick when already up); its stdout, or skip/fail."""
    if os.geteuid() != 0:
        _missing(system, variable, f"scripts/{script.name} needs root")
    try:
        proc = run(["bash", str(script), "start"], check=False, timeout=START_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _missing(system, variable, f"`bash scripts/{script.name} start` did not finish: {exc}")
    if proc.returncode != 0:
        output = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        _missing(system, variable, f"`bash scripts/{script.name} start` exited "
                                   f"{proc.returncode}:\n{output}")
    return proc.stdout


@dataclass(frozen=True)
class Pbs:
    """The Torque-style commands of slurm-wlm-torque on our SLURM (scripts/pbs.sh)."""

    bin_dir: Path
    slurm: Slurm


@pytest.fixture(scope="session")
def pbs_commands(slurm: Slurm) -> Pbs:
    """Install (or find) the PBS commands; skipped without them unless CLUSTER_REQUIRE_PBS=1."""
    out = _start(PBS_SH, "PBS", "CLUSTER_REQUIRE_PBS").strip().splitlines()
    bin_dir = Path(out[-1]) if out else Path()
    if not (bin_dir / "qsub").is_file():
        _missing("PBS", "CLUSTER_REQUIRE_PBS", f"scripts/pbs.sh printed no directory: {out}")
    return Pbs(bin_dir, slurm)


@pytest.fixture
def pbs(pbs_commands: Pbs, monkeypatch, tmp_path) -> Pbs:
    """The PBS commands first on PATH, the test in ``tmp_path``.

    slurm-wlm-torque's qsub names the job's output files ``<script>.o<id>`` in the
    directory it runs in, whatever ``#PBS -o`` says; so the test runs in ``tmp_path``.
    Its jobs are SLURM jobs: the ``slurm`` fixture's guard fails a test that leaves one.
    """
    monkeypatch.setenv("PATH", f"{pbs_commands.bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return pbs_commands


@dataclass(frozen=True)
class Sge:
    """The single-node Grid Engine of scripts/gridengine.sh, as the tests see it."""

    queue: str = "all.q"
    parallel_environment: str = "smp"
    slots: int = 8

    def jobs(self) -> dict[str, str]:
        """Job id -> state of every job in ``qstat -u '*'`` (queued, running, being deleted)."""
        jobs = {}
        for line in run(["qstat", "-u", "*"]).stdout.splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[0].isdigit():
                jobs[fields[0]] = fields[4]
        return jobs

    def wait_gone(self, job_ids: Iterable[str], timeout: float = LEFTOVER_DEADLINE) -> None:
        """Poll until none of the jobs is in qstat any more."""
        ids = set(job_ids)
        wait_until(lambda: not (ids & self.jobs().keys()), timeout,
                   lambda: f"SGE jobs {sorted(ids & self.jobs().keys())} to leave qstat")


@pytest.fixture(scope="session")
def sge_system() -> Sge:
    """Start (or find) Grid Engine; skipped without it unless CLUSTER_REQUIRE_SGE=1."""
    for name, value in SGE_ENV.items():
        os.environ.setdefault(name, value)
    _start(GRIDENGINE_SH, "Grid Engine", "CLUSTER_REQUIRE_SGE")
    sge = Sge()
    try:
        sge.jobs()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        _missing("Grid Engine", "CLUSTER_REQUIRE_SGE", f"qstat does not answer: {exc}")
    return sge


@pytest.fixture
def sge(sge_system: Sge, monkeypatch, tmp_path):
    """Grid Engine for one test, run in ``tmp_path``; fails a test that leaves a job in qstat."""
    monkeypatch.chdir(tmp_path)
    before = set(sge_system.jobs())
    yield sge_system
    left: dict[str, str] = {}
    try:
        sge_system.wait_gone(set(sge_system.jobs()) - before)
        return
    except AssertionError:
        left = {i: s for i, s in sge_system.jobs().items() if i not in before}
    if left:
        run(["qdel", "-f", *left], check=False)
        pytest.fail(f"test left {len(left)} Grid Engine job(s) in qstat (now deleted): "
                    + ", ".join(f"{i} {s}" for i, s in sorted(left.items())), pytrace=False)
