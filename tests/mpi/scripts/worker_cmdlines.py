"""Print, for each worker process, its command line, its ``sys.argv`` and ``sys.path``, its
parent's command line and pid, and whether its environment has MPI rank variables."""

import json
import os
import sys

from cluster import Client


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


def describe():
    rank_vars = sorted(k for k in os.environ if k.startswith(("PMI_", "PMIX_", "OMPI_COMM_WORLD_")))
    return {"argv": _cmdline("self"), "sys_argv": sys.argv, "sys_path": sys.path,
            "parent_argv": _cmdline(os.getppid()), "rank_vars": rank_vars, "ppid": os.getppid(),
            "pid": os.getpid()}


if __name__ == "__main__":
    with Client() as client:
        print(json.dumps({"workers": sorted(client.run(describe).values(), key=str),
                          "cwd": os.getcwd()}), flush=True)
