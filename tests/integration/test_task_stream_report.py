"""The task stream, the performance report and the notebook views against real clusters;
the report and the Client's view rendered in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import tempfile
import time
import xml.etree.ElementTree as ET

import pytest
from cluster.jobqueue.commands import CommandResult
from cluster.runtime.dashboard.report import performance_report
from cluster.runtime.dashboard.task_stream import TaskStreamFigure, get_task_stream

from cluster import Client, LocalCluster, SLURMCluster
from tests.helpers import gen_cluster, gen_test, until, until_sync
from tests.integration.test_dashboard import WebDriver, chromium_binary, observe, run_chromium

pytestmark = pytest.mark.timeout(120)

ON = {"dashboard_address": "127.0.0.1:0"}


def slow_inc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def boom(x):
    raise ValueError(f"boom {x}")


def payload(n):
    return b"x" * n


def report_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m, "no report data in the page"
    return json.loads(m.group(1))


def test_task_stream_records_from_a_local_cluster(tmp_path):
    with LocalCluster(n_workers=2, threads_per_worker=2, **ON) as cluster, \
            Client(cluster) as c:
        before = time.time()
        c.gather(c.map(slow_inc, range(4), key=[f"early-{i}" for i in range(4)]))
        with get_task_stream() as ts:
            futures = c.map(slow_inc, range(12))
            c.gather(futures)
            bad = c.submit(boom, 1)
            with pytest.raises(ValueError, match="boom 1"):
                bad.result()
        workers = set(cluster.scheduler.state.workers)
        assert len(workers) == 2
        records = ts.data
        assert {r["key"] for r in records} == {f.key for f in futures} | {bad.key}
        for r in records:
            assert r["worker"] in workers
            (ss,) = r["startstops"]
            assert ss["action"] == "compute" and before <= ss["start"] < ss["stop"] <= time.time()
        ok = [r for r in records if r["status"] == "OK"]
        assert len(ok) == 12 and all(r["prefix"] == "slow_inc" for r in ok)
        assert all(isinstance(r["nbytes"], int) and r["nbytes"] > 0 for r in ok)  # still held
        assert [r["status"] for r in records if r["key"] == bad.key] == ["error"]
        assert len({r["worker"] for r in ok}) == 2  # both workers ran some
        # client.get_task_stream: by time, by count, and drawn.
        everything = c.get_task_stream()
        assert {r["key"] for r in everything} >= {f"early-{i}" for i in range(4)}
        assert len(everything) == 17
        assert len(c.get_task_stream(start=before, count=3)) == 3
        assert c.get_task_stream(start=time.time() + 60) == []
        assert len(c.get_task_stream(start="1 hour")) == 17
        recs, fig = c.get_task_stream(plot=True, count=5)
        assert len(recs) == 5 and isinstance(fig, TaskStreamFigure)
        assert ET.fromstring(fig.svg()).get("data-tasks") == "5"
        saved = tmp_path / "stream.html"
        c.get_task_stream(plot="save", filename=str(saved))
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
        assert saved.read_text().count('class="task"') == 17
        with get_task_stream(c, plot="save", filename=str(tmp_path / "block.html")) as ts2:
            c.submit(slow_inc, 100).result()
        assert len(ts2.data) == 1 and ts2.figure is not None
        assert (tmp_path / "block.html").read_text().count('class="task"') == 1
        with pytest.raises(ValueError, match="plot='bokeh'"):
            c.get_task_stream(plot="bokeh")


def test_performance_report_writes_one_page_and_it_renders_in_chromium(tmp_path):
    binary = chromium_binary()
    target = tmp_path / "dask-report.html"
    with LocalCluster(n_workers=2, threads_per_worker=1, **ON) as cluster, \
            Client(cluster) as c:
        a_worker, b_worker = sorted(cluster.scheduler.state.workers)
        with performance_report(filename=str(target)) as report:
            c.gather(c.map(slow_inc, range(10)))
            # A dependency moves between workers: its bytes are counted.
            big = c.submit(payload, 200_000, workers=[a_worker])
            assert c.submit(len, big, workers=[b_worker]).result() == 200_000
        assert report.path == str(target)
        page = target.read_text()
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
        data = report_data(page)
        assert data["tasks"] == 12 and data["erred"] == 0
        assert data["prefixes"]["slow_inc"]["count"] == 10
        assert set(data["workers"]) == {a_worker, b_worker}
        assert data["transfer_incoming_bytes"] >= 200_000
        assert data["scheduler"] == cluster.scheduler_address
        assert {r["worker"] for r in data["records"]} <= {a_worker, b_worker}
        # The block's own source, escaped.
        assert "with performance_report(filename=str(target)) as report:" in page
        assert "c.gather(c.map(slow_inc, range(10)))" in page
        # Self-contained: no address but the cluster's own, nothing to fetch, no token.
        assert not re.search(r'(src|href)="(https?:)?//', page)
        assert "token=" not in page
        svg = re.search(r"<svg class=\"task-stream\".*?</svg>", page, re.S).group(0)
        assert ET.fromstring(svg).get("data-tasks") == "12"
        # A second report over the first: ours, so replaced.
        with performance_report(filename=target):
            c.submit(slow_inc, 1).result()
        assert report_data(target.read_text())["tasks"] == 1
    dom = asyncio.run(run_chromium(binary, "--virtual-time-budget=2000", "--dump-dom",
                                   target.as_uri()))
    # The page's own script ran and counted the tasks drawn with a size on screen.
    assert re.search(r'data-rendered-tasks="1"', dom), dom[:2000]
    assert 'data-tasks="1"' in dom and "slow_inc" in dom
    assert len(re.findall(r'<rect class="task"', dom)) == 1


@gen_test(timeout=60)
async def test_async_with_task_stream_and_report(tmp_path):
    async with gen_cluster(nworkers=2, scheduler_kwargs=ON) as (c, s, workers):
        async with get_task_stream(c) as ts:
            await c.gather(c.map(slow_inc, range(6)))
        assert len(ts.data) == 6
        assert {r["worker"] for r in ts.data} <= set(s.workers)
        assert len(await c.get_task_stream(count=2)) == 2
        target = tmp_path / "async-report.html"
        async with performance_report(filename=target):
            await c.gather(c.map(slow_inc, range(3), delay=0.01))
        page = target.read_text()
        assert report_data(page)["tasks"] == 3
        assert "async with performance_report(filename=target):" in page
        # The block's exception goes through, after the report is written...
        with pytest.raises(ZeroDivisionError):
            async with performance_report(filename=target):
                await c.submit(slow_inc, 1)
                raise ZeroDivisionError("in the block")
        assert report_data(target.read_text())["tasks"] == 1
        # ...and a report that cannot be written does not hide it.
        gone = tmp_path / "gone"
        gone.mkdir()
        with pytest.raises(ZeroDivisionError):
            async with performance_report(filename=gone / "r.html"):
                gone.rmdir()
                raise ZeroDivisionError("in the block")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            async with performance_report(filename=gone / "r.html"):
                pass
        with pytest.raises(RuntimeError, match="async with"):
            with get_task_stream(c):
                pass


@pytest.mark.timeout(180)
def test_client_view_in_chromium_links_to_the_status_page(tmp_path):
    """The Client's notebook view names the cluster, and its dashboard link (HTTPS with the
    token, as TLS is on) opens the live status page in a browser."""
    binary = chromium_binary()
    with LocalCluster(n_workers=2, threads_per_worker=1, **ON) as cluster, \
            Client(cluster) as c:
        view = c._repr_html_()
        link = c.dashboard_link
        assert link.startswith("https://127.0.0.1:") and "?token=" in link
        assert f'href="{link}"' in view and cluster.scheduler_address in view
        text = re.sub(r"<[^>]+>", "|", view)
        assert re.search(r"Workers\|+2\|", text) and re.search(r"Threads\|+2\|", text)
        cview = cluster._repr_html_()
        assert "LocalCluster" in cview and f'href="{link}"' in cview
        page = tmp_path / "notebook.html"
        page.write_text(f"<!doctype html><html><body>{view}</body></html>")
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            driver = WebDriver(binary, profile)
            try:
                driver.open(page.as_uri())
                assert "hpc-cluster-repr" in driver.dom()
                # Click the link as a user does (in this tab rather than a new one).
                driver.call("POST", f"/session/{driver.session}/execute/sync", {
                    "script": "const a = document.querySelector('a.hpc-dashboard-link');"
                              "a.removeAttribute('target'); a.click();", "args": []})
                seen = until_sync(lambda: (lambda o: o if o["polls"] >= 1 else None)(
                    observe(driver.dom())), timeout=30, interval=0.2,
                    what="the status page to poll")
                assert seen["workers"] == 2 and seen["worker_rows"] == 2, seen
            finally:
                driver.close()


class FakeSlurm:
    """``sbatch``/``squeue``/``scancel`` answered from a dict: jobs that never start."""

    def __init__(self):
        self.jobs: dict[str, str] = {}

    async def __call__(self, argv, *, timeout=60.0, input=None, env=None) -> CommandResult:
        argv = list(argv)
        if argv[0] == "sbatch":
            job = str(200 + len(self.jobs))
            self.jobs[job] = "PENDING"
            return CommandResult(tuple(argv), 0, f"Submitted batch job {job}\n", "")
        if argv[0] == "squeue":
            ids = argv[-1].split("=", 1)[1].split(",")
            out = "".join(f"{i}|{self.jobs[i]}\n" for i in ids if i in self.jobs)
            return CommandResult(tuple(argv), 0, out, "")
        if argv[0] == "scancel":
            for i in argv[1:]:
                self.jobs[i] = "CANCELLED"
            return CommandResult(tuple(argv), 0, "", "")
        raise AssertionError(f"unexpected command {argv}")


@gen_test(timeout=60)
async def test_batch_cluster_view_shows_its_jobs_and_states():
    fake = FakeSlurm()
    async with SLURMCluster(cores=1, memory="1GB", runner=fake, status_interval=0.05,
                            scheduler_options={"host": "127.0.0.1"}, close_timeout=5,
                            asynchronous=True) as cluster:
        await cluster.scale(jobs=2)
        await until(lambda: all(j.native_state == "PENDING" for j in cluster.jobs.values())
                    and len(cluster.jobs) == 2, 10, what="a status call")
        view = cluster._repr_html_()
        assert "SLURMCluster" in view and cluster.scheduler_address in view
        assert "2 pending" in view and "Jobs (2)" in view
        assert all(f"<td style=\"text-align: left; padding: 1px 10px 1px 0\">{j}</td>" in view
                   for j in cluster.jobs)
        assert len(repr(cluster)) < 200 and "<" not in repr(cluster)[1:]
