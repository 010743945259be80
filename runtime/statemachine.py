"""Pieces shared by the scheduler's and the worker's pure state machines.

Both machines follow one pattern: events come in, a table of transitions
``(start, finish) -> method`` moves tasks between states, and a list of
instructions comes out for the IO shell to carry out.  Every transition is
recorded in a bounded log as ``(key, start, finish, recommendations,
stimulus_id, time)`` so that ``story(key)`` can explain any task's life.

Instructions that go on the wire subclass :class:`Msg`: a dataclass whose
``op`` names the operation and whose routing field (``worker`` or ``client``)
is stripped by :meth:`Msg.to_wire`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any, ClassVar

Key = Hashable


@dataclasses.dataclass(slots=True)
class Instruction:
    """Something the IO shell must do."""

    stimulus_id: str


@dataclasses.dataclass(slots=True)
class Msg(Instruction):
    """An instruction that is a message to send to a peer."""

    op: ClassVar[str] = ""
    #: Field naming the recipient; not sent.
    route: ClassVar[str | None] = None

    def to_wire(self) -> dict[str, Any]:
        d = {"op": self.op}
        for name in _wire_fields(type(self)):
            d[name] = getattr(self, name)
        return d


@functools.cache
def _wire_fields(cls: type) -> tuple[str, ...]:
    # Computed once per message class: to_wire runs for every task.
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != cls.route)


class TransitionLog:
    """A bounded log of transitions, queried by key."""

    __slots__ = ("entries",)

    def __init__(self, maxlen: int = 100_000):
        self.entries: deque[tuple] = deque(maxlen=maxlen)

    def append(self, key: Key, start: str, finish: str, recs: dict, stimulus_id: str, t: float) -> None:
        self.entries.append((key, start, finish, recs, stimulus_id, t))

    def story(self, *keys: Key) -> list[tuple]:
        """All entries that touch one of ``keys`` (as the task or in its recommendations)."""
        keyset = set()
        for k in keys:
            keyset.add(getattr(k, "key", k))
        return [
            e for e in self.entries
            if e[0] in keyset or any(r in keyset for r in e[3])
        ]


TransitionTable = dict[tuple[str, str], Callable[..., Any]]


def table_entries(table: TransitionTable) -> Iterable[tuple[str, str]]:
    return sorted(table)
