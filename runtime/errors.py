"""Exceptions of the runtime: one root, typed subclasses, all picklable.

Tree::

    ClusterError
    ├── CommError                    transport-level failures
    │   ├── CommClosedError          the peer or we closed the connection
    │   ├── ConnectionTimeoutError   connect() gave up after retrying (names the address)
    │   ├── ProtocolError            malformed frame, oversized length, undecodable payload
    │   ├── TLSError                 a TLS handshake failed (certificate refused, peer not TLS)
    │   └── UnknownOperationError    a message named an operation nobody handles
    ├── AddressError                 an address string we cannot parse
    ├── EncryptionRequiredError      a plain tcp:// address where security requires encryption
    ├── UnsafePathError              a file or directory another user owns or can write (also PermissionError)
    ├── InvalidTransition            a state machine was asked for a move its table lacks
    ├── InvalidStateError            validate=True found a broken invariant
    ├── KilledWorker                 a task took down too many workers (allowed_failures)
    ├── ScatteredDataLost            scattered data lost with its last holder; cannot recompute
    ├── FutureCancelledError         also a concurrent.futures.CancelledError
    ├── ClusterTimeoutError          also the builtin TimeoutError
    ├── RemoteTraceback              cause attached to a task's re-raised exception
    └── TaskSerializationError       a task's function, arguments or result would not pickle

A task's *own* exception is never wrapped: the client re-raises the original type
with a :class:`RemoteTraceback` as its ``__cause__``.  Every class here pickles
(a test round-trips each one), because they cross process boundaries.
"""

from __future__ import annotations

import concurrent.futures


class ClusterError(Exception):
    """Root of every exception this project raises on purpose."""

    def __reduce__(self):
        # Keyword-only fields would be lost by Exception's default reduce, which
        # replays only ``self.args``; subclasses keep all their state in args.
        return (self.__class__, self.args)


class CommError(ClusterError):
    """A transport-level failure."""


class CommClosedError(CommError):
    """The connection is closed (by the peer, by us, or by a fault)."""


class ConnectionTimeoutError(CommError, TimeoutError):
    """Connecting kept failing until the timeout.

    Args:
        address: the address we tried.
        timeout: seconds we kept trying.
        reason: the last error seen.
    """

    def __init__(self, address: str, timeout: float, reason: str = ""):
        super().__init__(address, timeout, reason)
        # OSError (via TimeoutError) keeps only two of three args: restore them
        # so that the error pickles with its reason.
        self.args = (address, timeout, reason)
        self.address = address
        self.timeout = timeout
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"could not connect to {self.address} within {self.timeout:g}s"
            + (f": {self.reason}" if self.reason else "")
        )


class ProtocolError(CommError):
    """A frame or message that does not follow the wire protocol."""


class TLSError(CommError):
    """A TLS handshake failed: a certificate was refused, or the peer does not speak TLS.

    Not retried by ``connect``: trying again would fail the same way.
    """


class UnknownOperationError(CommError):
    """A message named an operation the receiver does not handle."""


class AddressError(ClusterError, ValueError):
    """An address string that cannot be parsed or has an unknown protocol."""


class EncryptionRequiredError(ClusterError, ValueError):
    """A plain ``tcp://`` address was given where ``Security.require_encryption`` is set."""


class UnsafePathError(ClusterError, PermissionError):
    """A file or directory we were to trust is owned by another user, is a symbolic
    link, or can be written by others (its message names the path and the problem).

    Args:
        message: the path, what is wrong with it, and what to do.
    """

    def __init__(self, message: str):
        super().__init__(message)
        # PermissionError (an OSError) would take a one-argument args as errno-less
        # message; keep args as given so that it pickles and prints as given.
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class InvalidTransition(ClusterError):
    """A state machine was asked for a transition its table does not hold.

    Args:
        key: the task key.
        start: its current state.
        finish: the state asked for.
        story: the task's recorded transitions, for the error message.
    """

    def __init__(self, key, start: str, finish: str, story: tuple = ()):
        super().__init__(key, start, finish, tuple(story))
        self.key = key
        self.start = start
        self.finish = finish
        self.story = tuple(story)

    def __str__(self) -> str:
        return f"no transition {self.start!r} -> {self.finish!r} for task {self.key!r}"


class InvalidStateError(ClusterError, AssertionError):
    """``validate=True`` found an invariant broken after a step."""


class KilledWorker(ClusterError):
    """A task was running on workers that died too many times.

    Args:
        task: the task key.
        last_worker: the address of the last worker that died with it.
        allowed_failures: the limit that was passed.
    """

    def __init__(self, task, last_worker: str = "", allowed_failures: int = 0):
        super().__init__(task, last_worker, allowed_failures)
        self.task = task
        self.last_worker = last_worker
        self.allowed_failures = allowed_failures

    def __str__(self) -> str:
        return (
            f"task {self.task!r} was running on workers that died more than "
            f"allowed_failures={self.allowed_failures} times; last: {self.last_worker}"
        )


class ScatteredDataLost(ClusterError):
    """Scattered data was lost with its only holder and has no recipe to recompute."""

    def __init__(self, key):
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"scattered data {self.key!r} was lost with its last worker and cannot be recomputed"


class FutureCancelledError(ClusterError, concurrent.futures.CancelledError):
    """The future was cancelled (``except concurrent.futures.CancelledError`` catches it)."""


class ClusterTimeoutError(ClusterError, TimeoutError):
    """An operation did not finish in time (``except TimeoutError`` catches it)."""


class RemoteTraceback(ClusterError):
    """The traceback of a task's exception where it was raised.

    Attached as ``__cause__`` of the re-raised exception so that the printed
    chain shows where, on which worker, the task failed.
    """

    def __init__(self, text: str, worker: str = ""):
        super().__init__(text, worker)
        self.text = text
        self.worker = worker

    def __str__(self) -> str:
        where = f" on worker {self.worker}" if self.worker else ""
        return f"\n\nRemote traceback{where}:\n\"\"\"\n{self.text}\"\"\""


class TaskSerializationError(ClusterError, TypeError):
    """A task's function, argument, or result could not be (un)pickled.

    Args:
        what: which object, e.g. ``"argument 0 of f"``.
        reason: the pickling error's text.
    """

    def __init__(self, what: str, reason: str = ""):
        super().__init__(what, reason)
        self.what = what
        self.reason = reason

    def __str__(self) -> str:
        return f"could not serialize {self.what}" + (f": {self.reason}" if self.reason else "")


class TaskError(ClusterError):
    """Stands in for a task exception whose own type could not be pickled.

    Args:
        type_name: qualified name of the original exception type.
        message: ``str()`` of the original exception.
    """

    def __init__(self, type_name: str, message: str = ""):
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


__all__ = [
    "AddressError",
    "ClusterError",
    "ClusterTimeoutError",
    "CommClosedError",
    "CommError",
    "ConnectionTimeoutError",
    "EncryptionRequiredError",
    "FutureCancelledError",
    "InvalidStateError",
    "InvalidTransition",
    "KilledWorker",
    "ProtocolError",
    "RemoteTraceback",
    "ScatteredDataLost",
    "TLSError",
    "TaskError",
    "TaskSerializationError",
    "UnknownOperationError",
    "UnsafePathError",
]
