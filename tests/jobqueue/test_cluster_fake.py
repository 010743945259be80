"""SLURMCluster with its command seam replaced by an in-memory fake batch system.

No batch command runs: ``runner=FakeSlurm()`` answers ``sbatch``/``squeue``/
``scancel`` from a dict of job states, and no job ever starts a worker.  The
scheduler is real (in-process, loopback).  What is checked is the cluster's
bookkeeping: whole jobs, one status call per interval, cancellations,
typed submit errors, back-off, and cancelling at interpreter exit.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
from cluster.jobqueue import JobState, SLURMCluster, SubmitError
from cluster.jobqueue.commands import CommandResult
from cluster.jobqueue.errors import JobIdNotFoundError

from tests.helpers import gen_test, until

pytestmark = pytest.mark.timeout(60)


class FakeSlurm:
    """Answers sbatch/squeue/scancel like SLURM would, from ``self.jobs``."""

    def __init__(self, start_state: str = "PENDING", after_status: str | None = None):
        self.calls: list[list[str]] = []
        self.jobs: dict[str, str] = {}
        self.next_id = 100
        self.start_state = start_state
        self.after_status = after_status  # what a job becomes once squeue has seen it
        self.submit_result: CommandResult | None = None
        self.status_result: CommandResult | None = None

    def named(self, command: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == command]

    async def __call__(self, argv, *, timeout=60.0, input=None, env=None) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        cmd = argv[0]
        if cmd == "sbatch":
            with open(argv[-1]) as f:
                assert f.read().startswith("#!")
            if self.submit_result is not None:
                return self.submit_result
            self.next_id += 1
            self.jobs[str(self.next_id)] = self.start_state
            return CommandResult(tuple(argv), 0, f"Submitted batch job {self.next_id}\n", "")
        if cmd == "squeue":
            if self.status_result is not None:
                return self.status_result
            ids = argv[-1].split("=", 1)[1].split(",")
            lines = [f"{i}|{self.jobs[i]}" for i in ids if i in self.jobs]
            if self.after_status:
                for i in ids:
                    if self.jobs.get(i) == self.start_state:
                        self.jobs[i] = self.after_status
            return CommandResult(tuple(argv), 0, "".join(line + "\n" for line in lines), "")
        if cmd == "scancel":
            for i in argv[1:]:
                if self.jobs.get(i) in ("PENDING", "RUNNING"):
                    self.jobs[i] = "CANCELLED"
            return CommandResult(tuple(argv), 0, "", "")
        raise AssertionError(f"unexpected command {argv}")


def cluster(fake: FakeSlurm, **kwargs) -> SLURMCluster:
    kwargs.setdefault("cores", 2)
    kwargs.setdefault("memory", "2GB")
    return SLURMCluster(runner=fake, status_interval=0.05, scheduler_options={"host": "127.0.0.1"},
                        close_timeout=5, **kwargs)


@gen_test(timeout=30)
async def test_scale_submits_whole_jobs_and_scale_down_cancels_pending_ones():
    fake = FakeSlurm()
    async with cluster(fake, processes=2, asynchronous=True) as c:
        await c.scale(3)  # 3 workers of 2 per job: 2 jobs
        assert len(fake.named("sbatch")) == 2
        assert list(c.jobs) == ["101", "102"]
        await until(lambda: all(j.native_state == "PENDING" for j in c.jobs.values()), 10,
                    what="a status call")
        # every status call asks about all active jobs at once
        assert all(call[-1] == "--jobs=101,102" for call in fake.named("squeue"))
        await c.scale(2)
        assert len(fake.named("sbatch")) == 2  # 2 workers = 1 job: nothing to submit
        await until(lambda: fake.jobs == {"101": "PENDING", "102": "CANCELLED"}, 10,
                    what="the newest pending job cancelled")
        await until(lambda: c.jobs["102"].state == JobState.CANCELLED, 10, what="its state")
        assert [j.id for j in c.jobs.values() if j.state.active] == ["101"]


@gen_test(timeout=30)
async def test_scale_by_jobs_cores_and_memory():
    fake = FakeSlurm()
    async with cluster(fake, cores=4, memory="8GB", processes=2, asynchronous=True) as c:
        await c.scale(jobs=2)
        assert len(c.jobs) == 2
        await c.scale(cores=9)  # 3 jobs of 4 cores
        assert len(c.jobs) == 3
        await c.scale(memory="30GB")  # 4 jobs of 8 GB
        assert len(c.jobs) == 4
        with pytest.raises(ValueError, match="give one of n, jobs, memory, cores"):
            c.scale(2, jobs=1)
        with pytest.raises(ValueError, match="jobs=-1"):
            c.scale(jobs=-1)


@gen_test(timeout=30)
async def test_close_cancels_every_job_in_one_call_and_waits_for_them():
    fake = FakeSlurm(start_state="RUNNING")
    c = await cluster(fake, asynchronous=True)
    await c.scale(3)
    await c.close()
    assert fake.named("scancel") == [["scancel", "101", "102", "103"]]
    assert set(fake.jobs.values()) == {"CANCELLED"}
    assert {j.state for j in c.jobs.values()} == {JobState.CANCELLED}
    assert c.status == "closed" and not c._finalizer.alive
    assert c.scheduler.status == "closed"


def test_failing_sbatch_raises_a_submit_error_with_the_command_output():
    fake = FakeSlurm()
    fake.submit_result = CommandResult(
        ("sbatch", "x"), 1, "", "sbatch: error: invalid partition specified: nope\n"
                                 "sbatch: error: Batch job submission failed: Invalid partition "
                                 "name specified\n")
    with cluster(fake, queue="nope") as c:
        with pytest.raises(SubmitError, match="invalid partition specified: nope") as info:
            c.scale(1)
        assert info.value.returncode == 1
        assert info.value.argv[0] == "sbatch"
        assert c.jobs == {}
    fake.submit_result = CommandResult(("sbatch", "x"), 0, "who knows\n", "")
    with cluster(fake) as c:
        with pytest.raises(JobIdNotFoundError, match="who knows"):
            c.scale(1)


@gen_test(timeout=30)
async def test_jobs_that_fail_without_a_worker_pause_submission(caplog):
    fake = FakeSlurm(after_status="FAILED")
    async with cluster(fake, asynchronous=True) as c:
        with caplog.at_level(logging.ERROR, logger="cluster.jobqueue.core"):
            await c.scale(1)
            await until(lambda: len(fake.named("sbatch")) == 3 and c._paused_until, 10,
                        what="three failed jobs")
            steps = [0]
            reconcile = c._reconcile

            async def counting():
                steps[0] += 1
                await reconcile()

            c._reconcile = counting
            await until(lambda: steps[0] >= 10, 10, what="ten more steps")
        assert len(fake.named("sbatch")) == 3  # paused, not resubmitting in a loop
        assert "3 SLURM jobs in a row ended without starting a worker" in caplog.text
        assert [j.state for j in c.jobs.values()] == [JobState.FAILED] * 3
        await c.scale(1)  # asking again tries again at once
        assert len(fake.named("sbatch")) == 4


@gen_test(timeout=30)
async def test_a_failing_status_call_keeps_the_states(caplog):
    fake = FakeSlurm(start_state="RUNNING")
    async with cluster(fake, asynchronous=True) as c:
        await c.scale(1)
        await until(lambda: c.jobs["101"].native_state == "RUNNING", 10, what="first status")
        fake.status_result = CommandResult(("squeue",), 1, "", "slurm_load_jobs error: Unable to "
                                           "contact slurm controller (connect failure)\n")
        with caplog.at_level(logging.WARNING, logger="cluster.jobqueue.core"):
            await until(lambda: "Unable to contact" in caplog.text, 10, what="the warning")
        assert c.jobs["101"].state == JobState.RUNNING
        fake.status_result = None


def test_interpreter_exit_cancels_the_jobs_of_an_unclosed_cluster(tmp_path):
    log = tmp_path / "calls.log"
    script = textwrap.dedent(f"""\
        import logging
        from cluster.jobqueue import SLURMCluster
        from cluster.jobqueue.commands import CommandResult

        logging.basicConfig(level=logging.INFO)
        calls = open({str(log)!r}, "a")
        n = [0]

        async def runner(argv, *, timeout=60.0, input=None, env=None):
            calls.write(" ".join(argv[:1] + [a for a in argv[1:] if not a.startswith("/")]) + "\\n")
            calls.flush()
            if argv[0] == "sbatch":
                n[0] += 1
                return CommandResult(tuple(argv), 0, f"Submitted batch job {{n[0]}}\\n", "")
            if argv[0] == "squeue":
                ids = argv[-1].split("=")[1].split(",")
                return CommandResult(tuple(argv), 0, "".join(f"{{i}}|RUNNING\\n" for i in ids), "")
            return CommandResult(tuple(argv), 0, "", "")

        cluster = SLURMCluster(cores=1, memory="1GB", runner=runner, n_workers=2,
                               scheduler_options={{"host": "127.0.0.1"}})
        print(sorted(cluster.jobs))
        # no close(): interpreter exit must cancel the jobs
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path.parent), env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['1', '2']"
    lines = log.read_text().splitlines()
    assert lines[-1] == "scancel 1 2", lines
    assert "left by a cluster that was not closed" in proc.stderr


def _env() -> dict:
    import os
    from pathlib import Path

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@gen_test(timeout=30)
async def test_scale_stops_adapt_and_adapt_validates():
    fake = FakeSlurm()
    async with cluster(fake, asynchronous=True) as c:
        a = c.adapt(minimum=1, maximum=4, interval="50ms")
        assert "jobs=[1, 4]" in repr(a)
        await until(lambda: len(fake.named("sbatch")) == 1, 10, what="the minimum job")
        await c.scale(0)
        assert c._adaptive is None
        with pytest.raises(ValueError, match="interval=0"):
            c.adapt(interval=0)
        with pytest.raises(ValueError, match="wait_count=0"):
            c.adapt(wait_count=0)
