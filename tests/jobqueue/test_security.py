"""Batch-queue clusters are secure by default: TLS, and the workers' credentials in a 0600 file.

No batch system runs here: the clusters get a fake ``runner`` (the command
seam) whose jobs never start.  The scheduler is real (in-process, loopback).
Checked: what the job script holds (the credentials file's path, never PEM
text), the file's and its directory's modes and contents, its removal on
``close()`` and at interpreter exit, the explicit opt-out, user-given
``Security`` objects, the worker command's ``--tls-credentials`` checks, and
what ``wait_for_workers`` logs while it waits.  The real SLURM tests
(``test_slurm_cluster.py``) check that workers connect over ``tls://``.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cluster.jobqueue import PBSCluster, SLURMCluster
from cluster.jobqueue.commands import CommandResult
from cluster.jobqueue.credentials import credentials_directory
from cluster.runtime.errors import ClusterTimeoutError
from cluster.runtime.security import Security

from tests.helpers import gen_test

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
ADDRESS = "tls://127.0.0.1:8786"


class Runner:
    """sbatch/squeue/scancel answers: jobs stay in ``state`` for ``reason`` (they never start)."""

    def __init__(self, state: str = "PENDING", reason: str = "Resources"):
        self.state, self.reason = state, reason
        self.jobs: dict[str, str] = {}

    async def __call__(self, argv, *, timeout=60.0, input=None, env=None) -> CommandResult:
        argv = list(argv)
        if argv[0] == "sbatch":
            jid = str(100 + len(self.jobs) + 1)
            self.jobs[jid] = self.state
            return CommandResult(tuple(argv), 0, f"Submitted batch job {jid}\n", "")
        if argv[0] == "squeue":
            ids = argv[-1].split("=", 1)[1].split(",")
            out = "".join(f"{i}|{self.jobs[i]}|{self.reason if self.jobs[i] == 'PENDING' else 'None'}\n"
                          for i in ids if i in self.jobs)
            return CommandResult(tuple(argv), 0, out, "")
        if argv[0] == "scancel":
            for i in argv[1:]:
                self.jobs[i] = "CANCELLED"
            return CommandResult(tuple(argv), 0, "", "")
        raise AssertionError(f"unexpected command {argv}")


def cluster(tmp_path, **kwargs) -> SLURMCluster:
    kwargs.setdefault("runner", Runner())
    kwargs.setdefault("shared_temp_directory", str(tmp_path / "shared"))
    return SLURMCluster(cores=1, memory="1GB", status_interval=0.05, close_timeout=5,
                        scheduler_options={"host": "127.0.0.1", "dashboard_address": None},
                        asynchronous=True, **kwargs)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ----------------------------------------------------------------------------- the job script


@pytest.mark.parametrize("cls", [SLURMCluster, PBSCluster])
def test_script_names_the_credentials_file_and_holds_no_key_material(cls, tmp_path):
    c = cls(cores=1, memory="1GB", asynchronous=True, shared_temp_directory=tmp_path / "a dir")
    text = c.job_script(ADDRESS)
    expected = tmp_path / "a dir" / "hpc-cluster-credentials"
    assert os.path.dirname(c.credentials_file) == str(expected)
    assert c.credentials_file.endswith(".credentials")
    assert f"--tls-credentials '{c.credentials_file}'" in text  # quoted: the path has a space
    assert "BEGIN" not in text and "PRIVATE" not in text
    for secret in (c.security.tls_worker_key, c.security.tls_worker_cert, c.security.tls_ca_file):
        assert secret.strip().splitlines()[1] not in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True, timeout=10)


def test_default_directory_is_private_under_home():
    assert credentials_directory() == os.path.expanduser("~/.hpc-cluster/credentials")
    c = SLURMCluster(cores=1, memory="1GB", asynchronous=True)
    assert c.credentials_file.startswith(credentials_directory() + os.sep)
    assert not os.path.exists(c.credentials_file)  # written when the cluster starts


def test_security_false_is_plain_tcp_and_names_no_file():
    c = SLURMCluster(cores=1, memory="1GB", asynchronous=True, security=False)
    assert c.security is None and c.credentials_file is None
    assert "--tls" not in c.job_script("tcp://127.0.0.1:8786")


def test_bad_security_options_are_named(tmp_path):
    with pytest.raises(TypeError, match="security="):
        SLURMCluster(cores=1, memory="1GB", asynchronous=True, security="yes")
    sec = Security.temporary()
    no_worker = Security(tls_ca_file=sec.tls_ca_file, tls_scheduler_cert=sec.tls_scheduler_cert,
                         tls_scheduler_key=sec.tls_scheduler_key)
    with pytest.raises(ValueError, match=r"worker certificate \(tls_worker_cert\)"):
        SLURMCluster(cores=1, memory="1GB", asynchronous=True, security=no_worker)
    with pytest.raises(ValueError, match="pass security= to the cluster itself"):
        SLURMCluster(cores=1, memory="1GB", asynchronous=True,
                     scheduler_options={"security": sec})
    with pytest.raises(TypeError, match="shared_temp_directory"):
        SLURMCluster(cores=1, memory="1GB", asynchronous=True, shared_temp_directory=3)


# ----------------------------------------------------------------------------- the file


@gen_test(timeout=30)
async def test_credentials_file_is_0600_in_a_0700_directory_and_gone_after_close(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    async with cluster(tmp_path) as c:
        assert c.scheduler_address.startswith("tls://")
        path = c.credentials_file
        assert mode(path) == 0o600 and os.stat(path).st_uid == os.geteuid()
        assert mode(os.path.dirname(path)) == 0o700
        assert mode(shared) == 0o755  # the user's shared directory is left as it was
        creds = Security.from_file(path)
        # Only what a worker needs: the CA, the worker's certificate and key.
        assert creds.tls_ca_file == c.security.tls_ca_file
        assert creds.tls_worker_cert == c.security.tls_worker_cert
        assert creds.tls_worker_key == c.security.tls_worker_key
        assert (creds.tls_client_key, creds.tls_scheduler_key) == (None, None)
        assert creds.require_encryption
        await c.scale(1)
        assert f"--tls-credentials {path}" in c.job_script()
    assert not os.path.exists(path)
    assert os.listdir(os.path.dirname(path)) == []


@gen_test(timeout=30)
async def test_an_existing_directory_open_to_others_is_made_private(tmp_path):
    loose = tmp_path / "shared" / "hpc-cluster-credentials"
    loose.mkdir(parents=True, mode=0o777)
    os.chmod(loose, 0o777)
    async with cluster(tmp_path) as c:
        assert mode(loose) == 0o700
        assert os.path.dirname(c.credentials_file) == str(loose)


@gen_test(timeout=30)
async def test_a_user_security_object_is_used_as_given(tmp_path):
    sec = Security.temporary()
    async with cluster(tmp_path, security=sec) as c:
        assert c.security is sec
        assert c.scheduler.security is sec and c.scheduler_address.startswith("tls://")
        assert Security.from_file(c.credentials_file).tls_worker_cert == sec.tls_worker_cert


@gen_test(timeout=30)
async def test_security_false_listens_on_tcp(tmp_path):
    async with cluster(tmp_path, security=False) as c:
        assert c.scheduler_address.startswith("tcp://")
        assert not (tmp_path / "shared").exists()


def test_interpreter_exit_removes_the_credentials_file_of_an_unclosed_cluster(tmp_path):
    script = textwrap.dedent(f"""\
        from cluster.jobqueue import SLURMCluster
        from cluster.jobqueue.commands import CommandResult

        async def runner(argv, *, timeout=60.0, input=None, env=None):
            return CommandResult(tuple(argv), 0, "", "")

        cluster = SLURMCluster(cores=1, memory="1GB", runner=runner,
                               shared_temp_directory={str(tmp_path)!r},
                               scheduler_options={{"host": "127.0.0.1", "dashboard_address": None}})
        import os
        assert os.path.exists(cluster.credentials_file)
        print(cluster.credentials_file)
        # no close(): interpreter exit must remove the file
        """)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    assert path.startswith(str(tmp_path / "hpc-cluster-credentials"))
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------- the worker command


def _worker(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "cluster", "worker", *args], capture_output=True,
                          text=True, timeout=30, env=env, cwd=str(REPO))


def test_worker_refuses_a_credentials_file_others_can_read(tmp_path):
    path = Security.temporary().to_file(str(tmp_path / "creds"))
    os.chmod(path, 0o644)
    proc = _worker(ADDRESS, "--tls-credentials", path)
    assert proc.returncode == 1
    assert "--tls-credentials" in proc.stderr and "chmod 600" in proc.stderr


def test_worker_tls_credentials_and_separate_files_exclude_each_other(tmp_path):
    path = Security.temporary().to_file(str(tmp_path / "creds"))
    proc = _worker(ADDRESS, "--tls-credentials", path, "--tls-ca-file", path)
    assert proc.returncode == 2
    assert "give either --tls-credentials or --tls-ca-file" in proc.stderr
    helptext = _worker("--help").stdout
    assert "--tls-credentials FILE" in helptext and "CLUSTER_TLS_CREDENTIALS" in helptext


# ----------------------------------------------------------------------------- waiting


@gen_test(timeout=30)
async def test_wait_for_workers_says_what_it_waits_for(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("cluster.jobqueue.core.WAIT_LOG_INTERVAL", 0.05)
    caplog.set_level(logging.INFO, logger="cluster.jobqueue.core")
    async with cluster(tmp_path, runner=Runner("PENDING", "Priority")) as c:
        with pytest.raises(ClusterTimeoutError, match=r"no job queued or running"):
            await c.wait_for_workers(2, timeout=0.1)  # nothing submitted yet: says so
        await c.scale(2)
        with pytest.raises(ClusterTimeoutError) as info:
            await c.wait_for_workers(2, timeout=1)
    assert "waiting for 2 workers (0 connected): job 101 PENDING (Priority), " \
           "job 102 PENDING (Priority)" in str(info.value)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert any("no job queued or running (call scale() or adapt() first)" in m for m in lines)
    assert any(m.endswith("job 101 PENDING (Priority), job 102 PENDING (Priority)")
               for m in lines)
    assert "SLURM job 101 is PENDING (Priority)" in caplog.text


@gen_test(timeout=30)
async def test_wait_for_workers_shows_running_jobs_workers(tmp_path):
    async with cluster(tmp_path, runner=Runner("RUNNING")) as c:
        await c.scale(1)
        with pytest.raises(ClusterTimeoutError,
                           match=r"job 101 RUNNING \(0/1 workers connected\)"):
            await c.wait_for_workers(1, timeout=0.5)
        with pytest.raises(ValueError, match="n_workers"):
            c.wait_for_workers(-1)
