"""Small parsing helpers shared by every layer: sizes, durations, addresses, keys."""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import re
import reprlib
import socket
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from .errors import AddressError

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "p": 10**15,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}

_TIME_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "millisecond": 1e-3,
    "milliseconds": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "microsecond": 1e-6,
    "microseconds": 1e-6,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}

_NUM_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Parse a size such as ``"4GB"``, ``"3.5GiB"``, ``"100 kB"`` or ``5e9`` into bytes.

    Raises:
        ValueError: naming the value and the accepted units.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: expected a number of bytes or a string like '4GB'")
    if isinstance(value, (int, float)):
        number = float(value)
        unit = 1
    else:
        m = _NUM_UNIT.match(str(value))
        if m is None or m.group(2).lower() not in _BYTE_UNITS:
            raise ValueError(
                f"invalid size {value!r}: expected a number followed by one of "
                f"{', '.join(sorted(u for u in _BYTE_UNITS if u))}"
            )
        number, unit = float(m.group(1)), _BYTE_UNITS[m.group(2).lower()]
    result = number * unit
    if not math.isfinite(result):
        raise ValueError(f"invalid size {value!r}: not a finite number of bytes")
    return int(result)


def parse_timedelta(value: int | float | str | None, default: str = "s") -> float | None:
    """Parse a duration such as ``"500ms"``, ``"1 hour"``, ``"00:10:00"`` or ``3`` into seconds.

    ``HH:MM:SS`` (and ``MM:SS``, ``D-HH:MM:SS``) are accepted because batch
    systems write walltimes that way.

    Raises:
        ValueError: naming the value and the accepted units.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return float(value) * _TIME_UNITS[default]
    text = str(value).strip()
    if ":" in text:
        days = 0
        try:
            if "-" in text:
                d, text = text.split("-", 1)
                days = int(d)
            parts = [float(p) for p in text.split(":")]
        except ValueError:
            raise ValueError(f"invalid duration {value!r}: expected [D-]HH:MM:SS") from None
        if len(parts) > 3:
            raise ValueError(f"invalid duration {value!r}: expected [D-]HH:MM:SS")
        seconds = 0.0
        for p in parts:
            seconds = seconds * 60 + p
        return days * 86400 + seconds
    m = _NUM_UNIT.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _TIME_UNITS:
        raise ValueError(
            f"invalid duration {value!r}: expected a number followed by one of "
            "s, ms, us, m/min, h/hour, d/day, or HH:MM:SS"
        )
    return float(m.group(1)) * (_TIME_UNITS[unit] if unit else _TIME_UNITS[default])


def fifo_seconds(value: Any) -> float:
    """``fifo_timeout`` of ``submit``/``map``/``compute``/``update_graph`` in seconds.

    Raises:
        ValueError: naming ``fifo_timeout`` and what it accepts.
    """
    try:
        return _fifo_seconds(value)  # a submit's "100 ms", parsed once
    except TypeError:  # unhashable: refused below
        return _fifo_seconds.__wrapped__(value)


@functools.lru_cache(maxsize=64)
def _fifo_seconds(value: Any) -> float:
    try:
        seconds = parse_timedelta(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"fifo_timeout={value!r}: expected a duration such as '100 ms' or a "
                         f"number of seconds ({e})") from None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"fifo_timeout={value!r}: expected a non-negative, finite duration")
    return seconds


def format_bytes(n: int | float) -> str:
    """Human-readable size, binary units: ``format_bytes(2**30) == '1.00 GiB'``."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("kiB", 2**10)):
        if abs(n) >= size * 0.9:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --- addresses -------------------------------------------------------------------


def parse_address(address: str, default_protocol: str = "tcp") -> tuple[str, str]:
    """Split ``"tcp://host:port"`` into ``("tcp", "host:port")``.

    Raises:
        AddressError: for a non-string or empty address.
    """
    if not isinstance(address, str) or not address:
        raise AddressError(f"invalid address {address!r}: expected a string like 'tcp://127.0.0.1:8786'")
    if "://" in address:
        proto, loc = address.split("://", 1)
    else:
        proto, loc = default_protocol, address
    return proto, loc


def unparse_address(protocol: str, location: str) -> str:
    return f"{protocol}://{location}"


def parse_host_port(location: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[::1]:port"``) into host and integer port.

    Raises:
        AddressError: when the port is missing (and no default) or not a number.
    """
    if location.startswith("["):
        host, closed, rest = location[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise AddressError(f"invalid address {location!r}: expected '[ipv6]' or '[ipv6]:port'")
        port_s = rest[1:]
    elif location.count(":") > 1:
        raise AddressError(f"invalid address {location!r}: write IPv6 hosts in brackets, '[::1]:8786'")
    else:
        host, sep, port_s = location.rpartition(":")
        if not sep:
            host, port_s = location, ""
    if not port_s:
        if default_port is None:
            raise AddressError(f"invalid address {location!r}: missing port")
        return host, default_port
    try:
        port = int(port_s)
    except ValueError:
        raise AddressError(f"invalid address {location!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"invalid address {location!r}: port {port} out of range 0-65535")
    return host, port


def unparse_host_port(host: str, port: int | None = None) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


def get_address_host(address: str) -> str:
    """The host part of a full address: ``'tcp://10.0.0.1:8786' -> '10.0.0.1'``."""
    proto, loc = parse_address(address)
    if proto == "inproc":
        return loc.split("/", 1)[0]
    return parse_host_port(loc, 0)[0]


def get_ip_interface(ifname: str) -> str:
    """The IPv4 address of a network interface by name, e.g. ``'ib0'`` or ``'lo'``.

    Raises:
        ValueError: naming the interface and the ones that exist.
    """
    import psutil

    addrs = psutil.net_if_addrs()
    if ifname not in addrs:
        raise ValueError(
            f"interface {ifname!r} does not exist; available interfaces: {', '.join(sorted(addrs))}"
        )
    for info in addrs[ifname]:
        if info.family == socket.AF_INET:
            return info.address
    raise ValueError(f"interface {ifname!r} has no IPv4 address")


def get_ip_for(host: str) -> str:
    """The local IP address that routes to ``host`` (no packet is sent)."""
    if host in ("127.0.0.1", "localhost", "::1", ""):
        return "127.0.0.1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((host, 9))  # UDP connect sends nothing; it only picks a route
        return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        sock.close()


def listen_host(host: str | None, interface: str | None, scheduler_address: str) -> str:
    """Where a worker or nanny listens: ``interface``'s address, else ``host``, else the
    local address that routes to the scheduler (loopback for a loopback scheduler).

    Raises:
        ValueError: the interface does not exist (naming the ones that do).
    """
    if interface:
        return get_ip_interface(interface)
    if host is not None:
        return host
    return get_ip_for(get_address_host(scheduler_address))


async def read_scheduler_file(path: str, timeout: float) -> str:
    """The scheduler address from a scheduler file, waiting up to ``timeout`` for it to appear.

    Raises:
        ConnectionTimeoutError: naming the file, when it is still missing or incomplete.
    """
    return (await read_scheduler_info(path, timeout))["address"]


async def read_scheduler_info(path: str, timeout: float) -> dict:
    """The contents of a scheduler file (``"address"``, and ``"security"``: the path
    of its credentials file when the scheduler uses TLS), waiting up to ``timeout``.

    The file must be ours, a regular file (not a link), and not writable by
    group or others: another user who wrote it first could send our workers
    and clients to their scheduler (:func:`cluster.runtime.files.read_trusted_file`).

    Raises:
        ConnectionTimeoutError: naming the file, when it is still missing or incomplete.
        UnsafePathError: the file is someone else's, a link, or writable by others.
    """
    import asyncio
    import json
    import time

    from .errors import ConnectionTimeoutError
    from .files import read_trusted_file

    deadline = time.monotonic() + timeout
    while True:
        try:
            info = json.loads(read_trusted_file(
                path, "scheduler file",
                advice="a scheduler file must be written by your own scheduler; remove it"))
            if isinstance(info, dict) and isinstance(info.get("address"), str):
                return info
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise ConnectionTimeoutError(f"scheduler file {path}", timeout,
                                         "missing or incomplete")
        await asyncio.sleep(0.05)


# --- keys ------------------------------------------------------------------------

_HEX_SUFFIX = re.compile(r"-[0-9a-f]{8,}$")


#: Prefixes of the names that start tuple keys (dask's chunk keys ``(name, i, j)``):
#: thousands of keys share one name, so the regular expression runs once per name.
_TUPLE_PREFIXES: dict[str, str] = {}


def key_split(key: Hashable) -> str:
    """The prefix of a task key, used to group tasks: ``'inc-1a2b3c4d5e' -> 'inc'``."""
    if isinstance(key, tuple) and key:
        name = key[0]
        if type(name) is str:
            prefix = _TUPLE_PREFIXES.get(name)
            if prefix is None:
                if len(_TUPLE_PREFIXES) > 10_000:
                    _TUPLE_PREFIXES.clear()
                prefix = _TUPLE_PREFIXES[name] = _HEX_SUFFIX.sub("", name) or name
            return prefix
        key = name
    if isinstance(key, bytes):
        key = key.decode(errors="replace")
    if not isinstance(key, str):
        return str(type(key).__name__)
    return _HEX_SUFFIX.sub("", key) or key


def funcname(func) -> str:
    """A short name for a callable, used in task keys."""
    while hasattr(func, "func") and not hasattr(func, "__name__"):  # functools.partial
        func = func.func
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name


#: Deepest nesting of tuples accepted in a key.
MAX_KEY_DEPTH = 32


def is_key(key, depth: int = 0) -> bool:
    """Whether ``key`` is a task key: a str, bytes, int or float (not a bool), or a tuple of
    keys nested at most :data:`MAX_KEY_DEPTH` deep."""
    if isinstance(key, (str, bytes, int, float)):
        return not isinstance(key, bool)
    if isinstance(key, tuple) and depth < MAX_KEY_DEPTH:
        return all(is_key(k, depth + 1) for k in key)
    return False


def validate_key(key) -> None:
    """Raise a TypeError naming ``key``, its offending part and the accepted types, unless
    ``key`` is a task key (see :func:`is_key`)."""
    if is_key(key):
        return
    part, depth = key, 0
    while isinstance(part, tuple) and depth < MAX_KEY_DEPTH:
        part = next(k for k in part if not is_key(k, depth + 1))
        depth += 1
    where = "" if part is key else f" (its part {_short_repr(part)} is of type {type(part).__name__})"
    nesting = f", nested at most {MAX_KEY_DEPTH} deep" if isinstance(part, tuple) else ""
    raise TypeError(
        f"invalid key {_short_repr(key)} of type {type(key).__name__}{where}: keys must be "
        f"str, bytes, int, float or tuples of those{nesting}"
    )


def _short_repr(value) -> str:
    try:
        r = reprlib.repr(value)
    except Exception:
        r = f"<{type(value).__name__}>"
    return r


def delegate(part: str, method: Callable) -> Callable:
    """A method that calls ``method`` on the object's part ``part`` (``self.<part>``).

    The servers and the client expose the documented API of their parts
    (``client.who_has`` is ``client.ops.who_has``) with this, one line each;
    the name, docstring and signature are the part's own.
    """

    name = method.__name__
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def acall(self, *args, **kwargs):
            return await getattr(getattr(self, part), name)(*args, **kwargs)

        return acall

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return getattr(getattr(self, part), name)(*args, **kwargs)

    return call


def lazy_attributes(package: str, table: dict[str, str], namespace: dict) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports each public name on first use.

    Args:
        package: the package's ``__name__`` (relative modules in ``table`` are from it).
        table: ``{name: module}`` where each name is defined.
        namespace: the package's ``globals()``, where a name is kept once imported.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    return __getattr__


async def call_each(parts: Mapping[Any, Any], method: str, what: str) -> None:
    """Call ``part.<method>()`` on each part that has it, awaiting coroutines; a part that
    raises is logged (as ``what`` and its name) and the others still run (closing)."""
    for name, part in list(parts.items()):
        fn = getattr(part, method, None)
        if fn is None:
            continue
        try:
            result = fn()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logging.getLogger(__name__).exception("%s %r failed in %s", what, name, method)
