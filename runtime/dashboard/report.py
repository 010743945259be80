"""``performance_report``: one self-contained HTML file about what a block of code ran.

::

    with performance_report(filename="dask-report.html"):
        x.sum().compute()

On entry the client asks the scheduler for a snapshot (its count of finished
tasks, each worker's transfer counters and sampled profile); on exit for a
second one, taken once every worker sent a heartbeat after the block ended (at
most :data:`FRESH_WAIT` seconds), and for the task records in between.  The
page holds:

* a summary: duration, tasks, compute time, bytes moved, the cluster
  (scheduler address, workers, threads, memory, versions);
* the task stream of the block (:func:`cluster.runtime.dashboard.task_stream.render_svg`:
  a row per lane of each worker, coloured by task prefix);
* tasks per prefix (count, erred, total/mean/max compute time) and per worker
  (tasks, busy share of its threads, bytes in and out);
* the workers' profile samples taken during the block (workers started with
  ``profile=True``);
* the source of the ``with`` block, as dask shows it.

Everything is inline (the status page's style sheet, SVG, a few lines of
script that mark what rendered): no CDN, no fonts, nothing fetched, enforced
by the page's Content-Security-Policy.  The file is written 0600 through a
fresh temporary file (``O_EXCL|O_NOFOLLOW``) renamed over the target
(:func:`cluster.runtime.files.write_private_file`); replacing a report of ours is
expected, replacing anything that belongs to someone else is refused.
"""

from __future__ import annotations

import ast
import asyncio
import datetime
import html
import inspect
import linecache
import logging
import os
import platform
import sys
import textwrap
import time
from typing import Any

from ..futures import current_client
from ..utils import format_bytes
from .pages import standalone_page, write_html
from .task_stream import colors_of, fetch, key_text, legend_html, render_svg

logger = logging.getLogger(__name__)

#: Seconds the final snapshot waits for a heartbeat of every worker (their
#: transfer counters travel with it; the default heartbeat is every second).
FRESH_WAIT = 2.5
#: Functions per prefix asked of each worker's profile.
PROFILE_TOP = 200
#: Accepted values of ``mode`` (dask's bokeh resource mode; ours is always inline).
MODES = (None, "inline")

# ----------------------------------------------------------------------------- code of the block


def block_source(frame: Any) -> str:
    """The source of the ``with``/``async with`` statement running at ``frame``'s line.

    Falls back to the whole function (or module) when the statement cannot be
    found, and to ``""`` when no source is available (an interactive prompt).
    """
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    lines = linecache.getlines(filename, frame.f_globals)
    if lines:
        try:
            tree = ast.parse("".join(lines))
        except SyntaxError:
            tree = None
        best = None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, (ast.With, ast.AsyncWith)) and node.body and \
                    node.lineno <= lineno < node.body[0].lineno:
                if best is None or node.lineno > best.lineno:
                    best = node
        if best is not None:
            return textwrap.dedent("".join(lines[best.lineno - 1:best.end_lineno]))
    try:
        return textwrap.dedent(inspect.getsource(frame))
    except (OSError, TypeError):
        return ""


# ----------------------------------------------------------------------------- scheduler side


async def snapshot(diagnostics: Any, fresh: bool = False) -> dict:
    """What the scheduler knows now, for a report (run on the scheduler).

    Args:
        diagnostics: the scheduler's :class:`SchedulerDiagnostics`.
        fresh: first wait (up to :data:`FRESH_WAIT` s) until every running
            worker's heartbeat arrived after this call, so that its transfer
            counters include what just happened.
    """
    from .profile import merge_profiles

    s = diagnostics.scheduler
    state = s.state
    if fresh:
        asked = state.clock()
        deadline = time.monotonic() + FRESH_WAIT
        while time.monotonic() < deadline and any(
                ws.last_seen < asked for ws in state.workers.values() if ws.status == "running"):
            await asyncio.sleep(0.05)
    replies = await s.broadcast(msg={"op": "profile", "top": PROFILE_TOP}, return_exceptions=True)
    workers = []
    for ws in state.workers.values():
        m = ws.metrics or {}
        workers.append({"address": ws.address, "name": str(ws.name), "host": ws.host,
                        "nthreads": ws.nthreads, "memory_limit": ws.memory_limit,
                        "status": ws.status,
                        "transfer_incoming_bytes": m.get("transfer_incoming_bytes", 0),
                        "transfer_outgoing_bytes": m.get("transfer_outgoing_bytes", 0)})
    return {"time": time.time(), "count": diagnostics.task_stream_count,
            "address": s.address, "id": s.id, "started": s.time_started, "workers": workers,
            "profile": merge_profiles([r for r in replies.values() if isinstance(r, dict)],
                                      top=PROFILE_TOP)}


# ----------------------------------------------------------------------------- the report


class performance_report:
    """Write an HTML report of what the cluster did while the block ran.

    ``with performance_report(filename="report.html"): ...`` (synchronous
    client) or ``async with`` (asynchronous client), as dask.distributed's.

    Args:
        filename: the local file written on exit (replaced if it is ours).
        stacklevel: which caller's code the report shows (1: the ``with`` block).
        mode: ``None`` or ``"inline"``: everything is inline; dask's ``"cdn"``
            is refused (the page never loads anything).
        storage_options: for fsspec URLs in dask; only ``None`` or ``{}``:
            we write local files.

    Raises:
        ValueError: ``mode``, ``storage_options``, ``stacklevel`` or a URL as
            ``filename`` (named, with the accepted values).
    """

    def __init__(self, filename: str | os.PathLike = "dask-report.html", stacklevel: int = 1,
                 mode: str | None = None, storage_options: dict | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: accepted values are None and 'inline' (the report "
                             "is always self-contained: nothing is loaded from a CDN)")
        if storage_options:
            raise ValueError(f"storage_options={storage_options!r}: the report is written to a "
                             "local file; only None or {} are accepted")
        if isinstance(stacklevel, bool) or not isinstance(stacklevel, int) or stacklevel < 1:
            raise ValueError(f"stacklevel={stacklevel!r}: expected an int >= 1")
        if not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"filename={filename!r}: expected a local file path")
        if "://" in os.fsdecode(os.fspath(filename)):
            raise ValueError(f"filename={filename!r}: only local files are written (no fsspec "
                             "URLs); give a path")
        self.filename = filename
        self.stacklevel = stacklevel
        self.mode = mode
        self.code = ""
        self.path: str | None = None
        self._client: Any = None
        self._before: dict = {}
        self._t0 = self._t1 = 0.0

    def _capture(self) -> None:
        self._client = current_client()
        self.code = block_source(sys._getframe(self.stacklevel + 1))

    async def _begin(self) -> None:
        c = self._client
        self._t0 = time.time()
        self._before = await c.rpc.call(c._link, "performance_snapshot")

    async def _collect(self) -> dict:
        c = self._client
        self._t1 = time.time()  # before the wait for fresh heartbeats
        after = await c.rpc.call(c._link, "performance_snapshot", fresh=True)
        records = (await fetch(c, since=self._before["count"]))["records"]
        return {"before": self._before, "after": after, "records": records}

    def _write(self, data: dict) -> None:
        page = render_report(data["before"], data["after"], data["records"], self.code,
                             self._t0, self._t1)
        self.path = write_html(self.filename, page, "filename")

    def __enter__(self) -> performance_report:
        self._capture()
        if self._client.asynchronous:
            raise RuntimeError("use 'async with performance_report()' with an asynchronous Client")
        self._client.sync(self._begin)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self._write(self._client.sync(self._collect))
        except Exception:
            if exc_type is None:
                raise
            # A report that cannot be written must not hide the block's own exception.
            logger.warning("performance_report: no report written to %s", self.filename,
                           exc_info=True)

    async def __aenter__(self) -> performance_report:
        self._capture()
        await self._begin()
        return self

    async def __aexit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self._write(await self._collect())
        except Exception:
            if exc_type is None:
                raise
            logger.warning("performance_report: no report written to %s", self.filename,
                           exc_info=True)


# ----------------------------------------------------------------------------- rendering


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def _profile_delta(before: dict, after: dict) -> dict:
    """Samples taken between two merged profiles (``{prefix: {"count", "functions"}}``)."""
    out = {}
    for prefix, entry in after.items():
        old = before.get(prefix, {"count": 0, "functions": []})
        count = entry["count"] - old["count"]
        if count <= 0:
            continue
        prior = dict(old["functions"])
        fns = sorted(((f, n - prior.get(f, 0)) for f, n in entry["functions"]),
                     key=lambda x: -x[1])
        out[prefix] = {"count": count, "functions": [[f, n] for f, n in fns if n > 0]}
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hpc-cluster")
    except PackageNotFoundError:  # pragma: no cover - a source tree without metadata
        return "unknown"


def _table(head: list[str], rows: list[list[Any]], num_from: int = 1, attrs: str = "") -> str:
    th = "".join(f'<th{" class=num" if i >= num_from else ""}>{_esc(h)}</th>'
                 for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(
        f'<td{" class=num" if i >= num_from else ""}>{cell}</td>' for i, cell in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table{attrs}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_report(before: dict, after: dict, records: list[dict], code: str,
                  t0: float | None = None, t1: float | None = None) -> str:
    """The report page for two snapshots and the task records between them.

    ``t0``/``t1``: when the block started and ended (default: the snapshots' times).
    """
    t0 = before["time"] if t0 is None else t0
    t1 = after["time"] if t1 is None else t1
    duration = max(0.0, t1 - t0)
    names = {w["address"]: w["name"] for w in after["workers"] + before["workers"]}
    # Prefixes.
    prefixes: dict[str, list] = {}
    for r in records:
        d = sum(s["stop"] - s["start"] for s in r["startstops"] if s["action"] == "compute")
        p = prefixes.setdefault(r["prefix"], [0, 0, 0.0, 0.0])
        p[0] += 1
        p[1] += r["status"] != "OK"
        p[2] += d
        p[3] = max(p[3], d)
    compute = sum(p[2] for p in prefixes.values())
    colors = colors_of(r["prefix"] for r in sorted(records, key=lambda r: r["startstops"][0]["start"]))
    prefix_rows = [[f'<i style="display:inline-block;width:10px;height:10px;margin-right:4px;'
                    f'background:{colors.get(name, "#999")}"></i>{_esc(name)}',
                    n, e, _ms(total), _ms(total / n), _ms(mx),
                    f"{100 * total / compute:.0f} %" if compute else "0 %"]
                   for name, (n, e, total, mx) in sorted(prefixes.items(), key=lambda x: -x[1][2])]
    # Workers: tasks, busy share, bytes moved during the block.
    old = {w["address"]: w for w in before["workers"]}
    per_worker: dict[str, list] = {}
    for r in records:
        w = per_worker.setdefault(r["worker"], [0, 0.0])
        w[0] += 1
        w[1] += sum(s["stop"] - s["start"] for s in r["startstops"])
    incoming = outgoing = 0
    worker_rows = []
    for w in sorted(after["workers"], key=lambda w: w["name"]):
        o = old.get(w["address"], {})
        din = max(0, w["transfer_incoming_bytes"] - o.get("transfer_incoming_bytes", 0))
        dout = max(0, w["transfer_outgoing_bytes"] - o.get("transfer_outgoing_bytes", 0))
        incoming += din
        outgoing += dout
        n, busy = per_worker.get(w["address"], [0, 0.0])
        share = busy / (duration * w["nthreads"]) if duration and w["nthreads"] else 0.0
        worker_rows.append([_esc(w["name"]), _esc(w["address"]), w["nthreads"],
                            format_bytes(w["memory_limit"]) if w["memory_limit"] else "none",
                            n, _ms(busy), f"{100 * share:.0f} %", format_bytes(din),
                            format_bytes(dout)])
    present = {w["address"] for w in after["workers"]}
    for address, (n, busy) in sorted(per_worker.items()):
        if address not in present:  # ran tasks of the block, then left
            worker_rows.append([_esc(names.get(address, "")), _esc(address), "left", "", n,
                                _ms(busy), "", "", ""])
    erred = sum(p[1] for p in prefixes.values())
    threads = sum(w["nthreads"] for w in after["workers"])
    memory = sum(w["memory_limit"] or 0 for w in after["workers"])
    started = datetime.datetime.fromtimestamp(t0).astimezone()
    summary = [
        ("Duration", _ms(duration)), ("Started", started.isoformat(timespec="seconds")),
        ("Tasks", f"{len(records)}" + (f" ({erred} erred)" if erred else "")),
        ("Compute time", _ms(compute)),
        ("Bytes fetched between workers", format_bytes(incoming)),
        ("Bytes sent by workers (to workers and clients)", format_bytes(outgoing)),
        ("Scheduler", after["address"]), ("Workers", len(after["workers"])),
        ("Threads", threads), ("Memory", format_bytes(memory) if memory else "no limit"),
        ("hpc-cluster", _version()),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("Platform", platform.platform()),
    ]
    kv = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in summary)
    profile = _profile_delta(before.get("profile", {}), after.get("profile", {}))
    if profile:
        blocks = []
        for prefix in sorted(profile, key=lambda p: -profile[p]["count"])[:12]:
            entry = profile[prefix]
            rows = [[f'{100 * n / entry["count"]:.0f} %', n, _esc(fn)]
                    for fn, n in entry["functions"][:12]]
            blocks.append(f'<h3>{_esc(prefix)} <small>{entry["count"]} samples</small></h3>'
                          + _table(["share", "samples", "function"], rows, num_from=0))
        profile_html = "".join(blocks)
    else:
        profile_html = ('<p class="muted">no samples: start workers with <code>profile=True'
                        "</code> (<code>LocalCluster(profile=True)</code>) to see where tasks "
                        "spend their time</p>")
    spans = [s for r in records for s in r["startstops"]]
    stream = render_svg(records, t0=min([t0] + [s["start"] for s in spans]),
                        t1=max([t1] + [s["stop"] for s in spans]), names=names)
    body = f"""
<header><h1>hpc-cluster performance report</h1>
<span id="address">{_esc(after["address"])}</span>
<span class="summary">{len(records)} tasks in {_esc(_ms(duration))}</span></header>
<main>
<section class="wide" id="summary"><h2>Summary</h2><table class="kv">{kv}</table></section>
<section class="wide" id="task-stream"><h2>Task stream <small>(one row per lane of each worker;
hover a task for its key and time)</small></h2>{stream}{legend_html(records)}</section>
<section id="prefixes"><h2>Tasks by prefix</h2>
{_table(["prefix", "tasks", "erred", "compute", "mean", "max", "share"], prefix_rows)}</section>
<section class="wide" id="workers"><h2>Workers <small>({len(after["workers"])})</small></h2>
{_table(["name", "address", "threads", "memory limit", "tasks", "compute", "busy",
         "fetched", "sent"], worker_rows, num_from=2)}
<p class="note">Bytes as of each worker's last heartbeat after the block.</p></section>
<section class="wide" id="profile"><h2>Worker profile <small>(samples taken during the block)
</small></h2>{profile_html}</section>
<section class="wide" id="code"><h2>Code</h2><pre class="code">{_esc(code) if code else
    '<span class="muted">source not available</span>'}</pre></section>
</main>"""
    data = {"tasks": len(records), "erred": erred, "duration": duration, "compute": compute,
            "transfer_incoming_bytes": incoming, "transfer_outgoing_bytes": outgoing,
            "scheduler": after["address"], "workers": [w["address"] for w in after["workers"]],
            "prefixes": {p: {"count": v[0], "erred": v[1], "compute": v[2]}
                         for p, v in prefixes.items()},
            "records": [{**r, "key": key_text(r["key"])} for r in records]}
    return standalone_page("hpc-cluster performance report", body, data)


__all__ = ["block_source", "performance_report", "render_report", "snapshot",
           "standalone_page", "write_html"]
