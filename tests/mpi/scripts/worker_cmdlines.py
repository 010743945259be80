"""Print each worker process's command line and whether its environment has MPI rank variables."""

import json
import os

from cluster import Client


def describe():
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    rank_vars = sorted(k for k in os.environ if k.startswith(("PMI_", "PMIX_", "OMPI_COMM_WORLD_")))
    return {"argv": argv, "rank_vars": rank_vars, "ppid": os.getppid()}


if __name__ == "__main__":
    with Client() as client:
        print(json.dumps({"workers": sorted(client.run(describe).values(), key=str)}), flush=True)
