"""A worker rank's worker process forked before MPI_Init (``prewarm(fork=True)``), and the
node's ranks meeting before MPI_Init (:mod:`cluster.hpc.rendezvous`); no ``mpiexec`` needed.

The forks are made in a fresh interpreter (tests/mpi/scripts/forked_worker.py): forking
is only safe with one thread, and pytest has several.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from cluster.hpc import rendezvous
from cluster.runtime import process

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "forked_worker.py"


def _run(mode: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(SCRIPT), mode], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)  # polling interval of the deadline loop
    return False


def test_nanny_hands_its_options_to_the_forked_worker_then_restarts_a_fresh_one(tmp_path):
    out = _run("use", tmp_path)
    pid, me = out["pid"], out["me"]
    assert out["forked"] and out["nanny_pid"] == pid and not out["warm_left"]
    first = out["first"]
    # A fork of the driver, in a session of its own, shaped like `python -P -m
    # runtime.worker.process --options-from-stdin`: the nanny's env, not the launcher's
    # rank variable, not the working directory on sys.path, none of what the parent
    # inherited (the inheritable pipe), its options on no command line.
    assert first["pid"] == pid and first["ppid"] == me and first["sid"] == pid
    assert first["extra"] == "yes" and first["rank_var"] is None
    assert out["cwd"] not in first["sys_path"] and "" not in first["sys_path"]
    assert "--options-from-stdin" in first["sys_argv"]
    assert str(out["inherited_fd"]) not in first["fds"] or \
        first["fds"][str(out["inherited_fd"])] != out["inherited_pipe"]
    # After its crash the nanny started a fresh interpreter (nothing warm was left).
    second = out["second"]
    assert second["pid"] != pid and second["ppid"] == me and second["extra"] == "yes"
    assert out["first_alive_after"] == "gone"


def test_unused_forked_worker_is_reaped_by_discard(tmp_path):
    out = _run("discard", tmp_path)
    assert out["forked"] and out["returncode_after_discard"] == "gone"


def test_unused_forked_worker_exits_when_its_parent_dies(tmp_path):
    parent = subprocess.Popen([sys.executable, str(SCRIPT), "orphan"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    try:
        out = json.loads(parent.stdout.readline())
        assert out["forked"] and psutil.pid_exists(out["pid"])
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert _gone(out["pid"])  # its stdin reached end-of-file


@pytest.fixture
def no_warm_child():
    process.discard_warm()
    yield process
    process.discard_warm()


def test_fork_is_refused_while_threads_run(no_warm_child):
    """With another thread running, a fork could inherit a lock held forever: an
    interpreter is started instead."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="keeps-a-thread-running")
    t.start()
    try:
        assert process._can_fork() is not None
        pid = process.prewarm(fork=True)
        assert pid is not None and not process._warm.forked
        assert "cluster.runtime.worker.process" in " ".join(psutil.Process(pid).cmdline())
    finally:
        stop.set()
        t.join()
    process.discard_warm()
    assert _gone(pid)


# ----------------------------------------------------------------------------- rendezvous


def _env(key: str, size: int, rank: int) -> dict[str, str]:
    return {"PMIX_NAMESPACE": key, "OMPI_COMM_WORLD_LOCAL_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank)}


def _meet(key: str, size: int, ranks: list[int], timeout: float, delays=None) -> dict[int, str]:
    results: dict[int, str] = {}

    def one(rank: int) -> None:
        time.sleep((delays or {}).get(rank, 0.0))  # arrives late on purpose
        results[rank] = rendezvous.wait_for_local_ranks(timeout, _env(key, size, rank))

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    assert not any(t.is_alive() for t in threads)
    return results


def test_rendezvous_releases_every_rank_once_all_are_there():
    key = f"test-{uuid.uuid4()}"
    # local rank 0 comes last: the others wait for it to listen, then block until released
    start = time.monotonic()
    results = _meet(key, 4, [0, 1, 2, 3], 20, delays={0: 0.3, 2: 0.2})
    assert results == dict.fromkeys(range(4), "met")
    assert time.monotonic() - start < 15


def test_rendezvous_gives_up_after_its_deadline_when_a_rank_never_comes():
    key = f"test-{uuid.uuid4()}"
    start = time.monotonic()
    results = _meet(key, 3, [0, 1], 0.5)  # rank 2 never arrives
    # the leader gives up; its follower either does too or sees the leader's socket close
    assert results[0] == "timeout" and results[1] in ("timeout", "failed")
    assert time.monotonic() - start < 10


def test_rendezvous_follower_without_a_leader_gives_up():
    key = f"test-{uuid.uuid4()}"
    assert _meet(key, 2, [1], 0.3) == {1: "timeout"}


def test_rendezvous_needs_a_job_and_a_node_size():
    assert rendezvous.wait_for_local_ranks(1, {}) == "unsupported"
    assert rendezvous.wait_for_local_ranks(1, {"OMPI_COMM_WORLD_LOCAL_SIZE": "1"}) == "alone"
    no_key = {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert rendezvous.wait_for_local_ranks(1, no_key) == "unsupported"
    bad_rank = _env("x", 2, 5)
    assert rendezvous.wait_for_local_ranks(1, bad_rank) == "unsupported"


def test_rendezvous_name_in_use_is_left_alone():
    import socket

    key = f"test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
        squatter.bind(rendezvous.socket_name(f"pmix-{key}", 2))
        assert rendezvous.wait_for_local_ranks(1, _env(key, 2, 0)) == "in use"


def test_job_key_is_the_pmi_sockets_peer():
    """MPICH: the pid at the other end of PMI_FD (hydra's proxy), whatever wrapper runs
    the rank; before PMIX_NAMESPACE."""
    import socket

    a, b = socket.socketpair()
    with a, b:
        key = rendezvous.job_key({"PMI_FD": str(a.fileno()), "PMIX_NAMESPACE": "ns"})
        assert key == f"pmi-{os.getpid()}"
        assert a.fileno() >= 0  # still open: only a duplicate was looked at
    assert rendezvous.job_key({"PMI_FD": "9999", "PMIX_NAMESPACE": "ns"}) == "pmix-ns"
    assert rendezvous.job_key({}) is None


# ----------------------------------------------------------------------------- watchdog


def test_watchdog_probes_rarely_while_the_scheduler_answers():
    """A TLS handshake per probe: every 5 s (death_timeout / 4) while the scheduler answers,
    every second once it does not; the rank still gives up death_timeout after the last answer."""
    from cluster.hpc.ranks import ClusterOptions, WorkerRank

    rank = WorkerRank("tls://127.0.0.1:9", "w", 1, ClusterOptions(death_timeout=20))
    assert rank.next_probe_in(True) == 5.0 and rank.next_probe_in(False) == 1.0
    assert rank.next_probe_in(True) < rank.opts.death_timeout
    short = WorkerRank("tcp://127.0.0.1:9", "w", 1, ClusterOptions(death_timeout=1))
    assert short.next_probe_in(False) == 0.1 and short.next_probe_in(True) == 0.25
