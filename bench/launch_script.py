"""The script of the ``mpi-launch`` benchmark's shutdown measurement.

Run under MPI in script mode by ``bench.run_launch``:

    mpiexec -n N python -m cluster --nthreads 1 --interface lo \
        bench/launch_script.py --system ours --workers N-1 --out MARKS.json
    mpiexec -n N python bench/launch_script.py --system dask-mpi --workers N-2 --out MARKS.json

With ``--system dask-mpi`` every rank runs this file and ``dask_mpi.initialize()``
keeps all ranks but rank 1 (the client) inside it until the job ends.

The client waits for all workers, does a tiny computation, closes its client
and writes wall-clock marks to ``--out`` (atomically): ``t_ready`` once every
worker is connected, and ``t_end`` as the very last thing before the script
returns. The driver times ``t_end`` -> ``mpiexec`` returned.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def write_marks(path, marks):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(marks, f)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True, choices=["ours", "dask-mpi"])
    p.add_argument("--workers", type=int, required=True, help="workers to wait for")
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=90.0, help="limit for the workers to come")
    args = p.parse_args()

    if args.system == "dask-mpi":
        import dask_mpi

        # Loopback only; no dashboard (it needs bokeh, which the bench extra does not
        # install); otherwise dask-mpi's defaults (distributed.Worker, no nanny).
        dask_mpi.initialize(interface="lo", dashboard=False, nthreads=1)
        from distributed import Client  # only rank 1 (the client) gets here
    else:
        from cluster import Client

    from bench.workloads import inc

    marks = {"system": args.system, "pid": os.getpid(), "t_start": time.time()}
    with Client() as client:
        client.wait_for_workers(args.workers, timeout=args.timeout)
        marks["t_ready"] = time.time()
        info = client.scheduler_info()
        marks["scheduler"] = info.get("address")
        marks["workers"] = sorted(info["workers"])
        write_marks(args.out, marks)
        total = sum(client.gather(client.map(inc, range(10), pure=False)))
        if total != 55:
            raise AssertionError(f"sum of inc over range(10) is {total}, expected 55")
    marks["t_end"] = time.time()
    write_marks(args.out, marks)


if __name__ == "__main__":
    main()
