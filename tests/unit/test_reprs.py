"""Notebook views, task-stream records and drawing, and the performance report's HTML,
without a cluster: what each shows and that nothing from elsewhere reaches the page
unescaped."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import xml.etree.ElementTree as ET
from collections import deque
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
from cluster.jobqueue.states import JobState
from cluster.jobqueue.tracking import JobInfo
from cluster.runtime.dashboard import reprs
from cluster.runtime.dashboard.report import (
    _profile_delta,
    block_source,
    performance_report,
    render_report,
    write_html,
)
from cluster.runtime.dashboard.task_stream import (
    TaskStreamFigure,
    client_get_task_stream,
    collect,
    get_task_stream,
    lanes,
    render_svg,
)
from cluster.runtime.errors import UnsafePathError
from cluster.runtime.utils import key_split

pytestmark = pytest.mark.timeout(30)

EVIL = '<script>alert("x")</script>&\''


class Balanced(HTMLParser):
    """Checks that elements nest (void elements aside) and collects tags and their attributes."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "rect", "line", "path"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse(text: str) -> Balanced:
    p = Balanced()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def identity(workers: dict) -> dict:
    return {"type": "Scheduler", "address": "tls://127.0.0.1:1", "workers": workers}


def worker(name, nthreads=2, memory_limit=4 * 2**30, memory=2**20, status="running") -> dict:
    return {"name": name, "nthreads": nthreads, "memory_limit": memory_limit,
            "metrics": {"memory": memory}, "status": status}


# ----------------------------------------------------------------------------- reprs


def test_link_html_is_clickable_with_its_token_but_shows_no_token():
    url = "https://127.0.0.1:8787/status?token=abc&x=<1>"
    out = reprs.link_html(url)
    (tag, attrs), = [t for t in parse(out).tags if t[0] == "a"]
    assert attrs["href"] == url  # unescaped by the parser: exactly the link
    assert attrs["target"] == "_blank" and "noopener" in attrs["rel"]
    assert ">https://127.0.0.1:8787/status</a>" in out and "abc" not in out.split(">", 1)[1]
    assert "&lt;1&gt;" in out and "<1>" not in out
    assert "not served" in reprs.link_html(None)
    # Never a link of another scheme, even if a scheduler said so.
    assert "<a" not in reprs.link_html("javascript:alert(1)")
    assert reprs.link_html("http://h:1/status").count("token") == 0


def test_render_escapes_every_outside_value_and_sums_the_workers():
    info = identity({
        "tls://127.0.0.1:2": worker(EVIL, 2, 2 * 2**30),
        "tls://127.0.0.1:3": worker("w1", 3, 2**30, status="paused"),
    })
    out = reprs.render("Client", [("Scheduler", reprs.esc(EVIL))], info)
    parse(out)
    assert "<script>" not in out and "&lt;script&gt;" in out and "&#x27;" in out
    text = re.sub(r"<[^>]+>", "|", out)
    assert "|Workers|2|" in text.replace("||", "|") and "|Threads|5|" in text.replace("||", "|")
    assert "3.00 GiB" in out  # memory limits summed
    assert "Workers (2)" in out and "paused" in out and "tls://127.0.0.1:3" in out
    unknown = reprs.render("Client", [], None)
    assert "unknown" in unknown and "scheduler_info" in unknown


def test_render_folds_long_worker_tables():
    info = identity({f"tcp://127.0.0.1:{i}": worker(f"w{i}") for i in range(reprs.MAX_ROWS + 7)})
    out = reprs.render("LocalCluster", [], info)
    assert out.count('<tr><td style') == reprs.MAX_ROWS and "and 7 more" in out


class _Client:
    def __init__(self, link):
        self.id = "Client-<1>"
        self.status = "running"
        self.scheduler_address = "tls://127.0.0.1:9"
        self.dashboard_link = link
        self.asynchronous = True  # no call to a scheduler from the view
        self.cluster = None


def test_client_view_without_figures_shows_address_and_link():
    out = reprs.client_repr_html(_Client("https://127.0.0.1:8787/status?token=t0k"))
    parse(out)
    assert "Client-&lt;1&gt;" in out and "tls://127.0.0.1:9" in out
    assert 'href="https://127.0.0.1:8787/status?token=t0k"' in out and "unknown" in out


def test_batch_cluster_view_lists_jobs_and_their_states_escaped():
    jobs = {
        "101": JobInfo("101", JobState.RUNNING, "RUNNING", ("job-101",), 1.0, 2.0, False),
        "102": JobInfo("102", JobState.PENDING, "PENDING", (), 1.0, None, False, EVIL),
        "103": JobInfo("103", JobState.PENDING, "PENDING", (), 1.0, None, False, "Priority"),
    }
    cluster = SimpleNamespace(status="running", scheduler_address="tls://127.0.0.1:7",
                              scheduler=None, jobs=jobs)
    out = reprs.jobqueue_cluster_repr_html(cluster)
    parse(out)
    assert "1 running, 2 pending" in out and "Jobs (3)" in out
    assert "<script>" not in out and "&lt;script&gt;" in out and "Priority" in out
    rows = re.findall(r"<tr>(.*?)</tr>", out.split("Jobs (3)")[1])
    assert len(rows) == 4  # head + 3 jobs
    assert "101" in rows[1] and "running" in rows[1]


# ----------------------------------------------------------------------------- task stream


def _tasks(**nbytes):
    return {k: SimpleNamespace(nbytes=n, type="int") for k, n in nbytes.items()}


def test_collect_filters_by_time_count_and_index_and_fills_nbytes():
    stream = deque([("a-1", "w1", 10.0, 11.0, True), ("b-2", "w2", 11.0, 12.5, False),
                    (("x", 0), "w1", 12.0, 13.0, True), ("a-3", "w1", 13.0, 14.0, True)])
    tasks = _tasks(**{"a-1": 8, "a-3": -1})
    tasks[("x", 0)] = SimpleNamespace(nbytes=16, type="ndarray")
    everything = collect(stream, total=9, kept=4, tasks=tasks)
    assert everything["next"] == 9 and len(everything["records"]) == 4
    a1, b2, x0, a3 = everything["records"]
    assert a1 == {"key": "a-1", "worker": "w1", "status": "OK", "nbytes": 8, "type": "int",
                  "startstops": [{"action": "compute", "start": 10.0, "stop": 11.0}],
                  "prefix": key_split("a-1")}
    assert b2["status"] == "error" and b2["nbytes"] is None  # erred: no result
    assert x0["key"] == ("x", 0) and x0["prefix"] == key_split(("x", 0)) and x0["type"] == "ndarray"
    assert a3["nbytes"] is None  # not known (any more)
    keys = [r["key"] for r in collect(stream, 9, 4, tasks, start=12.5, stop=13.5)["records"]]
    assert keys == ["b-2", ("x", 0)]  # finished within [start, stop]
    assert [r["key"] for r in collect(stream, 9, 4, tasks, count=1)["records"]] == ["a-3"]
    assert collect(stream, 9, 4, tasks, count=0)["records"] == []
    # ``since`` is an index over all entries ever appended (5 were dropped before these).
    assert [r["key"] for r in collect(stream, 9, 4, tasks, since=7)["records"]] == [("x", 0), "a-3"]
    assert len(collect(stream, 9, 4, tasks, since=0)["records"]) == 4


def test_client_get_task_stream_refuses_what_it_cannot_do():
    client = SimpleNamespace(sync=lambda f: pytest.fail("no call expected"))
    with pytest.raises(ValueError, match=r"plot='bokeh'.*False, True.*'save'"):
        client_get_task_stream(client, plot="bokeh")
    with pytest.raises(ValueError, match="bokeh_resources"):
        client_get_task_stream(client, bokeh_resources="inline")
    with pytest.raises(ValueError, match="count=-1"):
        client_get_task_stream(client, count=-1)
    with pytest.raises(ValueError, match="start='soon'"):
        client_get_task_stream(client, start="soon")
    with pytest.raises(TypeError, match="stop="):
        client_get_task_stream(client, stop=[1])
    with pytest.raises(ValueError, match="plot=2"):
        get_task_stream(client, plot=2)


def record(key, worker, start, stop, ok=True):
    return {"key": key, "worker": worker, "status": "OK" if ok else "error",
            "startstops": [{"action": "compute", "start": start, "stop": stop}],
            "prefix": key_split(key), "nbytes": None, "type": None}


def test_lanes_put_overlapping_tasks_of_a_worker_on_their_own_rows():
    recs = [record("a-1", "w1", 0, 2), record("a-2", "w1", 1, 3), record("a-3", "w1", 2, 4),
            record("b-1", "w2", 0, 1)]
    rows, placed = lanes(recs)
    assert rows == [("w1", 0), ("w1", 1), ("w2", 0)]
    row_of = {r["key"]: n for r, n in placed}
    assert row_of == {"a-1": 0, "a-2": 1, "a-3": 0, "b-1": 2}


def test_svg_is_well_formed_and_escapes_keys_and_names():
    recs = [record(f"{EVIL}-1", "tcp://127.0.0.1:5", 100.0, 100.5),
            record("ok-2", "tcp://127.0.0.1:6", 100.2, 101.0, ok=False)]
    svg = render_svg(recs, names={"tcp://127.0.0.1:5": "<b>w</b>"})
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    tasks = [e for e in root.iter() if e.tag in ("rect", ns + "rect") and e.get("class") == "task"]
    assert len(tasks) == 2 and root.get("data-tasks") == "2"
    assert tasks[0].get("data-key") == f"{EVIL}-1"  # the text, escaped in the markup
    assert "<script>" not in svg and "&lt;b&gt;w&lt;/b&gt;" in svg
    assert tasks[1].get("fill") == "#111111"  # erred: black, as on the status page
    assert "(erred)" in svg and ">0.2 s</text>" in svg
    empty = render_svg([])
    assert ET.fromstring(empty).get("data-tasks") == "0" and "no tasks" in empty
    fig = TaskStreamFigure(recs)
    assert fig._repr_html_().startswith('<div class="hpc-task-stream"><svg')


# ----------------------------------------------------------------------------- the report


def snapshot(t, count, incoming, profile=None) -> dict:
    return {"time": t, "count": count, "address": "tls://127.0.0.1:4", "id": "s",
            "started": 0.0, "profile": profile or {},
            "workers": [{"address": "tcp://127.0.0.1:5", "name": EVIL, "host": "127.0.0.1",
                         "nthreads": 2, "memory_limit": 2**30, "status": "running",
                         "transfer_incoming_bytes": incoming, "transfer_outgoing_bytes": 0}]}


def test_report_page_is_complete_self_contained_and_escaped():
    recs = [record("inc-0123456789abcdef", "tcp://127.0.0.1:5", 100.1, 100.3),
            record("inc-fedcba9876543210", "tcp://127.0.0.1:5", 100.2, 100.6),
            record("boom-0123456789abcdef", "tcp://127.0.0.1:5", 100.3, 100.4, ok=False),
            record("gone-0123456789abcdef", "tcp://127.0.0.1:99", 100.3, 100.4)]
    before = snapshot(100.0, 5, 1000, {"inc": {"count": 2, "functions": [["f (a.py:1)", 2]]}})
    after = snapshot(101.0, 8, 5096, {"inc": {"count": 7, "functions": [["f (a.py:1)", 6],
                                                                       ["g (a.py:9)", 3]]}})
    code = 'with performance_report():\n    x = "</script><script>alert(1)</script>"\n'
    page = render_report(before, after, recs, code, 100.0, 101.0)
    doc = parse(page)
    assert page.startswith("<!doctype html>")
    # Nothing is fetched: no src/href to anything, and the CSP forbids it anyway.
    for tag, attrs in doc.tags:
        assert "src" not in attrs or tag == "script" and not attrs["src"], (tag, attrs)
        assert not attrs.get("href", "").startswith(("http", "//")), (tag, attrs)
    assert "default-src 'none'" in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", "")
    assert "<script>alert(1)" not in page and "&lt;/script&gt;" in page
    assert EVIL not in page
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)'
                                r"</script>", page, re.S).group(1))
    assert data["tasks"] == 4 and data["erred"] == 1
    # A worker that ran tasks of the block and left is still listed.
    assert re.search(r"<td>tcp://127.0.0.1:99</td><td class=num>left</td>", page)
    assert data["transfer_incoming_bytes"] == 4096
    assert data["prefixes"]["inc"]["count"] == 2
    assert abs(data["prefixes"]["inc"]["compute"] - 0.6) < 1e-9
    assert 'id="task-stream"' in page and page.count('class="task"') == 4
    assert "4.00 kiB" in page and "1.00 GiB" in page and "1.00 s" in page
    # The profile shows the samples taken during the block only.
    assert "5 samples" in page and "g (a.py:9)" in page
    assert _profile_delta(before["profile"], after["profile"]) == {
        "inc": {"count": 5, "functions": [["f (a.py:1)", 4], ["g (a.py:9)", 3]]}}


def test_block_source_is_the_with_statement():
    def here():
        return sys._getframe(1)

    class Probe:
        def __enter__(self):
            self.src = block_source(sys._getframe(1))
            return self

        def __exit__(self, *exc):
            pass

    with Probe() as p:  # the block
        y = 1 + 1
    src = p.src
    assert src.startswith("with Probe() as p:  # the block\n") and "y = 1 + 1" in src
    assert "block_source" not in src and y == 2
    # Outside a with statement: the whole function.
    assert block_source(here()).lstrip().startswith("def test_block_source_is_the_with_statement")


def test_performance_report_refuses_options_it_cannot_honour():
    with pytest.raises(ValueError, match=r"mode='cdn'.*None and 'inline'"):
        performance_report(mode="cdn")
    with pytest.raises(ValueError, match="storage_options"):
        performance_report(storage_options={"anon": True})
    with pytest.raises(ValueError, match="only local files"):
        performance_report(filename="s3://bucket/report.html")
    with pytest.raises(ValueError, match="stacklevel=0"):
        performance_report(stacklevel=0)
    with pytest.raises(TypeError, match="filename=3"):
        performance_report(filename=3)
    performance_report(filename="r.html", mode="inline", storage_options={})  # accepted


def test_write_html_is_private_replaces_our_file_and_refuses_others(tmp_path):
    target = tmp_path / "report.html"
    assert write_html(target, "one", "filename") == str(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600 and target.read_text() == "one"
    target.chmod(0o644)
    write_html(str(target), "two", "filename")  # our own report: replaced, private again
    assert target.read_text() == "two" and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    # A symbolic link of ours is replaced, never followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep")
    link = tmp_path / "link.html"
    link.symlink_to(elsewhere)
    write_html(link, "three", "filename")
    assert elsewhere.read_text() == "keep" and not link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_html(tmp_path / "missing" / "r.html", "x", "filename")
    with pytest.raises(IsADirectoryError):
        write_html(tmp_path, "x", "filename")
    if os.geteuid() == 0:  # as root we can hand a file to someone else
        theirs = tmp_path / "theirs.html"
        theirs.write_text("theirs")
        os.chown(theirs, 12345, 12345)
        with pytest.raises(UnsafePathError, match="belongs to user id 12345"):
            write_html(theirs, "x", "filename")
        assert theirs.read_text() == "theirs"
