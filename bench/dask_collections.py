"""The ``collections`` workload: dask collections on ours vs dask.distributed (issue 11).

The parent side. Each case of bench/collections_cases.py runs, for each
system, in a fresh ``python -m bench.run_collections`` child (bounded time,
whole process tree killed afterwards, see bench/procs.py): an untimed warm-up
at the --quick size, then ``--repeat`` timed ``.compute()`` calls. The systems
alternate case by case (ours first on even cases, dask first on odd ones),
so both see the machine in about the same state. The report gives the median
seconds per case, dask / ours, and the geometric mean of dask / ours, and for
the 100,000-task graph the scheduler's and the client's CPU time per task.
"""

from __future__ import annotations

import json
import math
import os
import sys

from bench.collections_cases import BIG, CASES, COLLECTION_SIZES, label_sizes
from bench.common import summarize
from bench.procs import run_child
from bench.report import fmt_cell, fmt_num

COLLECTIONS_WORKLOAD = "collections"
COLLECTION_SYSTEMS = ("ours", "dask")
LABELS = {"ours": "ours", "dask": "dask.distributed"}
MAX_FAILURES = 2

#: The line that starts the collections section of the Markdown report.
COLLECTIONS_MARKER = ("<!-- collections: this section is written by "
                      "`python -m bench --workloads collections` -->")

#: Issue 11's targets: ours at least as fast on every case, >= 1.5x on the geomean.
TARGET_EACH = 1.0
TARGET_GEOMEAN = 1.5


def collection_sizes(quick):
    return dict(COLLECTION_SIZES["quick" if quick else "default"])


def _one(system, case, *, sizes, repeat, env, cwd, tmpdir, timeout, start_timeout, keep_logs):
    out = os.path.join(tmpdir, f"coll-{system}-{case}.json")
    log = os.path.join(tmpdir, f"coll-{system}-{case}.log")
    cmd = [sys.executable, "-m", "bench.run_collections", "--system", system, "--case", case,
           "--repeat", str(repeat), "--sizes", json.dumps(sizes), "--out", out]
    oc = run_child(cmd, env=env, cwd=cwd, result_path=out, log_path=log, timeout=timeout,
                   start_timeout=start_timeout)
    res = oc.result or {}
    metrics = res.get("metrics", {})
    if res.get("ok") and not oc.timed_out:
        return "ok", metrics, res.get("info", {}), None
    reason = res.get("error") or oc.reason
    if not reason:
        last = oc.log_tail.strip().splitlines()[-1:] or ["no output"]
        reason = f"exit code {oc.returncode} before any result: {last[0][:300]}"
    if not keep_logs:
        tail = oc.log_tail.strip().splitlines()[-6:]
        if tail:
            print("    " + "\n    ".join(tail), flush=True)
    if metrics:
        reason += f" (kept {len(metrics.get('seconds', []))} finished repeats)"
    phase = res.get("phase") or "launch"
    status = "n/a" if phase == "import" else ("timeout" if oc.timed_out else "failed")
    return status, metrics, res.get("info", {}), reason


def run_collections_workload(systems, *, sizes, repeat, env, cwd, tmpdir, timeout,
                             start_timeout, keep_logs):
    """Run every case on every system; return {system: {"values": {case: {metric: [..]}},
    "info": {case: {...}}, "notes": [...]}}."""
    results = {s: {"values": {}, "info": {}, "notes": []} for s in systems}
    dead = {}
    failures = dict.fromkeys(systems, 0)
    for i, case in enumerate(CASES):
        order = list(systems) if i % 2 == 0 else list(reversed(systems))
        for system in order:
            tag = f"[{LABELS[system]}] {COLLECTIONS_WORKLOAD} {case.key}"
            if system in dead:
                print(f"{tag}: n/a ({dead[system]})", flush=True)
                continue
            print(f"{tag} ...", end=" ", flush=True)
            status, metrics, info, reason = _one(
                system, case.key, sizes=sizes, repeat=repeat, env=env, cwd=cwd, tmpdir=tmpdir,
                timeout=timeout, start_timeout=start_timeout, keep_logs=keep_logs)
            r = results[system]
            if metrics:
                r["values"][case.key] = metrics
            if info:
                r["info"][case.key] = info
            secs = summarize(metrics.get("seconds", []))
            if status == "ok":
                failures[system] = 0
                print(f"ok: median {fmt_num(secs[1]) if secs else 'n/a'} s", flush=True)
                continue
            print(f"{status}: {reason}", flush=True)
            r["notes"].append(f"{case.key}: {status}: {reason}")
            failures[system] += 1
            if status == "n/a" or failures[system] >= MAX_FAILURES:
                dead[system] = f"skipped after {case.key}: {reason}"
                r["notes"].append(dead[system])
    return results


def _median(results, system, case, metric="seconds"):
    stats = summarize(results.get(system, {}).get("values", {}).get(case, {}).get(metric, []))
    return stats


def build_collections_table(results, systems, sizes):
    both = all(s in systems for s in COLLECTION_SYSTEMS)
    info = {}
    for s in systems:
        info.update(results.get(s, {}).get("info", {}).get(BIG, {}))
    lsizes = label_sizes({**sizes, "big_tasks": f"{info['tasks']:,}" if "tasks" in info else "?"})
    header = ["workload"] + [f"{LABELS[s]} (s)" for s in systems]
    if both:
        header += ["dask / ours", "ours ≥ dask?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratios = []
    for case in CASES:
        stats = {s: _median(results, s, case.key) for s in systems}
        row = [f"`{case.key}`: " + case.label.format(**lsizes)]
        row += [fmt_cell(stats[s]) for s in systems]
        if both:
            if stats["ours"] and stats["dask"]:
                r = stats["dask"][1] / stats["ours"][1]
                ratios.append(r)
                row += [f"{r:.2f}×", "yes" if r >= TARGET_EACH else "**no**"]
            else:
                row += ["n/a", "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    geo = None
    if both and ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        n_ok = sum(r >= TARGET_EACH for r in ratios)
        lines.append("| **geometric mean** of dask / ours"
                     + (f" ({len(ratios)} of {len(CASES)} workloads)" if len(ratios) < len(CASES)
                        else f" ({len(ratios)} workloads)")
                     + " | | | " + f"**{geo:.2f}×** | "
                     + f"{n_ok} of {len(ratios)} ≥ 1 |")
    return lines, geo, ratios


def build_cpu_table(results, systems):
    """Scheduler and client CPU per task of the 100,000-task graph."""
    header = ["100k-task graph", "unit"] + [LABELS[s] for s in systems]
    both = all(s in systems for s in COLLECTION_SYSTEMS)
    if both:
        header.append("dask / ours")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = (("scheduler_cpu_s", "scheduler process CPU (user + system) per task"),
            ("client_cpu_s", "client process CPU (user + system) per task"),
            ("total_cpu_s", "scheduler + client CPU per task"),
            ("seconds", "wall time per task (`.compute()`)"))
    for key, label in rows:
        per = {}
        for s in systems:
            tasks = results.get(s, {}).get("info", {}).get(BIG, {}).get("tasks")
            if key == "total_cpu_s":
                vals = results.get(s, {}).get("values", {}).get(BIG, {})
                stats = summarize([a + b for a, b in zip(vals.get("scheduler_cpu_s", []),
                                                         vals.get("client_cpu_s", []), strict=False)])
            else:
                stats = _median(results, s, BIG, key)
            per[s] = tuple(x / tasks * 1e6 for x in stats) if stats and tasks else None
        row = [label, "µs"] + [fmt_cell(per[s]) for s in systems]
        if both:
            row.append(f"{per['dask'][1] / per['ours'][1]:.2f}×"
                       if per["ours"] and per["dask"] and per["ours"][1] else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_collections_section(info, args_desc, results, systems, sizes, repeat):
    table, geo, ratios = build_collections_table(results, systems, sizes)
    big_repeat = min(repeat, sizes["big_repeat"])
    out = [
        COLLECTIONS_MARKER,
        "## dask collections: ours vs dask.distributed",
        "",
        f"Generated by `python -m bench {args_desc}`".rstrip() + f" on {info['date']}.",
        "",
        "Issue 11's benchmark. Each workload is a dask collection built on the client and "
        "computed with `.compute()` while the system's `Client` is open (it is dask's default "
        "scheduler on both), timed end to end: graph optimization and submission, the tasks "
        "on the workers, and the result back in the client. Ours: `from cluster import Client, "
        "LocalCluster` (TLS on, as shipped); dask: `from distributed import Client, "
        "LocalCluster`; both with 2 worker processes × 1 thread on 127.0.0.1. Both use "
        "`dataframe.shuffle.method='tasks'` (dask as shipped would pick its p2p shuffle; ours "
        "has only the task shuffle) and the rechunk uses `method='tasks'` on both (dask would "
        "pick p2p for it). Each system and workload runs in a fresh child process, the systems "
        f"alternating workload by workload; each cell is the **median** (min – max) of {repeat} "
        f"timed runs after an untimed warm-up at the `--quick` size ({big_repeat} run for the "
        "100k-task graph). `dask / ours` above 1 means ours is faster. Target (issue 11): ours "
        "at least as fast on every workload, ≥ 1.5× on the geometric mean.",
        "",
        *table,
        "",
    ]
    if geo is not None:
        met = geo >= TARGET_GEOMEAN and all(r >= TARGET_EACH for r in ratios)
        slower = sum(r < TARGET_EACH for r in ratios)
        out += [f"Target: **{'met' if met else 'missed'}** (geometric mean {geo:.2f}× against "
                f"≥ {TARGET_GEOMEAN}×; ours slower on {slower} of {len(ratios)} workloads).", ""]
    out += [
        "Scheduler CPU for the 100k-task graph: here, and only here, the `LocalCluster` runs in a "
        "process of its own (`bench/cluster_host.py`; same arguments) and the client connects "
        "to it, because both systems' `LocalCluster` otherwise run the scheduler on the client "
        "process's event-loop thread. The figures are `psutil` CPU times (user + system) of "
        "that process around `.compute()` (the scheduler, plus the two nannies, which both "
        "systems keep in that process) and of the client's process, divided by the number of "
        "tasks of the optimized graph. Ours turns the graph into task messages in the client "
        "(dask ships the expression and materializes it in the scheduler), so read the two rows "
        "together.",
        "",
        *build_cpu_table(results, systems),
        "",
    ]
    notes = [f"- {LABELS[s]}: {n}" for s in systems for n in results.get(s, {}).get("notes", [])]
    if notes:
        out += ["Failures and timeouts:", "", *notes, ""]
    v = info["versions"]
    out += [
        f"Machine: nproc {info['nproc']}, {info['cpu']}, {info['python']}, repository "
        f"{info['git']}; load average at start {info['loadavg_start']}, at end "
        f"{info.get('loadavg_end', 'unknown')} (the machine is shared: other load skews every "
        f"figure); distributed {v.get('distributed')}, dask {v.get('dask')}.",
        "",
    ]
    return "\n".join(out)
