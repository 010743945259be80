"""Task functions shipped to the workers of every system.

They live at module level in an importable module so that every system
(cloudpickle for ours and dask, plain pickle for mpi4py.futures) pickles them
by reference; the benchmark runners put the repository root on PYTHONPATH so
worker processes can import ``bench.workloads``.

Heavy imports (numpy, psutil) are done lazily inside the functions so that
they do not inflate the idle RSS that the ``rss`` workload measures.
"""

from __future__ import annotations

import os


def noop(x):
    """The no-op task."""
    return None


def leaf(i):
    """A leaf of the tree reduction: the value itself."""
    return i


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def make_array(n):
    """An ``n``-byte numpy array (uint8) with every page touched."""
    import numpy as np

    return np.full(int(n), 7, dtype=np.uint8)


def make_bytes(n):
    """An ``n``-byte ``bytes`` object."""
    return b"\x07" * int(n)


def nbytes_of(obj):
    """(size in bytes of ``obj``, pid of the process that ran the task)."""
    nbytes = getattr(obj, "nbytes", None)
    if nbytes is None:
        nbytes = len(obj)
    return int(nbytes), os.getpid()


def getpid():
    return os.getpid()


def rss():
    """Resident set size of the calling process, in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


# --- helpers of the dask collection workloads (bench/collections_cases.py) ---


def frame_part(i, rows, nkeys, seed):
    """Partition ``i`` of a synthetic table: a unique int ``key`` (a permutation
    of ``range(i*rows, (i+1)*rows)`` scrambled over all partitions), a group
    ``g`` in ``range(nkeys)`` and two float columns."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng((seed, i))
    n = int(rows)
    key = (np.arange(i * n, (i + 1) * n, dtype=np.int64) * 7919) % (1 << 31)
    return pd.DataFrame({
        "key": rng.permutation(key),
        "g": rng.integers(0, nkeys, n),
        "x": rng.random(n),
        "y": rng.random(n),
    })


def index_sorted(part):
    """Whether a dataframe partition's index is sorted (checks set_index's work)."""
    return bool(part.index.is_monotonic_increasing)


def mod_1000(x):
    return x % 1000


def bag_key(x):
    return x % 97
