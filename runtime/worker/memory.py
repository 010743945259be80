"""Worker memory options: the memory limit and the spill/pause/terminate fractions.

Shared by :class:`~cluster.runtime.worker.Worker` and :class:`~cluster.runtime.nanny.Nanny`,
which parse the same options.
"""

from __future__ import annotations

import os
from typing import Any

import psutil

from ..config import FROM_CONFIG, setting
from ..utils import parse_bytes

#: The configuration key of each fraction (``distributed.worker.memory.*`` in dask's files).
CONFIG_KEYS = {"memory_target_fraction": "worker.memory.target",
               "memory_spill_fraction": "worker.memory.spill",
               "memory_pause_fraction": "worker.memory.pause"}


def memory_fraction(name: str, value: Any) -> float | None:
    """A memory fraction in (0, 1], or ``None`` for False/None/0 (disabled).

    ``FROM_CONFIG`` reads the configured value (:data:`CONFIG_KEYS`).

    Raises:
        ValueError: naming the option and the accepted values.
    """
    if value is FROM_CONFIG:
        value = setting(CONFIG_KEYS[name])
    if value is None or value is False or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r}: expected a fraction in (0, 1], or False/None to disable")
    return float(value)


def parse_memory_limit(memory_limit: Any, nthreads: int, total_cores: int | None = None) -> int:
    """Bytes from ``"auto"``, a size string, a byte count, a fraction of memory, or 0/None.

    Raises:
        ValueError: naming the bad value and the accepted forms.
    """
    total = psutil.virtual_memory().total
    if memory_limit is None or memory_limit == 0 or memory_limit == "0":
        return 0
    if memory_limit == "auto":
        cores = total_cores or os.cpu_count() or 1
        return int(total * min(1.0, nthreads / cores))
    if isinstance(memory_limit, float) and 0 < memory_limit <= 1:
        return int(total * memory_limit)
    try:
        value = parse_bytes(memory_limit)
    except ValueError:
        raise ValueError(
            f"memory_limit={memory_limit!r}: expected 'auto', a size like '4GB' or '3.5GiB', "
            "a number of bytes, a fraction of system memory in (0, 1], or 0/None for no limit"
        ) from None
    if value < 0:
        raise ValueError(f"memory_limit={memory_limit!r}: must not be negative")
    return min(value, total)
