"""Child process: one workload on mpi4py.futures.

Run by the parent under MPI, with rank 0 as the client/"scheduler" and ranks
1..2 as the two workers:

    mpiexec -n 3 python -m mpi4py.futures -m bench.run_mpi --workload W \
        --repeat N --sizes JSON --out RESULT.json

Tasks are the same module-level functions as for the other systems
(bench.workloads), pickled by reference. mpi4py.futures has no
worker-to-worker data movement, so the ``transfer`` workload is n/a.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench import workloads as w
from bench.common import N_WORKERS, ResultFile, add_common_args, percentile


def warm_up(ex):
    list(ex.map(w.noop, range(50)))
    for i in range(5):
        ex.submit(w.inc, i).result()


def wl_noop_map(ex, res, sizes, repeat):
    n = sizes["noop_tasks"]
    warm_up(ex)
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = list(ex.map(w.noop, range(n)))  # chunksize=1: one message per task
        dt = time.perf_counter() - t0
        if len(out) != n:
            raise AssertionError(f"got {len(out)} results, expected {n}")
        res.record(noop_tasks_per_s=n / dt, noop_s=dt)


def wl_tree_reduce(ex, res, sizes, repeat):
    # No futures-as-arguments in mpi4py.futures: reduce level by level, values
    # travel through rank 0. Same task count as the futures-graph version.
    n = sizes["tree_leaves"]
    ntasks = 2 * n - 1
    warm_up(ex)
    for _ in range(repeat):
        t0 = time.perf_counter()
        level = list(ex.map(w.leaf, range(n)))
        while len(level) > 1:
            carry = [level[-1]] if len(level) % 2 else []
            level = list(ex.map(w.add, level[0:-1:2], level[1::2])) + carry
        total = level[0]
        dt = time.perf_counter() - t0
        if total != n * (n - 1) // 2:
            raise AssertionError(f"tree sum {total} != {n * (n - 1) // 2}")
        res.record(tree_tasks_per_s=ntasks / dt, tree_s=dt, tree_tasks=ntasks)


def wl_roundtrip(ex, res, sizes, repeat):
    n = sizes["roundtrips"]
    warm_up(ex)
    for i in range(20):
        ex.submit(w.inc, i).result()
    for _ in range(repeat):
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            value = ex.submit(w.inc, i).result()
            lat.append(time.perf_counter() - t0)
            if value != i + 1:
                raise AssertionError(f"inc({i}) returned {value!r}")
        lat_us = [x * 1e6 for x in lat]
        res.record(
            roundtrip_median_us=percentile(lat_us, 50),
            roundtrip_p99_us=percentile(lat_us, 99),
        )


def wl_transfer(ex, res, sizes, repeat):
    res.set(skipped="mpi4py.futures has no worker-to-worker transfer")


def wl_rss(ex, res, sizes, repeat):
    time.sleep(1.0)
    for _ in range(repeat):
        # Rank 0 runs the executor's manager threads: the closest thing to a
        # scheduler (like dask's LocalCluster, whose scheduler lives in the
        # client process).
        sched = w.rss()
        worker = ex.submit(w.rss).result()
        res.record(scheduler_rss_MB=sched / 1e6, worker_rss_MB=worker / 1e6)
        time.sleep(0.5)


WORKLOAD_FUNCS = {
    "noop_map": wl_noop_map,
    "tree_reduce": wl_tree_reduce,
    "roundtrip": wl_roundtrip,
    "transfer": wl_transfer,
    "rss": wl_rss,
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.run_mpi")
    add_common_args(parser)
    args = parser.parse_args(argv)
    sizes = json.loads(args.sizes)
    res = ResultFile(args.out, "mpi", args.workload, sizes)
    code = 1
    try:
        from mpi4py import MPI
        from mpi4py.futures import MPIPoolExecutor

        res.phase("start")
        t0 = time.perf_counter()
        with MPIPoolExecutor() as ex:
            ex.bootup(wait=True)
            if ex.num_workers != N_WORKERS:
                raise RuntimeError(
                    f"{ex.num_workers} MPI workers, expected {N_WORKERS} "
                    f"(run under mpiexec -n {N_WORKERS + 1} python -m mpi4py.futures)"
                )
            if ex.submit(w.inc, 1).result() != 2:
                raise AssertionError("inc(1) != 2")
            res.set(
                cluster_start_s=time.perf_counter() - t0,
                info={"mpi_library": MPI.Get_library_version().splitlines()[0].strip()},
            )
            res.ready()
            res.phase("running")
            WORKLOAD_FUNCS[args.workload](ex, res, sizes, args.repeat)
        res.set(phase="done", ok=True)
        code = 0
    except BaseException as exc:  # noqa: B036 - record KeyboardInterrupt too
        res.fail(exc)
        print(res.data.get("traceback", ""), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
