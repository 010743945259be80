"""Memory sizes and walltimes: read what users write, write what batch systems read.

Users write memory the way dask-jobqueue taught them (``"4GB"``, ``"3.5GiB"``,
``"500MB"``, a number of bytes) and walltimes as ``"01:30:00"``,
``"1-12:00:00"``, ``"90m"`` or ``"2h"``.  Batch systems read something else:

- SLURM's ``--mem`` suffixes are *binary* (``M`` is MiB).  We write MiB,
  rounded up: ``"4GB"`` (4,000,000,000 bytes) becomes ``--mem=3815M``, not the
  ``4G`` (4 GiB, 7% more) that rounding to a decimal unit would give.
- PBS's ``mem=`` suffixes are binary too (``mb`` is MiB, ``gb`` is GiB).  We
  write whole GiB when the size is a whole number of GiB (``"8GiB"`` ->
  ``8gb``) and MiB rounded up otherwise (``"4GB"`` -> ``3815mb``).
- The worker's ``--memory-limit`` gets the exact per-worker share, in the
  largest unit that divides it (``"16GB"`` over 4 processes -> ``4GB``).
- Walltimes are written ``HH:MM:SS`` (SLURM: ``D-HH:MM:SS`` from one day up),
  seconds rounded up.

A bare number of minutes is what ``sbatch -t 30`` means, and a bare number
of seconds is what Python code usually means; since the two disagree, a bare
number is refused as a walltime, with a message giving the accepted forms.
"""

from __future__ import annotations

import datetime
import math
import re

from cluster.runtime.utils import parse_bytes, parse_timedelta

MIB = 2**20
GIB = 2**30

_EXACT_UNITS = (("TiB", 2**40), ("TB", 10**12), ("GiB", GIB), ("GB", 10**9),
                ("MiB", MIB), ("MB", 10**6), ("kiB", 2**10), ("kB", 10**3))


def parse_memory(value: object, option: str = "memory") -> int:
    """Bytes from ``"4GB"``, ``"3.5GiB"``, ``"500 MB"``, ``"16G"`` or a number of bytes.

    Raises:
        ValueError: naming ``option``, the value and the accepted forms.
        TypeError: the value is neither a string nor a number.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"{option}={value!r}: expected a size like '4GB' or '3.5GiB', "
                        f"or a number of bytes, not {type(value).__name__}")
    try:
        nbytes = parse_bytes(value)
    except ValueError as e:
        raise ValueError(f"{option}={value!r}: expected a size like '4GB', '3.5GiB' or "
                         f"'500MB', or a number of bytes ({e})") from None
    if nbytes <= 0:
        raise ValueError(f"{option}={value!r}: must be more than 0 bytes")
    return nbytes


def slurm_memory(nbytes: int) -> str:
    """SLURM ``--mem`` value: MiB, rounded up (``4 * 10**9`` -> ``"3815M"``)."""
    return f"{math.ceil(nbytes / MIB)}M"


def pbs_memory(nbytes: int) -> str:
    """PBS ``mem=`` value: whole GiB as ``gb`` if exact, else MiB rounded up as ``mb``."""
    if nbytes % GIB == 0:
        return f"{nbytes // GIB}gb"
    return f"{math.ceil(nbytes / MIB)}mb"


def exact_size(nbytes: int) -> str:
    """``nbytes`` in the largest unit that divides it exactly (``"4GB"``, ``"2GiB"``, ``"1234"``)."""
    for name, size in _EXACT_UNITS:
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{name}"
    return str(nbytes)


_BARE_NUMBER = re.compile(r"^\s*[0-9]+(\.[0-9]*)?\s*$")


def parse_walltime(value: object, option: str = "walltime") -> int:
    """Seconds (rounded up) from ``"01:30:00"``, ``"1-12:00:00"``, ``"90m"``, ``"2h"``, a timedelta.

    Raises:
        ValueError: naming ``option``, the value and the accepted forms (a bare
            number is refused: SLURM reads it as minutes, Python code as seconds).
        TypeError: the value is of another type.
    """
    accepted = "expected a duration like '01:30:00', '1-12:00:00', '90m' or '2h'"
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        if _BARE_NUMBER.match(value):
            raise ValueError(f"{option}={value!r}: {accepted} (a bare number is ambiguous: "
                             "sbatch reads minutes, Python code means seconds)")
        try:
            seconds = parse_timedelta(value)
        except ValueError:
            raise ValueError(f"{option}={value!r}: {accepted}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"{option}={value!r}: {accepted} (a bare number is ambiguous: "
                         "sbatch reads minutes, Python code means seconds)")
    else:
        raise TypeError(f"{option}={value!r}: {accepted}, not {type(value).__name__}")
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{option}={value!r}: must be a positive duration; {accepted}")
    return math.ceil(seconds)


def parse_duration(value: object, option: str) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"01:00:00"``, a number of seconds or a timedelta.

    Raises:
        ValueError: naming ``option`` and the accepted forms.
    """
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    else:
        try:
            seconds = parse_timedelta(value)  # type: ignore[arg-type]
        except (ValueError, TypeError, AttributeError):
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{option}={value!r}: expected a non-negative duration like '30s', "
                         "'5m', '01:00:00' or a number of seconds")
    return float(seconds)


def hms(seconds: float) -> str:
    """``HH:MM:SS`` with hours past 24 if need be (PBS); seconds rounded up."""
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"


def slurm_time(seconds: float) -> str:
    """SLURM ``--time``: ``HH:MM:SS``, or ``D-HH:MM:SS`` from one day up; seconds rounded up."""
    total = math.ceil(seconds)
    days, rest = divmod(total, 86400)
    return f"{days}-{hms(rest)}" if days else hms(rest)


def seconds_text(seconds: float) -> str:
    """A duration for the worker command line: ``"3300s"`` (whole seconds, rounded down)."""
    return f"{max(0, math.floor(seconds))}s"


__all__ = [
    "exact_size",
    "hms",
    "parse_duration",
    "parse_memory",
    "parse_walltime",
    "pbs_memory",
    "seconds_text",
    "slurm_memory",
    "slurm_time",
]
