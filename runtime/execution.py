"""Running task code: the recipe format, a thread pool that reports in batches,
and the per-thread context behind ``get_worker()`` / ``get_current_task()``.

A task recipe (*run spec*) is a pair of bytes ``(function, arguments)``: the
function is pickled once per distinct function (``map`` over 10,000 items
ships one copy of it per message, thanks to pickle's memo), the arguments
``(args, kwargs)`` per task.  Dependencies appear in the arguments as
:class:`TaskRef` placeholders, replaced by the values just before the call.

The pool's threads pull jobs from a queue and push results to a deque; the
event loop is woken once per burst of results, not once per task, which is
where much of a per-task hand-off cost goes.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import pickle
import queue
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

import cloudpickle

from .errors import TaskError

logger = logging.getLogger(__name__)

_thread_state = threading.local()


def task_worker() -> Any:
    """The worker whose thread pool runs the current thread's task, else ``None``."""
    if getattr(_thread_state, "pool", None) is None or getattr(_thread_state, "key", None) is None:
        return None
    return getattr(_thread_state, "worker", None)


class TaskRef:
    """Placeholder for the value of another task inside a task's arguments."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable):
        self.key = key

    def __reduce__(self):
        return (TaskRef, (self.key,))

    def __repr__(self) -> str:
        return f"TaskRef({self.key!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, TaskRef) and other.key == self.key

    def __hash__(self) -> int:
        return hash(("TaskRef", self.key))


def substitute(obj: Any, data: dict) -> Any:
    """Replace every :class:`TaskRef` in (nested lists, tuples, sets, dicts of) ``obj``."""
    t = type(obj)
    if t is TaskRef:
        return data[obj.key]
    if t is list:
        return [substitute(o, data) for o in obj]
    if t is tuple:
        return tuple(substitute(o, data) for o in obj)
    if t is dict:
        return {k: substitute(v, data) for k, v in obj.items()}
    if t is set:
        return {substitute(o, data) for o in obj}
    return obj


class _GraphPickling(threading.local):
    """While the client pickles a dask graph node: the keys of our futures met inside it
    (``Future.__reduce__`` records them, see :mod:`cluster.runtime.collections`).  While a
    worker unpickles such a node: the values those futures stand for."""

    keys: set | None = None
    values: dict | None = None


graph_pickling = _GraphPickling()


def graph_future_value(key: Hashable) -> Any:
    """What a future inside a dask graph node unpickles to on the worker: its value."""
    values = graph_pickling.values
    if values is None or key not in values:
        raise RuntimeError(f"the future {key!r} inside a task was unpickled outside its task")
    return values[key]


def run_graph_node(node: Any, values: dict) -> Any:
    """Run one node of a dask graph (a ``dask._task_spec`` object) with its dependencies'
    values, as dask defines it: ``node(values)``."""
    return node(values)


def run_graph_node_bytes(node_b: bytes, values: dict) -> Any:
    """:func:`run_graph_node` for a node pickled with our futures inside it: each
    unpickles as the value of its key."""
    graph_pickling.values = values
    try:
        (node,), _ = pickle.loads(node_b)
    finally:
        graph_pickling.values = None
    return node(values)


def dumps_args(args: tuple, kwargs: dict) -> bytes:
    """Pickle a task's arguments: plain pickle when it can, cloudpickle otherwise.

    Plain pickle stores functions and classes by reference, which a worker
    cannot resolve for those of the user's script or notebook (``__main__``):
    when the name appears in the bytes, cloudpickle (which pickles those by
    value) does it again.  Plain pickle is about twice as fast, which matters
    for dask graphs of 100,000 tasks.
    """
    try:
        b = pickle.dumps((args, kwargs), protocol=5)
    except Exception:
        return cloudpickle.dumps((args, kwargs), protocol=5)
    if b"__main__" in b:
        return cloudpickle.dumps((args, kwargs), protocol=5)
    return b


class FunctionCache:
    """Unpickled functions by their pickled bytes (bounded, LRU)."""

    def __init__(self, maxsize: int = 1000):
        self.maxsize = maxsize
        self.cache: OrderedDict[bytes, Callable] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, b: bytes) -> Callable:
        with self.lock:
            func = self.cache.get(b)
            if func is not None:
                self.cache.move_to_end(b)
                return func
        func = pickle.loads(b)
        with self.lock:
            self.cache[b] = func
            if len(self.cache) > self.maxsize:
                self.cache.popitem(last=False)
        return func


function_cache = FunctionCache()


def sizeof(obj: Any) -> int:
    """Approximate bytes held by ``obj`` (cheap; exact for buffers and arrays)."""
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if isinstance(obj, memoryview):
        return obj.nbytes
    if isinstance(obj, (list, tuple, set, frozenset)):
        n = sys.getsizeof(obj)
        if len(obj) <= 10:
            return n + sum(sizeof(o) for o in obj)
        sample = list(obj)[:10]
        return n + int(sum(sizeof(o) for o in sample) * len(obj) / len(sample))
    if isinstance(obj, dict):
        n = sys.getsizeof(obj)
        items = list(obj.items())[:10]
        if not items:
            return n
        return n + int(sum(sizeof(k) + sizeof(v) for k, v in items) * len(obj) / len(items))
    try:
        return sys.getsizeof(obj)
    except Exception:
        return 64


def picklable_exception(exc: BaseException) -> BaseException:
    """``exc`` itself if it survives a pickle round trip, else a :class:`TaskError`."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=5))
        return exc
    except Exception:
        try:
            cloudpickle.loads(cloudpickle.dumps(exc))
            return exc
        except Exception:
            return TaskError(f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc))


def server_kwargs(func: Callable, kwargs: dict | None, name: str, server: Any) -> dict:
    """``kwargs`` plus ``{name: server}`` when ``func`` takes a parameter called ``name``
    (``Client.run`` passes ``dask_worker``, ``run_on_scheduler`` ``dask_scheduler``, as dask does)."""
    kwargs = dict(kwargs or {})
    try:
        param = inspect.signature(func).parameters.get(name)
    except (TypeError, ValueError):  # builtins without a signature take no such parameter
        return kwargs
    if param is not None and name not in kwargs and param.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
        kwargs[name] = server
    return kwargs


class Reschedule(Exception):
    """Raise inside a task to have the scheduler place it again."""


def run_task(key: Hashable, run_spec: tuple, deps: dict | None) -> tuple:
    """Run one task in the current thread; return an outcome tuple.

    ``("ok", key, value, start, stop, nbytes, type)`` or
    ``("error", key, exception, traceback_text, start, stop)`` or
    ``("reschedule", key)``.
    """
    _thread_state.key = key
    _thread_state.start = start = time.time()
    try:
        func_b, args_b = run_spec
        func = function_cache.get(func_b)
        args, kwargs = pickle.loads(args_b)
        if deps:
            args = substitute(args, deps)
            kwargs = substitute(kwargs, deps)
        value = func(*args, **kwargs)
        if asyncio.iscoroutine(value):
            value = asyncio.run(value)
        after = getattr(_thread_state, "after_task", None)
        if after is not None:  # e.g. the worker's client sends what the task submitted
            _thread_state.after_task = None
            after()
    except Reschedule:
        return ("reschedule", key)
    except BaseException as e:  # noqa: BLE001 - a task's failure is data, not a crash
        stop = time.time()
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None))
        return ("error", key, picklable_exception(e.with_traceback(None)), tb, start, stop)
    finally:
        _thread_state.key = None
        _thread_state.after_task = None
    stop = time.time()
    return ("ok", key, value, start, stop, sizeof(value), type(value).__qualname__)


class TaskThreadPool:
    """``nthreads`` threads running tasks; results come back in batches on the loop.

    Args:
        nthreads: number of threads.
        on_results: called on the event loop with a list of outcome tuples.
        worker: the Worker object, made available as ``get_worker()``.
        name: thread name prefix.
    """

    _STOP = object()
    _RETIRE = object()  # a job telling the thread that takes it to leave (see rejoin)

    def __init__(self, nthreads: int, on_results: Callable[[list], None], worker: Any = None,
                 name: str = "task", on_secede: Callable[[Hashable, float], None] | None = None):
        self.loop = asyncio.get_running_loop()
        self.on_results = on_results
        self.on_secede = on_secede
        self.name = name
        self._lock = threading.Lock()
        self._counter = itertools.count(nthreads)
        self.worker = worker
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: deque = deque()
        #: Seceded tasks waiting to take a pool thread's place again (rejoin).
        self._rejoining: set[threading.Event] = set()
        self._wakeup_pending = False
        self._closed = False
        self.threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(nthreads)
        ]
        for t in self.threads:
            t.start()

    def submit(self, key: Hashable, run_spec: tuple, deps: dict | None) -> None:
        self.jobs.put((key, run_spec, deps))

    def _run(self) -> None:
        _thread_state.worker = self.worker
        _thread_state.pool = self
        jobs = self.jobs
        while True:
            job = jobs.get()
            if job is self._STOP:
                return
            if job[0] is self._RETIRE:
                # A rejoining task takes this thread's place in the pool.
                with self._lock:
                    self.threads.remove(threading.current_thread())
                    self._rejoining.discard(job[1])
                job[1].set()
                return
            _thread_state.seceded = False
            if not self._report(run_task(*job)):
                return
            if _thread_state.seceded:
                # A replacement took this thread's place in the pool.
                with self._lock:
                    self.threads.remove(threading.current_thread())
                return

    def _report(self, outcome: tuple) -> bool:
        """Hand a task's outcome to the event loop (woken once per burst); ``False``
        once the loop is closed (the worker is gone)."""
        self.results.append(outcome)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # loop closed: the worker is gone
                return False
        return True

    def secede(self, key: Hashable, compute_duration: float) -> None:
        """The calling task leaves the pool: start a replacement thread, tell the worker."""
        _thread_state.seceded = True
        thread = threading.Thread(target=self._run, name=f"{self.name}-{next(self._counter)}", daemon=True)
        with self._lock:
            self.threads.append(thread)
        thread.start()
        if self.on_secede is not None:
            self.loop.call_soon_threadsafe(self.on_secede, key, compute_duration)

    def rejoin(self) -> None:
        """The calling seceded task takes a thread's place in the pool again: it
        waits until a pool thread is free and that thread leaves (``rejoin()``).
        The pool runs ``nthreads`` tasks at a time again once it has."""
        done = threading.Event()
        with self._lock:
            if self._closed:
                return
            self._rejoining.add(done)
        self.jobs.put((self._RETIRE, done))
        done.wait()
        _thread_state.seceded = False

    def _drain(self) -> None:
        self._wakeup_pending = False
        results = self.results
        batch = []
        while results:
            batch.append(results.popleft())
        if batch and not self._closed:
            self.on_results(batch)

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop the threads; a thread still running a task after ``timeout`` is left
        to finish on its own (it is a daemon and holds no locks of ours)."""
        with self._lock:
            self._closed = True
            threads = list(self.threads)
            for waiting in self._rejoining:  # nobody will make room for them now
                waiting.set()
        for _ in threads:
            self.jobs.put(self._STOP)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            logger.warning("threads still running tasks at close: %s", ", ".join(alive))


class ExecutorTaskPool(TaskThreadPool):
    """Tasks run in a user's ``concurrent.futures.ThreadPoolExecutor`` (``Worker(executor=...)``).

    Results come back to the event loop in batches as with :class:`TaskThreadPool`;
    ``get_worker()`` and ``get_client()`` work in the tasks.  The executor's threads
    are not the pool's own, so ``secede()`` in such a task does nothing: a task
    that waits on other tasks (``worker_client``) keeps its executor thread.  The
    worker shuts the executor down when it closes, as dask.distributed does.
    """

    def __init__(self, executor: Any, on_results: Callable[[list], None], worker: Any = None,
                 name: str = "task", on_secede: Callable[[Hashable, float], None] | None = None):
        super().__init__(0, on_results, worker=worker, name=name, on_secede=on_secede)
        self.executor = executor

    def submit(self, key: Hashable, run_spec: tuple, deps: dict | None) -> None:
        self.executor.submit(self._run_one, key, run_spec, deps)

    def _run_one(self, key: Hashable, run_spec: tuple, deps: dict | None) -> None:
        _thread_state.worker = self.worker
        _thread_state.pool = self
        try:
            outcome = run_task(key, run_spec, deps)
        finally:
            _thread_state.worker = _thread_state.pool = None
        if not self._closed:
            self._report(outcome)

    def secede(self, key: Hashable, compute_duration: float) -> None:
        """Nothing: the executor's threads are not ours to replace."""

    def rejoin(self) -> None:
        """Nothing (see :meth:`secede`)."""

    def shutdown(self, timeout: float = 2.0) -> None:
        """Shut the executor down (queued tasks are cancelled); wait up to ``timeout``
        for its running tasks."""
        with self._lock:
            self._closed = True
        self.executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        threads = list(getattr(self.executor, "_threads", ()))
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            logger.warning("executor threads still running tasks at close: %s", ", ".join(alive))


def make_task_pool(executor: Any, nthreads: int, on_results: Callable[[list], None], worker: Any,
                   name: str, on_secede: Callable[[Hashable, float], None]) -> TaskThreadPool:
    """The pool that runs a worker's tasks, from its ``executor`` option (see
    :func:`check_executor`)."""
    if executor is None:
        return TaskThreadPool(nthreads, on_results, worker=worker, name=name, on_secede=on_secede)
    if executor == "offload":
        return TaskThreadPool(1, on_results, worker=worker, name=f"{name}-offload", on_secede=on_secede)
    return ExecutorTaskPool(executor, on_results, worker=worker, name=name, on_secede=on_secede)


def check_executor(executor: Any) -> Any:
    """The ``executor`` option of a Worker, checked: ``None`` (the worker's own pool of
    ``nthreads`` threads), ``"offload"`` (one thread of the worker's own, tasks run one
    at a time), a ``concurrent.futures.ThreadPoolExecutor``, or ``{"default": one of
    those}``.

    Raises:
        TypeError: anything else, naming what is accepted (a process pool cannot run
            tasks that use their worker; naming executors per task is not supported).
    """
    from concurrent.futures import ThreadPoolExecutor

    if isinstance(executor, dict):
        if set(executor) != {"default"}:
            raise TypeError(f"Worker(executor={executor!r}): only {{'default': executor}} is accepted "
                            "as a dict (choosing an executor per task is not supported)")
        executor = executor["default"]
    if executor is None or executor == "offload" or isinstance(executor, ThreadPoolExecutor):
        return executor
    raise TypeError(f"Worker(executor={executor!r}): accepted values are None (the worker's own "
                    "thread pool), 'offload' (one thread), a concurrent.futures.ThreadPoolExecutor, "
                    "or {'default': one of those}")


def get_worker():
    """The Worker running the current task.

    Raises:
        ValueError: when called outside a task.
    """
    worker = getattr(_thread_state, "worker", None)
    if worker is None:
        raise ValueError("get_worker() called outside a task running on a worker")
    return worker


def secede() -> None:
    """Leave the worker's thread pool from inside a task (e.g. before waiting on other tasks).

    The worker starts another thread in this one's place and the scheduler no
    longer counts this task as load.  Outside a task this does nothing.
    """
    pool = getattr(_thread_state, "pool", None)
    key = getattr(_thread_state, "key", None)
    if pool is None or key is None or getattr(_thread_state, "seceded", False):
        return
    start = getattr(_thread_state, "start", None)
    pool.secede(key, time.time() - start if start else 0.0)


def rejoin() -> None:
    """Take a place in the worker's thread pool again after :func:`secede`.

    Blocks until a pool thread is free (that thread leaves), so the worker again
    runs no more tasks at a time than it has threads.  Does nothing outside a
    task or in a task that has not seceded.
    """
    pool = getattr(_thread_state, "pool", None)
    if pool is None or getattr(_thread_state, "key", None) is None or not getattr(_thread_state, "seceded", False):
        return
    pool.rejoin()


def get_current_task() -> Hashable | None:
    """The key of the task running in this thread (``None`` outside tasks)."""
    return getattr(_thread_state, "key", None)
