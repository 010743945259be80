"""Memory and CPU per task of the scheduler and the client: ours vs dask.distributed.

    python -m bench memory [--systems ours,dask] [--tasks 100000,1000000]
                           [--parts state,cluster] [--profile FILE] [--json FILE]

Two parts:

``state`` (ours only, no sockets)
    The scheduler's state machine alone (``runtime.scheduler.state``), in
    this process: two workers, one client, a no-op map of N tasks fed
    through ``UpdateGraphEvent`` and one ``TaskFinishedEvent`` per task (the
    keys, arguments, type names and stimulus ids are fresh objects per task,
    as decoding messages makes them; the function's bytes are shared, as
    pickle's memo shares them within one update-graph message). Reports the bytes that stay allocated
    per held task (``tracemalloc``, the update-graph payload dropped) and the
    bytes of one ``TaskState`` record with its own containers
    (``sys.getsizeof``, shared empty containers not counted), and the CPU
    per task of the state machine (``time.process_time``, without tracemalloc).

``cluster`` (ours and dask)
    A real cluster: the scheduler and the nannies in a process of their own
    (``python -m bench.cluster_host``: 2 worker processes x 1 thread, ours
    with its default TLS, dask as shipped plus ``bench.common.DASK_TUNED``
    so that 100,000 tasks finish in about a minute; none of those settings
    changes what a held task costs), and the client in a second process.
    ``client.map(noop, range(N))`` is held until every future is finished;
    the growth of each process's resident set size (RSS, psutil) after a
    ``gc.collect()`` in both divided by N is "scheduler" and "client" bytes
    per held task. The CPU time (psutil ``cpu_times``, user + system) that
    the map took in the scheduler's process, in the two worker processes and
    in the client's process, divided by N, is the CPU per task of each.
    ``--profile FILE`` also runs ``cProfile`` on the scheduler's event-loop
    thread during the map (started and stopped with ``run_on_scheduler``)
    and writes its statistics to FILE (``pstats`` format, one per system).

Each (part, system, N) runs in a fresh child process; a run that fails is
reported with its error and the others go on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("ours", "dask")
PARTS = ("state", "cluster")
#: Seconds a child may take (a 1M-task cluster run of ours takes about three minutes).
CHILD_TIMEOUT = 900.0


# ----------------------------------------------------------------------------- state part


def measure_state(n: int) -> dict:
    """The scheduler's state machine alone, holding ``n`` finished no-op tasks."""
    import pickle
    import tracemalloc
    import uuid

    from cluster.runtime.scheduler.events import AddWorkerEvent, TaskFinishedEvent, UpdateGraphEvent
    from cluster.runtime.scheduler.records import ComputeTaskMsg
    from cluster.runtime.scheduler.state import SchedulerState

    from bench.workloads import noop

    func = pickle.dumps(noop)

    def run(trace: bool) -> tuple[SchedulerState, float, int]:
        s = SchedulerState(validate=False)
        s.handle(AddWorkerEvent("tls://127.0.0.1:40001", nthreads=1),
                 AddWorkerEvent("tls://127.0.0.1:40002", nthreads=1))
        gc.collect()
        if trace:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0] if trace else 0
        # Fresh keys and arguments per task, as decoding the client's message makes
        # them; one function object for all (pickle's memo shares it on the wire too).
        tasks = {f"noop-{uuid.uuid4().hex}": (func, pickle.dumps(((i,), {}))) for i in range(n)}
        t0 = time.process_time()
        pending = s.handle(UpdateGraphEvent("client-1", tasks, keys=list(tasks)))
        i = 0
        while pending:
            msgs, pending = pending, []
            for msg in msgs:
                if isinstance(msg, ComputeTaskMsg):
                    i += 1
                    pending.extend(s.handle(TaskFinishedEvent(
                        msg.key, msg.worker, nbytes=16, type="".join(("None", "Type")),
                        startstops=(("compute", 1.0, 1.00001),),
                        stimulus_id=f"task_finished-{i}")))
        cpu = time.process_time() - t0
        del tasks, msgs
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base if trace else 0
        if trace:
            tracemalloc.stop()
        if len(s.tasks) != n or any(ts.state != "memory" for ts in s.tasks.values()):
            raise RuntimeError("the state machine did not finish every task")
        return s, cpu, held

    _, cpu, _ = run(trace=False)
    s, _, held = run(trace=True)
    return {"tasks": n, "state_bytes_per_task": held / n, "state_cpu_us_per_task": cpu / n * 1e6,
            "taskstate_bytes": taskstate_bytes(list(s.tasks.values())[:1000])}


def taskstate_bytes(sample: list) -> float:
    """Mean bytes of a ``TaskState`` and the containers only it holds (those seen
    once in the sample; a shared empty sentinel is everyone's and counts nothing)."""
    from collections import Counter

    containers = (set, frozenset, dict, list)
    seen: Counter = Counter()
    attrs = [a for a in type(sample[0]).__slots__ if a != "__weakref__"]
    for ts in sample:
        for a in attrs:
            v = getattr(ts, a, None)
            if isinstance(v, containers):
                seen[id(v)] += 1
    total = 0
    for ts in sample:
        total += sys.getsizeof(ts)
        for a in attrs:
            v = getattr(ts, a, None)
            if isinstance(v, containers) and seen[id(v)] == 1:
                total += sys.getsizeof(v)
    return total / len(sample)


# ----------------------------------------------------------------------------- cluster part


def _cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _settled_rss(proc, timeout: float = 10.0) -> int:
    """RSS once two samples half a second apart agree within 0.2% (or at ``timeout``)."""
    last = proc.memory_info().rss
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = proc.memory_info().rss
        if abs(now - last) <= 0.002 * last:
            return now
        last = now
    return last


def _start_profile():
    import cProfile

    import bench.memory as me

    me._PROFILE = cProfile.Profile()
    me._PROFILE.enable()
    return True


def _stop_profile(path):
    import bench.memory as me

    me._PROFILE.disable()
    me._PROFILE.dump_stats(path)
    me._PROFILE = None
    return path


def _gc_collect():
    return gc.collect()


def measure_cluster(system: str, n: int, profile: str | None = None) -> dict:
    """A no-op map of ``n`` tasks held on a real cluster (see the module docstring)."""
    import psutil

    from bench.workloads import noop

    if system == "ours":
        from cluster import Client, Security, wait
    else:
        from distributed import Client, wait
    tmp = tempfile.mkdtemp(prefix="bench-memory-")
    info_path = os.path.join(tmp, "info.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if system == "dask":
        from bench.common import DASK_TUNED, dask_env

        env.update(dask_env(DASK_TUNED))
    host = subprocess.Popen([sys.executable, "-m", "bench.cluster_host", "--system", system,
                             "--info", info_path], stdin=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    client = None
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(info_path):
            if host.poll() is not None:
                raise RuntimeError(f"bench.cluster_host exited with {host.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("bench.cluster_host not ready after 120 s")
            time.sleep(0.1)
        with open(info_path) as f:
            info = json.load(f)
        if system == "ours":
            sec = Security.from_file(info["security"]) if info["security"] else None
            client = Client(info["address"], security=sec)
        else:
            client = Client(info["address"])
        sched = psutil.Process(info["pid"])
        workers = sched.children(recursive=True)
        me = psutil.Process()
        # Warm up every code path (imports, first pickles) before the baseline.
        warm = client.map(noop, range(500))
        wait(warm)
        del warm
        time.sleep(1.0)  # the releases of the warm-up reach the scheduler
        client.run_on_scheduler(_gc_collect)
        gc.collect()
        rss0 = {"scheduler": _settled_rss(sched), "client": _settled_rss(me)}
        cpu0 = {"scheduler": _cpu(sched), "workers": sum(_cpu(w) for w in workers),
                "client": _cpu(me)}
        if profile:
            client.run_on_scheduler(_start_profile)
        t0 = time.perf_counter()
        futures = client.map(noop, range(n))
        wait(futures)
        wall = time.perf_counter() - t0
        if profile:
            client.run_on_scheduler(_stop_profile, profile)
        cpu1 = {"scheduler": _cpu(sched), "workers": sum(_cpu(w) for w in workers),
                "client": _cpu(me)}
        client.run_on_scheduler(_gc_collect)
        gc.collect()
        rss1 = {"scheduler": _settled_rss(sched), "client": _settled_rss(me)}
        if len(futures) != n or any(f.status != "finished" for f in futures[:: max(1, n // 1000)]):
            raise RuntimeError("not every future finished")
        out = {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall}
        for k in rss0:
            out[f"{k}_bytes_per_task"] = (rss1[k] - rss0[k]) / n
        out["total_bytes_per_task"] = out["scheduler_bytes_per_task"] + out["client_bytes_per_task"]
        for k in cpu0:
            out[f"{k}_cpu_us_per_task"] = (cpu1[k] - cpu0[k]) / n * 1e6
        del futures
        return out
    finally:
        if client is not None:
            client.close()
        try:
            host.stdin.close()
            host.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            host.kill()
            host.wait()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


# ----------------------------------------------------------------------------- driver


def child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory child")
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--profile")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.part == "state":
        res = measure_state(a.tasks)
    else:
        res = measure_cluster(a.system, a.tasks, a.profile)
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


def _run_child(part: str, system: str, n: int, profile: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", "bench.memory", "child", "--part", part, "--system", system,
               "--tasks", str(n), "--out", out]
        if profile:
            cmd += ["--profile", os.path.abspath(f"{profile}.{system}.{n}")]
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, timeout=CHILD_TIMEOUT,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {CHILD_TIMEOUT:.0f}s"}
        if proc.returncode != 0 or not os.path.exists(out):
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
            return {"error": f"exit {proc.returncode}: {tail}"}
        with open(out) as f:
            return json.load(f)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench memory",
                                description="Memory and CPU per task of the scheduler and client.")
    p.add_argument("--systems", default="ours,dask", help="comma-separated subset of ours,dask")
    p.add_argument("--tasks", default="100000", help="comma-separated task counts (default 100000)")
    p.add_argument("--parts", default="state,cluster", help="comma-separated subset of state,cluster")
    p.add_argument("--profile", metavar="FILE",
                   help="cProfile the scheduler's event loop during each cluster map; "
                   "writes FILE.<system>.<tasks> (pstats)")
    p.add_argument("--json", metavar="FILE", help="write the raw results here")
    a = p.parse_args(argv)
    systems = [s for s in a.systems.split(",") if s]
    parts = [s for s in a.parts.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS] + [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"unknown {', '.join(bad)}: systems are {','.join(SYSTEMS)}, "
                f"parts are {','.join(PARTS)}")
    sizes = [int(x) for x in a.tasks.split(",") if x]
    results = []
    for n in sizes:
        for part in parts:
            for system in systems:
                if part == "state" and system != "ours":
                    continue
                print(f"[{part}] {system} {n:,} tasks ...", end=" ", flush=True)
                t0 = time.monotonic()
                res = _run_child(part, system, n, a.profile if part == "cluster" else None)
                res.update(part=part, system=system, tasks=n)
                results.append(res)
                print(f"{time.monotonic() - t0:.0f}s: "
                      + (res["error"] if "error" in res else
                         ", ".join(f"{k}={_fmt(v)}" for k, v in res.items()
                                   if isinstance(v, float))), flush=True)
    if a.json:  # before the table: a reader that stops early (| head) must not lose it
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    cols = ("taskstate_bytes", "state_bytes_per_task", "scheduler_bytes_per_task",
            "client_bytes_per_task", "total_bytes_per_task", "state_cpu_us_per_task",
            "scheduler_cpu_us_per_task", "workers_cpu_us_per_task", "client_cpu_us_per_task",
            "tasks_per_s")
    print()
    print("| part | system | tasks | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for r in results:
        print(f"| {r['part']} | {r['system']} | {r['tasks']:,} | "
              + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
