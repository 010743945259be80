"""dask collections and graphs on a real LocalCluster with worker processes (issue 11).

Every workload is computed twice: on the cluster (``client.compute``/``persist``/
``get``, ``dask.compute(scheduler=client)``, ``.compute()`` with a default
Client) and on dask's local threaded scheduler, and the results must agree.
That the work really ran in the worker processes is checked with tasks that
record ``os.getpid()`` and with the scheduler's transition log.

One cluster (2 worker processes with a nanny each, 1 thread, ``GPU: 1`` of
resources) is shared by the tests of this module; it starts before the first
test's leak snapshot and stops after the last one's.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import os
import pathlib
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
db = pytest.importorskip("dask.bag")
pd = pytest.importorskip("pandas")

from cluster.runtime.errors import RemoteTraceback  # noqa: E402
from cluster.runtime.loop import sync  # noqa: E402
from dask._task_spec import Alias, DataNode, Task, TaskRef  # noqa: E402

from cluster import Client, Future, LocalCluster, futures_of, get_worker, progress, wait  # noqa: E402
from tests.helpers import until_sync  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# ----------------------------------------------------------------------------- task functions
# Module level: the worker processes import this module to unpickle them.


def pid_block(block):
    """A 1x1 (or 1-d length-1) block holding the pid of the process that ran it."""
    return np.full((1,) * block.ndim, os.getpid())


def pid_partition(df):
    return pd.DataFrame({"pid": [os.getpid()]})


def pid_of(*_):
    return os.getpid()


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def total(*xs):
    return sum(xs)


def smooth(block):
    """A 3-point moving sum along axis 0 (needs the neighbours' rows: map_overlap)."""
    out = block.copy()
    out[1:-1] = block[:-2] + block[1:-1] + block[2:]
    return out


def words(line):
    return line.split()


def plus_pid(x):
    return (x, os.getpid())


class DatasetError(Exception):
    """A task exception of our own type (raised in a worker, re-raised in the client)."""


def fail_on(x, bad):
    if x == bad:
        raise DatasetError(f"bad value {x}")
    return x


def read_text(path):
    with open(path) as f:
        return f.read()


def fail_block(block):
    if block.min() >= 0:
        raise DatasetError("block refused")
    return block


def flaky(path):
    """Fail the first call (a marker file says a call happened), succeed afterwards."""
    p = pathlib.Path(path)
    if not p.exists():
        p.write_text("failed once")
        raise OSError("transient failure")
    return "ok"


def count_call(path, x):
    """Append a line per call to ``path`` (every worker process appends to the same file)."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return x * 2


def count_block(block, path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return block


def where_and_gpu(*_):
    w = get_worker()
    return w.address, w.state.available_resources.get("GPU")


def wait_for_file(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)  # the task's own work: waiting for the test's go-ahead
    return "released"


def record(path, name):
    with open(path, "a") as f:
        f.write(name + "\n")
    return name


def big(n):
    return np.zeros(n)


# ----------------------------------------------------------------------------- helpers


def local(*colls, **kwargs):
    """The same collections computed by dask's local threaded scheduler.

    A pool of our own (shut down on return) rather than dask's global one, so no
    thread outlives the test (the leak checker counts threads).
    """
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dask.compute(*colls, scheduler="threads", pool=pool, **kwargs)


def on_scheduler(cluster, fn):
    """``fn(scheduler)`` run on the scheduler's event loop (it lives in this process)."""
    async def call():
        return fn(cluster.scheduler)

    return sync(cluster.loop, call)


def clock(cluster) -> float:
    return on_scheduler(cluster, lambda s: s.state.clock())


def computed_since(cluster, t0: float) -> collections.Counter:
    """How many times each key went processing -> memory on the scheduler since ``t0``."""
    entries = on_scheduler(cluster, lambda s: list(s.state.log.entries))
    return collections.Counter(e[0] for e in entries if e[5] >= t0 and e[1:3] == ("processing", "memory"))


def spilled_bytes(client) -> dict:
    def spilled():
        return get_worker().data.spilled_bytes_total

    return client.run(spilled)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      resources={"GPU": 1}) as cl:
        yield cl


@pytest.fixture(scope="module")
def c(cluster):
    """A client that is *not* dask's default scheduler (tests that need one make it)."""
    with Client(cluster, set_as_default=False) as client:
        # Open this process's connections to each worker now (results too big
        # to travel with the completion message are fetched from the worker),
        # so that they exist before the first test's leak snapshot.
        for addr in client.run(os.getpid):
            client.submit(big, 1_000_000, workers=[addr], pure=False).result(timeout=30)
        yield client


@pytest.fixture(scope="module")
def pids(c) -> dict:
    """``{worker address: pid}`` of the worker processes."""
    got = c.run(os.getpid)
    assert len(got) == 2 and os.getpid() not in got.values()
    return got


@pytest.fixture(autouse=True)
def dask_config_untouched():
    """No test leaves dask's scheduler or shuffle settings changed."""
    before = (dask.config.get("scheduler", None), dask.config.get("dataframe.shuffle.method", None))
    yield
    assert (dask.config.get("scheduler", None),
            dask.config.get("dataframe.shuffle.method", None)) == before


@pytest.fixture
def arr():
    return np.random.default_rng(0).random((240, 240))


# ----------------------------------------------------------------------------- dask.array


def test_array_workloads_match_threaded_scheduler_and_run_in_workers(c, cluster, pids, arr):
    x = da.from_array(arr, chunks=60)
    workloads = {
        "sum": x.sum(),
        "mean-axis0": x.mean(axis=0),
        "std": x.std(),
        "max-axis1": x.max(axis=1),
        "x+x.T": x + x.T,
        "reduce(x+x.T)": (x + x.T).sum(axis=1),
        "matmul": x @ x.T,
        "dot-vector": x.dot(x[:, 0]),
        "rechunk": x.rechunk((40, 120)),
        "rechunk-sum": x.rechunk((240, 10)).sum(axis=0),
        "slicing": x[::7, 13:200:3],
        "fancy-slicing": x[[3, 1, 200, 17]],
        "map_blocks": x.map_blocks(np.sin),
        "map_overlap": x.map_overlap(smooth, depth={0: 1, 1: 0}, boundary="none"),
        "cumsum": x.cumsum(axis=0),
        "argmax": x.argmax(axis=0),
    }
    expected = dict(zip(workloads, local(*workloads.values()), strict=True))
    t0 = clock(cluster)
    futures = c.compute(list(workloads.values()))
    assert isinstance(futures, list) and all(isinstance(f, Future) for f in futures)
    got = dict(zip(workloads, c.gather(futures), strict=True))
    for name in workloads:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, err_msg=name)
    # The numbers came from the cluster: every task went processing -> memory there.
    ran = computed_since(cluster, t0)
    assert sum(ran.values()) >= 16 * 16  # far more than one task per workload
    # ... in the worker processes.
    where = c.compute(x.map_blocks(pid_block, chunks=(1, 1)), sync=True)
    assert where.shape == (4, 4)
    assert set(where.ravel()) <= set(pids.values())
    assert os.getpid() not in set(where.ravel())


def test_array_random_and_reductions_with_dask_compute_scheduler_client(c, pids):
    rs = da.random.RandomState(42)
    x = rs.normal(10, 1, size=(300, 200), chunks=(50, 100))
    y = (x - x.mean(axis=0)) / x.std(axis=0)
    ours = dask.compute(y.sum(), (x ** 2).mean(), x.T[50:150].var(axis=1), scheduler=c)
    theirs = local(y.sum(), (x ** 2).mean(), x.T[50:150].var(axis=1))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    # scheduler=client.get, the dask scheduler protocol itself
    ours_get = dask.compute(x.sum(), x.map_blocks(pid_block, chunks=(1, 1)), scheduler=c.get)
    np.testing.assert_allclose(ours_get[0], theirs[1] * 0 + local(x.sum())[0])
    assert set(ours_get[1].ravel()) <= set(pids.values())


# ----------------------------------------------------------------------------- dask.dataframe


@pytest.fixture
def frames():
    rng = np.random.default_rng(1)
    n = 2_000
    left = pd.DataFrame({
        "id": rng.integers(0, 300, n),
        "group": rng.choice(list("abcdefg"), n),
        "x": rng.random(n),
        "y": rng.integers(0, 100, n),
    })
    right = pd.DataFrame({"id": np.arange(300), "weight": rng.random(300),
                          "label": [f"L{i % 13}" for i in range(300)]})
    return left, right


def test_dataframe_workloads(c, cluster, pids, frames):
    left, right = frames
    ddf = dd.from_pandas(left, npartitions=6)
    rdf = dd.from_pandas(right, npartitions=3)
    with c.as_current():  # a default client: merges shuffle with tasks
        assert dask.config.get("dataframe.shuffle.method") == "tasks"
        merged = ddf.merge(rdf, on="id", how="inner", shuffle_method="tasks")
        workloads = {
            "len": ddf.x.count(),
            "groupby-sum": ddf.groupby("group").x.sum(),
            "groupby-agg": ddf.groupby("group").agg({"x": ["mean", "max"], "y": "sum"}),
            "groupby-size": ddf.groupby(["group", "y"]).size(),
            "groupby-nunique": ddf.groupby("group").id.nunique(),
            "merge": merged[["id", "x", "weight"]],
            "merge-groupby": merged.groupby("label").weight.sum(),
            "set_index": ddf.set_index("id")[["x", "y"]],
            "set_index-loc": ddf.set_index("y").loc[10:20].x.sum(),
            "value_counts": ddf.group.value_counts(),
            "describe": ddf[["x", "y"]].describe(),
        }
        t0 = clock(cluster)
        got = dict(zip(workloads, c.compute(list(workloads.values()), sync=True), strict=True))
        ran = computed_since(cluster, t0)
        where = ddf.map_partitions(pid_partition, meta={"pid": "i8"}).compute()
    expected = dict(zip(workloads, local(*workloads.values()), strict=True))
    for name, exp in expected.items():
        g = got[name]
        if isinstance(exp, pd.DataFrame) and name in ("merge",):
            g = g.sort_values(["id", "x"]).reset_index(drop=True)
            exp = exp.sort_values(["id", "x"]).reset_index(drop=True)
        elif isinstance(exp, (pd.DataFrame, pd.Series)) and name != "describe":
            g, exp = g.sort_index(), exp.sort_index()
        if isinstance(exp, pd.DataFrame):
            pd.testing.assert_frame_equal(g, exp, check_exact=False, rtol=1e-10, obj=name)
        elif isinstance(exp, pd.Series):
            pd.testing.assert_series_equal(g, exp, check_exact=False, rtol=1e-10, obj=name)
        else:
            assert g == pytest.approx(exp), name
    assert sum(ran.values()) > 50
    # A shuffle ran: the merge's tasks include the task-based shuffle's.
    assert any("shuffle" in str(k) for k in ran), sorted(map(str, ran))[:20]
    assert set(where.pid) <= set(pids.values()) and len(where) == 6
    # and the pandas answers themselves
    exp_merge = left.merge(right, on="id")[["id", "x", "weight"]]
    pd.testing.assert_frame_equal(
        got["merge"].sort_values(["id", "x"]).reset_index(drop=True),
        exp_merge.sort_values(["id", "x"]).reset_index(drop=True), check_exact=False)
    # (dask's string columns are pyarrow strings: the index dtype differs from pandas')
    pd.testing.assert_series_equal(got["groupby-sum"].sort_index(), left.groupby("group").x.sum(),
                                   check_exact=False, check_index_type=False)


# ----------------------------------------------------------------------------- dask.bag


def test_bag_workloads(c, pids):
    lines = [f"the quick brown fox {i % 7} jumps over the lazy dog {i % 3}" for i in range(200)]
    b = db.from_sequence(lines, npartitions=8)
    tokens = b.map(words).flatten()
    nums = db.from_sequence(range(1000), npartitions=10)
    workloads = [
        tokens.count(),
        tokens.frequencies(sort=True),
        tokens.distinct(),
        nums.map(inc).filter(lambda v: v % 3 == 0).sum(),
        nums.foldby(lambda v: v % 5, add, 0, add, 0),
        nums.map(lambda v: [v] * (v % 3)).flatten().count(),
        nums.groupby(lambda v: v % 4).map(lambda kv: (kv[0], sum(kv[1]))),
        tokens.topk(3, key=len),
    ]
    got = c.compute(workloads, sync=True)
    expected = local(*workloads)
    normal = [sorted(g) if isinstance(g, list) else g for g in got]
    assert normal == [sorted(e) if isinstance(e, list) else e for e in expected]
    assert dict(got[1])["the"] == 400
    assert dict(got[4]) == {k: sum(v for v in range(1000) if v % 5 == k) for k in range(5)}
    where = set(c.compute(nums.map(plus_pid).pluck(1), sync=True))
    assert where <= set(pids.values()) and os.getpid() not in where


# ----------------------------------------------------------------------------- dask.delayed


def test_delayed_tree(c, pids):
    leaves = [dask.delayed(inc)(i) for i in range(64)]
    layer = leaves
    while len(layer) > 1:
        layer = [dask.delayed(add)(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
    root = layer[0]
    f = c.compute(root)
    assert isinstance(f, Future)
    assert f.result(timeout=30) == sum(range(1, 65)) == local(root)[0]
    # a delayed over Python containers holding delayed values
    nested = dask.delayed(lambda d: d["a"] + sum(d["b"]))({"a": leaves[0], "b": [leaves[1], 5]})
    assert c.compute(nested, sync=True) == 1 + 2 + 5
    ran_on = c.compute([dask.delayed(pid_of)(i, dask_key_name=f"pid-{i}") for i in range(8)], sync=True)
    assert set(ran_on) <= set(pids.values())


# ----------------------------------------------------------------------------- xarray


def test_xarray_groupby_over_time(c, pids):
    xr = pytest.importorskip("xarray")
    time_index = pd.date_range("2000-01-01", periods=730, freq="D")
    rng = np.random.default_rng(3)
    ds = xr.Dataset(
        {"temperature": (("time", "lat", "lon"), 15 + 8 * rng.standard_normal((730, 6, 8))),
         "rain": (("time", "lat", "lon"), rng.gamma(2.0, 1.0, (730, 6, 8)))},
        coords={"time": time_index, "lat": np.linspace(-50, 50, 6), "lon": np.arange(8) * 45.0},
    ).chunk({"time": 73, "lat": 3})
    assert dask.is_dask_collection(ds)
    monthly = ds.groupby("time.month").mean()
    anomalies = (ds.temperature.groupby("time.season") - ds.temperature.groupby("time.season").mean())
    yearly_max = ds.rain.resample(time="YE").max()
    ours = dask.compute(monthly, anomalies.std("time"), yearly_max, scheduler=c)
    theirs = local(monthly, anomalies.std("time"), yearly_max)
    for a, b in zip(ours, theirs, strict=True):
        xr.testing.assert_allclose(a, b)
    assert ours[0].temperature.shape == (12, 6, 8)
    # the same with persist: the dataset's chunks stay on the workers
    kept = c.persist(ds)
    assert {f.key for f in futures_of(kept)} and len(futures_of(kept)) == 2 * 10 * 2
    xr.testing.assert_allclose(dask.compute(kept.groupby("time.month").mean(), scheduler=c)[0],
                               theirs[0])
    where = c.compute(ds.temperature.data.map_blocks(pid_block, chunks=(1, 1, 1)), sync=True)
    assert set(where.ravel()) <= set(pids.values())


# ----------------------------------------------------------------------------- persist


def test_persist_then_further_computations_reuse_the_persisted_keys(c, cluster, pids, tmp_path, arr):
    calls = tmp_path / "calls"

    def n_calls():
        ran_in = [int(p) for p in calls.read_text().split()]
        assert set(ran_in) <= set(pids.values())
        return len(ran_in)

    x = da.from_array(arr, chunks=60).map_blocks(count_block, str(calls), meta=np.empty((0, 0)))
    x2 = c.persist(x * 2)
    assert type(x2) is type(x) and x2.shape == x.shape and x2.chunks == x.chunks
    fs = futures_of(x2)
    assert len(fs) == 16 and all(isinstance(f, Future) for f in fs)
    wait(x2, timeout=30)
    assert all(f.status == "finished" for f in fs)
    assert n_calls() == 16
    persisted = {f.key for f in fs}
    t0 = clock(cluster)
    results = c.compute([x2.sum(), x2.mean(axis=1), (x2 + x2.T)[10:100], x2 @ x2], sync=True)
    ran = computed_since(cluster, t0)
    # No persisted chunk (nor what it was made from) was computed again.
    assert not persisted & set(ran), sorted(persisted & set(ran))[:5]
    assert n_calls() == 16
    y2 = da.from_array(arr, chunks=60) * 2  # the same numbers, for dask's local scheduler
    expected = local(y2.sum(), y2.mean(axis=1), (y2 + y2.T)[10:100], y2 @ y2)
    for g, e in zip(results, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10)
    np.testing.assert_allclose(results[0], (arr * 2).sum())
    # .compute() of the persisted collection itself fetches the chunks: nothing runs again.
    np.testing.assert_allclose(dask.compute(x2, scheduler=c)[0], arr * 2)
    assert n_calls() == 16
    # Each persisted key reached memory exactly once in the scheduler's log.
    for f in fs:
        story = [e for e in c.story(f.key) if e[0] == f.key and tuple(e[1:3]) == ("processing", "memory")]
        assert len(story) == 1, story
    # a dataframe
    df = pd.DataFrame({"a": range(100), "b": [i % 4 for i in range(100)]})
    ddf = c.persist(dd.from_pandas(df, npartitions=4))
    assert type(ddf) is dd.DataFrame and len(futures_of(ddf)) == 4
    pd.testing.assert_series_equal(ddf.groupby("b").a.sum().compute(scheduler=c),
                                   df.groupby("b").a.sum(), check_index_type=False)


def test_persist_list_of_dataframes(c):
    df = pd.DataFrame({"a": range(100), "b": [i % 4 for i in range(100)]})
    d1 = dd.from_pandas(df, npartitions=4)
    p1, p2 = c.persist([d1, d1[d1.a > 10]])
    assert len(futures_of(p1)) == 4 and len(futures_of(p2)) == 4
    pd.testing.assert_frame_equal(p2.compute(scheduler=c), df[df.a > 10])


@pytest.mark.parametrize("kinds", ["arrays", "bag+dataframe", "array+dataframe", "dask.persist"])
def test_persist_list_of_several_collections(c, kinds):
    x = da.arange(100, chunks=10)
    b = db.from_sequence(range(30), npartitions=3).map(inc)
    df = dd.from_pandas(pd.DataFrame({"a": range(40)}), npartitions=4)
    if kinds == "arrays":
        p, q = c.persist([x, x + 1])
        assert len(futures_of(p)) == len(futures_of(q)) == 10
        assert q.sum().compute(scheduler=c) == 5050
    elif kinds == "bag+dataframe":
        p, q = c.persist([b, df])
        assert len(futures_of(p)) == 3 and len(futures_of(q)) == 4
        assert sorted(p.compute(scheduler=c)) == list(range(1, 31))
    elif kinds == "array+dataframe":
        p, q = c.persist([x, df])
        assert len(futures_of(p)) == 10 and len(futures_of(q)) == 4
    else:  # dask.persist with a default client calls client.persist with the list
        with c.as_current():
            p, q = dask.persist(x, x * 2)
        assert len(futures_of(q)) == 10


# ----------------------------------------------------------------------------- compute


def test_compute_returns_one_future_or_a_list_and_sync(c):
    x = da.arange(100, chunks=10)
    f = c.compute(x.sum())
    assert isinstance(f, Future)
    assert f.result(timeout=30) == 4950
    fs = c.compute([x.sum(), x.max()])
    assert isinstance(fs, list) and len(fs) == 2 and all(isinstance(g, Future) for g in fs)
    assert c.gather(fs) == [4950, 99]
    t = c.compute((x.sum(), x.min()))
    assert isinstance(t, list) and c.gather(t) == [4950, 0]
    assert c.compute(x.sum(), sync=True) == 4950
    assert c.compute([x.sum(), x.min()], sync=True) == [4950, 0]
    # non-collections pass through; optimize_graph=False gives the same numbers
    assert c.compute([x.mean(), 7], sync=True) == [49.5, 7]
    np.testing.assert_array_equal(c.compute(x[::-1] + 1, optimize_graph=False, sync=True),
                                  np.arange(100)[::-1] + 1)


def test_compute_sends_one_message_per_call(c, monkeypatch):
    sent = []
    real = c._send
    monkeypatch.setattr(c, "_send", lambda msg: (sent.append(msg), real(msg))[1])
    x = da.ones((400, 400), chunks=20)  # 400 chunks
    f = c.compute((x + x.T).sum())
    assert f.result(timeout=60) == 2 * 400 * 400
    graph_msgs = [m for m in sent if m.get("op") == "update_graph"]
    assert len(graph_msgs) == 1
    assert len(graph_msgs[0]["tasks"]) > 400


# ----------------------------------------------------------------------------- client.get


def test_get_legacy_tuples_tuple_keys_literals_nested_keys(c, pids):
    dsk = {
        "a": 1,
        "b": (inc, "a"),
        ("c", 0): (add, "a", "b"),
        ("c", 1): (add, ("c", 0), 10),
        "d": (sum, [("c", 0), ("c", 1), "b"]),  # a list argument holding keys
        "e": (total, 1, 2, (inc, "b")),  # a task nested in a task
        "lit": "just a string",
        "alias": "d",
        "where": (pid_of, "a"),
    }
    assert c.get(dsk, "b") == 2
    assert c.get(dsk, ("c", 1)) == 13
    assert c.get(dsk, ["a", ["b", [("c", 0)]], "d"]) == [1, [2, [3]], 3 + 13 + 2]
    assert c.get(dsk, [["e"], "lit", "alias"]) == [[1 + 2 + 3], "just a string", 18]
    assert c.get(dsk, "where") in pids.values()
    assert list(dask.get(dsk, ["d", "e", "alias"])) == c.get(dsk, ["d", "e", "alias"])
    # sync=False: futures in the shape of keys
    fs = c.get(dsk, [["d"], "b"], sync=False)
    assert isinstance(fs[0][0], Future) and isinstance(fs[1], Future)
    assert c.gather(fs) == [[18], 2]


def test_get_task_spec_graph(c):
    dsk = {
        "x": DataNode("x", np.arange(5)),
        "y": Task("y", inc, TaskRef("x")),
        "z": Task("z", total, TaskRef("y"), 100),
        "w": Alias("w", "z"),
        ("t", 1): Task(("t", 1), add, TaskRef("w"), TaskRef("y")),
    }
    got = c.get(dsk, ["y", "w", ("t", 1)])
    np.testing.assert_array_equal(got[0], np.arange(1, 6))
    np.testing.assert_array_equal(got[1], np.arange(1, 6) + 100)
    np.testing.assert_array_equal(got[2], 2 * np.arange(1, 6) + 100)


def test_futures_inside_graphs(c):
    fut = c.submit(inc, 41)
    # a future as an argument of a delayed call
    assert dask.delayed(inc)(fut).compute(scheduler=c) == 43
    assert c.compute(dask.delayed(add)(fut, dask.delayed(inc)(1)), sync=True) == 44
    # a future as a graph value: the key depends on it
    assert c.get({"x": fut, "y": (inc, "x")}, "y") == 43
    # a future nested in a container argument
    assert c.get({"y": (total, fut, 1), "z": (sum, [fut, fut])}, ["y", "z"]) == [43, 84]
    # the future's own key as an output key
    assert c.get({}, fut.key) == 42
    # a persisted collection's futures inside a new graph
    y = c.persist(da.arange(10, chunks=5) + 1)
    assert dask.delayed(lambda a: int(a.sum()))(y).compute(scheduler=c) == 55


# ----------------------------------------------------------------------------- dask's scheduler


def _is_ours(client) -> bool:
    sched = dask.config.get("scheduler", None)
    return getattr(sched, "__self__", None) is client


def test_default_client_is_dasks_scheduler_and_close_restores(cluster, pids):
    before = dask.config.get("scheduler", None)
    x = da.ones((100, 100), chunks=25)
    with Client(cluster) as c2:
        assert _is_ours(c2)
        assert dask.config.get("dataframe.shuffle.method") == "tasks"
        t0 = clock(cluster)
        assert x.sum().compute() == 10_000
        assert dask.compute(x.mean())[0] == 1.0
        where = x.map_blocks(pid_block, chunks=(1, 1)).compute()
        assert set(where.ravel()) <= set(pids.values())
        assert sum(computed_since(cluster, t0).values()) >= 16
        # persist() through dask goes to the cluster too
        p = x.persist()
        assert len(futures_of(p)) == 16 and all(f.client is c2 for f in futures_of(p))
        assert p.sum().compute() == 10_000
        del p
        # a nested default client wins, and closing it gives back the outer one
        with Client(cluster) as c3:
            assert _is_ours(c3)
            assert x.sum().compute() == 10_000
        assert _is_ours(c2)
    assert dask.config.get("scheduler", None) == before
    assert not _is_ours(c2)


def test_as_current_and_set_as_default_false(c, cluster):
    before = dask.config.get("scheduler", None)
    assert not _is_ours(c)  # the module's client was made with set_as_default=False
    with Client(cluster, set_as_default=False) as c2:
        assert dask.config.get("scheduler", None) == before
        with c2.as_current():
            assert _is_ours(c2)
            assert dask.config.get("dataframe.shuffle.method") == "tasks"
            assert da.arange(10, chunks=3).sum().compute() == 45
            with c.as_current():
                assert _is_ours(c)
            assert _is_ours(c2)
        assert dask.config.get("scheduler", None) == before
    assert dask.config.get("scheduler", None) == before


def test_explicit_scheduler_still_wins_over_default_client(cluster):
    with Client(cluster) as c2:
        x = da.arange(10, chunks=5).map_blocks(pid_block, chunks=(1,))
        assert set(x.compute(scheduler="sync")) == {os.getpid()}
        assert os.getpid() not in set(x.compute())
        assert _is_ours(c2)


_BEFORE_DASK = r"""
import sys
from cluster import Client
client = Client(n_workers=1, processes=False, dashboard_address=None)
assert "dask" not in sys.modules, "a Client imported dask"
import dask  # first import of dask: the Client registers itself now
import dask.array as da
assert getattr(dask.config.get("scheduler"), "__self__", None) is client
assert dask.config.get("dataframe.shuffle.method") == "tasks"
assert da.ones(100, chunks=10).sum().compute() == 100
client.close()
assert dask.config.get("scheduler", None) is None
print("ok")
"""


@pytest.mark.timeout(60)
def test_client_created_before_dask_is_imported():
    """Client() first, then ``import dask``: the registration waits for dask's import."""
    out = subprocess.run([sys.executable, "-c", _BEFORE_DASK], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


_MAIN_FUNCTION = r"""
import dask
from cluster import Client


def double(x):  # a function of the script itself: module __main__
    return 2 * x


if __name__ == "__main__":
    with Client(n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        assert client.submit(double, 4).result() == 8  # submit pickles it by value
        assert dask.delayed(double)(21).compute() == 42
    print("ok")
"""


@pytest.mark.timeout(90)
def test_functions_of_the_users_script_run_in_graphs(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(_MAIN_FUNCTION)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ----------------------------------------------------------------------------- futures_of, wait, progress


def test_futures_of_wait_and_progress_on_persisted(c):
    x = c.persist(da.random.RandomState(5).random((200, 200), chunks=50))
    fs = futures_of(x)
    assert len(fs) == 16 and len({f.key for f in fs}) == 16
    assert {f.key for f in fs} == set(dask.core.flatten(x.__dask_keys__()))
    done, not_done = wait(x, timeout=30)
    assert len(done) == 16 and not not_done
    out = io.StringIO()
    assert progress(x, file=out) is None
    assert "100% Completed" in out.getvalue()
    # a bag and a dataframe (persisted one by one: see test_persist_list_of_several_collections)
    b = c.persist(db.from_sequence(range(30), npartitions=3).map(inc))
    df = c.persist(dd.from_pandas(pd.DataFrame({"a": range(40)}), npartitions=4))
    assert len(futures_of(b)) == 3 and len(futures_of(df)) == 4
    out = io.StringIO()
    progress(b, df, file=out, multi=True)
    assert "100% Completed" in out.getvalue()
    done, _ = wait(futures_of([b, df]), timeout=30)
    assert len(done) == 7
    assert futures_of([x, b]) and len(futures_of([x, b])) == 19


# ----------------------------------------------------------------------------- annotations


def test_annotate_workers_pins_tasks(c, pids):
    addr, pid = sorted(pids.items())[0]
    with dask.annotate(workers=[addr]):
        x = da.ones((100, 100), chunks=10).map_blocks(pid_block, chunks=(1, 1))
    where = c.compute(x, sync=True)
    assert set(where.ravel()) == {pid}
    # the workers= option of compute does the same for every task
    y = da.ones((100, 100), chunks=10).map_blocks(pid_block, chunks=(1, 1))
    other_addr, other_pid = sorted(pids.items())[1]
    assert set(c.compute(y, workers=[other_addr], sync=True).ravel()) == {other_pid}
    with dask.annotate(workers=addr):
        z = dask.delayed(pid_of)("z")
    assert c.compute(z, sync=True) == pid


def test_annotate_allow_other_workers(c, pids):
    nowhere = "tls://127.0.0.1:9"
    with dask.annotate(workers=[nowhere], allow_other_workers=True):
        x = dask.delayed(pid_of)("loose")
    assert c.compute(x, sync=True) in pids.values()


def test_annotate_retries_lets_a_flaky_task_succeed(c, tmp_path):
    marker = tmp_path / "marker"
    with dask.annotate(retries=2):
        ok = dask.delayed(flaky)(str(marker))
    assert c.compute(ok, sync=True) == "ok"
    # without retries the same task fails with its own exception
    marker2 = tmp_path / "marker2"
    with pytest.raises(OSError, match="transient failure"):
        c.compute(dask.delayed(flaky)(str(marker2)), sync=True)


def test_annotate_resources(c, cluster):
    with dask.annotate(resources={"GPU": 1}):
        tasks = [dask.delayed(where_and_gpu)(i) for i in range(6)]
    got = c.compute(tasks, sync=True)
    # each ran holding the worker's only GPU
    assert all(gpu == 0 for _, gpu in got)
    # a task needing more than any worker has waits for one (never runs)
    with dask.annotate(resources={"GPU": 2}):
        greedy = dask.delayed(where_and_gpu)("greedy", dask_key_name="greedy-gpu-task")
    f = c.compute(greedy)
    until_sync(lambda: on_scheduler(cluster, lambda s: getattr(s.state.tasks.get("greedy-gpu-task"),
                                                               "state", None)) == "no-worker",
               what="the task needing 2 GPUs parked as no-worker")
    assert not f.done()
    c.cancel([f])
    # the resources= option of compute, and dask.annotate around the compute call itself
    plain = dask.delayed(where_and_gpu)("plain", dask_key_name="option-gpu-task")
    g = c.compute(plain, resources={"GPU": 2})
    with dask.annotate(resources={"GPU": 2}):
        h = c.compute(dask.delayed(where_and_gpu)("ctx", dask_key_name="context-gpu-task"))
    for key in ("option-gpu-task", "context-gpu-task"):
        until_sync(lambda key=key: on_scheduler(cluster, lambda s: getattr(s.state.tasks.get(key), "state",
                                                                          None)) == "no-worker",
                   what=f"{key} parked as no-worker")
    c.cancel([g, h])
    assert c.compute(plain, resources={"GPU": 1}, sync=True)[1] == 0


def test_annotate_priority_orders_tasks_on_a_busy_worker(c, cluster, pids, tmp_path):
    addr = sorted(pids)[0]
    go = tmp_path / "go"
    log = tmp_path / "order"
    blocker = c.submit(wait_for_file, str(go), workers=[addr], pure=False)
    until_sync(lambda: on_scheduler(cluster, lambda s: getattr(s.state.tasks.get(blocker.key), "state", None))
               == "processing",
               what="the blocker running")
    with dask.annotate(priority=-10, workers=[addr]):
        low = [dask.delayed(record)(str(log), f"low-{i}") for i in range(3)]
    with dask.annotate(priority=10, workers=[addr]):
        high = [dask.delayed(record)(str(log), f"high-{i}") for i in range(3)]
    f_low = c.compute(low)  # sent first: without priorities they would run first
    f_high = c.compute(high)
    keys = [f.key for f in f_low + f_high]
    until_sync(lambda: on_scheduler(cluster, lambda s: all(k in s.state.tasks for k in keys)),
               what="the scheduler to know the prioritised tasks")
    go.write_text("go")
    c.gather(f_low + f_high + [blocker])
    order = log.read_text().split()
    assert sorted(order) == sorted(f"{p}-{i}" for p in ("high", "low") for i in range(3)), order
    assert all(o.startswith("high") for o in order[:3]), order
    assert all(o.startswith("low") for o in order[3:]), order


def test_unsupported_annotation_is_refused_by_name(c):
    with dask.annotate(colour="blue"):
        x = dask.delayed(inc)(1)
    with pytest.raises(ValueError, match="colour"):
        c.compute(x)


# ----------------------------------------------------------------------------- errors


def test_failing_task_in_a_collection_raises_its_own_exception_with_remote_traceback(c):
    bag = db.from_sequence(range(20), npartitions=4).map(fail_on, 13)
    with pytest.raises(DatasetError, match="bad value 13") as info:
        c.compute(bag.sum(), sync=True)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)
    x = da.ones((10, 10), chunks=5).map_blocks(fail_block, meta=np.empty((0, 0)))
    with pytest.raises(DatasetError, match="block refused") as info:
        x.sum().compute(scheduler=c)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    f = c.compute(x.sum())
    assert isinstance(f.exception(timeout=30), DatasetError)
    assert "fail_block" in "".join(traceback.format_tb(f.traceback(timeout=30)))
    with pytest.raises(DatasetError):  # (keys of their own: see test_failed_keys_are_released)
        c.get({"fail-a": 13, "fail-b": (fail_on, "fail-a", 13)}, "fail-b")


def test_failed_keys_are_released_and_recomputable(c, tmp_path):
    path = tmp_path / "input.txt"
    x = dask.delayed(read_text)(str(path))  # the same key both times (a token of the path)
    with pytest.raises(FileNotFoundError):
        c.compute(x, sync=True)
    path.write_text("there now")
    assert c.compute(x, sync=True) == "there now"


def test_graph_with_missing_dependency_or_cycle_refused_at_submit(c, cluster):
    n_before = on_scheduler(cluster, lambda s: len(s.state.tasks))
    missing = {"y": Task("y", inc, TaskRef("not-there")), "z": Task("z", inc, TaskRef("y"))}
    with pytest.raises(ValueError, match="not-there"):
        c.get(missing, "z")
    cycle = {"a": (inc, "b"), "b": (inc, "c"), "c": (inc, "a"), "out": (inc, "a")}
    with pytest.raises(ValueError, match="cycle") as info:
        c.get(cycle, "out")
    assert any(repr(k) in str(info.value) for k in "abc")
    with pytest.raises(ValueError, match="nope"):
        c.get({"a": 1}, ["a", "nope"])
    # nothing reached the scheduler
    assert on_scheduler(cluster, lambda s: len(s.state.tasks)) <= n_before
    assert c.get({"a": 1, "b": (inc, "a")}, "b") == 2  # the client still works


# ----------------------------------------------------------------------------- asynchronous client


def test_asynchronous_client(cluster, pids):
    x = da.arange(1000, chunks=100)

    async def main():
        async with Client(cluster.scheduler_address, asynchronous=True, security=cluster.security,
                          set_as_default=False) as ac:
            f = ac.compute(x.sum())
            assert isinstance(f, Future)
            assert await f == 499500
            fs = ac.compute([x.sum(), x.max()])
            assert await ac.gather(fs) == [499500, 999]
            assert await ac.compute(x.mean(), sync=True) == 499.5
            assert await ac.get({"a": 1, "b": (inc, "a")}, ["a", ["b"]]) == [1, [2]]
            where = await ac.compute(x.map_blocks(pid_block, chunks=(1,)), sync=True)
            assert set(where) <= set(pids.values())
            p = ac.persist(x + 1)
            done, _ = await wait(p)
            assert len(done) == 10
            assert await ac.compute(p.sum(), sync=True) == 500500
            with ac.as_current():
                with pytest.raises(RuntimeError, match="asynchronous"):
                    x.sum().compute()

    asyncio.run(asyncio.wait_for(main(), 60))


# ----------------------------------------------------------------------------- memory-bounded streaming


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streaming_reduction_larger_than_memory():
    """4 GB of random numbers summed on 2 workers of 400 MB each: 5x their combined memory."""
    nbytes = 4_000_000_000
    chunk = 12_500_000  # 100 MB chunks of float64: 320 root tasks
    x = da.random.random(nbytes // 8, chunks=chunk)
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="400MB",
                      dashboard_address=None) as cl, Client(cl, set_as_default=False) as c:
        t0 = clock(cl)
        s = c.compute(x.sum(), sync=True)
        assert 0.499 * x.size < s < 0.501 * x.size
        spilled = spilled_bytes(c)
        entries = on_scheduler(cl, lambda sch: list(sch.state.log.entries))
        # Unfused, each root task makes a chunk (25 MB here) that a reduction task
        # then consumes: the chunks must not pile up faster than they are reduced.
        y = da.random.random(nbytes // 8, chunks=chunk // 4)
        t1 = time.monotonic()
        s2 = c.compute(y.sum(), optimize_graph=False, sync=True)
        unfused_seconds = time.monotonic() - t1
        spilled2 = {a: n - spilled[a] for a, n in spilled_bytes(c).items()}
    print(f"unfused: {unfused_seconds:.1f}s, spilled {spilled2}")
    assert 0.499 * x.size < s2 < 0.501 * x.size
    assert sum(spilled2.values()) <= nbytes // 10, spilled2
    assert sum(spilled.values()) <= 2 * chunk * 8, spilled
    # The scheduler did not start all the root tasks at once: they were queued
    # and handed out as the workers made progress (blockwise fusion makes each
    # root task produce a chunk's partial sum, so every task of the graph counts).
    mine = [e for e in entries if e[5] >= t0]
    tasks = {e[0] for e in mine}
    queued = {e[0] for e in mine if e[2] == "queued"}
    busy = peak = 0
    for _key, start, finish, *_ in mine:
        if finish == "processing":
            busy += 1
        elif start == "processing":
            busy -= 1
        peak = max(peak, busy)
    n_roots = nbytes // 8 // chunk
    assert len(queued) >= n_roots, (len(queued), len(tasks))
    assert peak <= 8, (peak, len(tasks))
