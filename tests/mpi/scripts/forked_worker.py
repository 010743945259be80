"""Drive a forked pre-warmed worker process (``prewarm(fork=True)``) and print what we saw.

Run in a fresh interpreter (one thread, no MPI) by tests/mpi/test_forked_worker.py:

    python forked_worker.py use      # a TLS nanny hands its options to the fork; then a restart
    python forked_worker.py discard  # an unused fork is reaped by discard_warm()
    python forked_worker.py orphan   # print the fork's pid, then wait to be killed
"""

import asyncio
import json
import os
import sys
import time


def describe():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "sys_path": sys.path,
            "sys_argv": sys.argv, "fds": fds, "rank_var": os.environ.get("PMI_RANK"),
            "extra": os.environ.get("FORK_TEST_EXTRA")}


def main(mode):
    from cluster.runtime import process

    # An inheritable descriptor, as an MPI launcher's PMI socket is: the fork must drop it.
    keep_r, keep_w = os.pipe()
    os.set_inheritable(keep_r, True)
    os.environ["PMI_RANK"] = "7"  # a launcher's variable, left out of the child's environment
    env = process.child_environment({"FORK_TEST_EXTRA": "yes"})
    del env["PMI_RANK"]
    pid = process.prewarm(env, fork=True)
    del os.environ["PMI_RANK"]  # as the launcher does once MPI has read it
    out = {"pid": pid, "forked": process._warm.forked, "me": os.getpid(), "cwd": os.getcwd(),
           "inherited_fd": keep_r, "inherited_pipe": os.readlink(f"/proc/self/fd/{keep_r}")}
    if mode == "orphan":
        print(json.dumps(out), flush=True)
        time.sleep(120)
        return
    if mode == "discard":
        process.discard_warm()
        out["returncode_after_discard"] = _returncode(pid)
        print(json.dumps(out), flush=True)
        return
    out.update(asyncio.run(use(process, pid, env)))
    print(json.dumps(out), flush=True)


def _returncode(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    return "alive"


async def use(process, pid, env):
    from cluster.runtime import Client, Nanny, Scheduler
    from cluster.runtime.security import Security

    security = Security.temporary()
    out = {}
    async with Scheduler(host="127.0.0.1", security=security) as s:
        async with Nanny(s.address, nthreads=1, name="forked", security=security,
                         env={"FORK_TEST_EXTRA": "yes"}) as nanny:
            out["nanny_pid"] = nanny.pid
            out["warm_left"] = process._warm is not None
            async with Client(s.address, asynchronous=True, security=security) as c:
                out["first"] = await c.submit(describe, pure=False)
                nanny.process.kill()  # a crash: the nanny starts a fresh interpreter
                deadline = time.monotonic() + 60
                while nanny.pid in (None, pid) or not nanny.worker_address:
                    assert time.monotonic() < deadline, "no restarted worker"
                    await asyncio.sleep(0.05)  # polling interval of the deadline loop
                await c.wait_for_workers(1)
                out["second"] = await c.submit(describe, pure=False)
    out["first_alive_after"] = _returncode(pid)
    return out


if __name__ == "__main__":
    main(sys.argv[1])
