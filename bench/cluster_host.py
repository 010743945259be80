"""A LocalCluster in a process of its own, for measuring the scheduler's CPU time.

    python -m bench.cluster_host --system {ours,dask} --info FILE

Both systems' ``LocalCluster`` run the scheduler in the process that makes the
cluster, on the event-loop thread that the client in that process shares. To
measure the scheduler alone, the ``graph_100k`` collection case makes the
cluster here, with the same arguments as every other benchmark (2 worker
processes x 1 thread, loopback, ours with its default TLS), and the client
connects from the benchmark process. This process holds the scheduler and the
nannies (both systems supervise their worker processes from the process that
made the cluster); the worker processes are its children.

It writes ``{"address", "pid", "security"}`` to FILE once the workers are up
(``security``: the path of our cluster's credentials file, or null) and closes
the cluster when its standard input reaches end of file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.cluster_host")
    p.add_argument("--system", required=True, choices=("ours", "dask"))
    p.add_argument("--info", required=True)
    args = p.parse_args(argv)
    from bench.common import N_WORKERS
    from bench.run_client import cluster_kwargs, import_system

    _, LocalCluster = import_system(args.system)
    cluster = LocalCluster(**cluster_kwargs(args.system, LocalCluster))
    try:
        deadline = time.monotonic() + 60
        while True:
            n = len(cluster.scheduler_info["workers"]) if args.system == "dask" else \
                len(cluster.scheduler.state.workers)
            if n >= N_WORKERS:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {n} of {N_WORKERS} workers after 60 s")
            time.sleep(0.05)
        security = None
        if args.system == "ours" and getattr(cluster, "security", None) is not None:
            security = cluster.security.to_file(args.info + ".security")
        tmp = args.info + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"address": cluster.scheduler_address, "pid": os.getpid(),
                       "security": security}, f)
        os.replace(tmp, args.info)
        sys.stdin.read()  # until the benchmark process closes our stdin (or dies)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
