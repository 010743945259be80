"""``Variable``: one named, mutable value shared by clients and tasks, kept by the scheduler.

Theory of operation
-------------------
:class:`VariableExtension` is the scheduler's part (``scheduler.extensions["variables"]``):
``{name: record}`` (see :mod:`cluster.runtime.extensions.holding` for records).  A
future stored in a variable (or inside a value stored in one) stays in memory
while it is the variable's value: the extension holds its key under the
pseudo-client ``"variable-<name>"`` and lets go when the value is replaced or
the variable deleted.  ``get`` waits on the scheduler's loop (an asyncio wait
with the caller's deadline) until the variable is set; the client sends one
request and waits for its one reply, it does not poll.

:class:`Variable` is the handle users hold, with dask.distributed's names and
meaning.  It works from a client and inside tasks (it pickles by name; inside a
task it uses the worker's client), with synchronous clients and with
``asynchronous=True`` ones (whose methods return awaitables).
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from ..utils import parse_timedelta
from . import holding
from .holding import Waiters

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..scheduler.server import Scheduler


class VariableExtension:
    """The scheduler's variables: ``variable_set``, ``variable_get``, ``variable_delete``.

    Args:
        scheduler: the scheduler this is a part of.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        #: ``{name: record}`` of every variable that is set.
        self.variables: dict[Hashable, dict] = {}
        self._waiters: dict[Hashable, Waiters] = {}
        self.handlers = {
            "variable_set": self.set,
            "variable_get": self.get,
            "variable_delete": self.delete,
        }

    @staticmethod
    def holder(name: Hashable) -> str:
        """The pseudo-client that keeps the futures of variable ``name`` alive."""
        return f"variable-{name}"

    async def set(self, name: Hashable, record: dict, client: str | None = None,
                  timeout: float | None = None) -> None:
        """Make ``record`` the value of ``name``; waiting ``get`` calls return it.

        Raises:
            TypeError: ``record`` is not a value record.
            ClusterTimeoutError: a future in it did not reach the scheduler within ``timeout``.
        """
        holding.check_record(record)
        keys = holding.record_keys(record)
        await holding.require_known(self.scheduler, keys, f"variable {name!r}", timeout)
        holder = self.holder(name)
        holding.hold(self.scheduler, holder, keys)
        old = self.variables.get(name)
        self.variables[name] = record
        kept = set(keys)
        holding.release(self.scheduler, holder, [k for k in holding.record_keys(old) if k not in kept])
        waiters = self._waiters.pop(name, None)
        if waiters is not None:
            waiters.notify_all()

    async def get(self, name: Hashable, timeout: float | None = None, client: str | None = None) -> dict:
        """The record of ``name``, waiting until it is set; its futures are handed to ``client``.

        Raises:
            ClusterTimeoutError: not set within ``timeout`` seconds (a ``TimeoutError``).
        """
        deadline = holding.deadline_of(timeout)
        while name not in self.variables:
            waiters = self._waiters.setdefault(name, Waiters())
            try:
                await waiters.wait(deadline, client, f"variable {name!r} to be set (timeout={timeout}s)")
            finally:
                if not waiters and self._waiters.get(name) is waiters:
                    del self._waiters[name]
        record = self.variables[name]
        holding.hand_over(self.scheduler, client, holding.record_keys(record))
        return record

    def delete(self, name: Hashable, client: str | None = None) -> None:
        """Forget ``name`` and let go of its futures (nothing happens if it is not set)."""
        old = self.variables.pop(name, None)
        holding.release(self.scheduler, self.holder(name), holding.record_keys(old))

    def remove_client(self, client: str) -> None:
        for waiters in self._waiters.values():
            waiters.cancel(client)

    def close(self) -> None:
        for waiters in self._waiters.values():
            waiters.cancel()
        self._waiters.clear()


class Variable:
    """A named value shared between clients and tasks (dask.distributed's ``Variable``).

    The value is kept by the scheduler: small values are fine, large data
    should be scattered and the future stored instead.  A future stored here
    stays in memory while it is the variable's value, even when every client
    lets go of it.

    Args:
        name: the name other clients and tasks use (default: a new unique one).
        client: the client to talk through (default: the worker's client inside
            a task, else the default client), found when first needed.

    Example:
        >>> x = Variable("x")            # doctest: +SKIP
        >>> x.set(client.submit(f, 1))   # doctest: +SKIP
        >>> x.get().result()             # doctest: +SKIP
    """

    def __init__(self, name: Hashable | None = None, client: Client | None = None):
        self.name = name if name is not None else f"variable-{uuid.uuid4().hex}"
        self._client = client

    @property
    def client(self) -> Client:
        """The client this variable talks through."""
        if self._client is None:
            self._client = holding.resolve_client(None)
        return self._client

    def __repr__(self) -> str:
        return f"<Variable: {self.name!r}>"

    def __reduce__(self):
        # By name: unpickled in a task it talks through that worker's client.
        return (Variable, (self.name,))

    def __await__(self):
        async def ready() -> Variable:
            return self

        return ready().__await__()

    def set(self, value: Any, timeout: Any = "30 s"):
        """Make ``value`` (a future, or anything that pickles) the variable's value.

        Args:
            timeout: how long the scheduler waits for a future submitted just
                before to reach it.

        Raises:
            TaskSerializationError: ``value`` does not pickle.
            ClusterTimeoutError: a future in ``value`` is unknown to the scheduler
                (released or cancelled) after ``timeout``.
        """
        return holding.scheduler_call(self.client, "variable_set", keep=value, name=self.name,
                                      record=holding.encode(value), timeout=parse_timedelta(timeout))

    def get(self, timeout: Any = None):
        """The value, waiting until the variable is set.

        Args:
            timeout: seconds (or a string such as ``"200ms"``) to wait at most.

        Returns:
            The value; a future of this variable's client when a future was stored.

        Raises:
            TimeoutError: not set within ``timeout``.
        """
        client = self.client
        timeout = parse_timedelta(timeout)
        if client.asynchronous:
            return self._get(client, timeout)
        # Decoded here, not on the client's loop: futures attach to this client either way.
        return holding.decode(client, holding.scheduler_call(client, "variable_get", name=self.name,
                                                             timeout=timeout))

    async def _get(self, client: Client, timeout: float | None):
        record = await holding.scheduler_call(client, "variable_get", name=self.name, timeout=timeout)
        return holding.decode(client, record)

    def delete(self):
        """Delete the variable for everyone; its futures are let go of.  Safe if it is not set."""
        return holding.scheduler_call(self.client, "variable_delete", name=self.name)
