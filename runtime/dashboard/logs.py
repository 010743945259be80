"""A bounded log of records for one server, for ``Client.get_worker_logs`` and friends."""

from __future__ import annotations

import logging
import time
from collections import deque

#: Records kept per server.
LOG_LENGTH = 10_000

#: The loggers whose records a server keeps (the runtime's own).
RUNTIME_LOGGERS = ("cluster.runtime",)


class ServerLog(logging.Handler):
    """Keep the last ``maxlen`` records of the runtime's loggers as ``(level, message)``.

    One per server instance, attached while the server runs and detached on
    close.  Logging is per process, so servers sharing a process (in-process
    test clusters) each see every record of that process, as in
    dask.distributed.

    Args:
        maxlen: records kept; older ones are dropped.
        level: the least severe level kept.
    """

    def __init__(self, maxlen: int = LOG_LENGTH, level: int = logging.INFO):
        super().__init__(level)
        self.records: deque[tuple[float, str, str]] = deque(maxlen=maxlen)
        self._attached: list[logging.Logger] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string in someone's log call
            msg = str(record.msg)
        self.records.append((record.created, record.levelname, f"{record.name} - {msg}"))

    def attach(self) -> None:
        """Start keeping records (idempotent)."""
        if self._attached:
            return
        for name in RUNTIME_LOGGERS:
            lg = logging.getLogger(name)
            lg.addHandler(self)
            self._attached.append(lg)

    def detach(self) -> None:
        """Stop keeping records (idempotent)."""
        for lg in self._attached:
            lg.removeHandler(self)
        self._attached.clear()

    def get(self, n: int | None = None, timestamps: bool = False) -> list[tuple]:
        """The last ``n`` (all with ``None``) records, oldest first: ``(level, message)``,
        or ``(time, level, message)`` with ``timestamps``."""
        items = list(self.records)
        if n is not None:
            items = items[-n:] if n > 0 else []
        if timestamps:
            return items
        return [(level, msg) for _, level, msg in items]


class EventLog:
    """A bounded structured log of ``(time, topic, message)`` (``Worker.log_event``)."""

    def __init__(self, maxlen: int = 10_000):
        self.events: deque[tuple[float, str, object]] = deque(maxlen=maxlen)

    def log(self, topic: str | list[str], msg: object) -> None:
        now = time.time()
        for t in [topic] if isinstance(topic, str) else topic:
            self.events.append((now, t, msg))

    def get(self, topic: str | None = None) -> list[tuple[float, object]] | dict:
        """``[(time, msg), ...]`` for ``topic``, or ``{topic: [...]}`` for all."""
        if topic is not None:
            return [(t, m) for t, tp, m in self.events if tp == topic]
        out: dict[str, list] = {}
        for t, tp, m in self.events:
            out.setdefault(tp, []).append((t, m))
        return out
