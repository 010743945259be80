"""Plugins, preloads, blocked handlers and the Worker options that used to be ignored
(issue 13): ``client.register_plugin`` for worker, scheduler and nanny plugins,
``Worker(plugins=, preload=, executor=, metrics=, extensions=, contact_address=)``,
``Scheduler(preload=)``, ``LocalCluster(blocked_handlers=)``, ``Future.traceback()``.

Most run a validating scheduler and in-process workers on 127.0.0.1
(``gen_cluster``); the dask.distributed snippets (nanny plugins, preloads in
worker processes, blocked handlers) also run against worker processes.
Waiting is done with ``until``, never with sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import textwrap
import threading
import traceback
import types
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest
from cluster.runtime.errors import UnsafePathError
from cluster.runtime.plugins import BlockedHandlerError

import cluster
from cluster import (
    Client,
    LocalCluster,
    NannyPlugin,
    Scheduler,
    SchedulerPlugin,
    Worker,
    WorkerPlugin,
)
from tests.helpers import gen_cluster, gen_test, until, until_sync

pytestmark = pytest.mark.timeout(120)


def inc(x):
    return x + 1


def div_zero(x):
    return x / 0


# ----------------------------------------------------------------------------- worker plugins

#: (hook, worker address, tag, extra): what the plugins below saw.
CALLS: list = []


class Recorder(WorkerPlugin):
    name = "recorder"

    def __init__(self, tag="a"):
        self.tag = tag

    def setup(self, worker):
        CALLS.append(("setup", worker.address, self.tag, None))

    def teardown(self, worker):
        CALLS.append(("teardown", worker.address, self.tag, None))

    def transition(self, key, start, finish, **kwargs):
        CALLS.append(("transition", key, start, finish))


class FailingSetup(WorkerPlugin):
    name = "failing"

    def setup(self, worker):
        raise RuntimeError("setup refused on purpose")


class DuckPlugin:
    def setup(self, worker):
        pass


@gen_test(timeout=30)
async def test_register_plugin_worker_plugin_everywhere_with_transitions_and_unregister():
    CALLS.clear()
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        replies = await c.register_plugin(Recorder("a"))
        assert replies == {a.address: {"status": "OK"}, b.address: {"status": "OK"}}
        assert sorted(x[:3] for x in CALLS) == sorted([("setup", a.address, "a"), ("setup", b.address, "a")])
        assert await c.submit(inc, 1, key="inc-1") == 2
        # The worker that ran it heard each step of its task, in order.
        steps = [(start, finish) for h, key, start, finish in CALLS if h == "transition" and key == "inc-1"]
        assert steps[:1] == [("released", "waiting")] and ("executing", "memory") in steps
        # idempotent: an existing plugin of that name stays.
        assert await c.register_plugin(Recorder("b"), idempotent=True) == {}
        assert a.plugins["recorder"].tag == "a"
        # A worker that joins later gets it too.
        late = Worker(s.address, nthreads=1, validate=True, name="late")
        try:
            await late
            await until(lambda: ("setup", late.address, "a", None) in CALLS, what="setup on the late worker")
        finally:
            await late.close()
        await c.unregister_worker_plugin("recorder")
        assert ("teardown", a.address, "a", None) in CALLS and not a.plugins
        with pytest.raises(ValueError, match="does not exist"):
            await c.unregister_worker_plugin("recorder")


@gen_test(timeout=30)
async def test_register_plugin_refuses_duck_types_and_old_names_warn():
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        with pytest.raises(TypeError, match="WorkerPlugin, SchedulerPlugin or NannyPlugin"):
            await c.register_plugin(DuckPlugin())
        with pytest.warns(DeprecationWarning, match="register_plugin"):
            replies = await c.register_worker_plugin(DuckPlugin(), name="duck")
        assert replies == {a.address: {"status": "OK"}} and "duck" in a.plugins
        # A setup that fails reaches the client as its own exception.
        with pytest.raises(RuntimeError, match="setup refused on purpose"):
            await c.register_plugin(FailingSetup())


@gen_test(timeout=30)
async def test_worker_plugins_option_set_up_once_registered_and_torn_down_at_close():
    CALLS.clear()
    async with Scheduler(dashboard_address=None, validate=True) as s:
        w = Worker(s.address, nthreads=1, plugins=[Recorder("ctor")])
        assert not w.plugins  # nothing runs before the worker starts
        async with w:
            assert ("setup", w.address, "ctor", None) in CALLS
            assert list(w.plugins) == ["recorder"]
            assert s.workers[w.address].name == w.name
        assert ("teardown", w.address, "ctor", None) in CALLS
    with pytest.raises(TypeError, match="plugins"):
        Worker("tcp://127.0.0.1:1", plugins=[object()])


# ----------------------------------------------------------------------------- scheduler plugins


class SchedulerRecorder(SchedulerPlugin):
    name = "sched-recorder"

    def __init__(self):
        self.events = []

    async def start(self, scheduler):
        self.events.append("start")
        scheduler.recorder = self

    def add_worker(self, scheduler, worker):
        self.events.append(("add_worker", worker))

    def update_graph(self, scheduler, client, keys, **kwargs):
        self.events.append(("update_graph", tuple(keys)))

    def transition(self, key, start, finish, *args, **kwargs):
        self.events.append(("transition", key, finish))

    async def before_close(self):
        self.events.append("before_close")


@gen_test(timeout=30)
async def test_register_plugin_scheduler_plugin_hooks_and_unregister():
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        assert await c.register_plugin(SchedulerRecorder()) == "OK"
        plugin = s.recorder
        assert plugin.events == ["start"] and s.plugins["sched-recorder"] is plugin
        assert await c.submit(inc, 1, key="sp-1") == 2
        assert ("update_graph", ("sp-1",)) in plugin.events
        await until(lambda: ("transition", "sp-1", "memory") in plugin.events, what="the memory transition")
        await c.unregister_scheduler_plugin("sched-recorder")
        assert "sched-recorder" not in s.plugins
    plugin = SchedulerRecorder()
    async with Scheduler(dashboard_address=None) as s:
        s.add_plugin(plugin)
    assert plugin.events[-1] == "before_close"


class NewStylePlugin(SchedulerPlugin):
    """Hooks with dask's keyword-only arguments."""

    def __init__(self):
        self.removed = []
        self.graphs = []

    def remove_worker(self, scheduler, worker, *, stimulus_id, **kwargs):
        self.removed.append((worker, stimulus_id))

    def update_graph(self, scheduler, *, client, keys, tasks, stimulus_id, **kwargs):
        self.graphs.append((tuple(keys), tuple(tasks)))


class OldStylePlugin(SchedulerPlugin):
    """Hooks with the arguments of older dask versions, no ``**kwargs``."""

    def __init__(self):
        self.removed = []

    def remove_worker(self, scheduler, worker):
        self.removed.append(worker)


@gen_test(timeout=30)
async def test_scheduler_plugin_hooks_of_old_and_new_signatures():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        new, old = NewStylePlugin(), OldStylePlugin()
        s.add_plugin(new, name="new")
        s.add_plugin(old, name="old")
        assert await c.submit(inc, 1, key="sig-1") == 2
        assert new.graphs == [(("sig-1",), ("sig-1",))]
        await b.close()
        await until(lambda: old.removed == [b.address], what="the old-style hook")
        assert [w for w, _ in new.removed] == [b.address] and isinstance(new.removed[0][1], str)


# ----------------------------------------------------------------------------- nanny plugins


class EnvironPlugin(NannyPlugin):
    """Sets a variable for the worker processes (dask's Environ, in small)."""

    name = "environ"
    restart = True

    def setup(self, nanny):
        nanny.env["PLUGIN_VARIABLE"] = "from-the-nanny-plugin"


def read_variable():
    return os.environ.get("PLUGIN_VARIABLE")


def test_nanny_plugin_restarts_workers_and_reaches_later_nannies():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as lc, Client(lc) as c:
        pids = set(c.run(os.getpid).values())
        replies = c.register_plugin(EnvironPlugin())
        assert len(replies) == 1 and list(replies.values()) == [{"status": "OK"}]
        # restart=True: a fresh worker process, which has the variable.
        assert set(c.run(read_variable).values()) == {"from-the-nanny-plugin"}
        assert not pids & set(c.run(os.getpid).values())
        lc.scale(2)
        c.wait_for_workers(2, timeout=60)
        assert list(c.run(read_variable).values()) == ["from-the-nanny-plugin"] * 2
        c.unregister_worker_plugin("environ", nanny=True)
        assert all(not n.plugins for n in lc.workers.values())


# ----------------------------------------------------------------------------- preloads

PRELOAD_TEXT = """
_info = {}

def dask_setup(server):
    _info["address"] = server.address
    server.preloaded = True
    if hasattr(server, "add_plugin"):  # the scheduler: dask's documented pattern
        from cluster import SchedulerPlugin

        class Preloaded(SchedulerPlugin):
            name = "preloaded"

        server.add_plugin(Preloaded())

def dask_teardown(server):
    _info["teardown"] = True

def get_address():
    return _info["address"]
"""


def _write(path, text, mode=0o644):
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return str(path)


@gen_test(timeout=30)
async def test_preload_file_source_and_module_on_worker_and_scheduler(tmp_path):
    path = _write(tmp_path / "preload_info_a.py", PRELOAD_TEXT)
    try:
        async with Scheduler(dashboard_address=None, preload=PRELOAD_TEXT) as s:
            assert s.preloaded is True
            assert "preloaded" in s.plugins
            module = s.preloads[0].module
            assert module.get_address() == s.address
            async with Worker(s.address, nthreads=1, preload=[path, "tests.helpers"]) as w:
                assert w.preloaded is True
                import preload_info_a  # the file's module, importable on that worker

                assert preload_info_a.get_address() == w.address
            assert preload_info_a._info["teardown"] is True
        assert module._info["teardown"] is True
    finally:
        sys.modules.pop("preload_info_a", None)


def test_preload_refuses_files_others_can_write_links_urls_and_stray_argv(tmp_path):
    loose = _write(tmp_path / "loose.py", PRELOAD_TEXT, mode=0o666)
    with pytest.raises(UnsafePathError, match="can write to it"):
        Worker("tcp://127.0.0.1:1", preload=loose)
    safe = _write(tmp_path / "safe.py", PRELOAD_TEXT)
    link = tmp_path / "link.py"
    link.symlink_to(safe)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        Scheduler(preload=str(link), dashboard_address=None)
    with pytest.raises(ValueError, match="URLs are not accepted"):
        Worker("tcp://127.0.0.1:1", preload="https://example.org/setup.py")
    with pytest.raises(ValueError, match="plain function"):
        Worker("tcp://127.0.0.1:1", preload=PRELOAD_TEXT, preload_argv=["--flag"])
    sys.modules.pop("safe", None)


CLICK_PRELOAD = """
import click

@click.command()
@click.option("--greeting", default="hello")
def dask_setup(worker, greeting):
    worker.greeting = greeting
"""


@gen_test(timeout=30)
async def test_preload_click_command_gets_its_argv():
    pytest.importorskip("click")
    async with Scheduler(dashboard_address=None) as s:
        async with Worker(s.address, nthreads=1, preload=CLICK_PRELOAD,
                          preload_argv=["--greeting", "bonjour"]) as w:
            assert w.greeting == "bonjour"


def check_preloaded_module():
    import preload_info_b

    return preload_info_b.get_address()


def test_preload_in_worker_processes(tmp_path):
    """dask's snippet: ``worker_kwargs={"preload": [path]}``, then tasks import the module."""
    path = _write(tmp_path / "preload_info_b.py", PRELOAD_TEXT)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                      preload=[path]) as lc, Client(lc) as c:
        result = c.run(check_preloaded_module)
        assert result == {addr: addr for addr in result} and len(result) == 1


# ----------------------------------------------------------------------------- blocked handlers


def test_blocked_handlers_refuse_run_and_run_on_scheduler_with_worker_processes():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                      blocked_handlers=["run_function", "run"]) as lc, Client(lc) as c:
        with pytest.raises(BlockedHandlerError, match="'run' handler is blocked"):
            c.run(os.getpid)
        with pytest.raises(BlockedHandlerError, match="'run_function' handler is blocked"):
            c.run_on_scheduler(os.getpid)
        assert c.submit(inc, 1).result() == 2  # everything else works


def test_blocked_handlers_unknown_names_are_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'nope' is not an operation.*run_function"):
        LocalCluster(n_workers=0, blocked_handlers=["nope"], dashboard_address=None)
    with pytest.raises(ValueError, match=r"'run_function' is not an operation.*upload_file"):
        Worker("tcp://127.0.0.1:1", blocked_handlers=["run_function"])
    with pytest.raises(TypeError, match="list of operation names"):
        Scheduler(blocked_handlers="run_function", dashboard_address=None)


@gen_test(timeout=30)
async def test_blocked_stream_opening_refuses_clients():
    async with Scheduler(dashboard_address=None, blocked_handlers=["register_client"]) as s:
        with pytest.raises(BlockedHandlerError, match="register_client"):
            await Client(s.address, asynchronous=True)


# ----------------------------------------------------------------------------- executor, metrics, extensions


def thread_name():
    return threading.current_thread().name


def worker_name():
    return cluster.get_worker().name


@gen_test(timeout=30)
async def test_executor_option_runs_tasks_in_the_given_executor():
    executor = ThreadPoolExecutor(2, thread_name_prefix="users-executor")
    async with gen_cluster(nworkers=1, worker_kwargs={"executor": executor}) as (c, s, (a,)):
        assert (await c.submit(thread_name)).startswith("users-executor")
        assert await c.submit(worker_name) == a.name  # get_worker() works in its threads
    assert executor._shutdown  # shut down with the worker, as dask does
    async with gen_cluster(nworkers=1, worker_kwargs={"executor": "offload"}) as (c, s, (a,)):
        assert "offload" in await c.submit(thread_name)
    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(TypeError, match="ThreadPoolExecutor"):
            Worker("tcp://127.0.0.1:1", executor=pool)
    with pytest.raises(TypeError, match="per task"):
        Worker("tcp://127.0.0.1:1", executor={"default": None, "gpu": None})


@gen_test(timeout=30)
async def test_metrics_option_reaches_scheduler_info():
    async with gen_cluster(nworkers=1, worker_kwargs={"metrics": {"my_port": lambda w: w.port}}) as (c, s, (a,)):
        async def metric():
            info = await c.scheduler_info()
            return info["workers"][a.address]["metrics"].get("my_port")

        deadline = asyncio.get_running_loop().time() + 10
        while await metric() != a.port:
            assert asyncio.get_running_loop().time() < deadline, "no custom metric after 10 s"
            await asyncio.sleep(0.05)  # polling the scheduler, with a deadline
    with pytest.raises(ValueError, match="built-in metric"):
        Worker("tcp://127.0.0.1:1", metrics={"memory": lambda w: 0})


class Extension:
    def __init__(self, worker):
        self.worker = worker
        self.closed = False

    def close(self):
        self.closed = True


@gen_test(timeout=30)
async def test_extensions_and_contact_address():
    async with Scheduler(dashboard_address=None, validate=True) as s:
        port = _free_port()
        async with Worker(s.address, nthreads=1, extensions={"ext": Extension}, port=port,
                          contact_address=f"tcp://localhost:{port}") as w:
            ext = w.extensions["ext"]
            assert ext.worker is w
            assert w.address == f"tcp://localhost:{port}" and f"tcp://localhost:{port}" in s.workers
            async with Client(s.address, asynchronous=True) as c:
                assert await c.submit(inc, 1) == 2  # reached at the address it advertises
        assert ext.closed


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_silence_logs_sets_the_runtime_loggers_level():
    logger = logging.getLogger("cluster.runtime")
    before = logger.level
    try:
        Worker("tcp://127.0.0.1:1", silence_logs="error")
        assert logger.level == logging.ERROR
        with pytest.raises(ValueError, match="silence_logs"):
            Worker("tcp://127.0.0.1:1", silence_logs="loud")
    finally:
        logger.setLevel(before)


# ----------------------------------------------------------------------------- Future.traceback


@gen_test(timeout=30)
async def test_future_traceback_is_a_traceback_object():
    async with gen_cluster(nworkers=1) as (c, s, (a,)):
        f = c.submit(div_zero, 1)
        with pytest.raises(ZeroDivisionError):
            await f
        tb = await f.traceback()
        assert isinstance(tb, types.TracebackType)
        frames = traceback.extract_tb(tb)
        assert frames[-1].name == "div_zero" and frames[-1].filename == __file__
        assert frames[-1].line == "return x / 0"  # the file is here too: the source line shows
        assert await c.submit(inc, 1).traceback() is None


def test_future_traceback_from_worker_processes():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as lc, Client(lc) as c:
        f = c.submit(div_zero, 1)
        until_sync(lambda: f.done(), timeout=30, what="the task to fail")
        text = "".join(traceback.format_tb(f.traceback()))
        assert "in div_zero" in text and "return x / 0" in text
