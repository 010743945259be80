"""``python -m cluster scheduler`` / ``worker``: real processes on 127.0.0.1.

Every command runs as ``sys.executable -m cluster ...`` with its output in
files under ``tmp_path``; addresses come from scheduler files, ports are 0.
Each test kills the process trees it started, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import cluster.__main__ as cluster_main
from cluster import Client
from tests.helpers import until_sync

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

#: Variables that would change what the commands do (ours) or that belong to a launcher.
_FOREIGN_PREFIXES = ("CLUSTER_", "HYDRA_", "PMI_", "PMIX_", "OMPI_", "MPI_", "SLURM_", "PBS_")


def tagged(i):
    """``(i, pid)``: which process computed it."""
    return i, os.getpid()


def inc(x):
    return x + 1


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    """The client in this process must use the scheduler file it is given."""
    monkeypatch.delenv("CLUSTER_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.delenv("CLUSTER_SCHEDULER_FILE", raising=False)


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


class Command:
    """One ``python -m cluster ...`` process, its output in files."""

    def __init__(self, args: list[str], tmp_path: Path, label: str, env: dict[str, str] | None = None):
        self.args = args
        self.label = label
        self.out_path = tmp_path / f"{label}.out"
        self.err_path = tmp_path / f"{label}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "cluster", *args], cwd=tmp_path,
                                         env=env or command_env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.label} ({' '.join(self.args)}) still running after {timeout}s; "
                        f"stderr:\n{self.stderr}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_tree(self) -> None:
        try:
            parent = psutil.Process(self.proc.pid)
            procs = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        try:
            self.proc.wait(10)  # reap it
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


@pytest.fixture
def launch(tmp_path):
    """``launch(label, *args, env=...)`` starts a command; all are killed at the end of the test."""
    started: list[Command] = []

    def start(label: str, *args: str, env: dict[str, str] | None = None) -> Command:
        cmd = Command(list(args), tmp_path, label, env)
        started.append(cmd)
        return cmd

    try:
        yield start
    finally:
        for cmd in started:
            cmd.kill_tree()


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=tmp_path,
                          env=env or command_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def read_address(path: Path, timeout: float = 20) -> str:
    """The address in a scheduler file, once it is there."""
    until_sync(path.exists, timeout=timeout, interval=0.02, what=f"scheduler file {path}")
    return json.loads(path.read_text())["address"]


def workers_by_name(client: Client) -> dict:
    return {w["name"]: dict(w, address=a) for a, w in client.scheduler_info()["workers"].items()}


def computed_once(client: Client, key) -> bool:
    story = client.story(key)
    return len([e for e in story if e[0] == key and tuple(e[1:3]) == ("processing", "memory")]) == 1


# ----------------------------------------------------------------------------- help and bad options


@pytest.mark.parametrize("command, options", [
    ("scheduler", ["--host", "--port", "--interface", "--scheduler-file", "--idle-timeout",
                   "--worker-ttl", "--allowed-failures", "--validate", "--no-dashboard",
                   "--dashboard-address", "CLUSTER_PORT"]),
    ("worker", ["ADDRESS", "--scheduler-file", "--nworkers", "--nthreads", "--memory-limit",
                "--name", "--no-nanny", "--lifetime", "--death-timeout", "--resources",
                "--worker-port", "--no-reconnect", "--dashboard-address", "--no-tls", "CLUSTER_NTHREADS",
                "SIGTERM"]),
])
def test_help(tmp_path, command, options):
    result = run_cli(tmp_path, command, "--help")
    assert result.returncode == 0, result.stderr
    for option in options:
        assert option in result.stdout


ADDRESS = "tcp://127.0.0.1:1"  # never contacted: the command line is rejected first


@pytest.mark.parametrize("args, env, named", [
    (["scheduler", "--no-such-option"], {}, "--no-such-option"),
    (["scheduler", "--port", "http"], {}, "--port"),
    (["scheduler", "--idle-timeout", "soon"], {}, "--idle-timeout"),
    (["worker", ADDRESS, "--memory-limit", "lots"], {}, "--memory-limit"),
    (["worker", ADDRESS, "--lifetime", "forever"], {}, "--lifetime"),
    (["worker", ADDRESS, "--resources", "GPU"], {}, "--resources"),
    (["worker", ADDRESS, "--nworkers", "0"], {}, "--nworkers"),
    (["worker"], {}, "--scheduler-file"),
    (["worker", ADDRESS, "--scheduler-file", "s.json"], {}, "--scheduler-file"),
    (["worker", ADDRESS], {"CLUSTER_NTHREADS": "many"}, "CLUSTER_NTHREADS"),
])
def test_bad_options_are_named_without_traceback(tmp_path, args, env, named):
    result = run_cli(tmp_path, *args, env=command_env(**env))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_values_the_runtime_rejects_exit_1_without_traceback(tmp_path):
    result = run_cli(tmp_path, "scheduler", "--port", "0", "--interface", "no-such-if0")
    assert result.returncode == 1, result.stderr
    assert "no-such-if0" in result.stderr and "Traceback" not in result.stderr
    # a worker that cannot find its scheduler gives up after --death-timeout
    result = run_cli(tmp_path, "worker", "--no-nanny", "--death-timeout", "1s",
                     "--scheduler-file", str(tmp_path / "missing.json"))
    assert result.returncode == 1, result.stderr
    assert "missing.json" in result.stderr and "Traceback" not in result.stderr


def test_submit_without_its_required_options_names_them(tmp_path):
    result = run_cli(tmp_path, "submit", "job.sh")
    assert result.returncode == 2
    assert "--system" in result.stderr and "Traceback" not in result.stderr


def test_other_command_lines_go_to_the_launcher(monkeypatch, capsys):
    import types

    calls = []
    fake = types.ModuleType("cluster.hpc.launcher")
    fake.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, "cluster.hpc.launcher", fake)
    assert cluster_main.main(["-n", "2", "script.py", "--flag"]) == 7
    assert calls == [["-n", "2", "script.py", "--flag"]]
    # not installed (yet): a clear error, not a traceback
    monkeypatch.setitem(sys.modules, "cluster.hpc.launcher", None)
    assert cluster_main.main(["script.py"]) == 2
    err = capsys.readouterr().err
    assert "cluster.hpc.launcher" in err and "scheduler" in err and "worker" in err


# ----------------------------------------------------------------------------- running clusters


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_scheduler_signal_closes_it_and_removes_its_file(tmp_path, launch, sig):
    sched_file = tmp_path / "scheduler.json"
    scheduler = launch("scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched_file))
    address = read_address(sched_file)
    assert address.startswith("tcp://127.0.0.1:")  # loopback by default
    until_sync(lambda: f"Scheduler at {address}" in scheduler.stderr, timeout=10,
               what="the scheduler to log its address")
    # a worker that does not reconnect leaves when its scheduler goes away
    worker = launch("worker", "worker", address, "--no-nanny", "--no-reconnect", "--nthreads", "1",
                    "--memory-limit", "0", "--name", "lonely")
    until_sync(lambda: "running: 'lonely'" in worker.stderr, timeout=20,
               what="the worker to start")
    scheduler.signal(sig)
    assert scheduler.wait(15) == 0, scheduler.stderr
    assert not sched_file.exists()
    assert worker.wait(15) == 0, worker.stderr
    assert "Traceback" not in scheduler.stderr + worker.stderr


def test_cluster_from_the_command_line(tmp_path, launch):
    sched_file = tmp_path / "scheduler.json"
    scheduler = launch("scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched_file))
    # two workers without nannies; the command line beats CLUSTER_NTHREADS
    # --no-tls: a plain tcp:// scheduler file is accepted only with the opt-out of TLS
    plain = launch("plain", "worker", "--scheduler-file", str(sched_file), "--no-tls", "--nworkers", "2",
                   "--no-nanny", "--nthreads", "2", "--name", "plain", "--memory-limit", "1GB",
                   "--resources", "GPU=2,MEM=10e9", env=command_env(CLUSTER_NTHREADS="3"))
    # one worker with a nanny, its threads from the environment
    nannied = launch("nannied", "worker", "--scheduler-file", str(sched_file), "--name", "nanny-w",
                     "--memory-limit", "2GB", env=command_env(CLUSTER_NTHREADS="3", CLUSTER_TLS="0"))
    read_address(sched_file)
    with Client(scheduler_file=str(sched_file), timeout=20, security=False) as client:
        until_sync(lambda: len(client.scheduler_info()["workers"]) == 3, timeout=30,
                   interval=0.05, what="three workers")
        workers = workers_by_name(client)
        assert set(workers) == {"plain-0", "plain-1", "nanny-w"}
        for name in ("plain-0", "plain-1"):
            w = workers[name]
            assert (w["nthreads"], w["memory_limit"], w["nanny"]) == (2, 10**9, None)
            assert w["resources"] == {"GPU": 2.0, "MEM": 1e10}
            assert w["pid"] == plain.proc.pid  # in the command's own process
        w = workers["nanny-w"]
        assert (w["nthreads"], w["memory_limit"], w["resources"]) == (3, 2 * 10**9, {})
        assert w["nanny"] is not None and w["pid"] != nannied.proc.pid
        nanny_pid = w["pid"]

        assert client.gather(client.map(inc, range(10))) == list(range(1, 11))
        assert client.submit(inc, 1, resources={"GPU": 1}).result() == 2

        # data that only the nanny's worker holds...
        futures = [client.submit(tagged, i, workers=["nanny-w"], pure=False) for i in range(4)]
        assert client.gather(futures) == [(i, nanny_pid) for i in range(4)]
        # ...survives SIGTERM to its command: the worker retires gracefully
        nannied.signal(signal.SIGTERM)
        assert nannied.wait(40) == 0, nannied.stderr
        assert "retiring 1 worker(s) gracefully" in nannied.stderr
        assert not psutil.pid_exists(nanny_pid) or \
            psutil.Process(nanny_pid).status() == psutil.STATUS_ZOMBIE
        until_sync(lambda: "nanny-w" not in workers_by_name(client), timeout=10,
                   what="the scheduler to forget the retired worker")
        plain_addresses = {workers["plain-0"]["address"], workers["plain-1"]["address"]}
        assert all(set(holders) <= plain_addresses and holders
                   for holders in client.who_has(futures).values())
        assert client.gather(futures) == [(i, nanny_pid) for i in range(4)]  # not recomputed
        assert all(computed_once(client, f.key) for f in futures)

        client.shutdown()
    assert scheduler.wait(20) == 0, scheduler.stderr
    assert plain.wait(20) == 0, plain.stderr
    assert not sched_file.exists()
    for cmd in (scheduler, plain, nannied):
        assert "Traceback" not in cmd.stderr, cmd.stderr


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:  # pragma: no cover - shown in the assertion
        return e.code, e.read().decode()


def test_dashboard_options_of_the_commands(tmp_path, launch):
    sched_file = tmp_path / "scheduler.json"
    launch("scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched_file),
           "--dashboard-address", "127.0.0.1:0")
    worker = launch("worker", "worker", "--scheduler-file", str(sched_file), "--no-tls",
                    "--nthreads", "1", "--name", "dash", "--dashboard-address", "127.0.0.1:0")
    read_address(sched_file)
    with Client(scheduler_file=str(sched_file), timeout=20, security=False) as client:
        until_sync(lambda: len(client.scheduler_info()["workers"]) == 1, timeout=30,
                   interval=0.05, what="the worker")
        assert client.submit(inc, 1).result() == 2
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        status, text = _get(link.rsplit("/", 1)[0] + "/metrics")
        assert status == 200 and 'cluster_scheduler_workers{status="running"} 1' in text
        (w,) = client.scheduler_info()["workers"].values()
        port = w["services"]["dashboard"]  # the worker process behind the nanny serves it
        status, text = _get(f"http://127.0.0.1:{port}/health")
        assert status == 200
        client.shutdown()
    assert worker.wait(20) == 0, worker.stderr
    # --no-dashboard: nothing served
    sched_file2 = tmp_path / "scheduler2.json"
    quiet = launch("quiet", "scheduler", "--port", "0", "--scheduler-file", str(sched_file2),
                   "--no-dashboard")
    read_address(sched_file2)
    with Client(scheduler_file=str(sched_file2), timeout=20, security=False) as client:
        assert client.dashboard_link is None
        client.shutdown()
    assert quiet.wait(20) == 0, quiet.stderr
