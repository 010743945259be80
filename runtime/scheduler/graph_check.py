"""The cycle check of a graph a client sends, against the scheduler's tasks.

Pure, and read-only: it runs while the ``update_graph`` message is decoded
(:class:`cluster.runtime.scheduler.events.UpdateGraphEvent`), before anything of the
message is applied, and :func:`cluster.runtime.scheduler.stimuli.update_graph` relies on it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .state import SchedulerState

Key = Hashable


def _gains_dependencies(state: SchedulerState, key: Key, spec: Any) -> bool:
    """Whether :meth:`update_graph` would give ``key`` (with recipe ``spec``) dependencies."""
    ts = state.tasks.get(key)
    if ts is None:
        return True
    if ts.run_spec is None and spec is not None and ts.state in ("released", "erred"):
        return True
    return ts.state == "erred" and ts.exception_blame is ts


def check_graph(state: SchedulerState, tasks: dict[Key, Any], dependencies: dict[Key, Iterable[Key]]) -> None:
    """Refuse a graph that :meth:`update_graph` would make cyclic; it changes nothing.

    Our client cannot make a cycle (a task can depend only on futures that
    exist before it), but a broken or hostile peer can, and a task that
    waits on itself would never run nor ever be forgotten.  Cost: linear in
    the new tasks and their edges; the existing graph is walked only when
    an existing task gains dependencies (a placeholder that gets its
    recipe, or a failed task submitted again).

    Raises:
        ValueError: naming a task on the cycle.
    """
    gaining = {k for k, spec in tasks.items() if dependencies.get(k) and _gains_dependencies(state, k, spec)}
    if not gaining:
        return
    walk_old = any(k in state.tasks for k in gaining)

    def deps(key: Key) -> Iterable[Key]:
        if key in gaining:
            yield from dependencies[key]
            ts = state.tasks.get(key)
            if ts is not None:
                yield from (d.key for d in ts.dependencies)
        elif walk_old:
            ts = state.tasks.get(key)
            if ts is not None:
                yield from (d.key for d in ts.dependencies)

    done: set = set()
    for root in gaining:
        if root in done:
            continue
        on_path = {root}
        stack = [(root, iter(deps(root)))]
        while stack:
            key, it = stack[-1]
            for dep in it:
                if dep in on_path:
                    raise ValueError(f"the graph has a cycle through task {dep!r}")
                if dep not in done:
                    on_path.add(dep)
                    stack.append((dep, iter(deps(dep))))
                    break
            else:
                stack.pop()
                on_path.discard(key)
                done.add(key)
