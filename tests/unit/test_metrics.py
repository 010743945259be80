"""Prometheus text rendering, the HTTP request parser, dashboard addresses, logs and the profiler."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from cluster.runtime.dashboard.logs import EventLog, ServerLog
from cluster.runtime.dashboard.metrics import MetricsWriter
from cluster.runtime.dashboard.profile import Profile, merge_profiles
from cluster.runtime.http import BadRequest, Response, parse_dashboard_address, parse_head, render

parser = pytest.importorskip("prometheus_client.parser")


def test_metrics_parse_with_prometheus_parser():
    m = MetricsWriter("cluster_scheduler")
    m.add("workers", "gauge", "Workers.", 3)
    m.add("tasks", "gauge", "Tasks by state.", {("state", "memory"): 5, ("state", "erred"): 0})
    m.add("tasks_completed_total", "counter", "Done.", 12)
    m.add("odd", "gauge", 'Labels are escaped.', [({"worker": 'a"b\\c\nd'}, 1.5)])
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render())}
    assert families["cluster_scheduler_workers"].type == "gauge"
    assert families["cluster_scheduler_workers"].samples[0].value == 3
    assert families["cluster_scheduler_tasks_completed"].type == "counter"
    assert families["cluster_scheduler_tasks_completed"].samples[0].value == 12
    states = {s.labels["state"]: s.value for s in families["cluster_scheduler_tasks"].samples}
    assert states == {"memory": 5, "erred": 0}
    assert families["cluster_scheduler_odd"].samples[0].labels["worker"] == 'a"b\\c\nd'


def test_parse_head_accepts_get_and_rejects_the_rest():
    r = parse_head(b"GET /json/x.json?since=5&a=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert (r.method, r.path, r.query) == ("GET", "/json/x.json", {"since": "5", "a": "1"})
    assert r.headers["connection"] == "close"
    with pytest.raises(BadRequest) as e:
        parse_head(b"POST / HTTP/1.1\r\n\r\n")
    assert e.value.status == 405
    for bad in (b"GARBAGE\r\n\r\n", b"GET http://x/ HTTP/1.1\r\n\r\n", b"GET / SPDY/3\r\n\r\n",
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
                b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"):
        with pytest.raises(BadRequest) as e:
            parse_head(bad)
        assert e.value.status == 400


def test_render_response():
    raw = render(Response("hi", 404), keep_alive=False)
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Content-Length: 2\r\n" in raw and b"Connection: close\r\n" in raw
    assert raw.endswith(b"\r\n\r\nhi")
    assert render(Response("hi"), head_only=True).endswith(b"\r\n\r\n")


@pytest.mark.parametrize("value, expected", [
    (":8787", ("10.0.0.1", 8787)), ("8787", ("10.0.0.1", 8787)), (0, ("10.0.0.1", 0)),
    ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:9000", ("::1", 9000)),
    ("http://0.0.0.0:80", ("0.0.0.0", 80)), (None, None), (False, None), ("", None),
])
def test_parse_dashboard_address(value, expected):
    assert parse_dashboard_address(value, "10.0.0.1") == expected


@pytest.mark.parametrize("value", [True, ":http", "host:99999", 1.5, ["x"]])
def test_parse_dashboard_address_errors_name_the_option(value):
    with pytest.raises(ValueError, match="dashboard_address"):
        parse_dashboard_address(value, "h")


def test_server_log_is_bounded_and_detaches():
    log = ServerLog(maxlen=3)
    lg = logging.getLogger("cluster.runtime.test_metrics")
    log.attach()
    try:
        for i in range(5):
            lg.warning("message %d", i)
    finally:
        log.detach()
    lg.warning("not kept")
    assert log.get() == [("WARNING", f"cluster.runtime.test_metrics - message {i}") for i in (2, 3, 4)]
    assert log.get(1) == [("WARNING", "cluster.runtime.test_metrics - message 4")]
    assert log.get(0) == []
    assert len(log.get(timestamps=True)[0]) == 3


def test_event_log():
    ev = EventLog(maxlen=2)
    ev.log("a", 1)
    ev.log(["a", "b"], 2)
    assert [m for _, m in ev.get("a")] == [2]
    assert set(ev.get()) == {"a", "b"}


_STOP = threading.Event()


def busy_loop(n):
    while not _STOP.is_set():
        time.sleep(0.001)
    return n


def test_profile_samples_running_tasks_per_prefix():
    from cluster.runtime.comm.serialize import dumps_function
    from cluster.runtime.execution import dumps_args, run_task

    stop = _STOP
    stop.clear()
    spec = (dumps_function(busy_loop), dumps_args((1,), {}))
    t = threading.Thread(target=run_task, args=("busy_loop-1a2b3c4d5e", spec, None))
    t.start()
    try:
        prof = Profile()
        deadline = time.monotonic() + 10
        while not prof.data and time.monotonic() < deadline:
            prof.sample()
    finally:
        stop.set()
        t.join(10)
    summary = prof.summary()
    assert summary["busy_loop"]["count"] >= 1
    assert any("busy_loop" in fn for fn, _ in summary["busy_loop"]["functions"])
    merged = merge_profiles([summary, summary])
    assert merged["busy_loop"]["count"] == 2 * summary["busy_loop"]["count"]
