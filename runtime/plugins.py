"""What users plug into the servers, and what they take away from them.

* Plugin base classes, with dask.distributed's names and hooks:
  :class:`WorkerPlugin` (``setup``/``teardown``/``transition`` on every worker,
  present and future), :class:`SchedulerPlugin` (the scheduler's events) and
  :class:`NannyPlugin` (``setup``/``teardown`` on every nanny, with
  ``restart=True`` restarting the workers after ``setup``).
  ``Client.register_plugin`` picks where a plugin goes from its base class.
* :func:`block_handlers`: the ``blocked_handlers=`` option of the Scheduler,
  Worker and LocalCluster -- the named operations answer every request with
  :class:`BlockedHandlerError` instead of running.
* :func:`silence_logs`: the ``silence_logs=`` option (the level of the
  runtime's loggers in this process).

A plugin object travels pickled (cloudpickle) from the client to the
scheduler and on to the workers and nannies: whoever may register one may run
code there, like any task (see SECURITY.md).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)


class WorkerPlugin:
    """Base class of worker plugins: override the hooks you need.

    Register one with ``Client.register_plugin(plugin)`` (every worker, present
    and future) or ``Worker(plugins=[plugin])`` (that worker).  Hooks may be
    ``async def``; ``setup``'s errors reach the client that registered it.

    Attributes:
        name: the plugin's name; registering another with the same name replaces it
            (default: a name made from the class name, unique per object).
        idempotent: ``register_plugin`` leaves an existing plugin of the same name
            in place instead of replacing it.
    """

    name: str | None = None
    idempotent: bool = False

    def setup(self, worker) -> None:
        """Run when the plugin is added to ``worker`` (or when the worker starts)."""

    def teardown(self, worker) -> None:
        """Run when the worker closes or the plugin is removed or replaced."""

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        """Run after each task transition on the worker (``stimulus_id=`` in ``kwargs``)."""


class SchedulerPlugin:
    """Base class of scheduler plugins: override the hooks you need.

    Register one with ``Client.register_plugin(plugin)`` or
    ``Scheduler.add_plugin(plugin)``.  ``start``, ``close``, ``before_close`` and
    ``restart`` may be ``async def``; the others run synchronously inside the
    scheduler's event handling (a slow hook slows the scheduler).
    """

    name: str | None = None
    idempotent: bool = False

    async def start(self, scheduler) -> None:
        """Run when the plugin is added (or the scheduler starts with it)."""

    async def before_close(self) -> None:
        """Run when the scheduler starts closing, before anything is torn down."""

    async def close(self) -> None:
        """Run when the scheduler closes."""

    async def restart(self, scheduler) -> None:
        """Run when ``Client.restart`` restarts the workers."""

    def update_graph(self, scheduler, client: str, keys: list, **kwargs) -> None:
        """Run when a client submits tasks."""

    def transition(self, key, start: str, finish: str, *args, **kwargs) -> None:
        """Run after each task transition (``stimulus_id=`` in ``kwargs``)."""

    def add_worker(self, scheduler, worker: str) -> None:
        """Run when a worker registers."""

    def remove_worker(self, scheduler, worker: str) -> None:
        """Run when a worker is removed."""

    def add_client(self, scheduler, client: str) -> None:
        """Run when a client connects."""

    def remove_client(self, scheduler, client: str) -> None:
        """Run when a client goes away."""


class NannyPlugin:
    """Base class of nanny plugins: run in each nanny's process, not its worker's.

    Register one with ``Client.register_plugin(plugin)``: ``setup(nanny)`` runs
    on every nanny, present and future (before it starts its worker process);
    with ``restart = True`` the present nannies then restart their workers, so
    that what ``setup`` changed (environment variables, installed packages)
    reaches fresh worker processes.

    Attributes:
        name / idempotent: as for :class:`WorkerPlugin`.
        restart: restart the worker after ``setup`` on the nannies present.
    """

    name: str | None = None
    idempotent: bool = False
    restart: bool = False

    def setup(self, nanny) -> None:
        """Run when the plugin is added to ``nanny``."""

    def teardown(self, nanny) -> None:
        """Run when the nanny closes or the plugin is removed or replaced."""


def plugin_name(plugin: Any) -> str:
    """The plugin's ``name``, or one made from its class name (unique per registration)."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    return f"{type(plugin).__name__}-{uuid.uuid4()}"


def overrides(plugin: Any, hook: str, base: type) -> bool:
    """Whether ``plugin`` has a ``hook`` of its own (not ``base``'s no-op)."""
    fn = getattr(type(plugin), hook, None)
    return fn is not None and fn is not getattr(base, hook, None)


# ----------------------------------------------------------------------------- blocked handlers


class BlockedHandlerError(PermissionError):
    """A request named an operation the server was told to refuse (``blocked_handlers``).

    Args:
        op: the operation.
        server: what refused it (``"Scheduler"``, ``"Worker"``).
    """

    def __init__(self, op: str, server: str = ""):
        super().__init__(f"the {op!r} handler is blocked on this {server or 'server'} "
                         "(blocked_handlers), possibly for security reasons")
        self.op = op
        self.server = server

    def __reduce__(self):
        return (type(self), (self.op, self.server))


def check_blocked_handlers(blocked: Iterable[str] | None, accepted: Iterable[str],
                           owner: str) -> list[str]:
    """``blocked`` as a list, after checking that each name is an operation of ``accepted``.

    Raises:
        TypeError: ``blocked`` is not a list of str.
        ValueError: naming the unknown names and the accepted ones.
    """
    if blocked is None:
        return []
    if isinstance(blocked, str) or not all(isinstance(n, str) for n in blocked):
        raise TypeError(f"{owner}(blocked_handlers={blocked!r}): expected a list of operation "
                        "names (str)")
    names = list(blocked)
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise ValueError(f"{owner}(blocked_handlers=...): {', '.join(map(repr, unknown))} "
                         f"{'is not an operation' if len(unknown) == 1 else 'are not operations'} "
                         f"of this server; accepted names: {', '.join(sorted(accepted))}")
    return names


def block_handlers(server: Any, blocked: Iterable[str] | None, owner: str) -> list[str]:
    """Make each named request handler or stream opening of ``server`` refuse its callers.

    A blocked request is answered with :class:`BlockedHandlerError` (which
    reaches the client as that type); a blocked stream opening (a worker's or
    client's registration) is answered the same way and its connection closed.

    Returns:
        The blocked names.

    Raises:
        TypeError / ValueError: see :func:`check_blocked_handlers`.
    """
    names = check_blocked_handlers(blocked, set(server.handlers) | set(server.stream_handlers), owner)
    for name in names:
        if name in server.handlers:
            server.handlers[name] = _refuser(name, owner)
        if name in server.stream_handlers:
            server.stream_handlers[name] = _stream_refuser(name, owner)
        logger.info("%s: the %r handler is blocked", owner, name)
    return names


def _refuser(op: str, owner: str) -> Callable[..., Any]:
    def blocked(**kwargs: Any) -> Any:
        logger.warning("refused a %r request: the handler is blocked (blocked_handlers)", op)
        raise BlockedHandlerError(op, owner)

    return blocked


def _stream_refuser(op: str, owner: str) -> Callable[..., Any]:
    async def blocked(comm: Any, **kwargs: Any) -> None:
        logger.warning("refused a %r stream: the handler is blocked (blocked_handlers)", op)
        await comm.write(("error", BlockedHandlerError(op, owner), ""))

    return blocked


# ----------------------------------------------------------------------------- options we refuse


def refuse_unsupported(owner: str, instead: dict[str, str], **options: Any) -> None:
    """Refuse dask.distributed options we do not implement, unless left at their default.

    Args:
        owner: the class, for the message (``"Worker"``).
        instead: what to use instead, per option name.
        **options: ``name=(value, default)``.

    Raises:
        TypeError: naming the option, and what to use instead.
    """
    for name, (value, default) in options.items():
        if value is not default and value != default and (value or default):
            raise TypeError(f"{owner}({name}={value!r}) is not supported; {instead[name]}")


# ----------------------------------------------------------------------------- silence_logs


def silence_logs(level: Any, owner: str) -> int | None:
    """Apply ``silence_logs=``: the level of the runtime's loggers (``runtime``) in this process.

    Accepts a level number, a level name (``"error"``), ``True`` (``WARNING``,
    as dask's default ``logging.WARN``), or ``None``/``False`` (leave it as is).

    Returns:
        The level set, or ``None``.

    Raises:
        ValueError: naming the value and the accepted ones.
    """
    if level is None or level is False:
        return None
    if level is True:
        value = logging.WARNING
    elif isinstance(level, int):
        value = level
    elif isinstance(level, str) and isinstance(logging.getLevelName(level.upper()), int):
        value = logging.getLevelName(level.upper())
    else:
        raise ValueError(f"{owner}(silence_logs={level!r}): expected a logging level (a number "
                         "such as logging.ERROR, or a name such as 'error'), True, or None/False")
    logging.getLogger("cluster.runtime").setLevel(value)
    return value


__all__ = [
    "BlockedHandlerError",
    "NannyPlugin",
    "SchedulerPlugin",
    "WorkerPlugin",
    "block_handlers",
    "check_blocked_handlers",
    "overrides",
    "plugin_name",
    "refuse_unsupported",
    "silence_logs",
]
