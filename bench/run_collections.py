"""Child process: one dask collection case on ours or on dask.distributed.

    python -m bench.run_collections --system {ours,dask} --case C \
        --repeat N --sizes JSON --out RESULT.json

Starts the same LocalCluster as bench/run_client.py (2 worker processes x 1
thread, loopback, ours with TLS as shipped) in this process and opens a
Client on it, which becomes dask's default scheduler on both systems. The
case's collection is built, then ``.compute()`` is timed end to end, after an
untimed warm-up run of the case at its --quick size. For ``graph_100k`` the
cluster runs in a separate process (bench/cluster_host.py) so that the
scheduler's CPU time can be measured on its own: ``psutil`` CPU times of that
process (scheduler + nannies) and of this one (the client) around each
``.compute()``. Every measurement goes to the result file as soon as it is taken.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import psutil

from bench import workloads as w
from bench.collections_cases import BIG, CASE_KEYS, CASES_BY_KEY, COLLECTION_SIZES, count_tasks
from bench.common import N_WORKERS, ResultFile
from bench.run_client import (
    _close,
    check_loopback,
    import_system,
    scheduler_address,
    start_cluster,
    wait_for_workers,
)

#: dask settings for both systems: the task-based dataframe shuffle (ours sets it
#: itself; dask as shipped would choose its p2p shuffle when pyarrow is installed).
DASK_CONFIG = {"dataframe.shuffle.method": "tasks"}


def _cpu(proc):
    t = proc.cpu_times()
    return t.user + t.system


class HostedCluster:
    """A cluster in a bench.cluster_host process, and a Client connected to it."""

    def __init__(self, system, Client, info_path, timeout=90.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cluster_host", "--system", system, "--info", info_path],
            stdin=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not os.path.exists(info_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster_host exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster_host not ready after {timeout:.0f}s")
            time.sleep(0.05)
        with open(info_path) as f:
            info = json.load(f)
        self.address = info["address"]
        self.host = psutil.Process(info["pid"])
        if system == "ours":
            from cluster import Security

            sec = Security.from_file(info["security"]) if info["security"] else None
            self.client = Client(self.address, security=sec)
        else:
            self.client = Client(self.address)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def run_case(case, client, res, sizes, repeat, host):
    import dask

    quick = COLLECTION_SIZES["quick"]
    coll, check = case.build(quick)  # warm-up: imports and code paths on the workers
    check(coll.compute())
    del coll
    if case.key == BIG:
        repeat = min(repeat, sizes["big_repeat"])
        coll, _ = case.build(sizes)
        res.set(info={"tasks": count_tasks(coll), "scheduler_process": "separate"})
        del coll
    me = psutil.Process()
    for _ in range(repeat):
        coll, check = case.build(sizes)
        gc.collect()
        time.sleep(0.3)
        if host is not None:
            s0, c0 = _cpu(host), _cpu(me)
        t0 = time.perf_counter()
        value = coll.compute()
        dt = time.perf_counter() - t0
        metrics = {"seconds": dt}
        if host is not None:
            metrics.update(scheduler_cpu_s=_cpu(host) - s0, client_cpu_s=_cpu(me) - c0)
        check(value)
        res.record(**metrics)
        del coll, value
        assert dask.config.get("dataframe.shuffle.method") == "tasks"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.run_collections")
    parser.add_argument("--system", required=True, choices=("ours", "dask"))
    parser.add_argument("--case", required=True, choices=CASE_KEYS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", required=True, help="JSON dict of problem sizes")
    parser.add_argument("--out", required=True, help="result file (JSON)")
    args = parser.parse_args(argv)
    sizes = json.loads(args.sizes)
    res = ResultFile(args.out, args.system, args.case, sizes)
    client = cluster = hosted = None
    code = 1
    try:
        Client, LocalCluster = import_system(args.system)
        import dask

        dask.config.set(DASK_CONFIG)
        case = CASES_BY_KEY[args.case]
        res.phase("start")
        t0 = time.perf_counter()
        if case.key == BIG:
            hosted = HostedCluster(args.system, Client, args.out + ".host.json")
            client = hosted.client
        else:
            cluster, client = start_cluster(args.system, Client, LocalCluster)
        workers = wait_for_workers(client, N_WORKERS)
        check_loopback([hosted.address if hosted else scheduler_address(cluster, client),
                        *workers])
        if client.submit(w.inc, 1, pure=False).result() != 2:
            raise AssertionError("inc(1) != 2")
        res.set(cluster_start_s=time.perf_counter() - t0, workers=workers)
        res.ready()
        res.phase("running")
        run_case(case, client, res, sizes, args.repeat, hosted.host if hosted else None)
        res.set(phase="done", ok=True)
        code = 0
    except BaseException as exc:  # noqa: B036 - record KeyboardInterrupt too
        res.fail(exc)
        print(res.data.get("traceback", ""), file=sys.stderr)
    closed = _close(client, cluster)
    if hosted is not None:
        hosted.close()
    sys.stdout.flush()
    sys.stderr.flush()
    if not closed:
        print("bench: close timed out", file=sys.stderr)
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
