"""Child process: one workload on a dask-style Client (our runtime or dask).

    python -m bench.run_client --system {ours,dask} --workload W \
        --repeat N --sizes JSON --out RESULT.json

Starts a LocalCluster with 2 worker processes x 1 thread, runs the workload
``--repeat`` times and writes every measurement to the result file as soon as
it is taken. Any exception is recorded in the result file (exit code 1).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import ipaddress
import json
import os
import sys
import threading
import time
from urllib.parse import urlsplit

from bench import workloads as w
from bench.common import (
    CLIENT_SYSTEMS,
    N_WORKERS,
    THREADS_PER_WORKER,
    ResultFile,
    add_common_args,
    percentile,
)


def import_system(system):
    if system in ("dask", "dask-tuned"):
        from distributed import Client, LocalCluster
    elif system in ("ours", "ours-plain"):
        from cluster import Client, LocalCluster
    else:
        raise ValueError(f"unknown client system {system!r}")
    return Client, LocalCluster


def cluster_kwargs(system, LocalCluster):
    """The keyword arguments of the benchmarks' LocalCluster for ``system``."""
    kwargs = {
        "n_workers": N_WORKERS,
        "threads_per_worker": THREADS_PER_WORKER,
        "processes": True,
    }
    if system in ("dask", "dask-tuned"):
        # dask-tuned: its settings come from DASK_* variables (bench.common.DASK_TUNED).
        kwargs.update(dashboard_address=None, host="127.0.0.1")
    else:
        # Our runtime: bind to loopback explicitly if the constructor takes a host.
        try:
            params = inspect.signature(LocalCluster).parameters
        except (TypeError, ValueError):
            params = {}
        if "host" in params:
            kwargs["host"] = "127.0.0.1"
        # Same as dask's run above: no status page.  TLS stays as we ship it
        # (on by default; dask's default is plain TCP), so ours pays for it here.
        if "dashboard_address" in params:
            kwargs["dashboard_address"] = None
        if system == "ours-plain":
            kwargs["security"] = False  # plain TCP, as dask ships
    return kwargs


def check_dask_tuned(client):
    """The tuned settings as the scheduler and a worker process see them (they must have
    taken effect, or the column is not what it says)."""
    import dask

    from bench.common import DASK_TUNED

    def sched_view(dask_scheduler=None):
        import asyncio

        return {"WORKER_SATURATION": str(dask_scheduler.WORKER_SATURATION),
                "loop": type(asyncio.get_running_loop()).__module__}

    def worker_view():
        import asyncio

        import dask

        return {k: str(dask.config.get(k)) for k in DASK_TUNED} | {
            "loop": type(asyncio.get_running_loop()).__module__}

    seen = {"client": {k: str(dask.config.get(k)) for k in DASK_TUNED},
            "scheduler": client.run_on_scheduler(sched_view),
            "workers": client.run(worker_view)}
    if seen["scheduler"]["WORKER_SATURATION"] != "inf":
        raise AssertionError(f"worker-saturation did not take effect: {seen}")
    for view in seen["workers"].values():
        if view["distributed.worker.profile.enabled"] != "False" or "uvloop" not in view["loop"]:
            raise AssertionError(f"dask-tuned settings missing on a worker: {seen}")
    return seen


class CPU:
    """CPU seconds (user + system) of this process (client, scheduler and nannies, as
    both systems' LocalCluster keep them here) and of the worker processes."""

    def __init__(self, client, workers):
        import psutil

        self.me = psutil.Process()
        pids = client.run(w.getpid)
        self.workers = {a: psutil.Process(pids[a]) for a in workers}

    @staticmethod
    def _t(p):
        # The scheduler's per-thread run time (ns) where Linux keeps it: psutil's
        # user + system comes in clock ticks (10 ms), too coarse for one transfer.
        try:
            total = 0
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            return total / 1e9
        except (OSError, ValueError, IndexError):
            t = p.cpu_times()
            return t.user + t.system

    def snap(self):
        return self._t(self.me), {a: self._t(p) for a, p in self.workers.items()}

    def since(self, snap):
        me, ws = self.snap()
        return me - snap[0], {a: ws[a] - snap[1][a] for a in ws}


def start_cluster(system, Client, LocalCluster):
    cluster = LocalCluster(**cluster_kwargs(system, LocalCluster))
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    return cluster, client


def wait_for_workers(client, n, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info()["workers"]
        if len(workers) >= n:
            return sorted(workers)
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(workers)} of {n} workers after {timeout:.0f}s")
        time.sleep(0.05)


def _host_of(address):
    """The host part of an address such as 'tcp://127.0.0.1:4000' (None if none)."""
    if not isinstance(address, str):
        return None
    if "://" not in address:
        address = "tcp://" + address
    parts = urlsplit(address)
    if parts.scheme in ("inproc", "ipc", "unix", "local"):
        return None
    return parts.hostname


def check_loopback(addresses):
    """Refuse to benchmark a cluster listening on a non-loopback address."""
    for address in addresses:
        host = _host_of(address)
        if host is None or host == "localhost":
            continue
        try:
            loop = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loop = False
        if not loop:
            raise RuntimeError(f"address {address!r} is not on loopback; refusing to run")


def scheduler_address(cluster, client):
    for obj, attr in ((cluster, "scheduler_address"), (client, "scheduler_address")):
        value = getattr(obj, attr, None)
        if isinstance(value, str):
            return value
    try:
        return client.scheduler_info().get("address")
    except Exception:
        return None


def settle():
    """Let released futures be forgotten before the next repeat."""
    gc.collect()
    time.sleep(0.3)


def warm_up(client):
    client.gather(client.map(w.noop, range(50), pure=False))
    for i in range(5):
        client.submit(w.inc, i, pure=False).result()
    settle()


# --- workloads ---------------------------------------------------------------


def wl_noop_map(client, res, sizes, repeat, workers):
    n = sizes["noop_tasks"]
    warm_up(client)
    cpu = CPU(client, workers)
    for _ in range(repeat):
        c0 = cpu.snap()
        t0 = time.perf_counter()
        futures = client.map(w.noop, range(n), pure=False)
        out = client.gather(futures)
        dt = time.perf_counter() - t0
        mine, theirs = cpu.since(c0)
        if len(out) != n:
            raise AssertionError(f"gathered {len(out)} results, expected {n}")
        del futures, out
        res.record(noop_tasks_per_s=n / dt, noop_s=dt, noop_cpu_client_us=mine * 1e6 / n,
                   noop_cpu_workers_us=sum(theirs.values()) * 1e6 / n)
        settle()


def wl_tree_reduce(client, res, sizes, repeat, workers):
    n = sizes["tree_leaves"]
    ntasks = 2 * n - 1
    warm_up(client)
    cpu = CPU(client, workers)
    for _ in range(repeat):
        nxt = None
        c0 = cpu.snap()
        t0 = time.perf_counter()
        level = client.map(w.leaf, range(n), pure=False)
        while len(level) > 1:
            nxt = [
                client.submit(w.add, level[i], level[i + 1], pure=False)
                for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        total = level[0].result()
        dt = time.perf_counter() - t0
        mine, theirs = cpu.since(c0)
        if total != n * (n - 1) // 2:
            raise AssertionError(f"tree sum {total} != {n * (n - 1) // 2}")
        del level, nxt
        res.record(tree_tasks_per_s=ntasks / dt, tree_s=dt, tree_tasks=ntasks,
                   tree_cpu_client_us=mine * 1e6 / ntasks,
                   tree_cpu_workers_us=sum(theirs.values()) * 1e6 / ntasks)
        settle()


def wl_roundtrip(client, res, sizes, repeat, workers):
    n = sizes["roundtrips"]
    warm_up(client)
    for i in range(20):
        client.submit(w.inc, i, pure=False).result()
    cpu = CPU(client, workers)
    for _ in range(repeat):
        lat = []
        c0 = cpu.snap()
        for i in range(n):
            t0 = time.perf_counter()
            value = client.submit(w.inc, i, pure=False).result()
            lat.append(time.perf_counter() - t0)
            if value != i + 1:
                raise AssertionError(f"inc({i}) returned {value!r}")
        mine, theirs = cpu.since(c0)
        lat_us = [x * 1e6 for x in lat]
        res.record(
            roundtrip_median_us=percentile(lat_us, 50),
            roundtrip_p99_us=percentile(lat_us, 99),
            roundtrip_cpu_client_us=mine * 1e6 / n,
            roundtrip_cpu_workers_us=sum(theirs.values()) * 1e6 / n,
        )
        settle()


def wl_transfer(client, res, sizes, repeat, workers):
    size = sizes["transfer_bytes"]
    a, b = workers[0], workers[1]
    pids = client.run(w.getpid)
    if a not in pids or b not in pids:
        raise RuntimeError(f"client.run keys {sorted(pids)} do not match workers {workers}")
    res.set(info={**res.data["info"], "worker_a": a, "worker_b": b})
    cpu = CPU(client, workers)
    mb = size / 1e6

    def once(maker, nbytes, kind=None):
        src = client.submit(maker, nbytes, workers=[a], pure=False)
        # Materialise the object on A without pulling it to the client.
        got, pid = client.submit(w.nbytes_of, src, workers=[a], pure=False).result()
        if pid != pids[a] or got != nbytes:
            raise AssertionError(f"source task ran in pid {pid} (A is {pids[a]}), size {got}")
        c0 = cpu.snap()
        t0 = time.perf_counter()
        got, pid = client.submit(w.nbytes_of, src, workers=[b], pure=False).result()
        dt = time.perf_counter() - t0
        _, theirs = cpu.since(c0)
        if kind is not None:
            res.record(**{f"transfer_{kind}_MBps": mb / dt, f"transfer_{kind}_s": dt,
                          f"transfer_{kind}_cpu_send": theirs[a] * 1e3 / mb,
                          f"transfer_{kind}_cpu_recv": theirs[b] * 1e3 / mb})
        if pid != pids[b] or got != nbytes:
            raise AssertionError(f"dependent task ran in pid {pid} (B is {pids[b]}), size {got}")
        del src
        return dt

    floor = measure_floor(size, repeat)
    res.extend(floor_MBps=floor["fresh_MBps"], floor_warm_MBps=floor["warm_MBps"],
               floor_cpu=floor["fresh_cpu_ms_per_MB"], floor_tls_MBps=floor["tls_MBps"],
               floor_tls_cpu=floor["tls_cpu_ms_per_MB"])
    res.set(info={**res.data["info"], "tls_cipher": floor["tls_cipher"]})
    for kind, maker in (("numpy", w.make_array), ("bytes", w.make_bytes)):
        once(maker, size)  # warm-up: opens the A->B connection, first-touches buffers
        settle()
        for _ in range(repeat):
            once(maker, size, kind)
            settle()


def measure_floor(size, repeat):
    """bench/floor.py's raw-socket figures, measured now, beside this system's run."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "bench.floor", "--bytes", str(size),
                          "--repeat", str(repeat)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def wl_rss(client, res, sizes, repeat, workers):
    time.sleep(1.0)  # idle: nothing but the start-up ping has run
    for _ in range(repeat):
        sched = client.run_on_scheduler(w.rss)
        per_worker = client.run(w.rss)
        res.record(
            scheduler_rss_MB=sched / 1e6,
            worker_rss_MB=per_worker[workers[0]] / 1e6,
            worker_rss_all_MB=[per_worker[k] / 1e6 for k in sorted(per_worker)],
        )
        time.sleep(0.5)


WORKLOAD_FUNCS = {
    "noop_map": wl_noop_map,
    "tree_reduce": wl_tree_reduce,
    "roundtrip": wl_roundtrip,
    "transfer": wl_transfer,
    "rss": wl_rss,
}


def _close(client, cluster, timeout=30.0):
    """Close client and cluster; give up (the parent kills leftovers) after timeout."""

    def target():
        for obj in (client, cluster):
            if obj is None:
                continue
            try:
                obj.close()
            except Exception as exc:
                print(f"bench: close {type(obj).__name__}: {exc!r}", file=sys.stderr)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.run_client")
    parser.add_argument("--system", required=True, choices=CLIENT_SYSTEMS)
    add_common_args(parser)
    args = parser.parse_args(argv)
    sizes = json.loads(args.sizes)
    res = ResultFile(args.out, args.system, args.workload, sizes)
    client = cluster = None
    code = 1
    try:
        Client, LocalCluster = import_system(args.system)
        res.phase("start")
        t0 = time.perf_counter()
        cluster, client = start_cluster(args.system, Client, LocalCluster)
        workers = wait_for_workers(client, N_WORKERS)
        check_loopback([scheduler_address(cluster, client), *workers])
        if client.submit(w.inc, 1, pure=False).result() != 2:
            raise AssertionError("inc(1) != 2")
        res.set(cluster_start_s=time.perf_counter() - t0, workers=workers)
        if args.system == "dask-tuned":
            res.set(info={"dask_tuned": check_dask_tuned(client)})
        res.ready()
        res.phase("running")
        WORKLOAD_FUNCS[args.workload](client, res, sizes, args.repeat, workers)
        res.set(phase="done", ok=True)
        code = 0
    except BaseException as exc:  # noqa: B036 - record KeyboardInterrupt too
        res.fail(exc)
        print(res.data.get("traceback", ""), file=sys.stderr)
    closed = _close(client, cluster)
    sys.stdout.flush()
    sys.stderr.flush()
    if not closed:
        print("bench: close timed out", file=sys.stderr)
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
