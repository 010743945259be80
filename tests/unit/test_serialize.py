"""Message serialisation: pickle first, cloudpickle for code, typed errors, out-of-band bytes."""

from __future__ import annotations

import functools
import os
import pickle
import threading

import numpy as np
import pytest
from cluster.runtime.comm.serialize import (
    OUT_OF_BAND_THRESHOLD,
    box_large,
    dumps,
    dumps_function,
    loads,
)
from cluster.runtime.errors import TaskSerializationError


def wire(frames: list) -> list:
    """What the TCP receiver hands to ``loads``: bytes for the stream, bytearrays for buffers."""
    return [bytes(frames[0]), *(bytearray(memoryview(f).cast("B")) for f in frames[1:])]


def add(x, y=0):
    return x + y


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")

    def __repr__(self):
        return "<Unpicklable thing>"


class CallableWithLock:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, x):
        return x


# --------------------------------------------------------------------------- dumps / loads


@pytest.mark.parametrize(
    "msg",
    [{"op": "x", "args": (1, 2.5, "s", None)}, [1, [2, [3]]], "text", b"bytes", 42, None, {}],
)
def test_plain_messages_round_trip_in_one_frame(msg):
    frames = dumps(msg)
    assert len(frames) == 1
    assert loads(frames) == msg
    assert loads(wire(frames)) == msg


def test_lambda_falls_back_to_cloudpickle():
    msg = {"op": "compute", "func": lambda x: x * 3, "args": (7,)}
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(msg, protocol=5)  # plain pickle cannot do it ...
    frames = dumps(msg)  # ... but dumps can
    out = loads(wire(frames))
    assert out["op"] == "compute" and out["args"] == (7,)
    assert out["func"](*out["args"]) == 21


def test_closure_and_local_function_fall_back_to_cloudpickle():
    offset = 10

    def local(x):
        return x + offset

    out = loads(dumps([local, functools.partial(local, 5)]))
    assert out[0](1) == 11
    assert out[1]() == 15


def test_cloudpickle_fallback_keeps_buffers_out_of_band():
    arr = np.arange(OUT_OF_BAND_THRESHOLD, dtype=np.int64)
    frames = dumps({"func": lambda a: a.sum(), "data": arr})
    assert len(frames) > 1
    out = loads(wire(frames))
    assert np.array_equal(out["data"], arr)
    assert out["func"](out["data"]) == arr.sum()


@pytest.mark.parametrize(
    "obj, type_name",
    [
        (threading.Lock(), "lock"),
        (Unpicklable(), "Unpicklable"),
        ((i for i in range(3)), "generator"),
    ],
    ids=["lock", "custom", "generator"],
)
def test_unpicklable_raises_task_serialization_error(obj, type_name):
    with pytest.raises(TaskSerializationError) as info:
        dumps({"op": "x", "value": obj})
    err = info.value
    assert isinstance(err, TypeError)
    assert "dict" in err.what  # names the message's type
    assert type_name in err.reason or type_name in str(err)
    assert str(err).startswith("could not serialize")
    assert err.__cause__ is not None
    # The error itself pickles (it is sent back to clients).
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


# --------------------------------------------------------------------------- dumps_function


def test_dumps_function_round_trips_code_and_arguments():
    offset = 3
    task = (lambda x, y=0: x + y + offset, (1,), {"y": 2})
    func, args, kwargs = pickle.loads(dumps_function(task))
    assert func(*args, **kwargs) == 6
    assert pickle.loads(dumps_function(add))(2, 3) == 5


@pytest.mark.parametrize(
    "task, what, culprit",
    [
        ((add, (1, threading.Lock()), {}), "argument 1", "lock"),
        ((add, (Unpicklable(),), {}), "argument 0", "Unpicklable thing"),
        ((add, (1,), {"y": threading.Lock()}), "keyword argument 'y'", "lock"),
        ((CallableWithLock(), (1,), {}), "function", "CallableWithLock"),
    ],
    ids=["positional", "custom", "keyword", "function"],
)
def test_dumps_function_names_the_offending_argument(task, what, culprit):
    with pytest.raises(TaskSerializationError) as info:
        dumps_function(task)
    err = info.value
    assert err.what.startswith(what), err.what
    assert culprit in err.what
    assert what in str(err) and culprit in str(err)
    assert "add" in err.what or what == "function"  # and the task it belongs to
    assert err.reason  # and why pickling failed


def test_dumps_function_of_a_bare_unpicklable_object():
    with pytest.raises(TaskSerializationError, match="object of type lock"):
        dumps_function(threading.Lock())


def test_dumps_function_shortens_huge_reprs():
    class Big:
        lock = None

        def __init__(self):
            self.lock = threading.Lock()

        def __repr__(self):
            return "B" * 10_000

    with pytest.raises(TaskSerializationError) as info:
        dumps_function((add, (Big(),), {}))
    assert len(info.value.what) < 300
    assert "..." in info.value.what


# --------------------------------------------------------------------------- box_large


@pytest.mark.parametrize("size", [OUT_OF_BAND_THRESHOLD, OUT_OF_BAND_THRESHOLD + 1, 4 * 2**20])
def test_box_large_bytes_load_back_as_bytes(size):
    raw = os.urandom(size)
    boxed = box_large(raw)
    assert boxed is not raw
    frames = dumps({"data": boxed})
    assert len(frames) == 2
    assert memoryview(frames[1]).nbytes == size
    assert len(frames[0]) < 1024  # the payload is not copied into the pickle stream
    for received in (frames, wire(frames)):
        out = loads(received)["data"]
        assert type(out) is bytes
        assert out == raw


def test_box_large_leaves_small_and_other_values_alone():
    small = b"x" * (OUT_OF_BAND_THRESHOLD - 1)
    assert box_large(small) is small
    assert len(dumps(box_large(small))) == 1
    for value in ("s" * OUT_OF_BAND_THRESHOLD, 5, None, [b"x" * OUT_OF_BAND_THRESHOLD]):
        assert box_large(value) is value

    class MyBytes(bytes):
        pass

    sub = MyBytes(b"x" * OUT_OF_BAND_THRESHOLD)
    assert box_large(sub) is sub  # only exact bytes are boxed; subclasses keep their type


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "readonly-memoryview"])
def test_box_large_bytes_likes_keep_their_content(kind):
    raw = os.urandom(OUT_OF_BAND_THRESHOLD * 2)
    value = {
        "bytearray": bytearray(raw),
        "memoryview": memoryview(bytearray(raw)),
        "readonly-memoryview": memoryview(raw),
    }[kind]
    frames = dumps(box_large(value))
    assert len(frames) == 2
    for received in (frames, wire(frames)):
        assert bytes(loads(received)) == raw


def test_box_large_small_bytearray_is_untouched():
    small = bytearray(10)
    assert box_large(small) is small
    assert loads(dumps(box_large(small))) == small


def test_box_large_bytearray_loads_back_as_bytearray():
    raw = os.urandom(OUT_OF_BAND_THRESHOLD)
    out = loads(dumps(box_large(bytearray(raw))))
    assert type(out) is bytearray
    assert out == raw


def test_loads_with_missing_buffers_fails():
    frames = dumps(box_large(b"x" * OUT_OF_BAND_THRESHOLD))
    with pytest.raises(pickle.UnpicklingError):
        loads(frames[:1])
