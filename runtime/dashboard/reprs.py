"""Notebook views (``_repr_html_``) of clients and clusters.

Jupyter shows ``Client``, ``LocalCluster`` and the batch clusters
(``SLURMCluster``, ``PBSCluster``, ``SGECluster``) with these: the scheduler's
address, a clickable link to the status page (with its access token: the
link opens the page in the browser that runs the notebook, on the user's own
screen; it is saved with the notebook's output, and grants the read-only
status page of this scheduler only, for its lifetime), workers, threads and
memory, a folded table of the workers, and for batch clusters the jobs and
their states.  Plain ``repr`` stays one short line.

Only inline styles (notebooks keep no style sheet of ours), and every value
that comes from elsewhere -- worker names, addresses, job reasons, ids -- is
HTML-escaped; a link is made only of an ``http(s)://`` address.

Figures come from the scheduler object when it runs in this process (the
cluster's, or the client's cluster's), otherwise from one ``identity`` call of
a synchronous client (2 s at most); an asynchronous client without a cluster
object shows its address and link only, as a notebook cannot wait for it.
"""

from __future__ import annotations

import html
import logging
import time
from typing import Any

from ..utils import format_bytes

logger = logging.getLogger(__name__)

#: Seconds a synchronous client waits for the scheduler's identity for its view.
IDENTITY_TIMEOUT = 2.0
#: Workers (and jobs) listed in the folded tables; the rest are counted.
MAX_ROWS = 50

_BOX = ("font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; font-size: 13px; "
        "border: 1px solid #d9dde5; border-radius: 6px; padding: .6em .8em; "
        "max-width: 56em; background: #fff; color: #1d2330")
_TH = "text-align: left; padding: 1px 10px 1px 0; color: #6b7280; font-weight: normal"
_TD = "text-align: left; padding: 1px 10px 1px 0"


def esc(value: Any) -> str:
    """``value`` as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def link_html(url: str | None) -> str:
    """A clickable link to ``url`` (opening a new tab), or why there is none."""
    if not url:
        return '<span style="color:#6b7280">not served</span>'
    if not url.startswith(("http://", "https://")):
        return esc(url)  # never a javascript: or data: link
    shown = url.split("?token=", 1)[0]
    return (f'<a href="{esc(url)}" target="_blank" rel="noopener noreferrer" '
            f'class="hpc-dashboard-link">{esc(shown)}</a>'
            + (' <span style="color:#6b7280">(the link carries its access token)</span>'
               if "?token=" in url else ""))


def _kv(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f'<tr><th style="{_TH}">{esc(k)}</th><td style="{_TD}">{v}</td></tr>'
                               for k, v in rows) + "</table>"


def _table(head: list[str], rows: list[list[str]], cls: str) -> str:
    th = "".join(f'<th style="{_TH}">{esc(h)}</th>' for h in head)
    body = "".join("<tr>" + "".join(f'<td style="{_TD}">{c}</td>' for c in r) + "</tr>"
                   for r in rows[:MAX_ROWS])
    more = (f'<tr><td colspan="{len(head)}" style="{_TD}">... and {len(rows) - MAX_ROWS} more'
            "</td></tr>") if len(rows) > MAX_ROWS else ""
    return f'<table class="{cls}"><tr>{th}</tr>{body}{more}</table>'


def scheduler_identity(scheduler: Any) -> dict | None:
    """The identity of a scheduler object of this process (``None`` if not running).

    Read from this thread without the scheduler's loop: a few plain reads,
    retried if a worker joined during the copy.
    """
    if scheduler is None or not getattr(scheduler, "listeners", None):
        return None
    for _ in range(5):
        try:
            return scheduler.identity()
        except RuntimeError:  # "dictionary changed size during iteration"
            time.sleep(0.001)
    return None


def _identity_of_client(client: Any) -> dict | None:
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    info = scheduler_identity(scheduler)
    if info is not None or client.asynchronous or client.status != "running":
        return info

    async def ask():
        return await client.rpc.call(client._link, "identity")

    try:
        return client.sync(ask, timeout=IDENTITY_TIMEOUT)
    except Exception as e:  # a view must never raise: show what we know
        logger.debug("no identity for the notebook view of %s: %s", client.id, e)
        return None


def _facts(info: dict | None) -> list[tuple[str, str]]:
    if info is None:
        return [("Workers", '<span style="color:#6b7280">unknown (ask '
                            "client.scheduler_info())</span>")]
    workers = list((info.get("workers") or {}).values())
    threads = sum(int(w.get("nthreads") or 0) for w in workers)
    memory = sum(int(w.get("memory_limit") or 0) for w in workers)
    return [("Workers", esc(len(workers))), ("Threads", esc(threads)),
            ("Memory", esc(format_bytes(memory)) if memory else "no limit")]


def _workers_table(info: dict | None) -> str:
    if not info or not info.get("workers"):
        return ""
    rows = []
    for address, w in sorted(info["workers"].items(), key=lambda x: str(x[1].get("name"))):
        m = w.get("metrics") or {}
        limit = w.get("memory_limit") or 0
        rows.append([esc(w.get("name")), esc(address), esc(w.get("nthreads")),
                     esc(format_bytes(m.get("memory", 0))),
                     esc(format_bytes(limit)) if limit else "none", esc(w.get("status", ""))])
    return (f'<details><summary>Workers ({len(rows)})</summary>'
            + _table(["name", "address", "threads", "memory", "limit", "status"], rows,
                     "hpc-workers") + "</details>")


def render(title: str, rows: list[tuple[str, str]], info: dict | None, extra: str = "") -> str:
    """The box: a title, ``rows`` of (label, HTML), the facts of ``info``, the workers."""
    return (f'<div class="hpc-cluster-repr" style="{_BOX}">'
            f'<div style="font-weight:600;margin-bottom:.3em">{esc(title)}</div>'
            + _kv(rows + _facts(info)) + extra + _workers_table(info) + "</div>")


def client_repr_html(client: Any) -> str:
    """``Client._repr_html_``: the client, its scheduler, dashboard and workers."""
    cluster = getattr(client, "cluster", None)
    rows = [("Client", esc(client.id)), ("Status", esc(client.status)),
            ("Scheduler", esc(client.scheduler_address or "not connected")),
            ("Dashboard", link_html(client.dashboard_link))]
    if cluster is not None:
        rows.append(("Cluster", esc(type(cluster).__name__)))
    return render("Client", rows, _identity_of_client(client))


def local_cluster_repr_html(cluster: Any) -> str:
    """``LocalCluster._repr_html_``."""
    rows = [("Status", esc(cluster.status)),
            ("Scheduler", esc(cluster.scheduler_address or "not started")),
            ("Dashboard", link_html(cluster.dashboard_link)),
            ("Worker processes", "yes" if cluster.processes else "no (threads of this process)")]
    return render(type(cluster).__name__, rows, scheduler_identity(cluster.scheduler))


def jobqueue_cluster_repr_html(cluster: Any) -> str:
    """``JobQueueCluster._repr_html_`` (SLURM, PBS, SGE): adds the jobs and their states."""
    scheduler = getattr(cluster, "scheduler", None)
    rows = [("Status", esc(cluster.status)),
            ("Scheduler", esc(cluster.scheduler_address or "not started")),
            ("Dashboard", link_html(getattr(scheduler, "dashboard_link", None)))]
    try:
        jobs = list(cluster.jobs.values())
    except Exception as e:  # a view must never raise
        logger.debug("no jobs for the notebook view: %s", e)
        jobs = []
    states: dict[str, int] = {}
    job_rows = []
    for job in jobs:
        state = getattr(job.state, "value", job.state)
        states[state] = states.get(state, 0) + 1
        job_rows.append([esc(job.id), esc(state), esc(job.native_state), esc(len(job.workers)),
                         esc(job.reason)])
    rows.append(("Jobs", esc(", ".join(f"{n} {s}" for s, n in states.items()) or "none")))
    extra = (f'<details open><summary>Jobs ({len(job_rows)})</summary>'
             + _table(["job id", "state", "batch system says", "workers", "reason"], job_rows,
                      "hpc-jobs") + "</details>") if job_rows else ""
    return render(type(cluster).__name__, rows, scheduler_identity(scheduler), extra)


__all__ = ["client_repr_html", "jobqueue_cluster_repr_html", "link_html",
           "local_cluster_repr_html", "render", "scheduler_identity"]
