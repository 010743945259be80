"""Memory and walltime units: what users write in, what each batch system reads out (pure)."""

from __future__ import annotations

import datetime

import pytest
from cluster.jobqueue.units import (
    exact_size,
    hms,
    parse_duration,
    parse_memory,
    parse_walltime,
    pbs_memory,
    seconds_text,
    slurm_memory,
    slurm_time,
)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("text, nbytes", [
    ("4GB", 4 * 10**9), ("4 GB", 4 * 10**9), ("4G", 4 * 10**9), ("3.5GiB", int(3.5 * 2**30)),
    ("500MB", 500 * 10**6), ("512MiB", 512 * 2**20), ("1TB", 10**12), (2**30, 2**30),
    (4e9, 4 * 10**9),
])
def test_parse_memory(text, nbytes):
    assert parse_memory(text) == nbytes


@pytest.mark.parametrize("bad", ["", "four GB", "4 parsecs", "-1GB", 0, "0GB"])
def test_parse_memory_refuses_and_names_the_option(bad):
    with pytest.raises(ValueError, match="job_mem="):
        parse_memory(bad, "job_mem")


@pytest.mark.parametrize("bad", [None, True, ["4GB"]])
def test_parse_memory_type_errors(bad):
    with pytest.raises(TypeError, match="memory="):
        parse_memory(bad)


@pytest.mark.parametrize("nbytes, text", [
    (4 * 10**9, "3815M"),          # 3814.7 MiB rounded up, not "4G" (= 4 GiB, 7% more)
    (4 * 2**30, "4096M"),
    (16 * 10**9, "15259M"),
    (2**20 + 1, "2M"),
    (1, "1M"),
])
def test_slurm_memory_is_mib_rounded_up(nbytes, text):
    assert slurm_memory(nbytes) == text


@pytest.mark.parametrize("nbytes, text", [
    (8 * 2**30, "8gb"),            # whole GiB
    (4 * 10**9, "3815mb"),         # PBS units are binary: MiB, rounded up
    (1536 * 2**20, "1536mb"),
    (1, "1mb"),
])
def test_pbs_memory(nbytes, text):
    assert pbs_memory(nbytes) == text


@pytest.mark.parametrize("nbytes, text", [
    (4 * 10**9, "4GB"), (2 * 2**30, "2GiB"), (1500 * 10**6, "1500MB"), (3 * 2**20, "3MiB"),
    (1234, "1234"), (2 * 10**12, "2TB"), (1000, "1kB"), (1024, "1kiB"),
])
def test_exact_size_never_rounds(nbytes, text):
    assert exact_size(nbytes) == text


@pytest.mark.parametrize("text, seconds", [
    ("00:30:00", 1800), ("01:30:00", 5400), ("1-12:00:00", 129600), ("90m", 5400),
    ("2h", 7200), ("45s", 45), ("00:00:01.2", 2), ("48:00:00", 172800),
    (datetime.timedelta(minutes=5), 300),
])
def test_parse_walltime(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("bad", ["30", 30, 30.0, "", "soon", "00:00:00", "-5m"])
def test_parse_walltime_refuses_bare_numbers_and_nonsense(bad):
    with pytest.raises(ValueError, match=r"walltime=.*expected a duration like '01:30:00'"):
        parse_walltime(bad)


def test_parse_walltime_type_error():
    with pytest.raises(TypeError, match="walltime="):
        parse_walltime(["01:00:00"])


@pytest.mark.parametrize("seconds, slurm_text, pbs_text", [
    (1800, "00:30:00", "00:30:00"),
    (86400, "1-00:00:00", "24:00:00"),
    (129601, "1-12:00:01", "36:00:01"),
    (59.2, "00:01:00", "00:01:00"),
])
def test_walltime_rendering(seconds, slurm_text, pbs_text):
    assert slurm_time(seconds) == slurm_text
    assert hms(seconds) == pbs_text


def test_durations():
    assert parse_duration("5m", "x") == 300
    assert parse_duration(datetime.timedelta(seconds=3), "x") == 3
    assert parse_duration(0, "x") == 0
    with pytest.raises(ValueError, match="death_timeout="):
        parse_duration("later", "death_timeout")
    with pytest.raises(ValueError, match="death_timeout="):
        parse_duration(-1, "death_timeout")
    assert seconds_text(3299.9) == "3299s"
