"""dask collections and task graphs on our cluster: ``Client.get``, ``compute``, ``persist``.

Theory of operation
-------------------
dask hands a scheduler a *graph* (a mapping of keys to task specs: dask's
``Task``, ``DataNode``, ``Alias`` objects, or legacy tuples ``(func, *args)``
that :func:`dask._task_spec.convert_legacy_graph` turns into those) or an
expression whose ``__dask_graph__()`` is one.  We translate it on the client
into the same task records ``submit`` produces and send them in **one**
``update_graph`` message:

* each node becomes a recipe whose function is :func:`run_graph_node` and
  whose arguments are the node itself plus ``{dependency key: TaskRef}``; the
  worker replaces the refs by the dependencies' values (as for any task) and
  calls the node with them, as dask defines (``node(values)``), so new task
  kinds keep working;
* keys of the graph that are already on the cluster (our futures, e.g. from
  ``persist``) are not sent again: the new tasks depend on them;
* priorities come from :func:`dask.order.order`: the tasks are sent in that
  order and the scheduler numbers new tasks in arrival order, so workers and
  the scheduler's root-task queue run them in dask's memory-friendly order;
* ``dask.annotate(priority=, retries=, resources=, workers=,
  allow_other_workers=)`` become the per-key fields of the message.

A graph with a missing dependency or a cycle is refused here, naming the key,
before anything is sent.

dask itself is imported only in this module, only when a graph or collection
arrives or when a client registers itself as dask's scheduler
(:func:`register_as_dask_scheduler`).  ``distributed`` is never imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading
from collections.abc import Hashable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .execution import TaskRef, dumps_args, graph_pickling, run_graph_node, run_graph_node_bytes
from .futures import Future
from .graph import check_task_options, update_graph_msg
from .utils import validate_key

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

logger = logging.getLogger(__name__)

Key = Hashable

#: Annotations of ``dask.annotate`` that we carry out; any other is refused by name.
ANNOTATIONS = ("priority", "retries", "resources", "workers", "allow_other_workers")
#: Annotations dask or libraries set for their own schedulers' use (harmless to drop).
_IGNORED_ANNOTATIONS = ("fuse", "span", "shuffle", "queue")


def _require_dask():
    """Import dask, or say how to get it."""
    try:
        import dask  # noqa: F401
        import dask._task_spec  # noqa: F401
    except ImportError as e:  # pragma: no cover - the test extra installs dask
        raise ImportError("dask collections need the 'dask' package: pip install 'hpc-cluster[dask]'") from e
    return sys.modules["dask"]


# ----------------------------------------------------------------------------- graphs


def _materialize(dsk: Any) -> dict:
    """A plain ``{key: GraphNode}`` dict from a graph mapping or a dask expression."""
    from dask._task_spec import convert_legacy_graph

    if not isinstance(dsk, Mapping):
        graph = getattr(dsk, "__dask_graph__", None)
        if graph is None:
            raise TypeError(f"expected a dask graph (a mapping of keys to tasks) or a dask "
                            f"collection/expression, not {type(dsk).__name__}")
        dsk = graph()
    if not isinstance(dsk, dict):
        dsk = dict(dsk)  # a HighLevelGraph materializes itself
    return convert_legacy_graph(dsk)


def _flatten_keys(keys: Any, out: list) -> None:
    if isinstance(keys, list):
        for k in keys:
            _flatten_keys(k, out)
    else:
        out.append(keys)


def _pack(keys: Any, values: dict) -> Any:
    """``keys`` (nested lists) with each key replaced by its value."""
    if isinstance(keys, list):
        return [_pack(k, values) for k in keys]
    return values[keys]


def _cull(dsk: dict, wanted: list) -> dict:
    """The part of ``dsk`` the ``wanted`` keys need."""
    out: dict = {}
    stack = [k for k in wanted if k in dsk]
    while stack:
        k = stack.pop()
        if k in out:
            continue
        node = out[k] = dsk[k]
        stack.extend(d for d in node.dependencies if d in dsk and d not in out)
    return out


def _collapse_aliases(dsk: dict, wanted: list) -> dict:
    """``dsk`` without aliases whose target only they use: the target takes the
    alias's key (``{'x': f(), 'y': Alias('x')}`` runs as ``{'y': f()}``), a task
    and a round trip fewer each; dask's graphs have many (an array's chunks
    renamed by the next layer)."""
    from dask._task_spec import Alias, resolve_aliases

    if not any(type(v) is Alias for v in dsk.values()):
        return dsk
    dependents: dict = {k: set() for k in dsk}
    for k, node in dsk.items():
        for d in node.dependencies:
            if d in dependents:
                dependents[d].add(k)
    try:
        return resolve_aliases(dsk, set(wanted), dependents)
    except Exception:  # pragma: no cover - a node kind that cannot be copied: run as is
        logger.debug("could not collapse the graph's aliases", exc_info=True)
        return dsk


def _refuse_local_shuffles(dsk: dict) -> None:
    """Refuse dask's shuffles that are wrong on a cluster: "disk" (each worker writes
    partd files to its own machine's disk, which the workers of other nodes cannot
    read) and "p2p" (runs on dask.distributed's workers only).

    Raises:
        NotImplementedError: naming the method and what to use instead.
    """
    for k in dsk:
        name = k[0] if type(k) is tuple and k else k
        if type(name) is str and name.startswith(_LOCAL_SHUFFLES):
            method = "p2p" if name.startswith(_LOCAL_SHUFFLES[0]) else "disk"
            raise NotImplementedError(
                f"this graph uses dask's {method!r} shuffle (task {k!r}), which is not right on "
                "a cluster; use the task-based one: method='tasks', or dask.config.set("
                "{'dataframe.shuffle.method': 'tasks', 'array.rechunk.method': 'tasks'}) "
                "(what a default Client sets)")


#: Names of the tasks that give those shuffles away: p2p's barrier, disk's partd.
_LOCAL_SHUFFLES = ("shuffle-barrier-", "zpartd-")


def _check_acyclic(dsk: dict) -> None:
    """Raise ValueError naming a key on a cycle of ``dsk`` (iterative DFS, linear)."""
    state: dict = {}  # key -> 1 on the current path, 2 done
    for root in dsk:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(dsk[root].dependencies))]
        while stack:
            key, it = stack[-1]
            for dep in it:
                if dep not in dsk:
                    continue
                s = state.get(dep)
                if s == 1:
                    raise ValueError(f"the graph has a cycle through task {dep!r}")
                if s is None:
                    state[dep] = 1
                    stack.append((dep, iter(dsk[dep].dependencies)))
                    break
            else:
                stack.pop()
                state[key] = 2


def _annotation_for(values: Any, key: Key) -> Any:
    if isinstance(values, Mapping):
        return values.get(key)
    return values(key) if callable(values) else values


def _per_key_annotations(dsk: dict, by_type: Mapping[str, Any], global_: Mapping[str, Any]) -> dict:
    """``{annotation: {key: value}}`` for the keys of ``dsk``; unknown annotations refused.

    Raises:
        ValueError: an annotation we would not carry out, named with those we do.
    """
    names = set(by_type) | set(global_)
    unknown = names - set(ANNOTATIONS) - set(_IGNORED_ANNOTATIONS)
    if unknown:
        raise ValueError(f"unsupported dask annotation(s) {', '.join(sorted(map(repr, unknown)))}: "
                         f"accepted are {', '.join(ANNOTATIONS)}")
    out: dict = {}
    for name in ANNOTATIONS:
        per_key = by_type.get(name)
        glob = global_.get(name)
        if per_key is None and glob is None:
            continue
        got: dict = {}
        for k in dsk:
            v = _annotation_for(per_key, k) if per_key is not None else None
            if v is None and glob is not None:
                v = glob(k) if callable(glob) else glob  # a dict value (resources) is the value itself
            if v is not None:
                got[k] = v
        if got:
            out[name] = got
    return out


class GraphSubmission:
    """A graph translated into one ``update_graph`` message and the keys it returns.

    Attributes:
        msg: the message (``None`` when every wanted key is already a future).
        wanted: the flat list of output keys.
    """

    __slots__ = ("msg", "wanted")

    def __init__(self, msg: dict | None, wanted: list):
        self.msg = msg
        self.wanted = wanted


def translate_graph(client: Client, dsk: Any, keys: Any, *, annotations: Mapping[str, Any] | None = None,
                    workers=None, allow_other_workers=None, resources=None, retries=None,
                    priority=0) -> GraphSubmission:
    """Turn a dask graph (or expression) and its output ``keys`` into one message.

    Args:
        client: the client whose futures the graph may refer to.
        dsk: a mapping of keys to task specs (dask's or legacy tuples), or an
            object with ``__dask_graph__`` (a collection or expression).
        keys: the output keys, possibly nested lists of them.
        annotations: per-key annotations ``{name: {key: value}}`` (from
            ``expr.__dask_annotations__()``).
        workers, allow_other_workers, resources, retries, priority: as for
            :meth:`Client.submit`, for every task of the graph (annotations win).

    Raises:
        ValueError: a missing dependency or a cycle (naming the key), an
            unsupported annotation, or a future of another client.
        TypeError: a key or option of the wrong type.
    """
    _require_dask()
    import dask

    check_task_options(workers, resources, retries, priority if priority else None)
    wanted: list = []
    _flatten_keys(keys, wanted)
    for k in wanted:
        validate_key(k)
    dsk = _materialize(dsk)
    held = client.futures
    missing = [k for k in wanted if k not in dsk and k not in held]
    if missing:
        raise ValueError(f"the output key {missing[0]!r} is neither a task of the graph nor a future "
                         "of this client")
    dsk = _collapse_aliases(_cull(dsk, wanted), wanted)
    _refuse_local_shuffles(dsk)
    global_ann = dict(dask.get_annotations())
    if workers is not None:
        global_ann["workers"] = [workers] if isinstance(workers, str) else list(workers)
    if allow_other_workers:
        global_ann["allow_other_workers"] = True
    if resources:
        global_ann["resources"] = dict(resources)
    if retries:
        global_ann["retries"] = retries
    if priority:
        global_ann["priority"] = priority
    ann = _per_key_annotations(dsk, annotations or {}, global_ann)
    if not dsk:
        return GraphSubmission(None, wanted)
    _check_acyclic(dsk)
    order = _order(dsk)
    tasks: dict = {}
    dependencies: dict = {}
    func_b = client._serialize_function(run_graph_node)
    for key in order:
        node = dsk[key]
        deps = node.dependencies
        for d in deps:
            if d not in dsk and d not in held:
                raise ValueError(f"task {key!r} depends on {d!r}, which is neither a task of the "
                                 "graph nor a future of this client")
        graph_pickling.keys = found = set()
        try:
            recipe = (func_b, dumps_args((node, {d: TaskRef(d) for d in deps}), {}))
        except Exception as e:
            raise TypeError(f"task {key!r} of the graph cannot be pickled: {type(e).__name__}: {e}") from e
        finally:
            graph_pickling.keys = None
        if found:
            # Futures inside the node (not as dask references): resolved on the
            # worker while the node is unpickled, from its dependencies' values.
            recipe = _with_embedded_futures(client, key, node, deps, found)
            deps = set(deps) | found
        tasks[key] = recipe
        if deps:
            dependencies[key] = list(deps)
    msg = update_graph_msg(tasks, list(wanted), dependencies)
    _apply_annotations(msg, ann)
    return GraphSubmission(msg, wanted)


def _with_embedded_futures(client: Client, key: Key, node: Any, deps, found: set) -> tuple[bytes, bytes]:
    """The recipe of a node with our futures inside it (not as dask references).

    The node is pickled on its own; the worker unpickles it with the
    dependencies' values at hand, and each future unpickles as its value.
    """
    for k in found:
        if k not in client.futures:
            raise ValueError(f"task {key!r} refers to the future {k!r}, which belongs to another "
                             "client or was released")
    graph_pickling.keys = set()
    try:
        node_b = dumps_args((node,), {})
    finally:
        graph_pickling.keys = None
    refs = {d: TaskRef(d) for d in set(deps) | found}
    return client._serialize_function(run_graph_node_bytes), dumps_args((node_b, refs), {})


def _order(dsk: dict) -> list:
    """The keys of ``dsk`` in dask's execution order (:func:`dask.order.order`)."""
    from dask.order import order

    prio = order(dsk)
    return sorted(dsk, key=prio.__getitem__)


def _apply_annotations(msg: dict, ann: dict) -> None:
    """Fill the message's per-key fields from ``{annotation: {key: value}}``.

    Raises:
        TypeError, ValueError: an annotation value of the wrong kind (named).
    """
    for k, v in ann.get("priority", {}).items():
        check_task_options(None, None, None, v)
        msg["user_priority"][k] = v
    for k, v in ann.get("retries", {}).items():
        check_task_options(None, None, v, None)
        if v:
            msg["retries"][k] = int(v)
    for k, v in ann.get("resources", {}).items():
        check_task_options(None, v, None, None)
        if v:
            msg["resources"][k] = dict(v)
    loose = ann.get("allow_other_workers", {})
    for k, v in ann.get("workers", {}).items():
        w = [v] if isinstance(v, str) else list(v)
        check_task_options(w, None, None, None)
        if w:
            msg["restrictions"][k] = w
            if loose.get(k):
                msg["loose_restrictions"].append(k)


# ----------------------------------------------------------------------------- client operations


def _futures_for(client: Client, wanted: list) -> dict:
    """One future per wanted key (made before the message leaves, so the report finds them)."""
    out = {}
    for k in wanted:
        if k in out:
            continue
        out[k] = Future(k, client, client._state_for_new_task(k))
    return out


def submit_graph(client: Client, dsk: Any, keys: Any, fifo_timeout: float = 0.0,
                 **options) -> tuple[list, dict]:
    """Send a graph; returns the flat output keys and a future per key."""
    client._check_running()
    sub = translate_graph(client, dsk, keys, **options)
    futures = _futures_for(client, sub.wanted)
    if sub.msg is not None:
        sub.msg["fifo_timeout"] = fifo_timeout
        client._send(sub.msg)
    return sub.wanted, futures


def client_get(client: Client, dsk: Any, keys: Any, *, sync: bool = True, asynchronous: bool | None = None,
               direct: bool | None = None, **options) -> Any:
    """:meth:`Client.get`: run a graph, return the results in the shape of ``keys``."""
    wanted, futures = submit_graph(client, dsk, keys, **options)
    if not sync:
        return _pack(keys, futures)
    if asynchronous or client.asynchronous:
        async def get_async():
            values = await client._gather(futures, direct=direct)
            return _pack(keys, values)
        return get_async()

    values = client.gather(futures, direct=direct)
    return _pack(keys, values)


def _expr_of(collections: list, optimize_graph: bool, **kwargs):
    from dask.base import collections_to_expr

    return collections_to_expr(collections, optimize_graph, **kwargs)


def _composite_exprs(expr: Any) -> list[bool]:
    """Per collection of a (not yet optimized) sequence expression: whether dask
    rebuilds it as a composite collection after persist (newer dask only)."""
    from dask import _expr as dx

    composite = getattr(dx, "CompositeExpr", None)
    seq = list(expr.operands) if isinstance(expr, dx._ExprSequence) else [expr]
    return [composite is not None and isinstance(e, composite) for e in seq]


def _annotations(collections: list, expr: Any) -> dict:
    """Per-key annotations of ``collections`` as built.

    dask's graph optimizations (blockwise fusion) drop layer annotations;
    the keys they keep are the outputs of the fused layers, so the
    annotations of the unoptimized graph, looked up by key, still apply.
    """
    got = dict(expr.__dask_annotations__())
    if any(_has_layer_annotations(c) for c in collections):
        try:
            raw = _expr_of(collections, False).__dask_annotations__()
        except Exception:  # pragma: no cover - an expression that cannot be built unoptimized
            raw = {}
        for name, per_key in raw.items():
            merged = dict(per_key)
            merged.update(got.get(name, {}))
            got[name] = merged
    return got


def _has_layer_annotations(coll: Any) -> bool:
    try:
        graph = coll.__dask_graph__()
    except Exception:  # pragma: no cover
        return False
    layers = getattr(graph, "layers", None)
    if not layers:
        return False
    return any(getattr(layer, "annotations", None) for layer in layers.values())


def client_compute(client: Client, collections: Any, *, sync: bool = False, optimize_graph: bool = True,
                   traverse: bool = True, **options) -> Any:
    """:meth:`Client.compute`: futures for the results of collections."""
    _require_dask()
    import dask
    from dask._expr import FinalizeCompute

    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    colls = [collections] if singleton else list(collections)
    if traverse:
        colls = [dask.delayed(c) if isinstance(c, (list, set, tuple, dict, Iterator)) else c
                 for c in colls]
    variables = [c for c in colls if dask.is_dask_collection(c)]
    futures_by_key: dict = {}
    names: list = []
    if variables:
        expr = FinalizeCompute(_expr_of(variables, optimize_graph)).optimize()
        names = []
        _flatten_keys(expr.__dask_keys__(), names)
        _, futures_by_key = submit_graph(client, expr, names,
                                         annotations=_annotations(variables, expr), **options)
    out = []
    i = 0
    for c in colls:
        if dask.is_dask_collection(c):
            out.append(futures_by_key[names[i]])
            i += 1
        else:
            out.append(c)
    if sync:  # gather returns an awaitable with an asynchronous client: no indexing it here
        return client.gather(out[0] if singleton else out)
    return out[0] if singleton else out


def client_persist(client: Client, collections: Any, *, optimize_graph: bool = True, **options) -> Any:
    """:meth:`Client.persist`: the same collections, backed by futures on the workers."""
    _require_dask()
    import dask

    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    colls = [collections] if singleton else list(collections)
    if not all(dask.is_dask_collection(c) for c in colls):
        bad = next(c for c in colls if not dask.is_dask_collection(c))
        raise TypeError(f"persist takes dask collections, not {type(bad).__name__}")
    expr = _expr_of(colls, optimize_graph)
    composite = _composite_exprs(expr)
    expr = expr.optimize()
    # One entry of keys per collection, in order (dask's sequence expressions).
    per_coll: list[list] = []
    for ks_nested in expr.__dask_keys__():
        ks: list = []
        _flatten_keys(ks_nested, ks)
        per_coll.append(ks)
    all_keys = [k for ks in per_coll for k in ks]
    _, futures = submit_graph(client, expr, all_keys, annotations=_annotations(colls, expr), **options)
    out = []
    for i, (c, ks) in enumerate(zip(colls, per_coll, strict=True)):
        if composite[i]:
            from dask.base import _rebuild_composite_collection

            out.append(_rebuild_composite_collection(c, ks, futures, cull_to_child_keys=True))
        else:
            rebuild, args = c.__dask_postpersist__()
            out.append(rebuild({k: futures[k] for k in ks}, *args))
    return out[0] if singleton else out


# ----------------------------------------------------------------------------- dask's default scheduler

_registered: list = []  # clients that made themselves dask's scheduler, most recent last
_registered_lock = threading.Lock()
_saved_config: dict = {}  # dask's settings before our first client took over
_hook_installed = False

#: The dask settings a default client sets besides itself as the scheduler: the
#: dataframe shuffle and array rechunk methods that are right on a multi-node
#: cluster, the task-based ones (dask's "disk" shuffle writes to one machine's
#: local disk; "p2p" needs dask.distributed's workers).
_TASK_METHODS = ("dataframe.shuffle.method", "array.rechunk.method")


def _apply_config() -> None:
    """Make dask's config follow ``_registered`` (called with the lock held)."""
    import dask

    if not _saved_config:
        _saved_config.update({k: dask.config.get(k, None) for k in ("scheduler", *_TASK_METHODS)})
    if _registered:
        client = _registered[-1]
        dask.config.set({"scheduler": dask_schedule(client), **dict.fromkeys(_TASK_METHODS, "tasks")})
        return
    dask.config.set(dict(_saved_config))
    _saved_config.clear()


def dask_schedule(client: Client):
    """What dask calls to compute while ``client`` is its scheduler: ``client.get``
    (dask's ``persist`` finds the client itself through the bound method)."""
    if not client.asynchronous:
        return client.get

    def refuse(*args, **kwargs):
        raise RuntimeError("Attempting to use an asynchronous Client in a synchronous context of "
                           "`dask.compute`: use `await client.compute(...)` instead")

    refuse.__self__ = client  # type: ignore[attr-defined]  (dask.persist looks for it)
    return refuse


def refuse_unsupported(actors: Any, kwargs: dict) -> None:
    """Refuse what ``get``/``compute``/``persist`` accept in dask.distributed but we do not.

    Raises:
        TypeError: unknown keyword arguments, named.
        ValueError: ``actors``.
    """
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
    if actors:
        raise ValueError("actors are not supported")


def register_as_dask_scheduler(client: Client) -> None:
    """Make ``client`` dask's scheduler (``.compute()``, ``dask.compute``, ``persist``).

    Registrations stack: the most recent one wins, and undoing it (see
    :func:`unregister_as_dask_scheduler`) brings the one before back.  dask
    is not imported here: if the program has not imported it yet, a
    post-import hook applies the registration when (and if) it does.
    """
    with _registered_lock:
        _registered.append(client)
        if "dask.config" in sys.modules:
            try:
                _apply_config()
            except BaseException:
                _registered.pop()  # leave dask's settings and the stack as they were
                raise
            return
    _install_import_hook()


def unregister_as_dask_scheduler(client: Client, everywhere: bool = False) -> None:
    """Undo the last :func:`register_as_dask_scheduler` of ``client`` (all of them with
    ``everywhere``, when it closes): the one before, or dask's own setting, is back."""
    with _registered_lock:
        if client not in _registered:
            return
        if everywhere:
            _registered[:] = [c for c in _registered if c is not client]
        else:
            i = len(_registered) - 1 - _registered[::-1].index(client)
            del _registered[i]
        if "dask.config" in sys.modules and (_saved_config or _registered):
            _apply_config()


def _on_dask_imported() -> None:
    with _registered_lock:
        if _registered:
            _apply_config()


class _DaskImportHook(importlib.abc.MetaPathFinder):
    """Registers the default client once dask's config module is imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "dask.config":
            return None
        sys.meta_path.remove(self)
        global _hook_installed
        _hook_installed = False
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                sys.modules["dask"].config = module  # not set on the package until we return
                _on_dask_imported()

        spec.loader = Loader()
        return spec


def _install_import_hook() -> None:
    global _hook_installed
    with _registered_lock:
        if _hook_installed or "dask.config" in sys.modules:
            return
        sys.meta_path.insert(0, _DaskImportHook())
        _hook_installed = True
