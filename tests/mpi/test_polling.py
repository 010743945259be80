"""How often the launcher polls: MPI collectives and the end of a worker rank (no MPI needed)."""

from __future__ import annotations

import threading
import time
from contextlib import suppress

from cluster.hpc import mpi
from cluster.hpc.ranks import ClusterOptions, SignalCatcher, serve_worker
from cluster.runtime.errors import CommClosedError
from cluster.runtime.loop import sync

from tests.mpi.test_launcher import FakeJob, _wait_registered, scheduler_on_loop  # noqa: F401


class CountingRequest:
    """An ``MPI.Request`` stand-in that completes at a given time and counts its Test() calls."""

    def __init__(self, complete_at: float):
        self.complete_at = complete_at
        self.tests: list[float] = []

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        now = time.monotonic()
        self.tests.append(now)
        return now >= self.complete_at


def test_wait_request_polls_every_few_ms_at_first():
    request = CountingRequest(time.monotonic() + 0.5)
    assert mpi.wait_request(request, 10)
    gaps = [b - a for a, b in zip(request.tests, request.tests[1:], strict=False)]
    # The last polls came at most FAST_POLL_DELAY apart (plus the scheduler's slack).
    assert max(gaps[-5:]) < mpi.FAST_POLL_DELAY + 0.02
    assert request.tests[-1] - request.complete_at < mpi.FAST_POLL_DELAY + 0.02


def test_wait_request_slows_down_in_long_waits(monkeypatch):
    monkeypatch.setattr(mpi, "FAST_POLL_PERIOD", 0.1)
    request = CountingRequest(time.monotonic() + 1.0)
    assert mpi.wait_request(request, 10)
    late = [t for t in request.tests if t > request.tests[0] + 0.5]
    # ~every SLOW_POLL_DELAY after the fast period, not every few ms
    assert len(late) < 0.5 / mpi.SLOW_POLL_DELAY * 2 + 2


def test_wait_request_deadline():
    request = CountingRequest(time.monotonic() + 60)
    started = time.monotonic()
    assert not mpi.wait_request(request, 0.2)
    assert 0.2 <= time.monotonic() - started < 1.0


def test_signal_catcher_wake_is_not_a_signal():
    signals = SignalCatcher()
    threading.Timer(0.05, signals.wake).start()
    started = time.monotonic()
    assert signals.wait(10) is False
    assert time.monotonic() - started < 5
    assert signals.signum is None and not signals.event.is_set()
    assert signals.wait(0.01) is False  # the wake-up was used up


def test_worker_rank_notices_the_end_soon_after_its_server_closed(scheduler_on_loop):  # noqa: F811
    """The scheduler closes the worker, then the done barrier completes: the rank sees
    it within a few ms, not at its next 0.1 s poll."""
    loop, s = scheduler_on_loop
    job = FakeJob()
    opts = ClusterOptions(nanny=False, memory_limit=0, death_timeout=10)
    done_seen: list[float] = []
    done = job.done

    def watched_done():
        result = done()
        if result and not done_seen:
            done_seen.append(time.monotonic())
        return result

    job.done = watched_done
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "status", serve_worker(job, s.address, "w", 1, opts, SignalCatcher(), finish_timeout=1)))
    t.start()
    _wait_registered(loop, s)
    deadline = time.monotonic() + 30
    address = next(iter(s.workers))
    sync(loop, _close_worker, s, address)
    while len(s.workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the rank now polls every few ms
    set_at = time.monotonic()
    job.done_event.set()
    t.join(30)
    assert not t.is_alive() and result["status"] == 0
    assert done_seen and done_seen[0] - set_at < 0.06


async def _close_worker(scheduler, address):
    with suppress(CommClosedError):  # it closes without answering
        await scheduler.rpc.call(address, "close", reason="test")
