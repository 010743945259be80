"""Parsers of option values for the command lines (``python -m cluster ...``).

Each takes the option's text and returns the value, or raises
``argparse.ArgumentTypeError`` with a message that names the bad value and the
accepted forms; argparse adds the option's name.  ``env_var`` names the
``CLUSTER_<OPTION>`` variable that may set an option instead.
"""

from __future__ import annotations

import argparse
import math

from .utils import parse_bytes, parse_timedelta

#: Prefix of the environment variables that set options: ``--nthreads`` <- ``CLUSTER_NTHREADS``.
ENV_PREFIX = "CLUSTER_"
_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "f"})

def env_var(option: str) -> str:
    """The environment variable of a long option: ``"--foo-bar"`` -> ``"CLUSTER_FOO_BAR"``."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def duration(text: str) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"1h"``, ``"01:00:00"`` or a number.

    Raises:
        argparse.ArgumentTypeError: naming the value and the accepted forms.
    """
    try:
        seconds = parse_timedelta(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected a non-negative duration like 30s, 5m or 01:00:00")
    return seconds


def positive_duration(text: str) -> float:
    """A duration above zero.

    Raises:
        argparse.ArgumentTypeError: naming the value.
    """
    seconds = duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be above zero")
    return seconds


def memory_limit(text: str) -> str | int | float:
    """``"auto"``, a number of bytes (``"4GB"``, ``"3.5GiB"``, ``5e9``), a fraction up to 1, or 0.

    Raises:
        argparse.ArgumentTypeError: naming the value and the accepted forms.
    """
    value = text.strip()
    if value.lower() == "auto":
        return "auto"
    if value.lower() in ("0", "none"):
        return 0
    bad = argparse.ArgumentTypeError(
        f"invalid memory limit {text!r}: expected 'auto', a size like 4GB or 3.5GiB, a number of "
        "bytes, a fraction of the machine's memory in (0, 1], or 0 for no limit")
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number < 0:
            raise bad
        return number if number <= 1 else int(number)
    try:
        return parse_bytes(value)
    except ValueError:
        raise bad from None


def resources(text: str) -> dict[str, float]:
    """``{"GPU": 2.0, "MEM": 1e10}`` from ``"GPU=2,MEM=10e9"`` (commas or spaces between pairs).

    Raises:
        argparse.ArgumentTypeError: naming the value and the expected form.
    """
    out: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        name, sep, amount = item.partition("=")
        try:
            value = float(amount) if sep and name.strip() else None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or name in out:
            raise argparse.ArgumentTypeError(
                f"invalid resources {text!r} (at {item!r}): expected NAME=AMOUNT pairs separated "
                "by commas, with non-negative amounts, e.g. 'GPU=2,MEM=10e9'")
        out[name] = value
    return out


def positive_int(text: str) -> int:
    """An integer >= 1.

    Raises:
        argparse.ArgumentTypeError: naming the value.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def port(text: str) -> int:
    """A TCP port number (0: any free port).

    Raises:
        argparse.ArgumentTypeError: naming the value.
    """
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}: expected a number from 0 to 65535 (0: any free port)")
    return value


def boolean(text: str) -> bool:
    """True from ``1/true/yes/on``, False from ``0/false/no/off`` (any case).

    Raises:
        argparse.ArgumentTypeError: naming the value.
    """
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected 1/0, true/false, yes/no or on/off")


def _integer(text: str, what: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, "a non-negative integer", 0)


def port_range(text: str) -> tuple[int, int]:
    """``(low, high)`` from ``"9000"`` or ``"9000:9010"`` (``"0"``: any free port)."""
    low, sep, high = text.partition(":")
    what = "a port number, or a range LOW:HIGH, from 0 to 65535 (0: any free port)"
    a = _integer(low, what, 0, 65535)
    b = _integer(high, what, 0, 65535) if sep else a
    if b < a:
        raise argparse.ArgumentTypeError(f"invalid port range {text!r}: {b} is below {a}")
    return a, b
