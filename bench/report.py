"""Machine information and the Markdown report."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

from bench.common import METRICS, SYSTEM_LABELS, summarize

PACKAGES = (
    "hpc-cluster",
    "distributed",
    "dask",
    "mpi4py",
    "mpich",
    "numpy",
    "cloudpickle",
    "tornado",
    "uvloop",
    "psutil",
    "msgpack",
    "dask-mpi",
)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev(cwd):
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "runtime", "cluster"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return rev + (" (runtime/cluster modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_info(repo_root):
    import psutil

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_GB": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "git": _git_rev(repo_root),
        "loadavg_start": loadavg(),
        "versions": versions,
    }


# --- formatting ------------------------------------------------------------------


def fmt_num(x):
    if x is None:
        return "n/a"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_cell(stats):
    if stats is None:
        return "n/a"
    lo, med, hi = stats
    return f"**{fmt_num(med)}** ({fmt_num(lo)} – {fmt_num(hi)})"


def fmt_ratio(a, b, higher_is_better):
    if a is None or b is None or not b[1]:
        return "n/a"
    r = a[1] / b[1]
    better = r > 1 if higher_is_better else r < 1
    mark = "better" if better else ("same" if abs(r - 1) < 0.005 else "worse")
    return f"{r:.2f}× ({mark})"


def metric_label(metric, sizes):
    n = sizes["tree_leaves"]
    return metric.label.format(
        noop_tasks=f"{sizes['noop_tasks']:,}",
        tree_leaves=f"{n:,}",
        tree_tasks=f"{2 * n - 1:,}",
        roundtrips=sizes["roundtrips"],
        transfer_mb=f"{sizes['transfer_bytes'] / 1e6:g}",
    )


def build_table(values, systems, sizes, workloads=None):
    """values: {system: {metric_key: [floats]}} -> list of Markdown table lines
    (the rows of ``workloads`` only, when given, plus start-up)."""
    header = ["metric", "unit", "better"] + [SYSTEM_LABELS[s] for s in systems]
    ratio_cols = [o for o in systems if o != "ours"] if "ours" in systems else []
    header += [f"ours / {SYSTEM_LABELS[o]}" for o in ratio_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in METRICS:
        if workloads is not None and m.workload not in (*workloads, "*"):
            continue
        stats = {s: summarize(values.get(s, {}).get(m.key, [])) for s in systems}
        row = [
            metric_label(m, sizes),
            m.unit,
            "higher" if m.higher_is_better else "lower",
        ]
        row += [fmt_cell(stats[s]) for s in systems]
        row += [fmt_ratio(stats["ours"], stats[o], m.higher_is_better) for o in ratio_cols]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def build_notes(outcomes, systems):
    """Lines explaining every n/a: skipped, failed or timed-out child processes."""
    lines = []
    for s in systems:
        for wl, oc in outcomes.get(s, {}).items():
            status = oc.get("status")
            if status == "ok":
                continue
            lines.append(f"- {SYSTEM_LABELS[s]} / {wl}: {status}: {oc.get('reason')}")
    return lines


def render_markdown(info, args_desc, table, notes, repeat):
    v = info["versions"]
    out = [
        "# Benchmark results: ours vs dask.distributed vs mpi4py.futures",
        "",
        f"Generated by `python -m bench {args_desc}`".rstrip() + f" on {info['date']}.",
        "",
        "Each cell is the **median** (min – max) over "
        f"{repeat} repeats; ratios are ours / other of the medians "
        "(the `better` column says which direction wins). "
        "Every system and workload ran in a fresh child process with a scheduler "
        "and 2 worker processes × 1 thread; see bench/README.md for methodology.",
        "",
        *table,
        "",
    ]
    if notes:
        out += ["## n/a, failures and timeouts", "", *notes, ""]
    out += [
        "## Machine",
        "",
        f"- nproc: {info['nproc']} (os.cpu_count {info['cpu_count']}), CPU: {info['cpu']}",
        f"- memory: {info['memory_GB']} GB",
        f"- platform: {info['platform']}",
        f"- python: {info['python']}",
        f"- repository: {info['git']}",
        f"- load average (1/5/15 min) at start: {info['loadavg_start']}, "
        f"at end: {info.get('loadavg_end', 'unknown')} "
        "(other load on the machine skews every figure)",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
    ]
    return "\n".join(out)


# --- the mpi-launch section ------------------------------------------------------

#: The line that starts the MPI launch section of the Markdown report. Writing a
#: report keeps the part of the existing file that this run did not measure.
LAUNCH_MARKER = "<!-- mpi-launch: this section is written by `python -m bench --workloads mpi-launch` -->"

#: Issue 4's targets for ours: (metric key, N or None for every N) -> (test, text).
LAUNCH_TARGETS = {
    ("ready_s", 16): ("ratio", 0.5, "≤ 0.5× dask-mpi"),
    ("ready_s", 64): ("ratio", 0.2, "≤ 0.2× dask-mpi"),
    ("shutdown_s", None): ("seconds", 2.0, "< 2 s"),
    ("job_cpu_per_rank_s", 64): ("at most", 0.3, "≤ 0.3 s"),
}


def _launch_target(key, n, stats_ours, stats_other):
    for (k, tn), (kind, limit, text) in LAUNCH_TARGETS.items():
        if k != key or (tn is not None and tn != n):
            continue
        if stats_ours is None or (kind == "ratio" and stats_other is None):
            return f"{text}: n/a"
        value = stats_ours[1] / stats_other[1] if kind == "ratio" else stats_ours[1]
        met = value <= limit if kind in ("ratio", "at most") else value < limit
        return f"{text}: **{'met' if met else 'missed'}**"
    return ""


def build_launch_table(results, systems, sizes):
    """results: {system: {"values": {(key, N): [s]}}} -> Markdown table lines."""
    from bench.launch import LAUNCH_METRICS

    header = ["metric", "N", "unit"] + list(systems)
    both = "ours" in systems and "dask-mpi" in systems
    if both:
        header += ["ours / dask-mpi", "target (ours)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in LAUNCH_METRICS:
        for n in sizes:
            stats = {s: summarize(results.get(s, {}).get("values", {}).get((m.key, n), []))
                     for s in systems}
            row = [m.label, str(n), "s"] + [fmt_cell(stats[s]) for s in systems]
            if both:
                row.append(fmt_ratio(stats["ours"], stats["dask-mpi"], False))
                row.append(_launch_target(m.key, n, stats["ours"], stats["dask-mpi"]))
            lines.append("| " + " | ".join(row) + " |")
    return lines


def render_launch_section(info, args_desc, results, systems, sizes, repeat):
    v = info["versions"]
    out = [
        LAUNCH_MARKER,
        "## MPI launch and shutdown: ours vs dask-mpi",
        "",
        f"Generated by `python -m bench {args_desc}`".rstrip() + f" on {info['date']}.",
        "",
        f"Each cell is the **median** (min – max) over {repeat} launches of `mpiexec -n N` "
        "(MPICH, oversubscribed: N ranks on "
        f"{info['nproc']} cores), ours and dask-mpi alternating; ratios are ours / dask-mpi "
        "of the medians, lower is better. Ours: `python -m cluster` (nanny-managed workers); "
        "dask-mpi: `python -m dask_mpi.cli` (service mode, nannies) and `dask_mpi.initialize()` "
        "(script mode, plain workers, rank 1 is the client). Every rank is one process, plus "
        "one worker process per nanny. See bench/README.md (`mpi-launch`).",
        "",
        *build_launch_table(results, systems, sizes),
        "",
    ]
    busy = [b for s in systems for b in results.get(s, {}).get("busy", [])]
    if busy:
        lo, med, hi = summarize(busy)
        out += [f"Other load: in the half second before each timed launch the machine's CPUs were "
                f"{med:.0f}% busy (median; {lo:.0f}–{hi:.0f}%). Wall times grow with that load; the "
                "CPU-time row hardly does.", ""]
    notes = []
    for s in systems:
        r = results.get(s, {})
        notes += [f"- {s}: {note}" for note in r.get("notes", [])]
        if r.get("runs") and not r.get("leftovers"):
            notes.append(f"- {s}: no process outlived `mpiexec` in any of its {r['runs']} launches")
    if notes:
        out += ["Processes left behind, failures and timeouts:", "", *notes, ""]
    out += [
        f"Machine: nproc {info['nproc']}, {info['cpu']}, {info['python']}, repository "
        f"{info['git']}; load average at start {info['loadavg_start']}, at end "
        f"{info.get('loadavg_end', 'unknown')}; "
        + ", ".join(f"{k} {v[k]}" for k in ("mpi4py", "mpich", "distributed", "dask-mpi")
                    if k in v),
        "",
    ]
    return "\n".join(out)


#: Hand-written sections (notes on the figures above them, the memory bench's
#: table): no run writes them, every run keeps them where they stand.
MAIN_NOTES_MARKER = "<!-- main-notes: hand-written; kept when the main table is rewritten -->"
TRANSFER_NOTES_MARKER = "<!-- transfer-notes: hand-written; kept when the transfer section is rewritten -->"
MEMORY_MARKER = "<!-- memory: this section is hand-written from `python -m bench memory` (bench/memory.py) -->"


def _kept_markers():
    from bench.scale import MARKER as SCALE_MARKER

    return (MAIN_NOTES_MARKER, TRANSFER_NOTES_MARKER, MEMORY_MARKER, SCALE_MARKER)


def _section_markers():
    from bench.dask_collections import COLLECTIONS_MARKER

    return (TRANSFER_MARKER, COLLECTIONS_MARKER, LAUNCH_MARKER, *_kept_markers())


def split_sections(text):
    """(main part, {marker: section}) of an existing report; sections start at their marker."""
    cuts = sorted((text.find(m), m) for m in _section_markers() if m in text)
    main = text[:cuts[0][0]] if cuts else text
    sections = {}
    for i, (pos, marker) in enumerate(cuts):
        end = cuts[i + 1][0] if i + 1 < len(cuts) else len(text)
        sections[marker] = text[pos:end]
    return main.rstrip() + "\n" if main.strip() else "", sections


def split_report(text):
    """(main part, launch section) of an existing report; either may be ''."""
    main, sections = split_sections(text)
    return main, sections.get(LAUNCH_MARKER, "")


def merge_report(existing, main_md, launch_md, collections_md=None, transfer_md=None):
    """The report to write: parts this run did not produce are kept from ``existing``.

    Order: the main table and its notes, the transfer section and its notes, the
    memory section, the dask collections section, the MPI launch section, the
    many-workers (``scale``) section.  Hand-written sections (:func:`_kept_markers`)
    are always kept.
    """
    from bench.dask_collections import COLLECTIONS_MARKER

    old_main, old = split_sections(existing or "")
    main_notes, transfer_notes, memory, scale = (old.get(m, "") for m in _kept_markers())
    main_part = main_md if main_md is not None else old_main
    transfer_part = transfer_md if transfer_md is not None else old.get(TRANSFER_MARKER, "")
    coll_part = collections_md if collections_md is not None else old.get(COLLECTIONS_MARKER, "")
    launch_part = launch_md if launch_md is not None else old.get(LAUNCH_MARKER, "")
    parts = [p.strip("\n") for p in (main_part, main_notes, transfer_part, transfer_notes, memory,
                                      coll_part, launch_part, scale)
             if p and p.strip()]
    return "\n\n".join(parts) + "\n"


# --- the transfer section ----------------------------------------------------------

#: The line that starts the worker-to-worker transfer section of the report.
TRANSFER_MARKER = "<!-- transfer: this section is written by `python -m bench transfer` -->"


def _median(values, key, system):
    stats = summarize(values.get(system, {}).get(key, []))
    return stats[1] if stats else None


def transfer_targets(values):
    """Issue 14's targets, from the medians: lines of Markdown."""
    out = []
    for kind in ("numpy", "bytes"):
        ours = _median(values, f"transfer_{kind}_MBps", "ours")
        dask = _median(values, f"transfer_{kind}_MBps", "dask")
        if ours and dask:
            r = ours / dask
            out.append(f"- {kind}: ours with TLS at {r:.2f}× dask's plain-TCP speed (target ≥ 1.0×: "
                       f"**{'met' if r >= 1.0 else 'missed'}**)")
        tls_floor = summarize([v for per in values.values() for v in per.get("floor_tls_MBps", [])])
        if ours and tls_floor:
            out.append(f"- {kind}: ours with TLS at {ours / tls_floor[1]:.2f}× the TLS floor "
                       f"(a bare TLS socket pair through Python's ssl: {fmt_num(tls_floor[1])} MB/s, "
                       "the median of every child's figure)" + (
                           f", which is itself {tls_floor[1] / dask:.2f}× dask's plain-TCP speed"
                           if dask else ""))
        plain = _median(values, f"transfer_{kind}_MBps", "ours-plain")
        floors = [v for per in values.values() for v in per.get("floor_warm_MBps", [])]
        floor = summarize(floors)
        if plain and floor:
            r = floor[1] / plain
            out.append(f"- {kind}: ours on plain TCP takes {r:.2f}× the raw-socket floor's time "
                       f"(floor {fmt_num(floor[1])} MB/s, the median of every child's reused-buffer "
                       f"figure; target ≤ 1.5×: **{'met' if r <= 1.5 else 'missed'}**)")
    return out


def render_transfer_section(info, args_desc, table, values, repeat, notes=()):
    out = [
        TRANSFER_MARKER,
        "## Worker-to-worker transfers (`transfer`)",
        "",
        f"Generated by `python -m bench {args_desc}`".rstrip() + f" on {info['date']}.",
        "",
        f"Each cell is the **median** (min – max) over {repeat} timed transfers per system; the "
        "systems' child processes took turns (see `--rounds`). Ratios are ours (TLS) / the "
        "column's system. CPU per MB is the sending and the receiving worker process's run time "
        "(all threads, from /proc/PID/task/*/schedstat) during the timed dependent task, divided "
        "by the MB moved; the floor rows come from bench/floor.py, run in each system's child "
        "just before its transfers (a raw socket pair on 127.0.0.1, `sendall` of the same "
        "number of bytes, `recv_into` a fresh `MADV_HUGEPAGE` map or a reused buffer; the TLS "
        "floor is the same stream between two blocking `ssl.SSLSocket`s with our TLS contexts). "
        "See bench/README.md.",
        "",
        *table,
        "",
        *transfer_targets(values),
        "",
    ]
    if notes:
        out += ["Failures:", "", *notes, ""]
    out += [
        f"Machine: nproc {info['nproc']}, {info['cpu']}, {info['python']}, repository "
        f"{info['git']}; load average at start {info['loadavg_start']}, at end "
        f"{info.get('loadavg_end', 'unknown')} (the machine is shared: other load skews the "
        "wall-clock figures, less the CPU ones); distributed "
        f"{info['versions'].get('distributed')}.",
        "",
    ]
    return "\n".join(out)
