"""Turning calls into task recipes and graph messages, and results back into structures.

A call ``func(*args, **kwargs)`` becomes a recipe ``(function_bytes,
arguments_bytes)`` with futures among the arguments replaced by
:class:`TaskRef` placeholders; those futures' keys are the task's
dependencies.  Pure calls get a key from a hash of the recipe.
"""

from __future__ import annotations

import hashlib
import numbers
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from .errors import FutureCancelledError, TaskSerializationError
from .execution import TaskRef, dumps_args
from .futures import Future
from .messages import is_finite, is_hashable
from .utils import funcname, validate_key

Key = Hashable


def replace_futures(client: Any, obj: Any, deps: set) -> Any:
    """``obj`` with every Future of ``client`` (also nested) replaced by a ``TaskRef``; collects keys in ``deps``.

    Raises:
        ValueError: a future belongs to another client (as in dask.distributed).
        FutureCancelledError: a future was cancelled (as dask.distributed's CancelledError).
    """
    t = type(obj)
    if t is Future or isinstance(obj, Future):
        if obj.client is not client:
            raise ValueError(f"the future {obj.key!r} belongs to another client ({obj.client.id}); "
                             "futures cannot be shared between clients")
        if obj._state.status == "cancelled":
            raise FutureCancelledError(f"the future {obj.key!r} was cancelled: it cannot be the "
                                       "input of a new task (submit its computation again)")
        deps.add(obj.key)
        return TaskRef(obj.key)
    if t is list or t is tuple or t is set:
        if not obj:
            return obj
        return t(replace_futures(client, o, deps) for o in obj)
    if t is dict:
        if not obj:
            return obj
        return {k: replace_futures(client, v, deps) for k, v in obj.items()}
    return obj


def task_piece(client: Any, func: Callable, func_b: bytes, args: tuple, kwargs: dict, key: Key | None,
               pure: bool) -> tuple[Key, tuple]:
    """The key and ``(recipe, dependency keys)`` of one call.

    A tuple, and no set for a call without futures among its arguments: a
    map builds one per task before sending them (issue 14: memory per task).

    Raises:
        TaskSerializationError: naming the argument that would not pickle.
        TypeError: a given key of the wrong type.
    """
    deps: set = set()
    args2 = replace_futures(client, args, deps) if args else args
    kwargs2 = replace_futures(client, kwargs, deps) if kwargs else kwargs
    try:
        args_b = dumps_args(args2, kwargs2)
    except Exception as e:
        what = "arguments"
        for i, a in enumerate(args):
            try:
                dumps_args((a,), {})
            except Exception:
                what = f"argument {i} ({type(a).__name__})"
                break
        else:
            for k, v in kwargs.items():
                try:
                    dumps_args((), {k: v})
                except Exception:
                    what = f"keyword argument {k!r} ({type(v).__name__})"
                    break
        raise TaskSerializationError(f"{what} of {funcname(func)}", f"{type(e).__name__}: {e}") from e
    if key is None:
        if pure:
            token = hashlib.md5(func_b + args_b, usedforsecurity=False).hexdigest()
        else:
            token = uuid.uuid4().hex
        key = f"{funcname(func)}-{token}"
    else:
        validate_key(key)
    return key, ((func_b, args_b), tuple(deps) if deps else ())


def map_batches(client: Any, func: Callable, func_b: bytes, iterables: tuple, kwargs: dict,
                key: str | list | tuple | None, pure: bool, batch_size: int | None):
    """The tasks of ``client.map(func, *iterables, ...)``, in batches.

    Yields, per batch of at most ``batch_size`` calls (all calls if ``None``),
    the pieces by key (see :func:`task_piece`) and the keys in call order
    (repeated where pure calls repeat). A batch is built only when the
    previous one has been taken, so the caller can send it first.

    Raises:
        TypeError: ``batch_size`` is not an int (or from :func:`task_piece`).
        ValueError: ``batch_size`` is below 1; a key list of the wrong length.
    """
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"map: batch_size must be a positive int or None, not {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"map: batch_size must be a positive int or None, not {batch_size}")
    items = list(zip(*iterables, strict=False))
    if isinstance(key, (list, tuple)):
        if len(key) != len(items):
            raise ValueError(f"map: {len(key)} keys for {len(items)} items")
        keys: list = list(key)
    else:
        keys = [None] * len(items)
    step = int(batch_size or max(len(items), 1))
    for start in range(0, len(items), step):
        pieces: dict = {}
        order = []
        for args, k in zip(items[start:start + step], keys[start:start + step], strict=True):
            k, piece = task_piece(client, func, func_b, args, kwargs, k, pure)
            if isinstance(key, str):
                k = f"{key}-{k.rsplit('-', 1)[-1]}"
            pieces[k] = piece
            order.append(k)
        yield pieces, order


def check_task_options(workers: Any, resources: Any, retries: Any, priority: Any) -> None:
    """Refuse options of ``submit``/``map`` that the scheduler would refuse (closing our stream).

    Raises:
        TypeError: an option of the wrong type, named with the accepted ones.
        ValueError: a negative number of retries or amount of a resource.
    """
    if workers is not None and not isinstance(workers, str):
        if not isinstance(workers, (list, tuple, set, frozenset)) or not all(is_hashable(w) for w in workers):
            raise TypeError(f"workers={workers!r}: expected a worker address, name or host, or a "
                            "list of them")
    if resources is not None:
        if not isinstance(resources, Mapping) or not all(isinstance(k, str) for k in resources):
            raise TypeError(f"resources={resources!r}: expected a dict of resource names (str) "
                            "to amounts, e.g. {'GPU': 1}")
        for name, amount in resources.items():
            if not is_finite(amount):
                raise TypeError(f"resources={resources!r}: the amount of {name!r} must be a number")
            if amount < 0:
                raise ValueError(f"resources={resources!r}: the amount of {name!r} is negative")
    if retries is not None:
        if not isinstance(retries, numbers.Integral) or isinstance(retries, bool):
            raise TypeError(f"retries={retries!r}: expected a non-negative int")
        if retries < 0:
            raise ValueError(f"retries={retries!r}: expected a non-negative int")
    if priority is not None and not is_finite(priority):
        raise TypeError(f"priority={priority!r}: expected a number")


def graph_msg(pieces: dict, keys: list, workers, resources, retries, priority,
              allow_other_workers, fifo_timeout: float = 0.0) -> dict:
    """The ``update_graph`` message for ``pieces`` (see :func:`task_piece`).

    Raises:
        TypeError, ValueError: from :func:`check_task_options`.
    """
    check_task_options(workers, resources, retries, priority)
    if isinstance(workers, str):
        workers = [workers]
    tasks = {}
    dependencies = {}
    for k, (spec, deps) in pieces.items():
        tasks[k] = spec
        if deps:
            dependencies[k] = list(deps)
    return update_graph_msg(
        tasks, keys, dependencies,
        restrictions={k: list(workers) for k in pieces} if workers else {},
        loose_restrictions=list(pieces) if (workers and allow_other_workers) else [],
        resources={k: dict(resources) for k in pieces} if resources else {},
        retries={k: int(retries) for k in pieces} if retries else {},
        user_priority={k: priority for k in pieces} if priority else {},
        fifo_timeout=fifo_timeout,
    )


def update_graph_msg(tasks: dict, keys: list, dependencies: dict | None = None, *,
                     restrictions: dict | None = None, loose_restrictions: list | None = None,
                     resources: dict | None = None, retries: dict | None = None,
                     user_priority: dict | None = None, fifo_timeout: float = 0.0) -> dict:
    """An ``update_graph`` message with every field the scheduler's spec lists (the one
    place its shape is written on the client side; the scheduler's is
    :class:`cluster.runtime.scheduler.events.UpdateGraphEvent`)."""
    return {
        "op": "update_graph",
        "tasks": tasks,
        "keys": keys,
        "dependencies": {} if dependencies is None else dependencies,
        "restrictions": {} if restrictions is None else restrictions,
        "loose_restrictions": [] if loose_restrictions is None else loose_restrictions,
        "resources": {} if resources is None else resources,
        "retries": {} if retries is None else retries,
        "user_priority": {} if user_priority is None else user_priority,
        "fifo_timeout": fifo_timeout,
    }


def merge_messages(msgs: list[tuple[dict, bool]]) -> list[dict]:
    """The messages of one burst to the scheduler, consecutive ones merged where that
    changes nothing but the number of messages.

    ``msgs`` are ``(message, mergeable)`` pairs. Consecutive mergeable
    ``update_graph`` messages with the same ``fifo_timeout`` become one, with
    ``graph_starts`` marking where each graph begins (each keeps its own order of
    tasks); consecutive ``client_releases_keys`` become one. The first message of
    each merged run is extended in place.
    """
    merged: list[dict] = []
    last_mergeable = False
    for m, mergeable in msgs:
        last = merged[-1] if merged else None
        if (last is not None and m["op"] == last["op"] == "update_graph" and mergeable
                and last_mergeable and m["fifo_timeout"] == last["fifo_timeout"]):
            last.setdefault("graph_starts", [0]).append(len(last["tasks"]))
            for field in ("tasks", "dependencies", "restrictions", "resources", "retries", "user_priority"):
                last[field].update(m[field])
            last["keys"].extend(m["keys"])
            last["loose_restrictions"].extend(m["loose_restrictions"])
        elif last is not None and m["op"] == last["op"] == "client_releases_keys":
            last["keys"].extend(m["keys"])
        else:
            merged.append(m)
            last_mergeable = mergeable
    return merged


def collect_futures(obj, out: list) -> None:
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for o in obj:
            collect_futures(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            collect_futures(o, out)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        raise TypeError("gather takes futures, or lists, tuples, sets or dicts of them")


def substitute_results(obj, data: dict, errors: str):
    if isinstance(obj, Future):
        return data[obj.key]
    if isinstance(obj, (list, tuple, set, frozenset)):
        vals = [substitute_results(o, data, errors) for o in obj
                if not (isinstance(o, Future) and errors == "skip" and o.key not in data)]
        return type(obj)(vals)
    if isinstance(obj, dict):
        return {k: substitute_results(v, data, errors) for k, v in obj.items()
                if not (isinstance(v, Future) and errors == "skip" and v.key not in data)}
    return obj
