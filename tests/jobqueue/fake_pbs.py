"""A fake PBS server for tests: ``qsub``, ``qstat``, ``qdel`` that really run the job scripts.

There is no PBS server in Debian, so PBSCluster's end-to-end tests use this
stand-in.  It is not PBS: it runs each job right away on this machine, as a
background process, and only mimics the command-line surface PBSCluster
uses (and the output formats of OpenPBS):

``python fake_pbs.py qsub SCRIPT``
    prints ``<n>.fakepbs`` and starts a detached *mom* process (its own
    session) that runs ``bash SCRIPT`` in a process group of its own with
    ``PBS_JOBID``, ``PBS_JOBNAME`` and ``PBS_O_WORKDIR`` set, output in the
    job's directory.  ``#PBS -l walltime=HH:MM:SS`` is enforced: at the limit
    the job's processes get SIGTERM, then SIGKILL ``KILL_WAIT`` seconds later
    (as PBS and SLURM do); the job directory records ``walltime-killed``.
``python fake_pbs.py qstat ID...``
    the OpenPBS table (``Job id  Name  User  Time Use S Queue``) for jobs
    queued, running or exiting (``Q``, ``R``, ``E``); for finished ones
    "Job has finished, use -x or -H ..." on stderr and exit status 35; for
    unknown ones "Unknown Job Id" and 153.  ``-f`` prints OpenPBS's full
    records instead (``job_state = R``; ``Exit_status = N`` once finished),
    ``-x`` includes finished jobs (state ``F``).
``python fake_pbs.py qdel ID...``
    SIGTERM to the job's processes, SIGKILL after ``KILL_WAIT``.

State lives in ``$FAKE_PBS_DIR``: one directory per job with ``state``
(``Q``/``R``/``E``/``F``), ``mom.pid``, ``exit``, ``out``, ``err``.
:func:`install` writes ``qsub``/``qstat``/``qdel`` executables into a
directory for ``PATH``; :func:`leftovers` lists the moms still alive.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_WAIT = 5.0
SUFFIX = ".fakepbs"


def _state_dir() -> Path:
    return Path(os.environ["FAKE_PBS_DIR"])


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def install(bin_dir: Path) -> None:
    """Write ``qsub``, ``qstat`` and ``qdel`` executables (calling this module) into ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("qsub", "qstat", "qdel"):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {name} \"$@\"\n")
        path.chmod(0o755)


def moms(state_dir: Path) -> dict[str, int]:
    """``{job id: mom pid}`` of every job ever submitted."""
    out = {}
    for job in sorted(state_dir.iterdir()) if state_dir.exists() else []:
        pid = _read(job / "mom.pid")
        if pid:
            out[job.name] = int(pid)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def leftovers(state_dir: Path) -> dict[str, int]:
    """Jobs whose mom is still running."""
    return {jid: pid for jid, pid in moms(state_dir).items() if _alive(pid)}


def kill_all(state_dir: Path) -> None:
    """SIGKILL every job's processes and mom (test clean-up)."""
    for job in state_dir.iterdir() if state_dir.exists() else []:
        for name in ("job.pgid", "mom.pid"):
            pid = _read(job / name)
            if pid:
                try:
                    os.killpg(int(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


# ----------------------------------------------------------------------------- commands


def qsub(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: qsub SCRIPT", file=sys.stderr)
        return 2
    script = Path(argv[0]).read_text()
    name = "STDIN"
    walltime = ""
    for line in script.splitlines():
        m = re.match(r"#PBS\s+-N\s+(\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"#PBS\s+-l\s+walltime=(\S+)", line)
        if m:
            walltime = m.group(1)
    root = _state_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        n = int(_read(root / ".counter", "0")) + 1
        _write(root / ".counter", str(n))
    job_id = f"{n}{SUFFIX}"
    job = root / job_id
    job.mkdir()
    (job / "script.sh").write_text(script)
    _write(job / "name", name)
    _write(job / "walltime", walltime)
    _write(job / "workdir", os.getcwd())
    _write(job / "state", "Q")
    mom = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "mom", str(job)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    _write(job / "mom.pid", str(mom.pid))
    print(job_id)
    return 0


def qstat(argv: list[str]) -> int:
    root = _state_dir()
    flags = {a for a in argv if a in ("-x", "-f")}
    rows, records, status = [], [], 0
    for job_id in (a for a in argv if a not in flags):
        job = root / job_id
        state = _read(job / "state")
        if not state:
            print(f"qstat: Unknown Job Id {job_id}", file=sys.stderr)
            status = 153
        elif "-f" in flags and (state != "F" or "-x" in flags):
            record = [f"Job Id: {job_id}", f"    Job_Name = {_read(job / 'name')}",
                      f"    job_state = {state}"]
            if state == "F":
                record.append(f"    Exit_status = {_read(job / 'exit')}")
            records.append("\n".join(record) + "\n")
        elif state == "F" and "-x" not in flags:
            print(f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job "
                  "information", file=sys.stderr)
            status = status or 35
        else:
            shown = job_id if len(job_id) <= 16 else job_id[:15] + "*"
            rows.append(f"{shown:<17} {_read(job / 'name'):<16} {'root':<17} 00:00:00 {state} workq")
    if records:
        print("\n".join(records))
    if rows:
        print("Job id            Name             User              Time Use S Queue")
        print("----------------  ---------------- ----------------  -------- - -----")
        print("\n".join(rows))
    return status


def qdel(argv: list[str]) -> int:
    root = _state_dir()
    status = 0
    for job_id in argv:
        job = root / job_id
        state = _read(job / "state")
        if not state:
            print(f"qdel: Unknown Job Id {job_id}", file=sys.stderr)
            status = 153
            continue
        if state == "F":
            continue
        _write(job / "deleted", "1")
        pid = _read(job / "mom.pid")
        if pid:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
    return status


# ----------------------------------------------------------------------------- the mom


def _hms(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def mom(job: Path) -> int:
    """Run the job script; enforce the walltime; obey qdel (SIGTERM)."""
    stop = {"why": ""}

    def on_term(signum, frame):
        stop["why"] = stop["why"] or "deleted"

    signal.signal(signal.SIGTERM, on_term)
    env = dict(os.environ, PBS_JOBID=job.name, PBS_JOBNAME=_read(job / "name"),
               PBS_O_WORKDIR=_read(job / "workdir"), PBS_ENVIRONMENT="PBS_BATCH")
    walltime = _read(job / "walltime")
    limit = time.monotonic() + _hms(walltime) if walltime else None
    with open(job / "out", "wb") as out, open(job / "err", "wb") as err:
        proc = subprocess.Popen(["bash", str(job / "script.sh")], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env, cwd=_read(job / "workdir"),
                                process_group=0)
    _write(job / "job.pgid", str(proc.pid))
    _write(job / "state", "R")
    if _read(job / "deleted"):
        stop["why"] = "deleted"
    killed_at = None
    while True:
        try:
            code = proc.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        if limit is not None and time.monotonic() >= limit and not stop["why"]:
            stop["why"] = "walltime"
            _write(job / "walltime-killed", "1")
        if stop["why"] and killed_at is None:
            _write(job / "state", "E")
            _signal_group(proc.pid, signal.SIGTERM)
            killed_at = time.monotonic()
        if killed_at is not None and time.monotonic() - killed_at > KILL_WAIT:
            _signal_group(proc.pid, signal.SIGKILL)
    # What the script left running gets until KILL_WAIT to exit, then SIGKILL (as PBS does).
    _write(job / "state", "E")
    deadline = time.monotonic() + KILL_WAIT
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    _write(job / "exit", str(code))
    _write(job / "state", "F")
    return 0


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "mom":
        return mom(Path(rest[0]))
    return {"qsub": qsub, "qstat": qstat, "qdel": qdel}[command](rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
