"""Every exception in ``runtime.errors`` survives pickling, with its fields."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import pickle

import cloudpickle
import pytest
from cluster.runtime import errors
from cluster.runtime.errors import (
    AddressError,
    ClusterError,
    ClusterTimeoutError,
    CommClosedError,
    CommError,
    ConnectionTimeoutError,
    FutureCancelledError,
    InvalidStateError,
    InvalidTransition,
    KilledWorker,
    ProtocolError,
    RemoteTraceback,
    ScatteredDataLost,
    TaskError,
    TaskSerializationError,
    UnknownOperationError,
)

#: Constructor arguments per class; classes not listed take one message string.
ARGS: dict[str, tuple] = {
    "ConnectionTimeoutError": ("tcp://10.0.0.1:8786", 2.5, "ConnectionRefusedError(111)"),
    "InvalidTransition": (("x", 1), "waiting", "memory", (("x", "released", "waiting"),)),
    "KilledWorker": ("inc-1234abcd", "tcp://10.0.0.2:4000", 3),
    "ScatteredDataLost": ("data-abcdef0123",),
    "RemoteTraceback": ('Traceback (most recent call last):\n  File "x.py"\nZeroDivisionError\n',
                        "tcp://10.0.0.3:1"),
    "TaskSerializationError": ("argument 0 of 'f'", "TypeError: cannot pickle '_thread.lock' object"),
    "TaskError": ("mymod.WeirdError", "it broke"),
}

ALL_NAMES = sorted(errors.__all__)

ROUND_TRIP_NAMES = ALL_NAMES


def make(name: str) -> BaseException:
    cls = getattr(errors, name)
    return cls(*ARGS.get(name, (f"a {name} happened",)))


def fields(exc: BaseException) -> dict:
    return dict(vars(exc))


def test_all_lists_every_exception_class():
    defined = {
        name for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    }
    assert defined == set(errors.__all__)
    # Constructor arguments above name only real classes.
    assert set(ARGS) <= set(errors.__all__)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_is_a_cluster_error(name):
    cls = getattr(errors, name)
    assert issubclass(cls, ClusterError)
    assert isinstance(make(name), Exception)


@pytest.mark.parametrize("name", ROUND_TRIP_NAMES)
def test_args_are_the_constructor_arguments(name):
    exc = make(name)
    assert exc.args == ARGS.get(name, (f"a {name} happened",))


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize("name", ROUND_TRIP_NAMES)
def test_round_trips_through_pickle(name, dumps):
    exc = make(name)
    out = pickle.loads(dumps(exc))
    assert type(out) is type(exc)
    assert out.args == exc.args
    assert str(out) == str(exc)
    assert repr(out) == repr(exc)
    assert fields(out) == fields(exc)


@pytest.mark.parametrize("name", ROUND_TRIP_NAMES)
def test_round_trips_after_being_raised(name):
    """A raised exception (with traceback, cause and context) still pickles."""
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise make(name) from inner
    except ClusterError as e:
        raised = e
    out = pickle.loads(pickle.dumps(raised))
    assert type(out) is type(raised)
    assert out.args == raised.args
    assert str(out) == str(raised)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("name", ROUND_TRIP_NAMES)
def test_round_trips_with_every_pickle_protocol(name, protocol):
    exc = make(name)
    out = pickle.loads(pickle.dumps(exc, protocol=protocol))
    assert type(out) is type(exc) and out.args == exc.args and str(out) == str(exc)


def test_connection_timeout_error_fields_survive():
    exc = ConnectionTimeoutError("tcp://10.0.0.1:8786", 2.5, "refused")
    for dumps in (pickle.dumps, cloudpickle.dumps):
        out = pickle.loads(dumps(exc))
        assert out.address == "tcp://10.0.0.1:8786"
        assert out.timeout == 2.5
        assert out.reason == "refused"
        assert "tcp://10.0.0.1:8786" in str(out) and "2.5s" in str(out) and "refused" in str(out)


def test_connection_timeout_error_without_reason_survives():
    bare = pickle.loads(pickle.dumps(ConnectionTimeoutError("inproc://1/2", 1)))
    assert bare.reason == ""
    assert str(bare) == "could not connect to inproc://1/2 within 1s"


def test_killed_worker_fields_survive():
    exc = KilledWorker(("x", 3), "tcp://10.0.0.2:4000", 3)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        out = pickle.loads(dumps(exc))
        assert out.task == ("x", 3)
        assert out.last_worker == "tcp://10.0.0.2:4000"
        assert out.allowed_failures == 3
        assert "('x', 3)" in str(out) and "allowed_failures=3" in str(out)
        assert "tcp://10.0.0.2:4000" in str(out)
    defaults = pickle.loads(pickle.dumps(KilledWorker("k")))
    assert (defaults.task, defaults.last_worker, defaults.allowed_failures) == ("k", "", 0)


def test_other_field_classes_survive():
    it = pickle.loads(pickle.dumps(InvalidTransition("k", "a", "b", [("k", "x", "a")])))
    assert (it.key, it.start, it.finish, it.story) == ("k", "a", "b", (("k", "x", "a"),))
    rt = pickle.loads(pickle.dumps(RemoteTraceback("tb text\n", "tcp://w:1")))
    assert (rt.text, rt.worker) == ("tb text\n", "tcp://w:1")
    assert "on worker tcp://w:1" in str(rt) and "tb text" in str(rt)
    tse = pickle.loads(pickle.dumps(TaskSerializationError("argument 1", "boom")))
    assert (tse.what, tse.reason) == ("argument 1", "boom")
    sdl = pickle.loads(pickle.dumps(ScatteredDataLost("k")))
    assert sdl.key == "k"
    te = pickle.loads(pickle.dumps(TaskError("pkg.E", "msg")))
    assert (te.type_name, te.message) == ("pkg.E", "msg")
    assert str(te) == "pkg.E: msg"


def test_future_cancelled_error_is_a_cancelled_error():
    exc = FutureCancelledError("key-1 cancelled")
    assert isinstance(exc, concurrent.futures.CancelledError)
    with pytest.raises(concurrent.futures.CancelledError):
        raise exc
    out = pickle.loads(pickle.dumps(exc))
    assert isinstance(out, concurrent.futures.CancelledError)
    assert isinstance(out, ClusterError)


def test_cluster_timeout_error_is_a_timeout_error():
    exc = ClusterTimeoutError("took too long")
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, asyncio.TimeoutError)  # an alias of TimeoutError since 3.11
    with pytest.raises(TimeoutError):
        raise exc
    assert isinstance(pickle.loads(pickle.dumps(exc)), TimeoutError)


def test_documented_bases():
    assert issubclass(ConnectionTimeoutError, TimeoutError)
    assert issubclass(AddressError, ValueError)
    assert issubclass(TaskSerializationError, TypeError)
    assert issubclass(InvalidStateError, AssertionError)
    for cls in (CommClosedError, ConnectionTimeoutError, ProtocolError, UnknownOperationError):
        assert issubclass(cls, CommError)
    for cls in (AddressError, KilledWorker, TaskError, RemoteTraceback):
        assert not issubclass(cls, CommError)
