"""Many workers on one scheduler: registration, heartbeats and a no-op map at 10/100/1,000.

    python -m bench scale [--systems ours,dask] [--workers 10,100,1000] [--procs 4]
                          [--tasks 20000] [--idle 10] [--profile DIR]
                          [--json FILE] [--output bench/RESULTS.md]

For each system and each worker count N, in fresh processes on 127.0.0.1:

* a **scheduler process** (``python -m bench.scale --role scheduler``): ours with
  ``security=True`` (TLS, as ``LocalCluster`` ships) and its status page on, on
  uvloop (``runtime.loop.run``); dask's ``distributed.Scheduler`` as shipped (plain
  TCP, no dashboard: bokeh is not installed), on asyncio's loop. It counts its
  workers every 10 ms until there are N and then writes the time and its own CPU
  time, and stops counting;
* **worker processes** (``--role workers``): ``--procs`` of them (4 by default, fewer
  when N is smaller), each starting its share of N ``Worker(scheduler_file=...,
  nthreads=1, dashboard=False, host="127.0.0.1")`` objects at once in one event loop;
* a **client process** (``--role client``) once all are registered: a warm-up map
  of max(N, 200) tasks, then ``client.map(noop, range(tasks), pure=False)`` waited
  for, timed.

Measured (CPU time is the scheduler process's, all threads, from
``/proc/PID/task/*/schedstat``):

``register_s``
    from launching the worker processes to the scheduler counting N workers
    (includes the worker processes' interpreter start and imports; ``window_s`` is
    first to last registration);
``cpu_per_reg_ms``
    scheduler CPU from just before the launch to the N-th registration, over N
    (accepting the connection, the TLS handshake for ours, the registration
    message, the state change, and whatever the first heartbeats cost meanwhile);
``hb_us_per_worker_s``
    scheduler CPU over an idle window of ``--idle`` seconds (after 3 s of settling),
    over N and the window: what keeping N idle workers costs per worker per second
    (heartbeats, the periodic checks). ``hb_interval_s`` is the heartbeat interval a
    worker used (dask's grows with the number of workers; ours is 1 s), so
    ``hb_us_per_worker_s * hb_interval_s`` is the CPU per heartbeat;
``map_tasks_per_s``
    tasks of the timed map over its wall time; ``map_sched_us_per_task`` the
    scheduler CPU during it per task.

``--profile DIR`` runs ``cProfile`` in the scheduler process (its event-loop thread):
``DIR/<system>-<N>-register.pstats`` from start to the N-th registration and
``DIR/<system>-<N>-idle.pstats`` over the settle and idle windows; the map is not
run then, and the CPU figures of a profiled run are not comparable (profiling
costs CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("ours", "dask")
LABELS = {"ours": "ours (TLS)", "dask": "dask (plain TCP)"}
#: The line that starts this section of bench/RESULTS.md, and the one that ends it.
MARKER = "<!-- scale: this section is written by `python -m bench scale` -->"
END_MARKER = "<!-- /scale -->"
SETTLE_S = 3.0
REGISTER_DEADLINE_S = 180.0
MAP_DEADLINE_S = 240.0


# ----------------------------------------------------------------------------- helpers


def cpu_seconds(pid: int) -> float:
    """Run time of every thread of ``pid`` (ns resolution), in seconds."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wait_for(path: str, deadline_s: float, procs=(), what: str = "", test=None) -> dict:
    """The JSON in ``path`` once it exists (and ``test(data)`` holds); raise after the deadline
    or when one of ``procs`` has exited."""
    end = time.monotonic() + deadline_s
    while True:
        data = read_json(path)
        if data is not None and (test is None or test(data)):
            return data
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a child exited with code {p.returncode}")
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not done after {deadline_s:g}s")
        time.sleep(0.02)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env["PYTHONUNBUFFERED"] = "1"
    for key in [k for k in env if k.startswith("DASK_")]:
        del env[key]  # dask as shipped, whatever this shell says
    return env


def raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----------------------------------------------------------------------------- child roles


def role_scheduler(a) -> None:
    """Start a scheduler, count workers until ``a.expect``, then serve until killed."""
    raise_nofile()
    status = os.path.join(a.dir, "scheduler.json")
    sched_file = os.path.join(a.dir, "scheduler-file.json")
    profs = []  # the registration's profiler, then the idle windows'
    if a.profile:
        import cProfile

        profs.append(cProfile.Profile())

    def dump_idle(*_):
        if profs:
            profs[-1].disable()
            profs[-1].dump_stats(os.path.join(a.profile, f"{a.system}-{a.expect}-idle.pstats"))
        write_json(os.path.join(a.dir, "profile-done.json"), {"t": time.time()})

    signal.signal(signal.SIGUSR1, dump_idle)

    async def main(Scheduler, **kw):
        s = Scheduler(scheduler_file=sched_file, host="127.0.0.1", port=0, **kw)
        await s
        write_json(status, {"pid": os.getpid(), "address": s.address, "t": time.time()})
        await asyncio.sleep(0.5)
        if profs:
            profs[-1].enable()
        first = None
        while len(s.workers) < a.expect:
            if first is None and s.workers:
                first = time.time()
            await asyncio.sleep(0.01)
        t_all = time.time()
        cpu = cpu_seconds(os.getpid())
        if profs:
            profs[-1].disable()
            profs[-1].dump_stats(os.path.join(a.profile, f"{a.system}-{a.expect}-register.pstats"))
            profs.append(cProfile.Profile())
            profs[-1].enable()
        write_json(os.path.join(a.dir, "registered.json"),
                   {"t_first": first or t_all, "t_all": t_all, "cpu_s": cpu, "n": len(s.workers)})
        await asyncio.Event().wait()

    if a.system == "ours":
        from cluster.runtime.loop import run
        from cluster.runtime.scheduler import Scheduler

        run(main(Scheduler, security=True))
    else:
        from distributed import Scheduler

        asyncio.run(main(Scheduler, dashboard=False))


def role_workers(a) -> None:
    """Start ``a.n`` Worker objects at once in this process's loop; serve until killed."""
    raise_nofile()
    sched_file = os.path.join(a.dir, "scheduler-file.json")
    status = os.path.join(a.dir, f"workers-{a.index}.json")
    t_start = time.time()

    async def main(Worker, interval):
        t_imported = time.time()
        ws = [Worker(scheduler_file=sched_file, nthreads=1, dashboard=False, host="127.0.0.1")
              for _ in range(a.n)]
        await asyncio.gather(*ws)
        info = {"pid": os.getpid(), "t_start": t_start, "t_imported": t_imported,
                "t_started": time.time(), "n": len(ws)}
        write_json(status, {**info, "hb_interval_s": interval(ws[0])})
        while True:  # dask's interval changes with the first heartbeats' replies
            await asyncio.sleep(1.0)
            write_json(status, {**info, "hb_interval_s": interval(ws[0])})

    if a.system == "ours":
        from cluster.runtime.loop import run
        from cluster.runtime.worker import Worker

        run(main(Worker, lambda w: w.heartbeat_interval))
    else:
        from distributed import Worker

        asyncio.run(main(Worker, lambda w: w.periodic_callbacks["heartbeat"].callback_time / 1000))


def role_client(a) -> None:
    """A warm-up map, then the timed no-op map; scheduler CPU around it from /proc."""
    from bench.workloads import noop

    sched_file = os.path.join(a.dir, "scheduler-file.json")
    if a.system == "ours":
        from cluster import Client, wait
    else:
        from distributed import Client, wait
    with Client(scheduler_file=sched_file) as client:
        wait(client.map(noop, range(max(a.n, 200)), pure=False))
        cpu0 = cpu_seconds(a.sched_pid)
        t0 = time.perf_counter()
        futs = client.map(noop, range(a.tasks), pure=False)
        wait(futs)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(a.sched_pid) - cpu0
        del futs
    write_json(os.path.join(a.dir, "client.json"),
               {"wall_s": wall, "tasks": a.tasks, "sched_cpu_s": cpu})


# ----------------------------------------------------------------------------- state machine alone


def measure_state(n: int, tasks: int) -> dict:
    """Ours' scheduler state machine alone (no sockets), with ``n`` workers: CPU per
    registration, per heartbeat (with the ticks of one second) and per task of a
    no-op map of ``tasks`` (each finished task answered at once), in microseconds."""
    import pickle

    from cluster.runtime.scheduler.events import (
        AddWorkerEvent,
        HeartbeatEvent,
        TaskFinishedEvent,
        TickEvent,
        UpdateGraphEvent,
    )
    from cluster.runtime.scheduler.records import ComputeTaskMsg
    from cluster.runtime.scheduler.state import SchedulerState

    from bench.workloads import noop

    s = SchedulerState(validate=False, worker_ttl=60.0)
    addrs = [f"tls://127.0.0.1:{20000 + i}" for i in range(n)]
    t = time.process_time()
    for a in addrs:
        s.handle(AddWorkerEvent(a, nthreads=1))
    reg = (time.process_time() - t) / n
    t = time.process_time()
    for r in range(5):
        for a in addrs:
            s.handle(HeartbeatEvent(a, {"memory": 1, "executing": 0}))
        s.handle(TickEvent(100.0 + r), TickEvent(100.5 + r))
    hb = (time.process_time() - t) / n / 5
    func = pickle.dumps(noop)
    graph = {f"noop-{i}": (func, pickle.dumps(((i,), {}))) for i in range(tasks)}
    t = time.process_time()
    pending = s.handle(UpdateGraphEvent("client-1", graph, keys=list(graph)))
    while pending:
        msgs, pending = pending, []
        for m in msgs:
            if isinstance(m, ComputeTaskMsg):
                pending += s.handle(TaskFinishedEvent(
                    m.key, m.worker, nbytes=16, type="NoneType",
                    startstops=(("compute", 1.0, 1.00001),), stimulus_id=f"done-{m.key}"))
    mapped = (time.process_time() - t) / tasks
    return {"state_register_us": reg * 1e6, "state_heartbeat_us": hb * 1e6,
            "state_map_us_per_task": mapped * 1e6}


# ----------------------------------------------------------------------------- one run


def spawn(role: str, system: str, d: str, log, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.scale", "--role", role, "--system", system, "--dir", d, *extra]
    return subprocess.Popen(cmd, env=child_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs) -> None:
    from bench.procs import kill_tree

    for p in procs:
        kill_tree(p.pid)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def run_one(system: str, n: int, args) -> dict:
    """Measure one (system, N); every process it starts is gone when it returns."""
    d = tempfile.mkdtemp(prefix=f"hpc-scale-{system}-{n}-")
    log = open(os.path.join(d, "log.txt"), "wb")
    procs: list[subprocess.Popen] = []
    out: dict = {"system": system, "workers": n}
    try:
        extra = ["--expect", str(n)] + (["--profile", args.profile] if args.profile else [])
        sched = spawn("scheduler", system, d, log, *extra)
        procs.append(sched)
        st = wait_for(os.path.join(d, "scheduler.json"), 60, procs, "scheduler start")
        pid = st["pid"]
        nprocs = min(args.procs, n)
        shares = [n // nprocs + (1 if i < n % nprocs else 0) for i in range(nprocs)]
        cpu0, t_launch = cpu_seconds(pid), time.time()
        workers = [spawn("workers", system, d, log, "--n", str(k), "--index", str(i))
                   for i, k in enumerate(shares)]
        procs += workers
        reg = wait_for(os.path.join(d, "registered.json"), REGISTER_DEADLINE_S, procs,
                       f"{n} workers registering")
        wstats = [wait_for(os.path.join(d, f"workers-{i}.json"), 60, procs, "worker processes")
                  for i in range(nprocs)]
        out.update(register_s=reg["t_all"] - t_launch, window_s=reg["t_all"] - reg["t_first"],
                   register_after_import_s=reg["t_all"] - max(w["t_imported"] for w in wstats),
                   cpu_per_reg_ms=(reg["cpu_s"] - cpu0) / n * 1e3)
        time.sleep(SETTLE_S)
        wpids = [w["pid"] for w in wstats]
        c1, w1, t1 = cpu_seconds(pid), sum(cpu_seconds(p) for p in wpids), time.monotonic()
        time.sleep(args.idle)
        c2, w2, t2 = cpu_seconds(pid), sum(cpu_seconds(p) for p in wpids), time.monotonic()
        wstats = [read_json(os.path.join(d, f"workers-{i}.json")) for i in range(nprocs)]
        out.update(hb_us_per_worker_s=(c2 - c1) / (t2 - t1) / n * 1e6,
                   worker_side_us_per_worker_s=(w2 - w1) / (t2 - t1) / n * 1e6,
                   hb_interval_s=wstats[0]["hb_interval_s"],
                   sched_rss_mb=rss_bytes(pid) / 2**20,
                   worker_rss_mb_per_worker=sum(rss_bytes(p) for p in wpids) / n / 2**20)
        if args.profile:
            os.kill(pid, signal.SIGUSR1)
            wait_for(os.path.join(d, "profile-done.json"), 30, procs, "profile dump")
        elif args.tasks:
            client = spawn("client", system, d, log, "--n", str(n), "--tasks", str(args.tasks),
                           "--sched-pid", str(pid))
            procs.append(client)
            cres = wait_for(os.path.join(d, "client.json"), MAP_DEADLINE_S, procs, "no-op map")
            out.update(map_tasks_per_s=cres["tasks"] / cres["wall_s"],
                       map_sched_us_per_task=cres["sched_cpu_s"] / cres["tasks"] * 1e6)
        if system == "ours" and args.tasks:
            out.update(measure_state(n, args.tasks))
        out["status"] = "ok"
    except Exception as e:  # reported as n/a with the reason; the other runs go on
        out.update(status="failed", reason=f"{type(e).__name__}: {e}")
        log.flush()
        with open(os.path.join(d, "log.txt"), "rb") as f:
            out["log_tail"] = f.read()[-2000:].decode("utf-8", "replace")
    finally:
        stop(procs)
        log.close()
        shutil.rmtree(d, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- report


COLUMNS = (
    ("register_s", "start → all registered, s", "{:.2f}"),
    ("window_s", "first → last registration, s", "{:.2f}"),
    ("cpu_per_reg_ms", "scheduler CPU per registration, ms", "{:.2f}"),
    ("hb_us_per_worker_s", "idle scheduler CPU per worker per s, µs", "{:.0f}"),
    ("hb_interval_s", "heartbeat interval, s", "{:g}"),
    ("worker_side_us_per_worker_s", "idle worker-process CPU per worker per s, µs", "{:.0f}"),
    ("map_tasks_per_s", "no-op map, tasks/s", "{:,.0f}"),
    ("map_sched_us_per_task", "scheduler CPU per map task, µs", "{:.0f}"),
    ("sched_rss_mb", "scheduler RSS, MB", "{:.0f}"),
    ("state_register_us", "state machine alone: CPU per registration, µs", "{:.1f}"),
    ("state_heartbeat_us", "state machine alone: CPU per heartbeat (+ ticks), µs", "{:.2f}"),
    ("state_map_us_per_task", "state machine alone: CPU per map task, µs", "{:.0f}"),
)


def _median(rows, system, n, key):
    vals = sorted(r[key] for r in rows if r["system"] == system and r["workers"] == n
                  and r.get("status") == "ok" and r.get(key) is not None)
    if not vals:
        return None
    return vals[len(vals) // 2], vals[0], vals[-1]


def render(rows, args, commands: list[str]) -> str:
    sizes = sorted({r["workers"] for r in rows})
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    head = ["metric"] + [f"{LABELS[s]}, N={n:,}" for n in sizes for s in systems]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, fmt in COLUMNS:
        cells = [label]
        for n in sizes:
            for s in systems:
                m = _median(rows, s, n, key)
                if m is None:
                    cells.append("n/a")
                elif m[1] == m[2]:
                    cells.append(fmt.format(m[0]))
                else:
                    cells.append(f"{fmt.format(m[0])} ({fmt.format(m[1])}–{fmt.format(m[2])})")
        if any(c != "n/a" for c in cells[1:]):  # rows of figures this report's runs took
            lines.append("| " + " | ".join(cells) + " |")
    fails = [f"- {LABELS[r['system']]}, N={r['workers']}: {r['reason']}" for r in rows
             if r.get("status") != "ok"]
    return "\n".join([
        MARKER,
        "## Many workers: registration, heartbeats and a no-op map (`scale`)",
        "",
        *[f"    .venv/bin/python -m bench {c}" for c in commands],
        "",
        "One scheduler process; N `Worker(nthreads=1, dashboard=False)` objects started at once "
        f"in {args.procs} worker processes (fewer when N is smaller); ours with TLS (as "
        "shipped), dask with plain TCP (as shipped). Cells: median (min–max) of the runs. "
        "How each figure is measured: the docstring of bench/scale.py.",
        "",
        *lines,
        "",
        *(["Failures:", "", *fails, ""] if fails else []),
        END_MARKER,
    ])


def merge(existing: str, section: str) -> str:
    """``existing`` with this section replaced (or appended at the end)."""
    start = existing.find(MARKER)
    if start < 0:
        return existing.rstrip("\n") + "\n\n" + section + "\n"
    end = existing.find(END_MARKER, start)
    end = len(existing) if end < 0 else end + len(END_MARKER)
    return existing[:start] + section + existing[end:]


# ----------------------------------------------------------------------------- command line


def _csv_ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="ours,dask")
    p.add_argument("--workers", type=_csv_ints, default=[10, 100, 1000])
    p.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--tasks", type=int, default=20000, help="timed no-op map size (0: no map)")
    p.add_argument("--idle", type=float, default=10.0, help="idle window, s (default 10)")
    p.add_argument("--repeat", type=int, default=1, help="runs per (system, N), interleaved")
    p.add_argument("--profile", metavar="DIR", help="cProfile the scheduler into DIR (no map)")
    p.add_argument("--json", metavar="FILE", help="write the raw measurements here")
    p.add_argument("--output", metavar="MD", help="write/replace this section in MD")
    p.add_argument("--from-json", metavar="FILE", nargs="+",
                   help="measure nothing: report the rows of these earlier --json files "
                   "(runs split to stay short on a shared machine)")
    # The child roles (internal).
    p.add_argument("--role", choices=("scheduler", "workers", "client"), help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sched-pid", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad or not a.systems:
        p.error(f"--systems: choose from {','.join(SYSTEMS)}; got {','.join(bad) or 'none'}")
    if not a.workers or min(a.workers) < 1 or a.procs < 1 or a.repeat < 1:
        p.error("--workers, --procs and --repeat take positive integers")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.role:
        {"scheduler": role_scheduler, "workers": role_workers, "client": role_client}[a.role](a)
        return 0
    from bench.procs import become_subreaper

    become_subreaper()
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
        a.profile = os.path.abspath(a.profile)
    rows = []
    commands = []
    for path in a.from_json or ():
        with open(path) as f:
            earlier = json.load(f)
        rows += earlier["rows"]
        commands.append(earlier["argv"])
    for rep in range(0 if a.from_json else a.repeat):
        for n in a.workers:
            for system in (a.systems if rep % 2 == 0 else a.systems[::-1]):
                print(f"[{LABELS[system]}] N={n} ...", end=" ", flush=True)
                t = time.monotonic()
                r = run_one(system, n, a)
                rows.append(r)
                shown = {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}
                print(f"{r['status']} in {time.monotonic() - t:.0f}s: {shown or r.get('reason')}",
                      flush=True)
    argv_text = " ".join(["scale", *(shlex.quote(x) for x in argv)])
    md = render(rows, a, commands or [argv_text])
    print()
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"argv": argv_text, "loadavg": os.getloadavg(), "rows": rows}, f, indent=1)
    if a.output:
        try:
            with open(a.output) as f:
                existing = f.read()
        except OSError:
            existing = ""
        with open(a.output, "w") as f:
            f.write(merge(existing, md))
        print(f"bench: wrote the scale section of {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
