"""Child process of the ``mpi-launch`` benchmark: one ``mpiexec`` launch, timed.

    python -m bench.run_launch --system {ours,dask-mpi} --mode {ready,shutdown} \
        --n N --out RESULT.json [--start-timeout S] [--shutdown-timeout S]

``--mode ready`` (service mode): the client library is imported first, then
``mpiexec -n N`` starts the cluster with a scheduler file
(``python -m cluster --scheduler-file F`` or ``python -m dask_mpi.cli
--scheduler-file F``). As soon as the file holds an address, a ``Client``
connects through it and ``wait_for_workers(N - 1)``. Recorded: ``ready_s``
(``mpiexec`` start -> the client sees all N - 1 workers), ``file_s`` (->
the scheduler file is readable), then ``service_shutdown_s``
(``client.shutdown()`` called -> ``mpiexec`` returned).

``--mode shutdown`` (script mode): ``mpiexec -n N`` runs
``bench/launch_script.py`` (``python -m cluster ... launch_script.py`` for
ours; ``python launch_script.py`` with ``dask_mpi.initialize()`` for
dask-mpi). Recorded: ``shutdown_s`` (the script's last timestamp ->
``mpiexec`` returned) and ``script_ready_s`` (``mpiexec`` start -> the
script sees all its workers: N - 1 for ours, N - 2 for dask-mpi, whose rank 1
is the client).

``mpiexec`` runs in its own session and this process is a child subreaper, so
ranks and worker processes that outlive ``mpiexec`` become our children: they
are counted (``info.left_at_exit``, ``info.left_after_grace``) and killed.
``job_cpu_s`` is the CPU time (user + system) of all the job's processes from
start to exit (``mpiexec``, its proxy, every rank and worker process), which
other load on the machine hardly changes; ``job_cpu_per_rank_s`` is that
divided by N (``script_job_cpu_s`` and ``script_job_cpu_per_rank_s``: the same
in script mode). Every wait
has a deadline; past it the whole ``mpiexec`` process group is
SIGKILLed and the error is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from bench.common import ResultFile, read_result
from bench.procs import become_subreaper
from bench.run_client import check_loopback

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "launch_script.py")
SYSTEMS = ("ours", "dask-mpi")
#: How long processes that outlived mpiexec get to exit before they are killed.
GRACE_S = 5.0


def find_mpiexec():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(local, os.X_OK):
        return local
    return shutil.which("mpiexec")


def mpi_command(mpiexec, system, mode, n, workdir, start_timeout):
    """The ``mpiexec`` command line, and the file it reports through."""
    py = sys.executable
    if mode == "ready":
        sched = os.path.join(workdir, "scheduler.json")
        if system == "ours":
            tail = ["-m", "cluster", "--scheduler-file", sched, "--nthreads", "1",
                    "--interface", "lo"]
        else:
            tail = ["-m", "dask_mpi.cli", "--scheduler-file", sched, "--nthreads", "1",
                    "--interface", "lo", "--scheduler-port", "0", "--no-dashboard"]
        return [mpiexec, "-n", str(n), py, *tail], sched
    marks = os.path.join(workdir, "marks.json")
    script_args = ["--system", system, "--out", marks, "--timeout", str(start_timeout)]
    if system == "ours":
        cmd = [mpiexec, "-n", str(n), py, "-m", "cluster", "--nthreads", "1", "--interface", "lo",
               SCRIPT, *script_args, "--workers", str(n - 1)]
    else:
        cmd = [mpiexec, "-n", str(n), py, SCRIPT, *script_args, "--workers", str(n - 2)]
    return cmd, marks


class Launch:
    """``mpiexec`` in its own session; a thread notes the wall time it returns."""

    def __init__(self, cmd, cwd):
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.t_exit = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self):
        self.proc.wait()
        self.t_exit = time.time()

    def exited(self):
        return self.t_exit is not None

    def join(self, deadline):
        """Wait for ``mpiexec`` until the monotonic ``deadline``; True if it returned."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return self.exited()

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._thread.join(5)


def live_descendants():
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def leftovers(info):
    """Count, wait for, then kill what outlived ``mpiexec``."""
    reap()
    left = live_descendants()
    info["left_at_exit"] = len(left)
    deadline = time.monotonic() + GRACE_S
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        reap()
        left = live_descendants()
    info["left_after_grace"] = len(left)
    if left:
        info["left_names"] = sorted({" ".join(p.cmdline()[1:4]) for p in left if p.is_running()})
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    reap()


def wait_scheduler_file(path, launch, deadline):
    while True:
        try:
            with open(path) as f:
                address = json.load(f)["address"]
            if address:
                return address
        except (OSError, ValueError, KeyError):
            pass
        if launch.exited():
            raise RuntimeError(f"mpiexec exited with status {launch.proc.returncode} "
                               "before the scheduler file was written")
        if time.monotonic() > deadline:
            raise TimeoutError("no scheduler file before the start deadline")
        time.sleep(0.005)


def run_ready(args, res, Client, launch, sched_file):
    deadline = time.monotonic() + args.start_timeout
    address = wait_scheduler_file(sched_file, launch, deadline)
    t_file = time.time()
    check_loopback([address])
    remaining = max(1.0, deadline - time.monotonic())
    client = Client(scheduler_file=sched_file, timeout=remaining)
    try:
        client.wait_for_workers(args.n - 1, timeout=max(1.0, deadline - time.monotonic()))
        t_ready = time.time()
        res.ready()
        workers = sorted(client.scheduler_info()["workers"])
        check_loopback(workers)
        if len(workers) != args.n - 1:
            raise AssertionError(f"{len(workers)} workers, expected {args.n - 1}")
        res.record(ready_s=t_ready - launch.t0, file_s=t_file - launch.t0)
        res.set(info={"scheduler": address, "workers": len(workers)})
        t_sd = time.time()
        client.shutdown()
    finally:
        try:
            client.close()
        except Exception:
            pass
    if not launch.join(time.monotonic() + args.shutdown_timeout):
        raise TimeoutError(f"mpiexec still running {args.shutdown_timeout:g}s after "
                           "client.shutdown()")
    res.record(service_shutdown_s=launch.t_exit - t_sd)
    return launch.proc.returncode


def children_cpu_s():
    """CPU seconds (user + system) of every descendant reaped so far.

    This process is fresh for each launch and every process of the job is
    reaped by its parent (or by us, as subreaper), so after the job this is
    the CPU time of the whole job: ``mpiexec``, proxies, ranks, workers.
    """
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_shutdown(args, res, launch, marks_file):
    deadline = time.monotonic() + args.start_timeout + args.shutdown_timeout
    ready_seen = False
    while not launch.join(min(deadline, time.monotonic() + 0.05)):
        if not ready_seen and (read_result(marks_file) or {}).get("t_ready"):
            ready_seen = True
            res.ready()
        if time.monotonic() > deadline:
            raise TimeoutError(f"mpiexec still running after {time.time() - launch.t0:.0f}s "
                               f"(script {'ready' if ready_seen else 'not ready'})")
    marks = read_result(marks_file) or {}
    if launch.proc.returncode != 0:
        raise RuntimeError(f"mpiexec exited with status {launch.proc.returncode}")
    if not marks.get("t_end"):
        raise RuntimeError("the script did not write its end mark")
    check_loopback([marks.get("scheduler"), *marks.get("workers", [])])
    res.record(shutdown_s=launch.t_exit - marks["t_end"],
               script_ready_s=marks["t_ready"] - launch.t0,
               total_s=launch.t_exit - launch.t0)
    res.set(info={"scheduler": marks.get("scheduler"), "workers": len(marks.get("workers", []))})
    return launch.proc.returncode


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run_launch")
    p.add_argument("--system", required=True, choices=SYSTEMS)
    p.add_argument("--mode", required=True, choices=["ready", "shutdown"])
    p.add_argument("--n", type=int, required=True, help="MPI ranks (mpiexec -n)")
    p.add_argument("--out", required=True, help="result file (JSON)")
    p.add_argument("--start-timeout", type=float, default=90.0)
    p.add_argument("--shutdown-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    res = ResultFile(args.out, args.system, "mpi-launch", {"n": args.n, "mode": args.mode})
    become_subreaper()
    launch = None
    info = {}
    workdir = tempfile.mkdtemp(prefix="hpc-bench-launch-")
    try:
        Client = None
        if args.mode == "ready":  # the client library is loaded before the clock starts
            if args.system == "ours":
                from cluster import Client
            else:
                import dask_mpi  # noqa: F401  (fail in the import phase if it is missing)
                from distributed import Client
        elif args.system == "dask-mpi":
            import dask_mpi  # noqa: F401
        mpiexec = find_mpiexec()
        if mpiexec is None:
            raise RuntimeError("mpiexec not found (install the bench extra: mpich)")
        cmd, report_file = mpi_command(mpiexec, args.system, args.mode, args.n, workdir,
                                       args.start_timeout)
        res.phase("start")
        launch = Launch(cmd, cwd=workdir)
        if args.mode == "ready":
            run_ready(args, res, Client, launch, report_file)
        else:
            run_shutdown(args, res, launch, report_file)
        info["returncode"] = launch.proc.returncode
        leftovers(info)
        if not info["left_after_grace"]:
            key = "job_cpu_s" if args.mode == "ready" else "script_job_cpu_s"
            cpu = children_cpu_s()
            # per rank: each rank's share, its worker process and the scheduler's included
            res.record(**{key: cpu, key.replace("_s", "_per_rank_s", 1): cpu / args.n})
        res.set(phase="done", ok=True)
        return 0
    except BaseException as e:
        res.fail(e)
        return 1
    finally:
        if launch is not None:
            if not launch.exited():
                launch.kill()
                info["killed_mpiexec"] = True
            if "left_after_grace" not in info:
                leftovers(info)
        res.data.setdefault("info", {}).update(info)
        res.write()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
