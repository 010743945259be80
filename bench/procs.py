"""Run a child process with bounded time and kill its whole process tree.

The child gets its own session (process group); the parent makes itself a
child subreaper (Linux) so that orphaned grandchildren (worker processes,
MPI proxies) are re-parented to it and can still be found and killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from bench.common import read_result

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class ChildOutcome:
    returncode: int | None
    timed_out: bool
    reason: str | None
    wall_s: float
    launch_wall: float
    result: dict | None
    log_tail: str = ""
    killed: list = field(default_factory=list)


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_tree(root_pid, known=()):
    """SIGKILL the process group of root_pid, its descendants and ``known`` processes."""
    victims = {}
    for p in list(known) + _descendants(root_pid):
        victims[p.pid] = p
    try:
        os.killpg(root_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    # Orphans re-parented to us (subreaper) are our children now: collect them too.
    for p in _descendants(os.getpid()):
        victims.setdefault(p.pid, p)
    killed = []
    for p in victims.values():
        try:
            if p.is_running():  # checks create_time: no pid reuse accidents
                p.kill()
                killed.append(p.pid)
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    return killed


def run_child(cmd, *, env, cwd, result_path, log_path, timeout, start_timeout):
    """Run ``cmd``; stop it after ``timeout`` s, or ``start_timeout`` s without readiness.

    Readiness is the child's result file reaching phase "ready" or later.
    """
    launch_wall = time.time()
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    known = {}
    reason = None
    timed_out = False
    next_scan = 0.0
    while True:
        try:
            proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now >= next_scan:  # remember descendants in case they get orphaned
            for p in _descendants(proc.pid):
                known[p.pid] = p
            next_scan = now + 1.0
        elapsed = now - t0
        result = read_result(result_path) or {}
        phase = result.get("phase")
        if result.get("ok") is not None and phase == "done" and elapsed > timeout:
            reason = "teardown did not finish in time (results are complete)"
            timed_out = True
            break
        if phase in (None, "import", "start") and elapsed > start_timeout:
            reason = f"not ready after {start_timeout:g}s (phase {phase or 'launch'})"
            timed_out = True
            break
        if elapsed > timeout:
            reason = f"timed out after {timeout:g}s (phase {phase})"
            timed_out = True
            break
    killed = kill_tree(proc.pid, known.values())
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    wall = time.monotonic() - t0
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 3000))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        tail = ""
    return ChildOutcome(
        returncode=proc.returncode,
        timed_out=timed_out,
        reason=reason,
        wall_s=wall,
        launch_wall=launch_wall,
        result=read_result(result_path),
        log_tail=tail,
        killed=killed,
    )
