"""The scheduler's status page, JSON endpoints and /metrics; workers' /metrics and /health;
logs, story and profiles from the client; the page in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from cluster.runtime import Client, Scheduler, Security
from cluster.runtime.http import TOKEN_COOKIE

from tests.helpers import gen_cluster, gen_test, until, until_sync

parser = pytest.importorskip("prometheus_client.parser")

ON = {"dashboard_address": "127.0.0.1:0"}


def slow_inc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def spin(seconds):
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        n += 1
    return n


async def fetch(url: str, context: ssl.SSLContext | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``(status, content type, body)`` of a GET, from a thread (urllib blocks)."""
    def get():
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()

    return await asyncio.get_running_loop().run_in_executor(None, get)


def base(s: Scheduler) -> str:
    return s.dashboard_link.rsplit("/", 1)[0]


@gen_test(timeout=60)
async def test_json_endpoints_and_metrics_follow_the_work():
    async with gen_cluster(scheduler_kwargs=ON) as (c, s, workers):
        assert s.dashboard_link.startswith("http://127.0.0.1:")
        assert c.dashboard_link == s.dashboard_link
        status, ctype, page = await fetch(s.dashboard_link)
        assert status == 200 and ctype.startswith("text/html") and "/static/app.js" in page
        assert "http://" not in page.replace("http://www.w3.org", "")  # nothing from elsewhere
        for asset in ("app.js", "style.css"):
            assert (await fetch(f"{base(s)}/static/{asset}"))[0] == 200
        futures = c.map(slow_inc, range(20))
        await c.gather(futures)
        _, _, text = await fetch(f"{base(s)}/json/identity.json")
        info = json.loads(text)
        assert info["workers"] == 2 and info["completed"] == 20 and info["tasks"] == {"memory": 20}
        rows = json.loads((await fetch(f"{base(s)}/json/workers.json"))[2])
        assert [r["name"] for r in rows] == ["w0", "w1"]
        assert sum(r["in_memory"] for r in rows) == 20
        stream = json.loads((await fetch(f"{base(s)}/json/task-stream.json?since=0"))[2])
        assert stream["next"] == 20 and len(stream["tasks"]) == 20
        key, prefix, worker, start, stop, ok = stream["tasks"][0]
        assert prefix == "slow_inc" and worker in s.workers and stop >= start and ok
        later = json.loads((await fetch(f"{base(s)}/json/task-stream.json?since=18"))[2])
        assert len(later["tasks"]) == 2
        progress = json.loads((await fetch(f"{base(s)}/json/progress.json"))[2])
        assert progress == {"slow_inc": {"memory": 20}}
        # A dependency moves between workers: transfer bytes are counted.
        a = c.submit(lambda: b"x" * 100_000, workers=[workers[0].address])
        b = c.submit(len, a, workers=[workers[1].address])
        assert await b == 100_000
        await until(lambda: s.workers[workers[1].address].metrics.get("transfer_incoming_bytes"),
                    what="a heartbeat with transfer bytes")
        status, ctype, text = await fetch(f"{base(s)}/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
        for f in fams.values():
            assert f.documentation, f.name
        assert fams["cluster_scheduler_tasks_completed"].type == "counter"
        assert fams["cluster_scheduler_tasks_completed"].samples[0].value == 22
        by_state = {x.labels["state"]: x.value for x in fams["cluster_scheduler_tasks"].samples}
        assert by_state["memory"] == 22 and by_state["erred"] == 0
        assert sum(x.value for x in fams["cluster_scheduler_workers"].samples) == 2
        mem = {x.labels["type"]: x.value for x in fams["cluster_scheduler_memory_bytes"].samples}
        assert mem["managed"] > 100_000 and mem["process"] > 0 and "spilled" in mem
        incoming = fams["cluster_worker_transfer_incoming_bytes"]
        assert incoming.type == "counter"
        assert max(x.value for x in incoming.samples) >= 100_000
        assert (await fetch(f"{base(s)}/health"))[:3:2] == (200, "ok\n")
        assert (await fetch(f"{base(s)}/nope"))[0] == 404
        assert (await fetch(f"{base(s)}/static/../scheduler.py"))[0] == 404
        assert (await fetch(f"{base(s)}/json/task-stream.json?since=x"))[0] == 400


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # until the server closes
    finally:
        writer.close()


@gen_test(timeout=60)
async def test_bad_requests_are_answered_and_closed_and_the_server_goes_on():
    async with Scheduler(dashboard_address="127.0.0.1:0", protocol="tcp") as s:
        port = s.http_server.port
        assert (await raw_request(port, b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw_request(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 405 ")
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"
        assert (await raw_request(port, huge)).startswith(b"HTTP/1.1 400 ")
        assert (await raw_request(port, b"\xff\xfe\x00garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        # Keep-alive: two requests on one connection, then Connection: close.
        two = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
               b"HEAD /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        out = await raw_request(port, two)
        assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"\r\n\r\n")
        # A client that connects and says nothing does not block others.
        idle = await asyncio.open_connection("127.0.0.1", port)
        assert (await fetch(f"http://127.0.0.1:{port}/health"))[0] == 200
        idle[1].close()
        assert s.http_server.requests_served >= 3


@gen_test(timeout=60)
async def test_disabled_taken_port_and_close():
    async with Scheduler(dashboard_address=None, protocol="tcp") as s:
        assert s.dashboard_link is None and s.http_server is None
        assert "dashboard" not in s.identity()["services"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with Scheduler(dashboard_address=f":{port}", protocol="tcp") as s:
            # As dask: a taken port falls back to a free one (logged), on our own host.
            assert s.http_server.port not in (0, port) and s.http_server.host == "127.0.0.1"
            assert s.identity()["services"]["dashboard"] == s.http_server.port
            dash_port = s.http_server.port
    with pytest.raises(OSError):  # closed with the scheduler
        socket.create_connection(("127.0.0.1", dash_port), timeout=2).close()
    with pytest.raises(ValueError, match="dashboard_address"):
        Scheduler(dashboard_address="host:notaport")


@gen_test(timeout=60)
async def test_dashboard_is_https_and_needs_the_token_or_a_cluster_certificate():
    sec = Security.temporary()
    async with Scheduler(security=sec, dashboard_address="127.0.0.1:0") as s:
        link = s.dashboard_link
        assert link.startswith("https://") and "?token=" in link
        token = link.split("?token=", 1)[1]
        page = link.split("?", 1)[0]
        # A browser holds no certificate of this cluster: the TLS handshake succeeds...
        anonymous = ssl.create_default_context()
        anonymous.check_hostname = False
        anonymous.verify_mode = ssl.CERT_NONE
        # ...but without the token nothing is served.
        for url in (page, f"{base(s)}/metrics", f"{page}?token=wrong{token}", f"{page}?token="):
            status, _, text = await fetch(url, anonymous)
            assert status == 403 and "token" in text, url
        # The link itself opens the page and hands out the cookie for the page's own requests.
        cookie = await asyncio.get_running_loop().run_in_executor(None, _cookie_of, link, anonymous)
        # Named per port: browsers keep cookies per host, and other clusters may share it.
        name = f"{TOKEN_COOKIE}_{s.http_server.port}"
        assert s.http_server.cookie_name == name
        assert cookie.startswith(f"{name}={token};") and "HttpOnly" in cookie
        assert "Secure" in cookie and "SameSite=Strict" in cookie
        status, _, _ = await fetch(f"{base(s)}/metrics", anonymous,
                                        headers={"Cookie": f"{name}={token}"})
        assert status == 200
        status, _, _ = await fetch(f"{base(s)}/metrics", anonymous,  # another port's name
                                   headers={"Cookie": f"{TOKEN_COOKIE}_1={token}"})
        assert status == 403
        status, _, text = await fetch(f"{base(s)}/metrics", anonymous,
                                           headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and "cluster_scheduler_workers" in text
        # Plain HTTP to the HTTPS port: refused.
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            await fetch(page.replace("https://", "http://"))
        # Holders of the cluster's client certificate (a Prometheus scraper) need no token.
        status, _, text = await fetch(f"{base(s)}/metrics", sec.get_client_context("client"))
        assert status == 200 and "cluster_scheduler_workers" in text
        # The cluster's own connections still demand a certificate.
        assert sec.get_server_context("scheduler").verify_mode == ssl.CERT_REQUIRED


def _cookie_of(url: str, context: ssl.SSLContext) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as r:
        assert r.status == 200
        return r.headers.get("Set-Cookie", "")


@gen_test(timeout=60)
async def test_worker_metrics_and_health():
    async with gen_cluster(nworkers=1, worker_kwargs={"dashboard": True}) as (c, s, (w,)):
        port = w.services["dashboard"]
        assert s.workers[w.address].services["dashboard"] == port
        await c.gather(c.map(slow_inc, range(5)))
        status, _, text = await fetch(f"http://127.0.0.1:{port}/metrics")
        fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
        assert fams["cluster_worker_up"].samples[0].value == 1
        assert fams["cluster_worker_tasks_executed"].samples[0].value == 5
        assert fams["cluster_worker_memory_bytes"].samples[0].value > 0
        assert (await fetch(f"http://127.0.0.1:{port}/health"))[:3:2] == (200, "ok\n")
        info = json.loads((await fetch(f"http://127.0.0.1:{port}/json/worker.json"))[2])
        assert info["executed"] == 5
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@gen_test(timeout=60)
async def test_logs_story_events_and_profile_from_the_client(caplog):
    caplog.set_level("INFO", logger="cluster.runtime")
    async with gen_cluster(worker_kwargs={"profile": True}) as (c, s, workers):
        future = c.submit(spin, 0.3, key="spin-1a2b3c4d5e")
        await future
        logs = await c.get_scheduler_logs()
        assert any("register worker" in msg for level, msg in logs)
        assert all(isinstance(level, str) for level, _ in logs)
        assert len(await c.get_scheduler_logs(n=2)) == 2
        wlogs = await c.get_worker_logs(n=5)
        assert set(wlogs) == {w.address for w in workers}
        one = await c.get_worker_logs(workers=[workers[0].address])
        assert list(one) == [workers[0].address]
        story = await c.story(future)
        assert [(k, fin) for k, _, fin, *_ in story][-1] == ("spin-1a2b3c4d5e", "memory")
        workers[0].log_event("custom", {"n": 1})
        events = await c.get_worker_events("custom")
        assert [m for _, m in events[workers[0].address]] == [{"n": 1}]
        prof = await c.profile()
        assert prof["spin"]["count"] >= 1
        assert any("spin" in fn for fn, _ in prof["spin"]["functions"])


# ----------------------------------------------------------------------------- Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--disable-dev-shm-usage", "--mute-audio"]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CLUSTER_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed (run scripts/browser.sh); CLUSTER_REQUIRE_BROWSER=1")
    pytest.skip("chromium is not installed (scripts/browser.sh installs it)")


async def run_chromium(binary: str, *args: str, timeout: float = 60) -> str:
    """Run headless Chromium with a fresh profile; kill its whole process group after."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc.returncode is None:
                await proc.wait()
    return out.decode(errors="replace")


def observe(dom: str) -> dict:
    """What the page showed: workers, completed tasks, task-stream entries, table rows."""
    import re

    def attr(name: str) -> int:
        m = re.search(rf'{name}="(\d+)"', dom)
        return int(m.group(1)) if m else -1

    return {"workers": attr("data-workers"), "completed": attr("data-completed"),
            "stream": attr("data-seen"), "polls": attr("data-polls"),
            "worker_rows": len(re.findall(r'<tr data-address="', dom)),
            "prefixes": set(re.findall(r'<tr data-prefix="([^"]+)"', dom))}


@pytest.mark.timeout(240)
@gen_test(timeout=220)
async def test_page_in_headless_chromium_shows_workers_and_tasks_updating():
    binary = chromium_binary()
    async with gen_cluster(nworkers=2, nthreads=2, scheduler_kwargs=ON) as (c, s, workers):
        stop = asyncio.Event()

        async def workload():
            i = 0
            while not stop.is_set():
                await c.gather(c.map(slow_inc, range(i, i + 8), delay=0.05))
                i += 8

        task = asyncio.ensure_future(workload())
        try:
            await until(lambda: s.diagnostics.tasks_completed_total >= 8, timeout=30, what="first tasks")
            args = ["--virtual-time-budget=3000", "--dump-dom", s.dashboard_link]
            first = observe(await run_chromium(binary, *args))
            assert first["polls"] >= 1, first
            assert first["workers"] == 2 and first["worker_rows"] == 2, first
            assert first["completed"] >= 8 and first["stream"] >= 8, first
            assert "slow_inc" in first["prefixes"], first
            seen = first["completed"]
            await until(lambda: s.diagnostics.tasks_completed_total > seen + 16, timeout=60,
                        what="more tasks")
            second = observe(await run_chromium(binary, *args))
            assert second["completed"] > first["completed"], (first, second)
            assert second["stream"] > first["stream"], (first, second)
            assert second["worker_rows"] == 2
            if os.environ.get("CLUSTER_DASHBOARD_SCREENSHOT"):
                await run_chromium(binary, "--window-size=1300,1000",
                                   "--virtual-time-budget=6000",
                                   f"--screenshot={os.environ['CLUSTER_DASHBOARD_SCREENSHOT']}",
                                   s.dashboard_link)
        finally:
            stop.set()
            await task


# ----------------------------------------------------------------------------- progress bars


def test_progress_in_a_terminal_redraws_in_place_and_finishes():
    import pty

    from cluster import LocalCluster, progress

    master, slave = pty.openpty()
    try:
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                          dashboard_address=None) as cluster, Client(cluster) as c:
            futures = c.map(slow_inc, range(20), delay=0.05)
            with open(slave, "w", closefd=False) as tty:
                assert tty.isatty()
                assert progress(futures, multi=True, file=tty, interval=0.02) is None
            assert all(f.done() for f in futures)
        out = b""
        while True:  # everything written is already in the pty's buffer
            import select

            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                break
            out += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    text = out.decode()
    assert text.count("\r") >= 2  # redrawn in place
    assert "100% Completed" in text and "slow_inc 20/20" in text
    assert text.rstrip().endswith("s | slow_inc 20/20")


def test_progress_to_a_captured_stream_writes_one_final_line(capsys):
    import io

    from cluster import LocalCluster, progress

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        futures = c.map(slow_inc, range(5))
        buf = io.StringIO()
        c.progress(futures, file=buf, notebook=False)
        assert buf.getvalue().count("\n") == 1 and "100% Completed" in buf.getvalue()
        progress({"a": futures[0]}, [futures[1:]])  # to stderr by default
        assert "100% Completed" in capsys.readouterr().err
        with pytest.raises(TypeError, match="progress"):
            progress(42)


@gen_test(timeout=60)
async def test_progress_with_an_asynchronous_client_is_awaitable():
    import io

    from cluster import progress

    async with gen_cluster() as (c, s, workers):
        futures = c.map(slow_inc, range(5))
        buf = io.StringIO()
        await progress(futures, file=buf)
        assert "100% Completed" in buf.getvalue()


@pytest.mark.timeout(120)
@gen_test(timeout=100)
async def test_tls_page_opens_in_chromium_from_its_link_alone():
    """With TLS on, the link (``...?token=``) is all a browser needs: the page loads, gets
    its cookie, and its own polls (which carry no token) are served.  Without the token
    the browser gets the 403 text, not the page."""
    binary = chromium_binary()
    sec = Security.temporary()
    async with Scheduler(security=sec, dashboard_address="127.0.0.1:0") as s:
        # The cluster's CA is not one the browser trusts: accept its certificate.
        args = ["--ignore-certificate-errors", "--virtual-time-budget=3000", "--dump-dom"]
        seen = observe(await run_chromium(binary, *args, s.dashboard_link))
        assert seen["polls"] >= 2 and seen["workers"] == 0, seen
        refused = await run_chromium(binary, *args, s.dashboard_link.split("?", 1)[0])
        assert "access token" in refused and "data-polls" not in refused


class WebDriver:
    """A headless Chromium driven through chromedriver's WebDriver HTTP API (loopback only).

    One browser, one profile, several page loads: what a user does with tabs
    of several clusters.  ``close()`` ends the session and kills chromedriver's
    whole process group (the browser included).
    """

    def __init__(self, binary: str, profile: str):
        driver = shutil.which("chromedriver")
        if driver is None:
            if os.environ.get("CLUSTER_REQUIRE_BROWSER") == "1":
                pytest.fail("chromedriver is not installed (run scripts/browser.sh); "
                            "CLUSTER_REQUIRE_BROWSER=1")
            pytest.skip("chromedriver is not installed (scripts/browser.sh installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([driver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.session = ""
        try:
            until_sync(self._ready, timeout=30, interval=0.1, what="chromedriver to listen")
            caps = {"browserName": "chrome", "acceptInsecureCerts": True,
                    "goog:chromeOptions": {"binary": binary,
                                           "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}}
            self.session = self.call("POST", "/session",
                                     {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        try:
            return bool(self.call("GET", "/status")["ready"])
        except OSError:
            return False

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read()[:500]!r}") from None

    def open(self, url: str) -> None:
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def dom(self) -> str:
        return self.call("POST", f"/session/{self.session}/execute/sync",
                         {"script": "return document.documentElement.outerHTML", "args": []})

    def cookies(self) -> set[str]:
        return {c["name"] for c in self.call("GET", f"/session/{self.session}/cookie")}

    def close(self) -> None:
        try:
            if self.session:
                self.call("DELETE", f"/session/{self.session}")
        except (OSError, AssertionError):
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


@pytest.mark.timeout(180)
@gen_test(timeout=160)
async def test_two_clusters_pages_side_by_side_in_one_browser():
    """Two TLS schedulers on one host, one browser: each link sets its own cookie (named per
    port), so after opening the second cluster's page the first one's still loads without
    its token, and both keep polling.  (With one cookie name for all, the second link's
    cookie replaced the first and locked the browser out of the first cluster.)"""
    binary = chromium_binary()
    loop = asyncio.get_running_loop()

    def run(fn, *args):
        return loop.run_in_executor(None, fn, *args)

    async def polls_of(driver: WebDriver, url: str) -> dict:
        await run(driver.open, url)
        deadline = time.monotonic() + 30
        while True:  # bounded: the page polls every 500 ms
            seen = observe(await run(driver.dom))
            if seen["polls"] >= 2 or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(0.2)

    async with Scheduler(security=Security.temporary(), dashboard_address="127.0.0.1:0") as a, \
            Scheduler(security=Security.temporary(), dashboard_address="127.0.0.1:0") as b:
        assert a.http_server.cookie_name != b.http_server.cookie_name
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            driver = await run(WebDriver, binary, profile)
            try:
                for s in (a, b):  # each from its link (with the token)
                    assert (await polls_of(driver, s.dashboard_link))["polls"] >= 2
                assert {a.http_server.cookie_name, b.http_server.cookie_name} <= await run(
                    driver.cookies)
                for s in (a, b):  # and again without: each page's own cookie is still there
                    seen = await polls_of(driver, s.dashboard_link.split("?", 1)[0])
                    assert seen["polls"] >= 2, (s.dashboard_link, seen)
                # A third page without a cookie of its own is still refused.
                async with Scheduler(security=Security.temporary(),
                                     dashboard_address="127.0.0.1:0") as c:
                    await run(driver.open, c.dashboard_link.split("?", 1)[0])
                    assert "access token" in await run(driver.dom)
            finally:
                await run(driver.close)
