"""Parsing helpers: sizes, durations, addresses, keys and worker memory limits."""

from __future__ import annotations

import os

import psutil
import pytest
from cluster.runtime.errors import AddressError
from cluster.runtime.utils import (
    key_split,
    parse_address,
    parse_bytes,
    parse_host_port,
    parse_timedelta,
    unparse_host_port,
    validate_key,
)
from cluster.runtime.worker import parse_memory_limit

# --------------------------------------------------------------------------- parse_bytes


@pytest.mark.parametrize(
    "value, expected",
    [
        ("4GB", 4 * 10**9),
        ("4 GB", 4 * 10**9),
        ("4gb", 4 * 10**9),
        ("3.5GiB", int(3.5 * 2**30)),
        ("100 kB", 100_000),
        ("100kb", 100_000),
        ("1KiB", 1024),
        ("2MiB", 2 * 2**20),
        ("5MB", 5 * 10**6),
        ("1TB", 10**12),
        ("1PiB", 2**50),
        ("123", 123),
        ("123B", 123),
        ("  7 b ", 7),
        ("1e3", 1000),
        ("1.5e3kB", 1_500_000),
        (".5k", 500),
        (5e9, 5_000_000_000),
        (1024, 1024),
        (0, 0),
        (2.7, 2),
    ],
)
def test_parse_bytes(value, expected):
    result = parse_bytes(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    ["", "GB", "4 GBs", "four GB", "4 XB", "4.5.6MB", "-1GB", "1_000", "4 G B", "nan", True, None],
)
def test_parse_bytes_rejects_bad_values_naming_them(value):
    with pytest.raises(ValueError) as info:
        parse_bytes(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "1e400", "1e400GB"])
def test_parse_bytes_rejects_non_finite_values_naming_them(value):
    with pytest.raises(ValueError) as info:
        parse_bytes(value)
    assert repr(value) in str(info.value)


def test_parse_bytes_error_lists_units():
    with pytest.raises(ValueError) as info:
        parse_bytes("12 parsecs")
    text = str(info.value).lower()
    assert "gib" in text and "kb" in text and "'12 parsecs'" in text


# --------------------------------------------------------------------------- parse_timedelta


@pytest.mark.parametrize(
    "value, expected",
    [
        ("500ms", 0.5),
        ("500 ms", 0.5),
        ("1 hour", 3600.0),
        ("2hours", 7200.0),
        ("1h", 3600.0),
        ("1.5 min", 90.0),
        ("3m", 180.0),
        ("10s", 10.0),
        ("10 seconds", 10.0),
        ("250us", 250e-6),
        ("1 day", 86400.0),
        ("2d", 172800.0),
        ("00:10:00", 600.0),
        ("01:00:00", 3600.0),
        ("10:30", 630.0),
        ("1-00:00:00", 86400.0),
        ("2-01:02:03", 2 * 86400 + 3600 + 120 + 3),
        ("00:00:01.5", 1.5),
        ("42", 42.0),
        (3, 3.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_timedelta(value, expected):
    result = parse_timedelta(value)
    assert result == pytest.approx(expected)
    assert isinstance(result, float)


def test_parse_timedelta_default_unit_and_none():
    assert parse_timedelta(None) is None
    assert parse_timedelta(3, default="ms") == pytest.approx(0.003)
    assert parse_timedelta("3", default="ms") == pytest.approx(0.003)
    assert parse_timedelta(2, default="h") == 7200.0
    # An explicit unit wins over the default.
    assert parse_timedelta("3s", default="ms") == 3.0


@pytest.mark.parametrize(
    "value",
    ["", "soon", "1 fortnight", "ms", "1:2:3:4", "a:b", "10:xx", "1.2.3s", "-5s", True],
)
def test_parse_timedelta_rejects_bad_values_naming_them(value):
    with pytest.raises(ValueError) as info:
        parse_timedelta(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["x-00:10:00", "-00:10:00", "1.5-00:00:00"])
def test_parse_timedelta_rejects_bad_day_part_naming_the_value(value):
    with pytest.raises(ValueError) as info:
        parse_timedelta(value)
    assert repr(value) in str(info.value)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "address, expected",
    [
        ("tcp://127.0.0.1:8786", ("tcp", "127.0.0.1:8786")),
        ("127.0.0.1:8786", ("tcp", "127.0.0.1:8786")),
        ("inproc://1234/5", ("inproc", "1234/5")),
        ("tcp://[::1]:8786", ("tcp", "[::1]:8786")),
        ("tcp://", ("tcp", "")),
        ("tls://host:1://x", ("tls", "host:1://x")),
    ],
)
def test_parse_address(address, expected):
    assert parse_address(address) == expected


def test_parse_address_default_protocol():
    assert parse_address("host:1", default_protocol="inproc") == ("inproc", "host:1")


@pytest.mark.parametrize("address", ["", None, 8786, b"tcp://127.0.0.1:1", ("127.0.0.1", 1)])
def test_parse_address_rejects_non_strings(address):
    with pytest.raises(AddressError) as info:
        parse_address(address)
    assert repr(address) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "location, default, expected",
    [
        ("127.0.0.1:8786", None, ("127.0.0.1", 8786)),
        ("localhost:0", None, ("localhost", 0)),
        ("host:65535", None, ("host", 65535)),
        ("host", 8786, ("host", 8786)),
        ("host:", 5, ("host", 5)),
        ("[::1]:8786", None, ("::1", 8786)),
        ("[fe80::1%eth0]:1", None, ("fe80::1%eth0", 1)),
        ("[::1]", 0, ("::1", 0)),
        ("[2001:db8::42]:443", None, ("2001:db8::42", 443)),
        ("", 9, ("", 9)),
    ],
)
def test_parse_host_port(location, default, expected):
    assert parse_host_port(location, default) == expected


@pytest.mark.parametrize(
    "location, match",
    [
        ("host", "missing port"),
        ("[::1]", "missing port"),
        ("host:", "missing port"),
        ("host:http", "not a number"),
        ("[::1]:http", "not a number"),
        ("host:65536", "out of range"),
        ("host:-1", "out of range"),
    ],
)
def test_parse_host_port_rejects_bad_locations(location, match):
    with pytest.raises(AddressError, match=match) as info:
        parse_host_port(location)
    assert repr(location) in str(info.value)


@pytest.mark.parametrize("location", ["::1", "[::1:80", "[::1]junk"])
def test_parse_host_port_rejects_malformed_ipv6(location):
    with pytest.raises(AddressError):
        parse_host_port(location, 0)


@pytest.mark.parametrize(
    "host, port, expected",
    [
        ("127.0.0.1", 8786, "127.0.0.1:8786"),
        ("::1", 8786, "[::1]:8786"),
        ("[::1]", 8786, "[::1]:8786"),
        ("2001:db8::42", 0, "[2001:db8::42]:0"),
        ("host", None, "host"),
        ("::1", None, "[::1]"),
    ],
)
def test_unparse_host_port(host, port, expected):
    assert unparse_host_port(host, port) == expected


@pytest.mark.parametrize("host, port", [("127.0.0.1", 1), ("::1", 8786), ("fe80::1", 0), ("h", 65535)])
def test_host_port_round_trip(host, port):
    assert parse_host_port(unparse_host_port(host, port)) == (host, port)


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key, expected",
    [
        ("inc-1a2b3c4d5e", "inc"),
        ("inc-0123456789abcdef0123456789abcdef", "inc"),
        ("my-func-deadbeef", "my-func"),
        (("sum-aaaaaaaabbbb", 0, 1), "sum"),
        (b"load-0123abcd", "load"),
        ("x", "x"),
        ("inc-1", "inc-1"),  # not a token: too short to be hex
        ("data-XYZ12345", "data-XYZ12345"),
        ("-deadbeef", "-deadbeef"),  # never empties a key
        (42, "int"),
        (None, "NoneType"),
    ],
)
def test_key_split(key, expected):
    assert key_split(key) == expected


@pytest.mark.parametrize(
    "key", ["x", b"x", 1, -1, 1.5, ("x", 1), ("x", (1, 2.5), b"y"), (), ""]
)
def test_validate_key_accepts(key):
    assert validate_key(key) is None


@pytest.mark.parametrize(
    "key, type_name",
    [
        (None, "NoneType"),
        ([1], "list"),
        ({"a": 1}, "dict"),
        ({1}, "set"),
        (True, "bool"),
        (object(), "object"),
        (("x", [1]), "list"),
        (("x", ("y", None)), "NoneType"),
    ],
)
def test_validate_key_rejects_naming_the_type(key, type_name):
    with pytest.raises(TypeError) as info:
        validate_key(key)
    msg = str(info.value)
    # The key, the type of its offending part, and what keys may be.
    assert f"invalid key {key!r}"[:20] in msg
    assert f"of type {type_name}" in msg
    assert "keys must be str, bytes, int, float or tuples of those" in msg


def test_validate_key_limits_nesting():
    key = 1
    for _ in range(40):
        key = (key,)
    with pytest.raises(TypeError, match="nested at most 32 deep"):
        validate_key(key)
    for _ in range(8):
        key = key[0]
    validate_key(key)  # 32 deep


# --------------------------------------------------------------------------- memory limits


TOTAL = psutil.virtual_memory().total


def test_memory_limit_auto_is_share_of_cores():
    assert parse_memory_limit("auto", nthreads=1, total_cores=4) == int(TOTAL * 0.25)
    assert parse_memory_limit("auto", nthreads=2, total_cores=4) == int(TOTAL * 0.5)
    assert parse_memory_limit("auto", nthreads=8, total_cores=4) == TOTAL
    cores = os.cpu_count() or 1
    assert parse_memory_limit("auto", nthreads=1) == int(TOTAL * min(1.0, 1 / cores))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("4GB", min(4 * 10**9, TOTAL)),
        ("100MiB", 100 * 2**20),
        ("1 kB", 1000),
        (123456, 123456),
        (0.5, int(TOTAL * 0.5)),
        (1.0, TOTAL),
        (0.001, int(TOTAL * 0.001)),
        ("1PB", TOTAL),  # capped at what the machine has
        (10**18, TOTAL),
    ],
)
def test_memory_limit_values(value, expected):
    assert parse_memory_limit(value, nthreads=1) == expected


@pytest.mark.parametrize("value", [0, None, "0", 0.0])
def test_memory_limit_zero_means_no_limit(value):
    assert parse_memory_limit(value, nthreads=4) == 0


@pytest.mark.parametrize("value", ["lots", "4 gigs", "50%", "", "auto-ish", [1]])
def test_memory_limit_rejects_bad_values_naming_them(value):
    with pytest.raises(ValueError) as info:
        parse_memory_limit(value, nthreads=1)
    assert f"memory_limit={value!r}" in str(info.value)
    assert "auto" in str(info.value)  # and says what is accepted


@pytest.mark.parametrize("value", [-1, -1.5])
def test_memory_limit_rejects_negative(value):
    with pytest.raises(ValueError, match="negative") as info:
        parse_memory_limit(value, nthreads=1)
    assert f"memory_limit={value!r}" in str(info.value)
