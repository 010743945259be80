"""Scheduler extensions: parts of the scheduler that own their state and handlers.

Theory of operation
-------------------
An extension is one object made by a factory called with the
:class:`~cluster.runtime.scheduler.server.Scheduler` (``factory(scheduler)``).  It
keeps its own state and names the request/reply operations it answers in a
``handlers`` mapping (``{op: callable}``); the scheduler adds them to its own
when it is built and refuses two parts that claim one name.  It may define any
of these hooks, which the scheduler calls, each guarded so that a failing
extension is logged and never breaks the scheduler:

- ``remove_client(client)``: a client went away (leases it held are lost);
- ``remove_worker(worker)``: a worker went away;
- ``close()`` (plain or async): the scheduler is closing.

An extension that holds futures for someone who is not a client (a variable,
a queue, a published dataset) keeps their keys alive through the scheduler
under a pseudo-client name of its own, with :func:`hold_keys` and
:func:`release_keys`: the keys stay in memory while it holds them, exactly as
if a client held futures for them.

``Scheduler(extensions=...)`` takes ``{name: factory}`` and replaces
:data:`cluster.runtime.extensions.DEFAULT_EXTENSIONS` (dask.distributed's meaning); each extension is then
``scheduler.extensions[name]``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .events import ClientReleasesKeysEvent, UpdateGraphEvent

if TYPE_CHECKING:  # pragma: no cover
    from .server import Scheduler

logger = logging.getLogger(__name__)

Key = Hashable


class SchedulerExtension(Protocol):
    """What the scheduler needs of an extension: the operations it answers.

    Hooks (``remove_client``, ``remove_worker``, ``close``) are optional.
    """

    handlers: Mapping[str, Callable[..., Any]]


def install(scheduler: Scheduler, factories: Mapping[str, Callable[[Scheduler], Any]]) -> dict[str, Any]:
    """Make each extension and add its handlers to ``scheduler.handlers``.

    Args:
        scheduler: the scheduler the extensions are parts of.
        factories: ``{name: factory}``.

    Returns:
        ``{name: extension}``.

    Raises:
        TypeError: ``factories`` is not a mapping of callables.
        ValueError: an extension claims an operation that is already taken.
    """
    if not isinstance(factories, Mapping):
        raise TypeError(f"extensions={factories!r}: expected a mapping {{name: factory(scheduler)}}")
    made: dict[str, Any] = {}
    for name, factory in factories.items():
        if not callable(factory):
            raise TypeError(f"extensions[{name!r}]={factory!r}: expected a callable factory(scheduler)")
        ext = factory(scheduler)
        for op, handler in dict(getattr(ext, "handlers", None) or {}).items():
            if op in scheduler.handlers or op in scheduler.stream_handlers:
                raise ValueError(f"extension {name!r} claims the operation {op!r}, which is taken")
            scheduler.handlers[op] = handler
        made[name] = ext
    return made


def call_hook(extensions: Mapping[str, Any], hook: str, *args: Any) -> list[Any]:
    """Call ``hook(*args)`` on every extension that has it; return the awaitables made.

    An extension that raises is logged; the others still run.
    """
    pending = []
    for name, ext in extensions.items():
        fn = getattr(ext, hook, None)
        if fn is None:
            continue
        try:
            result = fn(*args)
        except Exception:
            logger.exception("scheduler extension %r failed in %s", name, hook)
            continue
        if asyncio.iscoroutine(result):
            pending.append(result)
    return pending


def hold_keys(scheduler: Scheduler, holder: str, keys: Iterable[Key]) -> None:
    """Keep ``keys`` alive on behalf of ``holder`` (a pseudo-client name, e.g. ``"variable-x"``).

    Keys the scheduler does not know (already forgotten) are skipped.
    """
    keys = [k for k in keys if k in scheduler.state.tasks]
    if keys:
        scheduler._send(scheduler.state.handle(UpdateGraphEvent(
            holder, {}, keys, stimulus_id=scheduler._stimulus(f"hold-{holder}"))))


def release_keys(scheduler: Scheduler, holder: str, keys: Iterable[Key]) -> None:
    """Stop keeping ``keys`` alive for ``holder``; keys nobody else wants are released."""
    keys = list(keys)
    if keys:
        scheduler._send(scheduler.state.handle(ClientReleasesKeysEvent(
            keys, holder, scheduler._stimulus(f"release-{holder}"))))
