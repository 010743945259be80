"""A worker whose spill disk fills up says so: an ERROR with the path, and a pause the
client can read (issue 16: it used to be one WARNING, then DEBUG, and a client that
waited forever).  The disk is a real 2 MB tmpfs mounted for the test (root, as in CI)."""

from __future__ import annotations

import logging

import pytest
from cluster.runtime import Client, Scheduler, Worker

from tests.helpers import gen_test, until
from tests.unit.test_spill import small_fs  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(90)


def block(i: int) -> bytes:
    return bytes([i % 256]) * 500_000


@gen_test(timeout=80)
async def test_full_spill_disk_pauses_the_worker_with_a_reason_the_client_reads(small_fs, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="cluster.runtime")
    async with Scheduler(dashboard_address=None) as s:
        # Spill above 10 MB of results; the process itself stays far below its pause fraction.
        async with Worker(s.address, nthreads=1, name="spiller", local_directory=str(small_fs),
                          memory_limit="1GB", memory_target_fraction=0.01,
                          memory_spill_fraction=0.99, memory_pause_fraction=0.99,
                          heartbeat_interval="100ms", memory_monitor_interval="50ms") as w, \
                Client(s.address, asynchronous=True) as c:
            assert w.local_directory.startswith(str(small_fs))
            futures = c.map(block, range(60))  # 30 MB of results: 20 over target, 2 MB of disk

            def paused_with_reason():
                info = s.identity()["workers"].get(w.address, {})
                reason = info.get("metrics", {}).get("pause_reason")
                return info.get("status") == "paused" and reason

            await until(paused_with_reason, timeout=40, what="the worker to pause with a reason")
            # What the client reads: the status and the reason, and the ERROR in the logs.
            info = (await c.scheduler_info())["workers"][w.address]
            reason = info["metrics"]["pause_reason"]
            assert info["status"] == "paused"
            assert str(small_fs) in reason and "No space left on device" in reason, reason
            logs = (await c.get_worker_logs(workers=[w.address]))[w.address]
            errors = [msg for level, msg in logs if level == "ERROR"]
            assert any(str(small_fs) in msg and "No space left" in msg for msg in errors), logs
            assert not all(f.done() for f in futures)  # the rest waits: visibly, not silently
            spill_errors = [r for r in caplog.records
                            if r.name == "cluster.runtime.spill" and r.levelno == logging.ERROR]
            assert len(spill_errors) == 1, [r.getMessage() for r in spill_errors]
            # Once the results are released, nothing needs spilling: the worker resumes.
            await c.cancel(futures)
            del futures
            await until(lambda: not w.paused, timeout=30, what="the worker to resume")
            await until(lambda: s.identity()["workers"][w.address]["status"] == "running",
                        what="the scheduler to see it running")
            assert await c.submit(block, 7) == block(7)
            await until(lambda: s.identity()["workers"][w.address]["metrics"]["pause_reason"]
                        is None, what="a heartbeat without the reason")
