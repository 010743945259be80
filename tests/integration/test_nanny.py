"""Nanny: a worker in a child process, restarted when it dies or outgrows its memory.

Real processes on 127.0.0.1: a Scheduler runs in the test's event loop, each
Nanny starts ``python -m cluster.runtime.worker.process`` children.  Waiting is done
by polling with ``until`` (with a deadline), never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

import psutil
import pytest
from cluster.runtime import Client, KilledWorker, Scheduler, Worker, get_worker
from cluster.runtime.core import ConnectionPool, Status
from cluster.runtime.nanny import Nanny
from cluster.runtime.process import RESTART_EXIT_CODE, WorkerProcessError
from cluster.runtime.utils import format_bytes

from tests.helpers import gen_test, until, until_sync

pytestmark = pytest.mark.timeout(60)

MB = 10**6


# ----------------------------------------------------------------------------- tasks (imported by reference)


def getpid(_=None) -> int:
    return os.getpid()


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def inc(x: int) -> int:
    return x + 1


def die() -> None:
    os._exit(1)


def pid_when_file_exists(path: str, limit: float = 30.0) -> int:
    """Block (inside the task) until ``path`` exists; return the worker's pid."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)  # polling a file with a deadline, inside the task
    return os.getpid()


def worker_class_name() -> str:
    return type(get_worker()).__name__


class TaggedWorker(Worker):
    """Defined at module level: the worker process imports it by name."""


def hog(nbytes: int, hold: float) -> int:
    """Allocate ``nbytes`` (touching every page) and hold them for ``hold`` seconds."""
    buf = bytearray(nbytes)
    time.sleep(hold)  # the task's work: hold the memory while the nanny watches
    return len(buf)


# ----------------------------------------------------------------------------- helpers


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def our_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if alive(p.pid)]


def worker_named(s: Scheduler, name):
    return next((ws for ws in s.workers.values() if ws.name == name), None)


def registered(s: Scheduler, nanny: Nanny, other_than_pid: int | None = None) -> bool:
    """The nanny's current worker is registered (and is not the process ``other_than_pid``)."""
    ws = worker_named(s, nanny.name)
    return (ws is not None and ws.address == nanny.worker_address and ws.pid == nanny.pid
            and ws.nanny == nanny.address and nanny.pid != other_than_pid)


# ----------------------------------------------------------------------------- tests


@gen_test(timeout=30)
async def test_worker_runs_in_child_process_with_env(tmp_path):
    sched_file = str(tmp_path / "scheduler.json")
    async with Scheduler(validate=True, scheduler_file=sched_file) as s:
        async with Nanny(scheduler_file=sched_file, nthreads=2, name="n0", security=False,
                         env={"MY_VAR": "x"}) as nanny:
            assert nanny.status == Status.running
            assert nanny.address.startswith("tcp://127.0.0.1:")
            assert nanny.worker_address.startswith("tcp://127.0.0.1:")
            assert nanny.worker_address != nanny.address
            ws = s.workers[nanny.worker_address]
            assert ws.name == "n0" and ws.nanny == nanny.address and ws.nthreads == 2
            pid = nanny.pid
            assert pid != os.getpid() and ws.pid == pid == nanny.process.pid
            assert psutil.Process(pid).ppid() == os.getpid()
            local_dir = nanny.local_directory
            assert os.path.isdir(local_dir)
            assert "MY_VAR" not in os.environ

            async with Client(s.address, asynchronous=True) as c:
                assert await c.submit(getpid) == pid
                assert await c.submit(getenv, "MY_VAR") == "x"
                assert await c.submit(inc, 41) == 42
        assert nanny.status == Status.closed
        await asyncio.wait_for(nanny.finished(), 1)
        assert not alive(pid)
        assert nanny.worker_address is None
        await until(lambda: not s.workers, timeout=5, what="scheduler to forget the worker")
        assert not os.path.exists(local_dir)  # the worker cleaned up as it closed


@gen_test(timeout=30)
async def test_close_and_finished():
    async with Scheduler(validate=True) as s:
        nanny = await Nanny(s.address, nthreads=1, name="c0")
        assert await nanny is nanny  # awaiting again is harmless
        pid = nanny.pid
        finished = asyncio.ensure_future(nanny.finished())
        try:
            async with Client(s.address, asynchronous=True) as c:
                # A task is still running when we close: the worker is stopped anyway.
                busy = c.submit(pid_when_file_exists, "/nonexistent/never", 60)
                await until(lambda: any(ws.processing for ws in s.workers.values()), timeout=5,
                            what="the task to start")
                assert not finished.done()
                t0 = time.monotonic()
                assert await nanny.close(timeout=1) == "OK"
                # stdin EOF, then SIGTERM after 1 s, SIGKILL 2 s later at the latest
                assert time.monotonic() - t0 < 6
                assert not busy.done()  # back to waiting for a worker, not lost
        finally:
            await nanny.close()
        await asyncio.wait_for(finished, 1)
        assert nanny.status == Status.closed
        assert not alive(pid)
        assert our_children() == []
        assert await nanny.close() == "OK"  # idempotent


@gen_test(timeout=40)
async def test_sigkill_worker_is_replaced_and_its_task_rescheduled(tmp_path):
    flag = str(tmp_path / "go")
    async with Scheduler(validate=True, worker_ttl="60s") as s:
        async with Nanny(s.address, nthreads=1, name="k0") as nanny, \
                Client(s.address, asynchronous=True) as c:
            old_pid, old_addr = nanny.pid, nanny.worker_address
            fut = c.submit(pid_when_file_exists, flag)
            await until(lambda: s.workers[old_addr].processing, timeout=5, what="the task to start")

            t0 = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            # Much faster than the 60 s worker_ttl: the scheduler learns at once.
            await until(lambda: old_addr not in s.workers, timeout=3, what="the dead worker to go")
            assert time.monotonic() - t0 < 3
            await until(lambda: registered(s, nanny, other_than_pid=old_pid), timeout=15,
                        what="a new worker with the same name")
            assert nanny.worker_address != old_addr
            assert [ws.name for ws in s.workers.values()] == ["k0"]
            assert not alive(old_pid)

            open(flag, "w").close()
            # The task that was running on the dead worker ran again on the new one.
            assert await fut == nanny.pid
            assert await c.submit(getpid, pure=False) == nanny.pid
            assert await c.submit(inc, 1) == 2


@gen_test(timeout=40)
async def test_task_killing_its_worker_ends_in_killed_worker():
    # Resources, unlike worker names (resolved to addresses when a task is
    # submitted), still match the restarted worker at its new address.
    async with Scheduler(validate=True, allowed_failures=1) as s:
        a, b = await asyncio.gather(
            Nanny(s.address, nthreads=1, name="a", resources={"DOOMED": 1}),
            Nanny(s.address, nthreads=1, name="b", resources={"SAFE": 1}))
        try:
            async with Client(s.address, asynchronous=True) as c:
                first_pid, b_pid = a.pid, b.pid
                assert await c.submit(getpid, resources={"DOOMED": 1}) == first_pid
                killer = c.submit(die, resources={"DOOMED": 1})
                normal = c.submit(pid_when_file_exists, "/", resources={"SAFE": 1})
                with pytest.raises(KilledWorker) as info:
                    await killer
                assert info.value.task == killer.key
                assert info.value.allowed_failures == 1
                assert await normal == b_pid
                # "a" was restarted after each of the two deaths and works again.
                await until(lambda: registered(s, a, other_than_pid=first_pid), timeout=15,
                            what="worker 'a' to come back")
                assert not alive(first_pid)
                assert await c.submit(getpid, resources={"DOOMED": 1}, pure=False) == a.pid
                assert b.pid == b_pid
                assert sorted(ws.name for ws in s.workers.values()) == ["a", "b"]
        finally:
            await asyncio.gather(a.close(), b.close())


@gen_test(timeout=40)
async def test_memory_limit_terminates_and_restarts_worker(caplog):
    caplog.set_level(logging.WARNING, logger="cluster.runtime.nanny")
    async with Scheduler(validate=True, allowed_failures=1) as s:
        async with Nanny(s.address, nthreads=1, name="mem", memory_limit="200MB",
                         memory_monitor_interval="50ms") as nanny, \
                Client(s.address, asynchronous=True) as c:
            assert nanny.memory_limit == 200 * MB
            assert s.workers[nanny.worker_address].memory_limit == 200 * MB
            assert await nanny.memory_monitor() == "OK"  # an idle worker is well below
            first_pid = nanny.pid
            pids = {first_pid}

            def note_pid() -> bool:
                if nanny.pid is not None:
                    pids.add(nanny.pid)
                return len(pids) >= 3

            fut = c.submit(hog, 400 * MB, 30)
            with pytest.raises(KilledWorker):
                await fut
            # Killed twice (allowed_failures=1), so the worker was restarted twice.
            await until(lambda: note_pid() and registered(s, nanny, other_than_pid=first_pid),
                        timeout=15, what="the worker to be restarted")
            assert not alive(first_pid)
            warnings = [r.getMessage() for r in caplog.records
                        if r.name == "cluster.runtime.nanny" and "memory" in r.getMessage()]
            assert len(warnings) == 2, warnings
            assert "'mem'" in warnings[0] and format_bytes(200 * MB) in warnings[0], warnings[0]
            assert await c.submit(inc, 1) == 2
            assert await c.submit(getpid, pure=False) == nanny.pid


@gen_test(timeout=50)
async def test_memory_monitor_keeps_enforcing_the_limit_without_free_descriptors(caplog):
    """With every descriptor of the process taken (as a connection flood against a scheduler
    in the same process did), the monitor still reads the worker's memory and stops it, and
    logs no traceback per interval."""
    import errno
    import resource

    caplog.set_level(logging.DEBUG, logger="cluster.runtime.nanny")
    async with Scheduler(validate=True) as s:
        async with Nanny(s.address, nthreads=1, name="fds", memory_limit="2GB",
                         memory_monitor_interval="20ms") as nanny:
            nanny.auto_restart = False
            wp = nanny.process
            await until(lambda: nanny._statm is not None, what="the monitor's first check")
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            taken: list[int] = []
            try:
                highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))

                def take_all() -> None:
                    """Take every free descriptor, as a flood does (bounded by the limit)."""
                    for _ in range(highest + 16):
                        try:
                            taken.append(os.open(os.devnull, os.O_RDONLY))
                        except OSError as e:
                            assert e.errno == errno.EMFILE
                            return

                take_all()
                with pytest.raises(OSError):
                    os.close(os.open(os.devnull, os.O_RDONLY))  # truly out of descriptors
                nanny.memory_limit = 10 * MB  # the idle worker is far above 95% of this now
                await until(lambda: take_all() or not wp.is_alive(), timeout=30,
                            what="the worker to be stopped for its memory")
            finally:
                for fd in taken:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert nanny._memory_victim is wp
    records = [r for r in caplog.records if r.name == "cluster.runtime.nanny"]
    assert any("exceeded its memory budget" in r.getMessage() for r in records)
    assert not [r.getMessage() for r in records if r.exc_info], "tracebacks were logged"


@gen_test(timeout=40)
async def test_restart_kill_instantiate_and_rpc():
    async with Scheduler(validate=True) as s:
        async with Nanny(s.address, nthreads=1, name="r") as nanny:
            pid0, addr0 = nanny.pid, nanny.worker_address

            assert await nanny.restart(timeout=20) == "OK"
            pid1 = nanny.pid
            assert pid1 != pid0 and not alive(pid0)
            assert registered(s, nanny) and addr0 not in s.workers

            killed = nanny.process
            assert await nanny.kill() == "OK"
            # kill() returns once the process is gone and the scheduler knows.
            assert not alive(pid1) and not killed.is_alive()
            assert nanny.worker_address is None and not s.workers
            pool = ConnectionPool()
            try:
                # A round trip over the network, then: still no worker (not restarted).
                identity = await pool.call(nanny.address, "identity")
                assert identity["type"] == "Nanny" and identity["worker"] is None
                assert nanny.process is killed and our_children() == []

                assert await nanny.instantiate() == "running"
                pid2 = nanny.pid
                assert pid2 not in (pid0, pid1) and registered(s, nanny)
                assert await nanny.instantiate() == "running"  # already running: no-op
                assert nanny.pid == pid2

                # The scheduler reaches the nanny through ws.nanny.
                reply = await s.broadcast(msg={"op": "restart", "timeout": 20}, nanny=True)
                assert list(reply.values()) == ["OK"]
                assert nanny.pid not in (pid0, pid1, pid2) and not alive(pid2)
                assert registered(s, nanny)
                assert await pool.call(nanny.address, "memory_monitor") == "OK"
            finally:
                await pool.close()
            async with Client(s.address, asynchronous=True) as c:
                assert await c.submit(getpid) == nanny.pid
        assert our_children() == []


@gen_test(timeout=30)
async def test_worker_class_and_fixed_listen_address():
    with socket.socket() as sock:  # a free port for the worker
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    async with Scheduler(validate=True) as s:
        async with Nanny(s.address, nthreads=1, name="t0", worker_class=TaggedWorker,
                         listen_address=address) as nanny, \
                Client(s.address, asynchronous=True) as c:
            assert nanny.worker_address == address and address in s.workers
            assert await c.submit(worker_class_name) == "TaggedWorker"
            pid = nanny.pid
            # Same address after a restart: the old worker is unregistered first.
            assert await nanny.restart(timeout=20) == "OK"
            assert nanny.pid != pid and nanny.worker_address == address
            assert registered(s, nanny)
            assert await c.submit(getpid, pure=False) == nanny.pid


@gen_test(timeout=30)
async def test_close_gracefully_does_not_restart():
    async with Scheduler(validate=True) as s:
        nanny = await Nanny(s.address, nthreads=1, name="g")
        try:
            assert nanny.close_gracefully() == "OK"
            pid, addr = nanny.pid, nanny.worker_address
            os.kill(pid, signal.SIGKILL)
            # The worker is not replaced: the nanny closes itself instead.
            await asyncio.wait_for(nanny.finished(), 10)
            assert nanny.status == Status.closed
            assert nanny.pid == pid and not alive(pid)
            await until(lambda: addr not in s.workers, timeout=5, what="the scheduler to drop it")
            assert not s.workers and our_children() == []
        finally:
            await nanny.close()


@gen_test(timeout=30)
async def test_worker_closed_by_scheduler_closes_its_nanny():
    s = await Scheduler(validate=True)
    try:
        nanny = await Nanny(s.address, nthreads=1, name="s0")
        pid = nanny.pid
        # The scheduler shuts the cluster down: the worker exits cleanly and is
        # not restarted (a restart could not even register); the nanny closes.
        await s.close(close_workers=True)
        await asyncio.wait_for(nanny.finished(), 10)
        assert nanny.status == Status.closed
        assert nanny.pid == pid and not alive(pid) and our_children() == []
        assert nanny.process.returncode == 0  # a clean exit, not a crash
    finally:
        await s.close()
        await nanny.close()


@gen_test(timeout=30)
async def test_lifetime_restart_restarts_a_cleanly_closed_worker():
    async with Scheduler(validate=True) as s:
        async with Nanny(s.address, nthreads=1, name="l0", lifetime="300ms",
                         lifetime_restart=True) as nanny:
            pid, first = nanny.pid, nanny.process
            await until(lambda: registered(s, nanny, other_than_pid=pid), timeout=15,
                        what="the worker to be restarted after its lifetime")
            assert nanny.status == Status.running
            assert not alive(pid)
            assert first.returncode == RESTART_EXIT_CODE  # it asked for a fresh worker


@gen_test(timeout=30)
async def test_worker_that_cannot_start_fails_the_nanny(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    async with Scheduler(validate=True) as s:
        nanny = Nanny(s.address, nthreads=1, name="bad", local_directory=str(not_a_dir),
                      death_timeout="10s")
        with pytest.raises(WorkerProcessError, match="failed to start"):
            await nanny
        assert nanny.status == Status.closed
        assert not alive(nanny.pid) and our_children() == []
        assert not s.workers


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "scheduler"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "bogus_option": 1}, TypeError, "bogus_option"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "nanny": "x"}, TypeError, "nanny"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "nthreads": -1}, ValueError, "nthreads"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "memory_limit": "lots"}, ValueError, "memory_limit"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "memory_terminate_fraction": -0.5}, ValueError,
     "memory_terminate_fraction"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "memory_monitor_interval": 0}, ValueError,
     "memory_monitor_interval"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "protocol": "inproc"}, ValueError, "protocol"),
    ({"scheduler_ip": "inproc://abc"}, ValueError, "tcp"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "security": True}, ValueError, "security"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "resources": {"GPU": object()}}, TypeError, "JSON"),
    ({"scheduler_ip": "tcp://127.0.0.1:1", "worker_class": dict}, ValueError, "worker_class"),
])
def test_bad_options_are_rejected_before_anything_starts(kwargs, error, match):
    with pytest.raises(error, match=match):
        Nanny(**kwargs)


def _slow_inc(x):
    time.sleep(0.01)
    return x + 1


@gen_test(timeout=90)
async def test_lifetime_restart_churn_loses_no_results():
    """Workers that keep reaching their lifetime under a steady stream of tasks: every
    result is computed once -- a retiring worker hands its data to the others or to its
    own replacement, even when it is the only worker left running."""
    async with Scheduler(validate=True) as s:
        async with Nanny(s.address, nthreads=1, name="c0", lifetime="1.5s", lifetime_stagger="0.5s",
                         lifetime_restart=True), \
                Nanny(s.address, nthreads=1, name="c1", lifetime="1.5s", lifetime_stagger="0.5s",
                      lifetime_restart=True):
            async with Client(s.address, asynchronous=True) as c:
                futures = []
                for i in range(40):
                    futures.append(c.submit(_slow_inc, i, key=f"churn-{i}"))
                    if i % 10 == 9:
                        # Let every worker that holds results so far reach its lifetime.
                        await until(lambda: all(f.done() for f in futures), timeout=20,
                                    what="a batch to finish")
                        holders = set(s.workers)
                        await until(lambda held=holders: not held & set(s.workers) and len(s.workers) == 2,
                                    timeout=30, what="both workers to be replaced")
                total = await asyncio.wait_for(c.submit(sum, futures), 60)
                assert total == sum(range(1, 41))
                for f in futures:
                    computed = [e for e in s.story(f.key) if e[0] == f.key and e[1:3] == ("processing", "memory")]
                    assert len(computed) == 1, (f.key, computed)


# ----------------------------------------------------------------------------- pre-warmed worker processes


@pytest.fixture
def no_warm_child():
    from cluster.runtime import process

    process.discard_warm()
    yield process
    process.discard_warm()


@gen_test(timeout=60)
async def test_prewarmed_child_is_used_by_the_next_nanny_with_tls(no_warm_child):
    """The nanny's worker is the pre-warmed interpreter; the credentials reach it through
    its stdin pipe, never its command line or environment."""
    from cluster.runtime.security import Security

    process = no_warm_child
    security = Security.temporary()
    pid = process.prewarm()
    assert pid is not None and alive(pid)
    secrets = [v.encode() for v in security.to_dict().values()
               if isinstance(v, str) and len(v) > 40]
    assert secrets
    async with Scheduler(host="127.0.0.1", security=security) as s:
        async with Nanny(s.address, nthreads=1, name="warm", security=security) as nanny:
            assert nanny.pid == pid and process._warm is None
            assert nanny.worker_address.startswith("tls://")
            for what in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    data = f.read()
                assert not any(secret in data for secret in secrets), what
            async with Client(s.address, asynchronous=True, security=security) as c:
                assert await c.submit(getpid) == pid
                assert await c.submit(inc, 1) == 2
            # A restart starts a fresh child (nothing warm is left).
            nanny.process.kill()
            await until(lambda: nanny.pid not in (None, pid) and nanny.worker_address,
                        timeout=30, what="a fresh worker")
        assert not alive(pid)


@gen_test(timeout=30)
async def test_prewarmed_child_with_another_environment_is_not_used(no_warm_child):
    process = no_warm_child
    pid = process.prewarm({**process.child_environment(), "WARM_ONLY": "1"})
    async with Scheduler(validate=True) as s:
        async with Nanny(s.address, nthreads=1, name="cold") as nanny:
            assert nanny.pid != pid
            async with Client(s.address, asynchronous=True) as c:
                assert await c.submit(getenv, "WARM_ONLY") is None
    assert process._warm is not None and process._warm.pid == pid
    process.discard_warm()
    assert not alive(pid)


def test_unused_prewarmed_child_exits_when_its_parent_dies(tmp_path):
    """No orphan: the warm child reads end-of-file on stdin when its parent is gone."""
    import subprocess
    import sys

    code = ("import sys, time; from cluster.runtime.process import prewarm; "
            "print(prewarm(), flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        pid = int(parent.stdout.readline())
        assert alive(pid)

        def waiting_on_its_pipe() -> bool:  # imports done, blocked in read(stdin)
            try:
                with open(f"/proc/{pid}/wchan") as f:
                    return "pipe" in f.read()
            except OSError:
                return False

        until_sync(waiting_on_its_pipe, timeout=20, what="the warm child to wait for its options")
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval of the deadline loop
    assert not alive(pid)


def test_unused_prewarmed_child_is_reaped_by_discard(no_warm_child):
    process = no_warm_child
    pid = process.prewarm()
    assert process.prewarm() == pid  # one at a time
    process.discard_warm()
    assert not alive(pid)


@gen_test(timeout=90)
async def test_lifetime_restart_of_three_workers_retiring_together_never_hangs():
    """Issue 15: 3 workers with --lifetime 1s --lifetime-stagger 0.5s --lifetime-restart used
    to hang ~1 run in 5 (all retiring at once, each refused: its peers were retiring too).
    They now retire in turn; 20 rounds of all three being replaced, data kept throughout."""
    async with Scheduler(validate=True) as s:
        nannies = [Nanny(s.address, nthreads=1, name=f"l{i}", lifetime="1s",
                         lifetime_stagger="0.5s", lifetime_restart=True) for i in range(3)]
        await asyncio.gather(*nannies)
        try:
            async with Client(s.address, asynchronous=True) as c:
                held = c.map(_slow_inc, range(6), key=[f"held-{i}" for i in range(6)])
                await asyncio.wait_for(c.gather(held), 30)
                for round_ in range(20):
                    before = set(s.workers)
                    await until(lambda b=before: len(s.workers) == 3 and not b & set(s.workers),
                                timeout=15, what=f"round {round_}: all 3 workers replaced")
                assert await asyncio.wait_for(c.gather(held), 30) == list(range(1, 7))
        finally:
            await asyncio.gather(*(n.close() for n in nannies))
