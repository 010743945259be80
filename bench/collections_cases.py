"""The dask collection workloads of ``python -m bench --workloads collections``.

Each case builds a dask collection (on the client, as a user would) and checks
the value that ``.compute()`` returned; the runner (bench/run_collections.py)
times ``.compute()`` with the system's Client open and the default scheduler.
Data is generated on the workers (``da.random``, ``dd.from_map``,
``db.range``), never shipped from the client. Task functions live in
bench/workloads.py so both systems pickle them by reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bench import workloads as w


@dataclass(frozen=True)
class Case:
    key: str
    label: str  # may use {sizes} fields
    build: Callable  # sizes -> (collection, check(value) -> None)
    kind: str = "array"


def _close(got, want, rel, what):
    if not math.isclose(got, want, rel_tol=rel):
        raise AssertionError(f"{what}: got {got!r}, expected about {want!r}")


def array_sum(s):
    import dask.array as da

    n, c = s["array_sum_n"], s["array_sum_chunk"]
    x = da.random.random((n, n), chunks=(c, c))
    return x.sum(), lambda v: _close(float(v), n * n / 2, 0.01, "sum")


def array_xxT_mean(s):
    import dask.array as da

    n, c = s["xxT_n"], s["xxT_chunk"]
    x = da.random.random((n, n), chunks=(c, c))
    return (x + x.T).mean(), lambda v: _close(float(v), 1.0, 0.01, "mean")


def array_matmul(s):
    import dask.array as da

    n, c = s["matmul_n"], s["matmul_chunk"]
    a = da.random.random((n, n), chunks=(c, c))
    b = da.random.random((n, n), chunks=(c, c))
    return (a @ b).sum(), lambda v: _close(float(v), n ** 3 / 4, 0.01, "sum of a @ b")


def array_rechunk(s):
    import dask.array as da

    n, c = s["rechunk_n"], s["rechunk_chunk"]
    x = da.random.random((n, n), chunks=(n, c))
    # The task-based rechunk on both (dask would pick its p2p rechunk here; ours has none).
    y = x.rechunk((c, n), method="tasks")
    # The sum of each new (row-band) chunk: every task of the rechunk is needed.
    out = y.sum(axis=1)
    return out, lambda v: _close(float(v.sum()), n * n / 2, 0.01, "row sums")


def _frame(s, seed, parts=None):
    import dask.dataframe as dd

    parts = parts or s["df_parts"]
    return dd.from_map(w.frame_part, range(parts), rows=s["df_rows"], nkeys=s["df_groups"],
                       seed=seed)


def df_groupby(s):
    df = _frame(s, 1)
    out = df.groupby("g").agg({"x": "mean", "y": "sum"})

    def check(v):
        if len(v) != s["df_groups"]:
            raise AssertionError(f"{len(v)} groups, expected {s['df_groups']}")
        _close(float(v["x"].mean()), 0.5, 0.02, "mean of x")

    return out, check


def df_merge(s):
    left, right = _frame(s, 1), _frame(s, 2)
    merged = left.merge(right, on="key", shuffle_method="tasks")
    n = s["df_parts"] * s["df_rows"]

    def check(v):
        if int(v) != n:
            raise AssertionError(f"merge has {v} rows, expected {n}")

    return merged["x_x"].count(), check


def df_set_index(s):
    df = _frame(s, 3)
    out = df.set_index("key", shuffle_method="tasks").map_partitions(w.index_sorted,
                                                                     meta=(None, bool))

    def check(v):
        if not bool(v.all()):
            raise AssertionError("set_index left a partition unsorted")

    return out, check


def bag_frequencies(s):
    import dask.bag as db

    n = s["bag_n"]
    out = db.range(n, npartitions=s["bag_parts"]).map(w.mod_1000).frequencies()

    def check(v):
        if len(v) != 1000 or sum(c for _, c in v) != n:
            raise AssertionError(f"frequencies: {len(v)} values, total {sum(c for _, c in v)}")

    return out, check


def bag_foldby(s):
    import dask.bag as db

    n = s["bag_n"]
    out = db.range(n, npartitions=s["bag_parts"]).foldby(w.bag_key, w.add, 0, w.add, 0)

    def check(v):
        if len(v) != 97 or sum(t for _, t in v) != n * (n - 1) // 2:
            raise AssertionError("foldby: wrong totals")

    return out, check


def delayed_tree(s):
    import dask

    n = s["delayed_leaves"]
    level = [dask.delayed(w.leaf)(i) for i in range(n)]
    while len(level) > 1:
        nxt = [dask.delayed(w.add)(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt

    def check(v):
        if v != n * (n - 1) // 2:
            raise AssertionError(f"tree sum {v}")

    return level[0], check


def big_graph(s):
    import dask.array as da

    n, c = s["big_n"], s["big_chunk"]
    x = da.ones((n, n), chunks=(c, c))
    out = (x + 1).sum(split_every=s["big_split_every"])
    return out, lambda v: _close(float(v), 2.0 * n * n, 1e-9, "sum")


BIG = "graph_100k"

CASES = (
    Case("array_sum", "dask.array `random(({array_sum_n}, {array_sum_n}))` "
         "({array_sum_mb} MB, {array_sum_chunk}² chunks) `.sum()`", array_sum),
    Case("array_xxT_mean", "dask.array `(x + x.T).mean()`, x {xxT_n}² ({xxT_chunk}² chunks)",
         array_xxT_mean),
    Case("array_matmul", "dask.array `(a @ b).sum()`, {matmul_n}² ({matmul_chunk}² chunks)",
         array_matmul),
    Case("array_rechunk", "dask.array rechunk {rechunk_n}² from ({rechunk_n}, {rechunk_chunk}) "
         "to ({rechunk_chunk}, {rechunk_n}) chunks, then `.sum(axis=1)`", array_rechunk),
    Case("df_groupby", "dask.dataframe groupby-agg ({df_parts} × {df_rows:,} rows, "
         "{df_groups} groups)", df_groupby, "dataframe"),
    Case("df_merge", "dask.dataframe merge on a unique key, task shuffle "
         "(2 × {df_parts} × {df_rows:,} rows)", df_merge, "dataframe"),
    Case("df_set_index", "dask.dataframe `set_index` (task shuffle, {df_parts} × {df_rows:,} rows)",
         df_set_index, "dataframe"),
    Case("bag_frequencies", "dask.bag `range({bag_n:,}).map(mod).frequencies()` "
         "({bag_parts} partitions)", bag_frequencies, "bag"),
    Case("bag_foldby", "dask.bag `foldby` ({bag_n:,} items, {bag_parts} partitions)",
         bag_foldby, "bag"),
    Case("delayed_tree", "dask.delayed tree reduction ({delayed_leaves:,} leaves, "
         "{delayed_tasks:,} tasks)", delayed_tree, "delayed"),
    Case(BIG, "dask.array `(ones(({big_n}, {big_n}), chunks={big_chunk}) + 1)"
         ".sum(split_every={big_split_every})` ({big_tasks} tasks after optimization)",
         big_graph),
)
CASE_KEYS = tuple(c.key for c in CASES)
CASES_BY_KEY = {c.key: c for c in CASES}

#: Problem sizes (default and --quick) of the collection cases.
COLLECTION_SIZES = {
    "default": {
        "array_sum_n": 7000, "array_sum_chunk": 1000,
        "xxT_n": 4000, "xxT_chunk": 500,
        "matmul_n": 2000, "matmul_chunk": 500,
        "rechunk_n": 4000, "rechunk_chunk": 100,
        "df_parts": 8, "df_rows": 200_000, "df_groups": 1000,
        "bag_n": 1_000_000, "bag_parts": 20,
        "delayed_leaves": 4096,
        "big_n": 27_000, "big_chunk": 100, "big_split_every": 4,
        "big_repeat": 1,
    },
    "quick": {
        "array_sum_n": 2000, "array_sum_chunk": 500,
        "xxT_n": 1000, "xxT_chunk": 250,
        "matmul_n": 800, "matmul_chunk": 200,
        "rechunk_n": 1000, "rechunk_chunk": 50,
        "df_parts": 4, "df_rows": 20_000, "df_groups": 100,
        "bag_n": 100_000, "bag_parts": 8,
        "delayed_leaves": 512,
        "big_n": 3000, "big_chunk": 100, "big_split_every": 4,
        "big_repeat": 1,
    },
}


def label_sizes(s):
    """The sizes plus the derived fields the labels use."""
    out = dict(s)
    out["array_sum_mb"] = f"{s['array_sum_n'] ** 2 * 8 / 1e6:.0f}"
    out["delayed_tasks"] = 2 * s["delayed_leaves"] - 1
    out.setdefault("big_tasks", "?")
    return out


def count_tasks(collection):
    """Tasks of the collection's graph after dask's optimization (what is sent)."""
    import dask

    (opt,) = dask.optimize(collection)
    return len(opt.__dask_graph__())
