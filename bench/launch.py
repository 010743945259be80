"""The ``mpi-launch`` workload: MPI launch and shutdown, ours vs dask-mpi.

The parent side: every measurement is one fresh ``python -m bench.run_launch``
child (see that module for what is timed), run with bounded time by
:func:`bench.procs.run_child`, which kills the child's whole process tree
afterwards. The two systems alternate: for each repeat, each mode and each N,
ours and dask-mpi run back to back, in swapped order on odd repeats, so both
see the machine in the same state. One untimed warm-up launch per system
comes first (file-system caches).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import psutil

from bench.procs import run_child

LAUNCH_WORKLOAD = "mpi-launch"
LAUNCH_SYSTEMS = ("ours", "dask-mpi")
#: ``--systems`` name that selects each launch system.
SELECTED_BY = {"ours": "ours", "dask-mpi": "dask"}
MPI_SIZES = {"default": (4, 8, 16), "quick": (4, 8)}
SHUTDOWN_TIMEOUT = 60.0
MAX_FAILURES = 2


@dataclass(frozen=True)
class LaunchMetric:
    key: str
    mode: str
    label: str


#: Rows of the report's launch table, in order (each for every N).
LAUNCH_METRICS = (
    LaunchMetric("ready_s", "ready", "`mpiexec` start → client sees N−1 workers (service mode)"),
    LaunchMetric("shutdown_s", "shutdown", "script's end → `mpiexec` returned (script mode)"),
    LaunchMetric("service_shutdown_s", "ready",
                 "`client.shutdown()` → `mpiexec` returned (service mode)"),
    LaunchMetric("script_ready_s", "shutdown",
                 "`mpiexec` start → script sees its workers (script mode; dask-mpi: N−2)"),
    LaunchMetric("job_cpu_s", "ready",
                 "CPU time of all the job's processes, start → exit (service mode)"),
    LaunchMetric("job_cpu_per_rank_s", "ready", "the same, per rank (÷ N)"),
    LaunchMetric("script_job_cpu_s", "shutdown",
                 "CPU time of all the job's processes, start → exit (script mode)"),
)


def launch_systems(systems):
    """The launch systems that ``--systems`` selects (dask selects dask-mpi)."""
    return [s for s in LAUNCH_SYSTEMS if SELECTED_BY[s] in systems]


def _command(system, mode, n, out, start_timeout):
    return [sys.executable, "-m", "bench.run_launch", "--system", system, "--mode", mode,
            "--n", str(n), "--out", out, "--start-timeout", f"{start_timeout:g}",
            "--shutdown-timeout", f"{SHUTDOWN_TIMEOUT:g}"]


def _one(system, mode, n, tag, *, env, cwd, tmpdir, start_timeout, keep_logs):
    """Run one launch child; return (status, metrics, info, reason)."""
    out = os.path.join(tmpdir, f"launch-{system}-{mode}-{n}-{tag}.json")
    log = os.path.join(tmpdir, f"launch-{system}-{mode}-{n}-{tag}.log")
    # The child enforces its own deadlines and kills mpiexec; these are the backstop.
    oc = run_child(_command(system, mode, n, out, start_timeout), env=env, cwd=cwd,
                   result_path=out, log_path=log,
                   timeout=start_timeout + SHUTDOWN_TIMEOUT + 60,
                   start_timeout=start_timeout + 30)
    res = oc.result or {}
    info = dict(res.get("info") or {})
    if oc.killed:
        info["killed_by_parent"] = len(oc.killed)
    if res.get("ok") and not oc.timed_out:
        return "ok", res.get("metrics", {}), info, None
    reason = res.get("error") or oc.reason
    if not reason:
        last = oc.log_tail.strip().splitlines()[-1:] or ["no output"]
        reason = f"exit code {oc.returncode} before any result: {last[0][:300]}"
    if not keep_logs:
        tail = oc.log_tail.strip().splitlines()[-6:]
        if tail:
            print("    " + "\n    ".join(tail), flush=True)
    phase = res.get("phase") or "launch"
    status = "n/a" if phase == "import" else ("timeout" if oc.timed_out else "failed")
    return status, res.get("metrics", {}), info, reason


def compiled_bytecode_env(env, tmpdir):
    """``env`` with Python's bytecode cache on, in ``tmpdir``, for every launch of both systems.

    A pip-installed package (dask-mpi, distributed, ours) ships compiled
    bytecode; a source checkout gets it the first time it is imported.  With
    ``PYTHONDONTWRITEBYTECODE`` set (as in some sandboxes and containers)
    every rank of every launch would compile our modules from source again --
    ~0.1 s of CPU per process -- while dask's come compiled from
    site-packages.  So the bytecode of both systems goes to one cache here
    (``PYTHONPYCACHEPREFIX``), filled by the untimed warm-up launches.
    """
    env = dict(env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tmpdir, "pycache")
    return env


def run_launch_workload(systems, *, sizes, repeat, env, cwd, tmpdir, start_timeout, keep_logs):
    """Run the whole workload; return {system: {"values": ..., "notes": [...], ...}}.

    ``values`` maps ``(metric key, N)`` to the list of measured seconds.  Every
    launch runs from compiled bytecode (see :func:`compiled_bytecode_env`).
    """
    env = compiled_bytecode_env(env, tmpdir)
    results = {s: {"values": {}, "notes": [], "leftovers": 0, "runs": 0, "busy": []}
               for s in systems}
    dead = {}
    failures = dict.fromkeys(systems, 0)

    def run(system, mode, n, tag, timed=True):
        if system in dead:
            return
        label = f"[{system}] {LAUNCH_WORKLOAD} {mode} N={n}{'' if timed else ' (warm-up)'}"
        # How busy the machine is just before the launch: other load skews every figure.
        busy = psutil.cpu_percent(interval=0.5)
        print(f"{label} (CPU {busy:.0f}% busy before) ...", end=" ", flush=True)
        status, metrics, info, reason = _one(system, mode, n, tag, env=env, cwd=cwd,
                                             tmpdir=tmpdir, start_timeout=start_timeout,
                                             keep_logs=keep_logs)
        r = results[system]
        r["runs"] += 1
        if timed:
            r["busy"].append(busy)
        left = info.get("left_after_grace", 0) or 0
        if left:
            r["leftovers"] += left
            r["notes"].append(f"{mode} N={n}: {left} process(es) still running "
                              f"{info.get('left_at_exit')} at mpiexec's exit, killed: "
                              f"{info.get('left_names')}")
        if status == "ok":
            failures[system] = 0
            if timed:
                for k, v in metrics.items():
                    r["values"].setdefault((k, n), []).extend(v)
            shown = ", ".join(f"{k}={v[0]:.2f}s" for k, v in metrics.items() if v)
            print(f"ok: {shown}", flush=True)
            return
        print(f"{status}: {reason}", flush=True)
        r["notes"].append(f"{mode} N={n}: {status}: {reason}")
        failures[system] += 1
        if status == "n/a" or failures[system] >= MAX_FAILURES:
            dead[system] = f"skipped after: {mode} N={n}: {reason}"
            r["notes"].append(dead[system])

    for system in systems:
        run(system, "ready", min(sizes), "warmup", timed=False)
    for rep in range(repeat):
        for mode in ("ready", "shutdown"):
            for n in sizes:
                order = systems if rep % 2 == 0 else list(reversed(systems))
                for system in order:
                    run(system, mode, n, f"r{rep}")
    return results
