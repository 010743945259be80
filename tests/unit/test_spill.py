"""SpillBuffer: LRU spilling to disk, read-back, bookkeeping, unpicklable values, threads."""

from __future__ import annotations

import logging
import os
import pickle
import random
import threading
import time

import numpy as np
import pytest
from cluster.runtime.comm.serialize import OUT_OF_BAND_THRESHOLD
from cluster.runtime.execution import sizeof
from cluster.runtime.spill import SpillBuffer

LOGGER = "cluster.runtime.spill"


class Point:
    """A user class, pickled by reference."""

    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None


class RefusesPickle:
    def __reduce__(self):
        raise TypeError("RefusesPickle refuses to be pickled")


class SameRepr:
    """Distinct keys whose reprs collide."""

    def __init__(self, n):
        self.n = n

    def __eq__(self, other):
        return isinstance(other, SameRepr) and self.n == other.n

    def __hash__(self):
        return hash(self.n)

    def __repr__(self):
        return "SameRepr()"


def spill_files(directory) -> dict[str, int]:
    return {
        name: os.path.getsize(os.path.join(directory, name))
        for name in os.listdir(directory)
    }


def check_bookkeeping(buf: SpillBuffer, directory) -> None:
    """Totals match the values in memory and the files on disk exactly."""
    assert buf.memory_total == sum(sizeof(v) for v in buf.memory.values())
    files = spill_files(directory)
    assert len(files) == len(buf.disk) == buf.spilled_count
    assert buf.disk_total == sum(files.values())
    assert not set(buf.memory) & set(buf.disk)
    assert len(buf) == len(buf.memory) + len(buf.disk)


@pytest.fixture
def spill_dir(tmp_path):
    return str(tmp_path / "spill")


# --------------------------------------------------------------------------- spilling order


def test_values_above_target_spill_least_recently_used_first(spill_dir):
    with SpillBuffer(spill_dir, target=100) as buf:
        buf["a"] = b"a" * 40
        buf["b"] = b"b" * 40
        assert list(buf.memory) == ["a", "b"] and len(buf.disk) == 0
        buf["c"] = b"c" * 40  # 120 > 100: "a" is the least recently used
        assert list(buf.memory) == ["b", "c"]
        assert list(buf.disk) == ["a"]
        assert buf["b"] == b"b" * 40  # "b" becomes the most recent
        assert list(buf.memory) == ["c", "b"]
        buf["d"] = b"d" * 40  # so "c" goes next
        assert list(buf.memory) == ["b", "d"]
        assert sorted(buf.disk) == ["a", "c"]
        assert buf.memory_total == 80
        assert buf.spilled_count == 2
        check_bookkeeping(buf, spill_dir)


def test_memory_view_does_not_touch_lru_order_and_is_read_only(spill_dir):
    with SpillBuffer(spill_dir, target=100) as buf:
        buf["a"] = b"a" * 40
        buf["b"] = b"b" * 40
        assert buf.memory["a"] == b"a" * 40
        assert list(buf.memory) == ["a", "b"]
        buf["c"] = b"c" * 40
        assert "a" in buf.disk and "a" not in buf.memory
        with pytest.raises(TypeError):
            buf.memory["x"] = 1
        with pytest.raises(TypeError):
            buf.disk["x"] = 1


def test_target_none_never_spills_by_size(spill_dir):
    with SpillBuffer(spill_dir, target=None) as buf:
        for i in range(20):
            buf[i] = bytes(10_000)
        assert len(buf.memory) == 20 and len(buf.disk) == 0
        assert buf.memory_total == 200_000
        assert spill_files(spill_dir) == {}


def test_value_bigger_than_target_goes_straight_to_disk(spill_dir):
    with SpillBuffer(spill_dir, target=100) as buf:
        buf["small"] = b"s" * 50
        buf["big"] = b"B" * 500
        assert list(buf.memory) == ["small"]  # not pushed out by the big one
        assert list(buf.disk) == ["big"]
        assert buf["big"] == b"B" * 500
        assert "big" in buf.disk  # would not fit in memory: left on disk
        assert list(buf.memory) == ["small"]
        check_bookkeeping(buf, spill_dir)


# --------------------------------------------------------------------------- round trips


def make_values():
    rng = np.random.default_rng(0)
    return {
        "float-array": rng.random((100, 50)),
        "int-array": np.arange(100_000, dtype=np.int64),
        "fortran-array": np.asfortranarray(rng.random((30, 40))),
        "strided-array": np.arange(1000)[::3],
        "structured-array": np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "i4"), ("b", "f8")]),
        "empty-array": np.empty((0, 3)),
        "small-bytes": b"hello",
        "large-bytes": os.urandom(OUT_OF_BAND_THRESHOLD * 2),
        "bytearray": bytearray(os.urandom(OUT_OF_BAND_THRESHOLD + 1)),
        "dict": {"x": [1, 2, {"y": (3, 4.5)}], "s": "text", None: None},
        "custom-class": Point(1, [2, 3]),
        "str": "ü" * 1000,
        "none": None,
    }


@pytest.mark.parametrize("name", list(make_values()))
def test_spilled_value_reads_back_equal_and_returns_to_memory(spill_dir, name):
    value = make_values()[name]
    with SpillBuffer(spill_dir, target=10**9) as buf:
        buf[name] = value
        assert buf.evict() == sizeof(value)
        assert name in buf.disk and name not in buf.memory
        assert buf.memory_total == 0
        assert len(spill_files(spill_dir)) == 1

        peek = buf.disk[name]  # reading through .disk does not unspill
        assert name in buf.disk

        back = buf[name]
        assert name in buf.memory and name not in buf.disk
        assert spill_files(spill_dir) == {}
        assert buf.disk_total == 0
        assert buf.memory_total == sizeof(back)
        for got in (peek, back):
            assert type(got) is type(value)
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and got.shape == value.shape
                np.testing.assert_array_equal(got, value)
            else:
                assert got == value


def test_closures_spill_through_cloudpickle(spill_dir):
    offset = 10
    with SpillBuffer(spill_dir, target=10**9) as buf:
        buf["f"] = lambda x: x + offset
        assert buf.evict() > 0
        assert buf["f"](5) == 15


def test_numpy_arrays_spill_out_of_band_and_come_back_aligned_and_writable(spill_dir):
    arr = np.arange(1_000_000, dtype=np.float64)
    with SpillBuffer(spill_dir, target=10**9) as buf:
        buf["x"] = arr
        buf.evict()
        (size,) = spill_files(spill_dir).values()
        # The raw data plus a header and a small pickle stream: no second copy.
        assert arr.nbytes < size < arr.nbytes + 4096
        with open(os.path.join(spill_dir, os.listdir(spill_dir)[0]), "rb") as f:
            assert arr.tobytes() in f.read()
        back = buf["x"]
        assert back.flags.aligned and back.flags.writeable
        back[0] = -1.0  # usable as a normal array
        np.testing.assert_array_equal(back[1:], arr[1:])


def test_five_times_target_in_values_all_read_back(spill_dir):
    target = 1_000_000
    rng = np.random.default_rng(1)
    values = {f"x-{i}": rng.random(12_500) for i in range(50)}  # 100 kB each, 5 MB total
    with SpillBuffer(spill_dir, target=target) as buf:
        for k, v in values.items():
            buf[k] = v
            assert buf.memory_total <= target
        assert sum(v.nbytes for v in values.values()) == 5 * target
        assert len(buf) == 50
        assert len(buf.disk) == 40 and len(buf.memory) == 10
        check_bookkeeping(buf, spill_dir)
        for k in rng.permutation(list(values)):
            np.testing.assert_array_equal(buf[k], values[k])
            assert buf.memory_total <= target
        check_bookkeeping(buf, spill_dir)
        assert len(buf) == 50


def test_any_key_gets_a_safe_distinct_file(spill_dir):
    keys = ["../../etc/passwd", "a/b\\c", ("tuple", 1), 3, 3.5, "\x00nul", SameRepr(1), SameRepr(2)]
    with SpillBuffer(spill_dir, target=0) as buf:
        for i, k in enumerate(keys):
            buf[k] = [i]
        assert len(buf.disk) == len(keys)
        files = spill_files(spill_dir)
        assert len(files) == len(keys)
        assert all(os.sep not in name and name.endswith(".spill") for name in files)
        for i, k in enumerate(keys):
            assert buf.disk[k] == [i]
        assert not os.path.exists(os.path.join(os.path.dirname(spill_dir), "etc"))


# --------------------------------------------------------------------------- deleting, closing


def test_delete_removes_the_spill_file(spill_dir):
    with SpillBuffer(spill_dir, target=100) as buf:
        buf["a"] = b"a" * 80
        buf["b"] = b"b" * 80
        assert list(buf.disk) == ["a"] and len(spill_files(spill_dir)) == 1
        del buf["a"]
        assert spill_files(spill_dir) == {}
        assert buf.disk_total == 0 and "a" not in buf
        del buf["b"]
        assert len(buf) == 0 and buf.memory_total == 0
        with pytest.raises(KeyError):
            del buf["a"]


def test_overwriting_a_spilled_key_replaces_its_file(spill_dir):
    with SpillBuffer(spill_dir, target=100) as buf:
        buf["a"] = b"a" * 80
        buf["b"] = b"b" * 80  # spills "a"
        buf["a"] = b"A" * 10  # back in memory, the old file is gone
        assert "a" in buf.memory and "a" not in buf.disk
        assert spill_files(spill_dir) == {}
        assert buf["a"] == b"A" * 10
        check_bookkeeping(buf, spill_dir)


def test_pop_and_clear(spill_dir):
    with SpillBuffer(spill_dir, target=100) as buf:
        buf["a"] = b"a" * 80
        buf["b"] = b"b" * 80
        assert buf.pop("a") == b"a" * 80  # from disk, without unspilling into memory
        assert list(buf.memory) == ["b"] and spill_files(spill_dir) == {}
        assert buf.pop("missing", "default") == "default"
        with pytest.raises(KeyError):
            buf.pop("missing")
        buf["c"] = b"c" * 80
        buf.clear()
        assert len(buf) == 0 and spill_files(spill_dir) == {}
        assert buf.memory_total == 0 and buf.disk_total == 0


def test_close_removes_files_and_created_directory(spill_dir):
    buf = SpillBuffer(spill_dir, target=0)
    assert os.path.isdir(spill_dir)
    for i in range(5):
        buf[i] = b"x" * 100
    assert len(spill_files(spill_dir)) == 5
    buf.close()
    assert not os.path.exists(spill_dir)
    assert len(buf) == 0 and buf.disk_total == 0 and buf.memory_total == 0
    buf.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        buf["again"] = 1


def test_close_keeps_a_directory_it_did_not_create(tmp_path):
    (tmp_path / "other-file").write_text("not ours")
    with SpillBuffer(str(tmp_path), target=0) as buf:
        buf["a"] = b"a" * 100
        assert len(os.listdir(tmp_path)) == 2
    assert os.listdir(tmp_path) == ["other-file"]


def test_context_manager_cleans_up_on_error(spill_dir):
    with pytest.raises(RuntimeError, match="boom"):
        with SpillBuffer(spill_dir, target=0) as buf:
            buf["a"] = b"a" * 100
            raise RuntimeError("boom")
    assert not os.path.exists(spill_dir)


def test_truncated_spill_file_raises_and_keeps_the_key(spill_dir):
    with SpillBuffer(spill_dir, target=0) as buf:
        buf["a"] = b"a" * 1000
        (name,) = os.listdir(spill_dir)
        with open(os.path.join(spill_dir, name), "r+b") as f:
            f.truncate(10)
        with pytest.raises(OSError, match="truncated"):
            buf["a"]
        assert "a" in buf.disk


# --------------------------------------------------------------------------- what cannot spill


@pytest.mark.parametrize("make", [threading.Lock, RefusesPickle], ids=["lock", "reduce-raises"])
def test_unpicklable_value_stays_in_memory_and_is_skipped(spill_dir, caplog, monkeypatch, make):
    import cluster.runtime.spill as spill_module

    calls = []
    real_dumps = spill_module.dumps

    def counting_dumps(value):
        calls.append(value)
        return real_dumps(value)

    monkeypatch.setattr(spill_module, "dumps", counting_dumps)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with SpillBuffer(spill_dir, target=None) as buf:
        value = make()
        buf["stuck-key"] = value
        assert buf.evict() == -1
        assert buf["stuck-key"] is value and "stuck-key" in buf.memory
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "stuck-key" in warnings[0].getMessage()
        assert len(calls) == 1

        # Later evictions skip it without trying again, and move on to the next value.
        buf["ok"] = b"ok" * 10
        assert buf.evict() == 20
        assert list(buf.disk) == ["ok"]
        assert buf.evict() == -1
        assert len(calls) == 2  # only "ok" was pickled
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

        # Setting the key again clears the mark.
        buf["stuck-key"] = b"fine now"
        assert buf.evict() == len(b"fine now")
        assert "stuck-key" in buf.disk
        check_bookkeeping(buf, spill_dir)


def test_unpicklable_over_target_does_not_loop(spill_dir, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with SpillBuffer(spill_dir, target=10, sizeof=lambda v: 1000) as buf:
        buf["lock"] = threading.Lock()  # cannot go to disk: stays, over target
        buf["a"] = 1
        buf["b"] = 2
        assert list(buf.memory) == ["lock"]  # over target, yet nothing else was pushed out
        assert list(buf.disk) == ["a", "b"]
        assert buf.evict() == -1
        assert buf.evict() == -1
        assert sum("'lock'" in r.getMessage() for r in caplog.records) == 1


# --------------------------------------------------------------------------- evict


def test_evict_returns_bytes_freed_and_minus_one_when_empty(spill_dir):
    with SpillBuffer(spill_dir, target=None) as buf:
        assert buf.evict() == -1
        buf["a"] = b"a" * 300
        buf["b"] = np.zeros(100)
        assert buf.evict() == 300
        assert buf.evict() == 800
        assert buf.evict() == -1
        assert buf.memory_total == 0 and len(buf.disk) == 2
        check_bookkeeping(buf, spill_dir)


def test_evict_until_below_a_memory_limit(spill_dir):
    """How the memory monitor uses it: evict until under target (or nothing is left)."""
    with SpillBuffer(spill_dir, target=None) as buf:
        for i in range(10):
            buf[i] = bytes(1000)
        limit = 3500
        freed = []
        while buf.memory_total > limit:
            n = buf.evict()
            assert n > 0
            freed.append(n)
        assert freed == [1000] * 7
        assert list(buf.memory) == [7, 8, 9]
        assert list(buf.disk) == list(range(7))


# --------------------------------------------------------------------------- max_spill


def spill_file_size(tmp_path, value) -> int:
    with SpillBuffer(str(tmp_path / "probe"), target=0) as probe:
        probe["k"] = value
        return probe.disk_total


def test_max_spill_keeps_values_in_memory_and_logs_once(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    value = b"v" * 1000
    one = spill_file_size(tmp_path, value)
    max_spill = 2 * one + one // 2
    directory = str(tmp_path / "spill")
    with SpillBuffer(directory, target=1500, max_spill=max_spill) as buf:
        for i in range(6):
            buf[i] = value
            assert buf.disk_total <= max_spill
        assert list(buf.disk) == [0, 1]
        assert list(buf.memory) == [2, 3, 4, 5]  # over target: no room on disk
        assert buf.disk_total == 2 * one
        assert buf.evict() == -1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "max_spill" in warnings[0].getMessage()

        # Room again after a delete.
        del buf[0]
        assert buf.evict() == len(value)
        assert buf.disk_total <= max_spill
        check_bookkeeping(buf, directory)


def test_max_spill_zero_never_writes(spill_dir):
    with SpillBuffer(spill_dir, target=0, max_spill=0) as buf:
        buf["a"] = b"a" * 10
        assert "a" in buf.memory
        assert buf.evict() == -1
        assert spill_files(spill_dir) == {}


def test_negative_limits_are_rejected(spill_dir):
    with pytest.raises(ValueError, match="target"):
        SpillBuffer(spill_dir, target=-1)
    with pytest.raises(ValueError, match="max_spill"):
        SpillBuffer(spill_dir, target=1, max_spill=-1)


# --------------------------------------------------------------------------- mapping protocol


def test_len_iter_contains_across_tiers(spill_dir):
    with SpillBuffer(spill_dir, target=100) as buf:
        for k in "abcde":
            buf[k] = k.encode() * 40
        assert len(buf) == 5
        assert sorted(buf) == list("abcde")
        assert set(buf.memory) | set(buf.disk) == set("abcde")
        assert len(buf.disk) == 3 and len(buf.memory) == 2
        assert all(k in buf for k in "abcde")
        assert "z" not in buf and "z" not in buf.disk and "z" not in buf.memory
        # Membership tests do not unspill anything.
        assert "a" in buf.disk
        assert buf.get("z") is None
        with pytest.raises(KeyError):
            buf["z"]
        assert dict(buf.items()) == {k: k.encode() * 40 for k in "abcde"}
        check_bookkeeping(buf, spill_dir)


def test_bookkeeping_is_exact_under_random_operations(spill_dir):
    rng = random.Random(1234)
    model: dict = {}
    with SpillBuffer(spill_dir, target=5000) as buf:
        for step in range(1500):
            op = rng.random()
            key = rng.randrange(40)
            if op < 0.5:
                if rng.random() < 0.5:
                    value = rng.randbytes(rng.randrange(0, 3000))
                else:
                    value = np.full(rng.randrange(0, 400), step, dtype=np.int64)
                buf[key] = value
                model[key] = value
            elif op < 0.8:
                if key in model:
                    got = buf[key]
                    if isinstance(model[key], np.ndarray):
                        np.testing.assert_array_equal(got, model[key])
                    else:
                        assert got == model[key]
                else:
                    with pytest.raises(KeyError):
                        buf[key]
            elif op < 0.95:
                if key in model:
                    del buf[key]
                    del model[key]
                else:
                    with pytest.raises(KeyError):
                        del buf[key]
            elif buf.evict() == -1:
                assert len(buf.memory) == 0  # nothing here is unpicklable
            assert set(buf) == set(model)
            assert buf.memory_total <= 5000
            check_bookkeeping(buf, spill_dir)
        assert buf.spilled_count > 0  # the sequence did exercise the disk tier


# --------------------------------------------------------------------------- threads


def test_concurrent_readers_and_writers(spill_dir):
    n_threads, n_ops = 6, 300
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)
    with SpillBuffer(spill_dir, target=20_000) as buf:
        for i in range(20):
            buf[("shared", i)] = np.full(500, i, dtype=np.int64)

        def work(t: int) -> None:
            try:
                rng = random.Random(t)
                start.wait(timeout=30)
                mine: dict = {}
                for step in range(n_ops):
                    i = rng.randrange(20)
                    shared = buf[("shared", i)]
                    assert shared.shape == (500,) and (shared == i).all()
                    key = (t, rng.randrange(10))
                    if rng.random() < 0.6:
                        mine[key] = bytes([t]) * rng.randrange(100, 2000)
                        buf[key] = mine[key]
                    elif key in mine:
                        assert buf[key] == mine[key]
                        if rng.random() < 0.3:
                            del buf[key]
                            del mine[key]
                    if step % 50 == 0:
                        buf.evict()
                for key, value in mine.items():
                    assert buf[key] == value
            except BaseException as e:  # reported to the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,), name=f"spill-{t}") for t in range(n_threads)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 60
        for th in threads:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in threads), "threads did not finish: deadlock?"
        assert errors == []
        assert buf.spilled_count > 0
        check_bookkeeping(buf, spill_dir)
        for i in range(20):
            assert (buf[("shared", i)] == i).all()


def test_spilled_values_are_independent_copies(spill_dir):
    """What comes back from disk does not alias the file or another read."""
    with SpillBuffer(spill_dir, target=None) as buf:
        buf["x"] = np.zeros(10_000)
        buf.evict()
        a = buf.disk["x"]
        b = buf.disk["x"]
        a[:] = 1
        assert (b == 0).all()
        assert pickle.loads(pickle.dumps(buf["x"])).sum() == 0


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs mounted for the test (needs root, as in CI), unmounted after."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "small"
    mount.mkdir(mode=0o700)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True, timeout=30)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


def test_full_disk_is_an_error_with_the_path_and_ends_when_there_is_room(small_fs, caplog):
    caplog.set_level(logging.DEBUG, logger="cluster.runtime.spill")
    calls = []
    directory = small_fs / "spill"
    buf = SpillBuffer(directory, target=1_000_000, on_no_space=calls.append)
    try:
        values = {f"x{i}": bytes([i]) * 500_000 for i in range(12)}  # 6 MB into 2 MB of disk
        for k, v in values.items():
            buf[k] = v
        assert buf.spilled_count >= 1 and buf.no_space is not None
        assert str(directory) in buf.no_space and "No space left" in buf.no_space
        assert calls == [buf.no_space]  # told once, not per failed write
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and str(directory) in errors[0].getMessage()
        assert {k: buf[k] for k in values} == values  # nothing lost
        assert buf.evict() == -1  # no retries behind check_space's back
        assert buf.check_space() == buf.no_space  # still full: still the reason
        # Room again: drop what is on disk and all but 1.5 MB in memory (so 0.5 MB are to
        # spill); check_space spills and ends the episode.
        for k in [*buf.disk, *list(buf.memory)[:-3]]:
            del buf[k]
        assert buf.check_space() is None and calls[-1] is None
        assert buf.spilled_count >= 1
        # Full again, then nothing needs spilling: over as well; logged, not at ERROR again.
        for i in range(12, 24):
            buf[f"x{i}"] = bytes([i]) * 500_000
        assert buf.no_space is not None and calls[-1] == buf.no_space
        for k in list(buf.memory):
            del buf[k]
        assert buf.check_space() is None and calls[-1] is None
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        check_bookkeeping(buf, directory)
    finally:
        buf.close()
