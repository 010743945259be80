"""The task stream from the client: what ran where and when, in dask.distributed's shape.

The scheduler already keeps the last finished tasks for its status page
(:attr:`SchedulerDiagnostics.task_stream`: ``(key, worker, start, stop, ok)``
per computation, one deque append per task).  This module

* turns those entries into dask's task records (:func:`collect`, run on the
  scheduler for its ``get_task_stream`` handler)::

      {"key": "inc-1a2b", "worker": "tls://127.0.0.1:40123", "status": "OK",
       "startstops": [{"action": "compute", "start": 1.7e9, "stop": 1.7e9}],
       "nbytes": 28, "type": "int", "prefix": "inc"}

  ``nbytes`` and ``type`` are ``None`` once the scheduler forgot the key (or
  when the task erred).  dask's ``"thread"`` is not there: our workers do not
  report which thread ran a task, and lanes are drawn per worker instead.  Nor
  are ``"transfer"`` actions: workers report compute times only (the bytes
  they fetch are counted, see :mod:`cluster.runtime.dashboard.report`).
* serves ``client.get_task_stream(start, stop, count, plot, filename)`` and the
  :class:`get_task_stream` context manager (``with`` and ``async with``);
* draws the records as an inline SVG (:func:`render_svg`: one row per lane of
  a worker, a lane per overlapping task, coloured by task prefix as on the
  status page), which ``plot=True`` returns as a :class:`TaskStreamFigure`
  (shown by Jupyter) and ``plot="save"`` writes as a self-contained HTML file.
  There is no bokeh: ``bokeh_resources`` is refused.
"""

from __future__ import annotations

import datetime
import html
import math
import time
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from ..futures import current_client
from ..utils import key_split, parse_timedelta
from .pages import standalone_page, write_html

#: The status page's colours (static/app.js), so both show a prefix alike.
PALETTE = ("#4c8df6", "#f5b14c", "#3dbb84", "#a86ef2", "#ef6f6c", "#2bb7c9", "#d9a02b",
           "#7b8ff7", "#e0629e", "#6fae3e")
#: Accepted values of ``plot``.
PLOT_VALUES = (False, True, "save")


def key_text(key: Hashable) -> str:
    """A task key as text (tuple keys of dask collections included)."""
    return key if isinstance(key, str) else str(key)


# ----------------------------------------------------------------------------- scheduler side


def collect(stream: Iterable[tuple], total: int, kept: int, tasks: Mapping, *,
            start: float | None = None, stop: float | None = None, count: int | None = None,
            since: int | None = None) -> dict:
    """The task records of the scheduler's task stream (run on the scheduler).

    Args:
        stream: ``(key, worker, start, stop, ok)`` entries, oldest first.
        total: entries ever appended (the index of the next one).
        kept: how many of them ``stream`` still holds.
        tasks: the scheduler's tasks by key (for ``nbytes`` and ``type``).
        start: only tasks that finished at or after this time (``time.time()``).
        stop: only tasks that finished at or before this time.
        count: only the last ``count`` of those.
        since: only entries from this index on (see ``"next"``).

    Returns:
        ``{"next": index of the next entry, "records": [record, ...]}``.
    """
    first = total - kept
    skip = 0 if since is None else max(0, since - first)
    records = []
    for i, (key, worker, t0, t1, ok) in enumerate(stream):
        if i < skip or (start is not None and t1 < start) or (stop is not None and t1 > stop):
            continue
        ts = tasks.get(key)
        known = ts is not None and ok and ts.nbytes >= 0
        records.append({
            "key": key, "worker": worker, "status": "OK" if ok else "error",
            "startstops": [{"action": "compute", "start": t0, "stop": t1}],
            "nbytes": ts.nbytes if known else None, "type": ts.type if known else None,
            "prefix": key_split(key),
        })
    if count is not None:
        records = records[-count:] if count > 0 else []
    return {"next": total, "records": records}


# ----------------------------------------------------------------------------- client side


def _when(value: Any, name: str, now: float) -> float | None:
    """``start``/``stop`` as a ``time.time()`` value: a timestamp, a datetime, or a
    duration ago (``"10s"``, ``"2 minutes"``, a ``timedelta``)."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, datetime.timedelta):
        return now - value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return now - (parse_timedelta(value) or 0.0)
        except ValueError as e:
            raise ValueError(f"{name}={value!r}: {e}") from None
    raise TypeError(f"{name}={value!r}: expected a timestamp (time.time()), a datetime, "
                    "a timedelta or a duration ago such as '10s'")


def _check_plot(plot: Any, bokeh_resources: Any) -> None:
    if not any(plot is v or (isinstance(v, str) and plot == v) for v in PLOT_VALUES):
        raise ValueError(f"plot={plot!r}: accepted values are False, True (a TaskStreamFigure, "
                         "shown in Jupyter) and 'save' (write filename as self-contained HTML)")
    if bokeh_resources is not None:
        raise ValueError("bokeh_resources: we draw the task stream as self-contained SVG without "
                         "bokeh; leave bokeh_resources=None")


async def fetch(client: Any, **kwargs: Any) -> dict:
    """The scheduler's ``get_task_stream`` reply (see :func:`collect`) to ``client``."""
    return await client.rpc.call(client._link, "get_task_stream", **kwargs)


def _plotted(records: list, plot: Any, filename: str) -> Any:
    if not plot:
        return records
    figure = TaskStreamFigure(records)
    if plot == "save":
        figure.save(filename)
    return records, figure


def client_get_task_stream(self: Any, start: Any = None, stop: Any = None, count: int | None = None,
                           plot: bool | str = False, filename: str = "task-stream.html",
                           bokeh_resources: Any = None):
    """The records of tasks the cluster ran, as dask.distributed's task stream.

    Each record is a dict: ``key``, ``worker``, ``status`` (``"OK"`` or
    ``"error"``), ``startstops`` (``[{"action": "compute", "start", "stop"}]``,
    ``time.time()`` of the worker), ``nbytes`` and ``type`` of the result
    (``None`` once the scheduler forgot the key) and ``prefix``.  The
    scheduler keeps the last 100 000 tasks.

    Args:
        start: only tasks finished since then: a ``time.time()`` value, a
            ``datetime``, or a duration ago (``"10s"``, ``timedelta``).
        stop: only tasks finished until then (same forms).
        count: only the last ``count`` records.
        plot: ``True`` also returns a :class:`TaskStreamFigure` (an SVG
            drawing Jupyter shows); ``"save"`` also writes it to ``filename``
            as one self-contained HTML file.
        filename: where ``plot="save"`` writes.
        bokeh_resources: not supported (no bokeh); must be ``None``.

    Returns:
        The list of records, or ``(records, figure)`` when ``plot`` is set.

    Raises:
        ValueError: ``plot`` or ``bokeh_resources`` not accepted (named).
    """
    _check_plot(plot, bokeh_resources)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError(f"count={count!r}: expected a non-negative int or None")
    now = time.time()
    window = {"start": _when(start, "start", now), "stop": _when(stop, "stop", now), "count": count}

    async def call():
        return _plotted((await fetch(self, **window))["records"], plot, filename)

    return self.sync(call)


class get_task_stream:
    """Collect the task stream of a block: ``with get_task_stream() as ts: ...; ts.data``.

    Records every task that finished between entering and leaving the block
    (by the scheduler's count of finished tasks, so the clocks of other hosts
    do not matter).  Works as ``with`` (synchronous client) and ``async with``
    (asynchronous client).

    Args:
        client: the client to ask (default: :func:`cluster.runtime.get_client`).
        plot: ``True`` also sets ``figure`` (a :class:`TaskStreamFigure`);
            ``"save"`` also writes it to ``filename``.
        filename: where ``plot="save"`` writes the self-contained HTML file.

    Attributes:
        data: the task records (see ``Client.get_task_stream``).
        figure: the drawing, when ``plot`` was set.
    """

    def __init__(self, client: Any = None, plot: bool | str = False,
                 filename: str = "task-stream.html") -> None:
        _check_plot(plot, None)
        if client is None:
            client = current_client()
        self.client = client
        self.data: list[dict] = []
        self.figure: TaskStreamFigure | None = None
        self._plot = plot
        self._filename = filename
        self._since = 0

    async def _begin(self) -> None:
        self._since = (await fetch(self.client, count=0))["next"]

    async def _end(self) -> None:
        records = (await fetch(self.client, since=self._since))["records"]
        self.data.extend(records)
        if self._plot:
            self.figure = _plotted(records, self._plot, self._filename)[1]

    def __enter__(self) -> get_task_stream:
        if self.client.asynchronous:
            raise RuntimeError("use 'async with get_task_stream()' with an asynchronous Client")
        self.client.sync(self._begin)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.sync(self._end)

    async def __aenter__(self) -> get_task_stream:
        await self._begin()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._end()


# ----------------------------------------------------------------------------- drawing


class TaskStreamFigure:
    """A drawing of task records: Jupyter shows it, :meth:`save` writes it as HTML.

    Args:
        records: task records (``Client.get_task_stream``).
        title: the heading of the saved page.
    """

    def __init__(self, records: list[dict], title: str = "Task stream") -> None:
        self.records = records
        self.title = title

    def svg(self) -> str:
        """The drawing as an inline ``<svg>`` element."""
        return render_svg(self.records)

    def _repr_html_(self) -> str:
        return f'<div class="hpc-task-stream">{self.svg()}{legend_html(self.records)}</div>'

    def save(self, filename: str) -> str:
        """Write the drawing as one self-contained HTML file (mode 0600); returns its path."""
        body = (f"<h1>{html.escape(self.title)}</h1><section class='wide'>"
                f"{self.svg()}{legend_html(self.records)}</section>")
        return write_html(filename, standalone_page(self.title, body), "filename")


def colors_of(prefixes: Iterable[str]) -> dict[str, str]:
    """A colour per prefix, in order of first appearance (as the status page does)."""
    out: dict[str, str] = {}
    for p in prefixes:
        if p not in out:
            out[p] = PALETTE[len(out) % len(PALETTE)]
    return out


def _span(r: dict) -> tuple[float, float]:
    ss = r["startstops"]
    return min(s["start"] for s in ss), max(s["stop"] for s in ss)


def lanes(records: list[dict]) -> tuple[list[tuple[str, int]], list[tuple[dict, int]]]:
    """Rows of the drawing: each worker's tasks, a lane per overlapping task.

    Returns:
        ``([(worker, lane), ...] sorted, [(record, row index), ...])``.
    """
    ends: dict[str, list[float]] = {}
    placed = []
    for r in sorted(records, key=lambda r: _span(r)[0]):
        t0, t1 = _span(r)
        lane_ends = ends.setdefault(r["worker"], [])
        lane = next((i for i, e in enumerate(lane_ends) if e <= t0), len(lane_ends))
        if lane == len(lane_ends):
            lane_ends.append(t1)
        lane_ends[lane] = t1
        placed.append((r, r["worker"], lane))
    rows = sorted((w, i) for w, e in ends.items() for i in range(len(e)))
    index = {row: n for n, row in enumerate(rows)}
    return rows, [(r, index[(w, lane)]) for r, w, lane in placed]


def _tick_step(span: float) -> float:
    """A round step giving 4-10 ticks over ``span`` seconds."""
    if span <= 0:
        return 1.0
    raw = span / 6
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


def render_svg(records: list[dict], t0: float | None = None, t1: float | None = None,
               names: Mapping[str, str] | None = None, width: int = 1200) -> str:
    """The task stream as an SVG element (every text escaped).

    Args:
        records: task records.
        t0, t1: the time span shown (default: the records' own).
        names: worker address -> name, for the row labels.
        width: drawing units across (the element scales to its container).
    """
    if not records:
        return ('<svg class="task-stream" data-tasks="0" viewBox="0 0 600 40" width="100%" '
                'role="img" aria-label="task stream"><text x="8" y="24" fill="#6b7280">'
                'no tasks finished</text></svg>')
    rows, placed = lanes(records)
    spans = [_span(r) for r in records]
    t0 = min(s for s, _ in spans) if t0 is None else t0
    t1 = max(e for _, e in spans) if t1 is None else t1
    t1 = max(t1, t0 + 1e-3)
    label_w, row_h, axis_h = 170, max(4, min(22, 440 // max(1, len(rows)))), 22
    plot_w = width - label_w - 10
    height = len(rows) * row_h + axis_h

    def x(t: float) -> float:
        return label_w + (t - t0) / (t1 - t0) * plot_w

    colors = colors_of(r["prefix"] for r, _ in placed)
    out = [f'<svg class="task-stream" data-tasks="{len(records)}" data-rows="{len(rows)}" '
           f'viewBox="0 0 {width} {height}" width="100%" role="img" '
           f'aria-label="task stream" font-family="system-ui, sans-serif" font-size="11">']
    names = names or {}
    for n, (worker, lane) in enumerate(rows):
        y = n * row_h
        if n % 2:
            out.append(f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{row_h}" '
                       'fill="#f3f5f9"/>')
        if lane == 0:
            label = html.escape(str(names.get(worker) or worker))
            out.append(f'<text class="lane" x="{label_w - 6}" y="{y + min(row_h, 14) - 3}" '
                       f'text-anchor="end" fill="#1d2330" data-worker="{html.escape(worker)}">'
                       f'{label}</text>')
    for r, n in placed:
        s, e = _span(r)
        ok = r["status"] == "OK"
        fill = colors[r["prefix"]] if ok else "#111111"
        key = html.escape(key_text(r["key"]))
        tip = html.escape(f"{key_text(r['key'])} on {names.get(r['worker']) or r['worker']}: "
                          f"{(e - s) * 1000:.1f} ms" + ("" if ok else " (erred)"))
        out.append(f'<rect class="task" x="{x(s):.2f}" y="{n * row_h + 1}" '
                   f'width="{max(0.8, x(e) - x(s)):.2f}" height="{row_h - 2}" fill="{fill}" '
                   f'data-key="{key}" data-prefix="{html.escape(r["prefix"])}">'
                   f'<title>{tip}</title></rect>')
    step = _tick_step(t1 - t0)
    base = height - axis_h
    out.append(f'<line x1="{label_w}" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#d9dde5"/>')
    k = 0
    while k * step <= (t1 - t0) + 1e-9:
        tx = x(t0 + k * step)
        out.append(f'<text x="{tx:.1f}" y="{base + 15}" text-anchor="middle" fill="#6b7280">'
                   f'{k * step:g} s</text>')
        k += 1
    out.append("</svg>")
    return "".join(out)


def legend_html(records: list[dict]) -> str:
    """The prefix colours of :func:`render_svg` as a legend line."""
    colors = colors_of(r["prefix"] for r in sorted(records, key=lambda r: _span(r)[0]))
    items = "".join(f'<span><i style="background:{c}"></i>{html.escape(p)}</span>'
                    for p, c in colors.items())
    return f'<div class="legend">{items}</div>'


__all__ = ["TaskStreamFigure", "client_get_task_stream", "collect", "get_task_stream",
           "lanes", "render_svg"]
