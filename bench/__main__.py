"""Compare ours, dask.distributed and mpi4py.futures on the same workloads.

    python -m bench [--systems ours,dask,mpi] [--workloads ...] [--repeat N]
                    [--quick] [--output bench/RESULTS.md] [--json FILE]
                    [--mpi-sizes 4,8,16]
    python -m bench collections [--repeat N] [--output bench/RESULTS.md]
    python -m bench memory [--systems ours,dask] [--tasks N,...]   (bench/memory.py)
    python -m bench scale [--systems ours,dask] [--workers 10,100,1000]   (bench/scale.py)

Every (system, workload) pair runs in a fresh child process with bounded time;
a system that cannot be imported, does not start or raises is reported as
n/a with the reason, and the other systems still run. The ``mpi-launch``
workload (ours vs dask-mpi, see bench/launch.py) and the ``collections``
workload (dask collections, ours vs dask.distributed, see bench/dask_collections.py)
have their own sections in the report; ``--output`` keeps the sections of an
existing report that this run did not measure. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile

from bench.common import (
    DASK_TUNED,
    METRICS,
    SIZES,
    SYSTEM_LABELS,
    SYSTEMS,
    WORKLOADS,
    dask_env,
    summarize,
)
from bench.dask_collections import (
    COLLECTION_SYSTEMS,
    COLLECTIONS_WORKLOAD,
    collection_sizes,
    render_collections_section,
    run_collections_workload,
)
from bench.launch import LAUNCH_WORKLOAD, MPI_SIZES, launch_systems, run_launch_workload
from bench.procs import become_subreaper, run_child
from bench.report import (
    build_notes,
    build_table,
    fmt_num,
    loadavg,
    machine_info,
    merge_report,
    render_launch_section,
    render_markdown,
    render_transfer_section,
)

ALL_WORKLOADS = (*WORKLOADS, COLLECTIONS_WORKLOAD, LAUNCH_WORKLOAD)
#: Workloads with a section of their own (not rows of the main table).
SECTION_WORKLOADS = (COLLECTIONS_WORKLOAD, LAUNCH_WORKLOAD)

MAX_START_FAILURES = 2

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loopback only, for MPICH's launcher (hydra) and its network modules (UCX, OFI).
MPI_ENV = {
    "HYDRA_IFACE": "lo",
    "HYDRA_LAUNCHER": "fork",
    "UCX_NET_DEVICES": "lo",
    "FI_TCP_IFACE": "lo",
    "FI_SOCKETS_IFACE": "lo",
}


def _csv(choices):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return items

    return parse


def _sizes(text):
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 3:
        raise argparse.ArgumentTypeError(f"comma-separated integers >= 3; got {text!r}")
    return sizes


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark ours vs dask.distributed vs mpi4py.futures "
        "(scheduler + 2 worker processes x 1 thread each).",
    )
    p.add_argument("workload", nargs="*", metavar="WORKLOAD",
                   help="workloads to run, the same as --workloads (e.g. `python -m bench "
                   "collections`)")
    p.add_argument("--systems", type=_csv(SYSTEMS), default=list(SYSTEMS),
                   help="comma-separated subset of ours,dask,mpi (default: all)")
    p.add_argument("--workloads", type=_csv(ALL_WORKLOADS), default=list(ALL_WORKLOADS),
                   help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (default: all)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed repeats per child process (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="main-table workloads: run each system's child this many times, the "
                   "systems taking turns (order reversed every other round), so that other "
                   "load on the machine falls on every system alike; repeats per system = "
                   "rounds x repeat (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke run (1,000 tasks, 50 round trips, 10 MB)")
    p.add_argument("--output", metavar="MD", help="write the Markdown report here")
    p.add_argument("--json", metavar="FILE", help="write all raw measurements here")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per child process (default 600, --quick 120; collections: "
                   "default 1500, --quick 300)")
    p.add_argument("--start-timeout", type=float, default=90.0,
                   help="seconds for a child's cluster to become ready (default 90)")
    p.add_argument("--mpi-sizes", type=_sizes, default=None,
                   help="mpi-launch: the values of N for mpiexec -n N (default 4,8,16; "
                   "--quick 4,8)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the child processes' logs and print where they are")
    args = p.parse_args(argv)
    if args.workload:
        bad = [x for x in args.workload if x not in ALL_WORKLOADS]
        if bad:
            p.error(f"unknown workload(s) {', '.join(bad)}: choose from {','.join(ALL_WORKLOADS)}")
        args.workloads = list(dict.fromkeys(args.workload))
    if args.repeat < 1 or args.rounds < 1:
        p.error("--repeat and --rounds must be >= 1")
    # The 100,000-task graph of `collections` takes minutes on dask.distributed.
    args.collections_timeout = args.timeout or (300.0 if args.quick else 1500.0)
    if args.timeout is None:
        args.timeout = 120.0 if args.quick else 600.0
    if args.mpi_sizes is None:
        args.mpi_sizes = list(MPI_SIZES["quick" if args.quick else "default"])
    return args


def child_env(system):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x]
    )
    env["PYTHONUNBUFFERED"] = "1"
    # Both dask columns start from dask's defaults, whatever this shell's DASK_* say.
    for key in [k for k in env if k.startswith("DASK_")]:
        del env[key]
    if system == "dask-tuned":
        env.update(dask_env(DASK_TUNED))
    if system == "mpi":
        env.update(MPI_ENV)
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def find_mpiexec():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(local, os.X_OK):
        return local
    return shutil.which("mpiexec")


def child_command(system, workload, args, sizes, out):
    common = ["--workload", workload, "--repeat", str(args.repeat),
              "--sizes", json.dumps(sizes), "--out", out]
    if system == "mpi":
        mpiexec = find_mpiexec()
        if mpiexec is None:
            return None, "mpiexec not found (install the bench extra: mpich)"
        return [mpiexec, "-n", "3", sys.executable, "-m", "mpi4py.futures",
                "-m", "bench.run_mpi", *common], None
    return [sys.executable, "-m", "bench.run_client", "--system", system, *common], None


def headline(result):
    """A short summary of a child's medians for the progress line."""
    parts = []
    metrics = result.get("metrics", {}) if result else {}
    for m in METRICS:
        stats = summarize(metrics.get(m.key, []))
        if stats and m.unit != "s":
            parts.append(f"{m.key}={fmt_num(stats[1])}")
    return ", ".join(parts)


def run_one(system, workload, args, sizes, tmpdir):
    """Run one child; return (outcome dict, metrics dict, startup seconds or None)."""
    run_one.count += 1  # one file per child: rounds run the same pair again
    out = os.path.join(tmpdir, f"{system}-{workload}-{run_one.count}.json")
    log = os.path.join(tmpdir, f"{system}-{workload}-{run_one.count}.log")
    cmd, why = child_command(system, workload, args, sizes, out)
    if cmd is None:
        return {"status": "unavailable", "reason": why}, {}, None
    oc = run_child(cmd, env=child_env(system), cwd=REPO_ROOT, result_path=out,
                   log_path=log, timeout=args.timeout, start_timeout=args.start_timeout)
    res = oc.result or {}
    metrics = res.get("metrics", {})
    startup = None
    if res.get("ready_wall"):
        startup = res["ready_wall"] - oc.launch_wall
    outcome = {"wall_s": round(oc.wall_s, 2), "returncode": oc.returncode,
               "log": log if args.keep_logs else None,
               "cluster_start_s": res.get("cluster_start_s"), "info": res.get("info", {}),
               "startup_s": startup}
    if res.get("skipped"):
        outcome.update(status="n/a", reason=res["skipped"])
    elif res.get("ok") and not oc.timed_out:
        outcome.update(status="ok", reason=None)
    elif res.get("ok"):
        outcome.update(status="ok", reason=oc.reason)
    elif res.get("error"):
        outcome.update(status="failed", reason=res["error"])
    elif oc.timed_out:
        outcome.update(status="timeout", reason=oc.reason)
    else:
        last = oc.log_tail.strip().splitlines()[-1:] or ["no output"]
        outcome.update(status="failed",
                       reason=f"exit code {oc.returncode} before any result: {last[0][:300]}")
    if outcome["status"] != "ok" and metrics:
        outcome["reason"] += f" (kept {max(len(v) for v in metrics.values())} finished repeats)"
    # A child that never became ready: "import" means the system cannot be used at
    # all; "start" (cluster did not come up) may be flaky, so the caller retries it.
    failed = outcome["status"] in ("failed", "timeout")
    phase = res.get("phase") or "launch"
    outcome["not_ready"] = phase if failed and phase in ("launch", "import", "start") else None
    if outcome["status"] != "ok" and args.keep_logs is False:
        outcome["log_tail"] = oc.log_tail[-1500:]
    return outcome, metrics, startup


run_one.count = 0


def main(argv=None):
    if (sys.argv[1:] if argv is None else argv)[:1] == ["memory"]:  # bench/memory.py
        from bench.memory import main as memory_main
        return memory_main((sys.argv[1:] if argv is None else argv)[1:])
    if (sys.argv[1:] if argv is None else argv)[:1] == ["scale"]:  # bench/scale.py
        from bench.scale import main as scale_main
        return scale_main((sys.argv[1:] if argv is None else argv)[1:])
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = dict(SIZES["quick" if args.quick else "default"])
    become_subreaper()
    info = machine_info(REPO_ROOT)
    print(f"bench: {info['python']}, nproc {info['nproc']}, systems {','.join(args.systems)}, "
          f"workloads {','.join(args.workloads)}, repeat {args.repeat}"
          f"{', quick sizes' if args.quick else ''}", flush=True)

    values = {s: {} for s in args.systems}
    outcomes = {s: {} for s in args.systems}
    dead = {}
    start_failures = {s: 0 for s in args.systems}
    main_workloads = [wl for wl in args.workloads if wl not in SECTION_WORKLOADS]
    launch_results = coll_results = None
    coll_sys = [s for s in COLLECTION_SYSTEMS if s in args.systems]
    coll_sizes = collection_sizes(args.quick)
    launch_sys = launch_systems(args.systems)
    tmpdir = tempfile.mkdtemp(prefix="hpc-bench-")
    try:
        # Workload-major order: every system sees the machine in the same state.
        rotations = [(wl, r, system) for wl in main_workloads for r in range(args.rounds)
                     for system in (args.systems if r % 2 == 0 else args.systems[::-1])]
        for workload, rnd, system in rotations:
            tag = f"[{SYSTEM_LABELS[system]}] {workload}" + (
                f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else "")
            if system in dead:
                outcomes[system][workload] = {"status": "n/a", "reason": dead[system]}
                print(f"{tag}: n/a ({dead[system]})", flush=True)
                continue
            print(f"{tag} ...", end=" ", flush=True)
            outcome, metrics, startup = run_one(system, workload, args, sizes, tmpdir)
            if outcome["status"] == "ok" or workload not in outcomes[system]:
                outcomes[system][workload] = outcome
            for k, v in metrics.items():
                values[system].setdefault(k, []).extend(v)
            if startup is not None:
                values[system].setdefault("startup_s", []).append(startup)
            if outcome["status"] == "ok":
                print(f"ok in {outcome['wall_s']:.1f}s: {headline({'metrics': metrics})}",
                      flush=True)
            else:
                print(f"{outcome['status']}: {outcome['reason']}", flush=True)
                tail = outcome.get("log_tail", "").strip()
                if tail and outcome["status"] in ("failed", "timeout"):
                    print("    " + "\n    ".join(tail.splitlines()[-6:]), flush=True)
            not_ready = outcome.pop("not_ready", None)
            start_failures[system] = start_failures[system] + 1 if not_ready else 0
            # Give up on a system that cannot be imported, or whose cluster failed
            # to start for two workloads in a row.
            if not_ready in ("launch", "import") or start_failures[system] >= MAX_START_FAILURES:
                what = "start" if not_ready == "start" else "import or launch"
                dead[system] = f"skipped: {workload} could not {what} it ({outcome['reason']})"
        if COLLECTIONS_WORKLOAD in args.workloads:
            if coll_sys:
                coll_results = run_collections_workload(
                    coll_sys, sizes=coll_sizes, repeat=args.repeat, env=child_env("dask"),
                    cwd=REPO_ROOT, tmpdir=tmpdir, timeout=args.collections_timeout,
                    start_timeout=args.start_timeout, keep_logs=args.keep_logs)
            else:
                print(f"{COLLECTIONS_WORKLOAD}: n/a (it compares ours and dask.distributed: "
                      "--systems needs ours or dask)", flush=True)
        if LAUNCH_WORKLOAD in args.workloads:
            if launch_sys:
                launch_results = run_launch_workload(
                    launch_sys, sizes=args.mpi_sizes, repeat=args.repeat, env=child_env("mpi"),
                    cwd=REPO_ROOT, tmpdir=tmpdir, start_timeout=args.start_timeout,
                    keep_logs=args.keep_logs)
            else:
                print(f"{LAUNCH_WORKLOAD}: n/a (it compares ours and dask-mpi: "
                      "--systems needs ours or dask)", flush=True)
    finally:
        if not args.keep_logs:
            shutil.rmtree(tmpdir, ignore_errors=True)
        else:
            print(f"bench: child logs kept in {tmpdir}")

    info["loadavg_end"] = loadavg()
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    md = launch_md = coll_md = transfer_md = None
    table_workloads = [wl for wl in main_workloads if wl != "transfer"]
    if table_workloads:
        table = build_table(values, args.systems, sizes, table_workloads)
        notes = build_notes({s: {k: v for k, v in per.items() if k != "transfer"}
                             for s, per in outcomes.items()}, args.systems)
        md = render_markdown(info, argv_text, table, notes, args.repeat * args.rounds)
        print()
        print(md)
    if "transfer" in main_workloads:
        tsys = [s for s in args.systems if s != "mpi"]
        transfer_md = render_transfer_section(
            info, argv_text, build_table(values, tsys, sizes, ["transfer"]), values,
            args.repeat * args.rounds,
            build_notes({s: {k: v for k, v in per.items() if k == "transfer"}
                         for s, per in outcomes.items() if s in tsys}, tsys))
        print()
        print(transfer_md)
    if coll_results is not None:
        coll_md = render_collections_section(info, argv_text, coll_results, coll_sys, coll_sizes,
                                             args.repeat)
        print()
        print(coll_md)
    if launch_results is not None:
        launch_md = render_launch_section(info, argv_text, launch_results, launch_sys,
                                          args.mpi_sizes, args.repeat)
        print()
        print(launch_md)
    if args.output and any(x is not None for x in (md, launch_md, coll_md, transfer_md)):
        try:
            with open(args.output) as f:
                existing = f.read()
        except OSError:
            existing = ""
        with open(args.output, "w") as f:
            f.write(merge_report(existing, md, launch_md, coll_md, transfer_md))
        kept = [what for what, new in (("main", md), ("transfer", transfer_md),
                                       ("collections", coll_md),
                                       ("mpi-launch", launch_md)) if new is None]
        print(f"bench: wrote {args.output}"
              + (f" (kept its {' and '.join(kept)} section from before)" if kept else ""))
    if args.json:
        for per in outcomes.values():
            for oc in per.values():
                oc.pop("log_tail", None)
        with open(args.json, "w") as f:
            launch_json = None
            if launch_results is not None:
                launch_json = {
                    s: {**r, "values": {f"{k}@N={n}": v for (k, n), v in r["values"].items()}}
                    for s, r in launch_results.items()}
            json.dump({"machine": info, "sizes": sizes, "repeat": args.repeat,
                       "rounds": args.rounds, "dask_tuned": DASK_TUNED,
                       "values": values, "outcomes": outcomes,
                       "mpi_launch": launch_json, "mpi_sizes": args.mpi_sizes,
                       "collections": coll_results, "collection_sizes": coll_sizes}, f, indent=1)
        print(f"bench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
