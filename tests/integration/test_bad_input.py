"""Bad input from users gets a clear error, raised early, and nothing is sent or started.

The checklist of issue 6: unknown options, bad addresses, unpicklable functions
and arguments, keys of the wrong type, futures from another client (and
cancelled ones).  Each error names the culprit.  Cases already covered
elsewhere are not repeated: option values of Nanny (test_nanny), Scheduler and
Worker (test_servers), addresses at the comm layer (test_comm), and the basic
submit-time serialisation and key errors (test_client).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from cluster.runtime import Client, LocalCluster, Nanny, Scheduler, Worker
from cluster.runtime.errors import (
    AddressError,
    ConnectionTimeoutError,
    FutureCancelledError,
    TaskSerializationError,
)

from tests.helpers import gen_cluster, gen_test

ADDRESS = "tcp://127.0.0.1:1"  # nothing listens there: the constructors must fail first


def inc(x):
    return x + 1


def identity(*args, **kwargs):
    return args, kwargs


# ----------------------------------------------------------------------------- unknown options


@pytest.mark.parametrize("make", [
    pytest.param(lambda: Scheduler(bogus_option=1), id="Scheduler"),
    pytest.param(lambda: Worker(ADDRESS, bogus_option=1), id="Worker"),
    pytest.param(lambda: Nanny(ADDRESS, bogus_option=1), id="Nanny"),
    pytest.param(lambda: Client(ADDRESS, bogus_option=1), id="Client-with-address"),
    pytest.param(lambda: Client(bogus_option=1), id="Client-starting-a-cluster"),
    pytest.param(lambda: LocalCluster(bogus_option=1), id="LocalCluster-nannies"),
    pytest.param(lambda: LocalCluster(nanny=False, bogus_option=1), id="LocalCluster-processes"),
    pytest.param(lambda: LocalCluster(processes=False, bogus_option=1), id="LocalCluster-threads"),
])
@pytest.mark.timeout(30)
def test_unknown_option_is_a_type_error_naming_it(make):
    """Raised at construction, before a server, process or connection exists (the
    autouse leak check sees none), and quickly."""
    t0 = time.monotonic()
    with pytest.raises(TypeError, match="bogus_option"):
        make()
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(30)
def test_an_option_of_the_workers_passes_through_local_cluster():
    """The check above must not refuse what LocalCluster hands on to its workers."""
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None,
                      lifetime_stagger="1s") as cluster:
        (w,) = cluster.workers.values()
        assert w.lifetime_stagger == 1.0


# ----------------------------------------------------------------------------- bad addresses


@pytest.mark.parametrize("address, error, match", [
    ("nonsense://x", AddressError, r"invalid address 'nonsense://x': unknown protocol 'nonsense'"),
    ("tcp://127.0.0.1:notaport", AddressError,
     r"invalid address 'tcp://127\.0\.0\.1:notaport': port 'notaport' is not a number"),
    ("tcp://", AddressError, r"invalid address 'tcp://': missing port"),
    ("tcp://127.0.0.1:99999", AddressError, r"'tcp://127\.0\.0\.1:99999'.*out of range"),
    ("tcp://127.0.0.1:1", ConnectionTimeoutError, r"tcp://127\.0\.0\.1:1 within 1"),
])
@pytest.mark.timeout(30)
def test_bad_address_gives_an_error_naming_it_quickly(address, error, match):
    t0 = time.monotonic()
    with pytest.raises(error, match=match):
        Client(address, timeout=1)
    # Invalid addresses are not retried; an unreachable one only until the timeout.
    assert time.monotonic() - t0 < (5 if error is ConnectionTimeoutError else 1)


@pytest.mark.timeout(30)
def test_a_cluster_object_that_is_not_one():
    with pytest.raises(TypeError, match="address must be a string or a cluster object, not int"):
        Client(8786)


# ----------------------------------------------------------------------------- unpicklable work


@gen_test(timeout=30)
async def test_unpicklable_function_is_named_with_what_it_captures():
    async with gen_cluster(nworkers=1) as (c, s, workers):
        lock = threading.Lock()

        def uses_lock(x):
            with lock:
                return x

        for func, name in [(lambda x: (lock, x), "<lambda>"), (uses_lock, "uses_lock")]:
            with pytest.raises(TaskSerializationError) as info:
                c.submit(func, 1)
            msg = str(info.value)
            assert name in msg and "test_bad_input.py" in msg, msg  # which function, where
            assert "the variable 'lock' it captures" in msg, msg       # and why
            assert "lock" in msg and "cannot be pickled" in msg, msg
            with pytest.raises(TaskSerializationError, match="the variable 'lock'"):
                c.map(func, [1, 2])
        # A default argument is named too.
        with pytest.raises(TaskSerializationError, match="default argument 0"):
            c.submit(lambda x, guard=lock: x, 1)
        # Nothing reached the scheduler, and the client goes on working.
        await asyncio.sleep(0)
        assert not s.tasks
        assert await c.submit(inc, 1) == 2


def _generator():
    return (i for i in range(3))


@pytest.mark.parametrize("make_args, make_kwargs, named", [
    (lambda: (_generator(),), dict, "argument 0 (generator)"),
    (lambda: (1, threading.Lock()), dict, "argument 1 (lock)"),
    (lambda: (1,), lambda: {"cond": threading.Condition()}, "keyword argument 'cond' (Condition)"),
    (lambda: ([1, {"deep": threading.Lock()}],), dict, "argument 0 (list)"),
])
@gen_test(timeout=30)
async def test_unpicklable_argument_is_named_and_nothing_is_sent(make_args, make_kwargs, named):
    async with gen_cluster(nworkers=1) as (c, s, workers):
        args, kwargs = make_args(), make_kwargs()
        with pytest.raises(TaskSerializationError) as info:
            c.submit(identity, *args, **kwargs)
        assert named in str(info.value) and "identity" in str(info.value)
        assert isinstance(info.value, TypeError)
        # One bad item: none of the map is sent.
        bad = args[-1] if not kwargs else next(iter(kwargs.values()))
        with pytest.raises(TaskSerializationError, match="identity"):
            c.map(identity, [1, bad])
        await asyncio.sleep(0)
        assert not s.tasks and not c.futures
        assert await c.submit(inc, 2) == 3


# ----------------------------------------------------------------------------- keys and options


@pytest.mark.parametrize("key, named", [
    ([1, 2], "invalid key [1, 2] of type list"),
    (object(), "of type object"),
    (("ok", {"a": 1}), "its part {'a': 1} is of type dict"),
    (True, "invalid key True of type bool"),
    (frozenset({1}), "of type frozenset"),
])
@gen_test(timeout=30)
async def test_key_of_the_wrong_type_is_a_type_error_naming_it(key, named):
    async with gen_cluster(nworkers=1) as (c, s, workers):
        for call in (lambda: c.submit(inc, 1, key=key), lambda: c.map(inc, [1], key=[key])):
            with pytest.raises(TypeError) as info:
                call()
            msg = str(info.value)
            assert named in msg, msg
            assert "keys must be str, bytes, int, float or tuples of those" in msg
        await asyncio.sleep(0)
        assert not s.tasks


@pytest.mark.parametrize("options, error, named", [
    ({"workers": 5}, TypeError, "workers=5"),
    ({"workers": [["nested"]]}, TypeError, "workers="),
    ({"resources": {"GPU": "one"}}, TypeError, "the amount of 'GPU' must be a number"),
    ({"resources": {1: 1}}, TypeError, "resource names (str)"),
    ({"resources": {"GPU": -1}}, ValueError, "the amount of 'GPU' is negative"),
    ({"resources": ["GPU"]}, TypeError, "resources="),
    ({"retries": -1}, ValueError, "retries=-1"),
    ({"retries": 1.5}, TypeError, "retries=1.5"),
    ({"priority": "high"}, TypeError, "priority='high'"),
])
@gen_test(timeout=30)
async def test_task_option_of_the_wrong_type_is_refused_at_submit(options, error, named):
    """Options the scheduler would refuse (closing our stream) are refused here, named."""
    async with gen_cluster(nworkers=1) as (c, s, workers):
        with pytest.raises(error) as info:
            c.submit(inc, 1, **options)
        assert named in str(info.value)
        with pytest.raises(error):
            c.map(inc, [1, 2], **options)
        await asyncio.sleep(0)
        assert not s.tasks and not c.futures
        assert await c.submit(inc, 1, priority=2.5, retries=1, resources=None) == 2


# ----------------------------------------------------------------------------- futures


@gen_test(timeout=30)
async def test_future_of_another_client_is_a_value_error_as_in_dask():
    """dask.distributed raises ValueError ("Inputs contain futures that were created by
    another client") at submit time; so do we, naming the future, also when it is
    nested, and for a client that has closed since.  (test_client covers the basic case.)"""
    async with gen_cluster(nworkers=1) as (c, s, workers):
        c2 = await Client(s.address, asynchronous=True, set_as_default=False)
        f = c2.submit(inc, 1)
        await f
        with pytest.raises(ValueError, match=f"{f.key!r} belongs to another client"):
            c.submit(identity, {"deep": [(f,)]})
        with pytest.raises(ValueError, match=f"{f.key!r} belongs to another client"):
            c.map(identity, [1, 2], other=f)
        await c2.close()
        with pytest.raises(ValueError, match="another client"):
            c.submit(inc, f)
        assert await c.submit(inc, 5) == 6


@gen_test(timeout=30)
async def test_cancelled_future_as_input_is_refused_at_submit():
    """As dask.distributed's CancelledError; before, the new task failed on the cluster
    with a KeyError about an unknown dependency."""
    async with gen_cluster(nworkers=1) as (c, s, workers):
        f = c.submit(inc, 1)
        await f
        await c.cancel(f)
        with pytest.raises(FutureCancelledError, match=f"{f.key!r} was cancelled"):
            c.submit(inc, f)
        with pytest.raises(FutureCancelledError):
            c.map(inc, [f])
        assert not [k for k in s.tasks if k != f.key]
        g = c.submit(inc, 1)  # submitting the computation again works
        assert await c.submit(inc, g) == 3
