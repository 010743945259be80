"""The single-node SLURM of scripts/slurm.sh does what the job-queue tests rely on.

Real SLURM (sbatch, squeue, scancel against the daemons that
``bash scripts/slurm.sh start`` runs); skipped without it unless
CLUSTER_REQUIRE_SLURM=1. The measured facts behind these are in
scripts/slurm/README.md.
"""

from __future__ import annotations

import re

from .conftest import Slurm, run, wait_until

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def test_fixture_describes_the_node(slurm: Slurm):
    assert slurm.partition == "debug"
    assert set(slurm.partitions) == {"debug", "short"}
    assert slurm.partitions["short"] == "10:00"
    assert slurm.cpus == 8
    assert slurm.memory_mb >= 8000
    assert slurm.node


def test_submitted_job_runs_and_its_output_appears(slurm: Slurm, tmp_path):
    out = tmp_path / "job-%j.out"
    job_id = slurm.submit(
        f"--output={out}", "--job-name=infra-hello",
        "--wrap", "echo hello from $SLURM_JOB_ID on $(hostname -s) in $SLURM_JOB_PARTITION",
    )
    assert slurm.wait_state(job_id, FINISHED, timeout=30) == "COMPLETED"
    path = tmp_path / f"job-{job_id}.out"
    text = wait_until(lambda: path.exists() and path.read_text(), 10, f"output file {path}")
    assert text.strip() == f"hello from {job_id} on {slurm.node} in {slurm.partition}"
    slurm.wait_gone([job_id])


def test_failing_job_is_failed_with_its_exit_code(slurm: Slurm, tmp_path):
    job_id = slurm.submit(f"--output={tmp_path}/%j.out", "--wrap", "exit 3")
    assert slurm.wait_state(job_id, FINISHED, timeout=30) == "FAILED"
    # Finished jobs stay visible to squeue/scontrol for MinJobAge (10 s).
    assert "ExitCode=3:0" in run(["scontrol", "show", "job", job_id]).stdout


def test_one_cpu_jobs_run_concurrently(slurm: Slurm, tmp_path):
    n = min(slurm.cpus, 8)
    ids = [
        slurm.submit(f"--output={tmp_path}/%j.out", "--cpus-per-task=1", "--time=00:02:00",
                     "--job-name=infra-concurrent", "--wrap", "sleep 120")
        for _ in range(n)
    ]
    try:
        wait_until(
            lambda: all(slurm.jobs().get(i) == "RUNNING" for i in ids),
            30,
            lambda: f"{n} jobs RUNNING at once: {[slurm.jobs().get(i) for i in ids]}",
        )
        # The format the job-queue code parses: "<id> <STATE>", one job a line.
        lines = run(["squeue", "--noheader", "--format=%i %T"]).stdout.splitlines()
        for i in ids:
            assert f"{i} RUNNING" in lines
        assert all(re.fullmatch(r"\S+ [A-Z_]+", line) for line in lines), lines
    finally:
        slurm.cancel(ids)
    states = {i: slurm.wait_state(i, FINISHED, timeout=30) for i in ids}
    assert set(states.values()) == {"CANCELLED"}
    slurm.wait_gone(ids)


def test_unknown_partition_fails_at_submit(slurm: Slurm):
    before = slurm.jobs(all_states=True)
    proc = slurm.sbatch("--partition=nonexistent", "--wrap", "true", check=False)
    assert proc.returncode != 0
    assert "invalid partition" in proc.stderr.lower(), proc.stderr
    assert proc.stdout.strip() == ""
    assert slurm.jobs(all_states=True).keys() <= before.keys()


def test_request_over_partition_limits_fails_at_submit(slurm: Slurm):
    # EnforcePartLimits=ALL: rejected now instead of pending forever.
    over_time = slurm.sbatch("--partition=short", "--time=01:00:00", "--wrap", "true", check=False)
    assert over_time.returncode != 0
    assert "time limit" in over_time.stderr.lower(), over_time.stderr
    too_many = slurm.sbatch(f"--cpus-per-task={slurm.cpus + 1}", "--wrap", "true", check=False)
    assert too_many.returncode != 0
    assert "more processors requested than permitted" in too_many.stderr.lower(), too_many.stderr

