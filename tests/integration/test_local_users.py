"""Another user of the same machine must not run code as us (issue 16).

The attacks are carried out by a real second account: the suite runs as root
in CI, so a fixture creates an unprivileged user with ``useradd``, the
attacker's steps run as that user through ``runuser``, and the user is removed
afterwards.  Without root (or without those commands) these tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest
from cluster.runtime import Client, Scheduler, Worker
from cluster.runtime.errors import EncryptionRequiredError, UnsafePathError
from cluster.runtime.files import SCRATCH_ROOT_PREFIX, scratch_root_name
from cluster.runtime.process import inherited_path, python_command

from tests.helpers import gen_test

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("useradd", "userdel", "runuser")),
    reason="second-user tests need root and useradd/userdel/runuser")


@pytest.fixture
def other_user():
    """An unprivileged local user for the test, removed afterwards: ``(name, uid)``."""
    name = f"hpcc{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True,
                   capture_output=True, timeout=30)
    try:
        uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True,
                                 timeout=10).stdout)
        yield name, uid
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


@pytest.fixture
def shared_dir():
    """A directory every user can enter, holding ``shared`` (mode 1777, like /tmp)."""
    base = tempfile.mkdtemp(prefix="hpcc-users-")
    os.chmod(base, 0o755)
    shared = os.path.join(base, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    try:
        yield shared
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(user: str, *argv: str, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the command ``argv`` as ``user`` (the attacker), failing the test if it fails.

    Plain commands (``sh``, ``mkdir``, ``ln``): our Python is not theirs to run.
    """
    result = subprocess.run(["runuser", "-u", user, "--", *argv], input=input,
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    return result


def plant(user: str, path: str, text: str) -> None:
    """As ``user``, write ``text`` to the new file ``path``."""
    as_user(user, "sh", "-c", 'cat > "$1"', "sh", path, input=text)


def run_victim(script: str, cwd: str, tmp_path, timeout: float = 90) -> dict:
    """Run ``script`` as ourselves (the victim) with working directory ``cwd``; its last
    stdout line is JSON."""
    path = tmp_path / f"victim_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sys.path of children


def test_child_command_keeps_the_working_directory_off_sys_path(tmp_path):
    (tmp_path / "json.py").write_text("raise SystemExit('planted json imported')\n")
    out = subprocess.run(python_command("cluster.runtime.worker.process", "--help"), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert "python -m cluster.runtime.worker.process" in out.stdout


def test_bootstrap_for_other_interpreters_drops_the_working_directory(tmp_path):
    (tmp_path / "runpy.py").write_text("raise SystemExit('planted runpy imported')\n")
    (tmp_path / "json.py").write_text("raise SystemExit('planted json imported')\n")
    cmd = python_command("json.tool", "--help", executable=os.path.realpath(sys.executable))
    assert cmd[1] == "-c"
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "json.tool" in out.stdout


def test_inherited_path_leaves_out_cwd_and_open_directories(tmp_path, monkeypatch, caplog):
    mine = tmp_path / "mine"
    open_dir = tmp_path / "open"
    explicit_open = tmp_path / "explicit"
    for d in (mine, open_dir, explicit_open):
        d.mkdir()
        os.chmod(d, 0o755)
    os.chmod(open_dir, 0o777)
    os.chmod(explicit_open, 0o777)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", str(explicit_open))
    monkeypatch.setattr(sys, "path", ["", str(cwd), str(mine), str(open_dir), str(explicit_open),
                                      "relative/dir", *sys.path])
    with caplog.at_level("WARNING", logger="cluster.runtime.process"):
        paths = inherited_path()
    assert str(mine) in paths and str(explicit_open) in paths
    assert "" not in paths and str(cwd) not in paths and str(open_dir) not in paths
    assert "relative/dir" not in paths
    assert any(str(open_dir) in r.getMessage() and "everyone can write" in r.getMessage()
               for r in caplog.records)


@needs_root
def test_planted_module_in_shared_cwd_never_imports_in_workers(other_user, shared_dir, tmp_path):
    user, _ = other_user
    marker = os.path.join(shared_dir, "PWNED")
    plant(user, os.path.join(shared_dir, "json.py"),
          f"open({marker!r} + '-' + str(__import__('os').getpid()), 'w').close()\n"
          "raise SystemExit('planted json')\n")
    info = run_victim("""
        import sys
        from cluster import Client, LocalCluster

        def where():
            import json, os, sys
            return {"json": json.__file__, "path": sys.path, "cwd": os.getcwd()}

        with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                out = client.submit(where, pure=False).result()
        import json
        print(json.dumps(out))
    """, cwd=shared_dir, tmp_path=tmp_path)
    assert info["cwd"] == shared_dir
    assert not info["json"].startswith(shared_dir)
    assert shared_dir not in info["path"] and "" not in info["path"]
    assert not [n for n in os.listdir(shared_dir) if n.startswith("PWNED")]


# ----------------------------------------------------------------------------- scratch directories


async def _worker_directory(**worker_kwargs) -> tuple[str, list[str]]:
    """Start a scheduler and a spilling worker; return the worker's directory and its
    spill directory's files once a value spilled."""
    async with Scheduler(dashboard_address=None) as s:
        async with Worker(s.address, nthreads=1, memory_limit="100MB", **worker_kwargs) as w:
            w.data.evict()  # nothing yet
            w.data["spilled"] = b"x" * 1000
            w.data.evict()
            storage = os.path.join(w.local_directory, "storage")
            return w.local_directory, [stat.filemode(os.lstat(os.path.join(storage, n)).st_mode)
                                       for n in os.listdir(storage)]


@needs_root
@gen_test(timeout=60)
async def test_scratch_root_planted_by_another_user_is_bypassed(other_user, shared_dir,
                                                                 monkeypatch, caplog):
    user, uid = other_user
    planted = os.path.join(shared_dir, scratch_root_name())
    as_user(user, "mkdir", "-m", "0777", planted)
    assert os.stat(planted).st_uid == uid
    monkeypatch.setattr(tempfile, "tempdir", shared_dir)  # as TMPDIR=shared would
    with caplog.at_level("WARNING", logger="cluster.runtime.files"):
        local, modes = await _worker_directory()
    assert not local.startswith(planted + os.sep)
    assert os.path.dirname(os.path.dirname(local)).startswith(shared_dir)
    assert modes == ["-rw-------"]
    assert os.listdir(planted) == []  # nothing of ours went there
    assert any(planted in r.getMessage() and f"belongs to user id {uid}" in r.getMessage()
               for r in caplog.records)
    assert not [n for n in os.listdir(shared_dir) if n != scratch_root_name()]  # removed again


@needs_root
@gen_test(timeout=60)
async def test_scratch_root_replaced_by_a_link_is_bypassed(other_user, shared_dir):
    user, _ = other_user
    theirs = os.path.join(shared_dir, "theirs")
    as_user(user, "mkdir", "-m", "0777", theirs)
    planted = os.path.join(shared_dir, scratch_root_name())
    as_user(user, "ln", "-s", theirs, planted)
    local, _ = await _worker_directory(local_directory=shared_dir)
    assert not os.path.realpath(local).startswith(theirs)
    assert os.listdir(theirs) == []


@needs_root
@gen_test(timeout=60)
async def test_another_users_directory_is_refused_as_local_directory(other_user, shared_dir):
    user, uid = other_user
    theirs = os.path.join(shared_dir, "theirs")
    as_user(user, "mkdir", "-m", "0777", theirs)
    async with Scheduler(dashboard_address=None) as s:
        with pytest.raises(UnsafePathError, match=rf"local_directory {theirs}: it belongs to "
                                                  rf"user id {uid}"):
            await Worker(s.address, nthreads=1, local_directory=theirs)


@needs_root
@gen_test(timeout=60)
async def test_we_start_while_another_users_scratch_root_exists(other_user, shared_dir,
                                                                monkeypatch):
    user, uid = other_user
    theirs = os.path.join(shared_dir, f"{SCRATCH_ROOT_PREFIX}{uid}")
    as_user(user, "mkdir", "-m", "0755", theirs)
    monkeypatch.setattr(tempfile, "tempdir", shared_dir)
    local, _ = await _worker_directory()
    assert os.path.dirname(local) == os.path.join(shared_dir, scratch_root_name())
    assert stat.S_IMODE(os.stat(os.path.dirname(local)).st_mode) == 0o700


# ----------------------------------------------------------------------------- scheduler files


@needs_root
@gen_test(timeout=60)
async def test_scheduler_file_written_by_another_user_is_refused(other_user, shared_dir):
    user, uid = other_user
    path = os.path.join(shared_dir, "scheduler.json")
    plant(user, path, json.dumps({"address": "tcp://127.0.0.1:1", "type": "Scheduler"}))
    as_user(user, "chmod", "0644", path)
    for security in (None, False):  # even with the opt-out of TLS
        with pytest.raises(UnsafePathError, match=rf"scheduler file {path}: it belongs to "
                                                  rf"user id {uid}"):
            await Worker(scheduler_file=path, nthreads=1, security=security, death_timeout=5)
    with pytest.raises(UnsafePathError, match="belongs to user id"):
        await Client(scheduler_file=path, asynchronous=True, security=False, timeout=5)


@needs_root
@gen_test(timeout=60)
async def test_scheduler_file_planted_link_is_replaced_not_followed(other_user, shared_dir,
                                                                    tmp_path):
    user, _ = other_user
    mine = tmp_path / "unrelated"
    mine.write_text("keep me")
    path = os.path.join(shared_dir, "scheduler.json")
    as_user(user, "ln", "-s", str(mine), path)
    async with Scheduler(dashboard_address=None, scheduler_file=path) as s:
        assert not os.path.islink(path)
        assert json.loads(open(path).read())["address"] == s.address
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert mine.read_text() == "keep me"


@gen_test(timeout=60)
async def test_plain_scheduler_file_needs_the_opt_out_of_tls(tmp_path):
    path = str(tmp_path / "scheduler.json")
    async with Scheduler(dashboard_address=None, scheduler_file=path) as s:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(EncryptionRequiredError, match="security=False"):
            await Worker(scheduler_file=path, nthreads=1, death_timeout=5)
        with pytest.raises(EncryptionRequiredError, match="--no-tls"):
            await Client(scheduler_file=path, asynchronous=True, timeout=5)
        async with Worker(scheduler_file=path, nthreads=1, security=False) as w:
            assert w.scheduler_addr == s.address
