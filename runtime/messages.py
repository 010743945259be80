"""The shape of the messages that reach a server's state, checked before they do.

A handler that changes state (the scheduler's graph, its table of workers) must
not start on a message it cannot finish: ``nthreads={}`` in a worker's
registration, or ``dependencies={"k": 5}`` in a graph, used to raise half way
through and leave a worker counted but unusable, or a task nobody wants.  So the
dispatchers (:meth:`cluster.runtime.core.Server.handle_comm` for requests and stream
openings, the scheduler's stream loop for stream messages) check each message
against a spec first: for requests and stream openings, the specs here; for
the messages of a stream, the event each becomes
(:mod:`cluster.runtime.scheduler.events`, whose fields are declared with the checks
defined here):

* every field is one the operation takes, and every required field is there;
* each field's value has the type the handler relies on -- keys are keys
  (``str``, ``bytes``, ``int``, ``float`` or tuples of those), counts are
  non-negative integers, durations finite numbers, recipes pairs of bytes.

A request that fails gets an error reply naming the field; a stream message or
a stream opening that fails closes that one connection.  Nothing of the message
has been applied either way.

The checks are shallow and cheap (no copies; containers are walked once), and
run only on operations listed here: read-only requests and operations whose
handlers check their own arguments are left to fail in the handler, which
answers with an error.  This is robustness, not security: whoever may send us
messages may run code (see :mod:`cluster.runtime.security`).
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .utils import is_key


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message: a predicate, what it expects (for errors), whether required."""

    check: Callable[[Any], bool]
    expected: str
    required: bool = False


class Spec:
    """The fields of one operation.

    Args:
        open: accept fields not listed (unchecked), as a handler taking ``**kwargs`` does.
        semantic: ``semantic(msg, context)``, run after the fields passed, raises
            ``ValueError`` for a message that is well typed but cannot be applied
            (a cyclic graph); ``context`` is what the dispatcher passes (the
            scheduler's state).
        **fields: name -> :class:`Field`.
    """

    __slots__ = ("checks", "fields", "open", "required", "semantic")

    def __init__(self, open: bool = False,
                 semantic: Callable[[Mapping, Any], None] | None = None, **fields: Field):
        self.fields = fields
        self.checks = {name: f.check for name, f in fields.items()}  # the hot path's lookup
        self.open = open
        self.semantic = semantic
        self.required = frozenset(n for n, f in fields.items() if f.required)

    def check(self, op: str, msg: Mapping, context: Any = None) -> None:
        """Raise ``TypeError`` naming ``op`` and the first bad field of ``msg``
        (or ``ValueError`` from the semantic check)."""
        checks = self.checks
        for name, value in msg.items():
            check = checks.get(name)
            if check is None:
                if self.open and isinstance(name, str):
                    continue
                raise TypeError(f"{op!r} message: unexpected field {short_repr(name)}")
            if not check(value):
                raise TypeError(f"{op!r} message: field {name!r} must be "
                                f"{self.fields[name].expected}, not {_describe(value)}")
        if self.required and not self.required <= msg.keys():
            missing = sorted(self.required - msg.keys())
            raise TypeError(f"{op!r} message: missing field {', '.join(map(repr, missing))}")
        if self.semantic is not None and context is not None:
            try:
                self.semantic(msg, context)
            except ValueError as e:
                raise ValueError(f"{op!r} message: {e}") from None


def check_message(specs: Mapping[str, Spec], op: str, msg: Mapping, context: Any = None) -> None:
    """Check ``msg`` (without its ``op``) if ``specs`` has a spec for ``op``.

    Raises:
        TypeError: naming the operation and the field of the wrong type.
        ValueError: the message is well typed but cannot be applied.
    """
    spec = specs.get(op)
    if spec is not None:
        spec.check(op, msg, context)


def short_repr(value: Any) -> str:
    """A short ``repr`` of ``value`` that never raises, and never renders all of a huge or
    deeply nested container (for log lines about peers' data)."""
    try:
        r = _repr.repr(value)
    except Exception:  # a failing __repr__
        r = f"<{type(value).__name__}>"
    return r if len(r) <= 80 else r[:77] + "..."


_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = 60


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {short_repr(value)}"


# ----------------------------------------------------------------------------- predicates


def is_any(v: Any) -> bool:
    return True


def is_str(v: Any) -> bool:
    return type(v) is str or isinstance(v, str)


def is_bool(v: Any) -> bool:
    return isinstance(v, (bool, int))


# Each predicate tries the exact builtin type first: the ABC check costs several times more.


def is_int(v: Any) -> bool:
    """An integer (NumPy's too), not a bool."""
    t = type(v)
    return t is int or (t is not bool and isinstance(v, numbers.Integral))


def is_count(v: Any) -> bool:
    """A non-negative integer."""
    return is_int(v) and v >= 0


def is_finite(v: Any) -> bool:
    """A finite real number, not a bool."""
    t = type(v)
    if t is float:
        return math.isfinite(v)
    if t is int:
        return True
    return t is not bool and isinstance(v, numbers.Real) and math.isfinite(v)


def is_bytes(v: Any) -> bool:
    return isinstance(v, (bytes, bytearray, memoryview))


def is_hashable(v: Any) -> bool:
    try:
        hash(v)
    except Exception:
        return False
    return True


def is_recipe(v: Any) -> bool:
    """A task recipe as the client makes it: ``(function_bytes, arguments_bytes)``."""
    return type(v) is tuple and len(v) == 2 and is_bytes(v[0]) and is_bytes(v[1])


def is_startstop(v: Any) -> bool:
    """``(action, start, stop)``."""
    return (type(v) in (tuple, list) and len(v) == 3 and type(v[0]) is str
            and is_finite(v[1]) and is_finite(v[2]))


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def opt(v: Any) -> bool:
        return v is None or check(v)

    return opt


def collection_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A list, tuple, set or frozenset whose every item passes ``check``."""
    def coll(v: Any) -> bool:
        return isinstance(v, (list, tuple, set, frozenset)) and all(map(check, v))

    return coll


def dict_of(key: Callable[[Any], bool], value: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def d(v: Any) -> bool:
        return type(v) is dict and all(key(k) and value(x) for k, x in v.items())

    return d


def one_of(*checks: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def either(v: Any) -> bool:
        return any(c(v) for c in checks)

    return either


# ----------------------------------------------------------------------------- fields

def _f(check: Callable[[Any], bool], expected: str, required: bool = False) -> Field:
    return Field(check, expected, required)


KEY = _f(is_key, "a key (str, bytes, int, float or a tuple of those)", required=True)
OPT_KEY = _f(optional(is_key), "a key (str, bytes, int, float or a tuple of those) or None")
KEYS = _f(collection_of(is_key), "a list of keys (str, bytes, int, float or tuples of those)")
STR = _f(is_str, "a str")
OPT_STR = _f(optional(is_str), "a str or None")
ANY = _f(is_any, "anything")
BOOL = _f(is_bool, "a bool")
COUNT = _f(is_count, "a non-negative int")
NBYTES = _f(is_int, "an int")
OPT_FINITE = _f(optional(is_finite), "a finite number or None")
STARTSTOPS = _f(collection_of(is_startstop), "a list of (str, start, stop) triples")
STIMULUS = _f(is_str, "a str")
METRICS = _f(optional(dict_of(is_str, is_any)), "a dict with str keys, or None")
ADDRESSES = _f(optional(collection_of(is_str)), "a list of addresses (str), or None")
NAMES = _f(optional(collection_of(is_hashable)), "a list of worker addresses or names, or None")
KEY_TO_INT = _f(optional(dict_of(is_key, is_int)), "a dict of keys to ints, or None")
KEY_TO_STR = _f(optional(dict_of(is_key, is_str)), "a dict of keys to str, or None")
RESOURCES = _f(optional(dict_of(is_str, is_finite)), "a dict of resource names (str) to numbers, or None")


# ----------------------------------------------------------------------------- specs

#: Registrations: the first message of a worker's or a client's stream.
SCHEDULER_STREAM_OPENINGS: dict[str, Spec] = {
    "register_worker": Spec(
        address=_f(is_str, "an address (str)", required=True),
        nthreads=_f(lambda v: is_count(v) and v > 0, "a positive int"),
        name=_f(is_hashable, "a hashable name"),
        memory_limit=_f(optional(is_count), "a non-negative int or None"),
        resources=RESOURCES,
        host=STR,
        pid=_f(is_int, "an int"),
        nanny=OPT_STR,
        local_directory=STR,
        services=_f(optional(dict_of(is_str, is_any)), "a dict with str keys, or None"),
        keys=KEYS,
        nbytes=KEY_TO_INT,
        # Python and package versions, for the scheduler's mismatch warning (runtime.versions).
        versions=_f(optional(dict_of(is_str, is_any)), "a dict with str keys, or None"),
    ),
    "register_client": Spec(open=True, client=_f(is_str, "a client id (str)", required=True)),
}

# The messages of workers' and clients' streams to the scheduler are specified by
# the events they become: see runtime.scheduler.events (WORKER_STREAM, CLIENT_STREAM).

#: Requests to the scheduler that change its state.
SCHEDULER_REQUESTS: dict[str, Spec] = {
    "scatter": Spec(data=_f(optional(dict_of(is_key, is_any)), "a dict of keys to values, or None"),
                    workers=NAMES, client=OPT_STR, broadcast=BOOL, timeout=ANY),
    "update_data": Spec(who_has=_f(optional(dict_of(is_key, collection_of(is_str))),
                                   "a dict of keys to lists of worker addresses, or None"),
                        nbytes=KEY_TO_INT, client=OPT_STR, types=KEY_TO_STR, serializers=ANY),
    "cancel": Spec(keys=KEYS, client=STR, force=BOOL),
    "heartbeat_worker": Spec(address=_f(is_str, "an address (str)", required=True), metrics=METRICS),
    "gather": Spec(keys=KEYS, serializers=ANY),
    "who_has": Spec(keys=_f(optional(collection_of(is_key)), "a list of keys or None")),
}

#: Requests to a worker that change its state.
WORKER_REQUESTS: dict[str, Spec] = {
    "update_data": Spec(data=_f(optional(dict_of(is_key, is_any)), "a dict of keys to values, or None"),
                        report=BOOL),
    "get_data": Spec(keys=KEYS, who=OPT_STR),
}
